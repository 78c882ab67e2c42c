"""Per-example gradient norms of linear layers, one layer group at a time: the ghost norm
(``dpkd::ghost_sq_norms``) at several token-block sizes against instantiating per-example gradients, with
the layer group's ordinary weight-gradient matmul (what the non-private step spends on it) as the yardstick.
What ``dpkd.privacy.layers.ghost_block`` is chosen from.

    python benchmarks/bench_ghost.py                       # the DP benchmark's GPU shapes on this device
    python benchmarks/bench_ghost.py --batch 16 --seq 128 --hidden 256   # the CPU benchmark's Llama shapes

Groups are the layers that read one input (q/k/v; gate/up), as the DP engine forms them, for a Llama-style
block (intermediate size 8/3 d rounded down to 64) and a GPT-2 block (fused qkv, 4 d MLP).
"""

from __future__ import annotations

import argparse

import torch

from timing import measure


def groups(d: int) -> dict[str, tuple[int, list[int]]]:
    inter = int(8 * d / 3) // 64 * 64
    return {
        "llama q,k,v": (d, [d, d, d]), "llama o": (d, [d]), "llama gate,up": (d, [inter, inter]),
        "llama down": (inter, [d]), "gpt2 qkv": (d, [3 * d]), "gpt2 fc": (d, [4 * d]), "gpt2 proj": (4 * d, [d]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    dev, b, t = args.device, args.batch, args.seq
    blocks = [k for k in (64, 128, 256, 512) if k <= t] or [t]
    g = torch.Generator(device=dev).manual_seed(0)
    print(f"{dev}: B={b}, T={t}, d={args.hidden}; ms per layer group (median of {args.repeat})")
    print(f"{'group':<15} {'weight grad':>11} " + " ".join(f"{'ghost/' + str(k):>10}" for k in blocks)
          + f" {'per-example':>11}")
    for name, (d, ps) in groups(args.hidden).items():
        a = torch.randn(b, t, d, generator=g, device=dev)
        gs = [torch.randn(b, t, p, generator=g, device=dev) for p in ps]
        flat_a = a.reshape(-1, d)
        weight_grad = measure(lambda: [x.reshape(-1, x.shape[-1]).t() @ flat_a for x in gs], dev, args.repeat)[0]
        per_example = measure(lambda: sum(torch.bmm(x.transpose(1, 2), a).pow(2).sum((1, 2)) for x in gs), dev,
                              args.repeat)[0]
        ghost = [measure(lambda: torch.ops.dpkd.ghost_sq_norms(a, gs, k), dev, args.repeat)[0] for k in blocks]
        print(f"{name:<15} {weight_grad:11.3f} " + " ".join(f"{x:10.3f}" for x in ghost) + f" {per_example:11.3f}")


if __name__ == "__main__":
    import dpkd  # noqa: F401  (registers torch.ops.dpkd.*)

    main()
