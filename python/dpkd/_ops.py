"""Registration glue for the compiled ops: fake (meta) kernels, so torch.compile traces the ops without
graph breaks, and autograd formulas. The ops themselves are defined once, in C++, with TORCH_LIBRARY
(csrc/torch/distill_ops.cpp, topk_ops.cpp, clipping_ops.cpp); importing dpkd._C registers them."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers torch.ops.dpkd.*)

# Per-row scalars the forward pass saves for the backward pass (see csrc/core/distill/objectives.h).
ROW_STATE = 16
N_STATS = 5


@torch.library.register_fake("dpkd::distill_forward")
def _distill_forward_fake(student, teacher, labels, divergence, beta, alpha, temperature, teacher_mix,
                          standardize, hard_label_weight, ignore_index, inplace_backward=False, fast_math=False,
                          labels_in_range=False):
    n = student.shape[0]
    f32 = dict(dtype=torch.float32, device=student.device)
    return student.new_empty(n, **f32), student.new_empty(n, N_STATS, **f32), student.new_empty(n, ROW_STATE, **f32)


@torch.library.register_fake("dpkd::distill_backward")
def _distill_backward_fake(grad_loss, student, teacher, labels, row_state, divergence, beta, alpha, temperature,
                           teacher_mix, standardize, hard_label_weight, ignore_index):
    return student.new_empty(student.shape)  # contiguous, as the kernels write it


@torch.library.register_fake("dpkd::distill_backward_")
def _distill_backward_inplace_fake(grad_loss, student, teacher, labels, row_state, divergence, beta, alpha,
                                   temperature, teacher_mix, standardize, hard_label_weight, ignore_index):
    return student


@torch.library.register_fake("dpkd::distill_forward_grad")
def _distill_forward_grad_fake(student, teacher, labels, grad_weight, divergence, beta, alpha, temperature,
                               teacher_mix, standardize, hard_label_weight, ignore_index, fast_math=False,
                               grad_dtype=None, labels_in_range=False):
    n = student.shape[0]
    f32 = dict(dtype=torch.float32, device=student.device)
    return (student.new_empty(n, **f32), student.new_empty(n, N_STATS, **f32),
            student.new_empty(student.shape, dtype=grad_dtype or student.dtype))


@torch.library.register_fake("dpkd::topk_distill")
def _topk_distill_fake(student, ids, logprobs, labels, grad_weight, divergence, beta, alpha, temperature, tail,
                       hard_label_weight, ignore_index):
    n = student.shape[0]
    f32 = dict(dtype=torch.float32, device=student.device)
    grad = student.new_empty(0) if grad_weight is None else student.new_empty(student.shape)
    return student.new_empty(n, **f32), student.new_empty(n, N_STATS, **f32), grad


@torch.library.register_fake("dpkd::scale_unless_one_")
def _scale_unless_one_fake(self, scale):
    return self


@torch.library.register_fake("dpkd::ghost_sq_norms")
def _ghost_sq_norms_fake(activations, output_grads, block):
    dtype = torch.float64 if torch.float64 in (activations.dtype, *(g.dtype for g in output_grads)) else torch.float32
    return activations.new_empty(activations.shape[0], dtype=dtype)


@torch.library.register_fake("dpkd::select_top_fraction")
def _select_top_fraction_fake(score, valid, fraction, largest):
    return valid.new_empty(valid.shape)  # contiguous, as the ops return it


# Device types each op has a kernel for, read once: a plain lookup that torch.compile traces through.
_KERNEL_DEVICES = {op: {d for d in ("cpu", "cuda") if torch._C._dispatch_has_kernel_for_dispatch_key(f"dpkd::{op}",
                                                                                                    d.upper())}
                   for op in ("select_top_fraction",)}


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether dpkd's op ``op`` has a kernel for ``device``'s type."""
    return device.type in _KERNEL_DEVICES[op]


# The forward op's arguments after (student, teacher, labels) that the backward op takes too.
_N_OPTIONS = 8


def _setup_context(ctx, inputs, output):
    student, teacher, labels, *rest = inputs
    ctx.options = rest[:_N_OPTIONS]
    ctx.inplace = bool(rest[_N_OPTIONS]) if len(rest) > _N_OPTIONS else False  # defaulted argument may be absent
    ctx.fast_math = bool(rest[_N_OPTIONS + 1]) if len(rest) > _N_OPTIONS + 1 else False
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(student, teacher, labels, output[2])


# Each divergence seen from the teacher's side: D(p, q) as a function of the teacher's logits is the
# divergence below with the two models' roles exchanged (JSD's beta becomes 1 - beta).
_SWAPPED = {"forward_kl": "reverse_kl", "reverse_kl": "forward_kl", "jsd": "jsd", "skew_kl": "skew_reverse_kl",
            "skew_reverse_kl": "skew_kl", "tvd": "tvd"}


