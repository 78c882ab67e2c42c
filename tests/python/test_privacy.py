"""DP-SGD engine against brute-force per-example gradients (torch.func, float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

from dpkd import accounting, privacy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# The exactness tests also run on a GPU where there is one (benchmarks/gpu.sh runs them with -k cuda).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture(autouse=True)
def float64_default():
    """Exactness checks run in float64; restored after each test so other modules see float32."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class TiedLM(torch.nn.Module):
    """Embedding (padding_idx) -> LayerNorm -> Linear -> RMSNorm -> head tied to the embedding."""

    def __init__(self, vocab=20, d=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d, padding_idx=0)
        self.norm = torch.nn.LayerNorm(d)
        self.proj = torch.nn.Linear(d, d)
        self.rms = torch.nn.RMSNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.rms(torch.tanh(self.proj(self.norm(self.emb(ids))))))


class SharedSeqMLP(torch.nn.Module):
    """Token-wise layers over [B, T, 4], l1 applied twice: long sequences of narrow layers, whose per-example
    gradients are cheaper than ghost norms (instantiated as the gradients arrive, summed over calls)."""

    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(4, 4)
        self.l2 = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(torch.tanh(self.l1(x))))).mean(1)


class InplaceSeq(torch.nn.Module):
    """Linear layers with biases on [B, T, f] whose outputs are changed in place (an inplace ReLU, a residual
    added in place): their output gradients are those before the change."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.head = torch.nn.Linear(4, 6), torch.nn.Linear(6, 4), torch.nn.Linear(4, 3)
        self.act = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.l2(self.act(self.l1(x)))
        h += x
        return self.head(h.mean(1))


class GemmaStyleRMSNorm(torch.nn.Module):
    """An RMSNorm as Hugging Face writes them: x_hat in fp32, scaled by (1 + w), cast back."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(0.3 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x_hat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x_hat * (1.0 + self.weight.float())).type_as(x)


class WeightFirstRMSNorm(GemmaStyleRMSNorm):
    """Named like an RMSNorm, but the weight scales the input before the normalisation."""

    def forward(self, x):
        x = x * self.weight
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class ScaledLayerNorm(torch.nn.LayerNorm):
    """A LayerNorm subclass whose forward does more: nn.LayerNorm's closed form is not its gradient."""

    def forward(self, x):
        return super().forward(x) * 4.0


class LoRALinear(torch.nn.Linear):
    """A Linear subclass with parameters of its own (its base frozen): not the captured linear's weight and bias."""

    def __init__(self, i, o, rank=2):
        super().__init__(i, o)
        self.requires_grad_(False)
        self.a, self.b = torch.nn.Parameter(torch.randn(rank, i) / 2), torch.nn.Parameter(torch.randn(o, rank) / 2)

    def forward(self, x):
        return super().forward(x) + x @ self.a.t() @ self.b.t()


class NormedSeq(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.l1, self.norm, self.l2 = torch.nn.Linear(4, 6), norm, torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(self.norm(torch.tanh(self.l1(x)))).mean(1)


def seq_loss(logits, labels):
    """Each example's own token-mean cross entropy over its valid (non -100) tokens: [B]."""
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    valid = (labels != -100).to(ce.dtype)
    return (ce * valid).sum(1) / valid.sum(1).clamp(min=1)


def make_case(kind, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        x, y = torch.randn(b, 8, generator=g), torch.randint(0, 4, (b,), generator=g)
        loss = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    elif kind == "conv":
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.Linear(3 * 4 * 4, 3))
        x, y = torch.randn(b, 1, 6, 6, generator=g), torch.randint(0, 3, (b,), generator=g)
        loss = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    elif kind == "shared_seq":
        model = SharedSeqMLP()
        x, y = torch.randn(b, 10, 4, generator=g), torch.randint(0, 3, (b,), generator=g)
        loss = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    elif kind == "inplace_seq":
        model = InplaceSeq()
        x, y = torch.randn(b, 10, 4, generator=g), torch.randint(0, 3, (b,), generator=g)
        loss = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    elif kind in ("weight_norm_linear", "lora_linear"):
        # The old weight_norm computes the weight from weight_g and weight_v: both take the torch.func path.
        first = (torch.nn.utils.weight_norm(torch.nn.Linear(8, 16)) if kind == "weight_norm_linear"
                 else LoRALinear(8, 16))
        model = torch.nn.Sequential(first, torch.nn.ReLU(), torch.nn.Linear(16, 4))
        x, y = torch.randn(b, 8, generator=g), torch.randint(0, 4, (b,), generator=g)
        loss = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    elif kind in ("gemma_rmsnorm", "weight_first_rmsnorm", "scaled_layer_norm"):
        norm = {"gemma_rmsnorm": GemmaStyleRMSNorm, "weight_first_rmsnorm": WeightFirstRMSNorm,
                "scaled_layer_norm": ScaledLayerNorm}[kind]
        model = NormedSeq(norm(6))
        x, y = torch.randn(b, 5, 4, generator=g), torch.randint(0, 3, (b,), generator=g)
        loss = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    elif kind == "tied_lm":
        model = TiedLM()
        x = torch.randint(1, 20, (b, 7), generator=g)
        x[0, 5:] = 0  # padding
        y = torch.randint(0, 20, (b, 7), generator=g)
        y[x == 0] = -100
        loss = seq_loss
    else:
        raise ValueError(kind)
    return model.double(), x, y, loss


def brute_force(model, x, y, loss):
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def one(p, xi, yi):
        return loss(functional_call(model, p, (xi[None],)), yi[None]).sum()

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(v.reshape(x.shape[0], -1).pow(2).sum(1) for v in per.values()))
    return per, norms


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated")
@pytest.mark.parametrize("kind", ["mlp", "conv", "tied_lm", "shared_seq", "inplace_seq", "gemma_rmsnorm",
                                  "weight_first_rmsnorm", "scaled_layer_norm", "weight_norm_linear", "lora_linear"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("device", DEVICES)
def test_norms_and_clipped_step_equal_brute_force(kind, reduction, device):
    model, x, y, loss = make_case(kind)
    model, x, y = model.to(device), x.to(device), y.to(device)
    per, norms = brute_force(model, x, y, loss)
    c_max = float(norms.median())  # clip about half of the examples
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, dp = privacy.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=c_max, expected_batch_size=8,
                                     sample_rate=0.1, loss_reduction=reduction)
    dp.zero_grad()
    per_example = loss(model(x), y)
    (per_example.sum() if reduction == "sum" else per_example.mean()).backward()
    # Per-example gradients where 2 T^2 >= d p (token-wise layers), ghost norms for T = 1 and the tied head.
    seq = {"l1": True, "l2": True}
    instantiated = {"mlp": {"0": False, "2": False}, "conv": {"3": False}, "tied_lm": {"proj": True, "head": False},
                    "shared_seq": seq, "gemma_rmsnorm": seq, "weight_first_rmsnorm": seq, "scaled_layer_norm": seq,
                    "weight_norm_linear": {"2": False}, "lora_linear": {"2": False},
                    "inplace_seq": {"l1": True, "l2": True, "head": False}}
    assert dp.engine.instantiate == instantiated[kind]
    dp.step()
    # An RMSNorm-named class takes the closed form only where it agrees with torch.func.
    closed_form = {"gemma_rmsnorm": {"norm": True}, "weight_first_rmsnorm": {"norm": False}}
    assert dp.engine.closed_form_ok == closed_form.get(kind, {})
    torch.testing.assert_close(dp.last_per_example_norms, norms, rtol=1e-6, atol=1e-12)
    coef = (c_max / (norms + 1e-6)).clamp(max=1)
    for n, p in model.named_parameters():
        expected = -(per[n] * coef.reshape(-1, *[1] * (per[n].dim() - 1))).sum(0) / 8 if n in per else 0 * p
        torch.testing.assert_close(p.detach() - before[n], expected, rtol=1e-6, atol=1e-12)
    assert ((norms * coef) <= c_max + 1e-9).all()


def test_closed_form_is_judged_on_a_nonzero_gradient():
    """A first step whose gradients are all zero cannot tell a misnamed RMSNorm from a real one: the verdict
    waits for a step that can, and that step's norms are still the true ones."""
    model, x, y, loss = make_case("weight_first_rmsnorm")
    _, norms = brute_force(model, x, y, loss)
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                                 max_grad_norm=1e9, expected_batch_size=6, sample_rate=0.1)
    (0.0 * loss(model(x), y)).sum().backward()
    dp.step()
    assert dp.engine.closed_form_ok == {}
    loss(model(x), y).sum().backward()
    dp.step()
    assert dp.engine.closed_form_ok == {"norm": False}
    torch.testing.assert_close(dp.last_per_example_norms, norms, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "shared_seq", "weight_first_rmsnorm"])
def test_a_second_backward_through_the_same_forward_is_refused(kind):
    """retain_graph=True and a second backward before the step would need the two gradients added before
    anything is formed from them (ghost, instantiated and torch.func layers alike): a clear error instead."""
    model, x, y, loss = make_case(kind)
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                                 max_grad_norm=1.0, expected_batch_size=6, sample_rate=0.1)
    out = model(x)
    loss(out, y).sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward pass reached layer"):
        out.pow(2).sum().backward()


