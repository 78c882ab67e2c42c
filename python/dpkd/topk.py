"""Distillation from a top-k (sparse) teacher: the teacher is given as its k most likely token ids and
their log-probabilities (cached offline, or from an API that returns only top-k), optionally with a tail
bucket for the remaining mass.

Every divergence of :func:`dpkd.distill_loss` is a sum over tokens of f(p_v, q_v) with f homogeneous of degree
one, so a teacher known on the ids K only still defines it exactly, over K and one more outcome, the rest R:

- without the tail, the teacher has probability 0 outside K (its log-probabilities used as given, also where they
  sum to less than 1). f(0, q) is linear in q for every divergence, so the tokens outside K add f(0, q_R) with
  q_R = 1 - sum_K q (0 for forward KL and skew KL; infinite for reverse KL, which therefore needs the tail).
- with the tail, the teacher's remaining mass p_R = 1 - sum_K p sits on R as one outcome: the divergence between
  the two distributions over K and R. It is the full-vocabulary divergence wherever the teacher spreads p_R over
  the tokens outside K as the student does.

With h = dD/d(log q_o) for the outcomes o in K and R and S = sum_o h_o, the gradient with respect to the student's
logits z (over T) is h_k - q_k S on K and (q_j / q_R)(h_R - q_R S) off K. One op computes it all
(``dpkd::topk_distill``: csrc/core/distill/topk.cpp on the CPU, kernels/topk_kernels.cu on CUDA), a row at a time
with one row of work space: the outcomes' terms, and log q_R as a log-sum-exp over the tokens outside K (exact where
the student's mass is almost all in K), in double; two reads of the logits with the gradient, no [N, V] temporaries.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from . import _ops, losses

__all__ = ["topk_distill_loss", "topk_forward_kl"]


class Objective(NamedTuple):
    """The options a top-k teacher's per-row terms depend on."""

    divergence: str = "forward_kl"
    beta: float = 0.5
    alpha: float = 0.1
    temperature: float = 1.0
    tail: bool = False
    hard_label_weight: float = 0.0
    ignore_index: int = -100


def needs_tail(divergence: str, beta: float, alpha: float) -> bool:
    """Whether the divergence is infinite wherever the teacher has probability 0 and the student does not."""
    return (divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0)
            or (divergence == "skew_reverse_kl" and alpha == 0.0))


