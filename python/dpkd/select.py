"""Token selection and weighting from per-token statistics (:class:`dpkd.TokenStats`).

A rule turns statistics shaped [B, T] (or [N], one sequence) into a :class:`Selection`: a mask or
weights, tagged with its scope. Masks combine with ``&`` and ``|``, weights multiply with ``*``, and
``distill_loss(..., select=rule)`` applies a rule to the statistics of the same forward pass. Tokens
with weight 0 cost nothing in the backward pass (their gradient rows are written as zeros without
being computed).

Scope: ``"sequence"`` (default) takes every quantile and threshold inside one sequence, so a token's
selection depends on its own sequence alone; ``"batch"`` ranks across the whole batch. Under DP only
sequence scope is allowed: with batch scope one example would change another's gradient, and the
clipping bound would no longer bound the sensitivity (``Selection.check_private`` raises).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

import torch

from . import _ops

Scope = Literal["sequence", "batch"]
Quadrant = Literal["q1", "q2", "q1_or_q2"]

__all__ = [
    "Selection",
    "entropy_sampling",
    "entropy_top_fraction",
    "highest_surprisal",
    "paced_weights",
    "relative_confidence",
    "teacher_entropy_weights",
    "tip",
]


@dataclasses.dataclass(frozen=True)
class Selection:
    """A mask (bool) or weights (float) over tokens, and the scope it was computed in: ``"sequence"`` when each
    sequence's values depend on that sequence alone (the only scope DP accepts), ``"batch"`` otherwise (a batch
    quantile). No default: a mask built by hand says which it is."""

    values: torch.Tensor
    scope: Scope

    def __post_init__(self) -> None:
        if self.scope not in ("sequence", "batch"):
            raise ValueError(f"scope must be 'sequence' or 'batch', got {self.scope!r}")

    @property
    def is_mask(self) -> bool:
        return self.values.dtype == torch.bool

    def weights(self) -> torch.Tensor:
        """Float weights (a mask as 0/1), without gradient."""
        return self.values.detach().float()

    def fraction(self, valid: torch.Tensor | None = None) -> float:
        """Selected fraction of the valid tokens (mean weight for weights)."""
        w = self.weights()
        if valid is not None:
            return float(w[valid].mean()) if valid.any() else 0.0
        return float(w.mean()) if w.numel() else 0.0

    def check_private(self) -> None:
        """Raise unless every example's selection depends on that example alone."""
        if self.scope != "sequence":
            raise ValueError("a batch-scope selection cannot be used under DP: one example would change another's "
                             "gradient; use scope='sequence'")

    def _combine(self, other: Selection, op: Callable) -> Selection:
        if not isinstance(other, Selection):
            # A tensor's scope is unknown (a batch quantile would make it "batch"): the caller says which.
            raise TypeError(f"a Selection combines with a Selection, got {type(other).__name__}: wrap a tensor as "
                            "Selection(tensor, scope='sequence' or 'batch')")
        if self.values.shape != other.values.shape:  # broadcasting would pair one sequence's values with another's
            raise ValueError(f"Selections combine token by token and need one shape, got {tuple(self.values.shape)} "
                             f"and {tuple(other.values.shape)} (per-sequence [B] weights spread over [B, T] with "
                             "paced_weights(..., tokens_per_sequence=T))")
        scope: Scope = "sequence" if self.scope == other.scope == "sequence" else "batch"
        return Selection(op(self.values, other.values), scope)

    def __and__(self, other: Selection) -> Selection:
        if isinstance(other, Selection) and not (self.is_mask and other.is_mask):
            raise TypeError("& combines masks; multiply weights with *")
        return self._combine(other, torch.logical_and)

    def __or__(self, other: Selection) -> Selection:
        if isinstance(other, Selection) and not (self.is_mask and other.is_mask):
            raise TypeError("| combines masks; multiply weights with *")
        return self._combine(other, torch.logical_or)

    def __mul__(self, other: Selection) -> Selection:
        return self._combine(other, lambda a, b: a.float() * b.float())


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 1:
        return x[None]
    if x.dim() != 2:
        raise ValueError(f"statistics must be [T] or [B, T], got shape {tuple(x.shape)}")
    return x


