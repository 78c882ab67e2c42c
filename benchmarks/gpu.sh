#!/usr/bin/env bash
# One device-tool call: build dpkd with CUDA against the machine's torch, run the CUDA tests, then the
# GPU benchmarks (objectives, selection, fused linear, DP-SGD). Pass part names to run only those:
# bash benchmarks/gpu.sh [test|objectives|profile|select|fused|dp|ghost|dphead|topk|dpprofile|demo], comma-separated,
# or all (the build always runs); the default is test,objectives,select,fused,dp,ghost,dphead,topk. Each part is
# bounded by its own timeout and by a deadline for the whole call (GPU_SH_BUDGET seconds, 570 by default), so the
# call ends with its output inside the device tool's 10-minute command limit: a part that would run past
# the deadline is cut short, and one that would start within 10 s of it is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
part=${1:-test,objectives,select,fused,dp,ghost,dphead,topk}
# want PART: whether PART is asked for; it becomes the part that `bounded` reports as skipped or cut short.
want() { current=$1; [ "$part" = all ] || [[ ",$part," == *",$1,"* ]]; }
# Parts skipped or cut short by the deadline, for the closing line's rerun command (a file: `bounded` may run
# in a pipeline's subshell).
unfinished_file=$(mktemp) current=build
note_unfinished() { echo "$current" >> "$unfinished_file"; }
deadline=$(( $(date +%s) + ${GPU_SH_BUDGET:-570} ))
# bounded SECONDS CMD...: CMD under a timeout of SECONDS, or less where the deadline is nearer.
bounded() {
  local limit=$1 left=$(( deadline - $(date +%s) )); shift
  if (( left < 10 )); then echo "gpu.sh: skipped (deadline): $*"; note_unfinished; return; fi
  (( left < limit )) && limit=$left
  timeout -k 10 "$limit" "$@"  # SIGKILL 10 s after SIGTERM: a process stuck in the driver ends too
  local rc=$?
  if (( rc == 124 || rc == 137 )); then echo "gpu.sh: cut short after $limit s: $*"; note_unfinished; fi
  return $rc
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# The device machine has no package index: Eigen's headers travel in .deps/ (scripts/device_deps.sh makes
# it), the benchmarks' peers (Liger-Kernel, Opacus) as wheels in .whl/; both are carried by the call.
if [ -d .deps/eigen ] && [ ! -d /usr/share/eigen3/cmake ]; then
  cp -r .deps/eigen/include/eigen3 /usr/include/ && mkdir -p /usr/share/eigen3 && cp -r .deps/eigen/share/eigen3/cmake /usr/share/eigen3/
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
time bounded 300 python3 -m pip install --no-build-isolation --no-deps --no-index -q -e . 2>&1 | tail -20
python3 -c "import dpkd; assert dpkd.with_cuda, 'dpkd was built without CUDA'; print('dpkd with CUDA')" || exit 1
want test && bounded 240 python3 -m pytest -q -rf --tb=short -k cuda tests/python/test_losses_cuda.py tests/python/test_losses.py \
  tests/python/test_select.py tests/python/test_privacy.py tests/python/test_fused_linear.py \
  tests/python/test_private_head.py tests/python/test_topk.py 2>&1 | tail -60
want objectives && bounded 150 python3 benchmarks/bench_distill.py --device cuda --repeat 10
want profile && for d in jsd forward_kl; do bounded 60 python3 benchmarks/profile_distill.py --divergence $d; done
want select && bounded 60 python3 benchmarks/bench_select.py --device cuda
want fused && bounded 100 python3 benchmarks/bench_fused_linear.py --device cuda --n 8192 --vocab 128256 --hs 2048 --ht 4096
want dp && bounded 100 python3 benchmarks/bench_dpsgd.py --device cuda --model llama --layers 8 --hidden 512 --batch 32 --seq 256
want dp && bounded 100 python3 benchmarks/bench_dpsgd.py --device cuda --model llama --layers 8 --hidden 512 --batch 32 --seq 256 --autocast
want dp && bounded 120 python3 benchmarks/bench_dpsgd.py --device cuda --model gpt2 --layers 12 --hidden 768 --vocab 50257 --batch 16 --seq 256
want ghost && bounded 60 python3 benchmarks/bench_ghost.py
want dphead && bounded 180 python3 benchmarks/bench_private_head.py --device cuda --batch 32 --seq 256 --vocab 128256 \
  --hs 2048 --ht 4096
want topk && bounded 60 python3 benchmarks/bench_topk.py --device cuda --repeat 10
want dpprofile && bounded 120 python3 benchmarks/bench_dpsgd.py --device cuda --model llama --layers 8 --hidden 512 --batch 32 --seq 256 --repeat 3 --profile
want demo && bounded 300 python3 -m dpkd demo --device cuda --size medium --quiet
echo "gpu.sh: done, $(( ${GPU_SH_BUDGET:-570} - (deadline - $(date +%s)) )) s"
unfinished=$(awk '!seen[$0]++' "$unfinished_file" | paste -sd, -)
[ -n "$unfinished" ] && echo "gpu.sh: unfinished parts; on the same (warm) machine: bash benchmarks/gpu.sh $unfinished"
