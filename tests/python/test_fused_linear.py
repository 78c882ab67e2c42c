"""Fused linear-head distillation against the logits path with autograd through the matmuls."""

from __future__ import annotations

import pytest
import torch

import dpkd
from dpkd import fused_linear

# A GPU, where there is one, runs the CUDA path (mixed-precision matmuls, the CUDA kernels); gpu.sh -k cuda.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not (torch.cuda.is_available() and dpkd.with_cuda),
                                                                reason="needs a GPU and dpkd built with CUDA"))]


def setup(n=24, hs=12, ht=20, v=97, vt=None, dtype=torch.float32, seed=0, bias=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    h_s, w_s = r(n, hs).requires_grad_(True), (r(v, hs) * 0.5).requires_grad_(True)
    b_s = (r(v) * 0.1).requires_grad_(True) if bias else None
    h_t, w_t = r(n, ht), r(vt or v, ht) * 0.5
    return h_s, w_s, b_s, h_t, w_t


def reference(h_s, w_s, b_s, h_t, w_t, *, s_cap=None, t_cap=None, **kw):
    zs = h_s @ w_s.t() + (b_s if b_s is not None else 0)
    zt = h_t @ w_t.t()
    if s_cap:
        zs = s_cap * torch.tanh(zs / s_cap)
    if t_cap:
        zt = t_cap * torch.tanh(zt / t_cap)
    return dpkd.distill_loss(zs, zt.detach(), **kw)


def grads(loss, *ts):
    return torch.autograd.grad(loss, [t for t in ts if t is not None])


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_logits_path(divergence, reduction, device):
    h_s, w_s, b_s, h_t, w_t = setup(device=device)
    labels = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(1))
    labels[::5] = -100
    w = torch.rand(24, generator=torch.Generator().manual_seed(2))
    w[3] = 0.0
    labels, w = labels.to(device), w.to(device)
    kw = dict(divergence=divergence, temperature=1.5, labels=labels, weights=w, reduction=reduction,
              hard_label_weight=0.2)
    got = dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, student_bias=b_s, chunk_size=5, **kw)
    ref = reference(h_s, w_s, b_s, h_t, w_t, **kw)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(grads(got, h_s, w_s, b_s), grads(ref, h_s, w_s, b_s)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("teacher_vocab", [80, 97, 110])
def test_vocabulary_mismatch_logit_scales_ignore_index_and_statistics(teacher_vocab):
    # The vocabulary rule (missing columns have probability 0), a logit scale per model, another ignore_index, and
    # every statistic against the logits path's.
    h_s, w_s, b_s, h_t, w_t = setup(vt=teacher_vocab)
    labels = torch.randint(0, 80, (24,), generator=torch.Generator().manual_seed(3))
    labels[::4] = -1
    kw = dict(divergence="jsd", labels=labels, ignore_index=-1, hard_label_weight=0.1, temperature=1.3,
              allow_vocab_mismatch=True, return_stats=True)
    got, got_st = dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, student_bias=b_s, student_logit_scale=0.7,
                                                 teacher_logit_scale=1.5, chunk_size=7, **kw)
    zs = (h_s @ w_s.t() + b_s) * 0.7
    ref, ref_st = dpkd.distill_loss(zs, (h_t @ w_t.t() * 1.5).detach(), **kw)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(grads(got, h_s, w_s, b_s), grads(ref, h_s, w_s, b_s)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    valid = labels != -1
    for a, b in zip(got_st, ref_st):
        torch.testing.assert_close(a[valid], b[valid], rtol=1e-4, atol=1e-5)
        assert a[~valid].isnan().all()


def test_softcap_scale_and_3d_shapes_and_stats():
    h_s, w_s, b_s, h_t, w_t = setup(n=12, bias=False)
    h_s3 = h_s.reshape(3, 4, -1)
    got, st = dpkd.fused_linear_distill_loss(h_s3, w_s, h_t.reshape(3, 4, -1), w_t, divergence="jsd",
                                             student_softcap=5.0, teacher_softcap=3.0, return_stats=True)
    ref = reference(h_s, w_s, None, h_t, w_t, s_cap=5.0, t_cap=3.0, divergence="jsd")
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(grads(got, h_s, w_s), grads(ref, h_s, w_s)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert st.student_entropy.shape == (3, 4)


def test_unselected_tokens_enter_no_matmul_and_get_zero_gradient():
    h_s, w_s, b_s, h_t, w_t = setup(n=10)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 7]] = True
    calls = []
    orig = torch.Tensor.__matmul__

    def counting(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return orig(a, b)

    torch.Tensor.__matmul__ = counting
    try:
        loss = dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, mask=mask, reduction="sum")
    finally:
        torch.Tensor.__matmul__ = orig
    # Only the two selected tokens' rows ever meet a weight: no operand has all 10 token rows.
    assert calls and all(10 not in (sa[0], sb[0]) and 10 not in (sa[-1], sb[-1]) for sa, sb in calls)
    (g,) = torch.autograd.grad(loss, [h_s])
    assert (g[~mask] == 0).all() and (g[mask] != 0).any()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_gradients_at_bf16_rounding_with_fp32_logits(device):
    """16-bit weights: fp32 chunk logits and the weight gradient's low half put the head-weight and bias
    gradients at bf16's own rounding error (~1.7e-3) from a float64 reference; rounded bf16 logits miss it
    by 10x at this logit scale."""
    import reference

    h_s, w_s, b_s, h_t, w_t = setup(n=256, hs=64, ht=96, v=3000, dtype=torch.bfloat16, device=device)
    hs64, ws64, bs64 = (t.detach().double().requires_grad_(True) for t in (h_s, w_s, b_s))
    ref = reference.divergence(hs64 @ ws64.t() + bs64, h_t.double() @ w_t.double().t(), "jsd").mean()
    g_ref = torch.autograd.grad(ref, [hs64, ws64, bs64])
    errors = {}
    for fp32_logits in (None, False):
        got = dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, student_bias=b_s, divergence="jsd", chunk_size=48,
                                             fp32_logits=fp32_logits)
        if fp32_logits is None:  # CUDA: the 16-bit kernels' exp2/log2 (fast_math), ~1e-6 here, 3 ulp at worst
            assert abs(float(got) - float(ref)) < (1e-5 if device == "cuda" else 1e-6) * float(ref)
        g = torch.autograd.grad(got, [h_s, w_s, b_s])
        errors[fp32_logits] = [float((a.double() - b).norm() / b.norm()) for a, b in zip(g, g_ref)]
    err_h, err_w, err_b = errors[None]
    assert err_w < 2e-3 and err_b < 2e-3 and err_h < 3e-3, errors
    assert min(errors[False]) > 1e-2, errors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp32_logits", [None, False])
