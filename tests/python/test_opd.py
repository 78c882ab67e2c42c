"""The DP-OPD loop end to end on tiny models."""

from __future__ import annotations

import contextlib

import pytest
import torch

import dpkd
from dpkd import accounting, opd, select


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=17, d=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(vocab, d)
        self.mix = torch.nn.Linear(2 * d, d)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        e = self.emb(ids)
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], 1)  # causal: token and its predecessor
        return self.head(self.norm(torch.tanh(self.mix(torch.cat([e, prev], -1)))))


def data(n=40, p=4, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 17, (n, p), generator=g), torch.randint(0, 17, (n, m), generator=g)


def trainer(method="dp_opd", steps=4, **kw):
    prompts, conts = data()
    cfg = opd.OPDConfig(method=method, steps=steps, expected_batch_size=6, max_new_tokens=5, num_samples=2,
                        target_epsilon=4.0, **kw)
    return opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts, cfg)


def test_only_continuation_tokens_carry_loss():
    prompts, _ = data()
    cfg = opd.OPDConfig()
    seqs = opd.sample_continuations(TinyLM(seed=1), prompts[:3], num_samples=2, max_new_tokens=5,
                                    generator=torch.Generator().manual_seed(0))
    assert seqs.shape == (6, 9) and torch.equal(seqs[::2, :4], prompts[:3])
    _, per_token, _ = opd.continuation_losses(TinyLM(seed=1), TinyLM(seed=2), seqs, 4, cfg)
    assert (per_token[:, :3] == 0).all() and (per_token[:, 3:] > 0).all()


def test_teacher_gets_no_gradient_and_epsilon_matches_accounting():
    t = trainer(steps=5)
    teacher_before = [p.clone() for p in t.teacher.parameters()]
    history = t.train(progress=False)
    assert len(history) == 5 and all(p.grad is None for p in t.teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, t.teacher.parameters()))
    expected = accounting.epsilon(noise_multiplier=t.noise_multiplier, sample_rate=t.sample_rate, steps=5,
                                  delta=t.delta)
    assert history[-1]["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert expected <= 4.0  # sigma was calibrated for exactly these 5 steps


@pytest.mark.parametrize("method", ["dp_opd", "kd", "dp_sft", "dp_offpolicy_kd"])
def test_resume_continues_identically(method, tmp_path):
    straight = trainer(method, steps=4)
    straight.train(progress=False)
    first = trainer(method, steps=4)
    for _ in range(2):
        first.step()
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    resumed = trainer(method, steps=4)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    resumed.train(progress=False)
    for a, b in zip(straight.student.parameters(), resumed.student.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_selection_under_dp_must_be_per_sequence():
    t = trainer(steps=2)
    t.select = lambda st, valid: select.entropy_top_fraction(st.student_entropy, 0.5, valid=valid, scope="batch")
    with pytest.raises(ValueError, match="DP"):
        for _ in range(3):
            t.step()
    t.select = lambda st, valid: select.entropy_top_fraction(st.student_entropy, 0.5, valid=valid)
    m = t.step()
    assert m["batch"] == 0 or 0.4 <= m["selected_fraction"] <= 0.7


def test_metrics_and_json_log(tmp_path):
    prompts, conts = data()
    log = tmp_path / "log.jsonl"
    t = opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts,
                       opd.OPDConfig(steps=3, expected_batch_size=6, max_new_tokens=4, target_epsilon=2.0),
                       log_path=str(log))
    t.train(progress=False)
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and '"epsilon"' in lines[0] and '"norm_p90"' in lines[0]


def test_training_stops_at_the_target_epsilon():
    prompts, conts = data()
    cfg = opd.OPDConfig(steps=50, expected_batch_size=6, max_new_tokens=3, noise_multiplier=1.0, target_epsilon=3.0)
    t = opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts, cfg)
    history = t.train(progress=False)
    assert len(history) == t.total_steps < 50
    assert history[-1]["epsilon"] <= 3.0
    assert accounting.epsilon(noise_multiplier=1.0, sample_rate=t.sample_rate, steps=t.total_steps + 1,
                              delta=t.delta) > 3.0
    with pytest.raises(RuntimeError, match="budget is spent"):  # step() by hand, as from a notebook
        t.step()
    assert t.steps_done == t.total_steps and t.epsilon <= 3.0


