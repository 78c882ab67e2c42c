"""The fused objectives through the public API against float64 PyTorch references (reference.py)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import dpkd
from dpkd import losses
from reference import divergence as ref_divergence
from reference import empty_row
from reference import entropy as ref_entropy

DIVS = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def logits(n, v, scale=5.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)


def rel_err(a, b, floor=1e-6):
    """Relative norm error; below `floor` in norm, gradients are at fp32 round-off and compared absolutely."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=floor))


def assert_one_rounding_apart(actual, expected, scale=None):
    """Two paths to the same result (the fused op keeps each row's probabilities for its backward, the separate
    ops recompute them) round differently, and where a result is a difference (a gradient q - p, an entropy
    lse - sum p y) their rounding errors stay while it cancels; how much shows depends on the CPU's vector
    width. Within 1e-6 relative, or 1e-6 of ``scale`` (default: the largest entry of ``expected``)."""
    if scale is None:
        scale = expected.nan_to_num(0.0, 0.0, 0.0).abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * scale, equal_nan=True)


def reference_loss_and_grad(s, t, div, reduction="mean", **kw):
    s64 = s.detach().double().requires_grad_(True)
    per_token = ref_divergence(s64, t.double(), div, **kw)
    loss = per_token.sum() if reduction == "sum" else per_token.mean()
    loss.backward()
    return loss.detach(), s64.grad


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("shape", [(1, 7), (13, 1000), (5, 4099)])
def test_fp32_matches_float64_reference(div, temperature, shape):
    n, v = shape
    for scale in (1.0, 30.0):
        s = logits(n, v, scale, seed=1).requires_grad_(True)
        t = logits(n, v, scale, seed=2)
        kw = dict(temperature=temperature, beta=0.3, alpha=0.2)
        loss = losses.distill_loss(s, t, divergence=div, **kw)
        loss.backward()
        ref_loss, ref_grad = reference_loss_and_grad(s, t, div, **kw)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-7)
        # At scale 30 most rows are near one-hot and several objectives saturate (gradient norms ~1e-8,
        # below what fp32 probabilities resolve; fp32 eager PyTorch is no closer there). Relative error
        # is therefore taken against the gradients' natural scale, sqrt(rows) / (T * N) for a mean.
        natural = math.sqrt(n) / (temperature * n)
        assert rel_err(s.grad, ref_grad, floor=0.1 * natural) < 1e-5


@pytest.mark.parametrize("div", DIVS)
def test_fp32_gradient_of_peaked_rows_does_not_cancel(div):
    """V = 128256 at T = 0.7: a few entries hold most of the student's mass and g - <q, g> is small next to
    g there. Without the g_ref shift the JSD, TVD and skew reverse KL gradients were 1.0e-4, 3.2e-4 and
    2.3e-4 off in relative norm; the skew reverse KL kept 6e-5 while its g carried -log(alpha) (5e-7 now)."""
    g = torch.Generator().manual_seed(4 + 128256)
    s = (torch.randn(4, 128256, generator=g, dtype=torch.float64) * 4).float()
    t = (torch.randn(4, 128256, generator=g, dtype=torch.float64) * 4).float()
    kw = dict(temperature=0.7, beta=0.3, alpha=0.2)
    sd = s.clone().requires_grad_(True)
    losses.distill_loss(sd, t, divergence=div, reduction="sum", **kw).backward()
    s64 = s.double().requires_grad_(True)
    ref_divergence(s64, t.double(), div, **kw).sum().backward()
    assert rel_err(sd.grad, s64.grad) < 1e-5


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference_on_rounded_inputs(div, dtype):
    s = logits(16, 3001, 8.0, dtype, seed=3).requires_grad_(True)
    t = logits(16, 3001, 8.0, dtype, seed=4)
    loss = losses.distill_loss(s, t, divergence=div, reduction="sum")
    loss.backward()
    assert s.grad.dtype == dtype
    ref_loss, ref_grad = reference_loss_and_grad(s, t, div, reduction="sum")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
    assert rel_err(s.grad, ref_grad) < 2e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and dpkd.with_cuda), reason="needs CUDA"))])
@pytest.mark.parametrize("fuse_backward", [True, False])
def test_fp16_mean_over_many_rows_under_a_grad_scaler(device, fuse_backward):
    """A mean over 4096 rows puts most fp16 gradient entries below fp16's normal range. Unscaled, the result can
    be no better than fp16's rounding of the exact gradient (10% here), and it is that; under a GradScaler's
    65536 it must be fp16-accurate. The fused backward wrote the gradient in fp16 before the scale came: 65536
    as an fp16 tensor is inf (NaN gradients on the CPU), and the entries lost before scaling stayed lost."""
    s = logits(4096, 500, 3.0, torch.float16, seed=31).to(device)
    t = logits(4096, 500, 3.0, torch.float16, seed=32).to(device)
    _, g_ref = reference_loss_and_grad(s.cpu(), t.cpu(), "jsd")
    for grad_scale in (1.0, 65536.0):
        sd = s.clone().requires_grad_(True)
        (losses.distill_loss(sd, t, divergence="jsd", fuse_backward=fuse_backward) * grad_scale).backward()
        err = rel_err(sd.grad.cpu().double() / grad_scale, g_ref)
        own = rel_err((g_ref * grad_scale).half().double() / grad_scale, g_ref)
        assert err < own * 1.01 + 1e-3, (grad_scale, err, own)
        if grad_scale != 1.0:
            assert err < 2e-3, err


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and dpkd.with_cuda), reason="needs CUDA"))])
@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("offset", [30.0, 1e3, 1e4])
@pytest.mark.parametrize("v", [4096, 4097])  # CUDA: the cluster kernel, the one-block kernels
def test_small_divergence_of_logits_far_from_zero(device, div, offset, v):
    """A divergence of ~1e-3 between logits near 1e4: the row constant lse_s - lse_t must not be formed from the
    two log-sum-exps rounded alone (each off by ulp(1e4) = 1e-3: 30-80% error, as the CUDA kernels had it)."""
    g = torch.Generator().manual_seed(int(offset) + v)
    y = offset + 4 * torch.randn(8, v, generator=g, dtype=torch.float64)
    x = y + 0.05 * torch.randn(8, v, generator=g, dtype=torch.float64) + 6 * torch.rand(8, 1, generator=g) - 3
    s, t = x.float(), y.float()
    got = losses.distill_loss(s.to(device), t.to(device), divergence=div, reduction="none").cpu().double()
    ref = ref_divergence(s.double(), t.double(), div)
    assert ((got - ref).abs() / ref).max() < 1e-2, (got, ref)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and dpkd.with_cuda), reason="needs CUDA"))])
