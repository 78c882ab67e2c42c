#!/usr/bin/env bash
# Syntax-checks the torch glue (csrc/torch/*.cpp) as the CUDA build compiles it (-DDPKD_WITH_CUDA), where
# there is no GPU build: the CPU torch wheel ships ATen's CUDA headers but not the CUDA math libraries'
# headers they include, so a few of their handle and status types are declared here.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
# Where nvcc itself looks for the CUDA headers (nvcc may be a wrapper script outside the toolkit).
cuda_include=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
torch_include=$("$python" -c "import torch.utils.cpp_extension as e; print(' '.join('-I' + p for p in e.include_paths()))")
py_include=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['include'])")

stubs=build/cuda-glue-stubs
mkdir -p "$stubs/c10/cuda/impl"
cat > "$stubs/cublas_v2.h" <<'H'
#pragma once
typedef struct cublasContext* cublasHandle_t;
typedef int cublasStatus_t;
#define CUBLAS_STATUS_SUCCESS 0
#define CUBLAS_STATUS_NOT_SUPPORTED 15
H
printf '#pragma once\ntypedef struct cublasLtContext* cublasLtHandle_t;\n' > "$stubs/cublasLt.h"
cat > "$stubs/cusparse.h" <<'H'
#pragma once
typedef struct cusparseContext* cusparseHandle_t;
typedef int cusparseStatus_t;
#define CUSPARSE_STATUS_SUCCESS 0
inline const char* cusparseGetErrorString(cusparseStatus_t) { return ""; }
H
printf '#pragma once\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\n' > "$stubs/cusolverDn.h"
printf '#pragma once\ntypedef int cusolverStatus_t;\n#define CUSOLVER_STATUS_SUCCESS 0\n' > "$stubs/cusolver_common.h"
printf '#pragma once\n' > "$stubs/c10/cuda/impl/cuda_cmake_macros.h"

flags="-std=c++20 -fsyntax-only -DDPKD_WITH_CUDA -I$stubs $torch_include -I$cuda_include -I$cuda_include/cccl \
-I$py_include -Icsrc/core -Ikernels"
# One g++ per file, in parallel (torch's headers make each take half a minute).
printf '%s\n' csrc/torch/*.cpp | xargs -P "$(nproc)" -I{} sh -c "g++ $flags {} && echo 'check_cuda_glue: {} ok'"