def test_a_noise_multiplier_that_cannot_afford_one_step_is_refused():
    prompts, conts = data()
    cfg = opd.OPDConfig(steps=50, expected_batch_size=6, max_new_tokens=3, noise_multiplier=0.3, target_epsilon=0.5)
    with pytest.raises(ValueError, match="single step"):
        opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts, cfg)


def test_csv_log(tmp_path):
    prompts, conts = data()
    log = tmp_path / "log.csv"
    t = opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts,
                       opd.OPDConfig(steps=2, expected_batch_size=6, max_new_tokens=3, target_epsilon=2.0),
                       log_path=str(log))
    t.train(progress=False)
    lines = log.read_text().splitlines()
    assert lines[0].startswith("step,loss,epsilon") and len(lines) == 3


def test_hugging_face_student_and_teacher_with_kv_cache_sampling():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=17, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    student, teacher = transformers.GPT2LMHeadModel(cfg), transformers.GPT2LMHeadModel(cfg)
    prompts, conts = data()
    seqs = opd.sample_continuations(student, prompts[:2], num_samples=2, max_new_tokens=5,
                                    generator=torch.Generator().manual_seed(3))
    again = opd.sample_continuations(student, prompts[:2], num_samples=2, max_new_tokens=5,
                                     generator=torch.Generator().manual_seed(3))
    assert seqs.shape == (4, 9) and torch.equal(seqs, again) and torch.equal(seqs[::2, :4], prompts[:2])
    t = opd.OPDTrainer(student, teacher, prompts, conts,
                       opd.OPDConfig(steps=2, expected_batch_size=6, max_new_tokens=5, num_samples=2,
                                     target_epsilon=3.0))
    history = t.train(progress=False)
    assert len(history) == 2 and all(p.grad is None for p in teacher.parameters())


def test_ground_truth_mixing_replaces_whole_examples():
    prompts, conts = data()
    for fraction, expect_truth in ((1.0, True), (0.0, False)):
        t = opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts,
                           opd.OPDConfig(steps=1, expected_batch_size=6, max_new_tokens=4, num_samples=2,
                                         ground_truth_fraction=fraction, target_epsilon=2.0))
        rows = torch.arange(5)
        seqs, p_len = t._sequences(rows)
        truth = torch.cat([prompts[rows], conts[rows][:, :4]], 1).repeat_interleave(2, 0)
        assert p_len == 4 and torch.equal(seqs, truth) == expect_truth


def test_teacher_vocabulary_must_cover_the_students_tokens():
    prompts, conts = data()
    cfg = opd.OPDConfig(steps=2, expected_batch_size=6, max_new_tokens=5, num_samples=2, target_epsilon=4.0,
                        allow_vocab_mismatch=True)
    with pytest.raises(ValueError, match="outside the teacher's vocabulary of 17"):  # it samples ids 17-19 too
        opd.OPDTrainer(TinyLM(vocab=20, seed=1), TinyLM(seed=2), prompts, conts, cfg)


def test_a_wider_teacher_vocabulary_needs_the_opt_in():
    prompts, conts = data()
    kw = dict(steps=2, expected_batch_size=6, max_new_tokens=5, target_epsilon=4.0, divergence="reverse_kl")
    with pytest.raises(ValueError, match="allow_vocab_mismatch"):  # at construction, not with some batch
        opd.OPDTrainer(TinyLM(seed=1), TinyLM(vocab=20, seed=2), prompts, conts, opd.OPDConfig(**kw))
    t = opd.OPDTrainer(TinyLM(seed=1), TinyLM(vocab=20, seed=2), prompts, conts,
                       opd.OPDConfig(allow_vocab_mismatch=True, **kw))
    assert torch.isfinite(torch.tensor(t.step()["loss"]))  # reverse KL: the extra columns hold no student mass


