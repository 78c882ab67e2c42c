// Functions written once for g++ (the CPU kernels) and nvcc (kernels/): host and device where nvcc compiles.
#pragma once

#ifdef __CUDACC__
#define DPKD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DPKD_HOST_DEVICE inline
#endif
