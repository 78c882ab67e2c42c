"""DP-SGD through dpkd.fused_linear_distill_loss: the head clipped per example with the rest of the model,
against brute-force float64 per-example gradients of the logits (the fused loss forms fp32 logits, hence
rtol 1e-5)."""

from __future__ import annotations

import copy

import pytest
import torch

import dpkd
from dpkd import privacy

from reference import divergence as reference_divergence
from reference import topk_divergence

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOCAB, D, HT = 37, 6, 9
# benchmarks/gpu.sh runs the CUDA cases (-k cuda): mixed-precision Grams and the split clipped sums run there only.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not (torch.cuda.is_available() and dpkd.with_cuda),
                                                                reason="needs a GPU and dpkd built with CUDA"))]


class HeadLM(torch.nn.Module):
    """Embedding -> Linear -> LayerNorm -> hidden states; ``head`` is the output layer the fused loss multiplies."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, D)
        self.body = torch.nn.Linear(D, D)
        self.norm = torch.nn.LayerNorm(D)
        self.head = torch.nn.Linear(D, VOCAB, bias=bias)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.tanh(self.body(self.emb(ids))))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(ids))


def make_case(b=6, t=7, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = HeadLM(bias).double()
    with torch.no_grad():
        model.head.weight.mul_(3)  # peaked distributions: norms that differ between examples
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, 4:] = False  # padding
    valid[2, 1:] = False
    h_t = torch.randn(b, t, HT, generator=g, dtype=torch.float64)
    w_t = torch.randn(VOCAB, HT, generator=g, dtype=torch.float64) * 2
    return model.to(device), ids.to(device), valid.to(device), h_t.to(device), w_t.to(device)


def assert_close_in_norm(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative error of the whole tensor (the fp32 logits' rounding is relative to the largest entries)."""
    assert float((got - want).norm()) <= rtol * float(want.norm()), (float((got - want).norm()), float(want.norm()))


def assert_clipped_step(deltas, got_norms, per, norms, c) -> None:
    """The engine's norms are the brute-force ones, and the sigma = 0 SGD(lr=1) step is -(sum_i c_i g_i) / 8."""
    torch.testing.assert_close(got_norms, norms, rtol=1e-5, atol=1e-9)
    coef = (c / (norms + 1e-6)).clamp(max=1)
    for k, delta in enumerate(deltas):
        assert_close_in_norm(delta, -sum(coef[i] * per[i][k] for i in range(len(per))) / 8)


def example_weights(valid: torch.Tensor) -> torch.Tensor:
    """Each example's token mean: the per-example loss of a fused call with reduction='sum'."""
    v = valid.double()
    return v / v.sum(-1, keepdim=True).clamp(min=1)


def brute_force(model, ids, valid, h_t, w_t, div, rows_per_example=1, chosen=None):
    """Per-example gradients (examples of ``rows_per_example`` rows) of sum_t w_t D(student_t, teacher_t), float64;
    ``chosen``: the tokens a select rule kept (0/1), multiplied into w_t."""
    params = [p for p in model.parameters() if p.requires_grad]
    w = example_weights(valid) if chosen is None else example_weights(valid) * chosen
    zt = h_t @ w_t.t()
    per = []
    for i in range(0, ids.shape[0], rows_per_example):
        rows = slice(i, i + rows_per_example)
        zs = model(ids[rows])
        loss = (reference_divergence(zs.reshape(-1, VOCAB), zt[rows].reshape(-1, VOCAB), div)
                * w[rows].reshape(-1)).sum()
        per.append(torch.autograd.grad(loss, params))
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in per])
    return params, per, norms


def private_step(model, ids, valid, h_t, w_t, div, c, *, reduction="sum", rows_per_example=1, **kw):
    """One σ = 0 SGD(lr=1) step through the fused loss; returns the parameter changes and the norms."""
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, dp = privacy.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=8,
                                     sample_rate=0.1, loss_reduction=reduction)
    dp.engine.rows_per_example = rows_per_example
    dp.zero_grad()
    loss = dpkd.fused_linear_distill_loss(model.hidden(ids), model.head.weight, h_t, w_t, divergence=div,
                                          student_bias=model.head.bias, weights=example_weights(valid),
                                          reduction="sum", **kw)
    examples = ids.shape[0] // rows_per_example
    (loss if reduction == "sum" else loss / examples).backward()
    assert model.head.weight.grad is None  # the engine's, not autograd's
    dp.step()
    # The recomputation builds no graph: a gradient with history would hold every chunk's [V, c] logits alive.
    assert all(p.grad is None or (p.grad.grad_fn is None and not p.grad.requires_grad) for p in model.parameters())
    deltas = [p.detach() - b for p, b in zip(model.parameters(), before)]
    dp.engine.remove()
    return deltas, dp.last_per_example_norms


