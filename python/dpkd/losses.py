"""Fused distillation objectives on logits.

Every objective runs in one kernel family (C++ on the CPU, CUDA on the GPU) that reads the student and
teacher logits row by row, never builds an extra [N, V] tensor, and returns per-token losses together
with per-token statistics (student entropy, teacher entropy, the divergence, log q[label], log p[label]).
The backward pass recomputes the gradient from the logits and a few saved per-row scalars.

Conventions (DESIGN.md): student first, teacher second; logits [N, V] or [B, T, V] in fp32, bf16 or fp16;
fp32 accumulation; gradients in the student's dtype; temperature divides both models' logits and the
loss is NOT multiplied by T^2 unless ``scale_by_temperature_squared=True`` (TRL and Liger do not).
fp16 works with ``torch.amp.GradScaler``: a gradient written in the forward pass is kept scaled into fp16's
normal range and the upstream gradient (the loss scale) is multiplied in fp32.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Literal, NamedTuple

import torch

from . import _ops
from .privacy import engine as privacy_engine

if TYPE_CHECKING:
    from .select import Selection

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]
Reduction = Literal["none", "sum", "mean", "batchmean"]

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
REDUCTIONS: tuple[str, ...] = ("none", "sum", "mean", "batchmean")

__all__ = [
    "DIVERGENCES",
    "TokenStats",
    "distill_loss",
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "token_stats",
    "tvd",
]


class TokenStats(NamedTuple):
    """Per-token statistics, shaped like the logits without the vocabulary dimension (fp32).

    Entropies, the divergence and the label log-probabilities are at the loss's temperature. ``student_label_logprob`` and
    ``teacher_label_logprob`` are NaN where no label is given or the label is ``ignore_index``. Returned with a
    loss whose gradient the forward kernel computes (``fuse_backward``, the default under autograd), every
    statistic is NaN at tokens that carry no loss (ignored, masked, weight 0): the kernel skips them.
    :func:`token_stats` and ``fuse_backward=False`` give them all.
    """

    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    divergence: torch.Tensor
    student_label_logprob: torch.Tensor
    teacher_label_logprob: torch.Tensor


def _check(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    *,
    divergence: str,
    beta: float,
    alpha: float,
    temperature: float,
    reduction: str,
    hard_label_weight: float,
    allow_vocab_mismatch: bool,
) -> None:
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must be [N, V] or [B, T, V], got shape {tuple(t.shape)}")
    s, t = student_logits, teacher_logits
    if s.device != t.device:
        raise ValueError(f"teacher_logits is on {t.device} but student_logits is on {s.device}")
    if s.dtype != t.dtype:
        raise TypeError(f"teacher_logits has dtype {t.dtype} but student_logits has {s.dtype}")
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"teacher_logits has shape {tuple(t.shape)}, student_logits {tuple(s.shape)}: "
                         "all but the vocabulary dimension must match")
    if s.shape[-1] != t.shape[-1] and not allow_vocab_mismatch:
        raise ValueError(f"vocabulary sizes differ (student_logits {s.shape[-1]}, teacher_logits {t.shape[-1]}); "
                         "pass allow_vocab_mismatch=True to treat the missing columns as probability 0")
    if s.shape[-1] == 0 or t.shape[-1] == 0:
        raise ValueError("student_logits and teacher_logits need a vocabulary dimension of at least 1")
    check_token_tensors(tuple(s.shape[:-1]), s.device, labels, mask, weights)
    check_options(divergence=divergence, beta=beta, alpha=alpha, temperature=temperature, reduction=reduction,
                  hard_label_weight=hard_label_weight, has_labels=labels is not None)
    check_private_reduction(reduction, s)


def check_private_reduction(reduction: str, student: torch.Tensor) -> None:
    """Under DP-SGD (``student`` from a private model) the loss must stay a sum of per-example losses: ``mean``
    divides by the batch's token count and ``batchmean`` by its size, so one example would scale the others'
    gradients (sensitivity up to 2C). ``batchmean`` is that sum over the batch's size where the engine multiplies
    it back (``make_private(loss_reduction="mean")``). While compiling, with a private model anywhere, the check runs
    outside the graph (a graph break; under fullgraph=True an error that gives the reason)."""
    if reduction not in ("mean", "batchmean") or not student.requires_grad:
        return
    if torch.compiler.is_compiling() and privacy_engine.live_engines == 0:
        return
    _refuse_batch_wide_private(reduction, student)


@torch.compiler.disable(reason="reduction='mean' or 'batchmean' while a model is private: whether the logits come from "
                        "it is read from their autograd graph, outside the compiled one; a loss of per-example sums "
                        "(reduction='sum') compiles in one graph")
def _refuse_batch_wide_private(reduction: str, student: torch.Tensor) -> None:
    engines = privacy_engine.private_engines(student)
    if not engines or (reduction == "batchmean" and all(e.loss_reduction == "mean" for e in engines)):
        return
    raise ValueError(f"under DP-SGD (student_logits come from a private model) reduction={reduction!r} divides by "
                     "counts over the whole batch, so one example would change the others' gradients: use "
                     "reduction='sum' of per-example losses (each example's token mean: [B, T, V] logits, batch first, "
                     "and weights=valid / valid.sum(-1, keepdim=True).clamp(min=1) with valid [B, T]; flattened rows "
                     "would divide by the batch's tokens again) or 'none' ('batchmean' with "
                     "make_private(loss_reduction='mean'))")


def check_token_tensors(lead: tuple[int, ...], device: torch.device, labels: torch.Tensor | None,
                        mask: torch.Tensor | None, weights: torch.Tensor | None) -> None:
    """Per-token labels, mask and weights: shape ``lead`` (the logits without the vocabulary), same device."""
    for name, extra in (("labels", labels), ("mask", mask), ("weights", weights)):
        if extra is None:
            continue
        if not isinstance(extra, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(extra).__name__}")
        if tuple(extra.shape) != lead:
            raise ValueError(f"{name} must have shape {lead} (the logits without the vocabulary), got {tuple(extra.shape)}")
        if extra.device != device:
            raise ValueError(f"{name} is on {extra.device} but the logits are on {device}")
    if labels is not None and labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    if weights is not None and not weights.is_floating_point():
        raise TypeError(f"weights must be a floating tensor, got {weights.dtype}")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int,
                      carrying: torch.Tensor | None = None) -> None:
    """Flattened ``labels`` in [0, vocab) or ``ignore_index`` (only where ``carrying``, if given): one host read."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if carrying is not None:
        bad &= carrying
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels must be in [0, {vocab}) or ignore_index ({ignore_index}), got "
                         f"{int(labels[row])} (first in flattened token {row})")


