"""Distillation from hidden states and output heads without materialising full-batch logits.

The tokens are processed in chunks: each chunk's student and teacher logits are formed by matmuls
(fp32 accumulation), the fused objective kernels return that chunk's losses and the gradient of the
reduced loss with respect to its logits, and the gradients of the student's hidden states, head weight
and bias are accumulated right away; only [chunk, V] logits ever exist. Tokens that carry no loss
(ignore_index, mask, weight 0) enter no matmul. As in Liger-Kernel's fused linear losses, the gradients
are computed in the forward pass and scaled by the upstream gradient in the backward pass, so the loss
must be reduced to a scalar (sum, mean or batchmean).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal

import torch

from . import _mixed, _ops, losses, topk
from .privacy import engine as privacy_engine
from .privacy import head as privacy_head

if TYPE_CHECKING:
    from .select import Selection

__all__ = ["fused_linear_distill_loss"]

# The statistics' columns (dpkd.TokenStats) that need the teacher: its entropy, the divergence, its label log-prob
_TEACHER_COLUMNS = [1, 2, 4]


# The statistics a select_reads="student" rule cannot read (its first pass forms the student's alone).
_STUDENT_ONLY = tuple((f, "select_reads='student' does not form: use select_reads='all' for a rule of the teacher's "
                          "statistics") for f in ("teacher_entropy", "divergence", "teacher_label_logprob"))
# How a top-k teacher's tensors are named in errors.
_TOPK_NAMES = ("teacher_topk ids", "teacher_topk log-probs")

# From this many tokens on, the head-weight gradient of fp32 logits takes only the high bf16 half of their
# gradient: summed over that many tokens, the low half's rounding averages out. Relative error against fp32
# logits (bf16 weights, V 128256, H 256 / 512; bf16's own rounding of the result is 1.66e-3): high half only
# 2.15e-3 at 512 tokens (V 32000), 1.92e-3 at 2048, 1.82e-3 at 4096, 1.75e-3 at 8192; with the low half
# 1.66e-3 throughout, for one more [V, chunk] x [chunk, H] matmul per chunk (a sixth of the matmul work at the
# fused-head goal's sizes).
_LOW_HALF_BELOW_TOKENS = 4096


def _logit_weight(weight: torch.Tensor, fp32: bool) -> torch.Tensor:
    """The head weight as the chunk loop multiplies it: for fp32 logits from a 16-bit head on a device without
    a mixed-precision matmul, widened once here rather than in every chunk."""
    if fp32 and weight.dtype != torch.float32 and not _mixed.supported(weight.device, weight.dtype):
        return weight.float()
    return weight


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
            softcap: float | None, fp32: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunk logits (fp32 if ``fp32``, else h's dtype) and, with softcapping, d logits / d pre-cap logits.
    ``weight`` comes from ``_logit_weight``: a 16-bit h meets an fp32 weight only where it was widened."""
    if not fp32 or h.dtype == torch.float32:
        z = h @ weight.t()
    elif weight.dtype == torch.float32:
        z = h.float() @ weight.t()
    else:  # the product never rounded to 16 bits: cuBLAS writes its fp32 accumulator
        z = torch.mm(h, weight.t(), out_dtype=torch.float32)
    if bias is not None:
        z = z + bias.to(z.dtype)  # a float64 bias would widen the logits past what the kernels take
    if scale != 1.0:
        z = z * scale
    if softcap is None:
        return z, None
    t = torch.tanh(z.float() / softcap)
    return (softcap * t).to(z.dtype), 1 - t * t