def _teacher_grad(grad_loss, student, teacher, labels, options):
    """d loss / d teacher logits (self-distillation): the same kernels with the roles exchanged. The
    hard-label term does not depend on the teacher, so its rows are scaled by 1 - w."""
    divergence, beta, alpha, temperature, teacher_mix, standardize, hard_label_weight, ignore_index = options
    if teacher_mix != 1.0:
        raise ValueError("no teacher gradient through TAID's interpolated target")
    swapped = (_SWAPPED[divergence], 1.0 - beta, alpha, temperature, 1.0, standardize, 0.0, ignore_index)
    if labels is not None:
        # Here they only mark the rows without loss; the student's ids may lie outside the teacher's vocabulary.
        labels = torch.where(labels == ignore_index, labels, torch.zeros_like(labels))
    _, _, state = torch.ops.dpkd.distill_forward(teacher, student, labels, *swapped)
    scale = grad_loss.float() * (1.0 - hard_label_weight) if labels is not None else grad_loss.float()
    return torch.ops.dpkd.distill_backward(scale.contiguous(), teacher, student, labels, state, *swapped)


class _NoSecondDerivative(torch.autograd.Function):
    """Marks a gradient the kernels computed (no graph behind it): differentiating it raises. Its other inputs
    (anchors) are what the true gradient depends on: through them the marker lies on the path from a penalty to the
    parameters, so autograd runs it (a marker on a detached leaf was pruned, and the penalty silently got nothing
    from the loss's curvature)."""

    @staticmethod
    def forward(ctx, grad, *anchors):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("dpkd's fused distillation gradients have no derivative of their own (create_graph=True "
                           "through a dpkd loss): a gradient penalty cannot see through them")


def first_order_only(*grads, anchors=()):
    """``grads`` as a backward pass returns them; under create_graph=True each is marked, so that a penalty built
    on it raises instead of silently receiving no gradient from it. ``anchors``: the inputs the gradients depend on
    (see _NoSecondDerivative)."""
    if not torch.is_grad_enabled():
        return grads
    anchors = tuple(a for a in anchors if a is not None and a.requires_grad)
    return tuple(g if g is None else _NoSecondDerivative.apply(g.detach() if anchors else g.detach().requires_grad_(),
                                                               *anchors) for g in grads)


def graph_anchor(*tensors):
    """A 0-element tensor whose autograd history reaches ``tensors`` (those that require grad) without holding their
    storage (slices and cat save only sizes): for a Function whose backward does not otherwise keep its inputs, an
    anchor for first_order_only. None where there is nothing to anchor."""
    live = [t for t in tensors if t is not None and t.requires_grad]
    if not live or not torch.is_grad_enabled():
        return None
    # narrow first: reshape(-1) of a non-contiguous tensor would copy all of it
    return torch.cat([(t.narrow(0, 0, 0) if t.dim() else t.reshape(1)[:0]).reshape(-1).float() for t in live])


