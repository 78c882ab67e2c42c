"""TAID: temporally adaptive interpolated distillation (Shing et al., 2025).

The target is an interpolation between the student and the teacher in logit space,
p_t = softmax((1 - t) sg(z_s) + t z_t), and t moves from ``t_start`` to ``t_end`` during training,
faster while the loss keeps improving. The fused kernels form the interpolated logits on the fly
(no [N, V] temporary).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import losses

__all__ = ["TAIDSchedule", "taid_loss"]


def taid_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    t: float,
    *,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: losses.Reduction = "mean",
    hard_label_weight: float = 0.0,
    scale_by_temperature_squared: bool = False,
    return_stats: bool = False,
    check_finite: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, losses.TokenStats]:
    """-sum p_t log q with p_t = softmax(((1 - t) sg(z_s) + t z_t) / T): the cross entropy to the
    interpolated target (KL(p_t || q) plus the target's entropy, which carries no gradient).

    ``t`` in [0, 1]: 1 is plain forward-KL distillation (the same gradient as :func:`dpkd.forward_kl`, q - p_t; the
    loss is larger by the teacher's entropy). The other options are :func:`dpkd.distill_loss`'s: ``hard_label_weight``
    w mixes (1 - w) TAID + w cross_entropy(labels); ``scale_by_temperature_squared`` multiplies the TAID term by T^2;
    ``return_stats`` also returns :class:`dpkd.TokenStats` (the teacher's fields are those of the interpolated target
    p_t, the divergence KL(p_t || q)). ``check_finite``: as in :func:`dpkd.distill_loss` (off under DP-SGD: a row with
    NaN or +inf logits then gets a NaN loss and gradient, and the engine drops its example). Not offered: logit
    standardization (whether the target interpolates raw or standardized logits is a choice TAID does not make),
    a vocabulary mismatch, and a teacher gradient (the teacher's logits are detached: TAID distils a fixed teacher).
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    if student_logits.shape[-1:] != teacher_logits.shape[-1:]:  # _check's advice (allow_vocab_mismatch) is not ours
        raise ValueError(f"taid_loss needs equal vocabularies (its target interpolates the two models' logits), got "
                         f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)}")
    losses._check(student_logits, teacher_logits, labels, mask, weights, divergence="forward_kl", beta=0.5,
                  alpha=0.1, temperature=temperature, reduction=reduction, hard_label_weight=hard_label_weight,
                  allow_vocab_mismatch=False)
    valid = losses.valid_tokens(labels, mask, ignore_index)
    carries_loss = losses.carrying_tokens(valid, weights)
    t2, w = losses.temperature_squared(temperature, hard_label_weight, scale_by_temperature_squared)
    per_token, stats = losses._fused(
        student_logits, teacher_logits, labels, divergence="forward_kl", beta=0.5, alpha=0.1,
        temperature=temperature, teacher_mix=t, standardize=False, hard_label_weight=w,
        ignore_index=ignore_index, carries_loss=carries_loss, check_finite=check_finite, weights=weights,
    )
    # + (1 - w) H(p_t): the kernel's (1 - w) KL(p_t || q) + w CE made a cross entropy; constant in the student
    # (p_t uses sg(z_s))
    per_token = (per_token + (1.0 - w) * stats[..., 1]) * t2
    loss = losses._reduce(per_token, valid, weights, reduction)
    return (loss, losses.TokenStats(*stats.unbind(-1))) if return_stats else loss


class TAIDSchedule:
    """TAID's adaptive interpolation parameter.

    After each step with loss J: delta = (J_prev - J) / (J_prev + eps) (the relative improvement),
    m <- momentum m + (1 - momentum) delta, and
    t <- min(t_end, max(t_linear, t + alpha sigmoid(m) (1 - t))) with t_linear the linear ramp
    t_start + (t_end - t_start) step / total_steps.
    """

    def __init__(self, total_steps: int, *, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
                 momentum: float = 0.99, eps: float = 1e-8) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ValueError(f"need 0 <= t_start <= t_end <= 1, got t_start={t_start}, t_end={t_end}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.total_steps, self.t_start, self.t_end = total_steps, t_start, t_end
        self.alpha, self.momentum, self.eps = alpha, momentum, eps
        self.t, self.m, self.steps, self.prev_loss = t_start, 0.0, 0, None

    def step(self, loss: float | torch.Tensor) -> float:
        """Update t from this step's loss; returns the new t."""
        loss = float(loss)
        # A non-finite loss (a NaN batch) measures no improvement: the momentum keeps its value, the ramp moves t.
        finite = math.isfinite(loss)
        if finite and self.prev_loss is not None:
            delta = (self.prev_loss - loss) / (abs(self.prev_loss) + self.eps)
            self.m = self.momentum * self.m + (1 - self.momentum) * delta
        if finite:
            self.prev_loss = loss
        self.steps += 1
        linear = self.t_start + (self.t_end - self.t_start) * min(self.steps / self.total_steps, 1.0)
        adaptive = self.t + self.alpha * (1.0 / (1.0 + math.exp(-self.m))) * (1.0 - self.t) if finite else self.t
        self.t = min(self.t_end, max(linear, adaptive))
        return self.t

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("total_steps", "t_start", "t_end", "alpha", "momentum", "eps", "t", "m",
                                              "steps", "prev_loss")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