def test_fp16_gradients_under_a_mean_and_a_grad_scaler(device, fp32_logits):
    """fp16 heads under a mean over 4096 tokens: the logits' gradient (each entry ~ 1/4096 of a probability) is
    scaled into fp16's normal range, and the head's gradients stay fp32 until the upstream gradient is multiplied
    in. Without a loss scale the result is fp16's rounding of the exact gradient (it was 3-6x that); under a
    GradScaler's 65536 it is fp16-accurate (it was inf and NaN)."""
    import reference

    h_s, w_s, _, h_t, w_t = setup(n=4096, hs=32, ht=48, v=700, dtype=torch.float16, bias=False, device=device)
    hs64, ws64 = (t.detach().cpu().double().requires_grad_(True) for t in (h_s, w_s))
    ref = reference.divergence(hs64 @ ws64.t(), h_t.cpu().double() @ w_t.cpu().double().t(), "jsd").mean()
    g_ref = torch.autograd.grad(ref, [hs64, ws64])
    for grad_scale in (1.0, 65536.0):
        got = dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, divergence="jsd", chunk_size=1024,
                                             fp32_logits=fp32_logits)
        g = torch.autograd.grad(got * grad_scale, [h_s, w_s])
        for a, b in zip(g, g_ref):
            assert a.dtype == torch.float16
            err = float((a.cpu().double() / grad_scale - b).norm() / b.norm())
            own = float(((b * grad_scale).half().double() / grad_scale - b).norm() / b.norm())
            assert err < own * 1.01 + (5e-4 if fp32_logits is None else 3e-3), (grad_scale, err, own)
            if grad_scale != 1.0:
                assert err < (5e-4 if fp32_logits is None else 3e-3), err
    # fp16 accumulation of the head-weight gradient (fp32_weight_grad=False): the scale still multiplies in fp32
    got = dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, divergence="jsd", chunk_size=1024,
                                         fp32_logits=fp32_logits, fp32_weight_grad=False)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(got * 65536.0, [h_s, w_s]))


