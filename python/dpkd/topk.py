"""Distillation from a top-k (sparse) teacher: the teacher is given as its k most likely token ids and
their log-probabilities (cached offline, or from an API that returns only top-k), optionally with a tail
bucket for the remaining mass.

Forward KL over the kept tokens, p the teacher's given probabilities and q the student's softmax over its
whole vocabulary at ``temperature``:

    D = sum_{k in K} p_k (log p_k - log q_k)  [+ p_tail (log p_tail - log q_tail)]

with p_tail = 1 - sum_K p and q_tail = 1 - sum_K q. The gradient is q (sum_K p) - p 1_K without the tail
and q - p 1_K - (p_tail / q_tail) q 1_{not K} with it. Rows are processed in chunks, so the fp32 work
space is chunk x V, never N x V.
"""

from __future__ import annotations

import torch

from . import losses

__all__ = ["topk_forward_kl"]


def _row_terms(x: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, temperature: float, tail: bool):
    """Per-row loss, student log-sum-exp and the gradient's row coefficients for one chunk (fp32)."""
    xf = x.float() / temperature
    lse = torch.logsumexp(xf, dim=-1)
    lq = xf.gather(1, ids) - lse[:, None]
    p = logp.float().exp()
    live = p > 0
    loss = torch.where(live, p * (logp.float() - lq), torch.zeros_like(p)).sum(-1)
    tail_ratio = torch.zeros_like(lse)
    if tail:
        p_tail = (1 - p.sum(-1)).clamp(min=0)
        log_q_tail = torch.log((-torch.expm1(torch.logsumexp(lq, dim=-1))).clamp(min=1e-30))
        loss = loss + torch.where(p_tail > 0, p_tail * (torch.log(p_tail.clamp(min=1e-30)) - log_q_tail),
                                  torch.zeros_like(p_tail))
        tail_ratio = p_tail / log_q_tail.exp()
    return loss, lse, lq, p, tail_ratio


class _TopKForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids, logp, temperature, tail, chunk):
        losses_, lses = [], []
        for start in range(0, x.shape[0], chunk):
            loss, lse, *_ = _row_terms(x[start:start + chunk], ids[start:start + chunk],
                                       logp[start:start + chunk], temperature, tail)
            losses_.append(loss)
            lses.append(lse)
        ctx.save_for_backward(x, ids, logp)
        ctx.options = (temperature, tail, chunk)
        out = torch.cat(losses_) if losses_ else x.new_zeros(0, dtype=torch.float32)
        lse = torch.cat(lses) if lses else out
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        x, ids, logp = ctx.saved_tensors
        temperature, tail, chunk = ctx.options
        grad = torch.empty_like(x)
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            grad[rows] = loss_and_grad(x[rows], ids[rows], logp[rows], temperature, tail, grad_loss[rows])[1]
        return grad, None, None, None, None, None


def loss_and_grad(x: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, temperature: float, tail: bool,
                  grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (fp32) and the gradient of sum_i grad_loss[i] loss[i] with respect to the logits x
    (x's dtype), for one chunk of rows."""
    loss, lse, lq, p, tail_ratio = _row_terms(x, ids, logp, temperature, tail)
    q = torch.exp(x.float() / temperature - lse[:, None])
    # q * (sum_K p [+ p_tail]) - p on K  [- (p_tail / q_tail) q off K]
    scale = (p.sum(-1) + (1 - p.sum(-1)).clamp(min=0) - tail_ratio) if tail else p.sum(-1)
    g = q * scale[:, None]
    on_k = p - (tail_ratio[:, None] * lq.exp() if tail else 0)
    g.scatter_add_(1, ids, -on_k)
    g *= (grad_loss.float() / temperature)[:, None]
    return loss, g.to(x.dtype)


# Rounding slack for log-probabilities and their sum (a softmax's certain token can come out at +1e-7).
_LOGPROB_SLACK = 1e-3


def check_topk_teacher(ids: torch.Tensor, logp: torch.Tensor, v: int, tail: bool,
                       names: tuple[str, str] = ("teacher_ids", "teacher_logprobs")) -> None:
    """The teacher's ids in range, log-probabilities not NaN and <= 0, and their mass <= 1 where a tail takes the
    rest: one host read for all of it."""
    lp = logp.detach().float()
    flags = [((ids < 0) | (ids >= v)).any(), lp.isnan().any(), (lp > _LOGPROB_SLACK).any()]
    if tail:
        flags.append((lp.exp().sum(-1) > 1 + _LOGPROB_SLACK).any())
    bad = torch.stack(flags).tolist()
    messages = [f"{names[0]} must be in [0, {v})", f"{names[1]} contains NaN",
                f"{names[1]} must be log-probabilities (<= 0)",
                f"{names[1]} of a row sum to more than probability 1, leaving no mass for the tail"]
    for flag, message in zip(bad, messages):
        if flag:
            raise ValueError(message)


def topk_forward_kl(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    tail: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: losses.Reduction = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Forward KL to a top-k teacher.

    Args:
        student_logits: [N, V] or [B, T, V].
        teacher_ids: int64 [..., K] token ids, distinct within a row (not checked: a repeated id counts twice).
        teacher_logprobs: [..., K] the teacher's log-probabilities of those ids, used as given: apply the
            teacher's temperature when producing them (``temperature`` here divides the student's logits).
        tail: add the bucket of the remaining mass 1 - sum_K p against 1 - sum_K q.
        chunk_size: rows per chunk of fp32 work space (default: about 64 MB of it).
    Other arguments as in :func:`dpkd.distill_loss`.
    """
    s = student_logits
    if s.dtype not in (torch.float32, torch.bfloat16, torch.float16) or s.dim() not in (2, 3):
        raise ValueError(f"student_logits must be [N, V] or [B, T, V] float32/bfloat16/float16, got "
                         f"{tuple(s.shape)} {s.dtype}")
    lead, v = tuple(s.shape[:-1]), s.shape[-1]
    if teacher_ids.shape != teacher_logprobs.shape or tuple(teacher_ids.shape[:-1]) != lead:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} must both be {lead} + (K,)")
    if teacher_ids.dtype != torch.int64:
        raise TypeError(f"teacher_ids must be int64, got {teacher_ids.dtype}")
    if not teacher_logprobs.is_floating_point():
        raise TypeError(f"teacher_logprobs must be a floating tensor, got {teacher_logprobs.dtype}")
    if teacher_ids.device != s.device or teacher_logprobs.device != s.device:
        raise ValueError(f"teacher_ids and teacher_logprobs must be on the logits' device {s.device}")
    losses.check_token_tensors(lead, s.device, labels, mask, weights)
    losses.check_temperature(temperature)
    if reduction not in losses.REDUCTIONS:
        raise ValueError(f"reduction must be one of {losses.REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if teacher_ids.numel() and not torch.compiler.is_compiling():
        check_topk_teacher(teacher_ids, teacher_logprobs, v, tail)
    k = teacher_ids.shape[-1]
    x = s.reshape(-1, v)
    chunk = chunk_size or max(1, (1 << 24) // max(v, 1))
    per_token, lse = _TopKForwardKL.apply(x, teacher_ids.reshape(-1, k), teacher_logprobs.detach().reshape(-1, k),
                                          float(temperature), bool(tail), int(chunk))
    if not torch.compiler.is_compiling() and (torch.isnan(lse) | torch.isposinf(lse)).any():  # a +inf logit: lse +inf
        raise ValueError("student_logits contains NaN or +inf")
    valid = losses.valid_tokens(labels, mask, ignore_index)
    return losses._reduce(per_token.reshape(lead), valid, weights, reduction)