def test_ghost_and_instantiated_norms_agree():
    from dpkd.privacy import layers
    g = torch.Generator().manual_seed(1)
    a, gr = torch.randn(3, 3, 7, generator=g), torch.randn(3, 3, 4, generator=g)
    assert layers.use_ghost(3, 7, 4) and not layers.use_ghost(50, 7, 4)
    inst = torch.bmm(gr.transpose(1, 2), a).pow(2).sum((1, 2)) + gr.sum(1).pow(2).sum(1)
    torch.testing.assert_close(layers.linear_sq_norms(a, gr, weight=True, bias=True), inst)
    long_a, long_g = torch.randn(2, 50, 7, generator=g), torch.randn(2, 50, 4, generator=g)
    torch.testing.assert_close(layers.linear_sq_norms(long_a, long_g, weight=True, bias=False),
                               torch.bmm(long_g.transpose(1, 2), long_a).pow(2).sum((1, 2)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,block", [(1, 128), (37, 8), (37, 37), (40, 8), (64, 1000), (300, 128)])
def test_blocked_ghost_norms_equal_instantiated_per_example_gradients(dtype, tokens, block):
    """dpkd::ghost_sq_norms of two layers reading one input, over token blocks (ragged last block, one block,
    one token), against the squared norms of the instantiated float64 per-example gradients G_i^T A_i of the
    same (rounded) inputs."""
    g = torch.Generator().manual_seed(tokens + block)
    a = (torch.randn(3, tokens, 9, generator=g, dtype=torch.float64) * 3).to(dtype)
    gr = torch.randn(3, tokens, 5, generator=g, dtype=torch.float64).to(dtype)
    gr2 = torch.randn(3, tokens, 2, generator=g, dtype=torch.float64).to(dtype)  # a second layer reading a
    got = torch.ops.dpkd.ghost_sq_norms(a, [gr, gr2], block)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = sum(torch.bmm(x.double().transpose(1, 2), a.double()).pow(2).sum((1, 2)) for x in (gr, gr2))
    torch.testing.assert_close(got.double(), want, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
    with pytest.raises(ValueError, match="block"):
        torch.ops.dpkd.ghost_sq_norms(a, [gr], 0)
    with pytest.raises(ValueError, match="agree in batch and tokens"):
        torch.ops.dpkd.ghost_sq_norms(a[:2], [gr], block)


def test_embedding_norms_sum_repeated_ids_and_skip_padding():
    from dpkd.privacy import layers
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 6, (4, 23), generator=g)  # many repeats within each example
    ids[1, 5:] = 0
    gr = torch.randn(4, 23, 5, generator=g, dtype=torch.float64)
    for padding_idx in (None, 0):
        per_example = torch.zeros(4, 6, 5, dtype=torch.float64)
        for i in range(4):
            per_example[i].index_add_(0, ids[i], gr[i])
        if padding_idx is not None:
            per_example[:, padding_idx] = 0
        torch.testing.assert_close(layers.embedding_sq_norms(ids, gr, padding_idx), per_example.pow(2).sum((1, 2)),
                                   rtol=1e-12, atol=0)


def test_micro_batches_accumulate_with_one_noise_draw():
    model, x, y, loss = make_case("mlp", b=6)
    per, norms = brute_force(model, x, y, loss)
    before = [p.detach().clone() for p in model.parameters()]
    model, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                     max_grad_norm=0.5, expected_batch_size=6, sample_rate=0.5)
    dp.zero_grad()
    for part in (slice(0, 2), slice(2, 6)):
        loss(model(x[part]), y[part]).sum().backward()
        dp.accumulate()
    dp.step()
    coef = (0.5 / (norms + 1e-6)).clamp(max=1)
    for (n, p), b in zip(model.named_parameters(), before):
        expected = -(per[n] * coef.reshape(-1, *[1] * (per[n].dim() - 1))).sum(0) / 6
        torch.testing.assert_close(p.detach() - b, expected, rtol=1e-6, atol=1e-12)
    assert len(dp.accountant) == 1


def test_sensitivity_of_the_noise_free_update_is_at_most_c_over_l():
    model, x, y, loss = make_case("tied_lm", b=5, seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def update(rows):
        model.load_state_dict(state)
        params = list(model.parameters())
        before = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=1.0)
        m, dp = privacy.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=0.3, expected_batch_size=5,
                                     sample_rate=0.1)
        dp.zero_grad()
        loss(m(x[rows]), y[rows]).sum().backward()
        dp.step()
        dp.engine.remove()
        return torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])

    full = update(list(range(5)))
    for drop in range(5):
        rest = [i for i in range(5) if i != drop]
        assert (full - update(rest)).norm() <= 0.3 / 5 + 1e-9


@pytest.mark.parametrize("kind", ["mlp", "conv", "tied_lm", "shared_seq", "gemma_rmsnorm"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_an_example_with_a_non_finite_gradient_contributes_nothing(kind, bad, reduction):
    """One example's inf or NaN loss must not reach the others' clipped sum (0 * inf is NaN): it contributes zero,
    within C, and the step equals the step without it."""
    model, x, y, loss = make_case(kind, b=5, seed=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def update(rows, poison):
        model.load_state_dict(state)
        params = list(model.parameters())
        before = [p.detach().clone() for p in params]
        m, dp = privacy.make_private(model, torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0,
                                     max_grad_norm=0.3, expected_batch_size=5, sample_rate=0.1,
                                     loss_reduction=reduction)
        dp.zero_grad()
        per = loss(m(x[rows]), y[rows])
        if poison:
            per = per * torch.tensor([bad] + [1.0] * (len(rows) - 1))
        (per.sum() if reduction == "sum" else per.mean()).backward()
        dp.step()
        norms = dp.last_per_example_norms
        dp.engine.remove()
        return torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)]), norms

    with_bad, norms = update(list(range(5)), poison=True)
    without, _ = update(list(range(1, 5)), poison=False)
    assert not torch.isfinite(norms[0]) and torch.isfinite(norms[1:]).all()
    torch.testing.assert_close(with_bad, without, rtol=1e-6, atol=1e-9)  # the Gemma norm computes in fp32


def test_an_fp16_overflow_in_one_example_leaves_the_others_exact():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).half()
    x, y = torch.randn(4, 8).half(), torch.randint(0, 4, (4,))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def update(xs, ys):
        model.load_state_dict(state)
        before = [p.detach().clone() for p in model.parameters()]
        m, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                     max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
        dp.zero_grad()
        # A million times the loss: the example's output gradients overflow fp16 (max 65504).
        scale = torch.tensor([1e6] + [1.0] * (len(ys) - 1)) if len(ys) == 4 else torch.ones(len(ys))
        (torch.nn.functional.cross_entropy(m(xs).float(), ys, reduction="none") * scale).sum().backward()
        dp.step()
        norms = dp.last_per_example_norms
        dp.engine.remove()
        return torch.cat([(p.detach() - b).float().flatten() for p, b in zip(model.parameters(), before)]), norms

    with_bad, norms = update(x, y)
    without, _ = update(x[1:], y[1:])
    assert not torch.isfinite(norms[0]) and torch.isfinite(norms[1:]).all()
    assert torch.isfinite(with_bad).all()
    torch.testing.assert_close(with_bad, without)


def test_make_private_takes_an_accountant_by_name():
    model = torch.nn.Linear(4, 2)
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                 max_grad_norm=1.0, expected_batch_size=2, dataset_size=10, accountant="pld")
    dp.zero_grad()
    model(torch.randn(2, 4)).sum(1).sum().backward()
    dp.step()
    assert isinstance(dp.accountant, accounting.PLDAccountant) and len(dp.accountant) == 1
    assert dp.accountant.history[0].sample_rate == 0.2
    dp.engine.remove()
    with pytest.raises(ValueError, match="accountant"):
        privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                             max_grad_norm=1.0, expected_batch_size=2, dataset_size=10, accountant="prv")


def test_noise_scale_and_accountant():
    model = torch.nn.Linear(200, 50).double()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, dp = privacy.make_private(model, opt, noise_multiplier=1.3, max_grad_norm=2.0, expected_batch_size=10,
                                     dataset_size=1000, generator=torch.Generator().manual_seed(0))
    draws = []
    for _ in range(20):
        before = model.weight.detach().clone()
        dp.zero_grad()
        dp.step()  # an empty Poisson batch: noise only
        draws.append((model.weight.detach() - before).flatten())
    z = torch.cat(draws)
    expected_std = 1.3 * 2.0 / 10
    assert abs(float(z.std()) / expected_std - 1) < 0.02
    assert abs(float(z.mean())) < 4 * expected_std / math.sqrt(z.numel())
    assert len(dp.accountant) == 20 and dp.accountant.history[0].sample_rate == pytest.approx(0.01)
    assert dp.accountant.get_epsilon(1e-5) == accounting.epsilon(noise_multiplier=1.3, sample_rate=0.01, steps=20,
                                                                 delta=1e-5)


def test_noise_in_buckets_reaches_every_parameter_at_the_right_scale(monkeypatch):
    """Noise is drawn (and, distributed, all-reduced) for groups of parameters at a time: with small buckets
    every parameter still gets its own N(0, (sigma C / L)^2) draw."""
    from dpkd.privacy import optimizer as dp_optimizer

    monkeypatch.setattr(dp_optimizer, "_BUCKET_ELEMENTS", 500)  # 1200 | 40 | 800 | 20 elements: four buckets
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 40), torch.nn.Tanh(), torch.nn.Linear(40, 20)).double()
    model, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.5,
                                     max_grad_norm=2.0, expected_batch_size=4, sample_rate=0.1,
                                     generator=torch.Generator().manual_seed(1))
    draws = {n: [] for n, _ in model.named_parameters()}
    for _ in range(50):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        dp.zero_grad()
        dp.step()
        for n, p in model.named_parameters():
            draws[n].append((p.detach() - before[n]).flatten())
    for n, d in draws.items():
        z = torch.cat(d)
        assert abs(float(z.std()) / (1.5 * 2.0 / 4) - 1) < 0.08, n
    first = torch.stack([torch.stack(d)[:, :20].flatten() for d in draws.values()])
    assert torch.corrcoef(first).fill_diagonal_(0).abs().max() < 0.2  # independent draws, not shared slices


def test_secure_noise_has_the_right_scale():
    z = privacy.gaussian((200_000,), 2.5, secure=True)
    assert abs(float(z.std()) / 2.5 - 1) < 0.01 and abs(float(z.mean())) < 0.02


def test_secure_mode_end_to_end():
    # make_private(secure_mode=True): the noise from the OS's CSPRNG at sigma C / L (not reproducible from any seed),
    # and a generator, which it would ignore, refused there and in the sampler.
    steps = []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Linear(50, 40)
        before = model.weight.detach().clone()
        _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=2.0,
                                     max_grad_norm=0.5, expected_batch_size=4, sample_rate=0.1, secure_mode=True)
        model(torch.randn(4, 50)).sum().backward()
        dp.step()
        steps.append(model.weight.detach() - before)
    noise = (steps[0] - steps[1]) * 4 / math.sqrt(2)  # the clipped sums cancel; two draws of std sigma C
    assert abs(float(noise.std()) / (2.0 * 0.5) - 1) < 0.07 and not torch.equal(steps[0], steps[1])  # 4.4 s.e.
    with pytest.raises(ValueError, match="generator with secure_mode=True"):
        privacy.make_private(torch.nn.Linear(2, 2), torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0),
                             noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1,
                             secure_mode=True, generator=torch.Generator())
    with pytest.raises(ValueError, match="generator with secure_mode=True"):
        privacy.PoissonBatchSampler(100, 0.1, secure_mode=True, generator=torch.Generator())