def test_labels_checked_once_per_call_not_once_per_chunk():
    """The op checks label ranges on the host (on CUDA a stream synchronisation per call) unless told that the
    caller did; the fused head checks the labels of the tokens that carry loss once and tells each chunk's op. An
    out-of-range label is an error there, and no error on a token without loss."""
    h_s, w_s, _, h_t, w_t = setup(n=64, bias=False)
    labels = torch.randint(0, 97, (64,), generator=torch.Generator().manual_seed(1))

    def host_reads(fn):
        with torch.profiler.profile() as prof:
            fn()
        return [e.name for e in prof.events()].count("aten::_local_scalar_dense")

    z, zt = h_s.detach() @ w_s.detach().t(), h_t @ w_t.t()
    args = (z, zt, labels, torch.ones(64), "jsd", 0.5, 0.1, 1.0, 1.0, False, 0.2, -100)
    assert host_reads(lambda: torch.ops.dpkd.distill_forward_grad(*args)) == 1
    assert host_reads(lambda: torch.ops.dpkd.distill_forward_grad(*args, labels_in_range=True)) == 0
    reads = {chunk: host_reads(lambda: dpkd.fused_linear_distill_loss(
        h_s, w_s, h_t, w_t, labels=labels, hard_label_weight=0.2, chunk_size=chunk)) for chunk in (8, 64)}
    assert reads[8] == reads[64] == 1, reads
    # a select rule's first pass (the forward op alone) is told too: no read per chunk
    assert host_reads(lambda: torch.ops.dpkd.distill_forward(*args[:3], *args[4:], labels_in_range=True)) == 0
    rule = lambda st, valid: dpkd.select.highest_surprisal(st.student_label_logprob, 0.5, valid=valid)  # noqa: E731
    reads = {chunk: host_reads(lambda: dpkd.fused_linear_distill_loss(
        h_s, w_s, h_t, w_t, labels=labels, select=rule, chunk_size=chunk)) for chunk in (8, 64)}
    assert reads[8] == reads[64], reads
    bad = labels.clone()
    bad[5] = 97
    with pytest.raises(ValueError, match=r"labels must be in \[0, 97\) or ignore_index \(-100\), got 97 \(first in "
                                         r"flattened token 5\)"):
        dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, labels=bad, chunk_size=8)
    mask = torch.ones(64, dtype=torch.bool)
    mask[5] = False
    dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, labels=bad, mask=mask, chunk_size=8)


def test_bad_arguments():
    h_s, w_s, b_s, h_t, w_t = setup()
    with pytest.raises(ValueError, match="reduction"):
        dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, reduction="none")
    with pytest.raises(ValueError, match="teacher_weight"):
        dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t[:, :5])
    with pytest.raises(ValueError, match="allow_vocab_mismatch"):
        dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t[:90])
    with pytest.raises(ValueError, match="beta"):
        dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, beta=2.0)
    with pytest.raises(TypeError, match="student_hidden .* and student_weight .* must have one dtype"):
        dpkd.fused_linear_distill_loss(h_s, w_s.bfloat16(), h_t, w_t)
    with pytest.raises(TypeError, match="teacher_hidden"):
        dpkd.fused_linear_distill_loss(h_s, w_s, h_t.double(), w_t)