def test_the_pld_accountant_affords_less_noise_for_the_same_target():
    rdp, pld = trainer(steps=5), trainer(steps=5, accountant="pld")
    assert pld.noise_multiplier < rdp.noise_multiplier
    history = pld.train(progress=False)
    assert len(history) == 5 and history[-1]["epsilon"] <= 4.0
    assert history[-1]["epsilon"] == pytest.approx(accounting.epsilon(
        noise_multiplier=pld.noise_multiplier, sample_rate=pld.sample_rate, steps=5, delta=pld.delta,
        accountant="pld"), rel=1e-12)
    assert pld.optimizer.state_dict()["accountant"]["mechanism"] == "pld"


def test_a_resumed_run_stops_at_its_own_target_whatever_the_history():
    """The stop rule reads the accountant's history: a checkpoint spent under other settings cannot take a
    resumed run past its target."""
    prompts, conts = data()
    spend = opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts,
                           opd.OPDConfig(steps=4, expected_batch_size=6, max_new_tokens=3, target_epsilon=8.0))
    for _ in range(3):
        spend.step()
    assert spend.epsilon > 2.0
    tight = opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts,
                           opd.OPDConfig(steps=4, expected_batch_size=6, max_new_tokens=3, target_epsilon=2.0))
    tight.load_state_dict(spend.state_dict())
    assert not tight.budget_allows_step() and tight.train(progress=False) == []
    with pytest.raises(RuntimeError, match="budget is spent"):
        tight.step()


def test_selection_applies_to_fine_tuning_too(tmp_path):
    """dp_sft with SHRED's highest surprisal: the rule sees the student's own label log-probabilities."""
    prompts, conts = data()
    seen = []

    def rule(stats, valid):
        seen.append(stats)
        return select.highest_surprisal(stats.student_label_logprob, 0.25, valid=valid)

    t = opd.OPDTrainer(TinyLM(seed=1), None, prompts, conts,
                       opd.OPDConfig(method="dp_sft", steps=2, expected_batch_size=12, max_new_tokens=4,
                                     target_epsilon=8.0), select=rule, log_path=str(tmp_path / "log.jsonl"))
    m = t.step()
    assert seen and 0.2 < m["selected_fraction"] < 0.5
    assert "NaN" not in (tmp_path / "log.jsonl").read_text() and "Infinity" not in (tmp_path / "log.jsonl").read_text()
    kd = opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts,
                        opd.OPDConfig(method="kd", steps=1, expected_batch_size=6, max_new_tokens=4),
                        log_path=str(tmp_path / "kd.jsonl"))
    kd.step()
    import json
    assert json.loads((tmp_path / "kd.jsonl").read_text())["epsilon"] is None  # infinite: no DP


@pytest.mark.parametrize("kwargs,match", [(dict(num_samples=2.5), "num_samples"), (dict(top_p=1.5), "top_p"),
                                          (dict(top_p=0.0), "top_p"), (dict(sample_temperature=0.0), "temperature"),
                                          (dict(beta=2.0), "beta"), (dict(loss_temperature=0.0), "loss_temperature"),
                                          (dict(select_reads="teacher"), "select_reads"),
                                          (dict(select_reads="student"), "applies to fused_head=True")])
def test_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        opd.OPDConfig(**kwargs)


def test_an_expected_batch_larger_than_the_prompts_is_refused():
    # As make_private: the rate would be 1 and every update divided by more examples than there are.
    prompts, conts = data()
    with pytest.raises(ValueError, match=rf"expected_batch_size \(41\) must be at most the number of prompts "
                                         rf"\({prompts.shape[0]}\)"):
        opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts,
                       opd.OPDConfig(steps=1, expected_batch_size=41, max_new_tokens=4, target_epsilon=8.0))


