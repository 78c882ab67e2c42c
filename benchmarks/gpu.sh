#!/usr/bin/env bash
# One device-tool call: build dpkd with CUDA against the machine's torch, run the CUDA tests, then the
# benchmarks. Prints a short table last. Usage (device tool): bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
pip install -q scikit-build-core hypothesis mpmath 2>/dev/null || true
time pip install --no-build-isolation -q -e . 2>&1 | tail -3
python3 -c "import dpkd; assert dpkd.with_cuda, 'dpkd was built without CUDA'; print('dpkd with CUDA')"
python3 -m pytest -q -x tests/python/test_losses_cuda.py tests/python/test_losses.py 2>&1 | tail -5
python3 benchmarks/bench_distill.py --device cuda --repeat 10
