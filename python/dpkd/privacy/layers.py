"""Per-example gradient norms and clipped gradient sums, one layer kind at a time, from the layer's
captured inputs A and output gradients G (batch first; every other leading dimension is "tokens").

Linear-like layers never build per-example gradients unless that is cheaper: the squared norm of
G_i^T A_i is <A_i A_i^T, G_i G_i^T> (ghost norm, the C++ op dpkd::ghost_sq_norms: at most 2 T^2 (d + p)
flops, about half of it for long sequences, block^2 memory) or the instantiated G_i^T A_i (2 T d p flops,
d p memory), chosen per layer: ghost iff 2 T^2 < d p. The clipped sum
sum_i c_i G_i^T A_i is one ordinary weight-gradient matmul after scaling the rows of G by c_i. Small
layers of other kinds instantiate per-example gradients: LayerNorm and RMSNorm in closed form, others
(GroupNorm, convolutions, Hugging Face's RMSNorm) through torch.func.
All norms are computed in fp32 (float64 inputs stay float64); where the device multiplies 16-bit factors
into fp32 (CUDA, dpkd._mixed), 16-bit inputs are not widened for the matmuls.
"""

from __future__ import annotations

import math

import torch

from .. import _mixed, _ops  # noqa: F401  (_ops registers torch.ops.dpkd.*)


def ghost_block(tokens: int, device: torch.device) -> int:
    """Tokens per Gram block of the ghost norm. On the CPU, blocks that stay in cache, and at least two of
    them from T = 128 on, so that the Grams' symmetry is used (benchmarks/bench_ghost.py, 2 cores: 64 is
    fastest up to T = 512, by 15-20% over 128 at T = 128; 128 by 7% at T = 1024; whole [T, T] Grams are 4x
    slower at T = 1024). Elsewhere fewer, larger matmuls."""
    if device.type == "cpu":
        return 64 if tokens <= 512 else 128
    return 512


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, ..., f] -> [B, T, f] (T = 1 for [B, f]); T spelled out, so that B = 0 reshapes too."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])


def use_ghost(tokens: int, d: int, p: int) -> bool:
    return 2 * tokens * tokens < d * p


def ghost_sq_norms(a: torch.Tensor, gs: list[torch.Tensor]) -> torch.Tensor:
    """sum_l ||G_l,i^T A_i||^2 per example for layers l that read the same input a [B,T,d]; gs: their
    output gradients [B,T,p_l] (ghost norms, A's Gram formed once)."""
    if a.dtype in _mixed.HALF and a.is_cuda and not _mixed.supported(a.device, a.dtype):
        a = a.float()  # the op then widens every input (it keeps 16-bit ones only when all share a's dtype)
    return torch.ops.dpkd.ghost_sq_norms(a, gs, ghost_block(a.shape[1], a.device))


def linear_sq_norms(a: torch.Tensor, g: torch.Tensor, *, weight: bool, bias: bool) -> torch.Tensor:
    """Squared per-example norms of a linear layer's trainable weight and/or bias gradient;
    a [B,T,d], g [B,T,p]."""
    dt = _mixed.accumulation_dtype(a)
    sq = torch.zeros(g.shape[0], dtype=dt, device=g.device)
    if weight:
        if use_ghost(a.shape[1], a.shape[2], g.shape[2]):
            sq = sq + ghost_sq_norms(a, [g])
        else:
            sq = sq + _mixed.matmul(g.transpose(1, 2), a).pow(2).sum((1, 2))
    if bias:
        sq = sq + g.to(dt).sum(1).pow(2).sum(1)
    return sq


def linear_per_example_grads(a: torch.Tensor, g: torch.Tensor, *, weight: bool,
                             bias: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-example gradients of a linear layer's weight ([B, p, d]: G_i^T A_i) and bias ([B, p]); a [B,T,d],
    g [B,T,p]; None for a frozen one."""
    return ((_mixed.matmul(g.transpose(1, 2), a) if weight else None),
            (g.to(_mixed.accumulation_dtype(a, g)).sum(1) if bias else None))


# hi + lo carry c x with |c x - (hi + lo)| <= 2^-16 |c x| elementwise: bf16's unit roundoff 2^-8, once per part.
SPLIT_ROUNDOFF = 2.0**-16


def splits(a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether linear_clipped_sum multiplies these factors as bf16 parts: bf16 factors, on a device that multiplies
    them into fp32. Not fp16: under a mean's factor B, c_i x can overflow fp16's range, or flush below it."""
    return a.dtype == g.dtype == torch.bfloat16 and _mixed.supported(a.device, a.dtype)


def split_error_bounds(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per example, 2^-16 ||G_i||_F ||A_i||_F >= ||G_i^T E_i|| / c_i for the split's error E_i (<= 2^-16 c_i |A_i|
    elementwise; likewise on G_i). The engine adds it to the norm the clipping coefficient divides by, so each
    example's clipped contribution stays within C, as with fp32 factors."""
    def norms(t: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), dtype=torch.float32)
    return SPLIT_ROUNDOFF * norms(a) * norms(g)