@pytest.mark.parametrize("div", ["forward_kl", "jsd"])  # the single-pass sums and the second pass's
@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
@pytest.mark.parametrize("v", [4096, 4097])
def test_entropies_of_logits_far_from_zero(device, div, offset, v):
    """Entropies taken as log-sum-exp - sum q x lose ulp(offset) per term of sum q x: 7.6e-5 at logits near 1e3
    and 1.5e-3 near 1e4 (CPU, before the sums were taken against the row's max)."""
    g = torch.Generator().manual_seed(int(offset) + v)
    s = (offset + 4 * torch.randn(8, v, generator=g, dtype=torch.float64)).float()
    t = (offset + 3 * torch.randn(8, v, generator=g, dtype=torch.float64)).float()
    st = losses.token_stats(s.to(device), t.to(device), divergence=div)
    for got, x in ((st.student_entropy, s), (st.teacher_entropy, t)):
        err = (got.cpu().double() - ref_entropy(x.double())).abs().max().item()
        assert err < 3e-5, err


@pytest.mark.parametrize("div", ["skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.2, 1 - 1e-6, 1.0])
def test_skew_kls_at_and_near_the_endpoints(div, alpha):
    s = logits(8, 500, 4.0, seed=5).requires_grad_(True)
    t = logits(8, 500, 4.0, seed=6)
    loss = losses.distill_loss(s, t, divergence=div, alpha=alpha, reduction="sum")
    loss.backward()
    ref_loss, ref_grad = reference_loss_and_grad(s, t, div, alpha=alpha, reduction="sum")
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    assert rel_err(s.grad, ref_grad, floor=1e-6) < 1e-5
    if alpha == 0.0:  # the mixture is the other model: the plain KLs
        plain = losses.forward_kl if div == "skew_kl" else losses.reverse_kl
        assert loss.item() == pytest.approx(plain(s, t, reduction="sum").item(), rel=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and dpkd.with_cuda), reason="needs CUDA"))])
@pytest.mark.parametrize("div,plain", [("skew_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")])
@pytest.mark.parametrize("alpha", [1e-40, 1e-50])  # subnormal and zero as floats
def test_skew_kls_with_alpha_below_floats_range_are_the_kls(device, div, plain, alpha):
    """The mixture formulas with alpha = 0.f and log alpha ~ -115 overflowed (zero or NaN gradients on peaked rows)
    or cancelled (a negative skew reverse KL)."""
    s = (logits(8, 500, 30.0, seed=42) + 90 * torch.nn.functional.one_hot(torch.arange(8) * 7, 500)).to(device)
    t = logits(8, 500, 30.0, seed=43).to(device)
    got, want = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    loss = losses.distill_loss(got, t, divergence=div, alpha=alpha, reduction="sum")
    loss.backward()
    ref = losses.distill_loss(want, t, divergence=plain, reduction="sum")
    ref.backward()
    assert torch.isfinite(got.grad).all() and loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 1e-12, 1e-6, 0.5, 1 - 1e-6, 1 - 1e-12, 1.0])  # 1 - 1e-12 is 1.f in float
def test_jsd_endpoints_and_near_them(beta):
    s = logits(8, 500, 4.0, seed=5).requires_grad_(True)
    t = logits(8, 500, 4.0, seed=6)
    loss = losses.generalized_jsd(s, t, beta=beta)
    loss.backward()
    ref_loss, ref_grad = reference_loss_and_grad(s, t, "jsd", beta=beta)
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-9)
    assert rel_err(s.grad, ref_grad) < 1e-4
    if beta == 0.0:
        assert loss.item() == pytest.approx(losses.forward_kl(s, t).item(), rel=1e-6)
    if beta == 1.0:
        assert loss.item() == pytest.approx(losses.reverse_kl(s, t).item(), rel=1e-6)


@pytest.mark.parametrize("div", DIVS)
def test_padded_vocabulary_and_extreme_logits(div):
    s = logits(6, 300, 3.0, seed=7)
    t = logits(6, 300, 3.0, seed=8)
    s[:, -20:] = float("-inf")  # padded columns: probability 0 for both models
    t[:, -20:] = float("-inf")
    s[0, 0], t[1, 5] = 1e4, -1e4
    s.requires_grad_(True)
    loss = losses.distill_loss(s, t, divergence=div, reduction="sum")
    loss.backward()
    ref_loss, ref_grad = reference_loss_and_grad(s, t, div, reduction="sum")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    assert torch.isfinite(s.grad).all()
    assert (s.grad[:, -20:] == 0).all()
    assert rel_err(s.grad, ref_grad) < 1e-5


def test_ignore_index_mask_weights_and_reductions():
    b, t_len, v = 3, 5, 64
    s = logits(b * t_len, v, 4.0, seed=9).reshape(b, t_len, v).requires_grad_(True)
    t = logits(b * t_len, v, 4.0, seed=10).reshape(b, t_len, v)
    labels = torch.randint(0, v, (b, t_len), generator=torch.Generator().manual_seed(0))
    labels[0, :2] = -100
    mask = torch.ones(b, t_len, dtype=torch.bool)
    mask[2, -1] = False
    w = torch.rand(b, t_len, generator=torch.Generator().manual_seed(1))
    ref = ref_divergence(s.reshape(-1, v), t.reshape(-1, v), "forward_kl").reshape(b, t_len)
    valid = (labels != -100) & mask
    none = losses.forward_kl(s, t, labels=labels, mask=mask, weights=w, reduction="none")
    assert none.shape == (b, t_len)
    torch.testing.assert_close(none.double(), torch.where(valid, ref * w, 0.0), rtol=1e-5, atol=1e-7)
    total = (ref * w)[valid].sum()
    for reduction, expected in (("sum", total), ("mean", total / valid.sum()), ("batchmean", total / b)):
        got = losses.forward_kl(s, t, labels=labels, mask=mask, weights=w, reduction=reduction)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # Ignored tokens get exactly zero gradient.
    losses.forward_kl(s, t, labels=labels, mask=mask, reduction="sum").backward()
    assert (s.grad[~valid] == 0).all()
    assert (s.grad[valid] != 0).any()


