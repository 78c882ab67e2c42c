// CUDA launchers of the fused distillation objectives (kernels/distill_kernels.cu). Raw pointers and
// a stream: the torch layer (csrc/torch/distill_ops.cpp) checks tensors and calls these.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "distill/row_math.h"

namespace dpkd::distill::cuda {

enum class DType { kFloat32, kBFloat16, kFloat16 };

// Same contract as the CPU forward/backward in distill/objectives.h; one thread block per row.
void forward(DType dtype, int64_t n_rows, const void* student, int64_t student_vocab, int64_t student_stride,
             const void* teacher, int64_t teacher_vocab, int64_t teacher_stride, const int64_t* labels,
             const RowOptions& options, float* loss, float* stats, float* row_state, cudaStream_t stream);

void backward(DType dtype, int64_t n_rows, const float* grad_loss, const void* student, int64_t student_vocab,
              int64_t student_stride, const void* teacher, int64_t teacher_vocab, int64_t teacher_stride,
              const int64_t* labels, const float* row_state, const RowOptions& options, void* grad_student,
              int64_t grad_stride, cudaStream_t stream);

}  // namespace dpkd::distill::cuda