def test_a_loader_made_for_the_optimizer_draws_at_its_rate():
    # make_private's expected batch size and the loader's given apart: another rate than the accountant charges,
    # silently. Given the optimizer, the loader takes its batch size and secure mode, and refuses a rate mismatch.
    data = torch.utils.data.TensorDataset(torch.randn(200, 3))
    for secure in (False, True):
        model = torch.nn.Linear(3, 1)
        _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                     max_grad_norm=1.0, expected_batch_size=20, dataset_size=200, secure_mode=secure)
        sampler = privacy.poisson_loader(data, optimizer=dp).batch_sampler
        assert sampler.sample_rate == dp.sample_rate == 0.1 and sampler.secure_mode == secure
        with pytest.raises(ValueError, match="the accountant would charge another rate"):
            privacy.poisson_loader(torch.utils.data.TensorDataset(torch.randn(100, 3)), optimizer=dp)
        with pytest.raises(ValueError, match="expected_batch_size=10 but the optimizer's is 20"):
            privacy.poisson_loader(data, 10, optimizer=dp)
        with pytest.raises(ValueError, match=f"secure_mode={not secure} but the optimizer's is {secure}"):
            privacy.poisson_loader(data, optimizer=dp, secure_mode=not secure)
        # A non-distributed optimizer's batch is this process's whole one: a share of it would halve the batches
        with pytest.raises(ValueError, match="num_replicas=2, rank=1 for a non-distributed optimizer"):
            privacy.poisson_loader(data, optimizer=dp, num_replicas=2, rank=1)
        dp.engine.remove()
    with pytest.raises(TypeError, match="optimizer must be the DPOptimizer"):
        privacy.poisson_loader(data, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_poisson_sampler():
    sampler = privacy.PoissonBatchSampler(1000, 0.05, steps=200, generator=torch.Generator().manual_seed(0))
    sizes = [len(b) for b in sampler]
    assert len(sizes) == 200 and abs(sum(sizes) / 200 / 50 - 1) < 0.05
    tiny = privacy.PoissonBatchSampler(10, 0.01, steps=50, generator=torch.Generator().manual_seed(0))
    assert any(len(b) == 0 for b in tiny)  # empty batches happen and are yielded
    assert len(list(privacy.PoissonBatchSampler(100, 0.1, secure_mode=True))) == 10


def test_frozen_teacher_and_no_grad_generation_are_untouched():
    student = torch.nn.Linear(4, 4).double()
    teacher = torch.nn.Linear(4, 4).double().requires_grad_(False)
    model = torch.nn.ModuleDict({"student": student, "teacher": teacher})
    model, dp = privacy.make_private(model, torch.optim.SGD(student.parameters(), lr=0.1), noise_multiplier=0.0,
                                     max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    assert set(dp.engine.layers) == {"student"}
    with torch.no_grad():
        student(torch.randn(3, 4))
    assert not dp.engine.pending and all(not c for c in dp.engine.calls.values())
    x = torch.randn(3, 4)
    (student(x) - teacher(x)).pow(2).sum(1).sum().backward()
    dp.step()
    assert teacher.weight.grad is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(noise_multiplier=float("nan")), "noise_multiplier"),
        (dict(noise_multiplier=float("inf")), "noise_multiplier"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm"),
        (dict(expected_batch_size=0), "expected_batch_size"),
        (dict(sample_rate=None), "dataset_size"),
        (dict(expected_batch_size=2.7), "whole number"),  # the accountant's q and the step's divisor would differ
        (dict(dataset_size=100), "disagrees"),  # sample_rate 0.1 against 4 / 100
    ],
)
def test_bad_arguments(kwargs, match):
    model = torch.nn.Linear(2, 2)
    base = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    with pytest.raises(ValueError, match=match):
        privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), **{**base, **kwargs})


def test_a_batch_of_zero_examples_through_the_model_is_a_noise_only_step():
    """Poisson sampling can draw nothing: running the empty batch through forward and backward (as an
    ordinary loop does) steps exactly as not running it."""
    updates = []
    for run_model in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3),
                                    torch.nn.Linear(3, 1))
        before = [p.detach().clone() for p in model.parameters()]
        model, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                         max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1,
                                         generator=torch.Generator().manual_seed(3))
        if run_model:
            model(torch.randint(0, 10, (0, 5))).sum().backward()
        dp.step()
        assert dp.last_per_example_norms.shape == (0,)
        updates.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]))
        # The next batch, without zero_grad() (the step replaces .grad): the empty batch's backward pass is over.
        model(torch.randint(0, 10, (2, 5))).sum().backward()
        dp.step()
        assert dp.last_per_example_norms.shape == (2,)
    assert torch.equal(updates[0], updates[1]) and (updates[0] != 0).all()


def test_an_empty_micro_batch_keeps_the_norms_on_the_model_device():
    """Norms stay on the model's device; an empty micro-batch (Poisson sampling) adds none, on that device
    too ('meta' stands in for a GPU: the step then fails only where meta tensors cannot be stepped)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).to("meta")
    model, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                                     max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    model(torch.randn(3, 4, device="meta")).sum().backward()
    dp.accumulate()
    dp.accumulate()  # a micro-batch that drew no examples
    assert [(n.device.type, tuple(n.shape)) for n in dp._norms] == [("meta", (3,)), ("meta", (0,))]
    assert torch.cat(dp._norms).device.type == "meta"


def test_a_grad_scaler_is_refused_with_a_reason():
    """GradScaler's dynamic loss scale couples the examples across steps: refused at the step, by name, and the
    optimizer still steps without it afterwards."""
    model = torch.nn.Linear(4, 2).float()
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                                 max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x = torch.randn(4, 4, dtype=torch.float32)
    dp.zero_grad()
    scaler.scale(model(x).pow(2).sum(1).sum()).backward()
    with pytest.raises(ValueError, match="GradScaler cannot drive DP-SGD"):
        scaler.step(dp)
    dp.zero_grad()
    model(x).pow(2).sum(1).sum().backward()
    dp.step()
    assert dp.last_per_example_norms.shape == (4,)


@pytest.mark.parametrize("sigma", [-1.0, float("nan")])
def test_optimizer_made_directly_refuses_a_bad_sigma(sigma):
    """Not only make_private: a DPOptimizer built by hand must not exist with a sigma that would step
    without noise."""
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="noise_multiplier"):
        privacy.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), privacy.ClippingEngine(model),
                            noise_multiplier=sigma, max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)


def test_unsupported_modules_listed_eval_mode_and_batch_mismatch():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.LSTM(2, 2))
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\), 2 \(LSTM\)"):
        privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                             max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    lin = torch.nn.Linear(2, 2).eval()
    with pytest.raises(ValueError, match="eval mode"):
        privacy.make_private(lin, torch.optim.SGD(lin.parameters(), lr=0.1), noise_multiplier=1.0,
                             max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    wrapped = torch.nn.DataParallel(torch.nn.Linear(2, 2))  # DistributedDataParallel is refused the same way
    with pytest.raises(ValueError, match="wrapped in DataParallel: pass the unwrapped model"):
        privacy.make_private(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), noise_multiplier=1.0,
                             max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        privacy.make_private(frozen, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
                             noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    # A layer whose batch dimension is not first (here: transposed input) is caught at step time.
    a, b = torch.nn.Linear(3, 3).double(), torch.nn.Linear(3, 3).double()
    m = torch.nn.ModuleDict({"a": a, "b": b})
    _, dp = privacy.make_private(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=0.0,
                                 max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    h = a(torch.randn(4, 3))
    b(h.t().reshape(3, 4)[:, :3]).sum().backward()
    with pytest.raises(ValueError, match="batch"):
        dp.step()


def _hf_model(kind):
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "gemma":  # scaled word embeddings (an nn.Embedding subclass), tied to the head
        cfg = transformers.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       max_position_embeddings=32)
        model = transformers.GemmaForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(cfg)
    return model.double().train()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama_lora", "gemma"])
@pytest.mark.parametrize("norms", ["ghost", "instantiated"])
@pytest.mark.parametrize("device", DEVICES)
def test_hugging_face_causal_lms_with_padding_equal_brute_force(kind, norms, device, monkeypatch):
    """norms: the layers' own choice (ghost norms at these sizes), or per-example gradients everywhere
    (formed as the gradients arrive; GPT-2's Conv1D layers hold their weights transposed)."""
    if norms == "instantiated":
        from dpkd.privacy import layers
        monkeypatch.setattr(layers, "use_ghost", lambda tokens, d, p: False)
    torch.manual_seed(0)
    model = _hf_model(kind.removesuffix("_lora"))
    if kind.endswith("_lora"):  # PEFT LoRA adapters: only they train, through frozen base layers
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
        model = peft.get_peft_model(model, config)
        for name, p in model.named_parameters():  # LoRA's B starts at zero: give the test non-zero adapters
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    model = model.to(device)
    g = torch.Generator().manual_seed(1)
    b, t = 3, 9
    ids = torch.randint(1, 64, (b, t), generator=g)
    attention = torch.ones(b, t, dtype=torch.long)
    attention[1, 6:] = 0  # right padding: sequences of different lengths
    attention[2, 4:] = 0
    positions = torch.arange(t).expand(b, t)  # [B, T]: position embeddings stay per example
    labels = torch.where(attention.bool(), ids, torch.full_like(ids, -100))
    ids, attention, positions, labels = (x.to(device) for x in (ids, attention, positions, labels))

    def per_example_loss(m, rows):
        out = m(input_ids=ids[rows], attention_mask=attention[rows], position_ids=positions[rows]).logits
        return seq_loss(out[:, :-1], labels[rows][:, 1:])

    params = [p for p in model.parameters() if p.requires_grad]
    per = []
    for i in range(b):  # brute force: one backward per example
        gi = torch.autograd.grad(per_example_loss(model, [i]).sum(), params)
        per.append(torch.cat([x.flatten() for x in gi]))
    per = torch.stack(per)
    norms = per.norm(dim=1)
    c = float(norms.median())
    before = torch.cat([p.detach().flatten() for p in params])
    model, dp = privacy.make_private(model, torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=c,
                                     expected_batch_size=4, sample_rate=0.1)
    dp.zero_grad()
    per_example_loss(model, list(range(b))).sum().backward()
    dp.step()
    torch.testing.assert_close(dp.last_per_example_norms, norms, rtol=1e-6, atol=1e-10)
    coef = (c / (norms + 1e-6)).clamp(max=1)
    after = torch.cat([p.detach().flatten() for p in params])
    # Gemma's RMSNorm computes in fp32 inside a float64 model: autograd's (brute-force) norm-weight gradients carry
    # fp32 products, the engine's closed form float64 ones (2e-6 apart on a small entry).
    atol = 1e-8 if kind == "gemma" else 1e-10
    torch.testing.assert_close(after - before, -(per * coef[:, None]).sum(0) / 4, rtol=1e-6, atol=atol)


def test_embedding_and_linear_subclasses_with_forwards_of_their_own_are_refused():
    """The engine replaces a linear or embedding layer's forward with a capturing one: a subclass that computes
    something else (OPT's learned positions take other arguments; a linear that scales its output) would silently
    lose that, so it is listed as unsupported -- except Gemma's scaled embedding, checked to be embedding * scale."""
    class Positions(torch.nn.Embedding):
        def forward(self, mask, offset=0):
            return super().forward(mask.long().cumsum(1) + offset)

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class GemmaLike(torch.nn.Embedding):
        def __init__(self, *args, embed_scale=3.0):
            super().__init__(*args)
            self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale.to(self.weight.dtype)

    class NotGemma(GemmaLike):  # has embed_scale, but its forward adds it
        def forward(self, ids):
            return super(GemmaLike, self).forward(ids) + self.embed_scale.to(self.weight.dtype)

    class ByHand(torch.nn.Linear):  # Falcon's FalconLinear: F.linear written out
        def forward(self, x):
            return x @ self.weight.T + self.bias

    assert privacy.layer_kind(GemmaLike(10, 4)) == "embedding"
    assert privacy.layer_kind(ByHand(4, 3)) == "linear"
    for module in (Positions(10, 4), Scaled(4, 4), NotGemma(10, 4)):
        assert privacy.layer_kind(module) is None
        with pytest.raises(ValueError, match=type(module).__name__):
            privacy.make_private(torch.nn.Sequential(module), torch.optim.SGD(module.parameters(), lr=1.0),
                                 noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    emb = GemmaLike(10, 4)
    ids = torch.tensor([[1, 2, 3]])
    plain = emb(ids).detach()
    _, dp = privacy.make_private(emb, torch.optim.SGD(emb.parameters(), lr=1.0), noise_multiplier=0.0,
                                 max_grad_norm=1e9, expected_batch_size=1, sample_rate=0.1)
    out = emb(ids)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # the scale kept through the capturing forward
    out.pow(2).sum().backward()
    dp.step()


@pytest.mark.parametrize("by_keyword", [False, True, "other keyword", "in a dict", "no tensor"])
def test_a_model_that_folds_tokens_into_the_batch_is_refused(by_keyword):
    """OPT's decoder layers reshape [B, T, d] to [B * T, d] before fc1/fc2: with only those layers trainable, every
    captured layer saw B * T rows, so no batch-size mismatch showed, and each token was clipped as an example (a
    review measured one example moving the update by 3.13 C). The layers' rows are now held against the model input's
    batch size (positional, or a Hugging Face input_ids= keyword). An audit found the check silently off where the
    input came by another keyword or inside a dict (one example then moved the update by T C): any tensor argument
    counts now, and a call without one is refused."""
    class Folding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4).requires_grad_(False)
            self.fc = torch.nn.Linear(4, 3)
            self.held = None

        def forward(self, input_ids=None, x=None):
            if isinstance(input_ids, dict):
                input_ids = input_ids["ids"]
            x = self.emb(next(t for t in (input_ids, x, self.held) if t is not None))
            return self.fc(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], 3)

    model = Folding()
    model, dp = privacy.make_private(model, torch.optim.SGD(model.fc.parameters(), lr=1.0), noise_multiplier=0.0,
                                     max_grad_norm=1.0, expected_batch_size=2, sample_rate=0.1)
    ids = torch.randint(0, 10, (2, 5))
    model.held = ids
    calls = {False: lambda: model(ids), True: lambda: model(input_ids=ids), "other keyword": lambda: model(x=ids),
             "in a dict": lambda: model({"ids": ids}), "no tensor": lambda: model()}
    calls[by_keyword]().pow(2).sum((1, 2)).sum().backward()
    match = "without a tensor argument" if by_keyword == "no tensor" else "saw 10 rows where the model's input had 2"
    with pytest.raises(ValueError, match=match):
        dp.step()