def test_statistics_and_hard_label_mixing():
    s = logits(10, 200, 3.0, seed=11).requires_grad_(True)
    t = logits(10, 200, 3.0, seed=12)
    labels = torch.randint(0, 200, (10,), generator=torch.Generator().manual_seed(2))
    labels[3] = -100
    loss, st = losses.distill_loss(s, t, divergence="reverse_kl", labels=labels, temperature=2.0,
                                   hard_label_weight=0.25, reduction="none", return_stats=True)
    torch.testing.assert_close(st.student_entropy.double(), ref_entropy(s, 2.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.teacher_entropy.double(), ref_entropy(t, 2.0), rtol=1e-5, atol=1e-6)
    div = ref_divergence(s, t, "reverse_kl", temperature=2.0)
    torch.testing.assert_close(st.divergence.double(), div, rtol=1e-5, atol=1e-6)
    keep = labels != -100
    lq = torch.log_softmax(s.double() / 2.0, -1)[torch.arange(10), labels.clamp(min=0)]
    torch.testing.assert_close(st.student_label_logprob.double()[keep], lq[keep], rtol=1e-5, atol=1e-6)
    assert math.isnan(st.student_label_logprob[3].item())
    # Hard labels: cross entropy of the raw student logits (temperature 1).
    ce = torch.nn.functional.cross_entropy(s.double(), labels.clamp(min=0), reduction="none")
    expected = torch.where(keep, 0.75 * div + 0.25 * ce, 0.0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_vocabulary_mismatch_needs_opt_in_and_pads_with_zero_probability():
    s = logits(4, 100, 3.0, seed=13).requires_grad_(True)
    t = logits(4, 96, 3.0, seed=14)
    with pytest.raises(ValueError, match="allow_vocab_mismatch"):
        losses.forward_kl(s, t)
    got = losses.forward_kl(s, t, allow_vocab_mismatch=True, reduction="sum")
    t_pad = torch.cat([t, torch.full((4, 4), float("-inf"))], 1)
    assert got.item() == pytest.approx(losses.forward_kl(s, t_pad, reduction="sum").item(), rel=1e-6)


def test_standardize_and_temperature_squared():
    s = logits(6, 120, 10.0, seed=15).requires_grad_(True)
    t = logits(6, 120, 2.0, seed=16) + 7.0
    got = losses.forward_kl(s, t, standardize=True, temperature=2.0, scale_by_temperature_squared=True)
    got.backward()
    s64 = s.detach().double().requires_grad_(True)
    ref = 4.0 * ref_divergence(s64, t, "forward_kl", temperature=2.0, standardize=True).mean()
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert rel_err(s.grad, s64.grad) < 1e-4


def test_empty_input_and_teacher_gets_no_gradient():
    s = torch.empty(0, 50, requires_grad=True)
    assert losses.forward_kl(s, torch.empty(0, 50)).item() == 0.0
    s = logits(3, 50, seed=17).requires_grad_(True)
    t = logits(3, 50, seed=18).requires_grad_(True)
    losses.generalized_jsd(s, t).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(divergence="kl"), "divergence"),
        (dict(beta=1.5), "beta"),
        (dict(alpha=-0.1), "alpha"),
        (dict(temperature=0.0), "temperature"),
        (dict(reduction="avg"), "reduction"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), "labels"),
        (dict(labels=torch.zeros(4)), "labels"),
        (dict(hard_label_weight=0.5), "labels"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    s, t = logits(4, 10, seed=19), logits(4, 10, seed=20)
    with pytest.raises((ValueError, TypeError), match=name):
        losses.distill_loss(s, t, **kwargs)


def test_bad_tensors_name_themselves():
    s = logits(4, 10, seed=21)
    with pytest.raises(ValueError, match="teacher_logits"):
        losses.forward_kl(s, logits(5, 10))
    with pytest.raises(TypeError, match="teacher_logits"):
        losses.forward_kl(s, logits(4, 10).double())
    bad = s.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="student_logits contains NaN"):
        losses.forward_kl(bad, logits(4, 10))
    with pytest.raises(ValueError, match="teacher_logits contains NaN"):
        losses.forward_kl(s, bad)
    nan_weight = torch.ones(4)
    nan_weight[3] = float("nan")
    for loss in (lambda w: losses.forward_kl(s, logits(4, 10), weights=w),  # fused backward and two-pass paths
                 lambda w: losses.forward_kl(s.requires_grad_(True), logits(4, 10), weights=w),
                 lambda w: dpkd.taid_loss(s, logits(4, 10), 0.5, weights=w),
                 lambda w: dpkd.fused_linear_distill_loss(s, torch.eye(10), logits(4, 10), torch.eye(10), weights=w)):
        with pytest.raises(ValueError, match=r"weights contain NaN or inf \(first at flattened token 3\)"):
            loss(nan_weight)
    assert losses.forward_kl(s, logits(4, 10), weights=nan_weight, check_finite=False).isnan()  # DP: not raised
    ignored = torch.tensor([1, 2, 3, -100])  # a NaN weight where no loss is taken is not read
    assert losses.forward_kl(s, logits(4, 10), weights=nan_weight, labels=ignored).isfinite()
    with pytest.raises(ValueError, match="weights contain NaN"):  # a top-k teacher's too
        dpkd.fused_linear_distill_loss(s, torch.eye(10), teacher_topk=(torch.zeros(4, 1, dtype=torch.long),
                                                                       torch.zeros(4, 1)), weights=nan_weight)
    s = s.detach()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\) or ignore_index \(-100\), got 10 \(first in "
                                         r"row 2\)"):
        losses.forward_kl(s, logits(4, 10), labels=torch.tensor([1, -100, 10, 11]))


def test_torch_compile_fullgraph_has_no_graph_break():
    s = logits(8, 300, 3.0, seed=22).requires_grad_(True)
    t = logits(8, 300, 3.0, seed=23)

    def step(s, t):
        return dpkd.distill_loss(s, t, divergence="jsd", beta=0.4, temperature=1.5)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(s, t)
    loss.backward()
    s2 = s.detach().clone().requires_grad_(True)
    eager = step(s2, t)
    eager.backward()
    assert loss.item() == pytest.approx(eager.item(), rel=1e-6)
    torch.testing.assert_close(s.grad, s2.grad)