def test_on_policy_training_ignores_short_ground_truth():
    prompts, conts = data(m=2)  # shorter than max_new_tokens: unused on-policy
    t = opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts,
                       opd.OPDConfig(steps=1, expected_batch_size=6, max_new_tokens=4, target_epsilon=8.0))
    t.step()
    with pytest.raises(ValueError, match="fewer than max_new_tokens"):
        opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts,
                       opd.OPDConfig(steps=1, expected_batch_size=6, max_new_tokens=4, ground_truth_fraction=0.5))


def test_a_private_step_neither_raises_nor_skips_for_one_examples_non_finite_logits():
    """Whether a private step happens must not depend on one example: an example whose teacher logits are inf is
    dropped by the DP engine (its norm reads inf), and the others train."""
    prompts, conts = data()
    prompts[prompts == 16] = 3
    prompts[7, 3] = 16
    teacher, student = TinyLM(seed=2), TinyLM(seed=1)
    with torch.no_grad():
        teacher.emb.weight[16] = float("inf")
    cfg = opd.OPDConfig(method="dp_opd", steps=12, expected_batch_size=6, max_new_tokens=3, num_samples=1,
                        noise_multiplier=1.0, target_epsilon=None)
    t = opd.OPDTrainer(student, teacher, prompts, conts, cfg)
    seen = False
    for _ in range(12):
        state = t.generator.get_state()
        rows = t._batch().tolist()
        t.generator.set_state(state)
        t.step()
        if 7 in rows:
            seen = True
            norms = t.optimizer.last_per_example_norms
            assert not torch.isfinite(norms).all() and torch.isfinite(norms).any()
            assert all(torch.isfinite(p).all() for p in student.parameters())
    assert seen and t.steps_done == 12
    with pytest.raises(ValueError, match="teacher_logits contains NaN"):  # outside DP the error stands
        opd.OPDTrainer(TinyLM(seed=1), teacher, prompts, conts, opd.OPDConfig(
            method="kd", steps=12, expected_batch_size=40, max_new_tokens=3)).step()


