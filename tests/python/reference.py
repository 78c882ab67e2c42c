"""Plain float64 PyTorch references of the distillation objectives (DESIGN.md's table), written from
the formulas, for the tests. Student first, teacher second; both [N, V]; temperature applied."""

from __future__ import annotations

import math

import torch


def _log_probs(z: torch.Tensor, temperature: float, standardize: bool, eps: float = 1e-6) -> torch.Tensor:
    z = z.double()
    if standardize:
        finite = torch.isfinite(z)
        zf = torch.where(finite, z, torch.zeros_like(z))
        n = finite.sum(-1, keepdim=True)
        mean = zf.sum(-1, keepdim=True) / n
        var = (torch.where(finite, z - mean, torch.zeros_like(z)) ** 2).sum(-1, keepdim=True) / n
        z = (z - mean) / (var.sqrt() + eps)
    return torch.log_softmax(z / temperature, dim=-1)


def _xlogy_diff(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q) with 0 log 0 = 0."""
    p = p_log.exp()
    # Mask the difference itself (not only the product): -inf - -inf would put NaN into the gradient.
    diff = torch.where(p > 0, p_log - q_log, torch.zeros_like(p))
    return (p * diff).sum(-1)


def divergence(student, teacher, name: str, *, beta=0.5, alpha=0.1, temperature=1.0, standardize=False):
    lq = _log_probs(student, temperature, standardize)
    lp = _log_probs(teacher, temperature, standardize)
    if name == "forward_kl":
        return _xlogy_diff(lp, lq)
    if name == "reverse_kl":
        return _xlogy_diff(lq, lp)
    if name == "jsd":
        if beta == 0:
            return _xlogy_diff(lp, lq)
        if beta == 1:
            return _xlogy_diff(lq, lp)
        both = torch.stack([lp + torch.log(torch.tensor(beta, dtype=lp.dtype)),
                            lq + torch.log(torch.tensor(1 - beta, dtype=lq.dtype))])
        dead = torch.isinf(both).all(0)  # p = q = 0: keep logsumexp's gradient finite there
        lm = torch.logsumexp(torch.where(dead, torch.zeros_like(both), both), 0)
        lm = torch.where(dead, torch.full_like(lm, float("-inf")), lm)
        return beta * _xlogy_diff(lp, lm) + (1 - beta) * _xlogy_diff(lq, lm)
    if name == "skew_kl":
        m = alpha * lp.exp() + (1 - alpha) * lq.exp()
        return _xlogy_diff(lp, torch.log(torch.where(m > 0, m, torch.ones_like(m))))
    if name == "skew_reverse_kl":
        m = (1 - alpha) * lp.exp() + alpha * lq.exp()
        return _xlogy_diff(lq, torch.log(torch.where(m > 0, m, torch.ones_like(m))))
    if name == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    raise ValueError(name)


def entropy(z, temperature=1.0, standardize=False):
    lp = _log_probs(z, temperature, standardize)
    p = lp.exp()
    return -(p * torch.where(p > 0, lp, torch.zeros_like(p))).sum(-1)


def empty_row(student, teacher, which: str, row: int = 1) -> str:
    """Sets ``row`` of the student's, the teacher's or both models' logits to -inf (``which``: "student",
    "teacher" or "both"), in place; returns the argument name the loss must report."""
    if which in ("student", "both"):
        student[row] = float("-inf")
    if which in ("teacher", "both"):
        teacher[row] = float("-inf")
    return "teacher_logits" if which == "teacher" else "student_logits"


def topk_divergence(s, ids, logp, temperature, div, **kw):
    """float64 per-row divergence over the outcomes K and the rest (teacher mass 1 - sum_K p there), differentiable
    in the student's logits: :func:`divergence` applied to the outcomes' log-probabilities (a top-k teacher)."""
    lq = torch.log_softmax(s.double() / temperature, -1)
    lq_rest = torch.logsumexp(lq.scatter(1, ids, -math.inf), -1, keepdim=True)
    lp = logp.double()
    lp_rest = torch.log((1 - lp.exp().sum(-1, keepdim=True)).clamp(min=0))
    return divergence(torch.cat([lq.gather(1, ids), lq_rest], 1), torch.cat([lp, lp_rest], 1), div, **kw)
