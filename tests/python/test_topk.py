"""Distillation from a top-k teacher (dpkd.topk_distill_loss and the fused head's teacher_topk) against float64
references: the full-vocabulary losses where the teacher's top-k describe it exactly, and the K + tail outcomes'
divergence from reference.py's formulas."""

from __future__ import annotations

import math

import pytest
import torch

import dpkd
from reference import topk_divergence
from test_losses import logits, rel_err

# Each divergence with its parameter at an interior value and where it degenerates (JSD's endpoints, skew 0 and 1).
CASES = [("forward_kl", {}), ("reverse_kl", {}), ("tvd", {}),
         *[("jsd", dict(beta=b)) for b in (0.0, 0.3, 0.5, 1.0)],
         *[("skew_kl", dict(alpha=a)) for a in (0.0, 0.1, 1.0)],
         *[("skew_reverse_kl", dict(alpha=a)) for a in (0.0, 0.1, 1.0)]]


def sparse_teacher(n, v, k, seed):
    """A teacher with probability on k tokens per row only: its full logits (-inf elsewhere), ids and log-probs."""
    full = logits(n, v, 3.0, seed=seed).double()
    ids = torch.stack([torch.randperm(v, generator=torch.Generator().manual_seed(seed + i))[:k] for i in range(n)])
    sparse = torch.full_like(full, -math.inf).scatter(1, ids, full.gather(1, ids))
    return sparse, ids, torch.log_softmax(sparse, -1).gather(1, ids)


def infinite_without_tail(div, kw):
    return div == "reverse_kl" or (div, kw) in (("jsd", dict(beta=1.0)), ("skew_reverse_kl", dict(alpha=0.0)))


def stats_close(got, want, rows):
    for name, a, b in zip(dpkd.TokenStats._fields, got, want):
        torch.testing.assert_close(a[rows], b[rows].float(), rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)


@pytest.mark.parametrize("div,kw", CASES)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_sparse_teacher_gives_the_full_vocabulary_loss(div, kw, temperature):
    """A teacher with mass on its k ids only is described exactly by them: loss, gradient and statistics are
    distill_loss's on its full logits (-inf off the ids), with hard labels and T^2 scaling; with the tail too."""
    if infinite_without_tail(div, kw):
        pytest.skip("infinite: the student has mass where the teacher has none")
    n, v, k = 7, 301, 12
    sparse, ids, logp = sparse_teacher(n, v, k, seed=3)
    labels = torch.where(torch.arange(n) % 3 == 0, ids[:, 0], torch.arange(n) * 37 % v)  # in K, and mostly not
    labels[5] = -100
    mask = torch.ones(n, dtype=torch.bool)
    mask[2] = False
    opts = dict(divergence=div, **kw, temperature=temperature, labels=labels, mask=mask, reduction="sum",
                hard_label_weight=0.25, scale_by_temperature_squared=True, return_stats=True)
    s = logits(n, v, 4.0, seed=4).requires_grad_(True)
    got, got_stats = dpkd.topk_distill_loss(s, ids, logp.float(), **opts)
    (got_grad,) = torch.autograd.grad(got, s)
    want, want_stats = dpkd.distill_loss(s, (sparse * temperature).float(), **opts)
    (want_grad,) = torch.autograd.grad(want, s)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert rel_err(got_grad, want_grad) < 1e-5
    stats_close(got_stats, want_stats, mask & (labels != -100))
    tail, _ = dpkd.topk_distill_loss(s, ids, logp.float(), tail=True, **opts)  # the tail's mass is 0
    assert tail.item() == pytest.approx(got.item(), rel=1e-6)


