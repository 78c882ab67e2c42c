// CUDA launchers of per-row token selection (kernels/select_kernels.cu). Raw pointers and a stream: the torch
// layer (csrc/torch/select_ops.cpp) checks tensors, allocates the workspace and calls these.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dpkd::select::cuda {

// Bytes of device workspace top_fraction needs for `rows` rows of `cols` entries (rows * cols < 2^31).
size_t top_fraction_workspace_bytes(int64_t rows, int64_t cols);

// The CPU op's contract (select/top_fraction.h, top_fraction_rows): per row, the selected_count(fraction, n)
// highest scores (lowest if !largest) among its n valid, finite entries, ties to the earlier column. A
// stable radix sort of all rows at once (CUB), then the first k positions of each row are marked.
void top_fraction(const float* score, const bool* valid, int64_t rows, int64_t cols, double fraction, bool largest,
                  bool* selected, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace dpkd::select::cuda
