"""``python -m dpkd demo``: DP-OPD against its baselines on a synthetic corpus, end to end on the CPU.

A teacher (larger) and a student (smaller) are pre-trained on the public split. The student is then
adapted on the private split by DP-OPD, DP fine-tuning on the ground truth (DP-SFT) and off-policy DP
distillation at the same epsilon, and by non-private on-policy distillation and non-private fine-tuning
for reference. The teacher never sees the private split, so what the students can memorise of it comes
from their own training on it. Reported: epsilon, delta, held-out perplexity, steps, wall time, and the exposure of
secret canaries planted in the private split (rank of the canary among random candidates under the
student: log2(candidates) - log2(rank); ~0 means not memorised).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time

import torch

from .. import opd, select
from .corpus import CONTINUATION_LEN, DIGITS, Corpus, make_corpus
from .model import TinyCausalLM

SIZES = {  # teacher (d, layers), student (d, layers), pre-training steps (teacher, student), private steps
    "small": ((96, 3), (48, 2), (500, 40), 200),
    "medium": ((192, 4), (96, 3), (1500, 100), 500),
}


def continuation_nll(model: torch.nn.Module, prompts: torch.Tensor, conts: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed negative log-likelihood of the continuation given the prompt."""
    seq = torch.cat([prompts, conts], 1)
    logits = model(seq[:, :-1]).float()
    lp = torch.log_softmax(logits[:, prompts.shape[1] - 1:], -1)
    return -lp.gather(-1, conts[..., None])[..., 0].sum(1)


@torch.no_grad()
def perplexity(model: torch.nn.Module, prompts: torch.Tensor, conts: torch.Tensor) -> float:
    model.eval()
    nll = torch.cat([continuation_nll(model, p, c) for p, c in zip(prompts.split(256), conts.split(256))])
    model.train()
    return math.exp(float(nll.sum()) / conts.numel())


@torch.no_grad()
def exposure(model: torch.nn.Module, corpus: Corpus, canary: list[str], candidates: int, seed: int) -> float:
    rng = random.Random(seed)
    others = set()
    while len(others) < candidates - 1:
        c = tuple(rng.choice(DIGITS) for _ in range(4))
        if list(c) != canary:
            others.add(c)
    strings = [canary] + [list(c) for c in sorted(others)]
    pad = CONTINUATION_LEN - 5
    conts = torch.tensor([corpus.encode(s + ["."] + ["<eos>"] * pad) for s in strings])
    prompts = torch.tensor([corpus.encode(corpus.canary_prompt)]).expand(len(strings), -1)
    model.eval()
    nll = torch.cat([continuation_nll(model, p, c) for p, c in zip(prompts.split(500), conts.split(500))])
    model.train()
    rank = int((nll < nll[0]).sum()) + 1
    return math.log2(len(strings)) - math.log2(rank)


