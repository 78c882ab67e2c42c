// The distillation ops: schema (TORCH_LIBRARY, once), tensor checks, and dispatch to the CPU core
// or the CUDA kernels. Python registers fake kernels and autograd (python/dpkd/_ops.py).
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <cstdint>
#include <string>

#include "distill/objectives.h"
#include "distill_common.h"
#ifdef DPKD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace dpkd::distill {
namespace {

// 2-D logits with unit column stride; labels int64 [N] in range (or ignore_index). The range check reads the
// labels on the host (on CUDA a stream synchronisation): ``labels_in_range`` says the caller checked them.
void check_inputs(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                  const RowOptions& o, bool labels_in_range) {
  TORCH_CHECK_VALUE(student.dim() == 2, "student_logits must be 2-D here, got ", student.dim(), "-D");
  TORCH_CHECK_VALUE(teacher.dim() == 2, "teacher_logits must be 2-D here, got ", teacher.dim(), "-D");
  TORCH_CHECK_VALUE(student.size(0) == teacher.size(0), "teacher_logits has ", teacher.size(0),
                    " rows but student_logits has ", student.size(0));
  TORCH_CHECK_TYPE(student.scalar_type() == teacher.scalar_type(), "teacher_logits has dtype ", teacher.scalar_type(),
                   " but student_logits has ", student.scalar_type());
  TORCH_CHECK_VALUE(student.device() == teacher.device(), "teacher_logits is on ", teacher.device(),
                    " but student_logits is on ", student.device());
  TORCH_CHECK_VALUE(o.teacher_mix == 1.f || student.size(1) == teacher.size(1),
                    "teacher_mix (TAID) needs equal vocabularies");
  if (labels) {
    check_labels(*labels, student);
    if (labels->numel() > 0 && !labels_in_range) {
      const auto bad = labels->ne(o.ignore_index).logical_and(
          labels->lt(0).logical_or(labels->ge(student.size(1))));
      if (bad.any().item<bool>()) {
        const int64_t row = bad.nonzero()[0][0].item<int64_t>();
        TORCH_CHECK_VALUE(false, "labels must be in [0, ", student.size(1), ") or ignore_index (", o.ignore_index,
                          "), got ", (*labels)[row].item<int64_t>(), " (first in row ", row, ")");
      }
    }
  }
}

// The backward kernels only compare column indices with the labels, never read at them: the backward ops skip the
// range check (on CUDA a stream synchronisation); the forward made it.
constexpr bool kBackwardLabelsUnread = true;

// The backward ops' own inputs: one upstream gradient per row, and the forward's saved row state.
void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& row_state, const at::Tensor& student) {
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == student.size(0) && grad_loss.is_floating_point(),
                    "grad_loss must be a floating tensor of shape [", student.size(0), "], got ", grad_loss.sizes(),
                    " ", grad_loss.scalar_type());
  TORCH_CHECK_VALUE(row_state.dim() == 2 && row_state.size(0) == student.size(0) && row_state.size(1) == kRowState &&
                        row_state.scalar_type() == at::kFloat,
                    "row_state must be float32 of shape [", student.size(0), ", ", kRowState, "] (the forward's), got ",
                    row_state.sizes(), " ", row_state.scalar_type());
  for (const at::Tensor* t : {&grad_loss, &row_state}) {
    TORCH_CHECK_VALUE(t->device() == student.device(), t == &grad_loss ? "grad_loss" : "row_state", " is on ",
                      t->device(), " but student_logits is on ", student.device());
  }
}

// What both devices' implementations start from: checked options and row-contiguous inputs.
struct Prepared {
  RowOptions options;
  at::Tensor student, teacher, labels;
  const int64_t* labels_ptr() const { return labels.defined() ? labels.data_ptr<int64_t>() : nullptr; }
};