def test_taid_loss_is_cross_entropy_to_interpolated_target_with_stop_gradient():
    s = logits(7, 90, 3.0, seed=24).requires_grad_(True)
    t = logits(7, 90, 3.0, seed=25)
    for mix in (0.0, 0.4, 1.0):
        s.grad = None
        got = dpkd.taid_loss(s, t, mix, temperature=1.5)
        got.backward()
        target = torch.softmax(((1 - mix) * s.detach().double() + mix * t.double()) / 1.5, -1)
        s64 = s.detach().double().requires_grad_(True)
        ref = -(target * torch.log_softmax(s64 / 1.5, -1)).sum(-1).mean()
        ref.backward()
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)
        assert rel_err(s.grad, s64.grad) < 1e-5


@pytest.mark.parametrize("hard_label_weight", [0.0, 0.3])
@pytest.mark.parametrize("scale_by_temperature_squared", [False, True])
def test_taid_loss_options_match_float64(hard_label_weight, scale_by_temperature_squared):
    # (1 - w) T^2 TAID + w cross_entropy(labels), as distill_loss mixes its divergence; statistics of the same pass.
    s = logits(6, 50, 3.0, seed=61).requires_grad_(True)
    t = logits(6, 50, 3.0, seed=62)
    labels = torch.randint(0, 50, (6,), generator=torch.Generator().manual_seed(63))
    labels[2] = -100
    temp, mix = 1.7, 0.4
    got, st = dpkd.taid_loss(s, t, mix, temperature=temp, labels=labels, hard_label_weight=hard_label_weight,
                             scale_by_temperature_squared=scale_by_temperature_squared, return_stats=True)
    (g,) = torch.autograd.grad(got, s)
    s64 = s.detach().double().requires_grad_(True)
    target = torch.softmax(((1 - mix) * s64.detach() + mix * t.double()) / temp, -1)
    taid = -(target * torch.log_softmax(s64 / temp, -1)).sum(-1)
    ce = torch.nn.functional.cross_entropy(s64, labels.clamp(min=0), reduction="none")
    per = (temp**2 if scale_by_temperature_squared else 1.0) * (1 - hard_label_weight) * taid + hard_label_weight * ce
    ref = per[labels != -100].mean()
    (g64,) = torch.autograd.grad(ref, s64)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5) and rel_err(g, g64) < 1e-5
    q = torch.softmax(s64.detach() / temp, -1)
    valid = labels != -100
    torch.testing.assert_close(st.student_entropy[valid].double(), -(q * q.log()).sum(-1)[valid], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.teacher_entropy[valid].double(), -(target * target.log()).sum(-1)[valid],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("check_finite", [False, True])
def test_compiled_losses_flag_rows_with_nan_logits(check_finite):
    # The kernels' maxima pass over a NaN logit (forward KL's loss came out finite): compiled, where nothing can be
    # raised, the row's loss and gradient are NaN as in eager mode with check_finite=False, so DP drops its example.
    s, t = logits(4, 33, seed=53).requires_grad_(True), logits(4, 33, seed=54)
    t[2, 5] = float("nan")

    def loss(s, t):
        return dpkd.distill_loss(s, t, divergence="forward_kl", reduction="none", check_finite=check_finite)

    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(s, t)
    got.sum().backward()
    assert got[2].isnan() and got[[0, 1, 3]].isfinite().all()
    assert s.grad[2].isnan().any() and s.grad[[0, 1, 3]].isfinite().all()


def test_taid_loss_takes_check_finite_for_dp():
    """Under DP-SGD a loss must not raise per batch: with check_finite=False a row with a NaN teacher logit gets a
    NaN loss and gradient (the engine drops its example), the others those of the clean rows; by default it raises."""
    s, t = logits(4, 33, seed=51), logits(4, 33, seed=52)
    t[2, 5] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits contains NaN"):
        dpkd.taid_loss(s, t, 0.5)
    sd = s.clone().requires_grad_(True)
    loss = dpkd.taid_loss(sd, t, 0.5, reduction="none", check_finite=False)
    loss.sum().backward()
    assert loss[2].isnan() and loss[[0, 1, 3]].isfinite().all() and sd.grad[2].isnan().any()
    clean = s[[0, 1, 3]].clone().requires_grad_(True)
    expected = dpkd.taid_loss(clean, t[[0, 1, 3]], 0.5, reduction="none")
    expected.sum().backward()
    torch.testing.assert_close(loss[[0, 1, 3]], expected, rtol=1e-6, atol=0)
    assert_one_rounding_apart(sd.grad[[0, 1, 3]], clean.grad)


def test_taid_loss_refuses_a_vocabulary_mismatch_in_its_own_words():
    """From an audit: the error told the user to pass allow_vocab_mismatch=True, which taid_loss does not take."""
    with pytest.raises(ValueError, match=r"taid_loss needs equal vocabularies .* \(4, 33\) and .* \(4, 30\)"):
        dpkd.taid_loss(logits(4, 33, seed=53), logits(4, 30, seed=54), 0.5)


def test_taid_schedule_ramps_and_adapts():
    sched = dpkd.TAIDSchedule(total_steps=100)
    assert sched.t == 0.4
    ts = [sched.step(loss) for loss in [5.0 * 0.97**k for k in range(100)]]
    assert all(b >= a for a, b in zip(ts, ts[1:]))  # monotone
    assert ts[-1] == pytest.approx(1.0)
    # Improving loss makes t move at least as fast as the linear ramp; state round-trips.
    s2 = dpkd.TAIDSchedule(total_steps=100)
    s2.load_state_dict(sched.state_dict())
    assert s2.t == sched.t and s2.m == sched.m
    with pytest.raises(ValueError, match="t_start"):
        dpkd.TAIDSchedule(total_steps=10, t_start=0.9, t_end=0.5)


def test_taid_module_follows_its_schedule_and_the_formula():
    # t <- min(t_end, max(linear ramp, t + alpha sigmoid(m) (1 - t))), m the momentum of relative improvements
    module = dpkd.nn.TAIDLoss(10, t_start=0.4, alpha=0.2, momentum=0.5, temperature=2.0)
    s, t = logits(4, 30, 2.0, seed=64), logits(4, 30, 2.0, seed=65)
    assert module(s, t).item() == pytest.approx(dpkd.taid_loss(s, t, 0.4, temperature=2.0).item(), rel=1e-6)
    tt, m, prev = 0.4, 0.0, None
    for k, loss in enumerate([4.0, 3.0, 2.8, 3.5], start=1):
        if prev is not None:
            m = 0.5 * m + 0.5 * (prev - loss) / (prev + 1e-8)
        prev = loss
        tt = min(1.0, max(0.4 + 0.6 * k / 10, tt + 0.2 / (1 + math.exp(-m)) * (1 - tt)))
        with warnings.catch_warnings():  # the live loss, as in a training loop: no warning about its graph
            warnings.simplefilter("error")
            assert module.step(torch.tensor(loss, requires_grad=True)) == pytest.approx(tt, rel=1e-12)
    restored = dpkd.nn.TAIDLoss(10)
    restored.load_state_dict(module.state_dict())
    assert restored.schedule.t == module.schedule.t and restored.schedule.m == module.schedule.m
    # A NaN batch measures no improvement: the momentum stays, the ramp alone moves t
    assert module.step(float("nan")) == pytest.approx(max(0.4 + 0.6 * 5 / 10, tt))
    assert module.schedule.m == pytest.approx(m)
    with pytest.raises(TypeError, match="unknown options"):
        dpkd.nn.TAIDLoss(10, betta=0.3)
    for bad, name in ((dict(temperature=-1.0), "temperature"), (dict(reduction="bogus"), "reduction"),
                      (dict(hard_label_weight=2.0), "hard_label_weight")):
        with pytest.raises(ValueError, match=name):  # at construction, as the other modules
            dpkd.nn.TAIDLoss(10, **bad)


def test_nn_modules_match_functions():
    s = logits(5, 40, 2.0, seed=26)
    t = logits(5, 40, 2.0, seed=27)
    assert dpkd.nn.GeneralizedJSDLoss(beta=0.2, temperature=2.0)(s, t).item() == pytest.approx(
        dpkd.generalized_jsd(s, t, beta=0.2, temperature=2.0).item())
    assert dpkd.nn.DistillLoss("tvd")(s, t, reduction="sum").item() == pytest.approx(
        dpkd.tvd(s, t, reduction="sum").item())
    with pytest.raises(ValueError, match="divergence"):
        dpkd.nn.DistillLoss("l2")
    # Options are checked when the module is made, not at its first call.
    with pytest.raises(TypeError, match="temprature"):
        dpkd.nn.ForwardKLLoss(temprature=2.0)
    with pytest.raises(ValueError, match="beta"):
        dpkd.nn.GeneralizedJSDLoss(beta=2.0)
    with pytest.raises(TypeError, match=r"GeneralizedJSDLoss is divergence='jsd'.*DistillLoss\(divergence='tvd'\)"):
        dpkd.nn.GeneralizedJSDLoss(divergence="tvd")
    with pytest.raises(ValueError, match="temperature"):
        dpkd.nn.DistillLoss("tvd", temperature=float("inf"))
    with pytest.raises(TypeError, match="fp32_logitz"):
        dpkd.nn.FusedLinearDistillLoss(fp32_logitz=True)


def test_semantics_of_pytorch_kldiv_and_liger_jsd_tvd():
    """Same numbers as torch.nn.KLDivLoss(log_target=True) (Liger's KL loss mirrors it) and Liger's documented
    JSD(beta) = beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q, P the teacher, averaged over
    non-ignored tokens, and TVD = 1/2 sum |P - Q| per token."""
    s, t = logits(12, 300, 3.0, seed=31), logits(12, 300, 3.0, seed=32)
    labels = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(4))
    labels[[2, 7]] = -100
    lq, lp = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    kl = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(lq, lp)
    assert dpkd.forward_kl(s, t, reduction="batchmean").item() == pytest.approx(kl.item(), rel=1e-5)
    beta = 0.3
    lm = torch.log(beta * lp.exp() + (1 - beta) * lq.exp())
    jsd = beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)
    keep = labels != -100
    got = dpkd.generalized_jsd(s, t, beta=beta, labels=labels, reduction="mean")
    assert got.item() == pytest.approx((jsd[keep].sum() / keep.sum()).item(), rel=1e-5)
    tvd = 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    torch.testing.assert_close(dpkd.tvd(s, t, reduction="none").double(), tvd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_the_gradient_over_the_logits(dtype):
    g = torch.Generator().manual_seed(33)
    h = torch.randn(6, 5, 16, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(300, 16, generator=g) * 0.5).to(dtype).requires_grad_(True)
    t = logits(30, 300, 3.0, dtype, seed=34).reshape(6, 5, 300)
    grads = []
    for inplace in (False, True):
        h.grad = w.grad = None
        z = h @ w.t()
        dpkd.generalized_jsd(z, t, beta=0.3, temperature=1.5, standardize=True, inplace_backward=inplace,
                             fuse_backward=False).backward()  # the same separate backward, in place or not
        grads.append((h.grad.clone(), w.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="non-leaf"):
        dpkd.forward_kl(logits(3, 10, seed=35).requires_grad_(True), logits(3, 10, seed=36), inplace_backward=True)


@pytest.mark.parametrize("div", DIVS)
def test_teacher_gradient_for_self_distillation(div):
    s = logits(7, 301, 3.0, seed=37).requires_grad_(True)
    t = logits(7, 301, 3.0, seed=38).requires_grad_(True)
    labels = torch.randint(0, 301, (7,), generator=torch.Generator().manual_seed(5))
    labels[2] = -100
    kw = dict(divergence=div, beta=0.3, alpha=0.2, temperature=1.5, standardize=True, hard_label_weight=0.25,
              labels=labels)
    dpkd.distill_loss(s, t, teacher_grad=True, **kw).backward()
    s64, t64 = s.detach().double().requires_grad_(True), t.detach().double().requires_grad_(True)
    keep = labels != -100
    div_ref = ref_divergence(s64, t64, div, beta=0.3, alpha=0.2, temperature=1.5, standardize=True)
    ce = torch.nn.functional.cross_entropy(s64, labels.clamp(min=0), reduction="none")
    (((0.75 * div_ref + 0.25 * ce) * keep).sum() / keep.sum()).backward()
    assert rel_err(t.grad, t64.grad) < 1e-4
    assert rel_err(s.grad, s64.grad) < 1e-4
    # Off by default.
    t.grad = None
    dpkd.distill_loss(s, t, **kw).backward()
    assert t.grad is None


def test_teacher_gradient_with_a_smaller_teacher_vocabulary():
    """A label of the student's vocabulary past the teacher's is valid (it was range-checked against the teacher's
    in the teacher's gradient); the hard-label term does not reach the teacher, so its gradient ignores the label."""
    s = logits(4, 10, seed=39).requires_grad_(True)
    t = logits(4, 9, seed=40)
    grads = []
    for label in (9, 0):
        tt = t.clone().requires_grad_(True)
        dpkd.distill_loss(s, tt, divergence="jsd", labels=torch.tensor([label, 1, -100, 2]), hard_label_weight=0.5,
                          allow_vocab_mismatch=True, teacher_grad=True).backward()
        grads.append(tt.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert grads[0][0].abs().sum() > 0 and (grads[0][2] == 0).all()


def test_backward_ops_check_their_own_inputs():
    s, t = logits(3, 8, seed=41), logits(3, 8, seed=42)
    options = ("forward_kl", 0.5, 0.1, 1.0, 1.0, False, 0.0, -100)
    _, _, state = torch.ops.dpkd.distill_forward(s, t, None, *options)
    for grad_loss, row_state, match in ((torch.ones(1), state, r"grad_loss must be a floating tensor of shape \[3\]"),
                                        (torch.ones(3, dtype=torch.long), state, "grad_loss must be a floating"),
                                        (torch.ones(3), state[:, :5], r"row_state must be float32 of shape \[3, 16\]"),
                                        (torch.ones(3), state.double(), "row_state must be float32")):
        with pytest.raises(ValueError, match=match):
            torch.ops.dpkd.distill_backward(grad_loss, s, t, None, row_state, *options)
    shared = logits(1, 8, seed=43).expand(3, 8)  # every row the same storage: in place, they would race
    with pytest.raises(ValueError, match="rows do not overlap"):
        torch.ops.dpkd.distill_backward_(torch.ones(3), shared, t, None, state, *options)
    with pytest.raises(ValueError, match="rows that do not overlap"):  # refused before the forward pass too
        dpkd.distill_loss((logits(1, 8, seed=43).requires_grad_(True) + 0).expand(3, 8), t, inplace_backward=True)
    loss, _, state = torch.ops.dpkd.distill_forward(s.requires_grad_(True), t, None, *options, fast_math=True)
    with pytest.raises(RuntimeError, match=r"distill_forward\(fast_math=True\) has no backward"):
        loss.sum().backward()


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_gradient_from_forward_equals_separate_backward(reduction):
    """fuse_backward (gradient written by the forward op, scaled by the upstream gradient) against the
    separate backward op, with labels, a mask, weights, hard labels and T^2 scaling."""
    s, t = logits(2 * 5, 301, seed=11), logits(2 * 5, 301, seed=12)
    s, t = s.reshape(2, 5, 301), t.reshape(2, 5, 301)
    labels = torch.randint(0, 301, (2, 5), generator=torch.Generator().manual_seed(0))
    labels[0, 1] = -100
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3] = False
    weights = torch.rand(2, 5, generator=torch.Generator().manual_seed(1))
    kw = dict(divergence="skew_kl", labels=labels, mask=mask, weights=weights, reduction=reduction, temperature=1.5,
              hard_label_weight=0.2, scale_by_temperature_squared=True)
    results = []
    for fuse in (False, True):
        sd = s.clone().requires_grad_(True)
        loss = dpkd.distill_loss(sd, t, fuse_backward=fuse, **kw)
        (loss * 0.37).backward()
        results.append((loss.detach(), sd.grad))
    # The fused op keeps each row's probabilities from its forward for the backward (one rounding apart).
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    assert_one_rounding_apart(results[1][1], results[0][1])
    assert results[1][1][0, 1].abs().max() == 0 and results[1][1][1, 3].abs().max() == 0


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_temperature_squared_scales_the_divergence_not_the_hard_label_term(fuse, w):
    """Hinton et al.: T^2 (1 - w) D + w CE, CE of the student at temperature 1."""
    s, t = logits(12, 301, seed=21).requires_grad_(True), logits(12, 301, seed=22)
    labels = torch.randint(0, 301, (12,), generator=torch.Generator().manual_seed(3))
    got = dpkd.distill_loss(s, t, divergence="forward_kl", labels=labels, hard_label_weight=w, temperature=2.0,
                            scale_by_temperature_squared=True, fuse_backward=fuse)
    got.backward()
    sd = s.detach().double().requires_grad_(True)
    d = ref_divergence(sd / 2.0, t.double() / 2.0, "forward_kl")
    ce = torch.nn.functional.cross_entropy(sd, labels, reduction="none")
    ref = (4.0 * (1 - w) * d + w * ce).mean()
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert rel_err(s.grad, sd.grad) < 1e-5


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("empty", ["student", "teacher", "both"])
def test_rows_without_a_finite_logit(div, empty):
    """A row where the student, the teacher or both have only -inf logits is reported by name, fused or not; the
    ops themselves (the fused one keeps each row's probabilities for its backward) agree on it with the separate
    forward and backward, loss and gradient, NaN where NaN."""
    s, t = logits(6, 301, seed=15), logits(6, 301, seed=16)
    name = empty_row(s, t, empty)
    for fuse in (True, False):
        with pytest.raises(ValueError, match=f"{name} .*row without a finite logit.*row 1"):
            dpkd.distill_loss(s.clone().requires_grad_(True), t, divergence=div, fuse_backward=fuse)
    labels = torch.randint(0, 301, (6,), generator=torch.Generator().manual_seed(17))
    weight = torch.rand(6, generator=torch.Generator().manual_seed(18))
    for lab, options in ((None, (div, 0.3, 0.2, 1.0, 1.0, False, 0.0, -100)),
                         (labels, (div, 0.3, 0.2, 1.5, 1.0, False, 0.3, -100))):
        loss_f, stats_f, grad_f = torch.ops.dpkd.distill_forward_grad(s, t, lab, weight, *options)
        loss_s, stats_s, state = torch.ops.dpkd.distill_forward(s, t, lab, *options, False)
        grad_s = torch.ops.dpkd.distill_backward(weight, s, t, lab, state, *options)
        logit_scale = max(x.nan_to_num(0.0, 0.0, 0.0).abs().max().item() for x in (s, t))  # entropies: lse - sum p y
        assert_one_rounding_apart(loss_f, loss_s, logit_scale)
        assert_one_rounding_apart(stats_f, stats_s, logit_scale)
        assert_one_rounding_apart(grad_f, grad_s)
        assert torch.isnan(stats_f[1, 0 if name == "student_logits" else 1])
        # no distribution, no divergence: NaN where the report is skipped (torch.compile), for every objective
        assert torch.isnan(loss_f[1]) and torch.isnan(loss_s[1]) and torch.isnan(stats_f[1, 2])
        assert torch.isfinite(loss_f[torch.arange(6) != 1]).all()


def test_tokens_without_weight_are_skipped_by_the_fused_loss():
    """The fused path computes nothing for tokens without weight: their statistics are NaN, their logits are
    not checked (NaN in a padded row is no error), and loss and gradient equal the unfused path's."""
    s, t = logits(6, 301, seed=13), logits(6, 301, seed=14)
    mask = torch.tensor([True, False, True, True, False, True])
    fused, unfused = [], []
    for fuse, out in ((True, fused), (False, unfused)):
        sd = s.clone().requires_grad_(True)
        loss, stats = dpkd.generalized_jsd(sd, t, mask=mask, fuse_backward=fuse, return_stats=True)
        loss.backward()
        out.extend([loss.detach(), torch.stack(list(stats), -1), sd.grad])
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-6, atol=0)
    assert torch.isnan(fused[1][~mask]).all() and not torch.isnan(unfused[1][~mask][:, :3]).any()  # no labels
    assert_one_rounding_apart(fused[1][mask], unfused[1][mask], max(s.abs().max().item(), t.abs().max().item()))
    assert_one_rounding_apart(fused[2], unfused[2])
    s[1, 7] = t[4, 3] = float("nan")  # padded rows with garbage
    sd = s.clone().requires_grad_(True)
    dpkd.generalized_jsd(sd, t, mask=mask).backward()
    assert torch.isfinite(sd.grad).all() and (sd.grad[~mask] == 0).all()
    # The same rows without a gradient (evaluation), per token, weighted, ignored by label, and in TAID and
    # token_stats: no loss, so no report (a padded row of -inf logits is no error either).
    s[1] = float("-inf")
    labels = torch.where(mask, torch.arange(6), torch.full((6,), -100))
    weights = mask.double()
    for call in (lambda: dpkd.generalized_jsd(s, t, mask=mask), lambda: dpkd.generalized_jsd(s, t, labels=labels),
                 lambda: dpkd.generalized_jsd(s, t, weights=weights, reduction="none"),
                 lambda: dpkd.generalized_jsd(s, t, mask=mask, fuse_backward=False, reduction="none"),
                 lambda: dpkd.taid_loss(s, t, t=0.5, mask=mask), lambda: dpkd.token_stats(s, t, labels=labels)):
        out = call()
        assert all(torch.isfinite(x[mask]).all() for x in (out if isinstance(out, tuple) else [out]) if x.dim())
    s[0, 7] = float("nan")  # a row that counts
    with pytest.raises(ValueError, match=r"student_logits contains NaN .* row 0"):
        dpkd.generalized_jsd(s.clone().requires_grad_(True), t, mask=mask)
    with pytest.raises(ValueError, match=r"student_logits contains NaN .* row 0"):
        dpkd.generalized_jsd(s, t, mask=mask)


def test_weight_zero_rows_carry_nothing_in_the_reduction():
    """Where the NaN report is skipped (torch.compile) the reduction itself keeps a weight-0 row's NaN loss (a
    padded row of -inf logits) out of the total: 0 * NaN would be NaN."""
    per_token = torch.tensor([1.0, float("nan"), 2.0])
    weights = torch.tensor([0.5, 0.0, 2.0])
    for reduction, expected in (("sum", 4.5), ("mean", 1.5), ("batchmean", 1.5)):
        assert float(losses._reduce(per_token, None, weights, reduction)) == expected
    assert losses._reduce(per_token, None, weights, "none").tolist() == [0.5, 0.0, 4.0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and dpkd.with_cuda), reason="needs CUDA"))])
