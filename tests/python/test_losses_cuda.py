"""The CUDA kernels against the float64 reference and the CPU kernels (skipped without a GPU;
benchmarks/gpu.sh runs them on the lent GPU)."""

from __future__ import annotations

import pytest
import torch

import dpkd
from reference import divergence as ref_divergence
from reference import empty_row

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and dpkd.with_cuda),
                                reason="needs a GPU and dpkd built with CUDA")

DIVS = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def pair(n, v, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    return s, t


# V = 5003, 7 and 128257 take the one-block-per-row kernels (128257: peaked rows, where fp32 needs g_ref);
# multiples of 8 the Hopper cluster kernel (50304 fills its last block partly, 128256 in fp32 needs a
# 16-block cluster). fuse: gradient written by the forward.
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
@pytest.mark.parametrize("n,v", [(1, 7), (33, 5003), (3, 50304), (4, 128256), (2, 128257)])
@pytest.mark.parametrize("temperature", [0.7, 2.0])
@pytest.mark.parametrize("fuse", [True, False])
def test_cuda_matches_reference(div, dtype, tol, n, v, temperature, fuse):
    s, t = pair(n, v, 4.0, dtype, seed=n + v)
    s_gpu = s.cuda().requires_grad_(True)
    kw = dict(temperature=temperature, beta=0.3, alpha=0.2)
    loss = dpkd.distill_loss(s_gpu, t.cuda(), divergence=div, reduction="sum", fuse_backward=fuse, **kw)
    loss.backward()
    s64 = s.double().requires_grad_(True)
    ref = ref_divergence(s64, t.double(), div, **kw).sum()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item()) + 1e-5
    err = (s_gpu.grad.double().cpu() - s64.grad).norm() / s64.grad.norm().clamp(min=1e-6)
    assert err <= tol
    assert s_gpu.grad.dtype == dtype


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("fuse", [True, False])
def test_cuda_matches_cpu_with_every_option(div, standardize, fuse):
    s, t = pair(12, 3008, 6.0, torch.float32, seed=7)
    t[:, -50:] = float("-inf")
    s[:, -50:] = float("-inf")
    labels = torch.randint(0, 2900, (12,), generator=torch.Generator().manual_seed(3))
    labels[4] = -100
    kw = dict(divergence=div, temperature=1.5, standardize=standardize, hard_label_weight=0.3, labels=labels,
              reduction="mean", return_stats=True, fuse_backward=fuse)
    results = []
    for device in ("cpu", "cuda"):
        sd = s.detach().to(device).requires_grad_(True)
        kwd = dict(kw, labels=labels.to(device))
        loss, stats = dpkd.distill_loss(sd, t.to(device), **kwd)
        loss.backward()
        results.append((loss.cpu(), [x.cpu() for x in stats], sd.grad.cpu()))
    (l_cpu, st_cpu, g_cpu), (l_gpu, st_gpu, g_gpu) = results
    torch.testing.assert_close(l_gpu, l_cpu, rtol=1e-4, atol=1e-5)
    for a, b in zip(st_gpu, st_cpu):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-3, atol=1e-6)


def test_cuda_extreme_logits_and_nan_report():
    s, t = pair(3, 1000, 3.0, torch.bfloat16, seed=9)
    s[0, 0], t[1, 1] = 1e4, -1e4
    loss = dpkd.generalized_jsd(s.cuda().requires_grad_(True), t.cuda())
    assert torch.isfinite(loss)
    s[2, 5] = float("nan")
    with pytest.raises(ValueError, match="student_logits"):
        dpkd.forward_kl(s.cuda(), t.cuda())
    s[2, 5] = 0.0
    for div in DIVS:  # V = 1000 takes the cluster kernel, V = 1001 the one-block-per-row one
        for v in (1000, 1001):
            bad_t = torch.nn.functional.pad(t, (0, v - 1000)).clone()
            bad_t[1, 7] = float("inf")
            with pytest.raises(ValueError, match="teacher_logits"):
                dpkd.distill_loss(torch.nn.functional.pad(s, (0, v - 1000)).cuda(), bad_t.cuda(), divergence=div)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("v", [32000, 32001])  # vectorised / cluster gradients, the one-block kernels' scalar path
def test_cuda_nan_logit_gets_the_cpus_gradient_and_labels_device_is_checked(fuse, v):
    s, t = pair(2, v, 3.0, torch.float32, seed=11)
    s[0, 5] = float("nan")
    grads = []
    for device in ("cpu", "cuda"):
        x = s.to(device).requires_grad_(True)
        dpkd.forward_kl(x, t.to(device), reduction="sum", check_finite=False, fuse_backward=fuse).backward()
        grads.append(x.grad.cpu())
    assert grads[0][0, 5] == 0 and grads[1][0, 5] == 0  # the NaN entry itself (NaN on some CUDA paths before)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-8)
    options = ("forward_kl", 0.5, 0.1, 1.0, 1.0, False, 0.0, -100)
    with pytest.raises(ValueError, match="labels is on cpu"):
        torch.ops.dpkd.distill_forward(s.cuda(), t.cuda(), torch.zeros(2, dtype=torch.long), *options)