def test_a_rule_with_a_top_k_teacher_reads_the_students_statistics():
    # The top-k objective gives only the divergence: the first pass adds the student's statistics (they were NaN, so
    # a rule of the student's entropy or surprisal selected on nothing).
    h_s, w_s, _, _, _ = setup(n=16, bias=False)
    g = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(97, generator=g)[:4] for _ in range(16)])
    logprobs = torch.log_softmax(torch.randn(16, 4, generator=g), -1) - 0.5
    labels = torch.randint(0, 97, (16,), generator=g)
    seen = []

    def rule(st, valid):
        seen.append(st)
        return dpkd.select.highest_surprisal(st.student_label_logprob, 0.5, valid=valid)

    kw = dict(teacher_topk=(ids, logprobs), labels=labels, select=rule, return_stats=True)
    got, st = dpkd.fused_linear_distill_loss(h_s, w_s, **kw)
    both, _ = dpkd.fused_linear_distill_loss(h_s, w_s, select_reads="student", **kw)
    logq = torch.log_softmax(h_s.detach() @ w_s.detach().t(), -1)
    torch.testing.assert_close(seen[0].student_label_logprob, logq.gather(1, labels[:, None])[:, 0])
    torch.testing.assert_close(seen[0].student_entropy, -(logq.exp() * logq).sum(-1))
    p = logprobs.exp()
    torch.testing.assert_close(seen[0].teacher_entropy, -(p * logprobs).sum(-1))  # over K, no tail: as given
    assert seen[0].divergence.isfinite().all()
    assert got.item() == pytest.approx(both.item(), rel=1e-6)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("div,kw", [("forward_kl", {}), ("reverse_kl", {}), ("jsd", dict(beta=0.3)),
                                    ("skew_reverse_kl", dict(alpha=0.2)), ("tvd", {})])
def test_topk_teacher_matches_logits_path(tail, div, kw):
    if div == "reverse_kl" and not tail:
        pytest.skip("needs the tail")
    h_s, w_s, b_s, _, _ = setup(n=3 * 8)
    g = torch.Generator().manual_seed(4)
    teacher = torch.randn(3, 8, 97, generator=g)
    logp, ids = torch.log_softmax(teacher, -1).topk(6, dim=-1)
    labels = torch.randint(0, 97, (3, 8), generator=g)
    labels[0, 0], labels[1, 1] = -100, ids[1, 1, 0]
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 2] = False
    hs3 = h_s.reshape(3, 8, -1)
    opts = dict(divergence=div, **kw, temperature=1.3, mask=mask, labels=labels, hard_label_weight=0.2,
                return_stats=True)
    got, stats = dpkd.fused_linear_distill_loss(hs3, w_s, student_bias=b_s, teacher_topk=(ids, logp), topk_tail=tail,
                                                chunk_size=5, **opts)
    zs = (hs3 @ w_s.t() + b_s)
    ref, ref_stats = dpkd.topk_distill_loss(zs, ids, logp, tail=tail, **opts)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(grads(got, h_s, w_s, b_s), grads(ref, h_s, w_s, b_s)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    carrying = mask & (labels != -100)
    for a, b in zip(stats, ref_stats):
        torch.testing.assert_close(a[carrying], b[carrying], rtol=1e-5, atol=1e-6)
    assert stats.student_entropy[~carrying].isnan().all()  # not computed


def test_nan_in_hidden_states_is_reported_unless_the_token_carries_no_loss():
    h_s, w_s, _, h_t, w_t = setup()
    mask = torch.ones(h_s.shape[0], dtype=torch.bool)
    mask[3] = False
    h_s.data[3, 0] = float("nan")  # a token without loss: not computed, no error
    dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, divergence="jsd", mask=mask, chunk_size=5).backward()
    assert torch.isfinite(h_s.grad).all()
    h_s.data[7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"student's logits .* token 7"):
        dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, divergence="jsd", mask=mask, chunk_size=5)
    h_s.data[7, 1] = 0.0
    h_t[9, 2] = float("inf")
    with pytest.raises(ValueError, match=r"teacher's logits .* token 9"):
        dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, divergence="jsd", mask=mask, chunk_size=5)