def test_inputs_changed_in_place_after_the_layer_read_them_are_refused():
    """The capturing layers keep their inputs without autograd's saved-tensor version check: ids changed in place
    between the forward pass and the step sent the embedding's clipped sum to other rows (a review measured 40-72%
    error, silently). Now refused, in the backward pass or at the step, as autograd refuses it for a saved tensor."""
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2))
    model, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                     max_grad_norm=1.0, expected_batch_size=2, sample_rate=0.1)
    ids = torch.randint(0, 10, (2, 5))
    out = model(ids)
    ids.add_(1).remainder_(10)
    with pytest.raises(ValueError, match="input of layer '0' was modified in place"):
        out.pow(2).sum().backward()
    dp.zero_grad()
    out = model(ids)
    out.pow(2).sum().backward()
    ids.add_(1).remainder_(10)  # after the backward pass: the step reads the ids
    with pytest.raises(ValueError, match="input of layer '0' was modified in place"):
        dp.step()


def test_broadcast_position_ids_are_refused_not_silently_wrong():
    model = _hf_model("gpt2")
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                                 max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    ids = torch.randint(0, 64, (3, 5))
    model(input_ids=ids, position_ids=torch.arange(5)[None]).logits.sum().backward()
    with pytest.raises(ValueError, match="batch"):
        dp.step()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_norms_close_to_fp32(device):
    model, x, y, loss = make_case("tied_lm", b=4, seed=5)
    model, x, y = model.float().to(device), x.to(device), y.to(device)
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                                 max_grad_norm=1e9, expected_batch_size=4, sample_rate=0.1)
    dp.zero_grad()
    loss(model(x).float(), y).sum().backward()
    dp.step()
    exact = dp.last_per_example_norms.clone()
    dp.zero_grad()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    loss(out.float(), y).sum().backward()
    dp.step()
    assert dp.last_per_example_norms.dtype == torch.float32
    torch.testing.assert_close(dp.last_per_example_norms, exact, rtol=3e-2, atol=0)


@pytest.mark.parametrize("backward_inside", [False, True])
@pytest.mark.parametrize("step_inside", [False, True])
def test_autocast_forward_backward_and_step_keep_each_example_within_c(backward_inside, step_inside):
    """CPU bf16 autocast around the forward, and around the backward pass or the step or neither: every example's
    clipped contribution stays within C. Convolutions after the first layer read bf16 inputs, which torch.func's
    re-forward meets under the forward's autocast state (it raised with fp32 parameters); the norms and sums run
    without autocast (inside it, the instantiated per-example gradients were bf16, and an MLP over a sequence
    reached 1.0026 C)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.ReLU(),
                                torch.nn.Conv1d(4, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 8, 5)).float()
    x, y = torch.randn(4, 3, 12, dtype=torch.float32), torch.randint(0, 5, (4,))
    c = 1e-3  # every example clipped

    def autocast(on):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)

    for i in range(4):
        m = copy.deepcopy(model)
        m, dp = privacy.make_private(m, torch.optim.SGD(m.parameters(), lr=1.0),
                                     noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=4, sample_rate=0.1)
        with autocast(True):
            out = m(x[i:i + 1])
            with autocast(backward_inside):
                torch.nn.functional.cross_entropy(out.float(), y[i:i + 1], reduction="sum").backward()
        with autocast(step_inside):
            dp.accumulate()
        total = torch.sqrt(sum(v.double().pow(2).sum() for v in dp._sums.values()))
        assert float(total) <= c * (1 + 1e-6), (i, float(total) / c)
        dp.engine.remove()


class TwoReaders(torch.nn.Module):
    """Two linear layers read one LayerNorm output (as q and k do): fp32 under autocast, multiplied in bf16."""

    def __init__(self):
        super().__init__()
        self.norm, self.q, self.k, self.out = (torch.nn.LayerNorm(16), torch.nn.Linear(16, 16),
                                               torch.nn.Linear(16, 16), torch.nn.Linear(16, 3))

    def forward(self, x):
        h = self.norm(x)
        return self.out(torch.tanh(self.q(h)) * self.k(h)).mean(1)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_captures_the_16_bit_copy_each_layer_multiplied(device):
    """Under autocast a linear layer multiplies a bf16 copy of its fp32 input: the engine captures that copy (the
    gradient of the computation that ran, half the memory, 16-bit matmuls on a GPU), one copy for both layers
    that read the tensor (their ghost norms share its Gram), and drops its cache when the clipping begins."""
    torch.manual_seed(4)
    model = TwoReaders().float().to(device)
    x, y = torch.randn(6, 8, 16, dtype=torch.float32, device=device), torch.randint(0, 3, (6,), device=device)
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                                 max_grad_norm=1e9, expected_batch_size=6, sample_rate=0.1)
    norms = {}
    for autocast in (False, True):
        dp.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        torch.nn.functional.cross_entropy(out.float(), y, reduction="none").sum().backward()
        q, k = (dp.engine.calls[name][0].inputs[0] for name in ("q", "k"))
        assert q.dtype == k.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert q.data_ptr() == k.data_ptr()
        assert not dp.engine.instantiate["q"]  # ghost norms: 2 T^2 < d p
        dp.step()
        assert not dp.engine._autocast_copies
        norms[autocast] = dp.last_per_example_norms.clone()
    torch.testing.assert_close(norms[True], norms[False], rtol=3e-2, atol=0)


def test_bf16_split_clipped_sums_keep_each_example_within_c(monkeypatch):
    """The CUDA path for bf16 factors (two bf16 parts per clipped sum, taken here on the CPU): with sigma = 0 and
    SGD(lr=1), a one-example step moves the parameters by at most C / L, and by nearly C for a clipped example
    (the error bound added to its norm is tiny next to it)."""
    from dpkd.privacy import layers

    monkeypatch.setattr(layers, "splits", lambda a, g: a.dtype == g.dtype == torch.bfloat16)
    torch.manual_seed(6)
    model = TwoReaders().float()
    x, y = torch.randn(4, 8, 16, dtype=torch.float32), torch.randint(0, 3, (4,))
    c = 0.05
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                 max_grad_norm=c, expected_batch_size=2, sample_rate=0.1)
    for i in range(4):
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        dp.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x[i:i + 1])
        torch.nn.functional.cross_entropy(out.float(), y[i:i + 1], reduction="none").sum().backward()
        dp.step()
        moved = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm()) * 2
        assert dp.last_per_example_norms[0] > c and c * (1 - 1e-3) < moved <= c * (1 + 1e-6), (i, moved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d, p", [(8, 24), (24, 8)])
def test_clipped_sum_of_16_bit_factors_in_two_16_bit_parts(d, p, device):
    """Where bf16 factors are multiplied into fp32 (CUDA: the default there), the clipped sum scales the
    narrower factor by c_i in fp32 and carries it as hi + lo bf16 parts: within ~1e-5 of float64 (on the CPU,
    whose matmuls widen the parts), where hi alone is ~1e-3 off; each example's error within the bound the engine
    adds to its norm, also where the example's gradient nearly cancels (example 0: two tokens with opposite output
    gradients). The ghost norms' 16-bit Grams, too, match float64."""
    from dpkd.privacy import layers

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 7, d, generator=gen, dtype=torch.float32)
    g = torch.randn(5, 7, p, generator=gen, dtype=torch.float32)
    a[0, 1], g[0, 1] = a[0, 0], -g[0, 0] * 1.001
    a[0, 2:], g[0, 2:] = 0, 0
    a, g = a.bfloat16(), g.bfloat16()
    coef = torch.rand(5, generator=gen, dtype=torch.float32) * 0.9 + 0.05
    ref = torch.einsum("btp,btd,b->pd", g.double(), a.double(), coef.double())

    def err(t):
        return float((t.double().cpu() - ref).norm() / ref.norm())

    on = dict(device=device)
    split = layers.linear_clipped_sum(a.to(**on), g.to(**on), coef.to(**on), split=True if device == "cpu" else None)
    assert split.dtype == torch.float32 and split.shape == (p, d)
    assert err(split) < 1e-5 and err(layers.linear_clipped_sum(a, g, coef, split=False)) < 1e-6
    bounds = layers.split_error_bounds(a, g).double()
    for i in range(5):
        one = layers.linear_clipped_sum(a[i:i + 1], g[i:i + 1], coef[i:i + 1], split=True).double()
        exact = coef[i].double() * g[i].double().t() @ a[i].double()
        assert float((one - exact).norm()) <= float(coef[i] * bounds[i]) * (1 + 1e-3) + 1e-12, i
    sq = layers.ghost_sq_norms(a.to(**on), [g.to(**on)])
    sq_ref = torch.einsum("btp,btd->bpd", g.double(), a.double()).pow(2).sum((1, 2))
    assert sq.dtype == torch.float32
    # (fp32 Grams of the cancelling example: rounding at the scale of its tokens' products, as with fp32 inputs)
    torch.testing.assert_close(sq.cpu().double(), sq_ref, rtol=1e-5, atol=1e-6 * float(sq_ref.max()))
    if d <= p:
        hi_only = g.double().reshape(-1, p).t() @ (a.float() * coef[:, None, None]).bfloat16().double().reshape(-1, d)
    else:
        hi_only = (g.float() * coef[:, None, None]).bfloat16().double().reshape(-1, p).t() @ a.double().reshape(-1, d)
    assert err(hi_only) > 3e-4