Prepared prepare(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                 const std::string& divergence, double beta, double alpha, double temperature, double teacher_mix,
                 bool standardize, double hard_label_weight, int64_t ignore_index, bool labels_in_range = false) {
  Prepared p{make_options(divergence, beta, alpha, temperature, teacher_mix, standardize, hard_label_weight,
                          ignore_index)};
  check_inputs(student, teacher, labels, p.options, labels_in_range);
  p.student = rows_contiguous(student);
  p.teacher = rows_contiguous(teacher);
  if (labels) p.labels = labels->contiguous();
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const at::Tensor& student) {
  const int64_t n = student.size(0);
  auto f32 = student.options().dtype(at::kFloat);
  return {at::empty({n}, f32), at::empty({n, kNumStats}, f32), at::empty({n, kRowState}, f32)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const Prepared& p) {
  auto [loss, stats, state] = empty_outputs(p.student);
  dispatch_dtype(p.student.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    forward<T>(p.student.size(0), view<T>(p.student), view<T>(p.teacher), p.labels_ptr(), p.options,
               loss.data_ptr<float>(), stats.data_ptr<float>(), state.data_ptr<float>());
  });
  return {loss, stats, state};
}

// inplace_backward only tells the autograd formula (python/dpkd/_ops.py) which backward op to call; fast_math has
// no effect on the CPU.
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::string& divergence, double beta, double alpha, double temperature, double teacher_mix,
    bool standardize, double hard_label_weight, int64_t ignore_index, bool /*inplace_backward*/, bool /*fast_math*/,
    bool labels_in_range) {
  return forward_cpu(prepare(student, teacher, labels, divergence, beta, alpha, temperature, teacher_mix, standardize,
                             hard_label_weight, ignore_index, labels_in_range));
}

// The student-logit gradient into `out` (a fresh buffer, or the student logits themselves).
void backward_into_cpu(const Prepared& p, const at::Tensor& grad_loss, const at::Tensor& row_state, at::Tensor& out) {
  check_backward_inputs(grad_loss, row_state, p.student);
  const at::Tensor g = grad_loss.to(at::kFloat).contiguous(), state = row_state.contiguous();
  dispatch_dtype(p.student.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    backward<T>(p.student.size(0), g.data_ptr<float>(), view<T>(p.student), view<T>(p.teacher), p.labels_ptr(),
                state.data_ptr<float>(), p.options, reinterpret_cast<T*>(out.data_ptr()), out.stride(0));
  });
}

at::Tensor distill_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                                const std::optional<at::Tensor>& labels, const at::Tensor& row_state,
                                const std::string& divergence, double beta, double alpha, double temperature,
                                double teacher_mix, bool standardize, double hard_label_weight, int64_t ignore_index) {
  const Prepared p = prepare(student, teacher, labels, divergence, beta, alpha, temperature, teacher_mix, standardize,
                             hard_label_weight, ignore_index, kBackwardLabelsUnread);
  at::Tensor grad = empty_gradient_cpu(p.student);
  backward_into_cpu(p, grad_loss, row_state, grad);
  return grad;
}

// The forward-with-gradient's gradient dtype: the student logits', or bf16 / fp16 for fp32 logits under
// fast_math (the fused head: fp32 logits of 16-bit factors, whose gradient feeds a 16-bit matmul).
at::ScalarType gradient_dtype(const at::Tensor& student, std::optional<at::ScalarType> grad_dtype, bool fast_math) {
  const at::ScalarType t = grad_dtype.value_or(student.scalar_type());
  TORCH_CHECK_VALUE(t == student.scalar_type() || (student.scalar_type() == at::kFloat && fast_math &&
                                                  (t == at::kBFloat16 || t == at::kHalf)),
                    "grad_dtype must be student_logits' dtype (", student.scalar_type(),
                    ") or, for float32 logits with fast_math=True, bfloat16 or float16; got ", t);
  return t;
}

void check_grad_weight(const at::Tensor& grad_weight, const at::Tensor& student) {
  TORCH_CHECK_VALUE(grad_weight.dim() == 1 && grad_weight.size(0) == student.size(0), "grad_weight must have shape [",
                    student.size(0), "], got ", grad_weight.sizes());
  TORCH_CHECK_VALUE(grad_weight.device() == student.device(), "grad_weight is on ", grad_weight.device(),
                    " but student_logits is on ", student.device());
}