@pytest.mark.parametrize("v", [1000, 1001])  # the cluster kernel, the one-block kernels
def test_cuda_jsd_log_form_keeps_nan_loss(v):
    """bf16 JSD (its log form, log m clamped away from 0): a row with a NaN or +inf teacher logit has a NaN loss on
    both ops, as on the CPU, not a finite one (which torch.compile, skipping the NaN report, would train on)."""
    s, t = pair(4, v, 3.0, torch.bfloat16, seed=v)
    t[2, 7], t[3, 9] = float("inf"), float("nan")
    args = ("jsd", 0.4, 0.1, 1.0, 1.0, False, 0.0, -100)
    for d in ("cpu", "cuda"):
        loss = torch.ops.dpkd.distill_forward(s.to(d), t.to(d), None, *args)[0]
        fused = torch.ops.dpkd.distill_forward_grad(s.to(d), t.to(d), None, torch.ones(4, device=d), *args)
        assert loss.isnan().tolist() == [False, False, True, True], d
        assert fused[0].isnan().tolist() == [False, False, True, True], d
        assert fused[2][:2].isfinite().all() and fused[2][2:].isnan().any(1).all(), d


@pytest.mark.parametrize("v", [8192, 8193])  # the cluster kernel, the one-block kernels
def test_cuda_kl_with_minus_inf_opposite_a_flushed_probability_matches_cpu(v):
    """A -inf logit of one model opposite an entry whose probability under the other flushes to 0 (a peaked row):
    the entry carries nothing, on every kernel as on the CPU. The cluster kernel's merge multiplied the +inf sum of
    such a thread by its flushed weight, 0 * inf = NaN, with finite entropies (no NaN report)."""
    peaked = torch.zeros(3, v)
    peaked[:, 0] = 200.0
    flat = torch.zeros(3, v)
    flat[:, 5] = float("-inf")
    for div, s, t in (("reverse_kl", peaked, flat), ("forward_kl", flat, peaked)):
        results = [dpkd.distill_loss(s.to(d), t.to(d), divergence=div, reduction="none", return_stats=True)
                   for d in ("cpu", "cuda")]
        (l_cpu, st_cpu), (l_gpu, st_gpu) = results
        assert torch.isfinite(l_cpu).all(), div
        torch.testing.assert_close(l_gpu.cpu(), l_cpu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st_gpu.divergence.cpu(), st_cpu.divergence, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [3001, 3008, 32000])  # 3001: the one-block kernels