def test_hugging_face_sampling_emits_eos_and_nothing_after_it_carries_loss():
    """The samples are the student's own distribution, EOS included (generate's min_new_tokens would suppress it);
    a row that stops early is filled up, and the filling is no part of the loss."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=17, n_positions=32, n_embd=16, n_layer=1, n_head=2, eos_token_id=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    student = transformers.GPT2LMHeadModel(cfg)
    bias = torch.zeros(17)
    bias[2] = 3.0  # p(eos) about 0.6 per token
    hook = student.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    prompts, _ = data()
    prompts[prompts == 2] = 5
    seqs = opd.sample_continuations(student, prompts[:8], num_samples=2, max_new_tokens=5,
                                    generator=torch.Generator().manual_seed(1))
    hook.remove()
    cont = seqs[:, 4:]
    assert seqs.shape == (16, 9) and (cont == 2).any(1).float().mean() > 0.5
    after = opd.after_eos(cont, [2])
    assert (cont[after] == 2).all()  # what follows a row's first EOS is filling
    config = opd.OPDConfig(eos_token_id=2)
    per_seq, per_token, _ = opd.continuation_losses(student, TinyLM(seed=2), seqs, 4, config)
    assert (per_token[:, 3:][after] == 0).all() and (per_token[:, 3:][~after] > 0).all()
    counted = (~after).sum(1)
    torch.testing.assert_close(per_seq, per_token[:, 3:].sum(1) / counted)


def test_a_resumed_run_with_dropout_goes_on_as_an_uninterrupted_one(tmp_path):
    class DropoutLM(TinyLM):
        def forward(self, ids):
            return torch.nn.functional.dropout(super().forward(ids), 0.3, self.training)

    prompts, conts = data()
    cfg = opd.OPDConfig(steps=4, expected_batch_size=6, max_new_tokens=3, target_epsilon=8.0)
    torch.manual_seed(5)
    straight = opd.OPDTrainer(DropoutLM(seed=1), TinyLM(seed=2), prompts, conts, cfg)
    straight.train(progress=False)
    torch.manual_seed(5)
    first = opd.OPDTrainer(DropoutLM(seed=1), TinyLM(seed=2), prompts, conts, cfg)
    first.step(), first.step()
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    torch.manual_seed(123)  # a new process: another global generator state
    resumed = opd.OPDTrainer(DropoutLM(seed=1), TinyLM(seed=2), prompts, conts, cfg)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    resumed.train(progress=False)
    for a, b in zip(straight.student.parameters(), resumed.student.parameters()):
        assert torch.equal(a, b)


def test_construction_refuses_what_a_batch_would_trip_over():
    prompts, conts = data()
    kw = dict(steps=2, expected_batch_size=6, max_new_tokens=3)
    with pytest.raises(ValueError, match="prompts hold 40 examples and continuations 39"):
        opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts[:39], opd.OPDConfig(**kw))
    student = TinyLM(seed=1)
    with pytest.raises(ValueError, match="teacher is the student"):
        opd.OPDTrainer(student, student, prompts, conts, opd.OPDConfig(**kw))
    with pytest.raises(ValueError, match="continuations hold token ids .* outside the student's vocabulary of 17"):
        opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts + 10, opd.OPDConfig(method="dp_sft", **kw))
    with pytest.raises(ValueError, match="divergence must be one of"):
        opd.OPDConfig(divergence="kl")
    with pytest.warns(RuntimeWarning, match="not private"):
        opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts,
                       opd.OPDConfig(noise_multiplier=0.0, target_epsilon=None, **kw))


def test_left_padded_prompts_score_as_the_unpadded_ones():
    """Prompts of different lengths, left-padded: the padding is masked from attention and positions start at the first
    real token, so a padded example's loss is the unpadded one's."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=17, n_positions=32, n_embd=16, n_layer=1, n_head=2, eos_token_id=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    student, teacher = transformers.GPT2LMHeadModel(cfg), transformers.GPT2LMHeadModel(cfg)
    seq = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])  # prompt 5 6 7, continuation 8 9 10 11
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), seq], 1)  # pad id 0, prompt length 5
    plain, _, _ = opd.continuation_losses(student, teacher, seq, 3, opd.OPDConfig())
    masked, _, _ = opd.continuation_losses(student, teacher, padded, 5, opd.OPDConfig(pad_token_id=0))
    unmasked, _, _ = opd.continuation_losses(student, teacher, padded, 5, opd.OPDConfig())
    torch.testing.assert_close(masked, plain)
    assert not torch.allclose(unmasked, plain)  # the padding does change the loss when read as tokens
    prompts = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    conts = torch.randint(3, 15, (2, 4))
    t = opd.OPDTrainer(student, teacher, prompts, conts, opd.OPDConfig(
        steps=2, expected_batch_size=2, max_new_tokens=4, pad_token_id=0, target_epsilon=8.0))
    assert len(t.train(progress=False)) == 2


def test_a_checkpoint_resumes_only_into_a_run_as_private_as_it():
    prompts, conts = data()
    kw = dict(steps=2, expected_batch_size=6, max_new_tokens=3)
    private = opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts, opd.OPDConfig(target_epsilon=8.0, **kw))
    plain = opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts, opd.OPDConfig(method="kd", **kw))
    with pytest.raises(ValueError, match="private run's"):
        plain.load_state_dict(private.state_dict())
    with pytest.raises(ValueError, match="non-private run's"):
        private.load_state_dict(plain.state_dict())


