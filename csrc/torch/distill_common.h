// What the distillation ops (distill_ops.cpp, topk_ops.cpp) share: options from the schema's arguments, dtype
// dispatch, raw views and the CPU kernels' gradient buffers.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "distill/objectives.h"
#ifdef DPKD_WITH_CUDA
#include "distill_cuda.h"
#endif

namespace dpkd::distill {

inline Divergence parse_divergence(const std::string& name) {
  if (name == "forward_kl") return Divergence::kForwardKL;
  if (name == "reverse_kl") return Divergence::kReverseKL;
  if (name == "jsd") return Divergence::kJSD;
  if (name == "skew_kl") return Divergence::kSkewKL;
  if (name == "skew_reverse_kl") return Divergence::kSkewReverseKL;
  if (name == "tvd") return Divergence::kTVD;
  TORCH_CHECK_VALUE(false, "divergence must be one of forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd; got '",
                    name, "'");
}

inline RowOptions make_options(const std::string& divergence, double beta, double alpha, double temperature,
                               double teacher_mix, bool standardize, double hard_label_weight, int64_t ignore_index) {
  TORCH_CHECK_VALUE(beta >= 0 && beta <= 1, "beta must be in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, "alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(teacher_mix >= 0 && teacher_mix <= 1, "teacher_mix must be in [0, 1], got ", teacher_mix);
  TORCH_CHECK_VALUE(hard_label_weight >= 0 && hard_label_weight <= 1, "hard_label_weight must be in [0, 1], got ",
                    hard_label_weight);
  RowOptions o;
  o.objective = make_objective(parse_divergence(divergence), beta, alpha);
  o.temperature = static_cast<float>(temperature);
  o.teacher_mix = static_cast<float>(teacher_mix);
  o.standardize = standardize;
  o.hard_label_weight = static_cast<float>(hard_label_weight);
  o.ignore_index = ignore_index;
  return o;
}

// Labels of 2-D logits: int64 [N] on the logits' device (their range is the op's to check, where it reads them).
inline void check_labels(const at::Tensor& labels, const at::Tensor& student) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.device() == student.device(), "labels is on ", labels.device(), " but student_logits is on ",
                    student.device());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == student.size(0), "labels must have shape [",
                    student.size(0), "], got ", labels.sizes());
}

inline at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

template <class F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(BFloat16{}); break;
    case at::kHalf: f(Float16{}); break;
    default: TORCH_CHECK_TYPE(false, "student_logits must be float32, bfloat16 or float16, got ", dtype);
  }
}

template <class T>
Logits<T> view(const at::Tensor& t) {
  return {reinterpret_cast<const T*>(t.data_ptr()), t.size(1), t.stride(0)};
}

// A new [N, V] gradient for the CPU kernels, which write each element once. A fresh large buffer is mapped
// but not yet backed, so each 4 KB page's first write is a page fault: about a third of the forward KL's
// time at [512, 32000]. Its 2 MB-aligned interior is advised for transparent huge pages first (512x fewer
// faults where the kernel's THP mode is "madvise" or "always"; mere advice otherwise). PyTorch's allocator does
// the same for every allocation under THP_MEM_ALLOC_ENABLE=1; here only for the buffers these ops fill.
inline at::Tensor empty_gradient_cpu(const at::Tensor& student) {
  at::Tensor grad = at::empty_like(student, at::MemoryFormat::Contiguous);
#ifdef __linux__
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(grad.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1), last = (begin + grad.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return grad;
}

#ifdef DPKD_WITH_CUDA
inline cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK_TYPE(false, "student_logits must be float32, bfloat16 or float16, got ", t);
  }
}

#endif

}  // namespace dpkd::distill
