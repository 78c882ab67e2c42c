"""Privacy loss distributions (PLDs) of Poisson-subsampled Gaussian steps: composition and queries.

One step's PLD comes from the C++ core (``_C.subsampled_gaussian_pld``: connect-the-dots on a grid of losses, an
upper bound on the step's hockey-stick curve). Here the steps are composed by FFT: the losses add, so their
distributions convolve. The grid of the composition is cut to a window that holds all but ``tail_mass`` of it
(Chernoff bounds on the sum); what falls outside lands, through the FFT's wrap-around, somewhere inside, and
``tail_mass`` is added to the mass at +inf to pay for it. Every approximation errs upwards: the epsilon returned
bounds the true one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

from . import _C

ADJACENCIES = ("remove", "add")


@dataclasses.dataclass(frozen=True)
class PLD:
    """Mass ``masses[i]`` at loss ``(lower + i) * interval``, ``infinity_mass`` at +inf.

    A composition computed under an exponential tilt (``tilt`` > 0, see :func:`compose`) holds the masses of its window
    only, and delta(eps) carries an allowance exp(log_allowance - tilt eps) for the tilted tails outside it; it answers
    for eps inside the window (``epsilon`` returns NaN below it)."""

    lower: int
    masses: np.ndarray
    infinity_mass: float
    interval: float
    tilt: float = 0.0
    log_allowance: float = -math.inf
    rounding: float = 0.0  # the FFT's absolute error per entry, about
    resolved: tuple[float, float] = (-math.inf, math.inf)  # tilted: the losses whose masses the FFT resolves

    @property
    def losses(self) -> np.ndarray:
        """The loss at each entry of ``masses``."""
        return (self.lower + np.arange(self.masses.size)) * self.interval

    def _tail(self, epsilon: float) -> np.ndarray:
        """Each entry's part of delta(eps): m_i (1 - e^(eps - loss_i)) for the losses above eps."""
        losses = self.losses
        above = losses > epsilon
        return self.masses[above] * -np.expm1(epsilon - losses[above])

    def _allowance(self, eps):
        return np.exp(self.log_allowance - self.tilt * eps) if self.tilt > 0 else 0.0 * eps

    def delta(self, epsilon: float) -> float:
        """delta(eps) = E[(1 - e^(eps - L))_+] + P(L = inf)."""
        tail = float(np.sum(self._tail(epsilon)))
        return min(1.0, tail + self.infinity_mass + float(self._allowance(epsilon)))

    def epsilon(self, delta: float) -> float:
        """The smallest eps >= 0 with delta(eps) <= delta (inf if none): on the segment between the grid points that
        bracket it, delta(eps) = A - e^eps T with A, T sums over the masses above, solved exactly."""
        m = self.masses
        if self.infinity_mass > delta:
            return math.inf
        if m.size == 0:
            return 0.0
        losses = self.losses
        with np.errstate(divide="ignore"):
            log_weights = np.log(m) - losses  # log(m_i e^(-eps_i))
        above = np.cumsum(m[::-1])[::-1]  # A_j = sum_{i >= j} m_i
        log_t = np.logaddexp.accumulate(log_weights[::-1])[::-1]  # log T_j = log sum_{i >= j} m_i e^(-eps_i)
        allowance = self._allowance(losses)
        deltas = above - np.exp(losses + log_t) + self.infinity_mass + allowance  # delta at each grid point
        j = int(np.argmax(deltas <= delta)) if np.any(deltas <= delta) else m.size
        if j == m.size:  # only the +inf mass lies above the last grid point: delta there is infinity_mass <= delta
            return max(0.0, float(losses[-1]))
        if j == 0 and self.tilt > 0:
            return math.nan  # below the window of a tilted composition: no answer here
        # Within the segment the allowance is at most its value at the segment's left end.
        room = above[j] + self.infinity_mass + float(allowance[max(j - 1, 0)]) - delta
        if room <= 0.0 or log_t[j] == -math.inf:
            eps = float(losses[j - 1]) if j > 0 else 0.0
        else:
            eps = math.log(room) - float(log_t[j])
            if j > 0:
                eps = max(eps, float(losses[j - 1]))
            eps = min(eps, float(losses[j]))
        return max(0.0, eps)

    def tail_below_noise(self, epsilon: float) -> bool:
        """Whether the FFT's rounding could move delta(eps) by 1e-4 of itself: ``rounding`` per entry, over the
        entries above eps."""
        parts = self._tail(epsilon)
        return parts.size > 0 and parts.size * self.rounding > 1e-4 * float(parts.sum())


