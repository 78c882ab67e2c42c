"""The CUDA kernels against the float64 reference and the CPU kernels (skipped without a GPU;
benchmarks/gpu.sh runs them on the lent GPU)."""

from __future__ import annotations

import pytest
import torch

import dpkd
from reference import divergence as ref_divergence

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and dpkd.with_cuda),
                                reason="needs a GPU and dpkd built with CUDA")

DIVS = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def pair(n, v, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    return s, t


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
@pytest.mark.parametrize("n,v", [(1, 7), (33, 5003), (4, 128256)])
@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_cuda_matches_reference(div, dtype, tol, n, v, temperature):
    s, t = pair(n, v, 4.0, dtype, seed=n + v)
    s_gpu = s.cuda().requires_grad_(True)
    kw = dict(temperature=temperature, beta=0.3, alpha=0.2)
    loss = dpkd.distill_loss(s_gpu, t.cuda(), divergence=div, reduction="sum", **kw)
    loss.backward()
    s64 = s.double().requires_grad_(True)
    ref = ref_divergence(s64, t.double(), div, **kw).sum()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item()) + 1e-5
    err = (s_gpu.grad.double().cpu() - s64.grad).norm() / s64.grad.norm().clamp(min=1e-6)
    assert err <= tol
    assert s_gpu.grad.dtype == dtype


@pytest.mark.parametrize("div", DIVS)
def test_cuda_matches_cpu_with_every_option(div):
    s, t = pair(12, 3001, 6.0, torch.float32, seed=7)
    t[:, -50:] = float("-inf")
    s[:, -50:] = float("-inf")
    labels = torch.randint(0, 2900, (12,), generator=torch.Generator().manual_seed(3))
    labels[4] = -100
    kw = dict(divergence=div, temperature=1.5, standardize=True, hard_label_weight=0.3, labels=labels,
              reduction="sum", return_stats=True)
    results = []
    for device in ("cpu", "cuda"):
        sd = s.to(device).requires_grad_(True)
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
