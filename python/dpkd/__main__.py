"""Command line: ``python -m dpkd demo`` (DP-OPD end to end) and ``python -m dpkd budget`` (privacy budget)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import accounting


def _budget(args: argparse.Namespace) -> int:
    q, steps, delta = args.sample_rate, args.steps, args.delta
    if args.target_epsilon is not None and args.noise_multiplier is not None:
        raise ValueError("give --noise-multiplier or --target-epsilon (which calibrates it), not both")
    if args.target_epsilon is not None:
        noise = accounting.calibrate_noise(target_epsilon=args.target_epsilon, delta=delta, sample_rate=q, steps=steps)
        pld_noise = accounting.calibrate_noise(target_epsilon=args.target_epsilon, delta=delta, sample_rate=q,
                                               steps=steps, accountant="pld")
        print(f"noise multiplier for epsilon <= {args.target_epsilon:g}: {noise:.6f} (RDP), {pld_noise:.6f} (PLD, "
              "accountant='pld')")
    elif args.noise_multiplier is not None:
        noise = args.noise_multiplier
    else:
        raise ValueError("give --noise-multiplier, or --target-epsilon to calibrate it")
    eps, order = accounting.privacy_spent(noise_multiplier=noise, sample_rate=q, steps=steps, delta=delta)
    gdp = accounting.gdp_epsilon(noise_multiplier=noise, sample_rate=q, steps=steps, delta=delta)
    print(f"noise multiplier {noise:g}, sample rate {q:g}, {steps} steps, delta {delta:g}")
    print(f"epsilon (RDP, improved conversion): {eps:.4f}  best order {order:g}")
    try:
        pld = accounting.epsilon(noise_multiplier=noise, sample_rate=q, steps=steps, delta=delta, accountant="pld")
        pld = f"{pld:.4f}"
    except ValueError as e:  # a composition too wide for the grid: the other lines still stand
        pld = f"not computed ({e})"
    # An upper bound too, at most RDP's (the smaller of the two)
    print(f"epsilon (PLD, connect-the-dots, upper bound): {pld}")
    print(f"epsilon (GDP via CLT, APPROXIMATE, may under-estimate): {gdp:.4f}")
    if args.plot:
        try:
            _plot(args.plot, noise, q, steps, delta)
        except OSError as e:
            raise ValueError(f"--plot {args.plot}: {e.strerror or e}") from None
        print(f"wrote {args.plot}")
    return 0


def _plot(path: str, noise: float, q: float, steps: int, delta: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    import numpy as np

    ts = np.unique(np.linspace(1, max(steps, 1), 60).astype(int))
    rdp_eps = [accounting.epsilon(noise_multiplier=noise, sample_rate=q, steps=int(t), delta=delta) for t in ts]
    pld_ts = np.unique(np.append(ts[:: max(1, len(ts) // 20)], ts[-1]))  # every 3rd point, the last one included
    pld_eps = [accounting.epsilon(noise_multiplier=noise, sample_rate=q, steps=int(t), delta=delta, accountant="pld")
               for t in pld_ts]
    gdp_eps = [accounting.gdp_epsilon(noise_multiplier=noise, sample_rate=q, steps=int(t), delta=delta) for t in ts]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ts, rdp_eps, label="RDP (upper bound)")
    ax.plot(pld_ts, pld_eps, label="PLD (upper bound)")
    ax.plot(ts, gdp_eps, "--", label="GDP via CLT (approximate)")
    ax.set_xlabel("steps")
    ax.set_ylabel(f"epsilon at delta = {delta:g}")
    ax.set_title(f"noise multiplier {noise:g}, sample rate {q:g}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpkd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    budget = sub.add_parser(
        "budget",
        help="epsilon of a DP-SGD run, or the noise multiplier for a target epsilon",
        description="Privacy budget of Poisson-subsampled DP-SGD: epsilon by RDP and by PLD (upper bounds; PLD usually "
        "the lower) and by GDP (an approximation), or with --target-epsilon the smallest noise multiplier that meets "
        "it by each accountant (the epsilons then printed are at RDP's).",
    )
    budget.add_argument("--noise-multiplier", type=float, help="sigma: noise std divided by the clipping norm")
    budget.add_argument("--sample-rate", type=float, required=True, help="q: expected batch size / dataset size")
    budget.add_argument("--steps", type=_positive_int, required=True, help="number of DP-SGD steps")
    budget.add_argument("--delta", type=float, required=True, help="delta, e.g. 1e-5 (below 1/dataset size)")
    budget.add_argument("--target-epsilon", type=float, help="calibrate the noise multiplier for this epsilon")
    budget.add_argument("--plot", metavar="FILE.png", help="draw epsilon against steps into FILE.png")
    budget.set_defaults(run=_budget)
    demo = sub.add_parser(
        "demo",
        help="DP-OPD against DP fine-tuning, off-policy DP distillation and non-private distillation",
        description=__import__("dpkd.demo", fromlist=["run"]).__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .demo import add_arguments, run as run_demo

    add_arguments(demo)
    demo.set_defaults(run=lambda a: (run_demo(a), 0)[1])
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:
        print(f"{args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