def test_teacher_given_once_and_topk_checks():
    h_s, w_s, _, h_t, w_t = setup()
    ids = torch.zeros(24, 4, dtype=torch.int64)
    logp = torch.full((24, 4), -2.0)
    with pytest.raises(ValueError, match="teacher_topk"):
        dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, teacher_topk=(ids, logp))
    with pytest.raises(ValueError, match="teacher_hidden and teacher_weight"):
        dpkd.fused_linear_distill_loss(h_s, w_s)
    with pytest.raises(ValueError, match="needs tail=True"):
        dpkd.fused_linear_distill_loss(h_s, w_s, teacher_topk=(torch.arange(4).repeat(24, 1), logp),
                                       divergence="reverse_kl")
    with pytest.raises(ValueError, match="distinct within a row"):
        dpkd.fused_linear_distill_loss(h_s, w_s, teacher_topk=(ids, logp))
    with pytest.raises(ValueError, match=r"in \[0, 97\)"):
        dpkd.fused_linear_distill_loss(h_s, w_s, teacher_topk=(ids + 97, logp))


def test_module_form_matches_function():
    h_s, w_s, b_s, h_t, w_t = setup()
    module = dpkd.nn.FusedLinearDistillLoss("jsd", beta=0.3, temperature=2.0)
    assert "beta=0.3" in repr(module)
    torch.testing.assert_close(module(h_s, w_s, h_t, w_t, student_bias=b_s),
                               dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, student_bias=b_s, divergence="jsd",
                                                              beta=0.3, temperature=2.0))


def test_weight_gradient_skips_the_low_half_from_the_token_threshold(monkeypatch):
    """From _LOW_HALF_BELOW_TOKENS tokens on, the head-weight gradient takes only the high bf16 half of the fp32
    logit gradient (written in bf16 by the op): still near bf16 rounding of a float64 reference, and further
    from it than with the low half (the switch is live); the hidden states' gradient does not change. A trainable
    fp32 bias keeps an fp32 logit gradient (its sum over tokens in bf16 was 1.5e-3 off); fp16 and fp64 heads take
    the switch without a 16-bit op gradient."""
    import reference

    from dpkd import fused_linear

    h_s, w_s, _, h_t, w_t = setup(n=512, hs=64, ht=96, v=3000, dtype=torch.bfloat16, bias=False)
    b_s = (torch.randn(3000, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.1).float()
    hs64, ws64 = (t.detach().double().requires_grad_(True) for t in (h_s, w_s))
    ref = reference.divergence(hs64 @ ws64.t(), h_t.double() @ w_t.double().t(), "jsd").mean()
    g_ref = torch.autograd.grad(ref, [hs64, ws64])
    grads, default = {}, fused_linear._LOW_HALF_BELOW_TOKENS
    for threshold in (default, 512):
        monkeypatch.setattr(fused_linear, "_LOW_HALF_BELOW_TOKENS", threshold)
        got = dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, divergence="jsd", chunk_size=128)
        grads[threshold] = torch.autograd.grad(got, [h_s, w_s])
    err = {k: [float((a.double() - b).norm() / b.norm()) for a, b in zip(g, g_ref)] for k, g in grads.items()}
    assert torch.equal(grads[512][0], grads[default][0])
    assert err[default][1] < 2e-3 < err[512][1] < 4e-3, err

    bs64 = b_s.double().requires_grad_(True)
    ref_b = torch.autograd.grad(reference.divergence(hs64 @ ws64.t() + bs64, h_t.double() @ w_t.double().t(),
                                                     "jsd").mean(), bs64)[0]
    b_s.requires_grad_(True)
    got = dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, student_bias=b_s, divergence="jsd", chunk_size=128)
    grad_b = torch.autograd.grad(got, b_s)[0]
    assert float((grad_b.double() - ref_b).norm() / ref_b.norm()) < 2e-5
    for dtype in (torch.float16, torch.float64):
        h, w, _, ht, wt = setup(n=512, hs=16, ht=24, v=300, dtype=dtype, bias=False)
        loss = dpkd.fused_linear_distill_loss(h, w, ht, wt, divergence="jsd", fp32_logits=True, chunk_size=128)
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, [h, w]))


