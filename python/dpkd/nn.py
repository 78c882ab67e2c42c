"""nn.Module forms of the distillation losses, for code that composes modules."""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from . import fused_linear, losses, taid, topk

__all__ = ["DistillLoss", "ForwardKLLoss", "FusedLinearDistillLoss", "GeneralizedJSDLoss", "ReverseKLLoss",
           "SkewKLLoss", "SkewReverseKLLoss", "TAIDLoss", "TVDLoss", "TopKDistillLoss"]


def _keyword_defaults(function: Callable) -> dict:
    """A function's (or class's) keyword-only parameters and their defaults."""
    return {n: p.default for n, p in inspect.signature(function).parameters.items() if p.kind == p.KEYWORD_ONLY}


def _check_settings(settings: dict) -> None:
    """A loss's options checked when its module is made (a bad value fails there, not at the first call)."""
    losses.check_options(divergence=settings.get("divergence", "forward_kl"), beta=settings.get("beta", 0.5),
                         alpha=settings.get("alpha", 0.1), temperature=settings["temperature"],
                         reduction=settings["reduction"], hard_label_weight=settings["hard_label_weight"],
                         has_labels=True)


class _ConfiguredLoss(torch.nn.Module):
    """A loss function's divergence and options, fixed at construction (and checked there: a misspelt option or a
    bad value fails when the module is made, not at its first call); call options override them."""

    _function: Callable = losses.distill_loss

    def __init__(self, divergence: losses.Divergence = "forward_kl", **options) -> None:
        super().__init__()
        defaults = _keyword_defaults(type(self)._function)
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown options {unknown}")
        _check_settings({**defaults, **options, "divergence": divergence})
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


class _NamedDivergenceLoss(DistillLoss):
    """DistillLoss with its divergence in the class's name."""

    _divergence: str

    def __init__(self, **options) -> None:
        if "divergence" in options:
            raise TypeError(f"{type(self).__name__} is divergence={self._divergence!r}; for another one use "
                            f"DistillLoss(divergence={options['divergence']!r})")
        super().__init__(self._divergence, **options)


class ForwardKLLoss(_NamedDivergenceLoss):
    _divergence = "forward_kl"


class ReverseKLLoss(_NamedDivergenceLoss):
    _divergence = "reverse_kl"


class GeneralizedJSDLoss(_NamedDivergenceLoss):
    _divergence = "jsd"

    def __init__(self, beta: float = 0.5, **options) -> None:
        super().__init__(beta=beta, **options)


class SkewKLLoss(_NamedDivergenceLoss):
    _divergence = "skew_kl"

    def __init__(self, alpha: float = 0.1, **options) -> None:
        super().__init__(alpha=alpha, **options)


class SkewReverseKLLoss(_NamedDivergenceLoss):
    _divergence = "skew_reverse_kl"

    def __init__(self, alpha: float = 0.1, **options) -> None:
        super().__init__(alpha=alpha, **options)


class TVDLoss(_NamedDivergenceLoss):
    _divergence = "tvd"


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


class TopKDistillLoss(_ConfiguredLoss):
    """``TopKDistillLoss(divergence=..., **options)(student_logits, teacher_ids, teacher_logprobs, labels=None,
    ...)``: :func:`dpkd.topk_distill_loss` with its options fixed at construction."""

    _function = topk.topk_distill_loss

    def __init__(self, divergence: losses.Divergence = "forward_kl", **options) -> None:
        super().__init__(divergence, **options)
        settings = {**_keyword_defaults(topk.topk_distill_loss), **options}
        topk.check_objective(topk.Objective(divergence, settings["beta"], settings["alpha"], settings["temperature"],
                                            settings["tail"]), True, settings["reduction"])

    def forward(self, student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                **call_options) -> torch.Tensor:
        return topk.topk_distill_loss(student_logits, teacher_ids, teacher_logprobs, **self._options(call_options))


class TAIDLoss(torch.nn.Module):
    """``TAIDLoss(total_steps, **options)(student_logits, teacher_logits, labels=None, ...)``: :func:`dpkd.taid_loss`
    at its :class:`dpkd.TAIDSchedule`'s current t. ``options``: the schedule's (t_start, t_end, alpha, momentum) and
    the loss's; call :meth:`step` with each step's loss to move t. The schedule's state is in ``state_dict()``."""

    def __init__(self, total_steps: int, **options) -> None:
        super().__init__()
        schedule, loss = _keyword_defaults(taid.TAIDSchedule), _keyword_defaults(taid.taid_loss)
        unknown = sorted(set(options) - set(schedule) - set(loss))
        if unknown:
            raise TypeError(f"TAIDLoss got unknown options {unknown}")
        self.schedule = taid.TAIDSchedule(total_steps, **{k: v for k, v in options.items() if k in schedule})
        self.options = {k: v for k, v in options.items() if k in loss}
        _check_settings({**loss, **self.options})

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, **call_options) -> torch.Tensor:
        return taid.taid_loss(student_logits, teacher_logits, self.schedule.t, **{**self.options, **call_options})

    def step(self, loss: float | torch.Tensor) -> float:
        """Move t after a step whose loss was ``loss``; returns the new t."""
        return self.schedule.step(float(loss.detach() if isinstance(loss, torch.Tensor) else loss))

    def get_extra_state(self) -> dict:
        return self.schedule.state_dict()

    def set_extra_state(self, state: dict) -> None:
        self.schedule.load_state_dict(state)

    def extra_repr(self) -> str:
        return ", ".join([f"t={self.schedule.t:.4g}"] + [f"{k}={v!r}" for k, v in self.options.items()])