@pytest.mark.parametrize("kind", ["tied_lm", "conv"])
def test_several_rows_per_example(kind):
    """A prompt with k sampled continuations is one example: its gradient sums over its k rows."""
    model, x, y, loss = make_case(kind, b=6, seed=11)
    k = 2
    params = [p for p in model.parameters() if p.requires_grad]

    def example_loss(rows):
        return loss(model(x[rows]), y[rows]).view(-1, k).mean(1)

    per = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(example_loss([2 * i, 2 * i + 1]).sum(),
                                                                           params)]) for i in range(3)])
    norms = per.norm(dim=1)
    c = float(norms.median())
    before = torch.cat([p.detach().flatten() for p in params])
    _, dp = privacy.make_private(model, torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=c,
                                 expected_batch_size=3, sample_rate=0.1)
    dp.engine.rows_per_example = k
    dp.zero_grad()
    example_loss(list(range(6))).sum().backward()
    dp.step()
    torch.testing.assert_close(dp.last_per_example_norms, norms, rtol=1e-6, atol=1e-12)
    coef = (c / (norms + 1e-6)).clamp(max=1)
    after = torch.cat([p.detach().flatten() for p in params])
    torch.testing.assert_close(after - before, -(per * coef[:, None]).sum(0) / 3, rtol=1e-6, atol=1e-12)


def test_optimizer_parameters_outside_the_model_are_refused():
    model = torch.nn.Linear(2, 2)
    stray = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="outside the private model"):
        privacy.make_private(model, torch.optim.SGD(list(model.parameters()) + [stray], lr=0.1),
                             noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)


@pytest.mark.parametrize("layer", ["layer_norm", "conv1d"])
def test_a_norm_or_conv_weight_used_outside_its_module_is_refused(layer):
    """Generic layers (norms, convolutions) got an ordinary autograd gradient, which the clipped sum replaced: a use
    outside the module was dropped without a word (found by a user-trial helper). Their forwards now read stand-ins."""
    class Sneaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.LayerNorm(4) if layer == "layer_norm" else torch.nn.Conv1d(4, 4, 1)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            if layer == "layer_norm":
                return self.head(self.inner(x) + x * self.inner.weight)
            y = self.inner(x.transpose(1, 2)) + torch.nn.functional.conv1d(x.transpose(1, 2), self.inner.weight)
            return self.head(y.transpose(1, 2))

    model = Sneaky().double()
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                 max_grad_norm=100.0, expected_batch_size=3, sample_rate=0.1)
    model(torch.randn(3, 5, 4, dtype=torch.float64)).sum().backward()
    with pytest.raises(ValueError, match="inner.weight received a gradient from outside its module"):
        dp.step()
    # Used only inside: no autograd gradient on the real parameters, which the step then moves.
    dp.zero_grad()
    model.forward = lambda x: model.head(model.inner(x) if layer == "layer_norm"
                                         else model.inner(x.transpose(1, 2)).transpose(1, 2))
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    model(x).sum().backward()
    assert all(p.grad is None for p in model.inner.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    dp.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(isinstance(p, torch.nn.Parameter) for p in model.inner._parameters.values())


def test_a_weight_used_outside_its_module_is_refused():
    class Sneaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x) + torch.nn.functional.linear(x, self.a.weight)  # second use bypasses the layer

    model = Sneaky().double()
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                                 max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    dp.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ValueError, match="outside its module"):
        dp.step()
    # Ordinary steps, with or without zero_grad in between, pass the check.
    plain = torch.nn.Linear(3, 3).double()
    _, dp = privacy.make_private(plain, torch.optim.SGD(plain.parameters(), lr=0.1), noise_multiplier=0.0,
                                 max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    for zero in (True, False, "in place", "in place"):
        if zero == "in place":  # the model's own zero_grad, as older loops call it: the step's gradients zeroed
            plain.zero_grad(set_to_none=False)
        elif zero:
            dp.zero_grad()
        plain(torch.randn(4, 3)).sum().backward()
        dp.step()
    # ... past which an outside use is still seen, a zero-valued one too (whether a step is refused must not depend
    # on the batch's values)
    x = torch.randn(4, 3, dtype=torch.float64)
    for scale in (1.0, 0.0):
        plain.zero_grad(set_to_none=False)
        (plain(x) + scale * torch.nn.functional.linear(x, plain.weight)).sum().backward()
        with pytest.raises(ValueError, match="weight received a gradient from outside its module"):
            dp.step()
        dp.zero_grad()


def test_noise_multiplier_none_is_named():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="noise_multiplier"):
        privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=None,
                             max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)


def _private_mlp(**kw):
    model, x, y, loss = make_case("mlp", b=6)
    per, norms = brute_force(model, x, y, loss)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                     max_grad_norm=0.5, expected_batch_size=6, sample_rate=0.5, **kw)

    def check_step():  # against the brute-force clipped sum of all six examples
        coef = (0.5 / (norms + 1e-6)).clamp(max=1)
        for n, p in model.named_parameters():
            expected = -(per[n] * coef.reshape(-1, *[1] * (per[n].dim() - 1))).sum(0) / 6
            torch.testing.assert_close(p.detach() - before[n], expected, rtol=1e-6, atol=1e-12)
    return model, dp, x, y, loss, check_step


def test_micro_batches_without_accumulate_are_refused():
    """Opacus's accumulation pattern (backward per micro-batch, one step) would join micro-batch example i with the
    other micro-batches' example i in one clipping unit: up to 2C per real example, outside the accounting."""
    model, dp, x, y, loss, _ = _private_mlp()
    dp.zero_grad()
    loss(model(x[:3]), y[:3]).sum().backward()
    with pytest.raises(RuntimeError, match="accumulate"):
        model(x[3:])


def test_gradient_checkpointing_recomputes_inside_the_backward_pass():
    """Recomputed forward passes run inside backward(): not a new micro-batch."""
    from torch.utils.checkpoint import checkpoint
    model, dp, x, y, loss, check_step = _private_mlp()
    dp.zero_grad()
    for reentrant in (False, True):
        if reentrant:
            model, dp, x, y, loss, check_step = _private_mlp()
        out = checkpoint(model, x.requires_grad_(reentrant), use_reentrant=reentrant)
        loss(out, y).sum().backward()
        dp.step()
        check_step()


def test_zero_grad_between_forward_and_backward():
    model, dp, x, y, loss, check_step = _private_mlp()
    per_example = loss(model(x), y)
    dp.zero_grad()
    per_example.sum().backward()
    dp.step()
    check_step()