def test_bad_arguments_are_named():
    fused_linear_distill_loss = dpkd.fused_linear_distill_loss
    h, w, ht, wt = torch.randn(8, 16), torch.randn(30, 16), torch.randn(8, 12), torch.randn(30, 12)
    for kw, match in ((dict(weights=torch.rand(8, requires_grad=True)), "weights must not require grad"),
                      (dict(chunk_size=-1), "chunk_size"),
                      (dict(student_bias=torch.zeros(29)), "student_bias must be"),
                      (dict(teacher_bias=torch.zeros(30, 1)), "teacher_bias must be"),
                      (dict(temperature=float("inf")), "temperature")):
        with pytest.raises(ValueError, match=match):
            fused_linear_distill_loss(h, w, ht, wt, **kw)
    with pytest.raises(TypeError, match="student_hidden must be a floating tensor"):
        fused_linear_distill_loss(h.int(), w.int(), ht, wt)
    loss = fused_linear_distill_loss(h.double(), w.double(), ht, wt)  # float64 heads: fp32 logits by default
    assert loss.item() == pytest.approx(fused_linear_distill_loss(h, w, ht, wt).item(), rel=1e-5)
    for hh in (h[0], h[None, None]):
        with pytest.raises(ValueError, match=r"student_hidden must be \[N, H\]"):
            fused_linear_distill_loss(hh, w, ht, wt)
    ids = torch.arange(2).repeat(8, 1)
    with pytest.raises(ValueError, match="teacher_topk log-probs contains NaN"):
        fused_linear_distill_loss(h, w, teacher_topk=(ids, torch.full((8, 2), float("nan"))))


def test_torch_compile_runs_it_outside_the_graph():
    """The chunk loop's length is data-dependent: compiled code calls the function as it is (the compiled model
    around it still compiles), and fullgraph=True refuses with the reason instead of a data-dependent-shape error
    from inside the loop."""
    h_s, w_s, b_s, h_t, w_t = setup()
    labels = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(5))
    labels[::3] = -100

    def step(h_s, w_s, b_s, h_t, w_t):
        return dpkd.fused_linear_distill_loss(torch.tanh(h_s), w_s, h_t, w_t, student_bias=b_s, divergence="jsd",
                                              labels=labels, hard_label_weight=0.3) * 2

    eager = grads(step(h_s, w_s, b_s, h_t, w_t), h_s, w_s, b_s)
    loss = torch.compile(step, backend="aot_eager")(h_s, w_s, b_s, h_t, w_t)
    assert loss.item() == pytest.approx(step(h_s, w_s, b_s, h_t, w_t).item(), rel=1e-6)
    for got, want in zip(grads(loss, h_s, w_s, b_s), eager):
        torch.testing.assert_close(got, want)
    with pytest.raises(Exception, match="tokens that carry loss, a number known only at run time"):
        torch._dynamo.reset()  # compiled code is cached per code object: the graph-break one above would be reused
        torch.compile(step, fullgraph=True, backend="aot_eager")(h_s, w_s, b_s, h_t, w_t)


def test_a_gradient_penalty_through_it_raises():
    """Its gradients are computed in the forward pass, without a graph: a penalty on them must raise, not receive
    nothing (was None with allow_unused=True)."""
    h_s, w_s, b_s, h_t, w_t = setup()
    loss = dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, student_bias=b_s, divergence="jsd")
    (gh,) = torch.autograd.grad(loss, h_s, create_graph=True)
    with pytest.raises(RuntimeError, match="no derivative of their own"):
        torch.autograd.grad(gh.pow(2).sum(), w_s, allow_unused=True)


