// Per-example gradient norms for DP-SGD's clipping (python/dpkd/privacy/layers.py).
//
// ghost_sq_norms: sum_l ||G_li^T A_i||_F^2 = sum_{t,s} (a_t . a_s) sum_l (g_lt . g_ls) for every example i,
// for the layers l that read the same input A (a transformer's q, k and v projections; gate and up): their
// output-gradient Grams are summed, so A's Gram and the product with it are formed once. Over token
// blocks: Gram blocks of at most `block` x `block` tokens are formed, multiplied and summed one block pair
// at a time, so no [T, T] Gram matrix is ever held (a [B, T, T] pair costs 8 B T^2 bytes: 1 GB at B = 8,
// T = 4096), and the sum's symmetry is used: block pairs (j, k) with j < k count twice and (k, j) is
// skipped, which saves up to half of the Gram flops. Accumulates in fp32 (float64 inputs in float64): on CUDA,
// 16-bit inputs of one dtype go to cuBLAS as they are with an fp32 result (aten::bmm.dtype: the tensor cores'
// 16-bit rate, products exact in fp32), elsewhere they are widened first. Plain ATen ops, so one implementation
// serves every device.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace dpkd::clipping {
namespace {

using MixedBmm = c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>;

// aten::bmm.dtype where this torch has it, looked up at run time so that the extension builds against any torch.
const std::optional<MixedBmm>& mixed_bmm() {
  static const std::optional<MixedBmm> op = []() -> std::optional<MixedBmm> {
    const auto handle = c10::Dispatcher::singleton().findSchema({"aten::bmm", "dtype"});
    if (!handle) return std::nullopt;
    return handle->typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>();
  }();
  return op;
}

bool is_16_bit(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf; }

at::Tensor ghost_sq_norms(const at::Tensor& activations, at::TensorList output_grads, int64_t block) {
  TORCH_CHECK_VALUE(activations.dim() == 3, "activations must be [B, T, d], got ", activations.sizes());
  TORCH_CHECK_VALUE(!output_grads.empty(), "output_grads must hold at least one tensor");
  TORCH_CHECK_TYPE(at::isFloatingType(activations.scalar_type()), "activations must be floating point");
  for (const at::Tensor& g : output_grads) {
    TORCH_CHECK_VALUE(g.dim() == 3 && g.size(0) == activations.size(0) && g.size(1) == activations.size(1),
                      "output_grads must be [B, T, p] and agree in batch and tokens with activations ",
                      activations.sizes(), ", got ", g.sizes());
    TORCH_CHECK_VALUE(g.device() == activations.device(), "activations and output_grads must be on one device");
    TORCH_CHECK_TYPE(at::isFloatingType(g.scalar_type()), "output_grads must be floating point");
  }
  TORCH_CHECK_VALUE(block > 0, "block must be > 0, got ", block);
  bool mixed = activations.is_cuda() && is_16_bit(activations) && mixed_bmm().has_value();
  for (const at::Tensor& g : output_grads) mixed = mixed && g.scalar_type() == activations.scalar_type();
  const bool wide = activations.scalar_type() == at::kDouble ||
                    std::any_of(output_grads.begin(), output_grads.end(),
                                [](const at::Tensor& g) { return g.scalar_type() == at::kDouble; });
  const auto acc = wide ? at::kDouble : at::kFloat;
  const at::Tensor a = mixed ? activations : activations.to(acc);
  std::vector<at::Tensor> gs;
  for (const at::Tensor& g : output_grads) gs.push_back(mixed ? g : g.to(acc));
  // x_j x_k^T of two token blocks, in acc
  const auto gram = [&](const at::Tensor& x, int64_t j0, int64_t nj, int64_t k0, int64_t nk) {
    const at::Tensor xj = x.narrow(1, j0, nj), xk = x.narrow(1, k0, nk).transpose(1, 2);
    return mixed ? mixed_bmm()->call(xj, xk, acc) : at::bmm(xj, xk);
  };
  const int64_t tokens = a.size(1);
  at::Tensor out = at::zeros({a.size(0)}, a.options().dtype(acc));
  for (int64_t j0 = 0; j0 < tokens; j0 += block) {
    const int64_t nj = std::min(block, tokens - j0);
    for (int64_t k0 = j0; k0 < tokens; k0 += block) {
      const int64_t nk = std::min(block, tokens - k0);
      const at::Tensor gram_a = gram(a, j0, nj, k0, nk);
      at::Tensor gram_g = gram(gs[0], j0, nj, k0, nk);
      for (size_t l = 1; l < gs.size(); ++l) {
        if (mixed) {
          gram_g.add_(gram(gs[l], j0, nj, k0, nk));
        } else {
          gram_g.baddbmm_(gs[l].narrow(1, j0, nj), gs[l].narrow(1, k0, nk).transpose(1, 2));
        }
      }
      out.add_((gram_a * gram_g).sum({1, 2}), k0 == j0 ? 1.0 : 2.0);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpkd, m) {
  m.def("ghost_sq_norms(Tensor activations, Tensor[] output_grads, int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpkd, CPU, m) { m.impl("ghost_sq_norms", &ghost_sq_norms); }
TORCH_LIBRARY_IMPL(dpkd, CUDA, m) { m.impl("ghost_sq_norms", &ghost_sq_norms); }

}  // namespace dpkd::clipping
