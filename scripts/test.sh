#!/usr/bin/env bash
# Runs every test: CUDA sources compile, the C++ core's GoogleTest suite, the Python suite.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/compile_cuda.sh

cmake -S . -B build/core -G Ninja -DDPKD_PYTHON_MODULE=OFF -DDPKD_BUILD_TESTS=ON >/dev/null
cmake --build build/core
ctest --test-dir build/core --output-on-failure --timeout 300

.venv/bin/python -m pytest -q "$@"