@pytest.mark.parametrize("v", [301, 50304])
def test_tokens_of_weight_zero_holding_nan_carry_nothing(device, v):
    """weights = 0 (not a mask) on rows holding NaN: loss and gradient equal those of the other rows alone, on
    the CPU (whose kernel skips such rows) and on CUDA (whose one-block kernels compute them, to be discarded)."""
    s, t = logits(6, v, seed=21).to(device), logits(6, v, seed=22).to(device)
    weights = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.0, 1.5], device=device)
    keep = weights != 0
    s[1, 3] = t[4, 0] = float("nan")
    grads, totals = [], []
    for rows, w in ((slice(None), weights), (keep, weights[keep])):
        sd = s[rows].clone().requires_grad_(True)
        loss = dpkd.generalized_jsd(sd, t[rows], weights=w, reduction="sum")
        loss.backward()
        totals.append(loss.detach())
        grads.append(sd.grad)
    assert torch.isfinite(totals[0])
    torch.testing.assert_close(totals[0], totals[1], rtol=1e-6, atol=0)
    assert_one_rounding_apart(grads[0][keep], grads[1])
    assert (grads[0][~keep] == 0).all()


@pytest.mark.parametrize("who", ["student", "teacher"])
@pytest.mark.parametrize("reduction", ["none", "sum"])  # the two-pass path; the gradient from the forward kernel
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and dpkd.with_cuda), reason="needs CUDA"))])
def test_unchecked_nan_logit_gives_its_row_a_nan_loss_and_gradient(who, reduction, device):
    """check_finite=False (under DP-SGD): a NaN logit, which the kernels' maxima pass over, still makes its row's
    loss and gradient NaN (so the DP engine drops that example); the other rows are those of a clean batch.
    Padding rows (ignore_index) that hold NaN stay out of it."""
    s, t = logits(5, 301, seed=31).to(device), logits(5, 301, seed=32).to(device)
    (s if who == "student" else t)[2, 7] = float("nan")
    s[4, 0] = t[4, 1] = float("nan")
    labels = torch.tensor([1, 2, 3, 4, -100], device=device)
    sd = s.clone().requires_grad_(True)
    loss = dpkd.distill_loss(sd, t, divergence="jsd", labels=labels, reduction=reduction, check_finite=False)
    loss.sum().backward()
    assert sd.grad[2].isnan().any() and not loss.sum().isfinite()
    if reduction == "none":
        assert loss[2].isnan() and loss[[0, 1, 3, 4]].isfinite().all()
    keep = [0, 1, 3]
    clean = s[keep].clone().requires_grad_(True)
    dpkd.distill_loss(clean, t[keep], divergence="jsd", labels=labels[keep], reduction=reduction).sum().backward()
    assert_one_rounding_apart(sd.grad[keep], clean.grad)
    assert (sd.grad[4] == 0).all()


