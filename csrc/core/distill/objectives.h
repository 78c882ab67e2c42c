// Fused distillation objectives on the CPU: per-row losses, statistics and gradients from raw
// student and teacher logits, without [N, V] temporaries.
#pragma once

#include <cstdint>

#include "distill/row_math.h"

namespace dpkd::distill {

// Storage tags for the 16-bit dtypes (bit patterns as uint16_t).
struct BFloat16 { uint16_t bits; };
struct Float16 { uint16_t bits; };

// Row-major [n_rows, vocab] views; a row stride in elements lets callers pass views. The teacher's
// vocabulary may differ from the student's: missing columns are -inf (probability 0).
template <typename T>
struct Logits {
  const T* data;
  int64_t vocab;
  int64_t row_stride;
};

// loss[i]: (1 - w) D_i + w CE_i, 0 where labels[i] == ignore_index. stats: [n, kNumStats] (label
// statistics NaN without a label; the student/teacher entropy is NaN where that row holds NaN or
// +inf, which callers report). row_state: [n, kRowState]. labels may be null.
template <typename T>
void forward(int64_t n_rows, Logits<T> student, Logits<T> teacher, const int64_t* labels, const RowOptions& options,
             float* loss, float* stats, float* row_state);

// grad_student[i, :] = grad_loss[i] * d loss_i / d student[i, :], in the student's dtype, with the row
// stride of `grad_student_stride`. grad_student may alias student.data (in place): each element is
// read before it is written and row reductions come first.
template <typename T>
void backward(int64_t n_rows, const float* grad_loss, Logits<T> student, Logits<T> teacher, const int64_t* labels,
              const float* row_state, const RowOptions& options, T* grad_student, int64_t grad_student_stride);

// forward and then backward, row by row (each row's second read comes from cache), for the gradient of
// sum_i grad_loss[i] loss_i. Rows with grad_loss[i] == 0 are skipped: loss 0, statistics NaN, gradient 0.
template <typename T>
void forward_backward(int64_t n_rows, Logits<T> student, Logits<T> teacher, const int64_t* labels,
                      const float* grad_loss, const RowOptions& options, float* loss, float* stats, float* row_state,
                      T* grad_student, int64_t grad_student_stride);

}  // namespace dpkd::distill
