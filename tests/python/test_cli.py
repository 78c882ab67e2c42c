"""The privacy-budget report (python -m dpkd budget)."""

import subprocess
import sys

import pytest

from dpkd import accounting
from dpkd.__main__ import main


def test_budget_reports_rdp_and_approximate_gdp(capsys):
    assert main(["budget", "--noise-multiplier", "1.1", "--sample-rate", "0.004267", "--steps", "14063",
                 "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    eps = accounting.epsilon(noise_multiplier=1.1, sample_rate=0.004267, steps=14063, delta=1e-5)
    assert f"{eps:.4f}" in out and "best order" in out
    assert "APPROXIMATE" in out


def test_budget_calibrates_for_a_target(capsys):
    assert main(["budget", "--target-epsilon", "2", "--sample-rate", "0.004267", "--steps", "14063",
                 "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    sigma = accounting.calibrate_noise(target_epsilon=2, delta=1e-5, sample_rate=0.004267, steps=14063)
    assert f"{sigma:.6f}" in out


def test_budget_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "eps.png"
    assert main(["budget", "--noise-multiplier", "1.0", "--sample-rate", "0.01", "--steps", "500",
                 "--delta", "1e-5", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_bad_input_is_a_clear_error(capsys):
    assert main(["budget", "--noise-multiplier", "1.0", "--sample-rate", "2", "--steps", "5", "--delta", "1e-5"]) == 2
    assert "sample_rate" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "dpkd", "budget", "--noise-multiplier", "1.1", "--sample-rate",
                          "0.01", "--steps", "100", "--delta", "1e-5"], capture_output=True, text=True, check=True)
    assert "epsilon (RDP" in out.stdout


def test_budget_takes_sigma_or_a_target_not_both_and_steps_from_one():
    from dpkd.__main__ import main
    assert main(["budget", "--noise-multiplier", "1.0", "--target-epsilon", "3", "--sample-rate", "0.01",
                 "--steps", "10", "--delta", "1e-5"]) == 2
    with pytest.raises(SystemExit):
        main(["budget", "--noise-multiplier", "1.0", "--sample-rate", "0.01", "--steps", "0", "--delta", "1e-5"])


def test_budget_reports_what_it_can_and_names_an_unwritable_plot(capsys, tmp_path):
    # A PLD composition too wide for its grid leaves the RDP and GDP lines standing; a --plot path that cannot be
    # written is a clear error, not a traceback.
    assert main(["budget", "--noise-multiplier", "0.3", "--sample-rate", "0.1", "--steps", "1000000",
                 "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "epsilon (PLD, connect-the-dots, upper bound): not computed (the composition spans" in out
    assert "epsilon (GDP via CLT" in out
    pytest.importorskip("matplotlib")
    assert main(["budget", "--noise-multiplier", "1.0", "--sample-rate", "0.01", "--steps", "50", "--delta", "1e-5",
                 "--plot", str(tmp_path / "missing" / "eps.png")]) == 2
    assert "--plot" in capsys.readouterr().err
