"""nn.Module forms of the distillation losses, for code that composes modules."""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from . import fused_linear, losses

__all__ = ["DistillLoss", "ForwardKLLoss", "FusedLinearDistillLoss", "GeneralizedJSDLoss", "ReverseKLLoss",
           "SkewKLLoss", "SkewReverseKLLoss", "TVDLoss"]


class _ConfiguredLoss(torch.nn.Module):
    """A loss function's divergence and options, fixed at construction (and checked there: a misspelt option or a
    bad value fails when the module is made, not at its first call); call options override them."""

    _function: Callable = losses.distill_loss

    def __init__(self, divergence: losses.Divergence = "forward_kl", **options) -> None:
        super().__init__()
        parameters = inspect.signature(type(self)._function).parameters
        unknown = sorted(set(options) - {n for n, p in parameters.items() if p.kind == p.KEYWORD_ONLY})
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown options {unknown}")
        settings = {n: p.default for n, p in parameters.items() if p.kind == p.KEYWORD_ONLY}
        settings.update(options, divergence=divergence)
        losses.check_options(**{k: settings[k] for k in ("divergence", "beta", "alpha", "temperature", "reduction",
                                                         "hard_label_weight")}, has_labels=True)
        self.divergence = divergence
        self.options = options

    def _options(self, call_options: dict) -> dict:
        return {"divergence": self.divergence, **self.options, **call_options}

    def extra_repr(self) -> str:
        return ", ".join([f"divergence={self.divergence!r}"] + [f"{k}={v!r}" for k, v in self.options.items()])


class DistillLoss(_ConfiguredLoss):
    """``DistillLoss(divergence=..., **options)(student_logits, teacher_logits, labels=None, ...)``:
    :func:`dpkd.distill_loss` with its options fixed at construction."""

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, **call_options) -> torch.Tensor:
        return losses.distill_loss(student_logits, teacher_logits, **self._options(call_options))


class ForwardKLLoss(DistillLoss):
    def __init__(self, **options) -> None:
        super().__init__("forward_kl", **options)


class ReverseKLLoss(DistillLoss):
    def __init__(self, **options) -> None:
        super().__init__("reverse_kl", **options)


class GeneralizedJSDLoss(DistillLoss):
    def __init__(self, beta: float = 0.5, **options) -> None:
        super().__init__("jsd", beta=beta, **options)


class SkewKLLoss(DistillLoss):
    def __init__(self, alpha: float = 0.1, **options) -> None:
        super().__init__("skew_kl", alpha=alpha, **options)


class SkewReverseKLLoss(DistillLoss):
    def __init__(self, alpha: float = 0.1, **options) -> None:
        super().__init__("skew_reverse_kl", alpha=alpha, **options)


class TVDLoss(DistillLoss):
    def __init__(self, **options) -> None:
        super().__init__("tvd", **options)


class FusedLinearDistillLoss(_ConfiguredLoss):
    """``FusedLinearDistillLoss(divergence=..., **options)(student_hidden, student_weight, teacher_hidden,
    teacher_weight, labels=None, ...)``: :func:`dpkd.fused_linear_distill_loss` with its options fixed at
    construction (pass ``teacher_topk=`` in the call for a top-k teacher)."""

    _function = fused_linear.fused_linear_distill_loss

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                **call_options) -> torch.Tensor:
        return fused_linear.fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                      **self._options(call_options))