@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 9, 3])  # one chunk; whole examples packed; examples in parts
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_head_step_equals_brute_force(div, bias, chunk_size, reduction, device):
    model, ids, valid, h_t, w_t = make_case(bias=bias, device=device)
    params, per, norms = brute_force(model, ids, valid, h_t, w_t, div)
    c = float(norms.median())  # about half of the examples clipped
    deltas, got_norms = private_step(model, ids, valid, h_t, w_t, div, c, reduction=reduction, chunk_size=chunk_size)
    assert_clipped_step(deltas, got_norms, per, norms, c)


def test_several_rows_per_example_through_the_fused_head():
    model, ids, valid, h_t, w_t = make_case()
    params, per, norms = brute_force(model, ids, valid, h_t, w_t, "jsd", rows_per_example=2)
    c = float(norms.median())
    deltas, got_norms = private_step(model, ids, valid, h_t, w_t, "jsd", c, rows_per_example=2, chunk_size=5)
    assert_clipped_step(deltas, got_norms, per, norms, c)


def test_pack_examples():
    pack, Chunk = privacy.head.pack_examples, privacy.head.Chunk
    assert pack([2, 3, 0, 4], 5) == [Chunk(0, 5, (2, 3), examples=(0, 1)), Chunk(5, 9, (4,), examples=(3,))]
    assert pack([2, 7, 1], 3) == [Chunk(0, 2, (2,), examples=(0,)), Chunk(2, 5, (), True, False, (1,)),
                                  Chunk(5, 8, (), True, False, (1,)), Chunk(8, 9, (), True, True, (1,)),
                                  Chunk(9, 10, (1,), examples=(2,))]
    assert pack([1, 1, 5, 1], 6) == [Chunk(0, 2, (1, 1), examples=(0, 1)), Chunk(2, 8, (5, 1), examples=(2, 3))]
    assert pack([0, 0], 4) == []


def test_an_example_with_non_finite_logits_contributes_nothing():
    model, ids, valid, h_t, w_t = make_case()
    poisoned = h_t.clone()
    poisoned[3, 2] = float("nan")
    clean = copy.deepcopy(model)
    deltas, norms = private_step(model, ids, valid, poisoned, w_t, "forward_kl", 0.5, check_finite=False)
    assert torch.isnan(norms[3]) and torch.isfinite(norms[torch.arange(6) != 3]).all()
    keep = torch.arange(6) != 3
    valid_without = valid & keep[:, None]  # example 3 carries no loss: its gradient is 0, everything else equal
    expected, _ = private_step(clean, ids, valid_without, h_t, w_t, "forward_kl", 0.5)
    for got, want in zip(deltas, expected):
        assert torch.isfinite(got).all()
        assert_close_in_norm(got, want)  # up to the rounding of differently packed chunks


def test_without_the_engine_the_fused_head_is_unchanged():
    model, ids, valid, h_t, w_t = make_case()
    kw = dict(divergence="jsd", weights=example_weights(valid), reduction="sum")
    loss = dpkd.fused_linear_distill_loss(model.hidden(ids), model.head.weight, h_t, w_t,
                                          student_bias=model.head.bias, **kw)
    loss.backward()
    assert model.head.weight.grad is not None and model.head.bias.grad is not None


def _wrapped(bias=True, **kw):
    model, ids, valid, h_t, w_t = make_case(bias=bias)
    model, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                     max_grad_norm=1.0, expected_batch_size=8, sample_rate=0.1)
    return model, dp, ids, valid, h_t, w_t


def test_refusals_name_the_cause():
    model, dp, ids, valid, h_t, w_t = _wrapped()
    h = model.hidden(ids)
    args = (h, model.head.weight, h_t, w_t)
    with pytest.raises(ValueError, match="reduction='sum' of per-example losses"):
        dpkd.fused_linear_distill_loss(*args, divergence="jsd", student_bias=model.head.bias)
    with pytest.raises(ValueError, match=r"student_hidden must be \[B, T, H\]"):
        dpkd.fused_linear_distill_loss(h.reshape(-1, D), model.head.weight, h_t.reshape(-1, HT), w_t,
                                       reduction="sum")
    with pytest.raises(ValueError, match="student_bias must be that layer's bias"):
        dpkd.fused_linear_distill_loss(*args, reduction="sum", student_bias=torch.zeros(VOCAB, dtype=torch.float64))
    with torch.no_grad():  # evaluation: no engine involved
        dpkd.fused_linear_distill_loss(*args, divergence="jsd")