def _valid(score: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    # NaN is no score (a token the statistics skipped); +-inf are scores (log q[label] = -inf is the most surprising)
    v = ~torch.isnan(score)
    if valid is not None:
        if valid.shape != score.shape:
            raise ValueError(f"valid must have shape {tuple(score.shape)}, got {tuple(valid.shape)}")
        v = v & valid.bool()
    return v


def _check_same_shape(names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:  # broadcasting [T] against [B, T] would select per batch what was meant per sequence
        raise ValueError(f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} must have one shape")


def _check_scope(scope: str) -> None:
    if scope not in ("sequence", "batch"):
        raise ValueError(f"scope must be 'sequence' or 'batch', got {scope!r}")


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")


def top_fraction(score: torch.Tensor, fraction: float, *, valid: torch.Tensor | None = None,
                 scope: Scope = "sequence", largest: bool = True) -> torch.Tensor:
    """Mask of the ceil(fraction * n) highest-scoring valid tokens of each sequence (or of the batch), where
    n counts the sequence's valid tokens (``valid`` and a score that is not NaN); 1e-9 of slack in the ceiling makes
    0.07 of 100 tokens 7.

    Scores are ranked as float32 (the statistics' dtype): float64 scores closer than float32 resolves tie, and
    magnitudes beyond its range rank as its extremes. Ties go to the earlier position (a stable sort's first k), so
    the result is deterministic. A selection,
    not a sort on the CPU (nth_element per row); one stable radix sort of all rows (CUB) on CUDA; a stable sort in
    PyTorch on devices without a dpkd kernel.
    """
    _check_fraction(fraction)
    _check_scope(scope)
    shape = score.shape
    # +-inf rank as the extreme scores they are (log q[label] = -inf: the most surprising token); the selection op
    # takes finite ones
    s = _as_2d(torch.nan_to_num(score.detach().float(), posinf=torch.finfo(torch.float32).max,
                                neginf=torch.finfo(torch.float32).min))
    v = _as_2d(_valid(score.detach().float(), valid))
    if scope == "batch":
        s, v = s.reshape(1, -1), v.reshape(1, -1)
    if _ops.has_kernel("select_top_fraction", s.device):
        return torch.ops.dpkd.select_top_fraction(s, v, float(fraction), bool(largest)).reshape(shape)
    return _top_fraction_by_sorting(s, v, fraction, largest).reshape(shape)


def _top_fraction_by_sorting(s: torch.Tensor, v: torch.Tensor, fraction: float, largest: bool) -> torch.Tensor:
    key = s if largest else -s
    key = torch.where(v, key, torch.full_like(key, -math.inf))  # valid keys are finite (top_fraction's nan_to_num)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < _selected_count(fraction, v.sum(-1, keepdim=True))) & v


def _selected_count(fraction: float, n: torch.Tensor) -> torch.Tensor:
    """ceil(fraction * n - 1e-9), the product rounded before the slack is taken: as the C++ selected_count."""
    return torch.ceil(fraction * n.double() - 1e-9).long()


def entropy_top_fraction(student_entropy: torch.Tensor, fraction: float = 0.5, *,
                         valid: torch.Tensor | None = None, scope: Scope = "sequence") -> Selection:
    """TIP's entropy rule: the ``fraction`` of tokens with the highest student entropy (50% in TIP)."""
    return Selection(top_fraction(student_entropy, fraction, valid=valid, scope=scope), scope)


def tip(student_entropy: torch.Tensor, divergence: torch.Tensor, *, quadrant: Quadrant = "q1_or_q2",
        fraction: float | None = 0.5, entropy_threshold: float | None = None,
        divergence_threshold: float | None = None, valid: torch.Tensor | None = None,
        scope: Scope = "sequence") -> Selection:
    """TIP quadrants over (student entropy, teacher-student divergence).

    Q1: high student entropy. Q2: low entropy and high divergence ("overconfident and wrong").
    "High" means above the threshold when one is given, else in the top ``fraction`` of the sequence
    (or batch); "low" is its complement. ``q1_or_q2`` is their union.
    """
    if quadrant not in ("q1", "q2", "q1_or_q2"):
        raise ValueError(f"quadrant must be 'q1', 'q2' or 'q1_or_q2', got {quadrant!r}")
    if fraction is not None:  # also where both thresholds make it unused: a wrong value is a mistake either way
        _check_fraction(fraction)
    _check_same_shape(("student_entropy", "divergence"), student_entropy, divergence)
    v = _valid(student_entropy.detach().float(), valid) & ~torch.isnan(divergence.detach())
    if entropy_threshold is not None:
        high_entropy = (student_entropy > entropy_threshold) & v
    elif fraction is not None:
        high_entropy = top_fraction(student_entropy, fraction, valid=v, scope=scope)
    else:
        raise ValueError("give fraction or entropy_threshold")
    if divergence_threshold is not None:
        high_div = (divergence > divergence_threshold) & v
    elif fraction is not None:
        high_div = top_fraction(divergence, fraction, valid=v, scope=scope)
    else:
        raise ValueError("give fraction or divergence_threshold")
    q1 = high_entropy
    q2 = ~high_entropy & high_div & v
    mask = {"q1": q1, "q2": q2, "q1_or_q2": q1 | q2}[quadrant]
    return Selection(mask, scope)


def entropy_sampling(student_entropy: torch.Tensor, fraction: float, *, generator: torch.Generator | None = None,
                     valid: torch.Tensor | None = None, scope: Scope = "sequence") -> Selection:
    """Sample ceil(fraction * n) tokens per sequence without replacement, with probability proportional
    to the student entropy (Gumbel top-k on log-entropy; seeded by ``generator``); n counts the valid tokens of
    positive entropy (a token of entropy 0 has probability 0 of being drawn)."""
    _check_fraction(fraction)
    h = student_entropy.detach().float()
    u = torch.rand(h.shape, generator=generator, device=generator.device if generator is not None else "cpu")
    u = u.to(h.device).clamp(min=1e-20)
    key = torch.log(h.clamp(min=1e-30)) - torch.log(-torch.log(u))
    v = _valid(h, valid) & (h > 0)
    return Selection(top_fraction(key, fraction, valid=v, scope=scope), scope)


def relative_confidence(student_label_logprob: torch.Tensor, teacher_label_logprob: torch.Tensor, *,
                        fraction: float | None = 0.5, threshold: float | None = None,
                        valid: torch.Tensor | None = None, scope: Scope = "sequence") -> Selection:
    """TSD-KD-style: keep tokens where the teacher is most confident relative to the student on the
    realised token, score = log p_teacher(y) - log q_student(y). With a top-k teacher and its tail, a label outside
    the k ids takes the tail's log-mass, an upper bound of its log-probability (without the tail, -inf)."""
    _check_same_shape(("student_label_logprob", "teacher_label_logprob"), student_label_logprob, teacher_label_logprob)
    score = teacher_label_logprob.detach().float() - student_label_logprob.detach().float()
    if threshold is not None:
        return Selection((score > threshold) & _valid(score, valid), scope)
    if fraction is None:
        raise ValueError("give fraction or threshold")
    return Selection(top_fraction(score, fraction, valid=valid, scope=scope), scope)


def highest_surprisal(student_label_logprob: torch.Tensor, fraction: float = 0.5, *,
                      valid: torch.Tensor | None = None, scope: Scope = "sequence") -> Selection:
    """SHRED-style: the ``fraction`` of tokens where the student gives the realised token the lowest
    probability."""
    return Selection(top_fraction(student_label_logprob, fraction, valid=valid, scope=scope, largest=False), scope)


def teacher_entropy_weights(teacher_entropy: torch.Tensor, *, vocab_size: int, power: float = 1.0,
                            valid: torch.Tensor | None = None) -> Selection:
    """SRPO-style entropy-aware weights: w = (1 - H_teacher / log V)^power, so that tokens whose teacher
    distribution is close to uniform (unreliable targets) count little. Per token: sequence scope. With a top-k
    teacher (:func:`dpkd.topk_distill_loss`) its entropy is that of the k ids and the tail, a lower bound: the
    weights come out higher than the full teacher's."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if not 0 <= power < math.inf:  # a negative power weights a near-uniform teacher most (inf at H = log V)
        raise ValueError(f"power must be >= 0 and finite, got {power}")
    h = teacher_entropy.detach().float()
    # NaN (no score) weighs 0: clamp keeps NaN, but NaN ** 0 is 1
    w = torch.where(h.isnan(), 0.0, (1 - h / math.log(vocab_size)).clamp(0, 1) ** power)
    if valid is not None:
        if valid.shape != w.shape:
            raise ValueError(f"valid must have shape {tuple(w.shape)}, got {tuple(valid.shape)}")
        w = torch.where(valid.bool(), w, torch.zeros_like(w))
    return Selection(w, "sequence")


def paced_weights(pass_rate: torch.Tensor, *, alpha: float = 1.0, beta: float = 1.0,
                  tokens_per_sequence: int | None = None) -> Selection:
    """PACED sequence weights w(p) = p^alpha (1 - p)^beta from each sequence's pass rate p in [0, 1].

    Returns [B] weights, or [B, T] when ``tokens_per_sequence`` is given (broadcast over tokens).
    """
    if not (alpha >= 0 and beta >= 0):  # a negative power makes a weight infinite at p = 0 or 1
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    if pass_rate.dim() != 1:
        raise ValueError(f"pass_rate must be [B] (one rate per sequence), got shape {tuple(pass_rate.shape)}")
    if tokens_per_sequence is not None and not (isinstance(tokens_per_sequence, int) and tokens_per_sequence > 0):
        raise ValueError(f"tokens_per_sequence must be a positive int, got {tokens_per_sequence!r}")
    p = pass_rate.detach().float()
    # NaN fails too. A host read: skipped while compiling (torch.compile would break the graph on it)
    if not torch.compiler.is_compiling() and not ((p >= 0) & (p <= 1)).all():
        raise ValueError("pass_rate must be in [0, 1] (and not NaN)")
    w = p**alpha * (1 - p) ** beta
    if tokens_per_sequence is not None:
        w = w[:, None].expand(-1, tokens_per_sequence)
    return Selection(w, "sequence")