@pytest.mark.parametrize("fill", [float("nan"), float("-inf")])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_unchecked_row_without_a_finite_logit_gets_a_nan_gradient_too(fill, reduction):
    """A student (or teacher) row with no finite logit: the kernels write it a zero gradient whatever multiplies it,
    so the NaN of an unchecked row is put into it after the kernel (a review found the example kept training);
    the teacher's gradient likewise under teacher_grad."""
    for who in ("student", "teacher"):
        s, t = logits(4, 33, seed=41), logits(4, 33, seed=42)
        (s if who == "student" else t)[1] = fill
        sd, td = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        loss = dpkd.distill_loss(sd, td, divergence="jsd", reduction=reduction, check_finite=False, teacher_grad=True,
                                 fuse_backward=False)
        loss.sum().backward()
        assert sd.grad[1].isnan().any() and td.grad[1].isnan().any(), who
        assert sd.grad[[0, 2, 3]].isfinite().all() and td.grad[[0, 2, 3]].isfinite().all()


def test_fast_math_is_a_cuda_option_the_cpu_ignores():
    """distill_forward_grad's fast_math picks the CUDA kernels' hardware exp2/log2 for fp32 logits; the CPU's
    vectorised math is accurate either way, so the CPU results are the same bits."""
    s, t = logits(5, 301, seed=26), logits(5, 301, seed=27)
    args = (torch.rand(5, generator=torch.Generator().manual_seed(28)), "jsd", 0.3, 0.2, 0.7, 1.0, False, 0.0, -100)
    fast, accurate = (torch.ops.dpkd.distill_forward_grad(s, t, None, *args, fast_math=f) for f in (True, False))
    for a, b in zip(fast, accurate):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_forward_grad_writes_a_16_bit_gradient_of_fp32_logits_under_fast_math():
    """grad_dtype (the fused head's fp32 logits of 16-bit factors): the same gradient rounded to bf16 / fp16; any
    other combination is refused, naming the argument."""
    s, t = logits(5, 301, seed=26), logits(5, 301, seed=27)
    args = (torch.rand(5, generator=torch.Generator().manual_seed(28)), "jsd", 0.3, 0.2, 0.7, 1.0, False, 0.0, -100)
    full = torch.ops.dpkd.distill_forward_grad(s, t, None, *args, fast_math=True)
    for dtype in (torch.bfloat16, torch.float16):
        out = torch.ops.dpkd.distill_forward_grad(s, t, None, *args, fast_math=True, grad_dtype=dtype)
        assert out[2].dtype == dtype and torch.equal(out[2], full[2].to(dtype))
        assert torch.equal(out[0], full[0])
    with pytest.raises(ValueError, match="grad_dtype"):
        torch.ops.dpkd.distill_forward_grad(s, t, None, *args, grad_dtype=torch.bfloat16)  # without fast_math
    with pytest.raises(ValueError, match="grad_dtype"):
        torch.ops.dpkd.distill_forward_grad(s.bfloat16(), t.bfloat16(), None, *args, fast_math=True,
                                            grad_dtype=torch.float32)
    fake = torch.library.opcheck(torch.ops.dpkd.distill_forward_grad.default, (s, t, None, *args),
                                 {"fast_math": True, "grad_dtype": torch.bfloat16},
                                 test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in fake.values()), fake


