"""Registration glue for the compiled ops: fake (meta) kernels, so torch.compile traces the ops without
graph breaks, and autograd formulas. The ops themselves are defined once, in C++, with TORCH_LIBRARY
(csrc/torch/distill_ops.cpp); importing dpkd._C registers them."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers torch.ops.dpkd.*)

# Per-row scalars the forward pass saves for the backward pass (see csrc/core/distill/objectives.h).
ROW_STATE = 16
N_STATS = 5


@torch.library.register_fake("dpkd::distill_forward")
def _distill_forward_fake(student, teacher, labels, divergence, beta, alpha, temperature, teacher_mix,
                          standardize, hard_label_weight, ignore_index, inplace_backward=False):
    n = student.shape[0]
    f32 = dict(dtype=torch.float32, device=student.device)
    return student.new_empty(n, **f32), student.new_empty(n, N_STATS, **f32), student.new_empty(n, ROW_STATE, **f32)


@torch.library.register_fake("dpkd::distill_backward")
def _distill_backward_fake(grad_loss, student, teacher, labels, row_state, divergence, beta, alpha, temperature,
                           teacher_mix, standardize, hard_label_weight, ignore_index):
    return torch.empty_like(student)


@torch.library.register_fake("dpkd::distill_backward_")
def _distill_backward_inplace_fake(grad_loss, student, teacher, labels, row_state, divergence, beta, alpha,
                                   temperature, teacher_mix, standardize, hard_label_weight, ignore_index):
    return student


# The forward op's arguments after (student, teacher, labels) that the backward op takes too.
_N_OPTIONS = 8


def _setup_context(ctx, inputs, output):
    student, teacher, labels, *rest = inputs
    ctx.options = rest[:_N_OPTIONS]
    ctx.inplace = bool(rest[_N_OPTIONS]) if len(rest) > _N_OPTIONS else False  # defaulted argument may be absent
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(student, teacher, labels, output[2])


def _backward(ctx, grad_loss, grad_stats, grad_state):
    student, teacher, labels, row_state = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        op = torch.ops.dpkd.distill_backward_ if ctx.inplace else torch.ops.dpkd.distill_backward
        grad_student = op(grad_loss.float().contiguous(), student, teacher, labels, row_state, *ctx.options)
    if ctx.needs_input_grad[1]:
        raise NotImplementedError("the fused distillation ops do not compute a gradient for teacher_logits; "
                                  "detach the teacher logits")
    return (grad_student,) + (None,) * (ctx.n_inputs - 1)


torch.library.register_autograd("dpkd::distill_forward", _backward, setup_context=_setup_context)


def distill(student, teacher, labels, divergence, beta, alpha, temperature, teacher_mix, standardize,
            hard_label_weight, ignore_index, inplace_backward=False):
    """(per-row loss [N], statistics [N, 5]) for 2-D logits; differentiable in the student logits.
    ``inplace_backward``: the gradient is written over the student logits' storage."""
    loss, stats, _ = torch.ops.dpkd.distill_forward(student, teacher, labels, divergence, beta, alpha, temperature,
                                                    teacher_mix, standardize, hard_label_weight, ignore_index,
                                                    inplace_backward)
    return loss, stats
