// The top-k teacher's op: schema, tensor checks, and dispatch to the CPU core (distill/topk.h) or the CUDA kernel
// (kernels/topk_kernels.cu). Python registers its fake kernel (python/dpkd/_ops.py); python/dpkd/topk.py builds the
// losses and their autograd on it.
#include <torch/library.h>
#include <torch/torch.h>

#include <optional>
#include <string>
#include <tuple>

#include "distill/topk.h"
#include "distill_common.h"
#ifdef DPKD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "topk_cuda.h"
#endif

namespace dpkd::distill {
namespace {

// Checked, contiguous inputs of both devices' implementations.
struct TopKInputs {
  RowOptions options;
  at::Tensor student, ids, logprobs, labels, grad_weight;
};

TopKInputs prepare_topk(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
                        const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& grad_weight,
                        const std::string& divergence, double beta, double alpha, double temperature,
                        double hard_label_weight, int64_t ignore_index) {
  TORCH_CHECK_VALUE(student.dim() == 2, "student_logits must be 2-D here, got ", student.dim(), "-D");
  const int64_t n = student.size(0);
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == n && ids.size(1) >= 1, "teacher_ids must have shape [", n,
                    ", K] with K >= 1, got ", ids.sizes());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "teacher_ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(logprobs.sizes() == ids.sizes(), "teacher_logprobs must have teacher_ids' shape ", ids.sizes(),
                    ", got ", logprobs.sizes());
  TORCH_CHECK_TYPE(logprobs.is_floating_point(), "teacher_logprobs must be floating, got ", logprobs.scalar_type());
  std::vector<std::pair<const char*, const at::Tensor*>> on_device = {{"teacher_ids", &ids},
                                                                      {"teacher_logprobs", &logprobs}};
  if (labels) check_labels(*labels, student);
  if (grad_weight) {
    TORCH_CHECK_VALUE(grad_weight->dim() == 1 && grad_weight->size(0) == n && grad_weight->is_floating_point(),
                      "grad_weight must be a floating tensor of shape [", n, "], got ", grad_weight->sizes(), " ",
                      grad_weight->scalar_type());
    on_device.emplace_back("grad_weight", &*grad_weight);
  }
  for (const auto& [name, t] : on_device) {
    TORCH_CHECK_VALUE(t->device() == student.device(), name, " is on ", t->device(), " but student_logits is on ",
                      student.device());
  }
  TopKInputs in{make_options(divergence, beta, alpha, temperature, 1.0, false, hard_label_weight, ignore_index),
                rows_contiguous(student), ids.contiguous(), logprobs.to(at::kFloat).contiguous()};
  if (labels) in.labels = labels->contiguous();
  if (grad_weight) in.grad_weight = grad_weight->to(at::kFloat).contiguous();
  return in;
}

template <class T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs(const TopKInputs& in, bool cpu) {
  const int64_t n = in.student.size(0);
  auto f32 = in.student.options().dtype(at::kFloat);
  at::Tensor grad = !in.grad_weight.defined() ? at::empty({0}, in.student.options())
                    : cpu                     ? empty_gradient_cpu(in.student)
                                              : at::empty_like(in.student, at::MemoryFormat::Contiguous);
  return {at::empty({n}, f32), at::empty({n, kNumStats}, f32), grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_distill_cpu(
    const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& grad_weight,
    const std::string& divergence, double beta, double alpha, double temperature, bool tail,
    double hard_label_weight, int64_t ignore_index) {
  const TopKInputs in = prepare_topk(student, ids, logprobs, labels, grad_weight, divergence, beta, alpha, temperature,
                                     hard_label_weight, ignore_index);
  auto [loss, stats, grad] = outputs(in, true);
  const TopKTeacher teacher{in.ids.data_ptr<int64_t>(), in.logprobs.data_ptr<float>(), in.ids.size(1), tail};
  dispatch_dtype(in.student.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    topk_forward<T>(in.student.size(0), view<T>(in.student), teacher, data_or_null<int64_t>(in.labels),
                    data_or_null<float>(in.grad_weight), in.options, loss.data_ptr<float>(), stats.data_ptr<float>(),
                    grad.numel() ? reinterpret_cast<T*>(grad.data_ptr()) : nullptr, grad.numel() ? grad.stride(0) : 0);
  });
  return {loss, stats, grad};
}

#ifdef DPKD_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_distill_cuda(
    const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& grad_weight,
    const std::string& divergence, double beta, double alpha, double temperature, bool tail,
    double hard_label_weight, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(student.device());
  const TopKInputs in = prepare_topk(student, ids, logprobs, labels, grad_weight, divergence, beta, alpha, temperature,
                                     hard_label_weight, ignore_index);
  auto [loss, stats, grad] = outputs(in, false);
  cuda::topk_forward(cuda_dtype(in.student.scalar_type()), in.student.size(0), in.student.data_ptr(),
                     in.student.size(1), in.student.stride(0), in.ids.data_ptr<int64_t>(),
                     in.logprobs.data_ptr<float>(), in.ids.size(1), tail, data_or_null<int64_t>(in.labels),
                     data_or_null<float>(in.grad_weight), in.options, loss.data_ptr<float>(), stats.data_ptr<float>(),
                     grad.numel() ? grad.data_ptr() : nullptr, grad.numel() ? grad.stride(0) : 0,
                     at::cuda::getCurrentCUDAStream());
  return {loss, stats, grad};
}
#endif

}  // namespace
}  // namespace dpkd::distill

TORCH_LIBRARY_FRAGMENT(dpkd, m) {
  // Per-row losses [N] and statistics [N, 5] against a top-k teacher (ids [N, K], log-probabilities [N, K]) and,
  // given grad_weight [N], the gradient of sum_i grad_weight[i] loss[i] with respect to the student logits (else
  // an empty tensor). Rows are checked by the caller (python/dpkd/topk.py): ids out of range make a row NaN.
  m.def("topk_distill(Tensor student, Tensor ids, Tensor logprobs, Tensor? labels, Tensor? grad_weight, "
        "str divergence, float beta, float alpha, float temperature, bool tail, float hard_label_weight, "
        "int ignore_index) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dpkd, CPU, m) { m.impl("topk_distill", &dpkd::distill::topk_distill_cpu); }

#ifdef DPKD_WITH_CUDA
TORCH_LIBRARY_IMPL(dpkd, CUDA, m) { m.impl("topk_distill", &dpkd::distill::topk_distill_cuda); }
#endif