// The forward pass and the gradient of sum_i grad_weight[i] * loss[i] with respect to the student logits.
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_forward_grad_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_weight, const std::string& divergence, double beta, double alpha, double temperature,
    double teacher_mix, bool standardize, double hard_label_weight, int64_t ignore_index, bool fast_math,
    std::optional<at::ScalarType> grad_dtype, bool labels_in_range) {
  check_grad_weight(grad_weight, student);
  const at::ScalarType out_dtype = gradient_dtype(student, grad_dtype, fast_math);  // fast_math: no effect here
  const Prepared p = prepare(student, teacher, labels, divergence, beta, alpha, temperature, teacher_mix, standardize,
                             hard_label_weight, ignore_index, labels_in_range);  // checked, row-contiguous once
  auto [loss, stats, state] = empty_outputs(p.student);
  at::Tensor grad = empty_gradient_cpu(p.student);
  const at::Tensor w = grad_weight.to(at::kFloat).contiguous();
  dispatch_dtype(p.student.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    forward_backward<T>(p.student.size(0), view<T>(p.student), view<T>(p.teacher), p.labels_ptr(), w.data_ptr<float>(),
                        p.options, loss.data_ptr<float>(), stats.data_ptr<float>(), state.data_ptr<float>(),
                        reinterpret_cast<T*>(grad.data_ptr()), grad.stride(0));
  });
  return {loss, stats, out_dtype == grad.scalar_type() ? grad : grad.to(out_dtype)};
}

// self *= scale (a one-element tensor), skipped when scale is 1.
at::Tensor& scale_unless_one_cpu(at::Tensor& self, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(scale.numel() == 1, "scale must have one element, got ", scale.numel());
  // A Scalar multiplies in fp32 for 16-bit tensors (a GradScaler's 65536 as an fp16 tensor would be inf).
  const double s = scale.item<double>();
  if (s != 1.0) self.mul_(s);
  return self;
}

void check_inplace(const at::Tensor& student) {
  TORCH_CHECK_VALUE(student.dim() == 2 && student.stride(1) == 1 &&
                        (student.size(0) <= 1 || student.stride(0) >= student.size(1)),
                    "in-place backward needs row-contiguous student_logits whose rows do not overlap (not an expand)");
}

// The gradient written over the student logits (rows must be contiguous: the gradient shares their layout).
at::Tensor distill_backward_inplace_cpu(const at::Tensor& grad_loss, at::Tensor& student, const at::Tensor& teacher,
                                        const std::optional<at::Tensor>& labels, const at::Tensor& row_state,
                                        const std::string& divergence, double beta, double alpha, double temperature,
                                        double teacher_mix, bool standardize, double hard_label_weight,
                                        int64_t ignore_index) {
  check_inplace(student);
  const Prepared p = prepare(student, teacher, labels, divergence, beta, alpha, temperature, teacher_mix, standardize,
                             hard_label_weight, ignore_index, kBackwardLabelsUnread);
  backward_into_cpu(p, grad_loss, row_state, student);
  return student;
}