def test_a_parameter_unfrozen_after_make_private_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).double()
    model[0].requires_grad_(False)
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0,
                                 max_grad_norm=0.1, expected_batch_size=4, sample_rate=0.1)
    model[0].requires_grad_(True)  # gradual unfreezing: its raw gradient would be stepped
    model(torch.randn(4, 4)).sum().backward()
    with pytest.raises(ValueError, match="frozen"):
        dp.step()


def test_train_mode_batch_norm_is_refused():
    """A batch norm without trainable parameters still couples the examples through the batch statistics."""
    def model():
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8, affine=False),
                                   torch.nn.Linear(8, 2)).double()
    m = model()
    with pytest.raises(ValueError, match="batch norm"):
        privacy.make_private(m, torch.optim.SGD(m.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=0.1,
                             expected_batch_size=4, sample_rate=0.1)
    m = model()
    m[1].eval()  # frozen statistics: each example normalised alone
    _, dp = privacy.make_private(m, torch.optim.SGD(m.parameters(), lr=1.0), noise_multiplier=1.0,
                                 max_grad_norm=0.1, expected_batch_size=4, sample_rate=0.1)
    m(torch.randn(4, 4)).sum().backward()
    dp.step()
    m.train()  # back in training mode
    m(torch.randn(4, 4)).sum().backward()
    with pytest.raises(ValueError, match="batch norm"):
        dp.step()


def test_make_private_twice_is_refused_until_the_first_engine_is_removed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8)).double()
    kw = dict(noise_multiplier=1.0, max_grad_norm=0.1, expected_batch_size=4, sample_rate=0.1)
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), **kw)
    hooks = len(model[1]._forward_hooks), len(model[1]._forward_pre_hooks)  # one engine's
    with pytest.raises(ValueError, match="already called"):
        privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), **kw)
    dp.engine.remove()
    assert len(model[1]._forward_hooks) == len(model[1]._forward_pre_hooks) == 0
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), **kw)
    model(torch.randn(4, 4)).sum().backward()
    dp.step()
    assert (len(model[1]._forward_hooks), len(model[1]._forward_pre_hooks)) == hooks


def test_learning_rate_schedulers_take_the_dp_optimizer():
    model, dp, x, y, loss, _ = _private_mlp()
    sched = torch.optim.lr_scheduler.StepLR(dp, step_size=1, gamma=0.5)
    for _ in range(2):
        dp.zero_grad()
        loss(model(x), y).sum().backward()
        dp.step()
        sched.step()
    assert dp.original_optimizer.param_groups[0]["lr"] == 0.25
    assert isinstance(dp, torch.optim.Optimizer) and "DPOptimizer" in repr(dp)


def test_poisson_loader_yields_empty_batches_as_empty_tensors():
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 2, (10,))
    loader = privacy.poisson_loader(torch.utils.data.TensorDataset(x, y), 0.1, steps=40,
                                    generator=torch.Generator().manual_seed(0))
    model = torch.nn.Linear(4, 2).double()
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                 max_grad_norm=1.0, expected_batch_size=1, sample_rate=0.01 * 10)
    sizes = []
    for xb, yb in loader:
        sizes.append(xb.shape[0])
        assert xb.shape[1:] == (4,) and xb.dtype == x.dtype and yb.shape == (xb.shape[0],)
        dp.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb, reduction="none").sum().backward()
        dp.step()
    assert 0 in sizes and max(sizes) > 0 and len(dp.accountant) == 40
    # Dicts and default_collate's lists of strings.
    items = [{"ids": torch.tensor([i, i]), "text": f"t{i}"} for i in range(3)]
    empty = privacy.EmptyBatchCollate(items)([])
    assert empty["ids"].shape == (0, 2) and empty["text"] == []


def test_poisson_sampler_splits_the_dataset_over_ranks():
    per_rank = [list(privacy.PoissonBatchSampler(1000, 0.5, steps=1, num_replicas=3, rank=r)) for r in range(3)]
    batches = [set(b[0]) for b in per_rank]
    assert all(i % 3 == r for r, b in enumerate(batches) for i in b)
    assert sum(len(b) for b in batches) == len(set.union(*batches))
    assert 400 < sum(len(b) for b in batches) < 600
    # Unseeded ranks draw independently (equal draws would pick the same positions in every rank's share).
    positions = [{i // 3 for i in b} for b in batches]
    assert positions[0] != positions[1]
    with pytest.raises(ValueError, match="rank"):
        privacy.PoissonBatchSampler(10, 0.5, num_replicas=2, rank=2)


def test_two_forward_passes_before_one_backward_are_refused():
    """Row i of each pass would be one clipping unit: two examples if the passes held different micro-batches."""
    model, dp, x, y, loss, _ = _private_mlp()
    (loss(model(x[:3]), y[:3]).sum() + loss(model(x[3:]), y[3:]).sum()).backward()
    with pytest.raises(ValueError, match="several forward passes"):
        dp.step()


def test_interleaved_micro_batches_accumulate_exactly():
    """Both micro-batches' forwards before either backward: accumulate() after the first backward consumes only what
    that backward delivered; the second's captures wait in its graph."""
    model, dp, x, y, loss, check_step = _private_mlp()
    dp.zero_grad()
    first, second = loss(model(x[:2]), y[:2]), loss(model(x[2:]), y[2:])
    first.sum().backward()
    dp.accumulate()
    second.sum().backward()
    dp.step()
    assert dp.last_per_example_norms.shape == (6,)
    check_step()


def test_a_forward_without_backward_frees_its_captures_with_its_graph():
    import gc

    from dpkd.privacy import engine as engine_module
    model, dp, x, y, loss, _ = _private_mlp()
    out = model(x)  # e.g. a step that ran out of memory before backward
    assert any(isinstance(o, engine_module._Call) for o in gc.get_objects())
    del out
    gc.collect()
    assert not any(isinstance(o, engine_module._Call) for o in gc.get_objects())


def test_batch_norm_without_running_statistics_is_refused_in_eval_mode_too():
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8, affine=False, track_running_stats=False),
                            torch.nn.Linear(8, 2)).double()
    m[1].eval()  # still normalises with the batch's statistics
    with pytest.raises(ValueError, match="batch norm"):
        privacy.make_private(m, torch.optim.SGD(m.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=0.1,
                             expected_batch_size=4, sample_rate=0.1)


def test_copies_and_pickles_of_a_private_model_are_not_private():
    import copy
    import io
    normed = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8)).double()
    privacy.make_private(normed, torch.optim.SGD(normed.parameters(), lr=1.0), noise_multiplier=1.0,
                         max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    buffer = io.BytesIO()
    torch.save(normed, buffer)  # its hooks pickle as inert ones
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    assert loaded[1].weight.grad is not None  # an ordinary, non-private model
    model, dp, x, y, loss, _ = _private_mlp()
    twin = copy.deepcopy(model)  # e.g. an EMA copy
    loss(twin(x), y).sum().backward()  # ordinary gradients, nothing captured by the original's engine
    assert not dp.engine.pending and twin[0].weight.grad is not None
    _, dp_twin = privacy.make_private(twin, torch.optim.SGD(twin.parameters(), lr=1.0), noise_multiplier=0.0,
                                      max_grad_norm=0.5, expected_batch_size=6, sample_rate=0.5)
    dp_twin.zero_grad()
    loss(twin(x), y).sum().backward()
    dp_twin.step()
    assert dp_twin.last_per_example_norms.shape == (6,) and not dp.engine.pending


def test_make_private_on_a_part_of_a_private_model_is_refused():
    model, dp, *_ = _private_mlp()
    with pytest.raises(ValueError, match="already called"):
        privacy.make_private(model[2], torch.optim.SGD(model[2].parameters(), lr=1.0), noise_multiplier=1.0,
                             max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)


def test_a_frozen_weight_next_to_a_trainable_bias_unfrozen_later_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).double()
    model[0].weight.requires_grad_(False)  # BitFit: biases only
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0,
                                 max_grad_norm=0.1, expected_batch_size=4, sample_rate=0.1)
    model[0].weight.requires_grad_(True)
    model(torch.randn(4, 4, dtype=torch.float64)).sum().backward()
    with pytest.raises(ValueError, match="frozen at make_private"):
        dp.step()


