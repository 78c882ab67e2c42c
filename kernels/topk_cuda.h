// CUDA launcher of the top-k teacher's losses and gradient (kernels/topk_kernels.cu). Raw pointers and a stream:
// the torch layer (csrc/torch/topk_ops.cpp) checks tensors and calls it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "distill/row_math.h"
#include "distill_cuda.h"

namespace dpkd::distill::cuda {

// Same contract as the CPU's topk_forward (distill/topk.h): ids and fp32 log-probabilities [n_rows, k],
// contiguous; grad_weight and grad_student both null (loss and statistics only) or both given (the gradient,
// in the logits' dtype).
void topk_forward(DType dtype, int64_t n_rows, const void* student, int64_t vocab, int64_t student_stride,
                  const int64_t* ids, const float* logprobs, int64_t k, bool tail, const int64_t* labels,
                  const float* grad_weight, const RowOptions& options, float* loss, float* stats, void* grad_student,
                  int64_t grad_stride, cudaStream_t stream);

}  // namespace dpkd::distill::cuda