def test_two_fused_losses_on_one_head_before_a_step_are_refused():
    model, dp, ids, valid, h_t, w_t = _wrapped()
    h = model.hidden(ids)
    kw = dict(student_bias=model.head.bias, reduction="sum")
    loss = (dpkd.fused_linear_distill_loss(h, model.head.weight, h_t, w_t, **kw)
            + dpkd.fused_linear_distill_loss(h, model.head.weight, h_t, w_t, divergence="jsd", **kw))
    with pytest.raises(RuntimeError, match="backward twice before one step"):
        loss.backward()


def test_the_head_used_through_its_forward_too_is_refused():
    model, dp, ids, valid, h_t, w_t = _wrapped()
    h = model.hidden(ids)
    loss = dpkd.fused_linear_distill_loss(h, model.head.weight, h_t, w_t, student_bias=model.head.bias,
                                          reduction="sum")
    (loss + model.head(h).pow(2).sum()).backward()
    with pytest.raises(ValueError, match="used both through its forward and by dpkd.fused_linear_distill_loss"):
        dp.step()


def test_a_fused_loss_after_backward_and_before_the_step_is_refused():
    model, dp, ids, valid, h_t, w_t = _wrapped()
    kw = dict(student_bias=model.head.bias, reduction="sum")
    dpkd.fused_linear_distill_loss(model.hidden(ids), model.head.weight, h_t, w_t, **kw).backward()
    with pytest.raises(RuntimeError, match="after backward"):
        dpkd.fused_linear_distill_loss(model.head.weight.new_zeros(6, 7, D), model.head.weight, h_t, w_t, **kw)


def test_inputs_changed_in_place_before_the_step_are_refused():
    model, dp, ids, valid, h_t, w_t = _wrapped()
    dpkd.fused_linear_distill_loss(model.hidden(ids), model.head.weight, h_t, w_t, student_bias=model.head.bias,
                                   reduction="sum").backward()
    h_t.mul_(2)  # the teacher's hidden states the step would recompute the chunks from
    with pytest.raises(RuntimeError, match="modified in place between backward"):
        dp.step()


def test_a_tied_head_after_zero_grad_or_without_embedding_gradients():
    """zero_grad() between the forward pass and the fused loss keeps the embedding's ids (a review found it refused);
    embeddings made under no_grad carry no gradient, so the cross term is 0 and the head alone is clipped."""
    model, ids, valid, h_t, w_t = make_case(bias=False)
    model.head.weight = model.emb.weight
    model, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                     max_grad_norm=1.0, expected_batch_size=8, sample_rate=0.1)
    h = model.hidden(ids)
    dp.zero_grad()
    dpkd.fused_linear_distill_loss(h, model.head.weight, h_t, w_t, weights=example_weights(valid),
                                   reduction="sum").backward()
    dp.step()
    assert torch.isfinite(dp.last_per_example_norms).all()
    with torch.no_grad():
        e = model.emb(ids)
    h = model.norm(torch.tanh(model.body(e)))
    dp.zero_grad()
    dpkd.fused_linear_distill_loss(h, model.head.weight, h_t, w_t, weights=example_weights(valid),
                                   reduction="sum").backward()
    dp.step()
    assert torch.isfinite(dp.last_per_example_norms).all()


@pytest.mark.parametrize("tie", [False, True])
def test_a_step_of_another_batch_size_after_one_without_the_body_gradients(tie):
    """State of the previous step must not judge this one: a step whose hidden states (tied: whose embeddings) were
    made under no_grad, after a step of 6 rows, was refused as folding tokens into the batch (untied) or as the
    embedding having read 6 rows (tied) -- a review found both."""
    model, ids, valid, h_t, w_t = make_case(bias=False)
    if tie:
        model.head.weight = model.emb.weight
    model, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                     max_grad_norm=1.0, expected_batch_size=8, sample_rate=0.1)
    dpkd.fused_linear_distill_loss(model.hidden(ids), model.head.weight, h_t, w_t, weights=example_weights(valid),
                                   reduction="sum").backward()
    dp.step()
    dp.zero_grad()
    with torch.no_grad():
        h = model.hidden(ids[:4])
    dpkd.fused_linear_distill_loss(h, model.head.weight, h_t[:4], w_t, weights=example_weights(valid[:4]),
                                   reduction="sum").backward()
    dp.step()
    assert dp.last_per_example_norms.shape == (4,) and torch.isfinite(dp.last_per_example_norms).all()
    with pytest.raises(ValueError, match="check_finite=True under DP-SGD"):
        dpkd.fused_linear_distill_loss(h, model.head.weight, h_t[:4], w_t, reduction="sum", check_finite=True)


