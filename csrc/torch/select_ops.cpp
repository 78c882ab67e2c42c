// Token selection ops (python/dpkd/select.py): tensor checks, then the core's per-row selection.
#include <torch/library.h>
#include <torch/torch.h>

#include "select/top_fraction.h"
#ifdef DPKD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "select_cuda.h"
#endif

namespace dpkd::select {
namespace {

void check_top_fraction_args(const at::Tensor& score, const at::Tensor& valid, double fraction) {
  TORCH_CHECK_VALUE(score.dim() == 2, "score must be [rows, tokens], got ", score.sizes());
  TORCH_CHECK_TYPE(score.scalar_type() == at::kFloat, "score must be float32, got ", score.scalar_type());
  TORCH_CHECK_VALUE(valid.sizes() == score.sizes(), "valid must have the shape of score ", score.sizes(), ", got ",
                    valid.sizes());
  TORCH_CHECK_TYPE(valid.scalar_type() == at::kBool, "valid must be bool, got ", valid.scalar_type());
  TORCH_CHECK_VALUE(valid.device() == score.device(), "score and valid must be on one device");
  TORCH_CHECK_VALUE(fraction >= 0.0 && fraction <= 1.0, "fraction must be in [0, 1], got ", fraction);
}

at::Tensor top_fraction_cpu(const at::Tensor& score, const at::Tensor& valid, double fraction, bool largest) {
  check_top_fraction_args(score, valid, fraction);
  const at::Tensor s = score.contiguous(), v = valid.contiguous();
  at::Tensor out = at::empty(s.sizes(), v.options());
  top_fraction_rows(s.data_ptr<float>(), v.data_ptr<bool>(), s.size(0), s.size(1), fraction, largest,
                    out.data_ptr<bool>());
  return out;
}

#ifdef DPKD_WITH_CUDA
at::Tensor top_fraction_cuda(const at::Tensor& score, const at::Tensor& valid, double fraction, bool largest) {
  check_top_fraction_args(score, valid, fraction);
  // The sort's column indices are int32, and its keys hold the row index in 32 bits.
  TORCH_CHECK_VALUE(score.numel() <= std::numeric_limits<int32_t>::max(),
                    "score has ", score.numel(), " entries; the CUDA selection takes at most 2^31 - 1");
  const c10::cuda::CUDAGuard guard(score.device());
  const at::Tensor s = score.contiguous(), v = valid.contiguous();
  at::Tensor out = at::empty(s.sizes(), v.options());
  if (s.numel() == 0) return out;
  const int64_t bytes = static_cast<int64_t>(cuda::top_fraction_workspace_bytes(s.size(0), s.size(1)));
  at::Tensor workspace = at::empty({bytes}, s.options().dtype(at::kByte));
  cuda::top_fraction(s.data_ptr<float>(), v.data_ptr<bool>(), s.size(0), s.size(1), fraction, largest,
                     out.data_ptr<bool>(), workspace.data_ptr(), static_cast<size_t>(bytes),
                     at::cuda::getCurrentCUDAStream());
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpkd, m) {
  // Per row: the ceil(fraction * n) highest (lowest if not largest) scores among its n valid entries, ties to
  // the earlier column (a stable sort's first k); a non-finite score is not valid.
  m.def("select_top_fraction(Tensor score, Tensor valid, float fraction, bool largest) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpkd, CPU, m) { m.impl("select_top_fraction", &top_fraction_cpu); }
#ifdef DPKD_WITH_CUDA
TORCH_LIBRARY_IMPL(dpkd, CUDA, m) { m.impl("select_top_fraction", &top_fraction_cuda); }
#endif

}  // namespace dpkd::select
