"""Fused distillation objectives: dpkd against PyTorch eager, torch.compile and Liger-Kernel (when
importable), forward + backward, measured in one run.

    python benchmarks/bench_distill.py                       # CPU: N=512, V=32000, fp32
    python benchmarks/bench_distill.py --device cuda         # CUDA: bf16, N=4096 and 16384, V=128256

Prints time (median of --repeat runs after warm-up) and peak extra memory, and ratios peer / dpkd.
Memory on CUDA is the allocator's peak above the inputs; on the CPU it is the process's peak resident
memory above its resident memory with the inputs allocated, each method measured in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

import dpkd
from timing import measure


def eager_jsd(s: torch.Tensor, t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """The textbook PyTorch implementation (TRL's formula): several [N, V] fp32 temporaries."""
    lq = torch.log_softmax(s.float(), -1)
    lp = torch.log_softmax(t.float(), -1)
    lm = torch.logsumexp(torch.stack([lp + torch.log(torch.tensor(beta)), lq + torch.log(torch.tensor(1 - beta))]), 0)
    kl_p = (lp.exp() * (lp - lm)).sum(-1)
    kl_q = (lq.exp() * (lq - lm)).sum(-1)
    return (beta * kl_p + (1 - beta) * kl_q).mean()


def eager_forward_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.kl_div(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1),
                                      reduction="none", log_target=True).sum(-1).mean()


def liger_fns():
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError:
        return {}
    jsd = LigerJSD(beta=0.5)
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    return {
        "jsd": lambda s, t: jsd(torch.log_softmax(s, -1), torch.log_softmax(t, -1)),
        "forward_kl": lambda s, t: kl(torch.log_softmax(s, -1), torch.log_softmax(t, -1)),
    }


def fwd_bwd(fn, s: torch.Tensor, t: torch.Tensor, repeat: int) -> tuple[float, float]:
    """(median ms of forward + backward, peak extra MB on CUDA or nan)."""
    def once():
        s.grad = None
        fn(s, t).backward()
    return measure(once, "cuda" if s.is_cuda else "cpu", repeat)


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_peak_mb(method: str, name: str, n: int, vocab: int) -> float:
    """Peak extra resident memory of one method's fwd+bwd, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--measure-rss", method, name, str(n), str(vocab)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _measure_rss(method: str, name: str, n: int, vocab: int) -> None:
    fns = {"dpkd": {"jsd": lambda s, t: dpkd.generalized_jsd(s, t, beta=0.5), "forward_kl": dpkd.forward_kl},
           "eager": {"jsd": eager_jsd, "forward_kl": eager_forward_kl}}
    if method == "torch.compile":
        fn = torch.compile(fns["eager"][name])
        warm_s = torch.randn(8, vocab, requires_grad=True)
        fn(warm_s, torch.randn(8, vocab)).backward()  # compile outside the measured window
    else:
        fn = fns[method][name]
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, vocab, generator=g) * 4).requires_grad_(True)
    t = torch.randn(n, vocab, generator=g) * 4
    s.grad = torch.zeros_like(s)  # the gradient buffer belongs to the inputs
    s.grad = None
    base = _rss_mb("VmRSS")
    fn(s, t).backward()
    print(json.dumps({"peak_mb": _rss_mb("VmHWM") - base}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure-rss":
        _measure_rss(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sizes", default=None, help="comma-separated N values")
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else ([4096, 16384] if cuda else [512])
    vocab = args.vocab or (128256 if cuda else 32000)
    ours = {
        "jsd": lambda s, t: dpkd.generalized_jsd(s, t, beta=0.5),
        "forward_kl": lambda s, t: dpkd.forward_kl(s, t),
    }
    # The same with the gradient left to the separate backward kernel (as with reduction="none" or select).
    unfused = {
        "jsd": lambda s, t: dpkd.generalized_jsd(s, t, beta=0.5, fuse_backward=False),
        "forward_kl": lambda s, t: dpkd.forward_kl(s, t, fuse_backward=False),
    }
    eager = {"jsd": eager_jsd, "forward_kl": eager_forward_kl}
    peers: dict[str, dict] = {"eager": eager}
    if not args.no_compile:
        peers["torch.compile"] = {k: torch.compile(f) for k, f in eager.items()}
    liger = liger_fns() if cuda else {}
    if liger:
        peers["liger"] = liger
    print(f"device {args.device}, dtype {dtype}, V={vocab}, fwd+bwd ms (peak extra MB); ratio = peer / dpkd")
    for n in sizes:
        g = torch.Generator(device=args.device).manual_seed(0)
        s = (torch.randn(n, vocab, generator=g, device=args.device) * 4).to(dtype).requires_grad_(True)
        t = (torch.randn(n, vocab, generator=g, device=args.device) * 4).to(dtype)
        for name, fn in ours.items():
            ms, mb = fwd_bwd(fn, s, t, args.repeat)
            if not cuda:
                mb = cpu_peak_mb("dpkd", name, n, vocab)
            ums, _ = fwd_bwd(unfused[name], s, t, args.repeat)
            row = f"N={n:<6} {name:<11} dpkd {ms:8.2f} ms ({mb:7.0f} MB) [separate bwd {ums:8.2f} ms]"
            for peer, fns in peers.items():
                if name in fns:
                    try:
                        pms, pmb = fwd_bwd(fns[name], s, t, args.repeat)
                        if not cuda and peer in ("eager", "torch.compile"):
                            pmb = cpu_peak_mb(peer, name, n, vocab)
                        row += f" | {peer} {pms:8.2f} ms ({pmb:7.0f} MB) x{pms / ms:5.1f}"
                    except Exception as e:  # a peer failing (OOM, missing kernel) must not hide our numbers
                        row += f" | {peer} failed: {type(e).__name__}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