@pytest.mark.parametrize("rows_per_example", [1, 2])
@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("keep_blocks", [True, False])
def test_a_head_tied_to_the_embedding_equals_brute_force(rows_per_example, chunk_size, keep_blocks, monkeypatch):
    """The usual small-LM tying (Llama 3.2 1B, Qwen2.5, Gemma): the fused loss keeps each example's logit gradients
    at its own ids, dz_s[x_t] (or, past a memory budget, the step recomputes them), and the step adds the cross term
    2 <G_emb, G_head> to the norms; the two uses' clipped sums add up in the one weight. Padding ids (padding_idx) get
    no embedding gradient."""
    if not keep_blocks:
        monkeypatch.setattr(privacy.head, "PICKED_BUDGET", 0)
    model, ids, valid, h_t, w_t = make_case(bias=False)
    model.emb.padding_idx = 0
    ids[0, 4:] = 0
    ids[1, 2] = 0  # a padding id where the loss reads its embedding: its output gradient is not the row's gradient
    model.head.weight = model.emb.weight
    params, per, norms = brute_force(model, ids, valid, h_t, w_t, "jsd", rows_per_example=rows_per_example)
    c = float(norms.median())
    deltas, got = private_step(model, ids, valid, h_t, w_t, "jsd", c, rows_per_example=rows_per_example,
                               chunk_size=chunk_size)
    assert_clipped_step(deltas, got, per, norms, c)


@pytest.mark.parametrize("div,kw", [("forward_kl", {}), ("jsd", dict(beta=0.3))])
def test_top_k_teacher_step_equals_brute_force(div, kw):
    model, ids, valid, h_t, w_t = make_case()
    lp = torch.log_softmax(h_t @ w_t.t(), -1)
    logp, top = lp.topk(5, dim=-1)
    w = example_weights(valid)
    params = [p for p in model.parameters()]

    def topk_loss(z, i):  # the divergence over the kept ids plus the tail bucket, float64
        return (topk_divergence(z, top[i], logp[i], 1.0, div, **kw) * w[i]).sum()

    per = [torch.autograd.grad(topk_loss(model(ids[i]), i), params) for i in range(ids.shape[0])]
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in per])
    c = float(norms.median())
    before = [p.detach().clone() for p in params]
    model, dp = privacy.make_private(model, torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=c,
                                     expected_batch_size=8, sample_rate=0.1)
    dpkd.fused_linear_distill_loss(model.hidden(ids), model.head.weight, teacher_topk=(top, logp), topk_tail=True,
                                   divergence=div, **kw, student_bias=model.head.bias, weights=w, reduction="sum",
                                   chunk_size=4).backward()
    dp.step()
    torch.testing.assert_close(dp.last_per_example_norms, norms, rtol=1e-5, atol=1e-9)
    coef = (c / (norms + 1e-6)).clamp(max=1)
    for k, p in enumerate(params):
        assert_close_in_norm(p.detach() - before[k], -sum(coef[i] * per[i][k] for i in range(len(per))) / 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_16_bit_heads_clip_close_to_the_float64_reference(dtype, device):
    model, ids, valid, h_t, w_t = make_case(device=device)
    params, per, norms = brute_force(model, ids, valid, h_t, w_t, "jsd")
    c = float(norms.median())
    model = model.to(dtype)
    model, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                     max_grad_norm=c, expected_batch_size=8, sample_rate=0.1)
    dpkd.fused_linear_distill_loss(model.hidden(ids), model.head.weight, h_t.to(dtype), w_t.to(dtype), divergence="jsd",
                                   student_bias=model.head.bias, weights=example_weights(valid), reduction="sum",
                                   chunk_size=5).backward()
    got_norms = dp.accumulate()  # the clipped sums stay in the optimizer, in fp32, before noise and the step
    torch.testing.assert_close(got_norms.double(), norms, rtol=3e-2, atol=0)
    coef = (c / (norms + 1e-6)).clamp(max=1)
    for k, p in enumerate(model.parameters()):
        assert_close_in_norm(dp._sums[id(p)].double(), sum(coef[i] * per[i][k] for i in range(len(per))), rtol=5e-2)


