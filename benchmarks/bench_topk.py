"""Distillation from a top-k teacher (ids + log-probs, with the tail bucket): dpkd.topk_distill_loss against the
same loss written in plain PyTorch, eager and under torch.compile, forward + backward, measured in one run.

    python benchmarks/bench_topk.py                  # CPU: N=512, V=32000, K=20, fp32
    python benchmarks/bench_topk.py --device cuda    # CUDA: bf16, N=4096, V=128256, K=20

Prints time (median of --repeat runs after a warm-up), peak extra memory (CUDA allocator; on the CPU the memory
profiler's peak of live tensors) and ratios peer / dpkd.
"""

from __future__ import annotations

import argparse
import math

import torch

import dpkd
from timing import measure


def eager_topk(s: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, beta: float | None) -> torch.Tensor:
    """The textbook form over the k ids and the rest: forward KL (beta None) or the generalized JSD(beta)."""
    lq = torch.log_softmax(s.float(), -1)
    lq_k = lq.gather(1, ids)
    lq = torch.cat([lq_k, torch.log1p(-lq_k.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))], 1)
    lp = torch.cat([logp, torch.log1p(-logp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))], 1)
    p, q = lp.exp(), lq.exp()
    if beta is None:
        return (p * (lp - lq)).sum(-1).mean()
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta))
    return (beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)).mean()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n, vocab = args.n or (4096 if cuda else 512), args.vocab or (128256 if cuda else 32000)
    g = torch.Generator(device=args.device).manual_seed(0)
    s = (torch.randn(n, vocab, generator=g, device=args.device) * 4).to(dtype).requires_grad_(True)
    logp, ids = torch.log_softmax(torch.randn(n, vocab, generator=g, device=args.device) * 4, -1).topk(args.k, -1)
    print(f"device {args.device}, dtype {dtype}, N={n}, V={vocab}, K={args.k}, tail; fwd+bwd ms (peak extra MB); "
          "ratio = peer / dpkd")
    for name, beta in (("forward_kl", None), ("jsd", 0.5)):
        kw = {} if beta is None else dict(beta=beta)
        methods = {"dpkd": lambda: dpkd.topk_distill_loss(s, ids, logp, divergence=name, tail=True, **kw),
                   "eager": lambda: eager_topk(s, ids, logp, beta)}
        if not args.no_compile:
            compiled = torch.compile(eager_topk)
            methods["torch.compile"] = lambda: compiled(s, ids, logp, beta)
        row, ours = f"{name:<11}", None
        for method, fn in methods.items():
            def once():
                s.grad = None
                fn().backward()
            for _ in range(3):  # the CPU allocator settles over a few calls (the first method measured paid ~1.5x)
                once()
            ms, mb = measure(once, args.device, args.repeat, cpu_memory=not cuda)
            ours = ours or ms
            row += f" | {method} {ms:8.2f} ms ({mb:6.0f} MB)" + (f" x{ms / ours:4.1f}" if method != "dpkd" else "")
        print(row, flush=True)


if __name__ == "__main__":
    main()