@pytest.mark.parametrize("fuse", [True, False])
def test_reductions_copy_nothing_from_the_host(fuse):
    """A tensor built from host data (torch.tensor(n, device="cuda")) is a copy that synchronises the CUDA stream:
    the reductions' weights and counts are formed on the device. Checked here through the ops dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    s, t = logits(6, 301, seed=23), logits(6, 301, seed=24)
    labels = torch.randint(0, 301, (6,), generator=torch.Generator().manual_seed(25))
    labels[2] = -100
    for kw in (dict(reduction="mean"), dict(reduction="mean", labels=labels), dict(reduction="batchmean"),
               dict(reduction="sum", weights=torch.rand(6), labels=labels)):
        sd = s.clone().requires_grad_(True)
        with Record() as record:
            dpkd.generalized_jsd(sd, t, fuse_backward=fuse, **kw).backward()
        assert "dpkd.distill_forward_grad.default" in record.ops or not fuse
        assert "aten.lift_fresh.default" not in record.ops, kw  # what torch.tensor(host data) dispatches


def test_gradient_from_forward_is_used_once_and_skipped_without_grad():
    s, t = logits(4, 50, seed=1), logits(4, 50, seed=2)
    sd = s.clone().requires_grad_(True)
    loss = dpkd.generalized_jsd(sd, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="used up"):
        loss.backward()
    with torch.no_grad():
        assert dpkd.generalized_jsd(sd, t).grad_fn is None


def test_differentiable_weights_keep_their_gradient():
    s, t = logits(6, 40, seed=3), logits(6, 40, seed=4)
    w = torch.rand(6, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    sd = s.clone().requires_grad_(True)
    dpkd.forward_kl(sd, t, weights=w, reduction="sum").backward()
    torch.testing.assert_close(w.grad, dpkd.forward_kl(s, t, reduction="none").detach())


@pytest.mark.parametrize("fuse", [True, False])
def test_a_second_derivative_raises_instead_of_vanishing(fuse):
    """create_graph=True: the kernels' gradient has no graph behind it; a gradient penalty on it must raise, not
    silently receive nothing."""
    s, t = logits(4, 50, seed=40).requires_grad_(True), logits(4, 50, seed=41)
    loss = dpkd.forward_kl(s, t, fuse_backward=fuse)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError, match="no derivative of their own"):
        (loss + g.pow(2).sum()).backward()
    (plain,) = torch.autograd.grad(dpkd.forward_kl(s, t, fuse_backward=fuse), s)
    torch.testing.assert_close(g.detach(), plain)


@pytest.mark.parametrize("fuse", [True, False])
def test_a_penalty_differentiated_for_an_upstream_parameter_raises(fuse):
    """The penalty alone, differentiated for a weight upstream of the logits (torch.autograd.grad prunes what does
    not lead there): was None with allow_unused=True, and without it a misleading "not used in the graph"."""
    x = logits(6, 4, seed=42)
    w = logits(4, 9, seed=43).requires_grad_(True)
    loss = dpkd.forward_kl(x @ w, logits(6, 9, seed=44), reduction="batchmean", fuse_backward=fuse)
    (gw,) = torch.autograd.grad(loss, w, create_graph=True)
    with pytest.raises(RuntimeError, match="no derivative of their own"):
        torch.autograd.grad(gw.pow(2).sum(), w, allow_unused=True)