def pretrain(model: torch.nn.Module, prompts: torch.Tensor, conts: torch.Tensor, steps: int, seed: int,
             batch: int = 64, lr: float = 3e-3) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        rows = torch.randint(0, prompts.shape[0], (batch,), generator=g)
        opt.zero_grad()
        continuation_nll(model, prompts[rows], conts[rows]).mean().backward()
        opt.step()
    return model


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    (td, tl), (sd, sl), (t_steps, s_steps), private_steps = SIZES[args.size]
    steps = args.steps or private_steps
    corpus = make_corpus(seed=args.seed)
    vocab = len(corpus.vocab)
    pub_p, pub_c = corpus.splits["public"]
    priv_p, priv_c = corpus.splits["private"]
    test_p, test_c = corpus.splits["test"]
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    teacher = pretrain(TinyCausalLM(vocab, td, tl).to(dev), pub_p.to(dev), pub_c.to(dev), t_steps, args.seed)
    student0 = pretrain(TinyCausalLM(vocab, sd, sl).to(dev), pub_p.to(dev), pub_c.to(dev), s_steps, args.seed + 1)
    print(f"pre-trained on the public split ({pub_p.shape[0]} sentences) in {time.perf_counter() - t0:.0f} s: "
          f"teacher d={td} x{tl} ppl {perplexity(teacher, test_p.to(dev), test_c.to(dev)):.3f}, "
          f"student d={sd} x{sl} ppl {perplexity(student0, test_p.to(dev), test_c.to(dev)):.3f}")
    n = priv_p.shape[0]
    delta = 1.0 / n**2
    print(f"private split: {n} sentences incl. {len(corpus.canaries)} canaries x8; epsilon {args.epsilon}, "
          f"delta 1/N^2 = {delta:.2e}, {steps} steps, expected batch {args.batch}")
    rows = [dict(method="public only", epsilon=0.0, delta=0.0, steps=0, wall=0.0, student=student0, sigma=0.0,
                 norm=float("nan"))]
    def tip50(stats, valid):
        return select.entropy_top_fraction(stats.student_entropy, 0.5, valid=valid)

    plans = [("dp_opd", args.epsilon, None), ("dp_opd + TIP 50%", args.epsilon, tip50),
             ("dp_sft", args.epsilon, None), ("dp_offpolicy_kd", args.epsilon, None), ("kd", math.inf, None),
             ("sft", math.inf, None)]
    for label, eps, rule in plans:
        method = label.split(" ")[0]
        student = copy.deepcopy(student0)
        cfg = opd.OPDConfig(method=method, steps=steps, expected_batch_size=args.batch, lr=args.lr,
                            max_grad_norm=args.max_grad_norm,
                            max_new_tokens=CONTINUATION_LEN, num_samples=args.samples, target_epsilon=eps
                            if math.isfinite(eps) else None, delta=delta, divergence="jsd", seed=args.seed)
        trainer = opd.OPDTrainer(student, teacher, priv_p.to(dev), priv_c.to(dev), cfg, select=rule)
        start = time.perf_counter()
        history = trainer.train(progress=not args.quiet)
        if cfg.private:
            trainer.optimizer.engine.remove()
        norms = [h["norm_p50"] for h in history if h["norm_p50"] == h["norm_p50"]]
        rows.append(dict(method=label, epsilon=trainer.epsilon, delta=delta if cfg.private else 0.0, steps=steps,
                         wall=time.perf_counter() - start, student=student, sigma=trainer.noise_multiplier,
                         norm=sum(norms) / len(norms) if norms else float("nan")))
    for r in rows:
        r["ppl"] = perplexity(r["student"], test_p.to(dev), test_c.to(dev))
        r["exposure"] = sum(exposure(r["student"], corpus, c, args.candidates, args.seed) for c in corpus.canaries) \
            / len(corpus.canaries)
    print()
    print(f"{'method':<16} {'epsilon':>8} {'delta':>9} {'sigma':>6} {'test ppl':>9} {'canary exposure':>16} "
          f"{'median norm':>12} {'steps':>6} {'wall s':>7}")
    for r in rows:
        eps = "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.2f}"
        print(f"{r['method']:<16} {eps:>8} {r['delta']:>9.1e} {r['sigma']:>6.2f} {r['ppl']:>9.3f} "
              f"{r['exposure']:>16.2f} {r['norm']:>12.3f} {r['steps']:>6} {r['wall']:>7.1f}")
    print(f"(exposure: log2({args.candidates}) = {math.log2(args.candidates):.1f} would be a fully memorised canary)")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="model and step sizes")
    p.add_argument("--epsilon", type=float, default=2.0, help="privacy budget of the DP methods")
    p.add_argument("--steps", type=int, default=None, help="private training steps (default by --size)")
    p.add_argument("--batch", type=int, default=64, help="expected (Poisson) batch size")
    p.add_argument("--samples", type=int, default=1, help="continuations sampled per prompt")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-grad-norm", type=float, default=0.1,
                   help="per-example clipping norm C (distillation gradients have median norm ~0.16 here: "
                        "a C above that adds noise without clipping anything; with AdamW the fine-tuning "
                        "baseline, whose norms are ~1.6, does not depend on C)")
    p.add_argument("--candidates", type=int, default=1000, help="random candidates per canary for exposure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
