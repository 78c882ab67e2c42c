"""Accounting speed and agreement: dpkd against Opacus and dp_accounting on the same inputs.

    python benchmarks/bench_accounting.py [--cases N]

Peers are timed only when importable (pip install opacus dp-accounting). Each cell is the median
of several runs; ratios are peer time / dpkd time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

from dpkd import accounting

CASES = [  # (noise multiplier, sample rate, steps, delta)
    (1.1, 256 / 60000, 14063, 1e-5),
    (1.5, 0.04, 2250, 1e-5),
    (1.0, 0.01, 10000, 1e-5),
]
CALIBRATION = [  # (target epsilon, sample rate, steps, delta)
    (8.0, 0.04, 2250, 1e-5),
    (2.0, 0.01, 10000, 1e-5),
    (1.0, 0.001, 10000, 1e-6),
]


def timed(fn: Callable[[], float], repeat: int = 5) -> tuple[float, float]:
    """(value, median seconds)."""
    times, value = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return value, statistics.median(times)


def peers(tight: bool):
    """{name: (epsilon_fn, calibrate_fn)} of the peers importable here: their RDP accountants, or (``tight``) their
    tighter ones, dp_accounting's PLD (connect-the-dots, interval 1e-4, as ours) and Opacus's PRV."""
    found = {}
    try:
        from opacus.accountants import PRVAccountant
        from opacus.accountants.analysis import rdp as opacus_rdp
        from opacus.accountants.utils import get_noise_multiplier

        def opacus_eps(sigma, q, steps, delta):
            if tight:
                acc = PRVAccountant()
                acc.history = [(sigma, q, steps)]
                return float(acc.get_epsilon(delta))
            orders = list(accounting.DEFAULT_ORDERS)
            r = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
            return float(opacus_rdp.get_privacy_spent(orders=orders, rdp=r, delta=delta)[0])

        def opacus_cal(eps, q, steps, delta):
            return get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=steps,
                                        accountant="prv" if tight else "rdp")

        found["Opacus PRV" if tight else "Opacus"] = (opacus_eps, opacus_cal)
    except ImportError:
        pass
    try:
        import dp_accounting as dpa
        from dp_accounting.pld import pld_privacy_accountant as dpa_pld
        from dp_accounting.rdp import rdp_privacy_accountant as dpa_rdp

        def event(sigma, q, steps):
            return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)

        def fresh():
            return dpa_pld.PLDAccountant() if tight else dpa_rdp.RdpAccountant(list(accounting.DEFAULT_ORDERS))

        def dpa_eps(sigma, q, steps, delta):
            acc = fresh()
            acc.compose(event(sigma, q, steps))
            return float(acc.get_epsilon(delta))

        def dpa_cal(eps, q, steps, delta):
            return dpa.calibrate_dp_mechanism(fresh, lambda sigma: event(sigma, q, steps), eps, delta)

        found["dp_accounting PLD" if tight else "dp_accounting"] = (dpa_eps, dpa_cal)
    except ImportError:
        pass
    return found


def table(title: str, columns: str, value: str, rows, ours: Callable, peer_fns: dict, repeat: int) -> None:
    """One row per case: dpkd's value and time, then each peer's with its time ratio to dpkd's."""
    print(title)
    print(columns + f" | {'dpkd ' + value:>11} {'ms':>8}" +
          "".join(f" | {peer + ' ' + value:>24} {'ms':>8} {'x':>6}" for peer in peer_fns))
    for label, case in rows:
        mine, t = timed(lambda: ours(*case), repeat=repeat)
        line = f"{label} | {mine:>11.6f} {t * 1e3:>8.2f}"
        for fn in peer_fns.values():
            theirs, t2 = timed(lambda: fn(*case), repeat=1)
            line += f" | {theirs:>24.6f} {t2 * 1e3:>8.1f} {t2 / t:>6.1f}"
        print(line)
    print()


def tables(name: str, accountant: str, repeat: int, cases: int) -> None:
    others = peers(accountant == "pld")
    table(f"epsilon ({name})", f"{'sigma':>6} {'q':>9} {'steps':>6}", "eps",
          [(f"{s:>6} {q:>9.6f} {n:>6}", (s, q, n, d)) for s, q, n, d in CASES[:cases]],
          lambda s, q, n, d: accounting.epsilon(noise_multiplier=s, sample_rate=q, steps=n, delta=d,
                                                accountant=accountant),
          {peer: fns[0] for peer, fns in others.items()}, repeat)
    table(f"calibrate_noise ({name}: smallest sigma with epsilon <= target)", f"{'eps':>6} {'q':>9} {'steps':>6}",
          "sigma", [(f"{e:>6} {q:>9.6f} {n:>6}", (e, q, n, d)) for e, q, n, d in CALIBRATION[:cases]],
          lambda e, q, n, d: accounting.calibrate_noise(target_epsilon=e, delta=d, sample_rate=q, steps=n,
                                                        accountant=accountant),
          {peer: fns[1] for peer, fns in others.items()}, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=len(CASES), help="the first N cases of each table")
    args = parser.parse_args()
    tables("RDP, default order grid of 156 orders; improved conversion", "rdp", repeat=5, cases=args.cases)
    tables("PLD, connect-the-dots at 1e-4; Opacus: PRV", "pld", repeat=1, cases=args.cases)


if __name__ == "__main__":
    main()