def test_hugging_face_llama_through_its_body_equals_brute_force():
    """The README's use: the student's body gives the hidden states, lm_head's weight goes to the fused loss."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)

    def llama(hidden):
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                       max_position_embeddings=32, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg).double()

    student, teacher = llama(16).train(), llama(24).eval().requires_grad_(False)
    with torch.no_grad():
        student.lm_head.weight.mul_(20)  # away from uniform predictions: norms that differ between examples
    g = torch.Generator().manual_seed(1)
    b, t = 4, 8
    ids = torch.randint(0, 64, (b, t), generator=g)
    attention = torch.ones(b, t, dtype=torch.long)
    attention[1, 5:] = 0
    positions = torch.arange(t).expand(b, t)
    valid = attention.bool()
    w = example_weights(valid)
    t_hidden = teacher.model(input_ids=ids, attention_mask=attention, position_ids=positions).last_hidden_state
    t_logits = teacher.lm_head(t_hidden)

    def body(rows):
        return student.model(input_ids=ids[rows], attention_mask=attention[rows],
                             position_ids=positions[rows]).last_hidden_state

    params = [p for p in student.parameters() if p.requires_grad]
    per = []
    for i in range(b):
        zs = student.lm_head(body([i]))
        loss = (reference_divergence(zs.reshape(-1, 64), t_logits[i].reshape(-1, 64), "jsd") * w[i]).sum()
        per.append(torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)]))
    per = torch.stack(per)
    norms = per.norm(dim=1)
    c = float(norms.median())
    before = torch.cat([p.detach().flatten() for p in params])
    student, dp = privacy.make_private(student, torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0,
                                       max_grad_norm=c, expected_batch_size=4, sample_rate=0.1)
    dpkd.fused_linear_distill_loss(body(list(range(b))), student.lm_head.weight, t_hidden, teacher.lm_head.weight,
                                   divergence="jsd", weights=w, reduction="sum", chunk_size=10).backward()
    dp.step()
    torch.testing.assert_close(dp.last_per_example_norms, norms, rtol=1e-5, atol=1e-9)
    coef = (c / (norms + 1e-6)).clamp(max=1)
    after = torch.cat([p.detach().flatten() for p in params])
    assert_close_in_norm(after - before, -(per * coef[:, None]).sum(0) / 4)


def test_the_logits_path_drops_an_example_with_a_nan_logit_too():
    """The same rule through lm_head's forward and dpkd.distill_loss(check_finite=False): the kernels' maxima pass
    over a NaN logit, but its row's gradient is made NaN, so the engine drops the example."""
    model, ids, valid, h_t, w_t = make_case()
    z_t = h_t @ w_t.t()
    poisoned = z_t.clone()
    poisoned[3, 2, 5] = float("nan")

    def step(m, teacher, valid):
        before = [p.detach().clone() for p in m.parameters()]
        m, dp = privacy.make_private(m, torch.optim.SGD(m.parameters(), lr=1.0), noise_multiplier=0.0,
                                     max_grad_norm=0.5, expected_batch_size=8, sample_rate=0.1)
        per_token = dpkd.distill_loss(m(ids).float(), teacher.float(), divergence="forward_kl", reduction="none",
                                      check_finite=False)
        (per_token * example_weights(valid)).sum().backward()
        dp.step()
        return [p.detach() - b for p, b in zip(m.parameters(), before)], dp.last_per_example_norms

    clean = copy.deepcopy(model)
    deltas, norms = step(model, poisoned, valid)
    assert torch.isnan(norms[3]) and torch.isfinite(norms[torch.arange(6) != 3]).all()
    expected, _ = step(clean, z_t, valid & (torch.arange(6) != 3)[:, None])
    for got, want in zip(deltas, expected):
        assert torch.isfinite(got).all()
        assert_close_in_norm(got, want)