def row_terms(x: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, labels: torch.Tensor | None,
              objective: Objective, grad_loss: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row loss [R] (fp32), statistics [R, 5] (as :class:`dpkd.TokenStats`, the teacher's over K and R) and,
    given ``grad_loss`` [R], the gradient of sum_i grad_loss[i] loss[i] with respect to the logits x [R, V] (x's
    dtype): the op ``dpkd::topk_distill`` (csrc/core/distill/topk.cpp, kernels/topk_kernels.cu)."""
    o = objective
    loss, stats, grad = torch.ops.dpkd.topk_distill(
        x, ids, logp, labels, grad_loss, o.divergence, o.beta, o.alpha, o.temperature, o.tail, o.hard_label_weight,
        o.ignore_index)
    return loss, stats, None if grad_loss is None else grad


class _TopKDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids, logp, labels, objective):
        loss, stats, _ = row_terms(x, ids, logp, labels, objective)
        ctx.save_for_backward(x, ids, logp, labels)
        ctx.objective = objective
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        x, ids, logp, labels = ctx.saved_tensors
        grad = row_terms(x, ids, logp, labels, ctx.objective, grad_loss.float().contiguous())[2]
        # a gradient penalty through it raises instead of silently getting nothing from it
        return *_ops.first_order_only(grad, anchors=(x,)), None, None, None, None


# Rounding slack for log-probabilities and their sum (a softmax's certain token can come out at +1e-7): the kernels'
# kLogProbSlack (csrc/core/distill/topk_math.h), which make such rows NaN where these checks do not run (compiled).
_LOGPROB_SLACK = 1e-3


def check_teacher_tensors(ids: torch.Tensor, logp: torch.Tensor, lead: tuple[int, ...], device: torch.device,
                          names: tuple[str, str] = ("teacher_ids", "teacher_logprobs")) -> None:
    """A top-k teacher's tensors: both ``lead`` + (K,), K >= 1, int64 ids, floating log-probabilities, on ``device``."""
    if ids.shape != logp.shape or tuple(ids.shape[:-1]) != lead:
        raise ValueError(f"{names[0]} {tuple(ids.shape)} and {names[1]} {tuple(logp.shape)} must both be {lead} + (K,)")
    if ids.dtype != torch.int64:
        raise TypeError(f"{names[0]} must be int64, got {ids.dtype}")
    if not logp.is_floating_point():
        raise TypeError(f"{names[1]} must be a floating tensor, got {logp.dtype}")
    if ids.shape[-1] == 0:
        raise ValueError(f"{names[0]} and {names[1]} need at least one id per row (K >= 1)")
    if ids.device != device or logp.device != device:
        raise ValueError(f"{names[0]} and {names[1]} must be on the logits' device {device}")


def checked_teacher(ids: torch.Tensor, logp: torch.Tensor, v: int, objective: Objective,
                    carrying: torch.Tensor | None, raise_errors: bool,
                    names: tuple[str, str] = ("teacher_ids", "teacher_logprobs")) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's rows [N, K] checked: ids in range and distinct, log-probabilities not NaN and <= 0, mass <= 1,
    and < 1 for a divergence with a tail that is infinite where the teacher has no mass (while columns lie outside
    the ids). Rows that carry no loss (outside ``carrying`` [N]) are not checked (padding may hold anything). With
    ``raise_errors`` the first fault raises (one host read); without (under DP-SGD, where an error must not depend on
    one example) a faulty row's log-probabilities become NaN, so its loss is NaN and the engine drops the example."""
    lp = logp.detach().float()
    mass = lp.double().exp().sum(-1)
    ordered = ids.sort(-1).values
    no_tail_mass = objective.tail and needs_tail(objective.divergence, objective.beta, objective.alpha) and \
        ids.shape[-1] < v
    faults = torch.stack([((ids < 0) | (ids >= v)).any(-1), (ordered[..., 1:] == ordered[..., :-1]).any(-1),
                          lp.isnan().any(-1), (lp > _LOGPROB_SLACK).any(-1), mass > 1 + _LOGPROB_SLACK,
                          (mass >= 1) & no_tail_mass], -1)
    if carrying is not None:
        faults &= carrying[:, None]
    if not raise_errors:
        bad = faults.any(-1, keepdim=True)
        return (torch.where(bad, torch.arange(ids.shape[-1], device=ids.device), ids),
                torch.where(bad, torch.full_like(logp, math.nan), logp))
    messages = [f"{names[0]} must be in [0, {v})", f"{names[0]} must be distinct within a row",
                f"{names[1]} contains NaN", f"{names[1]} must be log-probabilities (<= 0)",
                f"{names[1]} of a row sum to more than probability 1",
                f"{names[1]} of a row sum to probability 1, leaving the tail no mass: {_named(objective)} is infinite "
                "wherever the student has mass outside the ids (a cache renormalised over its ids, or of a certain "
                "teacher, has no tail: use a divergence that needs none; float32 log-probabilities of a teacher whose "
                "tail is below ~1e-7 round to mass 1: cache them in float64)"]
    for column, flag in enumerate(faults.any(0).tolist()):
        if flag:
            row = int(faults[:, column].nonzero()[0, 0])
            raise ValueError(f"{messages[column]} (first in flattened row {row}; rows that carry no loss are not "
                             "checked)")
    return ids, logp


def check_objective(objective: Objective, has_labels: bool, reduction: str, ids_cover_vocab: bool = False) -> None:
    """The options of a top-k teacher's loss, as distill_loss checks its own, and the divergences it cannot take
    without the tail (unless the ids cover the whole vocabulary: nothing lies outside them)."""
    losses.check_options(divergence=objective.divergence, beta=objective.beta, alpha=objective.alpha,
                         temperature=objective.temperature, reduction=reduction,
                         hard_label_weight=objective.hard_label_weight, has_labels=has_labels)
    if not objective.tail and not ids_cover_vocab and needs_tail(objective.divergence, objective.beta, objective.alpha):
        raise ValueError(f"{_named(objective)} with a top-k teacher needs tail=True: without it the teacher has "
                         "probability 0 outside its ids, where the student's is not, and the divergence is infinite")


def _named(objective: Objective) -> str:
    """The divergence and the parameter it takes, as passed."""
    extra = {"jsd": f", beta={objective.beta}", "skew_kl": f", alpha={objective.alpha}",
             "skew_reverse_kl": f", alpha={objective.alpha}"}.get(objective.divergence, "")
    return f"divergence={objective.divergence!r}{extra}"


def topk_distill_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    divergence: losses.Divergence = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    tail: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: losses.Reduction = "mean",
    hard_label_weight: float = 0.0,
    scale_by_temperature_squared: bool = False,
    return_stats: bool = False,
    select: Callable | None = None,
    check_finite: bool = True,
    fuse_backward: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, losses.TokenStats]:
    """:func:`dpkd.distill_loss` against a top-k teacher.

    Args:
        student_logits: [N, V] or [B, T, V].
        teacher_ids: int64 [..., K] token ids, distinct within a row.
        teacher_logprobs: [..., K] the teacher's log-probabilities of those ids, used as given and as constants (no
            gradient reaches them): apply the teacher's temperature when producing them (``temperature`` here divides
            the student's logits). A cache made at temperature 1 cannot be re-tempered exactly (the normaliser needs
            the whole vocabulary); ``log_softmax(logprobs / T)`` over the ids renormalises them to mass 1, leaving no
            tail. Rows of tokens that carry no loss are not checked: padding may hold anything. Under torch.compile
            the rows are not checked either: the op makes a faulty row's loss and gradient NaN.
        divergence: as :func:`dpkd.distill_loss` (see the module's docstring for its meaning over a top-k teacher).
            ``reverse_kl``, and ``jsd`` at beta = 1 and ``skew_reverse_kl`` at alpha = 0, need ``tail``.
        tail: the teacher's remaining mass 1 - sum_K p is one more outcome, against the student's 1 - sum_K q.
            Without it the teacher has probability 0 outside K.
        return_stats: also return :class:`dpkd.TokenStats`. The teacher's entropy is that of its K (and tail)
            outcomes, a lower bound of its full entropy; its label log-probability is -inf for a label outside K
            without the tail, and the tail's log-mass (an upper bound) with it.
        select: a :class:`dpkd.select.Selection`, or a rule ``f(stats, valid)`` as in :func:`dpkd.distill_loss`.
        check_finite: raise where a token that carries loss has NaN or +inf logits, or its teacher row is malformed
            (ids out of range or repeated, log-probabilities NaN or > 0, mass > 1, or no tail mass where the
            divergence needs it), or ``weights`` hold NaN or inf. Turn it off under DP-SGD, as for
            :func:`dpkd.distill_loss`: such a token's loss is then NaN and the engine drops its example.
        fuse_backward: where the loss reduces to a scalar (no ``select``, fp32 or bf16 logits, ``weights`` without
            gradient), form the gradient in the forward pass and hold it until backward (each chunk's logits read
            once; the loss can be backpropagated through once). False: the backward pass recomputes it.
    Other arguments as in :func:`dpkd.distill_loss` (``standardize`` needs the teacher's logits and is not
    offered). The statistics cover every token, as :func:`dpkd.distill_loss`'s with ``fuse_backward=False``.
    """
    s = student_logits
    if s.dtype not in (torch.float32, torch.bfloat16, torch.float16) or s.dim() not in (2, 3):
        raise ValueError(f"student_logits must be [N, V] or [B, T, V] float32/bfloat16/float16, got "
                         f"{tuple(s.shape)} {s.dtype}")
    lead, v = tuple(s.shape[:-1]), s.shape[-1]
    check_teacher_tensors(teacher_ids, teacher_logprobs, lead, s.device)
    losses.check_token_tensors(lead, s.device, labels, mask, weights)
    t2, w = losses.temperature_squared(temperature, hard_label_weight, scale_by_temperature_squared)
    objective = Objective(divergence, float(beta), float(alpha), float(temperature), bool(tail), float(w),
                          int(ignore_index))
    check_objective(objective._replace(hard_label_weight=float(hard_label_weight)), labels is not None, reduction,
                    ids_cover_vocab=teacher_ids.shape[-1] >= v)
    losses.check_private_reduction(reduction, s)
    valid = losses.valid_tokens(labels, mask, ignore_index)
    carrying = losses.carrying_tokens(valid, weights)
    flat_carrying = None if carrying is None else carrying.reshape(-1)
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64)
    k = teacher_ids.shape[-1]
    ids, logp = teacher_ids.reshape(-1, k), teacher_logprobs.detach().reshape(-1, k)
    if not torch.compiler.is_compiling():
        if ids.numel():
            ids, logp = checked_teacher(ids, logp, v, objective, flat_carrying, check_finite)
        if flat_labels is not None:
            losses.check_label_range(flat_labels, v, ignore_index, flat_carrying)
    # The gradient in the forward pass where the loss reduces to a scalar with weights known now (fp16: a weighted
    # gradient held in fp16 would flush; it takes the two passes)
    fused = (fuse_backward and reduction != "none" and select is None and s.dtype != torch.float16 and s.requires_grad
             and torch.is_grad_enabled() and not torch.compiler.is_compiling()
             and (weights is None or not weights.requires_grad))
    x = s.reshape(-1, v)
    if fused:
        row_weights = losses._reduction_weights(lead, valid, weights, reduction, s.device, scale=t2).reshape(-1)
        per_token, stats, grad = row_terms(x.detach(), ids, logp, flat_labels, objective, row_weights)
        # a row without weight carries nothing, NaN included
        total = torch.where(row_weights != 0, row_weights * per_token, torch.zeros_like(per_token)).sum()
        out = _ops._GradFromForward.apply(x, total, grad, None, _ops.graph_anchor(x))
    else:
        out, stats = _TopKDistill.apply(x, ids, logp, flat_labels, objective)
    if check_finite:
        losses.report_nan(stats, None if flat_carrying is None else ~flat_carrying,
                          ("student_logits contains NaN or +inf, or a row without a finite logit (first in flattened "
                           "row {row})", "teacher_logprobs contain NaN (first in flattened row {row})"),
                          weights=weights)
    token_stats = losses.TokenStats(*stats.reshape(*lead, _ops.N_STATS).unbind(-1))
    if fused:
        return (out, token_stats) if return_stats else out
    per_token = out.reshape(lead)
    if t2 != 1.0:
        per_token = per_token * t2
    if select is not None:
        weights = losses.selected_weights(select, token_stats, valid, weights, s,
                                          missing=() if labels is not None else losses.NO_LABELS)
    loss = losses._reduce(per_token, valid, weights, reduction)
    return (loss, token_stats) if return_stats else loss


def topk_forward_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                    **kwargs) -> torch.Tensor:
    """Forward KL to a top-k teacher, sum_K p (log p - log q) [+ p_R (log p_R - log q_R) with ``tail``]: see
    :func:`topk_distill_loss` for the keyword arguments."""
    return topk_distill_loss(student_logits, teacher_ids, teacher_logprobs, divergence="forward_kl", **kwargs)
