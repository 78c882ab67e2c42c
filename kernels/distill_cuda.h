// CUDA launchers of the fused distillation objectives (kernels/distill_kernels.cu). Raw pointers and
// a stream: the torch layer (csrc/torch/distill_ops.cpp) checks tensors and calls these.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "distill/row_math.h"

namespace dpkd::distill::cuda {

enum class DType { kFloat32, kBFloat16, kFloat16 };

// Same contract as the CPU forward/backward in distill/objectives.h. Given `grad_student` (else null), the
// forward also writes the gradient of sum_i grad_weight[i] * loss[i] there, as backward would with
// grad_loss = grad_weight: on sm_90 in the same kernel and the same single read of the logits. The gradient's
// element type `grad_dtype` is the logits' `dtype`, or bf16 / fp16 for fp32 logits with options.fast_math.
void forward(DType dtype, int64_t n_rows, const void* student, int64_t student_vocab, int64_t student_stride,
             const void* teacher, int64_t teacher_vocab, int64_t teacher_stride, const int64_t* labels,
             const RowOptions& options, float* loss, float* stats, float* row_state, const float* grad_weight,
             void* grad_student, int64_t grad_stride, DType grad_dtype, cudaStream_t stream);

void backward(DType dtype, int64_t n_rows, const float* grad_loss, const void* student, int64_t student_vocab,
              int64_t student_stride, const void* teacher, int64_t teacher_vocab, int64_t teacher_stride,
              const int64_t* labels, const float* row_state, const RowOptions& options, void* grad_student,
              int64_t grad_stride, DType grad_dtype, cudaStream_t stream);

// x *= *scale over n elements, leaving x untouched (no memory traffic) when *scale is 1.
void scale_unless_one(DType dtype, void* x, int64_t n, const float* scale, cudaStream_t stream);

// The forward as one thread-block cluster per row (distill_cluster.cu); false, launching nothing, where
// that path does not apply (device older than sm_90, standardization, unequal vocabularies, unaligned rows).
bool cluster_forward(DType dtype, int64_t n_rows, const void* student, int64_t student_vocab, int64_t student_stride,
                     const void* teacher, int64_t teacher_vocab, int64_t teacher_stride, const int64_t* labels,
                     const RowOptions& options, float* loss, float* stats, float* row_state, const float* grad_weight,
                     void* grad_student, int64_t grad_stride, DType grad_dtype, cudaStream_t stream);

}  // namespace dpkd::distill::cuda