def _chunk_rows(vocab: int, dtype: torch.dtype, device: torch.device, chunk_size: int | None) -> int:
    """Tokens per chunk for [chunk, V] logits of ``dtype``."""
    if chunk_size:
        return chunk_size
    # The two models' [chunk, V] logits and the logits gradient in at most 768 MiB (and 1/8 of the free
    # memory): past ~1000 rows the matmuls gain little, while every row more costs memory.
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 2 << 30
    budget = min(free // 8, 768 << 20)
    return max(1, min(8192, budget // (3 * torch.finfo(dtype).bits // 8 * max(vocab, 1))))


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """acc += alpha a @ b, the product never rounded below ``acc``'s precision: with an fp32 ``acc`` and 16-bit
    factors, cuBLAS accumulates into ``acc`` in place; elsewhere the factors are widened."""
    if acc.dtype != a.dtype:
        if _mixed.supported(acc.device, a.dtype):
            torch.addmm(acc, a, b, out_dtype=acc.dtype, alpha=alpha, out=acc)
            return
        a, b = a.to(acc.dtype), b.to(acc.dtype)
    acc.addmm_(a, b, alpha=alpha)


class _FusedLinearDistill(torch.autograd.Function):
    """``objective(rows, student_logits, labels, row_weights, grad_dtype) -> (loss [R], stats [R, 5],
    d sum(row_weights * loss) / d student_logits)`` on each chunk, that gradient in ``grad_dtype`` where the
    objective can write it so (None: the logits' dtype); the student's head gradients accumulated from it."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, objective, labels, row_scale, opts, private, anchor):
        """``private``: under DP-SGD, (active tokens, tokens per chunk, unscale) -> privacy.head.PrivateHead, which
        measures each example's head-gradient norm here and forms the clipped sum at the step; else None."""
        s_scale, s_cap, chunk, fp32_accum, fp32_logits = opts
        n = h_s.shape[0]
        active = (row_scale != 0).nonzero().flatten()
        per_token = torch.zeros(n, dtype=torch.float32, device=h_s.device)
        stats = torch.full((n, _ops.N_STATS), float("nan"), dtype=torch.float32, device=h_s.device)
        # fp16 gradients are kept in fp32 until the backward pass has multiplied in the upstream gradient: a mean's
        # gradient is below fp16's normal range, and a GradScaler's scale would bring it back only before rounding.
        keep_fp32 = h_s.dtype == torch.float16
        grad_h = torch.zeros(h_s.shape, dtype=torch.float32 if keep_fp32 else h_s.dtype, device=h_s.device) \
            if h_s.requires_grad else None
        acc = torch.float32 if fp32_accum else w_s.dtype
        head_grads = private is None  # under DP the engine forms the head's (clipped) gradients
        grad_w = torch.zeros(w_s.shape, dtype=acc, device=w_s.device) if w_s.requires_grad and head_grads else None
        grad_b = torch.zeros(w_s.shape[0], dtype=acc, device=w_s.device) \
            if b_s is not None and b_s.requires_grad and head_grads else None
        w_logits = _logit_weight(w_s, fp32_logits)
        low_half = active.numel() < _LOW_HALF_BELOW_TOKENS
        # The logits' gradient in fp16 is scaled (see _ops.fp16_gradient_scale), the products with it scaled back
        # in fp32; the host value costs no wait after nonzero's.
        grad_scale = float(_ops.fp16_gradient_scale(row_scale)) if keep_fp32 else 1.0
        unscale = 1.0 / grad_scale
        # Without the low half, the fp32 logits' gradient of a 16-bit head is used in 16 bits only: the kernel
        # writes it so (no conversion pass over it), unless a softcap or logit scale multiplies it first or a
        # trainable bias sums it (in fp32).
        grad16 = (h_s.dtype if fp32_logits and h_s.dtype in (torch.bfloat16, torch.float16) and not low_half
                  and s_cap is None and s_scale == 1.0 and not (b_s is not None and b_s.requires_grad) else None)

        def chunk_gradient(rows):
            """The chunk's hidden states, losses, statistics and d loss / d pre-activation logits: the same ops on
            the same rows give the same bits (the DP step recomputes them)."""
            hs = h_s[rows]
            zs, cap_grad = _logits(hs, w_logits, b_s, s_scale, s_cap, fp32_logits)
            lab = None if labels is None else labels[rows]
            loss, st, g = objective(rows, zs.detach(), lab, row_scale[rows].float() * grad_scale, grad16)
            del zs
            if cap_grad is not None:
                g = (g.float() * cap_grad).to(g.dtype)
            if s_scale != 1.0:
                g = g * s_scale
            return hs, loss, st, g

        head = None if private is None else private(active, chunk, unscale)
        spans = [privacy_head.Chunk(s, min(s + chunk, active.numel())) for s in range(0, active.numel(), chunk)] \
            if head is None else head.chunks
        for span in spans:
            rows = active[span.start:span.end]
            hs, loss, st, g = chunk_gradient(rows)
            per_token[rows], stats[rows] = loss, st
            if head is not None:
                head.observe(span, hs, g, loss, st)
            if grad_b is not None:
                grad_b += (g.sum(0, dtype=torch.float32) * unscale).to(acc)
            # An fp32 logits gradient meets 16-bit weights as g = hi + lo, both 16-bit: hi alone suffices
            # for the hidden states' gradient (the sum over V averages its rounding out), and for the weight
            # gradient's sum over tokens from _LOW_HALF_BELOW_TOKENS tokens on; below, that one also takes lo.
            parts = [g] if g.dtype == hs.dtype else [g.to(hs.dtype)]
            if grad_h is not None:
                grad_h[rows] = (parts[0] @ w_s).to(grad_h.dtype) if unscale == 1 else \
                    (parts[0] @ w_s).float().mul_(unscale)
            if grad_w is not None:
                if g.dtype != hs.dtype and low_half:  # lo = g - hi, in fp32, written in 16 bits by one kernel
                    parts.append(torch.sub(g, parts[0], out=torch.empty_like(parts[0])))
                for part in parts:
                    _add_matmul(grad_w, part.t(), hs, unscale)
        if head is not None:
            # The step recomputes under the autocast state this ran under (the engine's clipping runs without).
            kind = h_s.device.type
            amp = _mixed.autocast_dtype(kind)

            def gradient(rows):
                with _mixed.autocast_as(kind, amp):
                    return chunk_gradient(rows)[::3]
            head.gradient = gradient
        ctx.head = head
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        if not keep_fp32:
            ctx.grads = tuple(None if g is None else g.to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes))
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(anchor)  # see _ops.first_order_only
        return (per_token * row_scale).sum(), stats

    @staticmethod
    def backward(ctx, grad_out, _grad_stats):
        def scaled(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            if g.dtype == torch.float16:  # fp32_weight_grad=False: a GradScaler's 65536 is inf in fp16
                g = g.float()
            return (g * grad_out.detach().to(g.dtype)).to(dtype)

        grad_h, grad_w, grad_b = (None if g is None else scaled(g, dtype) for g, dtype in zip(ctx.grads, ctx.dtypes))
        if ctx.head is not None:
            ctx.head.deliver(grad_out.detach())
        return _ops.first_order_only(grad_h, grad_w, grad_b, anchors=ctx.saved_tensors) + (None,) * 6


def _private_head(hidden, weight, bias, reduction, read):
    """Under DP-SGD (``weight`` held by a private model's linear layer, gradients on): the factory of the loss's
    privacy.head.PrivateHead, after checking what per-example clipping needs; else None."""
    found = privacy_engine.head_engine(weight) if torch.is_grad_enabled() else None
    if found is None:
        return None
    engine, name = found
    module = engine.layers[name][0]
    train_weight, train_bias = weight.requires_grad, bias is not None and bias.requires_grad
    if not (train_weight or train_bias):
        return None
    where = (f"under DP-SGD (student_weight is layer {name!r} of a private model)" if name else
             "under DP-SGD (student_weight is a private model's own weight)")
    if reduction != "sum":
        raise ValueError(f"{where} the loss must be reduction='sum' of per-example losses: {reduction!r} divides by "
                         "counts over the whole batch, so one example would change the others' gradients; for each "
                         "example's token mean pass weights=valid / valid.sum(-1, keepdim=True).clamp(min=1)")
    if hidden.dim() != 3:
        raise ValueError(f"{where} student_hidden must be [B, T, H], batch first, got {tuple(hidden.shape)}")
    if bias is not None and bias is not module.bias:
        raise ValueError(f"{where} student_bias must be that layer's bias (or None)")
    rows, tokens = hidden.shape[0], hidden.shape[1]
    tied = engine.tied_ids(name)
    if tied is not None and tied[1].shape[0] != rows:
        # Another batch's ids (this step's embedding ran without gradients, or not yet): unused, unless the
        # embedding delivers gradients at the step, which then refuses the mismatch (PrivateHead.cross).
        tied = None
    accum = _mixed.accumulation_dtype(hidden)
    checked = [t for t in read if isinstance(t, torch.Tensor)]

    def make(active, chunk, unscale):
        return privacy_head.PrivateHead(engine, name, active, tokens, rows, chunk, weight=train_weight,
                                        bias=train_bias, unscale=unscale, accum=accum,
                                        checked=checked, hidden=hidden.reshape(-1, hidden.shape[-1]),
                                        tied_ids=None if tied is None else tied[1])
    return make


def _objective_op(zs, zt, labels, row_weights, options, fast_math, grad_dtype):
    """(losses, statistics, gradient of sum(row_weights * loss)) of one chunk's logits, its labels checked by the
    caller; without ``row_weights``, no gradient (None)."""
    if row_weights is None:
        loss, stats, _ = torch.ops.dpkd.distill_forward(zs, zt, labels, *options, fast_math=fast_math,
                                                        labels_in_range=True)
        return loss, stats, None
    return torch.ops.dpkd.distill_forward_grad(zs, zt, labels, row_weights, *options, fast_math=fast_math,
                                               grad_dtype=grad_dtype, labels_in_range=True)


def _token_stats(h_s, w_s, b_s, objective, labels, rows, opts) -> torch.Tensor:
    """The statistics [N, 5] of the rows where ``rows`` (NaN elsewhere), chunk by chunk, without gradients: what
    the loss's chunk loop computes, for a select rule to read before it."""
    s_scale, s_cap, chunk, _, fp32_logits = opts
    stats = torch.full((h_s.shape[0], _ops.N_STATS), float("nan"), dtype=torch.float32, device=h_s.device)
    rows = rows.nonzero().flatten()
    with torch.no_grad():
        w = _logit_weight(w_s.detach(), fp32_logits)
        b = None if b_s is None else b_s.detach()
        for start in range(0, rows.numel(), chunk):
            r = rows[start:start + chunk]
            zs, _ = _logits(h_s[r], w, b, s_scale, s_cap, fp32_logits)
            stats[r] = objective(r, zs, None if labels is None else labels[r], None, None)[1]
    return stats


# The chunk loop runs over the tokens that carry loss, a number known only at run time: torch.compile calls the
# function as it is (a graph break; with fullgraph=True an error that gives this reason) instead of failing inside it.
@torch.compiler.disable(reason="dpkd.fused_linear_distill_loss chunks the tokens that carry loss, a number known "
                        "only at run time; it runs outside the graph (a graph break)")
def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    topk_tail: bool = False,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: losses.Divergence = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: losses.Reduction = "mean",
    hard_label_weight: float = 0.0,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    allow_vocab_mismatch: bool = False,
    chunk_size: int | None = None,
    fp32_weight_grad: bool | None = None,
    fp32_logits: bool | None = None,
    return_stats: bool = False,
    select: Selection | Callable[[losses.TokenStats, torch.Tensor | None], Selection] | None = None,
    select_reads: Literal["all", "student"] = "all",
    check_finite: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, losses.TokenStats]:
    """:func:`dpkd.distill_loss` of ``softcap(scale (h W^T + b))`` for both models, from hidden states (its options
    but for ``standardize`` and T² scaling; ``mask``/``weights``/``select`` choose tokens).

    Args:
        student_hidden: [N, H_s] or [B, T, H_s]; student_weight [V, H_s] (e.g. ``lm_head.weight``).
        teacher_hidden: [N, H_t] or [B, T, H_t]; teacher_weight [V_t, H_t]. The teacher gets no gradient.
        teacher_topk: instead of the teacher's hidden states and head, a top-k teacher ``(ids, logprobs)``,
            each [..., K], with the bucket of the remaining mass if ``topk_tail`` (see :func:`dpkd.topk_distill_loss`:
            what each divergence means there, which need the tail, and the teacher's statistics).
        reduction: ``sum``, ``mean`` (over valid tokens) or ``batchmean``; ``none`` is not available here.
        student_softcap / teacher_softcap: Gemma-style ``c tanh(z / c)`` after the logit scale.
        chunk_size: tokens per chunk (default: [chunk, V] logits and gradient within 768 MiB and 1/8 of free memory).
        fp32_weight_grad: accumulate the head-weight gradient in fp32 (default: on for 16-bit weights).
        fp32_logits: form each chunk's logits in fp32 from the 16-bit matmul's fp32 accumulator instead of
            rounding them to 16 bits (default: on for 16-bit and float64 weights). Rounded bf16 logits put the
            head-weight gradient ~4e-3 (relative norm) away from the fp32-logit gradient; fp32 logits bring it to bf16's
            own rounding (~1.7e-3; up to 1.8e-3 from 4096 tokens on, where the head-weight gradient skips the
            fp32 logits gradient's low bf16 half, whose matmul costs a sixth of the work), at the cost of fp32
            objective kernels (on CUDA with the hardware exp2/log2 of the 16-bit kernels: logits from 16-bit
            factors need no more).
        return_stats: also return :class:`dpkd.TokenStats` (NaN for tokens that carry no loss).
        select: a :class:`dpkd.select.Selection`, or a rule ``f(stats, valid) -> Selection`` as in
            :func:`dpkd.distill_loss`. A rule reads statistics that a first pass forms without gradients (both
            heads' logits again, chunk by chunk, for every token that carries loss: about the matmuls of the loss's
            forward once more); the unselected tokens then enter no matmul of the loss. Under DP-SGD, sequence scope
            only.
        select_reads: ``"student"`` for a rule that reads only the student's statistics (its entropy and label
            log-prob: entropy_top_fraction, entropy_sampling, highest_surprisal): the first pass then forms the
            student's logits alone; a rule that reads the teacher's fields or the divergence raises (the returned
            statistics hold them for the selected tokens; the teacher's logits are checked for NaN there only).
        check_finite: raise where a token that carries loss has NaN or +inf logits, or ``weights`` hold NaN or inf
            (as :func:`dpkd.distill_loss`).
            Default: on, but off under DP-SGD (below), where the engine drops that example instead: a raise would
            make whether a step happens depend on one example (True is refused there).

    Under DP-SGD (``student_weight`` is the weight of a linear layer of a model made private by
    :func:`dpkd.privacy.make_private`), the head is clipped per example with the rest of the model: each
    example's head-gradient norm is measured in the chunk loop and the step recomputes the chunks to form the
    clipped sum (see :mod:`dpkd.privacy.head`). The loss must then be ``reduction="sum"`` of per-example losses
    (``weights=valid / valid.sum(-1, keepdim=True).clamp(min=1)`` for each example's token mean), student_hidden
    [B, T, H] batch first, and the head used once per step (a head tied to the input embedding is supported: the
    embedding must have run, with gradients, in the same step).
    Example with Hugging Face models::

        s = student(input_ids, output_hidden_states=True); t = teacher(input_ids, output_hidden_states=True)
        loss = fused_linear_distill_loss(s.hidden_states[-1], student.lm_head.weight,
                                         t.hidden_states[-1], teacher.lm_head.weight, divergence="jsd")
    """
    if reduction not in ("sum", "mean", "batchmean"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'batchmean' for the fused linear loss, got {reduction!r}")
    if (teacher_topk is None) == (teacher_hidden is None or teacher_weight is None):
        raise ValueError("give the teacher as teacher_hidden and teacher_weight, or as teacher_topk=(ids, logprobs)")
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_weight must be [V, {student_hidden.shape[-1]}] to match the hidden size, got "
                         f"{tuple(student_weight.shape)}")
    pairs = [("student", student_hidden, student_weight, student_bias)]
    if teacher_topk is None:
        pairs.append(("teacher", teacher_hidden, teacher_weight, teacher_bias))
    for model, hidden, weight, bias in pairs:
        if hidden.dim() not in (2, 3):
            raise ValueError(f"{model}_hidden must be [N, H] or [B, T, H], got {tuple(hidden.shape)}")
        if not hidden.is_floating_point():
            raise TypeError(f"{model}_hidden must be a floating tensor, got {hidden.dtype}")
        if hidden.dtype != weight.dtype:  # the head's matmul takes one dtype (autocast casts both)
            raise TypeError(f"{model}_hidden ({hidden.dtype}) and {model}_weight ({weight.dtype}) must have one dtype")
        if weight.device != hidden.device:
            raise ValueError(f"{model}_weight is on {weight.device} but {model}_hidden is on {hidden.device}")
        if bias is not None and (bias.shape != weight.shape[:1] or bias.device != weight.device):
            raise ValueError(f"{model}_bias must be [{weight.shape[0]}] on {weight.device}, got "
                             f"{tuple(bias.shape)} on {bias.device}")
    if teacher_topk is None:
        if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
            raise ValueError(f"teacher_weight must be [V, {teacher_hidden.shape[-1]}] to match the hidden size, got "
                             f"{tuple(teacher_weight.shape)}")
        if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden "
                             f"{tuple(student_hidden.shape)} must agree in all but the hidden dimension")
        if student_weight.shape[0] != teacher_weight.shape[0] and not allow_vocab_mismatch:
            raise ValueError(f"vocabulary sizes differ (student_weight {student_weight.shape[0]}, teacher_weight "
                             f"{teacher_weight.shape[0]}); pass allow_vocab_mismatch=True")
    else:
        if not (isinstance(teacher_topk, (tuple, list)) and len(teacher_topk) == 2):
            raise ValueError("teacher_topk must be a pair (ids, log-probabilities)")
        topk.check_teacher_tensors(*teacher_topk, tuple(student_hidden.shape[:-1]), student_hidden.device,
                                   names=_TOPK_NAMES)
        unused = [name for name, given in (("teacher_bias", teacher_bias is not None),
                                           ("teacher_logit_scale", teacher_logit_scale != 1.0),
                                           ("teacher_softcap", teacher_softcap is not None),
                                           ("allow_vocab_mismatch", allow_vocab_mismatch)) if given]
        if unused:
            raise ValueError(f"{', '.join(unused)}: for a teacher head, which a top-k teacher replaces (apply them "
                             "when producing its log-probabilities; its ids index the student's vocabulary)")
    if topk_tail and teacher_topk is None:
        raise ValueError("topk_tail=True needs teacher_topk")
    lead = tuple(student_hidden.shape[:-1])
    for name, t in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if t is not None and not t > 0:
            raise ValueError(f"{name} must be > 0, got {t}")
    losses.check_token_tensors(lead, student_hidden.device, labels, mask, weights)
    if weights is not None and weights.requires_grad:
        raise ValueError("weights must not require grad here: the fused linear loss gives no gradient for them "
                         "(dpkd.distill_loss on logits does); pass weights.detach()")
    if select_reads not in ("all", "student"):
        raise ValueError(f"select_reads must be 'all' or 'student', got {select_reads!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    losses.check_options(divergence=divergence, beta=beta, alpha=alpha, temperature=temperature, reduction=reduction,
                         hard_label_weight=hard_label_weight, has_labels=labels is not None)
    if teacher_topk is not None:
        topk_objective = topk.Objective(divergence, float(beta), float(alpha), float(temperature), bool(topk_tail),
                                        float(hard_label_weight), int(ignore_index))
        topk.check_objective(topk_objective, labels is not None, reduction,
                             ids_cover_vocab=teacher_topk[0].shape[-1] >= student_weight.shape[0])
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64)
    valid = losses.valid_tokens(labels, mask, ignore_index)
    # d loss / d per-token loss: the logits path's reduction; zero rows enter no matmul.
    row_scale = losses._reduction_weights(lead, valid, weights, reduction, h_s.device).reshape(-1)
    half = student_weight.dtype in (torch.bfloat16, torch.float16)
    fp32_weight_grad = half if fp32_weight_grad is None else fp32_weight_grad
    # float64 heads: the objective kernels take fp32 (or 16-bit) logits
    fp32_logits = (half or student_weight.dtype == torch.float64) if fp32_logits is None else fp32_logits
    if not fp32_logits and student_weight.dtype == torch.float64:
        raise ValueError("fp32_logits=False with a float64 student_weight: the objective kernels take fp32 or 16-bit "
                         "logits; leave fp32_logits at its default")
    # fp32 logits of 16-bit factors (a fp32 teacher head's logits, if any, get the same ~1e-6 relative exp/log
    # errors: far below the bf16 gradient's rounding)
    fast_math = half and fp32_logits
    chunk = _chunk_rows(student_weight.shape[0], torch.float32 if fp32_logits else student_weight.dtype, h_s.device,
                        chunk_size)

    opts = (float(student_logit_scale), student_softcap, chunk, bool(fp32_weight_grad), bool(fp32_logits))
    private = _private_head(student_hidden, student_weight, student_bias, reduction,
                            [student_hidden, student_weight, student_bias, labels, mask, weights, teacher_hidden,
                             teacher_weight, teacher_bias, *(teacher_topk or ())])
    if private is not None and check_finite:
        raise ValueError("check_finite=True under DP-SGD: whether a step happens would depend on one example's "
                         "logits; leave it at its default (off under DP: that example is dropped)")
    check_finite = private is None if check_finite is None else check_finite
    if flat_labels is not None:
        # Checked here once for the tokens that carry loss, so that the op, told so, does not check (and
        # synchronise the CUDA stream) once per chunk.
        losses.check_label_range(flat_labels, student_weight.shape[0], ignore_index, row_scale != 0)
    if teacher_topk is None:
        h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
        w_t = _logit_weight(teacher_weight.detach(), fp32_logits)
        b_t = None if teacher_bias is None else teacher_bias.detach()
        options = (divergence, float(beta), float(alpha), float(temperature), 1.0, False, float(hard_label_weight),
                   int(ignore_index))

        def objective(rows, zs, lab, row_weights, grad_dtype):
            # The chunk's losses and the gradient of sum(row_weights * loss) in one op (one read of the logits);
            # without row_weights, losses and statistics alone (a select rule's first pass).
            with torch.no_grad():
                zt, _ = _logits(h_t[rows], w_t, b_t, float(teacher_logit_scale), teacher_softcap, fp32_logits)
            if zt.dtype != zs.dtype:  # the two heads' dtypes may differ; the kernels take one
                zt = zt.to(zs.dtype)
            return _objective_op(zs, zt, lab, row_weights, options, fast_math, grad_dtype)
    else:
        k = teacher_topk[0].shape[-1]
        t_ids, t_logp = topk.checked_teacher(teacher_topk[0].reshape(-1, k), teacher_topk[1].detach().reshape(-1, k),
                                             student_weight.shape[0], topk_objective, row_scale != 0, check_finite,
                                             names=_TOPK_NAMES)

        def objective(rows, zs, lab, row_weights, grad_dtype):  # grad_dtype: the chunk loop converts
            return topk.row_terms(zs, t_ids[rows], t_logp[rows], lab, topk_objective, row_weights)

    def student_objective(rows, zs, lab, row_weights, grad_dtype):
        # The student's own statistics at the loss's temperature: the kernels with the student as its own teacher
        return _objective_op(zs, zs, lab, row_weights, ("forward_kl", 0.5, 0.1, float(temperature), 1.0, False, 0.0,
                                                        int(ignore_index)), fast_math, grad_dtype)

    # The rows whose statistics are computed: those of the loss, or with a rule every token that carries loss.
    scored = row_scale != 0
    first_stats = rule_stats = None
    user_weights = weights
    student_only = callable(select) and select_reads == "student"
    if select is not None:
        if callable(select):
            first_stats = _token_stats(h_s, student_weight, student_bias,
                                       student_objective if student_only else objective, flat_labels, scored, opts)
            if student_only:
                first_stats[:, _TEACHER_COLUMNS] = float("nan")
            rule_stats = losses.TokenStats(*first_stats.reshape(*lead, _ops.N_STATS).unbind(-1))
        missing = {**dict(losses.NO_LABELS if labels is None else ()), **dict(_STUDENT_ONLY if student_only else ())}
        weights = losses.selected_weights(select, rule_stats, valid, weights, student_hidden,
                                          private=private is not None, missing=tuple(missing.items()))
        row_scale = losses._reduction_weights(lead, valid, weights, reduction, h_s.device).reshape(-1)
        if first_stats is None:
            scored = row_scale != 0
    loss, stats = _FusedLinearDistill.apply(h_s, student_weight, student_bias, objective, flat_labels, row_scale, opts,
                                            private, _ops.graph_anchor(h_s, student_weight, student_bias))
    skipped = ~scored
    if first_stats is not None:  # every token that carries loss, the unselected ones too
        if student_only:  # the teacher's fields from the loss pass: the selected tokens'
            first_stats[:, _TEACHER_COLUMNS] = stats[:, _TEACHER_COLUMNS]
            skipped = torch.stack([skipped, row_scale == 0], 1)  # per model: the teacher's logits seen where selected
        stats = first_stats
    if check_finite:  # after every chunk is queued; tokens without weight were not computed
        losses.report_nan(stats, skipped, tuple(
            f"the {model}'s logits (from {model}_hidden and {model}_weight) contain NaN or +inf, or no finite value "
            "(first in flattened token {row})" for model in ("student", "teacher")), weights=user_weights)
    if return_stats:
        return loss, losses.TokenStats(*stats.reshape(*lead, _ops.N_STATS).unbind(-1))
    return loss
