// Distillation from a top-k teacher on the CPU: per-row losses, statistics and, on request, gradients from the
// student's logits and the teacher's K ids with their log-probabilities (see topk_math.h), without [N, V]
// temporaries: each thread keeps one row of work space.
#pragma once

#include <cstdint>

#include "distill/objectives.h"

namespace dpkd::distill {

// Row-major [n_rows, k] ids in [0, vocab), distinct within a row, and their fp32 log-probabilities. A row whose ids
// leave the range or repeat, or whose log-probabilities hold NaN (the caller checks rows, except under torch.compile),
// is a faulty teacher row: NaN loss, gradient and teacher statistics.
struct TopKTeacher {
  const int64_t* ids;
  const float* logprobs;
  int64_t k;
  bool tail;  // the teacher's remaining mass 1 - sum_K p is an outcome of its own
};

// loss[i] = (1 - w) D_i + w CE_i (CE at temperature 1, 0 without a label: labels equal to ignore_index or out of
// range carry none). stats: [n, kNumStats] as forward's, the teacher's over K and the tail; NaN where the student's
// row holds NaN or +inf or no finite logit (and then loss and divergence NaN too), the teacher's where its row is
// faulty. Given grad_loss (else null), grad_student[i, :] = grad_loss[i] d loss_i / d student: 0 where grad_loss[i]
// is 0, all NaN where loss_i is NaN or infinite (a divergence that needs the tail, without it). Options: objective,
// temperature, hard_label_weight, ignore_index (no standardization, no TAID).
template <typename T>
void topk_forward(int64_t n_rows, Logits<T> student, TopKTeacher teacher, const int64_t* labels,
                  const float* grad_loss, const RowOptions& options, float* loss, float* stats, T* grad_student,
                  int64_t grad_student_stride);

}  // namespace dpkd::distill
