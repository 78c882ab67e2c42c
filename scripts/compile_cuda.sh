#!/usr/bin/env bash
# Compiles every CUDA source in kernels/ with nvcc for Hopper. Where there is no GPU this is the check
# that the kernels build; running them needs the GPU (benchmarks/gpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t sources < <(find kernels -name '*.cu' | sort)
if [ ${#sources[@]} -eq 0 ]; then
  echo "compile_cuda: no CUDA sources in kernels/"
  exit 0
fi
nvcc=${NVCC:-nvcc}
command -v "$nvcc" >/dev/null || { echo "compile_cuda: nvcc not found (set NVCC)"; exit 1; }
launcher=""; command -v ccache >/dev/null && launcher=ccache
mkdir -p build/cuda-check
for src in "${sources[@]}"; do
  obj="build/cuda-check/$(basename "${src%.cu}").o"
  $launcher "$nvcc" -std=c++17 -O3 -arch=sm_90a -Icsrc/core -Ikernels -c "$src" -o "$obj"
  echo "compile_cuda: $src ok"
done