class Coefficients:
    """Per-example clipping coefficients c [B], with which examples they keep (c != 0), formed once per step and
    shared by every layer's clipped sum (a mask per layer was two more small ops per layer, which a GPU step of
    small layers pays in host time). An example with c_i = 0 is left out whatever its values: a dropped example's
    gradient may be inf or NaN, and 0 * inf is NaN, which one example would spread to the whole sum."""

    __slots__ = ("c", "keep")

    def __init__(self, c: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        self.c, self.keep = c, (c != 0) if keep is None else keep

    @staticmethod
    def of(coef: torch.Tensor | Coefficients) -> Coefficients:
        return coef if isinstance(coef, Coefficients) else Coefficients(coef)

    def scaled_by(self, factor: float) -> Coefficients:
        """factor * c, keeping the same examples."""
        return self if factor == 1.0 else Coefficients(self.c * factor, self.keep)

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, ...] with the rows of the examples left out set to 0."""
        return torch.where(self.keep.view(-1, *([1] * (x.dim() - 1))), x, 0)

    def scale(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """c_i x[i] in ``dtype`` for x [B, T, f], the rows of the examples left out set to 0."""
        return torch.where(self.keep.view(-1, 1, 1), x.to(dtype) * self.c.to(dtype).view(-1, 1, 1), 0)


def weighted_sum(per_example: torch.Tensor, coef: torch.Tensor | Coefficients) -> torch.Tensor:
    """sum_i c_i per_example[i], examples with c_i = 0 left out whatever their values."""
    coef = Coefficients.of(coef)
    flat = coef.drop(per_example).reshape(per_example.shape[0], -1)
    return (coef.c.to(flat.dtype) @ flat).reshape(per_example.shape[1:])


def linear_clipped_sum(a: torch.Tensor, g: torch.Tensor, coef: torch.Tensor | Coefficients, *,
                       split: bool | None = None) -> torch.Tensor:
    """sum_i c_i G_i^T A_i as [p, d], in fp32 (float64 for float64 inputs); examples with c_i = 0 left out.

    The per-example factors go on the narrower of the two (one pass over the smaller tensor). ``split``
    (default: ``splits(a, g)``) keeps the matmul 16-bit: the scaled factor c_i x, formed in fp32, is carried as two
    bf16 parts hi + lo (within 2^-16; hi alone, 2^-8, would need a clipping margin up to 100x larger), two 16-bit
    matmuls instead of an fp32 one at a tenth of their rate; ``split_error_bounds`` bounds what that adds."""
    dt = _mixed.accumulation_dtype(a, g)
    if split is None:
        split = splits(a, g)
    narrow_a = a.shape[-1] <= g.shape[-1]
    x, other = (a, g) if narrow_a else (g, a)
    coef = Coefficients.of(coef)
    scaled = coef.scale(x, dt)
    other = coef.drop(other)
    if split:
        hi = scaled.to(x.dtype)
        parts = [hi, torch.sub(scaled, hi).to(x.dtype)]
    else:
        parts, other = [scaled], other.to(dt)
    other = other.reshape(-1, other.shape[-1])
    total = None
    for part in parts:
        part = part.reshape(-1, part.shape[-1])
        product = _mixed.matmul(other.t(), part) if narrow_a else _mixed.matmul(part.t(), other)
        total = product if total is None else total.add_(product)
    return total


def embedding_sq_norms(ids: torch.Tensor, g: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """Squared norm of each example's embedding gradient, whose row v is the sum of g_t over the tokens with
    x_t = v: tokens sorted by id within each example, each run of equal ids summed (no [T, T] matrix, no
    host sync); ids [B,T], g [B,T,d]. The padding row gets no gradient."""
    g = g.to(_mixed.accumulation_dtype(g))
    if padding_idx is not None:
        g = g * (ids != padding_idx)[..., None]
    sorted_ids, order = ids.sort(dim=1)
    run = torch.cat([torch.zeros_like(sorted_ids[:, :1]), (sorted_ids[:, 1:] != sorted_ids[:, :-1]).long()], 1)
    run = run.cumsum(1)[..., None].expand(-1, -1, g.shape[-1])  # [B, T, d]: the run of each sorted token
    sorted_g = g.gather(1, order[..., None].expand(-1, -1, g.shape[-1]))
    rows = torch.zeros_like(g).scatter_add_(1, run, sorted_g)
    return rows.pow(2).sum((1, 2))


def embedding_clipped_sum(ids: torch.Tensor, g: torch.Tensor, coef: torch.Tensor | Coefficients,
                          num_embeddings: int, padding_idx: int | None) -> torch.Tensor:
    dt = _mixed.accumulation_dtype(g)
    gs = Coefficients.of(coef).scale(g, dt)
    if padding_idx is not None:
        gs = gs * (ids != padding_idx)[..., None]
    out = torch.zeros(num_embeddings, g.shape[-1], dtype=dt, device=g.device)
    return out.index_add_(0, ids.reshape(-1), gs.reshape(-1, g.shape[-1]))


def embedding_linear_cross(ids: torch.Tensor, g_emb: torch.Tensor, a_head: torch.Tensor,
                           g_head: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """<per-example embedding grad, per-example head grad> for a tied weight [V, d]:
    sum_{t,s} g_head[s, x_t] (e_t . a_s), with e the embedding's output grads, a the head's inputs."""
    dt = _mixed.accumulation_dtype(g_emb, g_head, a_head)
    e = g_emb
    if padding_idx is not None:
        e = e * (ids != padding_idx)[..., None]
    picked = torch.gather(g_head.to(dt), 2, ids[:, None, :].expand(-1, g_head.shape[1], -1))  # [B, S, T]
    dots = _mixed.matmul(a_head, e.transpose(1, 2)).to(dt)  # [B, S, T]
    return (picked * dots).sum((1, 2))


def per_example_grads(module: torch.nn.Module, params: dict[str, torch.nn.Parameter],
                      inputs: tuple, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Instantiated per-example gradients of a module's own parameters: vmap over the batch of the
    vector-Jacobian product of the module's forward (for small layers whose forward treats examples
    independently)."""
    names = list(params)

    def out_of(p_values, *xs):
        return torch.func.functional_call(module, dict(zip(names, p_values)), tuple(x[None] for x in xs))[0]

    def one(*args):
        *xs, gi = args
        _, vjp = torch.func.vjp(lambda *pv: out_of(pv, *xs), *[params[n].detach() for n in names])
        return vjp(gi)

    grads = torch.func.vmap(one)(*inputs, g)
    return {n: gr.to(_mixed.accumulation_dtype(gr)) for n, gr in zip(names, grads)}