def teacher_following_student(s, ids, logp, temperature):
    """Full teacher logits (at ``temperature``) that put p on the ids and spread the rest, 1 - sum p, over the other
    tokens in the student's proportions: every divergence over the full vocabulary is then the K + tail one."""
    lq = torch.log_softmax(s.detach().double() / temperature, -1)
    rest = lq.scatter(1, ids, -math.inf)
    lp_rest = torch.log1p(-logp.double().exp().sum(-1, keepdim=True))
    full = (rest - torch.logsumexp(rest, -1, keepdim=True) + lp_rest).scatter(1, ids, logp.double())
    return (full * temperature).float()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("div,kw", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_tail_against_float64_outcome_reference(div, kw, device):
    n, v, k, temperature = 9, 513, 17, 1.3
    s = logits(n, v, 3.0, seed=28).to(device).requires_grad_(True)
    logp, ids = torch.log_softmax(logits(n, v, 3.0, seed=29).double(), -1).topk(k, dim=-1)
    logp, ids = logp.to(device), ids.to(device)
    got = dpkd.topk_distill_loss(s, ids, logp.float(), divergence=div, **kw, temperature=temperature, tail=True,
                                 reduction="none")
    weights = torch.rand(n, generator=torch.Generator().manual_seed(1)).to(device)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), s)
    s64 = s.detach().double().requires_grad_(True)
    want = topk_divergence(s64, ids, logp, temperature, div, **kw)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), s64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert rel_err(got_grad, want_grad) < 1e-5
    # The same number from the full-vocabulary loss of a teacher that spreads its tail as the student does
    full = dpkd.distill_loss(s.detach(), teacher_following_student(s, ids, logp, temperature), divergence=div, **kw,
                             temperature=temperature, reduction="none")
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_gradient_from_the_forward_pass_equals_the_two_pass_one(reduction):
    """A scalar loss takes its gradient in the forward pass (the logits read once); reduction="none" and a sum by
    hand take the backward pass's: the same numbers."""
    b, t, v, k = 3, 5, 70, 6
    s = logits(b * t, v, 3.0, seed=18).reshape(b, t, v).requires_grad_(True)
    logp, ids = torch.log_softmax(logits(b * t, v, 3.0, seed=19), -1).topk(k, dim=-1)
    ids, logp = ids.reshape(b, t, k), logp.reshape(b, t, k)
    labels = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(2))
    labels[0, 1] = -100
    weights = torch.rand(b, t, generator=torch.Generator().manual_seed(3))
    opts = dict(divergence="jsd", beta=0.3, tail=True, temperature=1.7, labels=labels, weights=weights,
                hard_label_weight=0.2, scale_by_temperature_squared=True)
    fused = dpkd.topk_distill_loss(s, ids, logp, reduction=reduction, **opts)
    (fused_grad,) = torch.autograd.grad(3.0 * fused, s)
    per_token = dpkd.topk_distill_loss(s, ids, logp, reduction="none", **opts)
    valid = (labels != -100).sum() if reduction == "mean" else (b if reduction == "batchmean" else 1)
    two_pass = per_token.sum() / valid
    (two_pass_grad,) = torch.autograd.grad(3.0 * two_pass, s)
    assert fused.item() == pytest.approx(two_pass.item(), rel=1e-6)
    torch.testing.assert_close(fused_grad, two_pass_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
def test_dtypes_extreme_logits_and_padding(dtype, tol):
    n, v, k = 6, 200, 8
    s = logits(n, v, 30.0, seed=5)
    s[0, 3], s[1, :50] = 1e4, -math.inf  # a dominant logit; a padded vocabulary
    s = s.to(dtype).requires_grad_(True)
    logp, ids = torch.log_softmax(logits(n, v, 30.0, seed=6).double(), -1).topk(k, dim=-1)
    ids[1] = torch.arange(60, 60 + k)  # the padded row's ids where its student has mass
    got = dpkd.topk_distill_loss(s, ids, logp.float(), divergence="jsd", beta=0.3, tail=True, reduction="sum")
    (got_grad,) = torch.autograd.grad(got, s)
    s64 = s.detach().double().requires_grad_(True)
    want = topk_divergence(s64, ids, logp, 1.0, "jsd", beta=0.3).sum()
    want.backward()
    assert got_grad.dtype == dtype and torch.isfinite(got_grad).all() and (got_grad[1, :50] == 0).all()
    assert got.item() == pytest.approx(want.item(), rel=tol)
    assert rel_err(got_grad, s64.grad) < tol


def test_divergences_infinite_without_tail_are_refused():
    s = logits(4, 30, seed=7)
    ids = torch.arange(3).repeat(4, 1)
    logp = torch.log(torch.tensor([0.5, 0.3, 0.2])).repeat(4, 1)
    for div, kw in (("reverse_kl", {}), ("jsd", dict(beta=1.0)), ("skew_reverse_kl", dict(alpha=0.0))):
        with pytest.raises(ValueError, match="needs tail=True"):
            dpkd.topk_distill_loss(s, ids, logp, divergence=div, **kw)
        with pytest.raises(ValueError, match="needs tail=True"):
            dpkd.fused_linear_distill_loss(s, torch.eye(30), teacher_topk=(ids, logp), divergence=div, **kw)
        with pytest.raises(ValueError, match="needs tail=True"):
            dpkd.nn.TopKDistillLoss(div, **kw)
        assert dpkd.topk_distill_loss(s, ids, logp - 0.1, divergence=div, **kw, tail=True).isfinite()
    with pytest.raises(ValueError, match="hard_label_weight > 0 needs labels"):
        dpkd.topk_distill_loss(s, ids, logp, hard_label_weight=0.5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 30\) or ignore_index \(-100\), got 30"):
        dpkd.topk_distill_loss(s, ids, logp, labels=torch.tensor([1, 30, 2, 3]))
    with pytest.raises(ValueError, match="beta"):
        dpkd.topk_distill_loss(s, ids, logp, divergence="jsd", beta=1.5)


def test_a_tail_without_mass():
    """All columns in K: there is no rest, and a tail of rounding-sized mass is dropped (its forward KL against the
    student's empty rest was +inf). A teacher whose ids hold all its mass, with columns outside them: a divergence
    infinite where the teacher has no mass is refused (was an inf loss with NaN gradients)."""
    s = logits(3, 16, 3.0, seed=12).requires_grad_(True)
    logp, ids = torch.log_softmax(logits(3, 16, 3.0, seed=13), -1).sort(-1, descending=True)
    for div in ("forward_kl", "reverse_kl", "tvd"):
        want = dpkd.distill_loss(s, logits(3, 16, 3.0, seed=13), divergence=div)
        for tail in (True, False):  # without the tail too: nothing lies outside the ids (reverse KL was refused)
            got = dpkd.topk_distill_loss(s, ids, logp, divergence=div, tail=tail)
            assert got.isfinite() and got.item() == pytest.approx(want.item(), rel=1e-5)
    certain = torch.tensor([[0.0], [-1e-7], [-0.5]])
    with pytest.raises(ValueError, match="sum to probability 1, leaving the tail no mass: divergence='reverse_kl'"):
        dpkd.topk_distill_loss(s, ids[:, :1], certain, divergence="reverse_kl", tail=True)
    assert dpkd.topk_distill_loss(s, ids[:, :1], certain, divergence="jsd", tail=True).isfinite()


def test_padding_rows_are_not_checked_and_under_dp_a_bad_row_is_nan():
    """A cache padded with zeros (ids 0, log-probs 0) at tokens without loss is fine; a malformed row that carries
    loss raises, or with check_finite=False (DP-SGD: no error may depend on one example) gets a NaN loss."""
    s = logits(4, 50, seed=14).requires_grad_(True)
    logp, ids = torch.log_softmax(logits(4, 50, seed=15), -1).topk(5, dim=-1)
    labels = torch.tensor([1, 2, 3, -100])
    padded_ids, padded = ids.clone(), logp.clone()
    padded_ids[3], padded[3] = 0, 0.0
    want = dpkd.topk_distill_loss(s, ids, logp, labels=labels, reduction="none")
    got = dpkd.topk_distill_loss(s, padded_ids, padded, labels=labels, reduction="none")
    torch.testing.assert_close(got, want)
    padded_ids[1] = 0
    with pytest.raises(ValueError, match=r"teacher_ids must be distinct within a row \(first in flattened row 1"):
        dpkd.topk_distill_loss(s, padded_ids, padded, labels=labels)
    for div in ("skew_kl", "forward_kl"):  # skew KL's terms test p > 0: a NaN teacher row once gave 0, not NaN
        per_token = dpkd.topk_distill_loss(s, padded_ids, padded, labels=labels, reduction="none",
                                           check_finite=False, divergence=div)
        assert per_token[1].isnan() and per_token[[0, 2, 3]].isfinite().all()
        (grad,) = torch.autograd.grad(per_token[1], s)
        assert grad[1].isnan().all() and (grad[[0, 2, 3]] == 0).all()
    bad = s.detach().clone()
    bad[2, 4] = math.nan
    per_token = dpkd.topk_distill_loss(bad, ids, logp, labels=labels, reduction="none", check_finite=False)
    assert per_token[2].isnan() and per_token[[0, 1]].isfinite().all()
    with pytest.raises(ValueError, match="at least one id per row"):
        dpkd.topk_distill_loss(s, ids[:, :0], logp[:, :0])


def test_confident_students_entropies_and_non_finite_rows():
    """From a review of the fast path: a confident student's small terms added to the maximum's 1 in fp32 lost 1% of
    them (loss 4e-4 off); fp32 dot products put the entropy 7e-4 nats off at V 128000; a NaN or +inf student row under
    check_finite=False gave reverse KL 0 (its q > 0 tests dropped it) and a gradient row only partly NaN."""
    v = 32000
    s = torch.full((1, v), -20.0)
    s[0, 0] = 0.0
    s.requires_grad_(True)
    logp, ids = torch.log_softmax(s.detach().double(), -1).topk(2, dim=-1)
    logp = logp - 0.001
    for div in ("forward_kl", "reverse_kl"):
        got = dpkd.topk_distill_loss(s, ids, logp.float(), divergence=div, tail=True, reduction="sum")
        (grad,) = torch.autograd.grad(got, s)
        s64 = s.detach().double().requires_grad_(True)
        want = topk_divergence(s64, ids, logp, 1.0, div).sum()
        (want_grad,) = torch.autograd.grad(want, s64)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        assert rel_err(grad, want_grad) < 1e-5
    wide = logits(4, 128000, 3.0, seed=20)
    _, stats = dpkd.topk_distill_loss(wide, torch.arange(3).repeat(4, 1), torch.full((4, 3), -2.0), tail=True,
                                      return_stats=True)
    lq = torch.log_softmax(wide.double(), -1)
    torch.testing.assert_close(stats.student_entropy.double(), -(lq.exp() * lq).sum(-1), rtol=0, atol=2e-6)
    bad = logits(3, 40, seed=21)
    bad[0, 5], bad[1, 6], bad[2] = math.nan, math.inf, -math.inf
    bad.requires_grad_(True)
    ids3, logp3 = torch.arange(2).repeat(3, 1), torch.full((3, 2), -1.5)
    for div in ("reverse_kl", "jsd", "tvd"):
        per_token = dpkd.topk_distill_loss(bad, ids3, logp3, divergence=div, tail=True, reduction="none",
                                           check_finite=False)
        assert per_token.isnan().all(), div
        (grad,) = torch.autograd.grad(per_token.sum(), bad)
        assert grad.isnan().all(), div


def test_gradients_are_first_order_and_the_forward_pass_gradient_is_used_once():
    s = logits(4, 30, seed=22).requires_grad_(True)
    ids, logp = torch.arange(3).repeat(4, 1), torch.full((4, 3), -2.0)
    for fuse in (True, False):
        (g,) = torch.autograd.grad(dpkd.topk_distill_loss(s, ids, logp, fuse_backward=fuse), s, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice|no derivative of their own"):
            torch.autograd.grad(g.square().sum(), s)
    loss = dpkd.topk_distill_loss(s, ids, logp)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="used up"):
        loss.backward()


def test_fused_top_k_refuses_options_of_a_teacher_head():
    h, w = logits(4, 8, seed=16), logits(10, 8, seed=17)
    topk = (torch.arange(3).repeat(4, 1), torch.full((4, 3), -2.0))
    for option in (dict(teacher_bias=torch.zeros(10)), dict(teacher_logit_scale=2.0), dict(teacher_softcap=30.0),
                   dict(allow_vocab_mismatch=True)):
        with pytest.raises(ValueError, match=f"{next(iter(option))}: for a teacher head, which a top-k teacher "
                                             "replaces"):
            dpkd.fused_linear_distill_loss(h, w, teacher_topk=topk, **option)
    with pytest.raises(ValueError, match=r"teacher_topk must be a pair \(ids, log-probabilities\)"):
        dpkd.fused_linear_distill_loss(h, w, teacher_topk=(*topk, topk[1]))
    with pytest.raises(ValueError, match="topk_tail=True needs teacher_topk"):
        dpkd.fused_linear_distill_loss(h, w, h, w, topk_tail=True)
    with pytest.raises(ValueError, match="at least one id per row"):
        dpkd.fused_linear_distill_loss(h, w, teacher_topk=(topk[0][:, :0], topk[1][:, :0]))


def test_rows_without_loss_get_no_gradient_and_no_check():
    s = logits(5, 40, seed=8)
    s[2, 7] = math.nan
    s.requires_grad_(True)
    ids = torch.topk(logits(5, 40, seed=9), 4).indices
    logp = torch.log_softmax(logits(5, 4, seed=10), -1) - 0.2
    mask = torch.tensor([True, True, False, True, True])
    loss = dpkd.topk_distill_loss(s, ids, logp, divergence="tvd", tail=True, mask=mask)
    loss.backward()
    assert loss.isfinite() and torch.isfinite(s.grad).all() and (s.grad[2] == 0).all() and (s.grad[0] != 0).any()
    with pytest.raises(ValueError, match=r"student_logits contains NaN or \+inf.*row 2"):
        dpkd.topk_distill_loss(s, ids, logp, divergence="tvd", tail=True)


def test_select_rule_module_and_compile():
    b, t, v, k = 3, 8, 64, 5
    s = logits(b * t, v, 3.0, seed=11).reshape(b, t, v).requires_grad_(True)
    logp, ids = torch.log_softmax(logits(b * t, v, 3.0, seed=12), -1).topk(k, dim=-1)
    ids, logp = ids.reshape(b, t, k), logp.reshape(b, t, k)
    opts = dict(divergence="jsd", beta=0.3, tail=True)

    def rule(st, valid):
        return dpkd.select.entropy_top_fraction(st.student_entropy, 0.5, valid=valid)

    got, stats = dpkd.topk_distill_loss(s, ids, logp, **opts, select=rule, return_stats=True)
    chosen = rule(stats, None).weights()
    assert chosen.sum() == b * t // 2
    want = dpkd.topk_distill_loss(s, ids, logp, **opts, weights=chosen)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    module = dpkd.nn.TopKDistillLoss("jsd", beta=0.3, tail=True)
    assert module(s, ids, logp).item() == pytest.approx(dpkd.topk_distill_loss(s, ids, logp, **opts).item(), rel=1e-6)
    compiled = torch.compile(lambda x: dpkd.topk_distill_loss(x, ids, logp, **opts), fullgraph=True,
                             backend="aot_eager")
    loss = compiled(s)
    eager = dpkd.topk_distill_loss(s, ids, logp, **opts)
    assert loss.item() == pytest.approx(eager.item(), rel=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(eager, s)[0])


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_topk_teacher_matches_float64_reference(tail, dtype, tol):
    n, v, k, temperature = 9, 513, 17, 1.3
    s = logits(n, v, 3.0, dtype, seed=28).requires_grad_(True)
    teacher = logits(n, v, 3.0, seed=29).double()
    lp_full = torch.log_softmax(teacher, -1)
    logp, ids = lp_full.topk(k, dim=-1)
    got = dpkd.topk_forward_kl(s, ids, logp.float(), temperature=temperature, tail=tail, reduction="sum")
    got.backward()
    s64 = s.detach().double().requires_grad_(True)
    lq = torch.log_softmax(s64 / temperature, -1)
    lq_k = lq.gather(1, ids)
    ref = (logp.exp() * (logp - lq_k)).sum(-1)
    if tail:
        p_tail = 1 - logp.exp().sum(-1)
        q_tail = 1 - lq_k.exp().sum(-1)
        ref = ref + p_tail * (p_tail.log() - q_tail.log())
    ref.sum().backward()
    assert got.item() == pytest.approx(ref.sum().item(), rel=tol)
    assert rel_err(s.grad, s64.grad) < tol
    assert s.grad.dtype == dtype


def test_topk_teacher_validates_inputs():
    s = logits(3, 10, seed=30)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    with pytest.raises(ValueError, match="teacher_ids"):
        dpkd.topk_forward_kl(s, ids + 9, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="teacher_logprobs"):
        dpkd.topk_forward_kl(s, ids, torch.zeros(3, 3))
    logp = torch.log(torch.tensor([[0.5, 0.25]] * 3))
    for bad, kw, match in ((torch.full((3, 2), float("nan")), {}, "NaN"),  # was a loss of exactly 0
                           (logp + 1.0, {}, "<= 0"),
                           (torch.log(torch.tensor([[0.7, 0.6]] * 3)), dict(tail=True), "more than probability 1"),
                           (torch.log(torch.tensor([[0.7, 0.6]] * 3)), {}, "more than probability 1"),
                           (logp, dict(labels=torch.zeros(2, dtype=torch.long)), "labels must have shape"),
                           (logp, dict(mask=torch.ones(3)), "mask must be bool"),
                           (logp, dict(temperature=float("inf")), "temperature")):
        with pytest.raises((ValueError, TypeError), match=match):
            dpkd.topk_forward_kl(s, ids, bad, **kw)
    dpkd.topk_forward_kl(s, ids, torch.log(torch.tensor([[0.7, 0.3]] * 3)), tail=True)  # all the mass: no tail
    for value in (float("nan"), float("inf")):  # +inf was a NaN loss: its log-sum-exp is +inf, not NaN
        bad = s.clone()
        bad[1, 7] = value
        with pytest.raises(ValueError, match="student_logits contains NaN or \\+inf"):
            dpkd.topk_forward_kl(bad, ids, logp)


def test_topk_teacher_compiles_without_graph_breaks():
    s = logits(6, 50, seed=33).requires_grad_(True)
    ids = torch.topk(logits(6, 50, seed=34), 5).indices
    logp = torch.log_softmax(logits(6, 5, seed=35), -1) - 0.1
    compiled = torch.compile(lambda s: dpkd.topk_forward_kl(s, ids, logp, tail=True), fullgraph=True,
                             backend="aot_eager")
    loss = compiled(s)
    loss.backward()
    s2 = s.detach().clone().requires_grad_(True)
    eager = dpkd.topk_forward_kl(s2, ids, logp, tail=True)
    eager.backward()
    assert loss.item() == pytest.approx(eager.item(), rel=1e-6)
    torch.testing.assert_close(s.grad, s2.grad)


def op_inputs(n, v, k, dtype, seed):
    """Inputs of the op dpkd::topk_distill that reach its edge cases: ids on 32-id word boundaries and at V - 1, a
    padded column among the ids, labels inside and outside the ids, ignored and out of range, a NaN row, a row
    without a finite logit, a row without weight and one of negative weight."""
    s = logits(n, v, 4.0, seed=seed)
    s[:, -3:] = -math.inf
    logp, ids = torch.log_softmax(logits(n, v, 4.0, seed=seed + 1).double(), -1).topk(k, dim=-1)
    fixed = list(dict.fromkeys(j for j in (0, 31, 32, v - 1, v - 2) if j < v))[:k]
    ids[0] = torch.tensor(fixed + [j for j in range(v) if j not in fixed][: k - len(fixed)])
    labels = torch.stack([ids[i, i % k] if i % 2 == 0 else torch.tensor((i * 37) % v) for i in range(n)])
    if n > 2:
        labels[1], labels[2] = -100, v + 5  # ignored; out of range: no label either
    if n > 4:
        s[3, 5] = math.nan
        s[4] = -math.inf
    weight = torch.linspace(-0.5, 2.0, n)
    weight[min(5, n - 1)] = 0.0
    return s.to(dtype), ids, logp.float(), labels, weight


OP_CASES = [("forward_kl", 0.5, 0.1), ("reverse_kl", 0.5, 0.1), ("jsd", 0.3, 0.1), ("jsd", 1.0, 0.1),
            ("skew_kl", 0.5, 0.2), ("skew_reverse_kl", 0.5, 0.0), ("tvd", 0.5, 0.1)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("div,beta,alpha", OP_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,v,k", [(8, 1000, 20), (7, 33, 33), (1, 32, 3), (3, 400_000, 64)])
def test_cuda_kernel_matches_the_cpu_one(div, beta, alpha, dtype, n, v, k):
    """The CUDA kernel (a block per row, the ids in a shared-memory bitmap: V 400000 needs more than 48 KB of it)
    against the CPU's, which the tests above hold to float64 references: loss, statistics and gradient, with hard
    labels at temperature 1 and 1.7, the tail on and off, K = V, NaN rows and padded columns."""
    s, ids, logp, labels, weight = op_inputs(n, v, k, dtype, seed=40)
    for temperature, tail, w in ((1.0, True, 0.3), (1.7, False, 0.3), (1.7, True, 0.0)):
        args = (div, beta, alpha, temperature, tail, w, -100)
        cpu = torch.ops.dpkd.topk_distill(s, ids, logp, labels, weight, *args)
        gpu = [t.cpu() for t in torch.ops.dpkd.topk_distill(s.cuda(), ids.cuda(), logp.cuda(), labels.cuda(),
                                                            weight.cuda(), *args)]
        for name, a, b in zip(("loss", "stats"), cpu[:2], gpu[:2]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, equal_nan=True, msg=f"{name} {args}")
        finite = cpu[2].float().isfinite().all(-1)
        assert (gpu[2].float().isnan() == cpu[2].float().isnan()).all()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_err(gpu[2][finite].float(), cpu[2][finite].float()) < tol, args
        assert gpu[2].dtype == dtype
        loss_only = torch.ops.dpkd.topk_distill(s.cuda(), ids.cuda(), logp.cuda(), labels.cuda(), None, *args)
        torch.testing.assert_close(loss_only[0].cpu(), gpu[0], equal_nan=True)
        assert loss_only[2].numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_op_rows_with_ids_out_of_range_or_repeated_are_nan(device):
    """Under torch.compile the teacher's rows are not checked in Python: the op itself must not read outside a row,
    nor let a repeated id's value depend on which write lands last (CUDA). Such a row's loss, gradient and teacher
    statistics are NaN; the other rows are untouched."""
    s, ids, logp, labels, weight = op_inputs(4, 100, 6, torch.float32, seed=41)
    s, ids, logp, labels, weight = (t.to(device) for t in (s, ids, logp, labels, weight))
    args = ("jsd", 0.5, 0.1, 1.0, True, 0.0, -100)
    want = torch.ops.dpkd.topk_distill(s, ids, logp, labels, weight, *args)
    for bad_id in (-1, 100, 1 << 40, int(ids[2, 4])):
        bad = ids.clone()
        bad[2, 1] = bad_id
        got = torch.ops.dpkd.topk_distill(s, bad, logp, labels, weight, *args)
        assert got[0][2].isnan() and got[2][2].isnan().all() and got[1][2, 1].isnan() and got[1][2, 4].isnan()
        rows = [0, 1, 3]
        torch.testing.assert_close(got[0][rows], want[0][rows], equal_nan=True)
        torch.testing.assert_close(got[2][rows], want[2][rows], equal_nan=True)
    # The Python layer's other faults, as the kernels see them: a log-probability above 0, NaN, mass above 1, and
    # (reverse KL with the tail) no mass left for it; rounding-sized excesses pass
    for column, value, div, ok in ((1, 0.5, "jsd", False), (1, math.nan, "jsd", False), (1, 5e-4, "jsd", True),
                                   (None, 1.2, "jsd", False), (1, 0.0, "reverse_kl", False), (1, 0.0, "jsd", True),
                                   (None, 1 + 5e-4, "jsd", True)):
        bad = logp.clone()
        if column is None:  # rescaled to that mass
            bad[2] = bad[2] - torch.logsumexp(bad[2].double(), 0).float() + math.log(value)
        else:  # the rest of the row nearly empty, so that only this value can be at fault (mass 1 + 5e-17 for 0)
            bad[2] = -40.0
            bad[2, column] = value
        got = torch.ops.dpkd.topk_distill(s, ids, bad, labels, weight, div, *args[1:])
        assert got[0][2].isnan() != ok and got[2][2].isnan().all() != ok, (column, value, div)
        assert got[0][[0, 1, 3]].isfinite().all()
    with pytest.raises(ValueError, match="teacher_logprobs must have teacher_ids' shape"):
        torch.ops.dpkd.topk_distill(s, ids, logp[:, :3], labels, weight, *args)
    with pytest.raises(ValueError, match="grad_weight must be a floating tensor of shape"):
        torch.ops.dpkd.topk_distill(s, ids, logp, labels, weight[:2], *args)
    with pytest.raises(TypeError, match="teacher_ids must be int64"):
        torch.ops.dpkd.topk_distill(s, ids.int(), logp, labels, weight, *args)