def test_cuda_forward_grad_op_matches_cpu_with_teacher_mix(dtype, v):
    """The op itself, TAID mixing and hard labels included: every output on both devices."""
    s, t = pair(9, v, 3.0, dtype, seed=v)
    labels = torch.randint(0, v, (9,), generator=torch.Generator().manual_seed(1))
    labels[2] = -100
    weight = torch.rand(9, generator=torch.Generator().manual_seed(2))
    weight[5] = 0.0
    args = ("jsd", 0.4, 0.1, 1.7, 0.35, False, 0.25, -100)
    outs = [torch.ops.dpkd.distill_forward_grad(s.to(d), t.to(d), labels.to(d), weight.to(d), *args)
            for d in ("cpu", "cuda")]
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    # Both ops skip the row without weight: loss 0 and statistics NaN on both devices.
    for a, b in zip(outs[1][:2], outs[0][:2]):
        torch.testing.assert_close(a.cpu().float(), b.float(), equal_nan=True, **tol)
    assert outs[1][0][5] == 0 and outs[1][1][5].isnan().all()
    torch.testing.assert_close(outs[1][2].cpu().float(), outs[0][2].float(), **tol)
    assert outs[1][2][5].abs().max() == 0 and outs[1][2][2].abs().max() == 0


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [3001, 3008, 128256, 151936])  # one-block, 1- and 16-block clusters, one-block vectorised
def test_cuda_16_bit_gradient_of_fp32_logits(grad_dtype, v):
    """grad_dtype under fast_math: the kernels write the fp32 logits' gradient in 16 bits (8-byte stores of 4
    values), the same bits as the fp32 gradient rounded afterwards, hard labels and a skipped row included."""
    s, t = pair(6, v, 4.0, torch.float32, seed=v + 1)
    labels = torch.randint(0, v, (6,), generator=torch.Generator().manual_seed(v)).cuda()
    labels[1] = -100
    weight = torch.rand(6, generator=torch.Generator().manual_seed(5)).cuda()
    weight[4] = 0.0
    for div in DIVS:
        args = (div, 0.3, 0.2, 0.7, 1.0, False, 0.2, -100)
        full = torch.ops.dpkd.distill_forward_grad(s.cuda(), t.cuda(), labels, weight, *args, fast_math=True)
        out = torch.ops.dpkd.distill_forward_grad(s.cuda(), t.cuda(), labels, weight, *args, fast_math=True,
                                                  grad_dtype=grad_dtype)
        assert out[2].dtype == grad_dtype and torch.equal(out[2], full[2].to(grad_dtype)), div
        torch.testing.assert_close(out[0], full[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("n,v,standardize", [(33, 5003, False), (5, 3008, True), (4, 128256, False),
                                             (2, 151936, False)])
def test_cuda_fast_math_for_fp32_logits(div, n, v, standardize):
    """fast_math (the fused head's fp32 logits of bf16 factors): fp32 logits through the 16-bit kernels' hardware
    exp2/log2, on the one-block kernels (V = 5003, standardization; 151936, too long for a cluster: vectorised
    backward) and the 16-block fp32 cluster (V = 128256).
    Within 1e-3 of float64 (the bf16 gradient it serves rounds to 4e-3), and not the accurate path's result."""
    s, t = pair(n, v, 4.0, torch.float32, seed=n + 2 * v)
    weight = torch.rand(n, generator=torch.Generator().manual_seed(v), dtype=torch.float64)
    kw = dict(temperature=0.7, beta=0.3, alpha=0.2)
    args = (div, 0.3, 0.2, 0.7, 1.0, standardize, 0.0, -100)
    fast, accurate = (torch.ops.dpkd.distill_forward_grad(s.cuda(), t.cuda(), None, weight.float().cuda(), *args,
                                                          fast_math=f) for f in (True, False))
    leaf = s.double().requires_grad_(True)
    per_row = ref_divergence(leaf, t.double(), div, standardize=standardize, **kw)
    (per_row * weight).sum().backward()
    torch.testing.assert_close(fast[0].cpu().double(), per_row.detach(), rtol=1e-3, atol=1e-5)
    assert (fast[2].cpu().double() - leaf.grad).norm() <= 1e-3 * leaf.grad.norm()
    assert not torch.equal(fast[2], accurate[2])


def test_cuda_fused_gradient_scaled_by_upstream_and_used_once():
    s, t = pair(6, 32000, 4.0, torch.bfloat16, seed=3)
    grads = []
    for fuse, factor in ((False, 1.0), (True, 1.0), (True, 0.25)):
        sd = s.cuda().requires_grad_(True)
        (factor * dpkd.generalized_jsd(sd, t.cuda(), fuse_backward=fuse)).backward()
        grads.append(sd.grad.float() / factor)
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=1e-6)
    torch.testing.assert_close(grads[2], grads[0], rtol=2e-2, atol=1e-6)
    sd = s.cuda().requires_grad_(True)
    loss = dpkd.forward_kl(sd, t.cuda())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="used up"):
        loss.backward()


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("empty", ["student", "teacher", "both"])
@pytest.mark.parametrize("v", [3001, 3008])  # the one-block kernels, the cluster kernel
def test_cuda_rows_without_a_finite_logit_match_cpu(div, empty, v):
    """A row with only -inf logits (student, teacher or both) is reported as on the CPU, fused or not (its
    entropy is NaN); the other rows' loss, statistics and gradient are the CPU's."""
    s, t = pair(6, v, 3.0, torch.float32, seed=v)
    name = empty_row(s, t, empty)
    for fuse in (True, False):
        with pytest.raises(ValueError, match=f"{name} .*row without a finite logit.*row 1"):
            dpkd.distill_loss(s.cuda().requires_grad_(True), t.cuda(), divergence=div, fuse_backward=fuse)
    weight = torch.rand(6, generator=torch.Generator().manual_seed(18))
    options = (div, 0.3, 0.2, 1.5, 1.0, False, 0.0, -100)
    outs = []
    for d in ("cpu", "cuda"):
        sd, td, wd = s.to(d), t.to(d), weight.to(d)
        fused = torch.ops.dpkd.distill_forward_grad(sd, td, None, wd, *options)
        loss, stats, state = torch.ops.dpkd.distill_forward(sd, td, None, *options, False)
        outs.append([x.cpu() for x in (*fused, loss, stats, torch.ops.dpkd.distill_backward(wd, sd, td, None, state,
                                                                                            *options))])
    rows = torch.arange(6) != 1
    for a, b in zip(*outs):
        torch.testing.assert_close(b[rows], a[rows], rtol=1e-4, atol=1e-5, equal_nan=True)
    for stats in (outs[1][1], outs[1][4]):
        assert torch.isnan(stats[1, 0 if name == "student_logits" else 1]) and torch.isnan(stats[1, 2])
    assert torch.isnan(outs[1][0][1]) and torch.isnan(outs[1][3][1])  # the loss, fused and not
