"""SASS instructions per vocabulary entry in each pass of the cluster kernel (kernels/distill_cluster.cu), from
the machine code nvcc makes for sm_90a: a static count that needs no GPU, for comparing kernel versions where
none is lent. The kernels are compute-bound (benchmarks/RESULTS.md), so fewer instructions per entry is the
direction, not a timing.

    python scripts/sass_counts.py [--kernels DIR] [--only bf16]

Compiles a copy of the kernels with TAID's teacher mixing taken out (the compiler keeps a version of every loop
per mixing case, selected per row: without it each loop is the path rows without TAID run), disassembles it with
cuobjdump and nvdisasm (PyPI's nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm, installed into .deps/ when not
on PATH), and prints, per kernel, the
instructions per entry of each loop: pass 1 (log-sum-exps), pass 2 (divergence and <q, g>; none for the KLs)
and the gradient pass, where a pass has two versions (with and without the raw student's log-sum-exp or the
hard-label term) the one without first. Limits of a static count: a loop the compiler unrolled has no count
("-"), and a loop holding two versions behind a branch (per row, or per entry) counts both.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
MIX = "return mix == 1.f ? zt : (mix == 0.f ? zs : mix * zt + (1.f - mix) * zs);"
DTYPES = {"f": ("fp32", 4), "13__nv_bfloat16": ("bf16", 8), "6__half": ("fp16", 8)}
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]
FORMS = ["per-call", "jsd-log", "generic"]


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found and shutil.which("nvdisasm"):
        return found
    target = ROOT / ".deps" / "cuobjdump"
    tool = next(target.glob("nvidia/*/bin/cuobjdump"), None)
    if tool is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target),
                        "nvidia-cuda-cuobjdump", "nvidia-cuda-nvdisasm"], check=True)
        tool = next(target.glob("nvidia/*/bin/cuobjdump"))
    for binary in tool.parent.iterdir():  # cuobjdump -sass runs the nvdisasm beside it
        binary.chmod(0o755)
    return str(tool)


def loops(tool: str, cubin: pathlib.Path, name: str) -> dict[str, list[int]]:
    """Instruction counts of the kernel's loops over the shared-memory cache, by pass."""
    sass = subprocess.run([tool, "-sass", "-fun", name, str(cubin)], capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]+)\*/\s+(.*?);", sass)]
    first_cluster_sync = next(a for a, t in ins if "UCGABAR_ARV" in t)
    passes: dict[str, list[int]] = {"pass 1": [], "pass 2": [], "gradient": []}
    for a, t in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", t)
        if not m or int(m.group(1), 16) >= a:
            continue
        start = int(m.group(1), 16)
        body = [tt for x, tt in ins if start <= x <= a]
        if sum("LDS" in tt for tt in body) == 0:
            continue  # not a loop over the cached row (zero-filling, reductions)
        kind = ("gradient" if any("STG" in tt for tt in body)
                else "pass 1" if a < first_cluster_sync else "pass 2")
        passes[kind].append(len(body))
    return passes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default=str(ROOT / "kernels"), help="the kernels/ folder to count")
    ap.add_argument("--only", default="", help="a dtype (fp32, bf16, fp16, fp32>bf16: fp32 logits, bf16 gradient) or "
                    "objective to keep")
    args = ap.parse_args()
    tool = cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp) / "kernels"
        shutil.copytree(args.kernels, work)
        device = work / "distill_device.cuh"
        text = device.read_text()
        if MIX not in text:
            sys.exit("sass_counts: mix_teacher's body changed; update MIX")
        device.write_text(text.replace(MIX, "return zt;"))
        cubin = pathlib.Path(tmp) / "cluster.cubin"
        subprocess.run(["nvcc", "-std=c++17", "-O3", "-arch=sm_90a", f"-I{ROOT / 'csrc' / 'core'}", f"-I{work}",
                        "-cubin", str(work / "distill_cluster.cu"), "-o", str(cubin)], check=True)
        usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
        print(f"{'dtype':<9} {'objective':<16} {'math':<8} {'form':<8} {'regs':>4}  instructions per entry: "
              "pass 1 | pass 2 | gradient")
        for name, regs in re.findall(r"Function (\S*cluster_kernel\S*):\n\s+REG:(\d+)", usage):
            m = re.search(r"cluster_kernelI(f|13__nv_bfloat16|6__half)(f|13__nv_bfloat16|6__half|S\d*_)?"
                          r"LNS0_10DivergenceE(\d)E.*?(ScalarMath|FastMath)E(?:LNS\d_4FormE(\d)E)?", name)
            dtype, per_pack = DTYPES[m.group(1)]
            grad = DTYPES[m.group(2)][0] if m.group(2) in DTYPES else dtype  # S_: the logits' type again
            label = (dtype if grad == dtype else f"{dtype}>{grad}", DIVERGENCES[int(m.group(3))],
                     "fast" if m.group(4) == "FastMath" else "accurate", FORMS[int(m.group(5))] if m.group(5) else "-")
            if args.only and args.only not in label:
                continue
            counts = loops(tool, cubin, name)
            cells = [" / ".join(f"{n / per_pack:.1f}" for n in sorted(counts[k])) or "-" for k in counts]
            print(f"{label[0]:<9} {label[1]:<16} {label[2]:<8} {label[3]:<8} {regs:>4}  " + " | ".join(cells))


if __name__ == "__main__":
    main()