@functools.lru_cache(maxsize=16)
def one_step(noise_multiplier: float, sample_rate: float, interval: float, tail_mass: float, adjacency: str) -> PLD:
    lower, masses, infinity_mass = _C.subsampled_gaussian_pld(noise_multiplier, sample_rate, interval, tail_mass,
                                                             adjacency)
    masses.setflags(write=False)
    return PLD(int(lower), masses, float(infinity_mass), interval)


def _power(spectrum: np.ndarray, count: int) -> np.ndarray:
    """spectrum ** count by squaring (2 log2(count) roundings, not count's worth through exp(count log z))."""
    result = np.ones_like(spectrum)
    base = spectrum.copy()
    while count:
        if count & 1:
            result *= base
        count >>= 1
        if count:
            base *= base
    return result


def _window(steps: Sequence[tuple[PLD, int]], tail_mass: float) -> tuple[int, int]:
    """[lo, hi] in the summed grid offsets (each step's index counted from its own ``lower``) that holds all but
    tail_mass of the composition: Chernoff, P(S >= u) <= E[e^(l S)] e^(-l u), over a grid of orders l scaled by the
    sum's standard deviation."""
    hi_max = sum(count * (pld.masses.size - 1) for pld, count in steps)
    moments = []
    for pld, count in steps:
        idx = np.arange(pld.masses.size, dtype=np.float64)
        total = pld.masses.sum()
        mean = float(pld.masses @ idx) / total if total > 0 else 0.0
        moments.append(count * float(pld.masses @ (idx - mean) ** 2) / max(total, 1e-300))
    std = math.sqrt(sum(moments))
    if std == 0.0:
        return 0, hi_max
    lo, hi = 0, hi_max
    log_budget = math.log(2.0 / tail_mass)
    with np.errstate(divide="ignore"):
        logs = [(np.log(pld.masses), np.arange(pld.masses.size, dtype=np.float64), count) for pld, count in steps]
    # Orders from 1e-4 of 1/std: a step with a long, thin tail (small q or sigma) has a tiny std next to its reach,
    # and only small orders then bound the sum short of its whole support.
    orders = np.geomspace(1e-4, 64.0, 72) / std
    for order in np.concatenate([-orders, orders]):
        log_mgf = 0.0
        for log_m, idx, count in logs:
            terms = log_m + order * idx
            top = terms.max()
            log_mgf += count * (top + math.log(np.exp(terms - top).sum()))
        bound = (log_mgf + log_budget) / order
        if not math.isfinite(bound):
            continue
        if order > 0:
            hi = min(hi, math.ceil(bound))
        else:
            lo = max(lo, math.floor(bound))
    return lo, max(hi, lo)


def _tilted(pld: PLD, tilt: float) -> tuple[PLD, float]:
    """The step's finite masses times e^(tilt * loss), normalised: (that PLD, log of the normaliser)."""
    with np.errstate(divide="ignore"):
        log_w = np.log(pld.masses) + tilt * pld.losses
    top = log_w.max()
    w = np.exp(log_w - top)
    total = w.sum()
    return PLD(pld.lower, w / total, 0.0, pld.interval), float(top + math.log(total))


def tilt_for(steps: Sequence[tuple[PLD, int]], epsilon: float) -> float:
    """The tilt >= 0 that centres the composition's tilted distribution at ``epsilon`` (0 if it lies above it): there
    the FFT resolves the masses delta(epsilon) rests on."""
    def mean(tilt: float) -> float:
        total = 0.0
        for pld, count in steps:
            w, _ = _tilted(pld, tilt)
            total += count * float(w.masses @ w.losses)
        return total

    if mean(0.0) >= epsilon:
        return 0.0
    lo, hi = 0.0, 1.0
    while mean(hi) < epsilon and hi < 1e6:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean(mid) < epsilon else (lo, mid)
    return hi