def _clipped_sum_norm(model, ids, valid, h_t, w_t, c, *, forward_autocast=False, step_autocast=False):
    """||sum_i c_i g_i|| over all parameters, from accumulate() (before noise), the forward and backward pass and the
    clipping each run inside CPU bf16 autocast or not."""
    model, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                     max_grad_norm=c, expected_batch_size=8, sample_rate=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=forward_autocast):
        dpkd.fused_linear_distill_loss(model.hidden(ids).float(), model.head.weight, h_t, w_t, divergence="jsd",
                                       student_bias=model.head.bias, weights=example_weights(valid),
                                       reduction="sum", chunk_size=4).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=step_autocast):
        dp.accumulate()
    total = torch.sqrt(sum(s.double().pow(2).sum() for s in dp._sums.values()))
    dp.engine.remove()
    return float(total)


@pytest.mark.parametrize("where", ["forward", "step"])
def test_autocast_keeps_each_clipped_example_within_c(where):
    """Under autocast the fused loss's chunks run in bf16; the step recomputes them under the same state, and the
    clipping itself runs without autocast, so each example's clipped contribution stays within C (a step inside
    autocast used to form the sums from bf16 products: up to 1.0043 C; a forward inside it crashed)."""
    model, ids, valid, h_t, w_t = make_case()
    c = 1e-3  # every example clipped
    for i in range(ids.shape[0]):
        one = slice(i, i + 1)
        norm = _clipped_sum_norm(copy.deepcopy(model).float(), ids[one], valid[one], h_t[one].float(),
                                 w_t.float(), c, forward_autocast=where == "forward", step_autocast=where == "step")
        assert norm <= c * (1 + 1e-6), (i, norm / c)


def test_a_frozen_head_weight_with_a_trainable_bias():
    model, ids, valid, h_t, w_t = make_case()
    model.head.weight.requires_grad_(False)
    params, per, norms = brute_force(model, ids, valid, h_t, w_t, "jsd")
    c = float(norms.median())
    deltas, got_norms = private_step(model, ids, valid, h_t, w_t, "jsd", c, chunk_size=5)
    torch.testing.assert_close(got_norms, norms, rtol=1e-5, atol=1e-9)
    coef = (c / (norms + 1e-6)).clamp(max=1)
    trainable = [k for k, p in enumerate(model.parameters()) if p.requires_grad]
    for j, k in enumerate(trainable):
        assert_close_in_norm(deltas[k], -sum(coef[i] * per[i][j] for i in range(len(per))) / 8)
    head_weight = [k for k, p in enumerate(model.parameters()) if p is model.head.weight][0]
    assert (deltas[head_weight] == 0).all()


@pytest.mark.parametrize("tie", [False, True])
def test_an_empty_batch_through_the_fused_head_is_a_noise_only_step(tie):
    # A Poisson batch of no examples ([0, T] tensors): a tied head's per-example ids [0, T] failed to reshape.
    model, ids, valid, h_t, w_t = make_case(bias=False)
    if tie:
        model.head.weight = model.emb.weight
    deltas, norms = private_step(model, ids[:0], valid[:0], h_t[:0], w_t, "jsd", 1.0)
    assert norms.shape == (0,) and all(not d.any() for d in deltas)


def test_a_select_rule_through_the_private_fused_head_equals_brute_force():
    # The rule reads the first pass's statistics (no gradients); per sequence, each example's tokens depend on it
    # alone, so the clipped step is brute force's on the kept tokens. Batch scope is refused under DP.
    model, ids, valid, h_t, w_t = make_case(b=6, t=7)

    def rule(scope):
        return lambda st, v: dpkd.select.entropy_top_fraction(st.student_entropy, 0.5, valid=v, scope=scope)

    with torch.no_grad():
        stats = dpkd.token_stats(model(ids).float(), (h_t @ w_t.t()).float(), divergence="jsd")
    stats = dpkd.TokenStats(*(torch.where(valid, f, float("nan")) for f in stats))
    chosen = rule("sequence")(stats, valid).weights().double()
    assert 0 < int(chosen.sum()) < int(valid.sum())
    params, per, norms = brute_force(model, ids, valid, h_t, w_t, "jsd", chosen=chosen)
    c = float(norms.median())
    with pytest.raises(ValueError, match="batch-scope selection cannot be used under DP"):
        private_step(copy.deepcopy(model), ids, valid, h_t, w_t, "jsd", c, select=rule("batch"))
    deltas, got = private_step(model, ids, valid, h_t, w_t, "jsd", c, select=rule("sequence"), chunk_size=4)
    assert_clipped_step(deltas, got, per, norms, c)