def _nan_in_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``grad`` [N, V] (ours: just written) with a NaN in each of ``rows`` (one entry per row: O(N), no pass over
    [N, V]); the DP engine drops an example whose gradient holds one."""
    if grad.shape[-1]:
        grad[:, 0].masked_fill_(rows, float("nan"))
    return grad


def _nan_where_upstream_is(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """The kernels write zeros for a row without a finite logit whatever multiplies it: a NaN upstream gradient
    (_NaNRows's) is put into the row after them."""
    return _nan_in_rows(grad, grad_loss.isnan())


def _backward(ctx, grad_loss, grad_stats, grad_state):
    student, teacher, labels, row_state = ctx.saved_tensors
    if ctx.fast_math:  # the backward ops take exact math: their gradient would not match that row state
        raise RuntimeError("distill_forward(fast_math=True) has no backward; distill_forward_grad forms the gradient "
                           "with fast_math in the forward pass")
    grad_student = grad_teacher = None
    if ctx.needs_input_grad[1]:  # before an in-place student backward overwrites the student logits
        grad_teacher = _nan_where_upstream_is(_teacher_grad(grad_loss, student, teacher, labels, ctx.options),
                                              grad_loss)
    if ctx.needs_input_grad[0]:
        op = torch.ops.dpkd.distill_backward_ if ctx.inplace else torch.ops.dpkd.distill_backward
        grad_student = _nan_where_upstream_is(
            op(grad_loss.float().contiguous(), student, teacher, labels, row_state, *ctx.options), grad_loss)
    return first_order_only(grad_student, grad_teacher, anchors=(student, teacher)) + (None,) * (ctx.n_inputs - 2)


torch.library.register_autograd("dpkd::distill_forward", _backward, setup_context=_setup_context)


def distill(student, teacher, labels, divergence, beta, alpha, temperature, teacher_mix, standardize,
            hard_label_weight, ignore_index, inplace_backward=False):
    """(per-row loss [N], statistics [N, 5]) for 2-D logits; differentiable in the student logits.
    ``inplace_backward``: the gradient is written over the student logits' storage."""
    loss, stats, _ = torch.ops.dpkd.distill_forward(student, teacher, labels, divergence, beta, alpha, temperature,
                                                    teacher_mix, standardize, hard_label_weight, ignore_index,
                                                    inplace_backward)
    return loss, stats


def fp16_gradient_scale(row_weights: torch.Tensor) -> torch.Tensor:
    """A power of two (fp32, on the weights' device, no host synchronisation) that brings the largest row weight
    to [1, 2). A logits gradient carries its row's weight (1 / rows under a mean); written in fp16 (smallest
    subnormal 6e-8) most of a mean's entries over thousands of rows would flush to zero: 10-16% relative
    error at 4096 rows, measured. Scaled, they keep fp16's 11 bits; the products with them are scaled back in
    fp32."""
    if row_weights.numel() == 0:
        return torch.ones((), dtype=torch.float32, device=row_weights.device)
    largest = row_weights.detach().abs().amax().float()
    exponent = torch.floor(torch.log2(largest)).clamp(-126, 126)  # weight 0 (-inf): any finite scale will do
    return torch.exp2(-exponent)


class _GradFromForward(torch.autograd.Function):
    """A scalar loss whose gradient with respect to ``student`` the forward kernel already wrote, times
    ``1 / unscale``: the backward pass only scales it by ``grad_output * unscale`` (in fp32: a GradScaler's
    65536 is inf in fp16), on the device and only when that is not 1. ``anchor``: graph_anchor(student), which
    keeps a gradient penalty on that gradient from passing silently (first_order_only)."""

    @staticmethod
    def forward(ctx, student, loss, grad, unscale, anchor):
        ctx.grad, ctx.unscale = grad, unscale
        ctx.save_for_backward(anchor)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("this distillation loss's gradient was computed in its forward pass and is used up: "
                               "backward through it once, or pass fuse_backward=False")
        factor = grad_output if ctx.unscale is None else grad_output.float() * ctx.unscale
        return first_order_only(torch.ops.dpkd.scale_unless_one_(grad, factor.detach()),
                                anchors=ctx.saved_tensors) + (None, None, None, None)


def flagged_rows(stats: torch.Tensor) -> torch.Tensor:
    """Rows the kernels flag (a model's entropy NaN): NaN or +inf logits, or no finite logit. The kernels' running
    maxima pass over a NaN logit, so such a row's loss and gradient may otherwise be finite."""
    return stats[:, :2].isnan().any(1)


class _NaNRows(torch.autograd.Function):
    """Per-row losses with the rows in ``bad`` NaN in value and in gradient (the backward kernel multiplies each
    row by its upstream gradient, so the whole row turns NaN): under DP-SGD the engine then drops that example."""

    @staticmethod
    def forward(ctx, loss, bad):
        ctx.save_for_backward(bad)
        return torch.where(bad, float("nan"), loss)

    @staticmethod
    def backward(ctx, grad):
        (bad,) = ctx.saved_tensors
        return torch.where(bad, float("nan"), grad), None


def nan_rows(loss: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    return _NaNRows.apply(loss, bad)


def distill_reduced(student, teacher, labels, grad_weight, divergence, beta, alpha, temperature, teacher_mix,
                    standardize, hard_label_weight, ignore_index, flag_nonfinite=False):
    """(scalar loss sum_i grad_weight[i] * loss[i], per-row loss, statistics) for 2-D logits, the scalar's
    student gradient computed by the forward kernel. ``flag_nonfinite``: rows of nonzero weight that the kernels
    flag (flagged_rows) get a NaN loss and a NaN in their gradient row, which is ours to change."""
    with torch.no_grad():
        scale = fp16_gradient_scale(grad_weight) if student.dtype == torch.float16 else None
        per_row, stats, grad = torch.ops.dpkd.distill_forward_grad(
            student.detach(), teacher.detach(), labels, grad_weight if scale is None else grad_weight * scale,
            divergence, beta, alpha, temperature, teacher_mix, standardize, hard_label_weight, ignore_index)
        loss = torch.dot(per_row, grad_weight)  # rows without weight are skipped by the kernels: their loss is 0
        if flag_nonfinite:
            bad = flagged_rows(stats) & (grad_weight != 0)
            per_row = torch.where(bad, float("nan"), per_row)
            loss = torch.where(bad.any(), float("nan"), loss)
            _nan_in_rows(grad, bad)
    return (_GradFromForward.apply(student, loss, grad, None if scale is None else 1 / scale, graph_anchor(student)),
            per_row, stats)