def test_a_module_frozen_altogether_unfrozen_later_is_refused():
    """From an audit: a module with no trainable parameter at make_private is not captured; unfrozen later, autograd
    left raw, unclipped gradients in its .grad (not stepped unless the optimizer held it, but readable)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).double()
    model[0].requires_grad_(False)
    _, dp = privacy.make_private(model, torch.optim.SGD(model[2].parameters(), lr=1.0), noise_multiplier=1.0,
                                 max_grad_norm=0.1, expected_batch_size=4, sample_rate=0.1)
    model[0].requires_grad_(True)
    model(torch.randn(4, 4, dtype=torch.float64)).sum().backward()
    with pytest.raises(ValueError, match=r"frozen at make_private are trainable now \(0.weight, 0.bias\)"):
        dp.step()


def test_an_embedding_frozen_after_make_private_leaves_the_norms():
    model, x, y, loss = make_case("tied_lm", b=4, seed=5)
    model.emb.weight.requires_grad_(False)  # the tied weight: embedding and head
    _, norms = brute_force(model, x, y, loss)  # of the other parameters
    model.emb.weight.requires_grad_(True)
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                                 max_grad_norm=1e6, expected_batch_size=4, sample_rate=0.1)
    model.emb.weight.requires_grad_(False)  # frozen since make_private
    loss(model(x), y).sum().backward()
    dp.step()
    torch.testing.assert_close(dp.last_per_example_norms, norms, rtol=1e-6, atol=1e-12)


def test_ranks_seeded_alike_draw_independently():
    draws = [list(privacy.PoissonBatchSampler(1000, 0.3, steps=1, num_replicas=2, rank=r,
                                              generator=torch.Generator().manual_seed(0)))[0] for r in range(2)]
    assert {i // 2 for i in draws[0]} != {i // 2 for i in draws[1]}  # equal seeds used to give equal positions
    again = list(privacy.PoissonBatchSampler(1000, 0.3, steps=1, num_replicas=2, rank=1,
                                             generator=torch.Generator().manual_seed(0)))[0]
    assert again == draws[1]  # reproducible from the seed


def test_empty_batches_of_unknown_types_are_refused_not_filled_with_an_example():
    import dataclasses

    import numpy as np

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor

    items = [torch.tensor([float(i)]) for i in range(3)]
    with pytest.raises(TypeError, match="cannot make an empty batch"):
        privacy.EmptyBatchCollate(items, lambda b: Batch(torch.stack(b)))([])
    assert privacy.EmptyBatchCollate(items, lambda b: Batch(torch.stack(b)) if b else Batch(torch.zeros(0, 1)))(
        []).x.shape == (0, 1)  # a collate_fn that handles [] is used as it is
    arrays = privacy.EmptyBatchCollate(items, lambda b: {"x": np.stack([t.numpy() for t in b])})([])
    assert arrays["x"].shape == (0, 1)


def test_dp_optimizer_refuses_copies_and_takes_step_hooks():
    import copy
    import pickle
    model, dp, x, y, loss, check_step = _private_mlp()
    calls = []
    dp.register_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    for copy_it in (copy.deepcopy, pickle.dumps):  # a copy would step copied parameters through a detached engine
        with pytest.raises(TypeError, match="state_dict"):
            copy_it(dp)
    dp.zero_grad()
    loss(model(x), y).sum().backward()
    dp.step()
    check_step()
    assert calls == [1]


class _BodyHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(x))


def test_passes_are_told_apart_through_submodules_too():
    """Two micro-batches through a submodule before one step are refused as through the root; one batch through the
    body and then the head (two outermost calls, each layer once) is one pass."""
    torch.manual_seed(0)
    model = _BodyHead().double()
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    loss = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    per, norms = brute_force(model, x, y, loss)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                 max_grad_norm=0.5, expected_batch_size=6, sample_rate=0.5)
    (model.body(x[:3]).sum() + model.body(x[3:]).sum()).backward()
    with pytest.raises(ValueError, match="several forward passes"):
        dp.step()
    dp.zero_grad()
    loss(model.head(model.body(x)), y).sum().backward()  # staged: one pass
    dp.step()
    coef = (0.5 / (norms + 1e-6)).clamp(max=1)
    for n, p in model.named_parameters():
        expected = -(per[n] * coef.reshape(-1, *[1] * (per[n].dim() - 1))).sum(0) / 6
        torch.testing.assert_close(p.detach() - before[n], expected, rtol=1e-6, atol=1e-12)


class _CheckpointedBody(_BodyHead):
    """Checkpoints its body as Hugging Face models checkpoint their decoder layers (the model's own forward runs with
    gradients enabled; reentrant recomputation inside backward)."""

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        return self.head(checkpoint(self.body, x.requires_grad_(True), use_reentrant=True))


def test_reentrant_checkpointing_after_two_passes_is_refused():
    torch.manual_seed(0)
    model = _CheckpointedBody().double()
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    loss = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    plain = _BodyHead().double()
    plain.load_state_dict(model.state_dict())
    _, norms = brute_force(plain, x, y, loss)
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                 max_grad_norm=0.5, expected_batch_size=6, sample_rate=0.5)
    (loss(model(x[:3]), y[:3]).sum() + loss(model(x[3:]), y[3:]).sum()).backward()
    with pytest.raises(ValueError, match="reentrant"):
        dp.step()
    dp.zero_grad()
    loss(model(x), y).sum().backward()  # one pass: recomputed layers and the head agree on the examples
    dp.step()
    torch.testing.assert_close(dp.last_per_example_norms, norms, rtol=1e-6, atol=1e-12)


def test_a_failed_flush_drops_the_micro_batch_whole(monkeypatch):
    """A clipped sum that fails halfway (an out-of-memory error, say) must not leave some layers' sums behind for a
    retry to add to the rest, clipped against a partial norm."""
    from dpkd.privacy import layers as dp_layers
    model, dp, x, y, loss, _ = _private_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    real, calls = dp_layers.linear_clipped_sum, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(dp_layers, "linear_clipped_sum", failing_once)
    loss(model(x), y).sum().backward()
    with pytest.raises(RuntimeError, match="simulated"):
        dp.step()
    assert not dp.engine.pending
    dp.step()  # sigma = 0: nothing of the failed batch reaches the parameters
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_sampler_made_again_from_one_generator_draws_anew_on_every_rank():
    g = torch.Generator().manual_seed(0)
    epochs = [list(privacy.PoissonBatchSampler(100, 0.2, steps=1, num_replicas=2, rank=1, generator=g))[0]
              for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]


def test_poisson_loader_checks_its_empty_batch_when_made():
    items = [torch.tensor([float(i)]) for i in range(3)]
    with pytest.raises(TypeError, match="cannot make an empty batch"):
        privacy.poisson_loader(items, 1, collate_fn=lambda b: (torch.stack(b), len(b)))


def test_a_frozen_embedding_costs_no_clipped_sum(monkeypatch):
    from dpkd.privacy import layers as dp_layers
    model, x, y, loss = make_case("tied_lm", b=4, seed=5)
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                                 max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    model.emb.weight.requires_grad_(False)
    monkeypatch.setattr(dp_layers, "embedding_clipped_sum", lambda *a: pytest.fail("[V, d] sum of a frozen weight"))
    loss(model(x), y).sum().backward()
    dp.step()


def test_a_resumed_run_draws_the_noise_and_batches_a_straight_run_draws():
    """Checkpoints hold the noise and sampling generators: a resumed run made from fresh seeded generators would
    otherwise repeat the first steps' noise, which the accountant counts as independent."""
    data = torch.randn(40, 6)

    def run(steps, state=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        m, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                     max_grad_norm=1.0, expected_batch_size=8, dataset_size=40,
                                     generator=torch.Generator().manual_seed(1))
        sampler = privacy.PoissonBatchSampler(40, 0.2, steps=steps, generator=torch.Generator().manual_seed(2))
        if state is not None:
            model.load_state_dict(state["model"])
            dp.load_state_dict(state["optimizer"])
            sampler.load_state_dict(state["sampler"])
        for rows in sampler:
            dp.zero_grad()
            m(data[rows]).pow(2).sum(1).sum().backward()
            dp.step()
        state = {"model": model.state_dict(), "optimizer": dp.state_dict(), "sampler": sampler.state_dict()}
        dp.engine.remove()
        return model, state

    straight, _ = run(4)
    _, halfway = run(2)
    resumed, _ = run(2, halfway)
    torch.testing.assert_close(resumed.weight, straight.weight, rtol=0, atol=0)
    assert len(halfway["optimizer"]["accountant"]["history"]) > 0

    model = torch.nn.Linear(6, 3)
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                 max_grad_norm=1.0, expected_batch_size=8, dataset_size=40)
    with pytest.raises(ValueError, match="generator"):
        dp.load_state_dict(halfway["optimizer"])
    with pytest.raises(ValueError, match="generator"):
        privacy.PoissonBatchSampler(40, 0.2, secure_mode=True).load_state_dict(halfway["sampler"])


def test_checkpoints_restore_per_rank_from_any_device_and_refuse_what_they_cannot():
    model = torch.nn.Linear(3, 2)
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                 max_grad_norm=1.0, expected_batch_size=2, dataset_size=10,
                                 generator=torch.Generator().manual_seed(0))
    state = dp.state_dict()
    if torch.cuda.is_available():
        state["noise_generator"] = state["noise_generator"].cuda()  # as torch.load(map_location="cuda") leaves it
    dp.load_state_dict(state)  # restored through the CPU
    with pytest.warns(RuntimeWarning, match="no noise generator state"):
        dp.load_state_dict({k: v for k, v in state.items() if k != "noise_generator"})
    spent = {"mechanism": "rdp", "history": [{"noise_multiplier": 1.0, "sample_rate": 0.2, "steps": 5}]}
    broken = dict(state, noise_generator=torch.zeros(3, dtype=torch.uint8), accountant=spent)
    with pytest.raises(RuntimeError):
        dp.load_state_dict(broken)
    assert len(dp.accountant) == 0  # nothing was loaded from the broken state
    dp.engine.remove()

    ranks = [privacy.PoissonBatchSampler(100, 0.1, num_replicas=2, rank=r, generator=torch.Generator().manual_seed(0))
             for r in range(2)]
    with pytest.raises(ValueError, match="one state per rank"):
        ranks[1].load_state_dict(ranks[0].state_dict())
    ranks[1].load_state_dict(ranks[1].state_dict())


def test_a_mean_reduced_loss_does_not_overflow_large_inputs_into_every_contribution():
    """The mean's factor B on the product, not on the rows of the (unscaled) inputs: an input of 5e37 times B would be
    inf, and so would every example's part of the clipped sum."""
    vocab, d, t, b = 4, 2, 2, 8

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(vocab, d), torch.nn.Linear(d, vocab, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids, extra):
            return self.head(self.emb(ids) + extra)

    torch.manual_seed(0)
    model = Tied().float()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids, extra, w = torch.randint(0, vocab, (b, t)), torch.randn(b, t, d, dtype=torch.float32), torch.ones(b)
    extra[0], w[0] = 5e37, 1e-38

    def update(rows):
        model.load_state_dict(state)
        before = model.emb.weight.detach().clone()
        m, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                     max_grad_norm=1.0, expected_batch_size=b, sample_rate=0.1, loss_reduction="mean")
        dp.zero_grad()
        (m(ids[rows], extra[rows]).mean((1, 2)) * w[rows]).mean().backward()
        dp.step()
        dp.engine.remove()
        return model.emb.weight.detach() - before

    with_first, without = update(list(range(b))), update(list(range(1, b)))
    assert torch.isfinite(with_first).all() and (with_first - without).norm() <= 1.0 / b


def test_micro_batches_partition_one_poisson_batch_each():
    whole = privacy.PoissonBatchSampler(50, 0.3, steps=20, generator=torch.Generator().manual_seed(4))
    parts = privacy.PoissonBatchSampler(50, 0.3, steps=20, generator=torch.Generator().manual_seed(4), micro_batches=3)
    batches, pieces = list(whole), list(parts)
    assert len(parts) == 60 and len(pieces) == 60
    for i, batch in enumerate(batches):
        assert sum(pieces[3 * i:3 * i + 3], []) == batch  # in order, each example once
    with pytest.raises(ValueError, match="micro_batches"):
        privacy.PoissonBatchSampler(50, 0.3, micro_batches=0)


