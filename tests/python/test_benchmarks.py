"""The benchmark scripts run, on the CPU at toy sizes, and print their tables: the DP-SGD one beside Opacus
(hooks and ghost clipping), as in the CI run the DP issue asks for. Numbers are not checked here; the
measured ones are in benchmarks/RESULTS.md."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_dpsgd_benchmark_against_opacus():
    out = run("bench_dpsgd.py", "--model", "mlp", "--layers", "2", "--hidden", "32", "--batch", "4", "--seq", "8",
              "--repeat", "1")
    for row in ("non-private", "dpkd", "Opacus hooks", "Opacus ghost"):  # opacus is a test dependency
        assert re.search(rf"^{row} +[\d.]+ ms", out, re.MULTILINE), out


@pytest.mark.parametrize("script,args,expect", [
    ("bench_distill.py", ["--sizes", "8", "--vocab", "500", "--repeat", "1", "--no-compile"], "jsd"),
    ("bench_fused_linear.py", ["--n", "64", "--vocab", "500", "--hs", "16", "--ht", "24", "--repeat", "1"],
     "10% tokens"),
    ("bench_accounting.py", ["--cases", "1"], "Opacus PRV"),
    ("bench_private_head.py", ["--batch", "2", "--seq", "8", "--vocab", "200", "--hs", "16", "--ht", "24", "--repeat",
                               "1", "--methods", "logits,fused_dp_select"], "fused, DP, 50%"),
    ("bench_ghost.py", ["--device", "cpu", "--batch", "2", "--seq", "16", "--hidden", "32", "--repeat", "1"],
     "llama gate,up"),
    ("bench_topk.py", ["--n", "8", "--vocab", "300", "--k", "4", "--repeat", "1", "--no-compile"], "jsd"),
])
def test_benchmark_prints_its_table(script, args, expect):
    assert expect in run(script, *args)