def test_float64_heads_with_a_bias_and_the_top_k_teachers_checks():
    """A float64 student bias widened the fp32 chunk logits to float64, which the kernels refuse (it named
    student_logits, not an argument here); a top-k teacher's integer log-probs passed unchecked (found by a
    user-trial helper)."""
    h_s, w_s, b_s, h_t, w_t = setup(dtype=torch.float64)
    loss = dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, student_bias=b_s, divergence="jsd")
    h32, w32, b32, ht32, wt32 = setup(dtype=torch.float32)  # the same values (drawn in float64)
    ref = reference(h32, w32, b32, ht32, wt32, divergence="jsd")  # fp32 logits, as the float64 head's chunks
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(grads(loss, h_s, w_s, b_s), grads(ref, h32, w32, b32)):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="fp32_logits=False with a float64 student_weight"):
        dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, fp32_logits=False)
    ids = torch.zeros(24, 2, dtype=torch.long)
    ids[:, 1] = 1
    with pytest.raises(TypeError, match="teacher_topk log-probs must be a floating tensor"):
        dpkd.fused_linear_distill_loss(h_s, w_s, teacher_topk=(ids, torch.zeros(24, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"teacher_topk ids must be in \[0, 97\)"):
        dpkd.fused_linear_distill_loss(h_s, w_s, teacher_topk=(ids + 96, torch.full((24, 2), -1.0)))


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_select_rule_matches_the_logits_path(divergence, reduction, device):
    # The rule reads statistics of a first pass over every token that carries loss (the statistics returned too);
    # the loss and gradients are those of the selected tokens, as on the logits.
    h_s, w_s, b_s, h_t, w_t = setup(n=24, device=device)
    h_s3, h_t3 = h_s.reshape(3, 8, -1), h_t.reshape(3, 8, -1)
    labels = torch.randint(0, 97, (3, 8), generator=torch.Generator().manual_seed(1))
    labels[0, :3] = -100
    labels = labels.to(device)
    w = torch.rand(3, 8, generator=torch.Generator().manual_seed(2)).to(device)
    w[1, 2] = 0.0

    def rule(st, valid):
        return dpkd.select.tip(st.student_entropy, st.divergence, quadrant="q1_or_q2", valid=valid)

    kw = dict(divergence=divergence, labels=labels, weights=w, reduction=reduction, return_stats=True)
    got, got_st = dpkd.fused_linear_distill_loss(h_s3, w_s, h_t3, w_t, student_bias=b_s, chunk_size=5, select=rule,
                                                 **kw)
    ref, ref_st = reference(h_s3, w_s, b_s, h_t3, w_t, select=rule, **kw)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(grads(got, h_s, w_s, b_s), grads(ref, h_s, w_s, b_s)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    carried = (labels != -100) & (w != 0)  # the fused head's statistics are NaN elsewhere
    for a, b in zip(got_st, ref_st):
        torch.testing.assert_close(a[carried], b[carried], rtol=1e-4, atol=1e-5)
        assert a[~carried].isnan().all()
    (g,) = torch.autograd.grad(dpkd.fused_linear_distill_loss(h_s3, w_s, h_t3, w_t, select=rule, **kw)[0], [h_s])
    chosen = rule(ref_st, labels != -100).values.reshape(-1)
    assert 0 < int(chosen.sum()) < 24 and (g[~chosen] == 0).all()
    # A Selection given as it is: no first pass
    half = dpkd.select.Selection(chosen.reshape(3, 8), "sequence")
    got = dpkd.fused_linear_distill_loss(h_s3, w_s, h_t3, w_t, student_bias=b_s, select=half, **kw)[0]
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    # An empty (Poisson) batch
    kw.update(labels=labels[:0], weights=w[:0])
    empty = dpkd.fused_linear_distill_loss(h_s3[:0], w_s, h_t3[:0], w_t, select=rule, **kw)
    assert empty[0].item() == 0 and empty[1].student_entropy.shape == (0, 8)


def test_a_rule_sees_only_the_tokens_that_carry_loss():
    # Tokens of weight 0 (padding given through weights=, as DP's per-example means do) take no place in a quota:
    # the logits path scored them too, so the two paths chose different tokens (a user-trial helper).
    s, t = torch.randn(1, 8, 50) * 3, torch.randn(1, 8, 50) * 3
    w = torch.ones(1, 8)
    w[0, 2:4] = 0
    seen = []

    def rule(st, valid):
        seen.append((st, valid))
        return dpkd.select.entropy_top_fraction(st.student_entropy, 0.5, valid=valid)

    dpkd.distill_loss(s.requires_grad_(True), t, weights=w, select=rule, reduction="sum")
    st, valid = seen[0]
    assert valid.tolist() == (w != 0).tolist() and st.student_entropy[0, 2:4].isnan().all()
    assert all(f.grad_fn is None for f in st)  # statistics without autograd history
    assert int(rule(st, valid).values.sum()) == 3  # ceil(0.5 * 6)


def test_a_select_rule_sees_nan_logits_that_it_leaves_out():
    # The NaN check covers every token the rule scored, not only those it selected (as on the logits).
    h_s, w_s, _, h_t, w_t = setup(n=12, bias=False)
    h_t = h_t.clone()
    h_t[5] = float("nan")
    keep_none_of_5 = lambda st, valid: dpkd.select.Selection(torch.arange(12) != 5, "sequence")  # noqa: E731
    with pytest.raises(ValueError, match="teacher's logits .* contain NaN"):
        dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, select=keep_none_of_5)


def test_a_rule_of_the_students_statistics_needs_only_the_students_logits(monkeypatch):
    # select_reads="student": the first pass forms the student's logits alone; the rule sees NaN teacher fields; the
    # loss, gradients and the student's statistics are those of the full first pass.
    h_s, w_s, b_s, h_t, w_t = setup(n=24)
    h_s3, h_t3 = h_s.reshape(3, 8, -1), h_t.reshape(3, 8, -1)
    labels = torch.randint(0, 97, (3, 8), generator=torch.Generator().manual_seed(4))
    labels[1, :2] = -100
    seen = []

    def rule(st, valid):
        seen.append(st)
        return dpkd.select.entropy_top_fraction(st.student_entropy, 0.5, valid=valid)

    kw = dict(divergence="jsd", labels=labels, temperature=1.5, return_stats=True, select=rule, chunk_size=5)
    full, full_st = dpkd.fused_linear_distill_loss(h_s3, w_s, h_t3, w_t, student_bias=b_s, **kw)
    heads = []
    logits = fused_linear._logits
    monkeypatch.setattr(fused_linear, "_logits", lambda h, w, *a: heads.append(w.data_ptr()) or logits(h, w, *a))
    got, got_st = dpkd.fused_linear_distill_loss(h_s3, w_s, h_t3, w_t, student_bias=b_s, select_reads="student", **kw)
    assert heads.count(w_t.data_ptr()) == 3 and heads.count(w_s.data_ptr()) == 5 + 3  # 11 of 22 tokens chosen
    torch.testing.assert_close(seen[1].student_entropy, seen[0].student_entropy, equal_nan=True)
    for field in ("teacher_entropy", "divergence", "teacher_label_logprob"):  # not formed: reading one raises
        with pytest.raises(ValueError, match=f"the select rule read {field}"):
            getattr(seen[1], field)
    assert got.item() == pytest.approx(full.item(), rel=1e-6)
    for a, b in zip(grads(got, h_s, w_s, b_s), grads(full, h_s, w_s, b_s)):
        torch.testing.assert_close(a, b)
    chosen = rule(full_st, labels != -100).values
    for k, (a, b) in enumerate(zip(got_st, full_st)):
        where = chosen if k in fused_linear._TEACHER_COLUMNS else labels != -100
        torch.testing.assert_close(a[where], b[where])
        assert a[~where].isnan().all()
    with pytest.raises(ValueError, match="select_reads"):
        dpkd.fused_linear_distill_loss(h_s3, w_s, h_t3, w_t, select=rule, select_reads="teacher")
    with pytest.raises(ValueError, match="the select rule read divergence"):  # TIP needs the teacher
        dpkd.fused_linear_distill_loss(h_s3, w_s, h_t3, w_t, select_reads="student", select=lambda st, v: (
            dpkd.select.tip(st.student_entropy, st.divergence, valid=v)))
    # NaN logits: the student's are checked at every scored token, the teacher's where they were formed (selected)
    bad_s, bad_t = h_s3.detach().clone(), h_t3.clone()
    unselected = int((~chosen.reshape(-1) & (labels.reshape(-1) != -100)).nonzero()[0, 0])
    bad_s.reshape(24, -1)[unselected] = float("nan")
    bad_t.reshape(24, -1)[unselected] = float("nan")
    kw.update(select_reads="student", return_stats=False)
    with pytest.raises(ValueError, match="student's logits"):
        dpkd.fused_linear_distill_loss(bad_s, w_s, h_t3, w_t, **kw)
    assert dpkd.fused_linear_distill_loss(h_s3, w_s, bad_t, w_t, **kw).isfinite()
