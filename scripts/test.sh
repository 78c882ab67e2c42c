#!/usr/bin/env bash
# Runs every test: the CUDA sources compile, and so does the torch glue as the CUDA build sees it; the C++
# core's GoogleTest suite; the Python suite.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/compile_cuda.sh
bash scripts/check_cuda_glue.sh

cmake -S . -B build/core -G Ninja -DDPKD_PYTHON_MODULE=OFF -DDPKD_BUILD_TESTS=ON >/dev/null
cmake --build build/core
ctest --test-dir build/core --output-on-failure --timeout 300

.venv/bin/python -m pytest -q "$@"