def compose(steps: Sequence[tuple[PLD, int]], tail_mass: float, tilt: float = 0.0) -> PLD:
    """The PLD of ``count`` repetitions of each step, all on one ``interval``.

    ``tilt`` > 0 composes the masses times e^(tilt * loss) (exponential tilting), which moves the bulk of the
    composition to where its upper tail was: the FFT's rounding, about 1e-16 of the largest entry, would otherwise
    swamp the masses a small delta rests on. The window then holds the tilted bulk, and what the tilted tails outside it
    could add to delta is carried as an allowance."""
    steps = [(pld, count) for pld, count in steps if count > 0]
    interval = steps[0][0].interval if steps else 1.0
    log_finite = sum(count * math.log1p(-pld.infinity_mass) if pld.infinity_mass < 1 else -math.inf
                     for pld, count in steps)
    infinity_mass = -math.expm1(log_finite)
    if not steps or infinity_mass >= 1.0:
        return PLD(0, np.ones(1) if not steps else np.zeros(1), infinity_mass, interval)
    log_scale = 0.0
    if tilt > 0:
        tilted = [(_tilted(pld, tilt), count) for pld, count in steps]
        log_scale = sum(count * log_z for (_, log_z), count in tilted)
        steps = [(pld, count) for (pld, _), count in tilted]
    lo, hi = _window(steps, tail_mass)
    width = hi - lo + 1
    if width > 1 << 27:
        raise ValueError(f"the composition spans {width} grid points (more than 2^27): use a larger "
                         "value_discretization_interval, or accountant='rdp'")
    size = _fast_length(max(width, *(pld.masses.size for pld, _ in steps)))
    spectrum = np.ones(size // 2 + 1, dtype=np.complex128)
    for pld, count in steps:
        spectrum *= _power(np.fft.rfft(pld.masses, size), count)
    circular = np.fft.irfft(spectrum, size)
    masses = np.clip(circular[(lo + np.arange(width)) % size], 0.0, None)
    lower = sum(count * pld.lower for pld, count in steps) + lo
    truncated = tail_mass if (lo > 0 or hi < sum(c * (p.masses.size - 1) for p, c in steps)) else 0.0
    if tilt == 0:
        # A spectrum coefficient near 1 raised to the n-th power carries n times its rounding (squaring doubles a
        # relative error): about (n + log2 size) 1.1e-16 of the largest mass per entry, doubled to be safe.
        steps_total = sum(count for _, count in steps)
        rounding = 2.2e-16 * (steps_total + 8 * math.log2(size)) * float(masses.max())
        return PLD(lower, masses, min(1.0, infinity_mass + truncated), interval, rounding=rounding)
    # Untilted: m_j = t_j exp(log_scale - tilt * loss_j), at most 1 (far below the bulk, t_j is rounding noise).
    losses = (lower + np.arange(width)) * interval
    bulk = np.flatnonzero(masses >= 1e-6 * masses.max())  # rounding is 1e-9 of these at most
    with np.errstate(divide="ignore", over="ignore"):
        masses = np.minimum(1.0, np.exp(np.log(masses) + log_scale - tilt * losses))
    # The tilted mass outside the window, <= tail_mass, adds at most tail_mass exp(log_scale - tilt eps) to delta(eps).
    return PLD(lower, masses, infinity_mass, interval, tilt, math.log(tail_mass) + log_scale,
               resolved=(float(losses[bulk[0]]), float(losses[bulk[-1]])))


def _fast_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (sizes numpy's FFT handles fastest)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def steps_of(events: Sequence[tuple[float, float, int]], interval: float, tail_mass: float,
             adjacency: str) -> list[tuple[PLD, int]]:
    """One-step PLDs and their counts for a history of (noise_multiplier, sample_rate, steps) events."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, count in events:
        merged[(sigma, q)] = merged.get((sigma, q), 0) + count
    return [(one_step(s, q, interval, tail_mass, adjacency), c) for (s, q), c in merged.items()]


def composed(events: Sequence[tuple[float, float, int]], interval: float, tail_mass: float, adjacency: str,
             tilt: float = 0.0) -> PLD:
    """The PLD of a history of events in one adjacency direction (tilted by ``tilt``, see :func:`compose`)."""
    return compose(steps_of(events, interval, tail_mass, adjacency), tail_mass, tilt)
