"""Per-kernel times of the fused objectives on CUDA (forward alone, forward with the gradient, the separate
backward), to see where fwd+bwd time goes; `--once` runs each op once (for ncu).

    python benchmarks/profile_distill.py [--n 4096] [--vocab 128256] [--divergence jsd]
"""

from __future__ import annotations

import argparse

import torch

import dpkd  # noqa: F401  (registers torch.ops.dpkd)


def cuda_ms(fn, repeat: int) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--divergence", default="jsd")
    ap.add_argument("--once", action="store_true")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    s = (torch.randn(args.n, args.vocab, generator=g, device="cuda") * 4).bfloat16()
    t = (torch.randn(args.n, args.vocab, generator=g, device="cuda") * 4).bfloat16()
    opts = (args.divergence, 0.5, 0.1, 1.0, 1.0, False, 0.0, -100)
    w = torch.full((args.n,), 1.0 / args.n, device="cuda")
    _, _, state = torch.ops.dpkd.distill_forward(s, t, None, *opts)
    ops = {
        "forward": lambda: torch.ops.dpkd.distill_forward(s, t, None, *opts),
        "forward + gradient": lambda: torch.ops.dpkd.distill_forward_grad(s, t, None, w, *opts),
        "backward": lambda: torch.ops.dpkd.distill_backward(w, s, t, None, state, *opts),
        "copy s -> new (bandwidth)": lambda: s.clone(),
    }
    gb = s.numel() * s.element_size() / 1e9
    for name, fn in ops.items():
        if args.once:
            fn()
            continue
        ms = cuda_ms(fn, 10)
        print(f"{args.divergence} N={args.n} V={args.vocab} bf16 {name:<26} {ms:7.3f} ms "
              f"({gb / ms:5.2f} TB/s per [N, V] bf16 tensor moved)")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