def test_a_checkpoint_that_fails_to_load_changes_nothing():
    prompts, conts = data()
    a = trainer("dp_opd", steps=4)
    a.step(), a.step()
    b = trainer("dp_opd", steps=4)
    before = [p.clone() for p in b.student.parameters()]
    state = a.state_dict()
    bad_groups = {**state, "optimizer": {**state["optimizer"],
                                         "optimizer": {**state["optimizer"]["optimizer"], "param_groups": []}}}
    with pytest.raises(ValueError):
        b.load_state_dict(bad_groups)
    bad_noise = {**state, "optimizer": {**state["optimizer"], "noise_generator": torch.zeros(3, dtype=torch.uint8)}}
    with pytest.raises(RuntimeError):
        b.load_state_dict(bad_noise)
    assert len(b.optimizer.accountant) == 0 and b.steps_done == 0
    assert all(torch.equal(x, y) for x, y in zip(before, b.student.parameters()))


@pytest.mark.parametrize("method", ["dp_opd", "kd"])
def test_the_students_own_optimizer_and_its_scheduler(method):
    prompts, conts = data()
    student, teacher = TinyLM(seed=1), TinyLM(seed=2)
    sgd = torch.optim.SGD(student.parameters(), lr=0.5)
    cfg = opd.OPDConfig(method=method, steps=3, expected_batch_size=6, max_new_tokens=5, target_epsilon=4.0)
    t = opd.OPDTrainer(student, teacher, prompts, conts, cfg, optimizer=sgd)
    before = [p.detach().clone() for p in student.parameters()]
    t.step()
    moved = [p.detach() - b for p, b in zip(student.parameters(), before)]
    assert any(m.abs().max() > 0 for m in moved)
    for m, p in zip(moved, student.parameters()):  # plain SGD at lr 0.5 on the (private) gradient it was given
        torch.testing.assert_close(m, -0.5 * p.grad)
    torch.optim.lr_scheduler.LambdaLR(sgd, lambda epoch: 0.0)  # sets lr 0 on the very optimizer the trainer steps
    before = [p.detach().clone() for p in student.parameters()]
    t.step()
    assert all(torch.equal(p, b) for p, b in zip(student.parameters(), before))
    with pytest.raises(ValueError, match="not the student's trainable ones"):
        opd.OPDTrainer(TinyLM(seed=1), teacher, prompts, conts, cfg,
                       optimizer=torch.optim.SGD(teacher.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        opd.OPDTrainer(TinyLM(seed=1), teacher, prompts, conts, cfg, optimizer=lambda ps: None)


def _tiny_llama(hidden, seed, tie=False, **extra):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=17, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=tie, eos_token_id=16, bos_token_id=0, **extra)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # peaked distributions: norms that differ between examples
    return model


@pytest.mark.parametrize("method", ["dp_opd", "kd"])
@pytest.mark.parametrize("tie", [False, True])  # tied: the cross term of the embedding's and the head's uses
@pytest.mark.parametrize("rule", [None, "tip", "entropy"])
def test_fused_head_takes_the_same_step_as_the_logits(method, tie, rule):
    """OPDConfig(fused_head=True) on Hugging Face Llamas: the same sampled batch and the same update as the logits
    path (sigma 0, plain SGD, clipping active under DP), to the fp32 logits' rounding; with a select rule, on the same
    tokens (TIP's high student entropy or overconfident-and-wrong quadrants)."""
    prompts, conts = data()
    deltas, fractions = [], []
    chosen = {None: None,
              "tip": lambda st, valid: select.tip(st.student_entropy, st.divergence, fraction=0.25, valid=valid),
              "entropy": lambda st, valid: select.entropy_top_fraction(st.student_entropy, 0.4, valid=valid)}[rule]
    for fused in (False, True):
        student, teacher = _tiny_llama(16, 1, tie=tie), _tiny_llama(24, 2)
        before = [p.detach().clone() for p in student.parameters()]
        cfg = opd.OPDConfig(method=method, steps=1, expected_batch_size=6, max_new_tokens=5, num_samples=2,
                            noise_multiplier=0.0, target_epsilon=None, max_grad_norm=0.05, divergence="jsd",
                            fused_head=fused, select_reads="student" if rule == "entropy" and fused else "all")
        with pytest.warns(RuntimeWarning) if method == "dp_opd" else contextlib.nullcontext():
            t = opd.OPDTrainer(student, teacher, prompts, conts, cfg, select=chosen,
                               optimizer=torch.optim.SGD(student.parameters(), lr=1.0))
        metrics = t.step()
        deltas.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(student.parameters(), before)]))
        fractions.append(metrics["selected_fraction"])
        if method == "dp_opd":
            assert metrics["norm_p50"] > 0.05  # clipping active
    assert float(deltas[0].norm()) > 0
    assert fractions[0] == fractions[1] and (fractions[0] == 1.0) == (rule is None)
    assert float((deltas[1] - deltas[0]).norm()) <= 1e-5 * float(deltas[0].norm())


