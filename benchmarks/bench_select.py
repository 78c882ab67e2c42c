"""What token selection costs and saves: forward + backward of the fused loss with 100%, 50% and 10% of
tokens selected (entropy top-fraction per sequence, from the same pass's statistics; or chosen before the
pass and given as a mask), with peak memory above the inputs (the logits' gradient included), the price
of the statistics themselves, and of the selection rule.

    python benchmarks/bench_select.py [--device cuda]
"""

from __future__ import annotations

import argparse

import torch

import dpkd
from dpkd import select
from timing import measure


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    b, t, v = (8, 512, 128256) if cuda else (4, 128, 32000)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=args.device).manual_seed(0)
    s = (torch.randn(b, t, v, generator=g, device=args.device) * 4).to(dtype).requires_grad_(True)
    te = (torch.randn(b, t, v, generator=g, device=args.device) * 4).to(dtype)

    def fwd_bwd(rule=None, mask=None):
        def run():
            dpkd.generalized_jsd(s, te, select=rule, mask=mask).backward()
            s.grad = None
        return run

    with torch.no_grad():
        plain = measure(lambda: dpkd.generalized_jsd(s, te), args.device, args.repeat)[0]
        with_stats = measure(lambda: dpkd.generalized_jsd(s, te, return_stats=True), args.device, args.repeat)[0]
    print(f"[{b}x{t}, V={v}, {dtype}, {args.device}] forward: loss {plain:.1f} ms, loss + statistics "
          f"{with_stats:.1f} ms (+{100 * (with_stats / plain - 1):.1f}%: the statistics come from the same pass)")
    full, full_mb = measure(fwd_bwd(), args.device, args.repeat, cpu_memory=True)
    print(f"fwd+bwd, all tokens: {full:.1f} ms, peak {full_mb:.0f} MB above the inputs")
    for fraction in (0.5, 0.1):
        def rule(st, valid, fraction=fraction):
            return select.entropy_top_fraction(st.student_entropy, fraction, valid=valid)
        ms, mb = measure(fwd_bwd(rule), args.device, args.repeat, cpu_memory=True)
        print(f"fwd+bwd, {int(fraction * 100)}% of tokens (entropy, per sequence): {ms:.1f} ms ({ms / full:.2f}x), "
              f"peak {mb:.0f} MB")
        # Chosen before the pass (e.g. from an earlier pass's statistics): the fused loss skips the rest.
        known = torch.rand(b, t, generator=g, device=args.device) < fraction
        ms, mb = measure(fwd_bwd(mask=known), args.device, args.repeat, cpu_memory=True)
        print(f"fwd+bwd, {int(fraction * 100)}% of tokens chosen in advance (mask): {ms:.1f} ms ({ms / full:.2f}x), "
              f"peak {mb:.0f} MB")
    # The rule itself: dpkd's per-sequence selection op against the PyTorch stable sort it replaces.
    for rows, tokens in ((8, 512), (32, 4096), (64, 8192)):
        score = torch.randn(rows, tokens, generator=g, device=args.device)
        valid = torch.rand(rows, tokens, generator=g, device=args.device) > 0.1
        op = measure(lambda: select.top_fraction(score, 0.5, valid=valid), args.device, 20)[0]
        by_sort = measure(lambda: select._top_fraction_by_sorting(score, valid, 0.5, True), args.device, 20)[0]
        print(f"top-fraction rule on [{rows}x{tokens}]: {op:.3f} ms (stable sort in PyTorch {by_sort:.3f} ms, "
              f"{by_sort / op:.1f}x)")


if __name__ == "__main__":
    main()
