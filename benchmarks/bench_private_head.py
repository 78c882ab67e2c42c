"""A training step of a student whose large output head meets a distillation loss, private and not: the
logits path (lm_head's forward + dpkd.distill_loss; under DP the engine keeps the [N, V] output gradient)
against the fused linear head (dpkd.fused_linear_distill_loss; under DP the head's per-example norms come
from its chunk loop and the step recomputes the chunks); and both under DP on TIP's informative half of the tokens
(the entropy rule per sequence; the fused head's first pass over the student's head alone). Median step time and peak memory of the whole step
(parameters, optimizer state and what each method keeps included), with ratios to the non-private logits path.
Each method runs in a process of its own, so that none inherits another's allocations.

    python benchmarks/bench_private_head.py                                         # CPU, small
    python benchmarks/bench_private_head.py --device cuda --batch 32 --seq 256 --vocab 128256 --hs 2048 --ht 4096
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys

import torch

import dpkd
from dpkd import privacy, select
from dpkd.demo.model import TinyCausalLM
from timing import measure


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hs", type=int, default=256)
    ap.add_argument("--ht", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--methods", default="logits,fused,logits_dp,fused_dp,logits_dp_select,fused_dp_select",
                    help="a subset, comma-separated")
    args = ap.parse_args()
    keys = args.methods.split(",")
    if len(keys) > 1:
        rows = []
        argv, given = [], iter(sys.argv[1:])
        for a in given:  # every argument but --methods (given as "--methods=..." or "--methods ...")
            if a == "--methods":
                next(given, None)
            elif not a.startswith("--methods="):
                argv.append(a)
        for key in keys:  # each row printed as it comes: a run cut short (gpu.sh's time bounds) keeps the rest
            out = subprocess.run([sys.executable, __file__, *argv, f"--methods={key}"], capture_output=True,
                                 text=True, check=True).stdout
            rows.append(out.strip().splitlines()[-1].split("\t"))
            if len(rows) == 1:
                print(rows[0][0])
                print(f"{'method':<16}{'ms':>10}{'x time':>8}{'peak MB':>10}{'x mem':>8}")
                ref_ms, ref_mb = float(rows[0][2]), float(rows[0][3])
            _, name, ms, mb = rows[-1]
            ms, mb = float(ms), float(mb)
            print(f"{name:<16}{ms:>10.1f}{ms / ref_ms:>8.2f}{mb:>10.0f}{mb / ref_mb:>8.2f}", flush=True)
        return
    dev = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev == "cuda" else "float32"))
    torch.manual_seed(0)
    # One transformer block under the [V, H] head: the head's work dominates, as in a small student of a big vocabulary.
    base = TinyCausalLM(args.vocab, d=args.hs, layers=1, heads=4, max_len=args.seq).to(dev, dtype)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    valid = torch.ones(args.batch, args.seq, dtype=torch.bool, device=dev)
    valid[:, : args.seq // 4] = False  # the prompt part carries no loss
    w = valid.float() / valid.sum(-1, keepdim=True)  # each example's token mean
    h_t = torch.randn(args.batch, args.seq, args.ht, device=dev).to(dtype)
    w_t = (torch.randn(args.vocab, args.ht, device=dev) * args.ht**-0.5).to(dtype)

    def entropy_half(st, v):
        return select.entropy_top_fraction(st.student_entropy, 0.5, valid=v)

    def logits_loss(m, rule=None):
        with torch.no_grad():
            z_t = h_t @ w_t.t()  # the teacher's logits, as the fused head forms them in its chunks
        per_token = dpkd.distill_loss(m.head(m.hidden(ids)), z_t, divergence="jsd", reduction="none", mask=valid,
                                      select=rule, check_finite=False)
        return (per_token * w).sum()

    def fused_loss(m, rule=None):
        return dpkd.fused_linear_distill_loss(m.hidden(ids), m.head.weight, h_t, w_t, divergence="jsd", weights=w,
                                              reduction="sum", select=rule, select_reads="student", check_finite=False)

    def method(loss_fn, private):
        m = copy.deepcopy(base)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        if private:
            m, opt = privacy.make_private(m, opt, noise_multiplier=1.0, max_grad_norm=1.0,
                                          expected_batch_size=args.batch, sample_rate=0.01)

        def step():
            opt.zero_grad()
            loss_fn(m).backward()
            opt.step()
        return step

    methods = {"logits": ("logits", logits_loss, False), "fused": ("fused head", fused_loss, False),
               "logits_dp": ("logits, DP", logits_loss, True), "fused_dp": ("fused head, DP", fused_loss, True),
               "logits_dp_select": ("logits, DP, 50%", lambda m: logits_loss(m, entropy_half), True),
               "fused_dp_select": ("fused, DP, 50%", lambda m: fused_loss(m, entropy_half), True)}
    name, loss_fn, private = methods[keys[0]]
    ms, mb = measure(method(loss_fn, private), dev, args.repeat, absolute=True, cpu_memory=dev == "cpu")
    title = (f"device {dev}, {dtype}, B {args.batch}, T {args.seq}, V {args.vocab}, H_s {args.hs}, H_t {args.ht}: "
             "one SGD step through the JSD loss, each example's token mean")
    print(f"{title}\t{name}\t{ms}\t{mb}")


if __name__ == "__main__":
    main()
