// Per-example gradient norms for DP-SGD's clipping (python/dpkd/privacy/layers.py).
//
// ghost_sq_norms: sum_l ||G_li^T A_i||_F^2 = sum_{t,s} (a_t . a_s) sum_l (g_lt . g_ls) for every example i,
// for the layers l that read the same input A (a transformer's q, k and v projections; gate and up): their
// output-gradient Grams are summed, so A's Gram and the product with it are formed once. Over token
// blocks: Gram blocks of at most `block` x `block` tokens are formed, multiplied and summed one block pair
// at a time, so no [T, T] Gram matrix is ever held (a [B, T, T] pair costs 8 B T^2 bytes: 1 GB at B = 8,
// T = 4096), and the sum's symmetry is used: block pairs (j, k) with j < k count twice and (k, j) is
// skipped, which saves up to half of the Gram flops. Accumulates in fp32 (float64 inputs in float64).
// Plain ATen ops, so one implementation serves every device.
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <vector>

namespace dpkd::clipping {
namespace {

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
  const auto acc = activations.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor a = activations.to(acc);
  std::vector<at::Tensor> gs;
  for (const at::Tensor& g : output_grads) gs.push_back(g.to(acc));
  const int64_t tokens = a.size(1);
  at::Tensor out = at::zeros({a.size(0)}, a.options());
  for (int64_t j0 = 0; j0 < tokens; j0 += block) {
    const int64_t nj = std::min(block, tokens - j0);
    for (int64_t k0 = j0; k0 < tokens; k0 += block) {
      const int64_t nk = std::min(block, tokens - k0);
      const at::Tensor gram_a = at::bmm(a.narrow(1, j0, nj), a.narrow(1, k0, nk).transpose(1, 2));
      at::Tensor gram_g = at::bmm(gs[0].narrow(1, j0, nj), gs[0].narrow(1, k0, nk).transpose(1, 2));
      for (size_t l = 1; l < gs.size(); ++l)
        gram_g.baddbmm_(gs[l].narrow(1, j0, nj), gs[l].narrow(1, k0, nk).transpose(1, 2));
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