def temperature_squared(temperature: float, hard_label_weight: float, scale: bool) -> tuple[float, float]:
    """(t2, w'): T^2 multiplies the divergence only (Hinton et al.), not the hard-label term: the kernels'
    (1 - w') D + w' CE times t2 = T^2 (1 - w) + w, with w' = w / t2, is T^2 (1 - w) D + w CE. (1, w) unless
    ``scale``."""
    if not scale:
        return 1.0, hard_label_weight
    t2 = temperature * temperature * (1.0 - hard_label_weight) + hard_label_weight
    return t2, hard_label_weight / t2 if t2 > 0 else hard_label_weight


def check_temperature(temperature: float) -> None:
    if not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def check_options(*, divergence: str, beta: float, alpha: float, temperature: float, reduction: str,
                  hard_label_weight: float, has_labels: bool) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    check_temperature(temperature)
    if not 0.0 <= hard_label_weight <= 1.0:
        raise ValueError(f"hard_label_weight must be in [0, 1], got {hard_label_weight}")
    if hard_label_weight > 0 and not has_labels:
        raise ValueError("hard_label_weight > 0 needs labels")


def _fused(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    divergence: str,
    beta: float,
    alpha: float,
    temperature: float,
    teacher_mix: float,
    standardize: bool,
    hard_label_weight: float,
    ignore_index: int,
    inplace_backward: bool = False,
    teacher_grad: bool = False,
    row_weights: torch.Tensor | None = None,
    carries_loss: torch.Tensor | None = None,
    check_finite: bool = True,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses [*lead] and statistics [*lead, 5] from the fused op, NaN input reported.

    ``row_weights`` [*lead]: return the scalar ``sum(row_weights * per_token)`` instead, its student gradient
    computed by the forward kernel. ``carries_loss`` [*lead]: rows outside it (ignored, masked, weight 0: padding)
    reach no loss, and their logits are not reported, as where the fused kernel skips them."""
    lead = student_logits.shape[:-1]
    s2 = student_logits.reshape(-1, student_logits.shape[-1])
    t2 = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    l1 = None if labels is None else labels.reshape(-1).to(torch.int64)
    if not teacher_grad:
        t2 = t2.detach()  # no gradient flows into the teacher unless asked for
    options = (divergence, float(beta), float(alpha), float(temperature), float(teacher_mix), bool(standardize),
               float(hard_label_weight), int(ignore_index))
    skipped = None
    # see check_finite in distill_loss; while compiling there is no raising (no host read): the rows are flagged
    flag_nonfinite = not check_finite or torch.compiler.is_compiling()
    if row_weights is not None:
        row_weights = row_weights.reshape(-1).float()
        loss, _, stats = _ops.distill_reduced(s2, t2, l1, row_weights, *options, flag_nonfinite=flag_nonfinite)
        # Rows without weight carry nothing: the kernels skip them (statistics NaN) and their logits are not checked.
        skipped = row_weights == 0
    else:
        loss, stats = _ops.distill(s2, t2, l1, *options, bool(inplace_backward))
        if carries_loss is not None:
            skipped = ~carries_loss.reshape(-1)
        if flag_nonfinite:
            bad = _ops.flagged_rows(stats)
            loss = _ops.nan_rows(loss, bad if skipped is None else bad & ~skipped)
        loss = loss.reshape(lead)
    if check_finite:
        report_nan(stats, skipped, ("student_logits contains NaN or +inf, or a row without a finite logit (first in "
                                    "flattened row {row})",
                                    "teacher_logits contains NaN or +inf, or a row without a finite logit (first in "
                                    "flattened row {row})"), weights=weights)
    return loss, stats.reshape(*lead, 5)


def report_nan(stats: torch.Tensor | None, skipped: torch.Tensor | None, messages: tuple[str, str],
               weights: torch.Tensor | None = None) -> None:
    """Raise ``messages[m].format(row=...)`` for the first row whose model-m entropy (stats column m) is NaN:
    the kernels report NaN or +inf logits, and a row without a finite logit, that way; or where ``weights`` (the
    caller's per-token weights) are not finite. Rows in ``skipped`` ([N], or [N, 2]: per model) are not computed and
    not checked; ``stats`` None: only the weights. One host synchronisation for both models and the weights; the row
    is looked up only on failure; nothing while compiling."""
    checked = weights if stats is None else stats
    if torch.compiler.is_compiling() or checked is None or checked.numel() == 0:
        return
    keep = None if skipped is None else ~(skipped if skipped.dim() == 2 else skipped[:, None])
    flags = []
    if stats is not None:
        nan = torch.isnan(stats[:, :2])
        if keep is not None:
            nan &= keep
        flags.append(nan.any(0))
    if weights is not None:
        bad_weight = ~torch.isfinite(weights.reshape(-1))
        if keep is not None:
            bad_weight &= keep[:, 0]
        flags.append(bad_weight.any()[None])
    bad = torch.cat(flags).tolist()
    if weights is not None and bad[-1]:
        raise ValueError(f"weights contain NaN or inf (first at flattened token {int(bad_weight.nonzero()[0, 0])})")
    for column, message in enumerate(messages if stats is not None else ()):
        if bad[column]:
            raise ValueError(message.format(row=int(nan[:, column].nonzero()[0, 0])))


def valid_tokens(labels: torch.Tensor | None, mask: torch.Tensor | None, ignore_index: int) -> torch.Tensor | None:
    """Tokens that carry loss: ``mask`` and labels other than ``ignore_index`` (None: all of them)."""
    if labels is None:
        return mask
    valid = labels != ignore_index
    return valid if mask is None else mask & valid


def carrying_tokens(valid: torch.Tensor | None, weights: torch.Tensor | None) -> torch.Tensor | None:
    """Tokens that reach the loss: valid ones (None: all) of nonzero weight."""
    if weights is None:
        return valid
    return weights != 0 if valid is None else valid & (weights != 0)


def _reduce(per_token: torch.Tensor, valid: torch.Tensor | None, weights: torch.Tensor | None,
            reduction: str) -> torch.Tensor:
    if weights is not None:  # a row of weight 0 carries nothing, NaN included (a padded row of -inf logits)
        w = weights.to(per_token.dtype)
        per_token = torch.where(w != 0, per_token * w, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if valid is not None:
        per_token = torch.where(valid, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(per_token.shape[0], 1)
    # A host number where the count is known on the host: torch.tensor(n, device="cuda") would be a copy
    # from the host, which synchronises the stream.
    return total / max(per_token.numel(), 1) if valid is None else total / valid.sum().clamp(min=1)


def _reduction_weights(shape: torch.Size, valid: torch.Tensor | None, weights: torch.Tensor | None,
                       reduction: str, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """d (scale * _reduce(per_token, valid, weights, reduction)) / d per_token (fp32), for reductions to a
    scalar; no copy from the host (on CUDA one would synchronise the stream)."""
    if reduction == "mean" and valid is None:
        scale /= max(math.prod(shape), 1)
    elif reduction == "batchmean":
        scale /= max(shape[0] if len(shape) else 1, 1)
    if weights is not None:
        w = weights.float() * scale
        if valid is not None:
            w = torch.where(valid, w, torch.zeros((), dtype=w.dtype, device=device))
    elif valid is not None:
        w = valid.to(torch.float32) * scale
    else:
        return torch.full(shape, scale, dtype=torch.float32, device=device)
    return w / valid.sum().clamp(min=1) if reduction == "mean" and valid is not None else w


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    hard_label_weight: float = 0.0,
    standardize: bool = False,
    scale_by_temperature_squared: bool = False,
    allow_vocab_mismatch: bool = False,
    return_stats: bool = False,
    select: Selection | Callable[[TokenStats, torch.Tensor | None], Selection] | None = None,
    inplace_backward: bool = False,
    teacher_grad: bool = False,
    fuse_backward: bool = True,
    check_finite: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """Token-level distillation loss between student and teacher logits.

    Args:
        student_logits: [N, V] or [B, T, V] logits of the model being trained.
        teacher_logits: the teacher's logits, same shape (V may differ with ``allow_vocab_mismatch``:
            the missing columns then have probability 0). No gradient flows into them unless ``teacher_grad``.
        divergence: ``forward_kl`` KL(p||q), ``reverse_kl`` KL(q||p), ``jsd`` the generalized JSD
            beta KL(p||m) + (1-beta) KL(q||m) with m = beta p + (1-beta) q (beta = 0 is forward KL and
            beta = 1 reverse KL, as in TRL; the formula itself goes to 0 as beta approaches 0 or 1, like
            beta KL(p||q) near 0, so a sweep of beta jumps at the endpoints),
            ``skew_kl`` KL(p || alpha p + (1-alpha) q),
            ``skew_reverse_kl`` KL(q || (1-alpha) p + alpha q), ``tvd`` total variation.
            p is the teacher's distribution and q the student's, both at ``temperature``.
        labels: token ids [N] or [B, T]; ``ignore_index`` marks tokens without loss. Needed for
            ``hard_label_weight`` and the label statistics.
        mask: optional bool [N] or [B, T]: False tokens carry no loss (combined with labels).
        weights: optional per-token weights (e.g. from :mod:`dpkd.select`), multiplied in.
        reduction: ``none`` (per-token, zeros at invalid tokens), ``sum``, ``mean`` (over valid tokens)
            or ``batchmean`` (sum / first dimension, as :func:`torch.nn.functional.kl_div`).
        hard_label_weight: w in (1 - w) divergence + w cross_entropy(student at temperature 1, labels); the
            cross entropy reads the student's logits as given (not standardized by ``standardize``).
        standardize: z-score each row of both models' logits before the temperature (logit
            standardization): (z - mean) / (std + 1e-6) over the row's finite entries, std the population one
            (the paper's code divides by torch.std's unbiased form plus 1e-7: a factor sqrt(V / (V - 1)) apart,
            1.6e-5 at V = 32000).
        scale_by_temperature_squared: multiply the divergence by T^2 (Hinton et al.); the hard-label term keeps
            its weight w: T^2 (1 - w) divergence + w cross_entropy.
        return_stats: also return :class:`TokenStats`.
        select: a :class:`dpkd.select.Selection`, or a rule ``f(stats, valid) -> Selection`` applied to this
            pass's statistics, e.g. ``lambda st, valid: select.entropy_top_fraction(st.student_entropy,
            0.5, valid=valid)``. Its weights multiply ``weights``; unselected tokens get no gradient work.
        inplace_backward: write the gradient over ``student_logits``' storage instead of a new [N, V]
            buffer. Safe when nothing else reads the logits after this loss's backward (the usual case: they
            come from the LM head's matmul, whose backward needs only its inputs); wrong if they feed another
            loss or are inspected after ``backward()``. Needs row-contiguous logits.
        teacher_grad: let the gradient flow into ``teacher_logits`` too (self-distillation, where teacher and
            student share weights). Off by default: the teacher is detached.
        fuse_backward: where the loss reduces to a scalar (``sum``, ``mean``, ``batchmean``) without
            ``select``, ``teacher_grad``, ``inplace_backward`` or differentiable ``weights``, compute the
            student gradient in the forward kernel: on a Hopper GPU, forward and backward then read the
            logits once; on the CPU each row's backward follows its forward while the row is in cache. The
            [N, V] gradient is held from the forward to the backward pass, and the loss can be
            backpropagated through once. Tokens without weight (masked, ignored, weight 0) are not computed:
            their statistics are NaN and their logits are not checked.
        check_finite: raise where a row that carries loss has NaN or +inf logits, or ``weights`` hold NaN or inf
            (one host synchronisation).
            Turn it off under DP-SGD: whether a batch raises would then depend on one example. The row's loss
            (unless a select rule leaves the row out) and gradient are NaN instead (a NaN logit included, which
            the kernels' maxima would pass over, and a row without a finite logit), and the DP engine drops that
            example (its contribution is 0). While compiling (torch.compile) nothing is raised: such rows get the NaN
            loss and gradient whatever ``check_finite`` says.
    """
    _check(student_logits, teacher_logits, labels, mask, weights, divergence=divergence, beta=beta, alpha=alpha,
           temperature=temperature, reduction=reduction, hard_label_weight=hard_label_weight,
           allow_vocab_mismatch=allow_vocab_mismatch)
    if inplace_backward and (student_logits.is_leaf or student_logits.stride(-1) != 1
                             or student_logits.stride(-2) < student_logits.shape[-1]):
        raise ValueError("inplace_backward needs student_logits computed by the model (a non-leaf tensor) with "
                         "contiguous rows that do not overlap (not an expand): a leaf's storage would become its own "
                         "gradient")
    valid = valid_tokens(labels, mask, ignore_index)
    carries_loss = carrying_tokens(valid, weights)
    t2, hard_label_weight = temperature_squared(temperature, hard_label_weight, scale_by_temperature_squared)
    row_weights = None
    if (fuse_backward and reduction != "none" and select is None and not teacher_grad and not inplace_backward
            and student_logits.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and (weights is None or not weights.requires_grad)):
        row_weights = _reduction_weights(student_logits.shape[:-1], valid, weights, reduction, student_logits.device,
                                         scale=t2)
    per_token, stats = _fused(
        student_logits, teacher_logits, labels, divergence=divergence, beta=beta, alpha=alpha,
        temperature=temperature, teacher_mix=1.0, standardize=standardize, hard_label_weight=hard_label_weight,
        ignore_index=ignore_index, inplace_backward=inplace_backward, teacher_grad=teacher_grad,
        row_weights=row_weights, carries_loss=carries_loss, check_finite=check_finite, weights=weights,
    )
    token_stats_ = TokenStats(*stats.unbind(-1))
    if row_weights is not None:
        return (per_token, token_stats_) if return_stats else per_token
    if t2 != 1.0:
        per_token = per_token * t2
    if select is not None:
        weights = selected_weights(select, token_stats_, valid, weights, student_logits,
                                   missing=() if labels is not None else NO_LABELS)
    loss = _reduce(per_token, valid, weights, reduction)
    if return_stats:
        return loss, token_stats_
    return loss


LABEL_FIELDS = ("student_label_logprob", "teacher_label_logprob")
NO_LABELS = tuple((f, "needs labels= (without them it is NaN: the rule would select nothing)") for f in LABEL_FIELDS)
_STATS_CLASSES: dict[tuple[tuple[str, str], ...], type] = {(): TokenStats}


def stats_without(missing: tuple[tuple[str, str], ...]) -> type:
    """A TokenStats whose fields in ``missing`` ((field, why), ...) raise when read, made once per ``missing``.
    torch.compile traces a lookup, not the making of a class: a set that compiled code uses is made at import."""
    if missing not in _STATS_CLASSES:
        def refuse(field: str, why: str):
            raise ValueError(f"the select rule read {field}, which {why}")

        def item(self, index):  # stats[3] reads the field as stats.student_label_logprob does
            fields = TokenStats._fields[index] if isinstance(index, slice) else (TokenStats._fields[index],)
            for field, why in missing:
                if field in fields:
                    refuse(field, why)
            return tuple.__getitem__(self, index)
        unformed = {f: property(lambda self, f=f, why=why: refuse(f, why)) for f, why in missing}
        _STATS_CLASSES[missing] = type("TokenStats", (TokenStats,), {"__slots__": (), "__getitem__": item, **unformed})
    return _STATS_CLASSES[missing]


stats_without(NO_LABELS)


def selected_weights(select: Selection | Callable[[TokenStats, torch.Tensor | None], Selection],
                     stats: TokenStats | None, valid: torch.Tensor | None, weights: torch.Tensor | None,
                     student: torch.Tensor, private: bool = False,
                     missing: tuple[tuple[str, str], ...] = ()) -> torch.Tensor:
    """``weights`` (None: ones) times the weights of ``select``: a Selection, or a rule applied to ``stats``, whose
    fields in ``missing`` ((field, why), ...: statistics not formed) raise when the rule reads them, where they would
    be NaN and select nothing, every step. A batch-scope selection is refused where DP-SGD clips the loss per
    example (``private``, or ``student`` comes from a model made private): one example would change which of the
    others' tokens carry loss, past C."""
    if callable(select):
        # The rule sees the tokens that carry loss (valid, of nonzero weight) and NaN (no score) elsewhere, so that
        # padding takes no place in its quotas even where the rule is not given ``valid``; no autograd history.
        carrying = carrying_tokens(valid, weights)
        select = select(stats_without(missing)(*(f.detach() if carrying is None else
                                                  torch.where(carrying, f.detach(), torch.full_like(f, math.nan))
                                                  for f in stats)), carrying)
    if not hasattr(select, "weights") or not isinstance(getattr(select, "values", None), torch.Tensor):
        raise TypeError(f"select must be a dpkd.select.Selection or a rule returning one, got {type(select).__name__}")
    shape = tuple(student.shape[:-1])
    if tuple(select.values.shape) != shape:
        raise ValueError(f"select produced shape {tuple(select.values.shape)}, expected {shape}")
    if select.scope != "sequence" and (private or _may_be_private(student)):
        select.check_private()
    return select.weights() if weights is None else weights * select.weights()


def _may_be_private(student: torch.Tensor) -> bool:
    """Whether ``student`` may come from a model made private. While compiling there is no graph to walk: any
    private model at all counts."""
    if torch.compiler.is_compiling():
        return privacy_engine.any_attached()
    return student.requires_grad and privacy_engine.depends_on_private(student)


def token_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: Divergence = "forward_kl",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    allow_vocab_mismatch: bool = False,
) -> TokenStats:
    """Per-token statistics (no gradient): the forward pass of :func:`distill_loss` without a loss."""
    with torch.no_grad():
        _, stats = distill_loss(student_logits, teacher_logits, divergence=divergence, labels=labels,
                                ignore_index=ignore_index, temperature=temperature, beta=beta, alpha=alpha,
                                allow_vocab_mismatch=allow_vocab_mismatch, reduction="none", return_stats=True)
    return stats


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, **kwargs) -> torch.Tensor:
    """KL(p_teacher || q_student): see :func:`distill_loss` for the keyword arguments."""
    return distill_loss(student_logits, teacher_logits, divergence="forward_kl", **kwargs)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, **kwargs) -> torch.Tensor:
    """KL(q_student || p_teacher): see :func:`distill_loss`."""
    return distill_loss(student_logits, teacher_logits, divergence="reverse_kl", **kwargs)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    **kwargs) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence JSD(beta): TRL's generalized_jsd_loss formula (beta 0 forward KL,
    1 reverse KL). Reductions as :func:`distill_loss`: TRL's and Liger's ``batchmean`` (a mean over the tokens that
    carry loss) is ``reduction="mean"`` here; ``batchmean`` divides by the first dimension, as F.kl_div."""
    return distill_loss(student_logits, teacher_logits, divergence="jsd", beta=beta, **kwargs)


def skew_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.1,
            **kwargs) -> torch.Tensor:
    """Skew KL: KL(p || alpha p + (1 - alpha) q)."""
    return distill_loss(student_logits, teacher_logits, divergence="skew_kl", alpha=alpha, **kwargs)


def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.1,
                    **kwargs) -> torch.Tensor:
    """Skew reverse KL: KL(q || (1 - alpha) p + alpha q)."""
    return distill_loss(student_logits, teacher_logits, divergence="skew_reverse_kl", alpha=alpha, **kwargs)


def tvd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, **kwargs) -> torch.Tensor:
    """Total variation distance 1/2 sum |p - q|."""
    return distill_loss(student_logits, teacher_logits, divergence="tvd", **kwargs)
