"""One DP-SGD training step against a non-private step and Opacus (when importable), same model, data
and batch, measured in one run.

    python benchmarks/bench_dpsgd.py                      # CPU: small LM-shaped model
    python benchmarks/bench_dpsgd.py --device cuda --layers 8 --hidden 512 --batch 32 --seq 256

Model: token embedding -> n x [LayerNorm, MLP d -> 4d -> d with residual] -> LayerNorm -> head, a
per-example token-mean cross entropy. Prints median step time and (CUDA) peak memory, as ratios to
the non-private step.
"""

from __future__ import annotations

import argparse

import torch

from dpkd import privacy
from timing import measure


class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, 4 * d)
        self.down = torch.nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class LM(torch.nn.Module):
    def __init__(self, vocab, d, n_layers):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.Sequential(*[Block(d) for _ in range(n_layers)])
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.emb(ids))))


def per_example_loss(logits, labels):
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return ce.mean(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    dev = args.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(dev)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(dev)

    def fresh():
        torch.manual_seed(0)
        return LM(args.vocab, args.hidden, args.layers).to(dev).train()

    def non_private():
        model = fresh()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            per_example_loss(model(ids), labels).mean().backward()
            opt.step()
        return step

    def dpkd_step():
        model = fresh()
        model, opt = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1e-3), noise_multiplier=1.0,
                                          max_grad_norm=1.0, expected_batch_size=args.batch, sample_rate=0.01)

        def step():
            opt.zero_grad()
            per_example_loss(model(ids), labels).sum().backward()
            opt.step()
        return step

    rows = [("non-private", *measure(non_private(), dev, args.repeat)),
            ("dpkd", *measure(dpkd_step(), dev, args.repeat))]
    try:
        import opacus

        def opacus_step():
            model = fresh()
            gsm = opacus.GradSampleModule(model)
            opt = opacus.optimizers.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), noise_multiplier=1.0,
                                                max_grad_norm=1.0, expected_batch_size=args.batch)

            def step():
                opt.zero_grad()
                per_example_loss(gsm(ids), labels).mean().backward()
                opt.step()
            return step

        rows.append(("Opacus hooks", *measure(opacus_step(), dev, args.repeat)))
    except ImportError:
        pass
    base = rows[0][1]
    print(f"{dev}: {args.layers} layers, d={args.hidden}, V={args.vocab}, B={args.batch}, T={args.seq}")
    for name, ms, mb in rows:
        print(f"{name:<14} {ms:9.1f} ms  x{ms / base:5.2f}" + ("" if mb != mb else f"  peak {mb:8.0f} MB"))


if __name__ == "__main__":
    main()