#ifdef DPKD_WITH_CUDA
// inplace_backward only tells the autograd formula (python/dpkd/_ops.py) which backward op to call.
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::string& divergence, double beta, double alpha, double temperature, double teacher_mix,
    bool standardize, double hard_label_weight, int64_t ignore_index, bool /*inplace_backward*/, bool fast_math,
    bool labels_in_range) {
  const c10::cuda::CUDAGuard guard(student.device());
  Prepared p = prepare(student, teacher, labels, divergence, beta, alpha, temperature, teacher_mix, standardize,
                       hard_label_weight, ignore_index, labels_in_range);
  p.options.fast_math = fast_math;
  auto [loss, stats, state] = empty_outputs(p.student);
  const cuda::DType dtype = cuda_dtype(p.student.scalar_type());
  cuda::forward(dtype, p.student.size(0), p.student.data_ptr(), p.student.size(1), p.student.stride(0),
                p.teacher.data_ptr(), p.teacher.size(1), p.teacher.stride(0), p.labels_ptr(), p.options,
                loss.data_ptr<float>(), stats.data_ptr<float>(), state.data_ptr<float>(), nullptr, nullptr, 0, dtype,
                at::cuda::getCurrentCUDAStream());
  return {loss, stats, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_forward_grad_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_weight, const std::string& divergence, double beta, double alpha, double temperature,
    double teacher_mix, bool standardize, double hard_label_weight, int64_t ignore_index, bool fast_math,
    std::optional<at::ScalarType> grad_dtype, bool labels_in_range) {
  const c10::cuda::CUDAGuard guard(student.device());
  check_grad_weight(grad_weight, student);
  const at::ScalarType out_dtype = gradient_dtype(student, grad_dtype, fast_math);
  Prepared p = prepare(student, teacher, labels, divergence, beta, alpha, temperature, teacher_mix, standardize,
                       hard_label_weight, ignore_index, labels_in_range);
  p.options.fast_math = fast_math;
  auto [loss, stats, state] = empty_outputs(p.student);
  const at::Tensor weight = grad_weight.to(at::kFloat).contiguous();
  at::Tensor grad = at::empty_like(p.student, p.student.options().dtype(out_dtype), at::MemoryFormat::Contiguous);
  cuda::forward(cuda_dtype(p.student.scalar_type()), p.student.size(0), p.student.data_ptr(), p.student.size(1),
                p.student.stride(0), p.teacher.data_ptr(), p.teacher.size(1), p.teacher.stride(0), p.labels_ptr(),
                p.options, loss.data_ptr<float>(), stats.data_ptr<float>(), state.data_ptr<float>(),
                weight.data_ptr<float>(), grad.data_ptr(), grad.stride(0), cuda_dtype(out_dtype),
                at::cuda::getCurrentCUDAStream());
  return {loss, stats, grad};
}

at::Tensor& scale_unless_one_cuda(at::Tensor& self, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(scale.numel() == 1, "scale must have one element, got ", scale.numel());
  TORCH_CHECK_VALUE(self.is_contiguous(), "scale_unless_one_ needs a contiguous tensor");
  const c10::cuda::CUDAGuard guard(self.device());
  const at::Tensor s = scale.to(self.device(), at::kFloat).contiguous();
  cuda::scale_unless_one(cuda_dtype(self.scalar_type()), self.data_ptr(), self.numel(), s.data_ptr<float>(),
                         at::cuda::getCurrentCUDAStream());
  return self;
}

// Each thread reads an element before writing it, and row reductions precede the writes, so `out` may be
// the student logits themselves.
void backward_into_cuda(const Prepared& p, const at::Tensor& grad_loss, const at::Tensor& row_state, at::Tensor& out) {
  check_backward_inputs(grad_loss, row_state, p.student);
  const at::Tensor g = grad_loss.to(at::kFloat).contiguous(), state = row_state.contiguous();
  const cuda::DType dtype = cuda_dtype(p.student.scalar_type());
  cuda::backward(dtype, p.student.size(0), g.data_ptr<float>(), p.student.data_ptr(), p.student.size(1),
                 p.student.stride(0), p.teacher.data_ptr(), p.teacher.size(1), p.teacher.stride(0), p.labels_ptr(),
                 state.data_ptr<float>(), p.options, out.data_ptr(), out.stride(0), dtype,
                 at::cuda::getCurrentCUDAStream());
}

at::Tensor distill_backward_inplace_cuda(const at::Tensor& grad_loss, at::Tensor& student, const at::Tensor& teacher,
                                         const std::optional<at::Tensor>& labels, const at::Tensor& row_state,
                                         const std::string& divergence, double beta, double alpha, double temperature,
                                         double teacher_mix, bool standardize, double hard_label_weight,
                                         int64_t ignore_index) {
  check_inplace(student);
  const c10::cuda::CUDAGuard guard(student.device());
  const Prepared p = prepare(student, teacher, labels, divergence, beta, alpha, temperature, teacher_mix, standardize,
                             hard_label_weight, ignore_index, kBackwardLabelsUnread);
  backward_into_cuda(p, grad_loss, row_state, student);
  return student;
}

at::Tensor distill_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                                 const std::optional<at::Tensor>& labels, const at::Tensor& row_state,
                                 const std::string& divergence, double beta, double alpha, double temperature,
                                 double teacher_mix, bool standardize, double hard_label_weight, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(student.device());
  const Prepared p = prepare(student, teacher, labels, divergence, beta, alpha, temperature, teacher_mix, standardize,
                             hard_label_weight, ignore_index, kBackwardLabelsUnread);
  at::Tensor grad = at::empty_like(p.student, at::MemoryFormat::Contiguous);
  backward_into_cuda(p, grad_loss, row_state, grad);
  return grad;
}
#endif

}  // namespace
}  // namespace dpkd::distill