def test_sizes_are_named_as_the_caller_gave_them():
    """Found by a user-trial helper: these named sample_rate, which the caller never passed, or came from DataLoader."""
    data = torch.utils.data.TensorDataset(torch.randn(100, 3))
    for bad in (0, -1, 500, float("nan")):
        with pytest.raises(ValueError, match=r"expected_batch_size must be in \(0, len\(dataset\) = 100\]"):
            privacy.poisson_loader(data, bad)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        privacy.poisson_loader(data, 8, steps=-1)
    model = torch.nn.Linear(3, 1)
    for kw, match in ((dict(expected_batch_size=200, dataset_size=100), "at most dataset_size"),
                      (dict(expected_batch_size=10, dataset_size=250.5), "dataset_size must be an int")):
        with pytest.raises(ValueError, match=match):
            privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                 max_grad_norm=1.0, **kw)


def test_a_layer_with_an_earlier_pre_hook_that_reads_its_parameters():
    """torch.nn.utils.weight_norm's pre-hook rebuilds the weight from weight_g and weight_v: the stand-ins must be in
    place before it runs, or the real parameters get an autograd gradient (refused as an outside use; found by a
    review helper)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.utils.weight_norm(torch.nn.Conv1d(3, 3, 3, padding=1)), torch.nn.Flatten(),
                                torch.nn.Linear(12, 1)).double()
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    plain = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                 max_grad_norm=1e6, expected_batch_size=4, sample_rate=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model(x).sum().backward()
    dp.step()
    for p, b, g in zip(model.parameters(), before, plain):
        torch.testing.assert_close(p - b, -g / 4)


@pytest.mark.parametrize("trainable", ["all", "layer_norm_only"])
def test_a_batch_scope_selection_is_refused_on_a_private_model(trainable):
    # Ranked across the batch, one example would change which of the others' tokens carry loss: past C.
    import dpkd
    from dpkd import select

    torch.manual_seed(0)
    vocab, width, batch, tokens = 40, 8, 3, 5
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, width), torch.nn.LayerNorm(width),
                                torch.nn.Linear(width, vocab)).float()  # the losses take fp32 logits
    if trainable == "layer_norm_only":  # a generic layer's stand-in parameters are what the graph shows
        for module in (model[0], model[2]):
            module.requires_grad_(False)
    plain = copy.deepcopy(model)
    _, optimizer = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                        max_grad_norm=1.0, expected_batch_size=batch, dataset_size=100)
    ids, teacher = torch.randint(0, vocab, (batch, tokens)), torch.randn(batch, tokens, vocab, dtype=torch.float32)

    def rule(scope):
        return lambda st, valid: select.entropy_top_fraction(st.student_entropy, 0.5, valid=valid, scope=scope)

    half = select.Selection(torch.rand(batch, tokens) < 0.5, "batch")
    for chosen in (rule("batch"), half):
        with pytest.raises(ValueError, match="batch-scope selection cannot be used under DP"):
            dpkd.distill_loss(model(ids), teacher, reduction="none", select=chosen)
        dpkd.distill_loss(plain(ids), teacher, reduction="none", select=chosen)  # not private: allowed
    # A reentrant checkpoint's node hides the parameters its segment used (the graph shows only its input): any
    # private model then counts. torch.compile has no graph to walk: any private model counts.
    embedded = model[0](ids).detach().requires_grad_(True)
    tail = torch.utils.checkpoint.checkpoint(lambda h: model[2](model[1](h)), embedded, use_reentrant=True)
    with pytest.raises(ValueError, match="batch-scope selection cannot be used under DP"):
        dpkd.distill_loss(tail, teacher, reduction="none", select=rule("batch"))
    compiled = torch.compile(lambda s: dpkd.distill_loss(s, teacher, reduction="none", select=rule("batch")),
                             backend="eager")
    with pytest.raises(ValueError, match="batch-scope selection cannot be used under DP"):
        compiled(model(ids))
    optimizer.zero_grad()
    dpkd.distill_loss(model(ids), teacher, reduction="none", select=rule("sequence")).sum().backward()
    optimizer.step()


def test_batch_wide_reductions_of_a_private_models_logits_are_refused():
    # reduction="mean" divides every example's loss by the batch's token count, "batchmean" by its size: removing
    # one example rescales the others' gradients (a user trial measured example 0's norm doubling from B 4 to 2).
    import dpkd

    torch.manual_seed(0)
    f32 = dict(dtype=torch.float32)  # the losses take fp32 logits
    h, teacher = torch.randn(4, 3, 6, **f32), torch.randn(4, 3, 10, **f32)
    ids, logp = torch.randn(4, 3, 10).topk(2).indices, torch.full((4, 3, 2), -1.0, **f32)
    for loss_reduction in ("sum", "mean"):
        model = torch.nn.Linear(6, 10).float()
        plain = copy.deepcopy(model)
        privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                             max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1, loss_reduction=loss_reduction)
        refused = ("mean",) if loss_reduction == "mean" else ("mean", "batchmean")
        for reduction in ("mean", "batchmean", "sum", "none"):
            for loss in (lambda m: dpkd.distill_loss(m(h), teacher, reduction=reduction),
                         lambda m: dpkd.taid_loss(m(h), teacher, 0.5, reduction=reduction),
                         lambda m: dpkd.topk_distill_loss(m(h), ids, logp, reduction=reduction)):
                if reduction in refused:
                    with pytest.raises(ValueError, match=f"reduction='{reduction}' divides by counts over the whole"):
                        loss(model)
                else:
                    loss(model)
                loss(plain)  # not private: any reduction
        with pytest.raises(ValueError, match="student_weight is a private model's own weight"):
            dpkd.fused_linear_distill_loss(h, model.weight, h, model.weight, student_bias=model.bias)
    # Compiled: the check runs outside the graph (the graph walk needs the real autograd graph)
    compiled = torch.compile(lambda x: dpkd.distill_loss(x, teacher, reduction="mean"), backend="eager")
    with pytest.raises(ValueError, match="reduction='mean' divides by counts over the whole"):
        compiled(model(h))
    compiled(plain(h))
    whole = torch.compile(lambda x: dpkd.distill_loss(x, teacher, reduction="mean"), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="reduction='mean' or 'batchmean' while a model is private"):
        whole(model(h))


@pytest.mark.parametrize("positions", ["shared", "per_example", "one_id_per_example"])
@pytest.mark.parametrize("inputs", ["ids", "vectors"])
def test_position_ids_without_the_batch_dimension_are_refused_even_where_b_equals_t(positions, inputs):
    # nanoGPT's wpe(torch.arange(T)), a ViT's positions: rows of positions, not of examples; with B = T the rows
    # check passed and the step moved past C / L (review helpers: 1.28 x at B = T = 16; 2.76 x for vector inputs).
    # One id per example ([B], e.g. a task embedding) takes the same error, whose fix ([B, 1]) is accepted.
    class PositionStyle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(11, 4) if inputs == "ids" else torch.nn.Linear(3, 4)
            self.wpe, self.head = torch.nn.Embedding(4, 4), torch.nn.Linear(4, 11)

        def forward(self, x):
            b, t = x.shape[:2]
            pos = {"shared": torch.arange(t), "per_example": torch.arange(t).expand(b, t),
                   "one_id_per_example": torch.arange(b)[:, None]}[positions]
            return self.head(self.wte(x) + self.wpe(pos))

    model = PositionStyle()  # float64, as the module's default dtype
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                 max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    x = torch.randint(0, 11, (4, 4)) if inputs == "ids" else torch.randn(4, 4, 3)  # B = T = 4
    model(x).sum().backward()
    if positions == "shared":
        with pytest.raises(ValueError, match=r"embedding .wpe. read ids of 1 dimension\(s\) .* ids\[:, None\]"):
            dp.step()
    else:
        dp.step()


def test_instance_norm_tracking_running_statistics_in_training_is_refused():
    # Its running statistics move with the private batch, without clipping or noise, and leave with the model.
    model = torch.nn.Sequential(torch.nn.Conv1d(3, 3, 1), torch.nn.InstanceNorm1d(3, track_running_stats=True))
    with pytest.raises(ValueError, match=r"track_running_stats=True .* 1 \(InstanceNorm1d\)"):
        privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0,
                             max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    model[1].eval()  # normalises with the running statistics, updates nothing
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0,
                                 max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    model[1].train()  # checked again at each step
    model(torch.randn(4, 3, 5)).sum().backward()
    with pytest.raises(ValueError, match="track_running_stats=True"):
        dp.step()


@pytest.mark.parametrize("layer", ["linear", "layer_norm"])
def test_a_parameter_replaced_at_a_call_is_refused(layer):
    # torch.func.functional_call(layer, {"weight": w * 2}, ...) reads a tensor made from the parameter: the engine would
    # file that tensor's per-example gradients under the parameter (a review measured the step 1-3% off, silently).
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    _, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                 max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    target = model[0] if layer == "linear" else model[1]
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"reads another tensor as its weight than the parameter it held"):
        torch.func.functional_call(target, {"weight": target.weight * 2}, (x if layer == "linear" else model[0](x),))
    dp.zero_grad()
    model(x).sum().backward()  # the layers' own parameters: as ever
    dp.step()


@pytest.mark.parametrize("layer", ["linear", "layer_norm"])
def test_a_layer_on_a_table_shared_by_all_examples_is_refused(layer):
    """From an audit: a trainable layer applied to a [T, d] parameter or buffer (a learned position table) has rows
    that pass the row check where B = T, and each was clipped as an example (one example moved the update by 3.1 C at
    B = T = 8, silently). Refused at the forward pass; the table expanded over the batch is per example, and allowed."""
    b = t = 4

    class Positions(torch.nn.Module):
        def __init__(self, expand):
            super().__init__()
            self.register_buffer("table", torch.randn(t, 3))
            self.pos = torch.nn.Linear(3, 3) if layer == "linear" else torch.nn.LayerNorm(3)
            self.out = torch.nn.Linear(3, 1)
            self.expand = expand

        def forward(self, x):
            table = self.table.expand(x.shape[0], t, 3) if self.expand else self.table[:t]
            return self.out(x + self.pos(table)).squeeze(-1)

    for expand in (False, True):
        model = Positions(expand)
        model, dp = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                         max_grad_norm=1.0, expected_batch_size=b, sample_rate=0.1)
        x = torch.randn(b, t, 3)
        if not expand:
            with pytest.raises(ValueError, match="applied to a parameter or buffer of the model"):
                model(x)
            continue
        model(x).pow(2).sum(1).sum().backward()
        dp.step()
        assert dp.last_per_example_norms.shape == (b,)