@pytest.mark.parametrize("method", ["dp_opd", "kd"])
def test_fused_head_with_a_peft_lora_student(method):
    # A PeftModel's base_model runs the whole causal LM: the hidden states come from the model it wraps.
    peft = pytest.importorskip("peft")
    prompts, conts = data()
    deltas = []
    for fused in (False, True):
        student = peft.get_peft_model(_tiny_llama(16, 1), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                          init_lora_weights=False))
        trainable = [p for p in student.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in trainable]
        cfg = opd.OPDConfig(method=method, steps=1, expected_batch_size=6, max_new_tokens=5, noise_multiplier=0.0,
                            target_epsilon=None, max_grad_norm=0.05, fused_head=fused)
        with pytest.warns(RuntimeWarning) if method == "dp_opd" else contextlib.nullcontext():
            t = opd.OPDTrainer(student, _tiny_llama(24, 2), prompts, conts, cfg,
                               optimizer=torch.optim.SGD(trainable, lr=1.0))
        t.step()
        deltas.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(trainable, before)]))
    assert float(deltas[0].norm()) > 0
    assert float((deltas[1] - deltas[0]).norm()) <= 1e-5 * float(deltas[0].norm())


def test_fused_head_refusals():
    transformers = pytest.importorskip("transformers")
    prompts, conts = data()
    cfg = opd.OPDConfig(method="dp_opd", steps=1, expected_batch_size=6, max_new_tokens=5, target_epsilon=4.0,
                        fused_head=True)
    with pytest.raises(ValueError, match="Hugging Face causal LMs"):
        opd.OPDTrainer(TinyLM(seed=1), TinyLM(seed=2), prompts, conts, cfg)
    with pytest.raises(ValueError, match="batch-scope selection cannot be used under DP"):
        opd.OPDTrainer(_tiny_llama(16, 1), _tiny_llama(24, 2), prompts, conts, cfg,
                       select=lambda stats, valid: select.entropy_top_fraction(stats.student_entropy, 0.5,
                                                                               valid=valid, scope="batch")).step()
    # A config that says softcap where the model applies none: its logits are not the head on the hidden states.
    with pytest.raises(ValueError, match="not its output layer on its base model's last hidden state"):
        opd.OPDTrainer(_tiny_llama(16, 1, final_logit_softcapping=2.0), _tiny_llama(24, 2), prompts, conts, cfg)
    with pytest.raises(ValueError, match="has none"):
        opd.OPDConfig(method="dp_sft", fused_head=True)


def test_secure_mode_steps():
    # Noise and sampling from os.urandom (the DP optimizer is given no seeded generator there).
    t = trainer(steps=2, secure_mode=True)
    t.step()
    assert t.optimizer.secure_mode and t.optimizer.generator is None and t.steps_done == 1