TORCH_LIBRARY(dpkd, m) {
  // Per-row losses, statistics and the state the backward op reads. fast_math and labels_in_range: as
  // distill_forward_grad's below.
  m.def("distill_forward(Tensor student, Tensor teacher, Tensor? labels, str divergence, float beta, float alpha, "
        "float temperature, float teacher_mix, bool standardize, float hard_label_weight, int ignore_index, "
        "bool inplace_backward=False, bool fast_math=False, bool labels_in_range=False) -> (Tensor, Tensor, Tensor)");
  // The forward and, in the same pass where the device allows, the gradient of sum_i grad_weight[i] loss[i].
  // Rows with grad_weight 0 are skipped (on both devices): their loss and statistics are 0 and NaN.
  // fast_math: RowOptions::fast_math (CUDA, fp32 logits from 16-bit factors; no effect on the CPU). grad_dtype:
  // the gradient's dtype, the student's by default; bfloat16 or float16 for fp32 logits with fast_math (written
  // in 16 bits by the kernel on CUDA, converted on the CPU). labels_in_range: the caller has checked that every
  // label is in [0, V) or ignore_index (the op's own check synchronises the CUDA stream; an unchecked label out
  // of range reads outside its row).
  m.def("distill_forward_grad(Tensor student, Tensor teacher, Tensor? labels, Tensor grad_weight, str divergence, "
        "float beta, float alpha, float temperature, float teacher_mix, bool standardize, float hard_label_weight, "
        "int ignore_index, bool fast_math=False, ScalarType? grad_dtype=None, bool labels_in_range=False) "
        "-> (Tensor, Tensor, Tensor)");
  // self *= scale, without touching self when the (device-resident) scale is 1.
  m.def("scale_unless_one_(Tensor(a!) self, Tensor scale) -> Tensor(a!)");
  m.def("distill_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? labels, Tensor row_state, "
        "str divergence, float beta, float alpha, float temperature, float teacher_mix, bool standardize, "
        "float hard_label_weight, int ignore_index) -> Tensor");
  // The same, written over the student logits' storage (saves the [N, V] gradient buffer).
  m.def("distill_backward_(Tensor grad_loss, Tensor(a!) student, Tensor teacher, Tensor? labels, Tensor row_state, "
        "str divergence, float beta, float alpha, float temperature, float teacher_mix, bool standardize, "
        "float hard_label_weight, int ignore_index) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(dpkd, CPU, m) {
  m.impl("distill_forward", &dpkd::distill::distill_forward_cpu);
  m.impl("distill_backward", &dpkd::distill::distill_backward_cpu);
  m.impl("distill_backward_", &dpkd::distill::distill_backward_inplace_cpu);
  m.impl("distill_forward_grad", &dpkd::distill::distill_forward_grad_cpu);
  m.impl("scale_unless_one_", &dpkd::distill::scale_unless_one_cpu);
}

#ifdef DPKD_WITH_CUDA
TORCH_LIBRARY_IMPL(dpkd, CUDA, m) {
  m.impl("distill_forward", &dpkd::distill::distill_forward_cuda);
  m.impl("distill_backward", &dpkd::distill::distill_backward_cuda);
  m.impl("distill_backward_", &dpkd::distill::distill_backward_inplace_cuda);
  m.impl("distill_forward_grad", &dpkd::distill::distill_forward_grad_cuda);
  m.impl("scale_unless_one_", &dpkd::distill::scale_unless_one_cuda);
}
#endif