def hf_rmsnorm_per_example_grads(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor,
                                 trainable: set[str]) -> dict[str, torch.Tensor] | None:
    """Per-example weight gradients of a Hugging Face-style RMSNorm (LlamaRMSNorm, Gemma's (1 + w) form, ...):
    y = w' * x_hat with x_hat = x / sqrt(mean(x^2) + eps) formed in fp32 and cast back, so dy/dw = x_hat and
    the gradient is sum over tokens of g * x_hat. None if the module does not look like one. A class may
    carry the name and compute something else: the engine checks this against torch.func once per module."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (not type(module).__name__.endswith("RMSNorm") or trainable != {"weight"} or not isinstance(eps, float)
            or weight is None or weight.dim() != 1 or weight.shape[0] != x.shape[-1]):
        return None
    x32 = x.float()
    x_hat = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    dt = _mixed.accumulation_dtype(x)
    return {"weight": (g.to(dt) * x_hat.to(dt)).reshape(x.shape[0], -1, x.shape[-1]).sum(1)}


def norm_per_example_grads(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor,
                           trainable: set[str]) -> dict[str, torch.Tensor] | None:
    """Closed-form per-example gradients of nn.LayerNorm and nn.RMSNorm affine parameters:
    weight: sum over tokens of g * x_hat, bias: sum of g (x_hat the normalised input). None for other
    layers, and for subclasses with a forward of their own (which may compute something else: they take the
    torch.func path, which runs that forward)."""
    is_ln = type(module).forward is torch.nn.LayerNorm.forward
    is_rms = hasattr(torch.nn, "RMSNorm") and type(module).forward is torch.nn.RMSNorm.forward
    if not (is_ln or is_rms) or not getattr(module, "elementwise_affine", True):
        return None
    shape = tuple(module.normalized_shape)
    dims = tuple(range(-len(shape), 0))
    dt = _mixed.accumulation_dtype(x)
    xf, gf = x.to(dt), g.to(dt)
    if is_ln:  # the fused kernel without the affine part (the same x_hat as the forward's)
        x_hat = torch.nn.functional.layer_norm(xf, shape, eps=module.eps)
    else:
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        x_hat = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
    out = {}
    if "weight" in trainable:
        out["weight"] = (gf * x_hat).reshape(x.shape[0], -1, *shape).sum(1)
    if "bias" in trainable:
        out["bias"] = gf.reshape(x.shape[0], -1, *shape).sum(1)
    return out
