"""Fused linear-head distillation against full logits + PyTorch eager (and Liger-Kernel's fused linear
JSD on CUDA when importable): forward + backward time, peak memory above the inputs with the gradients
it produces included (each call drops them at its end; CUDA allocator, or the CPU memory profiler),
gradient error against fp32-logit gradients, at 100%, 50% and 10% of tokens selected: chosen in advance (a mask),
and by a select rule on the same call's statistics (entropy top fraction: a first pass over both heads without
gradients, then the selected tokens; or, with select_reads="student", over the student's head alone).

    python benchmarks/bench_fused_linear.py                                   # CPU, small
    python benchmarks/bench_fused_linear.py --device cuda --n 8192 --vocab 128256 --hs 2048 --ht 4096
"""

from __future__ import annotations

import argparse

import torch

import dpkd
from dpkd import select
from timing import measure


def eager_jsd(h_s, w_s, h_t, w_t, mask):
    zs = (h_s @ w_s.t()).float()
    zt = (h_t @ w_t.t()).float()
    lq, lp = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    half = torch.log(torch.tensor(0.5, device=zs.device))
    lm = torch.logsumexp(torch.stack([lp + half, lq + half]), 0)
    per = 0.5 * (lp.exp() * (lp - lm)).sum(-1) + 0.5 * (lq.exp() * (lq - lm)).sum(-1)
    return (per * mask).sum() / mask.sum()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hs", type=int, default=256)
    ap.add_argument("--ht", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA, float32 on the CPU")
    args = ap.parse_args()
    dev = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev == "cuda" else "float32"))
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g, device=dev) * sc).to(dtype)  # noqa: E731
    h_s, w_s = r(args.n, args.hs).requires_grad_(True), r(args.vocab, args.hs, sc=args.hs**-0.5).requires_grad_(True)
    h_t, w_t = r(args.n, args.ht), r(args.vocab, args.ht, sc=args.ht**-0.5)

    def ours(mask, **kw):
        def run():
            dpkd.fused_linear_distill_loss(h_s, w_s, h_t, w_t, divergence="jsd", mask=mask, **kw).backward()
            h_s.grad = w_s.grad = None
        return run

    def eager(mask):
        def run():
            eager_jsd(h_s, w_s, h_t, w_t, mask.float()).backward()
            h_s.grad = w_s.grad = None
        return run

    def liger(mask):
        from liger_kernel.transformers import LigerFusedLinearJSD
        jsd = LigerFusedLinearJSD(jsd_beta=0.5)
        labels = torch.where(mask, 0, -100)  # Liger selects tokens through ignore_index on shift_labels

        def run():
            jsd(h_s, w_s, h_t, w_t, labels).backward()
            h_s.grad = w_s.grad = None
        return run

    def liger_chunked(mask):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5)
        labels = torch.where(mask, 0, -100)

        def run():
            jsd(h_s, w_s, h_t, w_t, labels).backward()
            h_s.grad = w_s.grad = None
        return run

    # Gradient accuracy against fp32 logits, over all N tokens (the weight gradient's sum over tokens averages
    # rounding out as N grows): the reference's mean loss is formed over chunks of 2048 rows, so that only one
    # chunk's fp32 logits exist at a time, its weight gradient summed in fp32.
    full = torch.ones(args.n, dtype=torch.bool, device=dev)
    ref_h = torch.empty(args.n, args.hs, dtype=torch.float32, device=dev)
    ref_w = torch.zeros(args.vocab, args.hs, dtype=torch.float32, device=dev)
    w_t32 = w_t.float()
    for a in range(0, args.n, 2048):
        hk = h_s.detach()[a:a + 2048].float().requires_grad_(True)
        wk = w_s.detach().float().requires_grad_(True)
        loss = eager_jsd(hk, wk, h_t[a:a + 2048].float(), w_t32, full[a:a + 2048].float())
        (loss * (hk.shape[0] / args.n)).backward()
        ref_h[a:a + 2048] = hk.grad
        ref_w += wk.grad
    del hk, wk, w_t32, loss
    errors = []
    for fp32_logits in (True, False):
        hk, wk = h_s.detach().clone().requires_grad_(True), w_s.detach().clone().requires_grad_(True)
        dpkd.fused_linear_distill_loss(hk, wk, h_t, w_t, divergence="jsd", fp32_logits=fp32_logits).backward()
        errors.append(" ".join(f"{float((a.float() - b).norm() / b.norm()):.1e}"
                               for a, b in zip((hk.grad, wk.grad), (ref_h, ref_w))))
    del hk, wk, ref_h, ref_w
    print(f"{dev} {dtype}: N={args.n} V={args.vocab} H_s={args.hs} H_t={args.ht}; generalized JSD(0.5); "
          f"gradient rel. error (hidden, weight) vs fp32 logits: dpkd {errors[0]}, dpkd bf16 logits {errors[1]}")
    for fraction in (1.0, 0.5, 0.1):
        mask = torch.rand(args.n, generator=g, device=dev) < fraction if fraction < 1 else full
        ms, mb = measure(ours(mask), dev, args.repeat, cpu_memory=True)
        ems, emb = measure(eager(mask), dev, args.repeat, cpu_memory=True)
        row = (f"{int(fraction * 100):>3}% tokens: dpkd {ms:8.1f} ms ({mb:7.0f} MB) | eager {ems:8.1f} ms "
               f"({emb:7.0f} MB) x{ems / ms:4.1f}")
        if fraction < 1:
            def rule(st, valid, fraction=fraction):
                return select.entropy_top_fraction(st.student_entropy, fraction, valid=valid)
            sms, smb = measure(ours(full, select=rule), dev, args.repeat, cpu_memory=True)
            row += f" | dpkd rule {sms:8.1f} ms ({smb:7.0f} MB)"
            sms, smb = measure(ours(full, select=rule, select_reads="student"), dev, args.repeat, cpu_memory=True)
            row += f" | rule, student pass {sms:8.1f} ms ({smb:7.0f} MB)"
        if dtype != torch.float32:
            bms, bmb = measure(ours(mask, fp32_logits=False), dev, args.repeat, cpu_memory=True)
            row += f" | dpkd bf16 logits {bms:8.1f} ms ({bmb:7.0f} MB)"
        if dev == "cuda":
            for name, peer in (("liger", liger), ("liger chunked", liger_chunked)):
                try:
                    lms, lmb = measure(peer(mask), dev, args.repeat)
                    row += f" | {name} {lms:8.1f} ms ({lmb:7.0f} MB) x{lms / ms:4.1f}"
                except Exception as e:  # not importable, or failing: our numbers still print
                    row += f" | {name} failed: {type(e).__name__}"
        print(row)


if __name__ == "__main__":
    main()
