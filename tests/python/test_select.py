"""Token selection rules against plain loop references, per-sequence independence, composition."""

from __future__ import annotations

import math

import pytest
import torch

import dpkd
from dpkd import select


def stats(b=4, t=13, seed=0, ties=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, t, generator=g)
    if ties:
        x = (x * 5).round() / 5  # many ties
    valid = torch.rand(b, t, generator=g) > 0.25
    valid[:, 0] = True
    return x, valid


def loop_top_fraction(score, fraction, valid, largest=True):
    out = torch.zeros_like(valid)
    for i in range(score.shape[0]):
        idx = [j for j in range(score.shape[1]) if valid[i, j]]
        k = math.ceil(fraction * len(idx) - 1e-9)
        # stable: higher score first, ties to the earlier position
        idx.sort(key=lambda j: (-score[i, j].item() if largest else score[i, j].item(), j))
        for j in idx[:k]:
            out[i, j] = True
    return out


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("largest", [True, False])
def test_top_fraction_per_sequence_matches_loop(fraction, largest):
    x, valid = stats()
    got = select.top_fraction(x, fraction, valid=valid, largest=largest)
    assert torch.equal(got, loop_top_fraction(x, fraction, valid, largest))


@pytest.mark.parametrize("largest", [True, False])
def test_selection_op_equals_stable_sort_on_long_rows(largest):
    """The C++ selection (nth_element) against the PyTorch stable sort, on rows long enough to run in
    parallel, with ties (including -0 against +0), padding, and non-finite scores."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(16, 4099, generator=g) * 3).round() / 2
    x[x == 0] = -0.0
    x[0, :7] = float("nan")
    x[1, 3] = float("inf")
    valid = torch.rand(16, 4099, generator=g) > 0.2
    valid[2] = False  # a sequence of padding only
    finite = x.nan_to_num(nan=math.nan, posinf=torch.finfo(torch.float32).max)  # inf ranks as the largest float
    for fraction in (0.0, 0.07, 0.3, 1.0):
        got = select.top_fraction(x, fraction, valid=valid, largest=largest)
        v = valid & ~torch.isnan(x)
        ref = select._top_fraction_by_sorting(finite, v, fraction, largest)
        assert torch.equal(got, ref)
        assert torch.equal(torch.ops.dpkd.select_top_fraction(finite, valid, fraction, largest), ref)  # NaN: invalid
        assert torch.equal(got.sum(-1), torch.tensor([math.ceil(fraction * int(n) - 1e-9) for n in v.sum(-1)]))


@pytest.mark.skipif(not (torch.cuda.is_available() and dpkd.with_cuda), reason="needs a GPU and dpkd built with CUDA")
@pytest.mark.parametrize("largest", [True, False])
def test_cuda_selection_op_equals_cpu_op(largest):
    """CUB's radix sort against the CPU op: ties (-0 against +0 included), padding-only rows, non-finite
    scores, one long row (the batch scope), one column, and the count's rounding on a long row."""
    g = torch.Generator().manual_seed(12)
    for rows, cols in ((16, 4099), (1, 300001), (37, 1), (3, 7), (600, 33)):
        x = (torch.randn(rows, cols, generator=g) * 3).round() / 2
        x[(x == 0) & (torch.rand(rows, cols, generator=g) < 0.5)] = -0.0  # half of the zeros are -0
        x[0, :3] = float("nan")
        x[-1, -1] = float("inf")
        valid = torch.rand(rows, cols, generator=g) > 0.2
        if rows > 1:
            valid[rows // 2] = False  # a sequence of padding only
        if rows * cols > 100:  # (-0 is 3/4 of the zeros: round() of small negatives gives -0 as well)
            assert ((x == 0) & x.signbit()).any() and ((x == 0) & ~x.signbit()).any()
        for fraction in (0.0, 0.07, 0.3, 1.0):
            ref = torch.ops.dpkd.select_top_fraction(x, valid, fraction, largest)
            got = torch.ops.dpkd.select_top_fraction(x.cuda(), valid.cuda(), fraction, largest)
            assert got.device.type == "cuda" and torch.equal(got.cpu(), ref), (rows, cols, fraction)
            assert ref.any() or fraction == 0
    n = 34952550  # 0.56 * n rounds to 19573428 under a fused multiply-subtract
    x = (torch.rand(1, n, generator=g) * 1000).round()  # many ties
    valid = torch.ones_like(x, dtype=torch.bool)
    got = torch.ops.dpkd.select_top_fraction(x.cuda(), valid.cuda(), 0.56, largest).cpu()
    assert int(got.sum()) == 19573429
    assert torch.equal(got, torch.ops.dpkd.select_top_fraction(x, valid, 0.56, largest))


def test_rules_compile_without_graph_breaks():
    """torch.compile(fullgraph=True) through a rule (the op has a fake kernel; which kernel to use is a plain
    lookup) and through a loss that applies one. The op returns a contiguous mask whatever the score's layout,
    and so does its fake kernel (inductor checks the strides: a transposed score failed there)."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(lambda x: select.top_fraction(x, 0.3), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), select.top_fraction(x, 0.3))
    xt = torch.randn(16, 8, generator=torch.Generator().manual_seed(3)).t()
    torch.library.opcheck(torch.ops.dpkd.select_top_fraction.default, (xt, xt > -1, 0.3, True))
    inductor = torch.compile(lambda x: select.top_fraction(x, 0.3).float().sum(-1), fullgraph=True)
    assert torch.equal(inductor(xt), select.top_fraction(xt, 0.3).float().sum(-1))
    s = torch.randn(4, 16, 50, generator=torch.Generator().manual_seed(1))
    t = torch.randn(4, 16, 50, generator=torch.Generator().manual_seed(2))

    def loss(s, t):
        return dpkd.distill_loss(s, t, divergence="jsd",
                                 select=lambda st, v: select.entropy_top_fraction(st.student_entropy, 0.5, valid=v))

    torch.testing.assert_close(torch.compile(loss, fullgraph=True, backend="aot_eager")(s, t), loss(s, t))
    # Every rule that takes no generator (entropy_sampling's torch.Generator cannot enter a graph)
    st = dpkd.token_stats(s, t)
    rate = torch.tensor([0.0, 0.3, 0.8, 1.0])
    rules = [lambda: select.tip(st.student_entropy, st.divergence, fraction=0.3),
             lambda: select.relative_confidence(-st.student_entropy, -st.teacher_entropy, fraction=0.4),
             lambda: select.highest_surprisal(-st.student_entropy, 0.25),
             lambda: select.teacher_entropy_weights(st.teacher_entropy, vocab_size=50),
             lambda: select.paced_weights(rate, alpha=0.5, tokens_per_sequence=16)]
    for rule in rules:
        torch.testing.assert_close(torch.compile(lambda: rule().values, fullgraph=True, backend="aot_eager")(),
                                   rule().values)


def test_valid_may_be_any_mask_dtype():
    x, valid = stats(seed=3)
    for as_dtype in (torch.uint8, torch.int64, torch.float32):
        assert torch.equal(select.top_fraction(x, 0.4, valid=valid.to(as_dtype)), select.top_fraction(x, 0.4, valid=valid))


def test_fraction_of_a_whole_number_of_tokens_is_that_number():
    x = torch.arange(100.0)
    assert int(select.top_fraction(x, 0.07).sum()) == 7  # 0.07 * 100 = 7.000000000000001
    assert int(select._top_fraction_by_sorting(x[None], torch.ones(1, 100, dtype=torch.bool), 0.07, True).sum()) == 7
    # As the C++ count (its gtest has the same case): the product rounded before the slack is taken, which a
    # fused multiply-subtract would not (19573428 here).
    assert int(select._selected_count(0.56, torch.tensor(34952550))) == 19573429


def test_selection_op_names_bad_arguments():
    s, v = torch.rand(2, 5), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="valid must have the shape"):
        torch.ops.dpkd.select_top_fraction(s, v[:, :3], 0.5, True)
    with pytest.raises(TypeError, match="score must be float32"):
        torch.ops.dpkd.select_top_fraction(s.double(), v, 0.5, True)
    with pytest.raises(ValueError, match="fraction must be in"):
        torch.ops.dpkd.select_top_fraction(s, v, 1.5, True)


def test_top_fraction_batch_scope_ranks_across_sequences():
    x, valid = stats(seed=1)
    got = select.top_fraction(x, 0.3, valid=valid, scope="batch")
    ref = loop_top_fraction(x.reshape(1, -1), 0.3, valid.reshape(1, -1)).reshape(x.shape)
    assert torch.equal(got, ref)


def test_tip_quadrants_match_definition():
    h, valid = stats(seed=2, ties=False)
    d, _ = stats(seed=3, ties=False)
    hi_h = loop_top_fraction(h, 0.5, valid)
    hi_d = loop_top_fraction(d, 0.5, valid)
    assert torch.equal(select.tip(h, d, quadrant="q1", valid=valid).values, hi_h)
    q2 = select.tip(h, d, quadrant="q2", valid=valid).values
    assert torch.equal(q2, ~hi_h & hi_d & valid)
    assert torch.equal(select.tip(h, d, valid=valid).values, hi_h | q2)
    thr = select.tip(h, d, quadrant="q2", entropy_threshold=0.3, divergence_threshold=0.6, valid=valid).values
    assert torch.equal(thr, (h <= 0.3) & (d > 0.6) & valid)


def test_entropy_sampling_is_seeded_sized_and_never_picks_zero_entropy():
    h, valid = stats(seed=4, ties=False)
    h[0, 3] = 0.0
    a = select.entropy_sampling(h, 0.5, generator=torch.Generator().manual_seed(7), valid=valid).values
    b = select.entropy_sampling(h, 0.5, generator=torch.Generator().manual_seed(7), valid=valid).values
    assert torch.equal(a, b)
    live = valid & (h > 0)
    assert torch.equal(a.sum(-1), torch.ceil(0.5 * live.sum(-1).float()).long())
    assert not a[0, 3] and not (a & ~valid).any()
    # Proportional to entropy: over many draws a high-entropy token is picked more often.
    h2 = torch.tensor([[0.1, 1.0, 0.1, 0.1]])
    g = torch.Generator().manual_seed(0)
    picks = sum(select.entropy_sampling(h2, 0.25, generator=g).values.float() for _ in range(400))
    assert picks[0, 1] > 2 * picks[0, 0]


def test_confidence_surprisal_and_weight_rules():
    lq, valid = stats(seed=5, ties=False)
    lp, _ = stats(seed=6, ties=False)
    lq, lp = -lq * 3, -lp * 3
    rc = select.relative_confidence(lq, lp, fraction=0.3, valid=valid).values
    assert torch.equal(rc, loop_top_fraction(lp - lq, 0.3, valid))
    sh = select.highest_surprisal(lq, 0.4, valid=valid).values
    assert torch.equal(sh, loop_top_fraction(lq, 0.4, valid, largest=False))
    ht = torch.tensor([[0.0, math.log(100) / 2, math.log(100)]])
    w = select.teacher_entropy_weights(ht, vocab_size=100).values
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.5, 0.0]]))
    pw = select.paced_weights(torch.tensor([0.0, 0.5, 1.0]), alpha=1.0, beta=2.0, tokens_per_sequence=3).values
    torch.testing.assert_close(pw[:, 0], torch.tensor([0.0, 0.125, 0.0]))
    assert pw.shape == (3, 3)
    with pytest.raises(ValueError, match="pass_rate"):
        select.paced_weights(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="alpha and beta"):
        select.paced_weights(torch.tensor([0.0, 0.5]), alpha=-1.0)


def test_composition_and_privacy_scope():
    h, valid = stats(seed=7)
    a = select.entropy_top_fraction(h, 0.5, valid=valid)
    b = select.highest_surprisal(-h, 0.5, valid=valid, scope="batch")
    assert torch.equal((a & b).values, a.values & b.values) and (a & b).scope == "batch"
    assert torch.equal((a | a).values, a.values)
    w = select.teacher_entropy_weights(h, vocab_size=10)
    torch.testing.assert_close((a * w).values, a.values.float() * w.values)
    a.check_private()
    with pytest.raises(ValueError, match="DP"):
        (a & b).check_private()
    with pytest.raises(TypeError):
        a & w
    with pytest.raises(TypeError):
        select.Selection(valid)  # a hand-made mask says its scope
    for combine in (lambda: a & (h > 0.5), lambda: a | valid, lambda: a * w.values):  # a tensor's scope is unknown
        with pytest.raises(TypeError, match="wrap a tensor as Selection"):
            combine()
    assert (a & select.Selection(valid, "sequence")).scope == "sequence"


def test_distill_loss_select_equals_weights_and_skips_unselected_tokens():
    g = torch.Generator().manual_seed(8)
    s = (torch.randn(3, 11, 50, generator=g) * 3).requires_grad_(True)
    t = torch.randn(3, 11, 50, generator=g) * 3

    def rule(st, valid):
        return select.entropy_top_fraction(st.student_entropy, 0.5, valid=valid)

    loss = dpkd.forward_kl(s, t, select=rule, reduction="sum")
    loss.backward()
    h = dpkd.token_stats(s, t).student_entropy
    mask = select.entropy_top_fraction(h, 0.5).values
    s2 = s.detach().clone().requires_grad_(True)
    ref = dpkd.forward_kl(s2, t, weights=mask.float(), reduction="sum", fuse_backward=False)  # as select= runs
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.equal(s.grad, s2.grad)
    assert (s.grad[~mask] == 0).all() and (s.grad[mask] != 0).any()


def test_per_sequence_selection_depends_on_its_own_sequence_only():
    g = torch.Generator().manual_seed(9)
    s = torch.randn(4, 17, 40, generator=g) * 3
    t = torch.randn(4, 17, 40, generator=g) * 3
    labels = torch.randint(0, 40, (4, 17), generator=g)

    def masks(s):
        st = dpkd.token_stats(s, t, labels=labels, divergence="jsd")
        return [select.tip(st.student_entropy, st.divergence).values,
                select.entropy_top_fraction(st.student_entropy, 0.3).values,
                select.relative_confidence(st.student_label_logprob, st.teacher_label_logprob).values,
                select.entropy_sampling(st.student_entropy, 0.4, generator=torch.Generator().manual_seed(1)).values]

    before = masks(s)
    s2 = s.clone()
    s2[1] = torch.randn(17, 40, generator=g) * 10  # another example in sequence 1
    after = masks(s2)
    for m0, m1 in zip(before, after):
        keep = [0, 2, 3]
        assert torch.equal(m0[keep], m1[keep])
    # Batch scope is not independent: the same change moves other sequences' selections.
    st0 = dpkd.token_stats(s, t).student_entropy
    st1 = dpkd.token_stats(s2, t).student_entropy
    b0 = select.top_fraction(st0, 0.3, scope="batch")
    b1 = select.top_fraction(st1, 0.3, scope="batch")
    assert not torch.equal(b0[[0, 2, 3]], b1[[0, 2, 3]])


def test_infinite_scores_rank_as_extremes_and_nan_is_no_score():
    """SHRED: log q[label] = -inf is the most surprising token, not an invalid one."""
    z = torch.randn(1, 6, 11, generator=torch.Generator().manual_seed(3))
    z[0, 2, 3] = float("-inf")
    labels = torch.tensor([[0, 1, 3, 2, 4, 5]])
    st = dpkd.token_stats(z, torch.randn(1, 6, 11), labels=labels)
    assert st.student_label_logprob[0, 2] == float("-inf")
    picked = select.highest_surprisal(st.student_label_logprob, 0.2, valid=labels != -100).values
    assert picked[0, 2] and int(picked.sum()) == 2
    score = torch.tensor([[1.0, float("inf"), float("nan"), 0.5]])
    assert torch.equal(select.top_fraction(score, 0.34), torch.tensor([[True, True, False, False]]))
    assert torch.equal(select._top_fraction_by_sorting(score.nan_to_num(posinf=3e38), ~score.isnan(), 0.34, True),
                       torch.tensor([[True, True, False, False]]))


def test_a_rule_must_return_a_selection():
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    with pytest.raises(TypeError, match="Selection"):
        dpkd.distill_loss(s, t, select=lambda st, v: st.student_entropy > 1.0)


def test_a_rule_of_label_statistics_needs_labels():
    """Without labels the label log-probabilities are NaN: a rule of them selected nothing (a zero loss, no error)."""
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    h, h_t, w = torch.randn(2, 4, 9), torch.randn(2, 4, 9), torch.eye(9)
    ids, logp = torch.arange(3).repeat(2, 4, 1), torch.full((2, 4, 3), -2.0)

    def rule(st, valid):
        return dpkd.select.highest_surprisal(st.student_label_logprob, 0.5, valid=valid)

    for loss in (lambda **kw: dpkd.distill_loss(s, t, **kw), lambda **kw: dpkd.topk_distill_loss(s, ids, logp, **kw),
                 lambda **kw: dpkd.fused_linear_distill_loss(h, w, h_t, w, **kw)):
        with pytest.raises(ValueError, match="read student_label_logprob, which needs labels="):
            loss(select=rule)
        with pytest.raises(ValueError, match="read teacher_label_logprob, which needs labels="):  # by position
            loss(select=lambda st, v: dpkd.select.top_fraction(st[4], 0.5, valid=v))
        with pytest.raises(ValueError, match="read student_label_logprob, which needs labels="):
            loss(select=lambda st, v: dpkd.select.top_fraction(st[2:][1], 0.5, valid=v))
        assert loss(select=lambda st, v: dpkd.select.entropy_top_fraction(st[0], 0.5, valid=v)) > 0
        assert loss(select=rule, labels=torch.randint(0, 9, (2, 4))) > 0
    with pytest.raises(ValueError, match="read divergence, which select_reads='student' does not form"):
        dpkd.fused_linear_distill_loss(h, w, h_t, w, select_reads="student",
                                       select=lambda st, v: dpkd.select.top_fraction(st.divergence, 0.5, valid=v))


def test_a_rule_without_valid_gives_padding_no_place_in_its_quota():
    """The rule sees NaN statistics where no loss is carried, so a rule called without valid= still ranks only real
    tokens (uniform logits at ignored positions would otherwise win the top entropy places)."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    s[1, :2] = 0.0  # maximal entropy, but ignored
    labels = torch.randint(0, 11, (2, 6))
    labels[1, :2] = -100
    seen = {}

    def rule(stats, valid):
        chosen = select.entropy_top_fraction(stats.student_entropy, 0.5)  # no valid=
        seen["values"] = chosen.values
        return chosen

    dpkd.distill_loss(s, t, labels=labels, select=rule)
    assert not seen["values"][1, :2].any() and int(seen["values"][1].sum()) == 2


def test_rules_check_their_arguments():
    """Found by a user-trial helper: [T] against [B, T] statistics broadcast silently (and mismatched ones raised a
    bare broadcasting error, or one naming valid=); a negative power gave teacher_entropy_weights weights up to
    3.4e38; a NaN pass rate gave a NaN weight; an integer valid= raised inside torch.where."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.rand(3, 7, generator=g), torch.rand(3, 7, generator=g)
    for call in (lambda: select.relative_confidence(a[0], b), lambda: select.relative_confidence(a, b[:, :6]),
                 lambda: select.tip(a, b[:, :1])):
        with pytest.raises(ValueError, match="must have one shape"):
            call()
    with pytest.raises(ValueError, match="power must be >= 0"):
        select.teacher_entropy_weights(a, vocab_size=50, power=-1)
    w = select.teacher_entropy_weights(a, vocab_size=50, valid=(b > 0.5).long()).values
    torch.testing.assert_close(w, torch.where(b > 0.5, 1 - a / math.log(50), 0))
    with pytest.raises(ValueError, match="pass_rate must be in"):
        select.paced_weights(torch.tensor([float("nan"), 0.5]))
    with pytest.raises(ValueError, match=r"pass_rate must be \[B\]"):
        select.paced_weights(torch.tensor([[0.2], [0.5]]), tokens_per_sequence=3)


def test_combining_needs_one_shape_and_no_score_weighs_zero():
    """From an audit: Selections of different shapes broadcast (a PACED [B] weight times a [B, T] mask weighted token
    t of every sequence by sequence t's pass rate, under 'sequence' scope, so DP accepted it); SRPO with power 0 gave
    weight 1 where the statistic is NaN (NaN ** 0 = 1); tokens_per_sequence and tip's unused fraction were unchecked."""
    S = select
    h = torch.rand(4, 4)
    mask = S.entropy_top_fraction(h, 0.5)
    with pytest.raises(ValueError, match=r"need one shape, got \(4,\) and \(4, 4\)"):
        S.paced_weights(torch.tensor([0.0, 0.5, 0.5, 0.5])) * mask
    with pytest.raises(ValueError, match="need one shape"):
        mask & S.entropy_top_fraction(h[:1], 0.5)
    spread = S.paced_weights(torch.tensor([0.0, 0.5, 0.5, 0.5]), tokens_per_sequence=4) * mask
    assert (spread.values[0] == 0).all() and spread.scope == "sequence"
    w = S.teacher_entropy_weights(torch.tensor([[0.5, math.nan]]), vocab_size=10, power=0.0).values
    assert w.tolist() == [[1.0, 0.0]]
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="tokens_per_sequence must be a positive int"):
            S.paced_weights(torch.tensor([0.5]), tokens_per_sequence=bad)
    with pytest.raises(ValueError, match="fraction must be in"):
        S.tip(h, h, fraction=7.0, entropy_threshold=0.5, divergence_threshold=0.5)
