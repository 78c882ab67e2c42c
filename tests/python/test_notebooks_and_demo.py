"""The notebooks execute (so they cannot rot) and the demo's command line runs end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()


def test_demo_runs_and_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "dpkd", "demo", "--steps", "3", "--quiet", "--candidates", "50"],
                         capture_output=True, text=True, check=True, timeout=600)
    for method in ("dp_opd", "dp_sft", "dp_offpolicy_kd", "kd", "sft", "TIP 50%"):
        assert method in out.stdout
    assert "delta 1/N^2" in out.stdout and "canary exposure" in out.stdout
