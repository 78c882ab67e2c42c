"""Gaussian noise for DP-SGD, in fp32 (or float64), from torch's generator or a CSPRNG.

Secure mode draws the uniforms from the operating system's cryptographically secure generator
(os.urandom) and turns them into normals by Box-Muller in float64. It protects against an adversary
who could predict or reconstruct a seeded PRNG's stream (and so subtract the noise). It does NOT
protect against floating-point attacks (Mironov 2012; Opacus #616): the noise is still a float
sample added to a float gradient, whose low-order bits can leak; nor against timing side channels.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch


def refuse_ignored_generator(secure_mode: bool, generator: torch.Generator | None, draws: str) -> None:
    """Secure mode draws from os.urandom: a generator given with it would be ignored without a word."""
    if secure_mode and generator is not None:
        raise ValueError(f"generator with secure_mode=True: secure mode draws the {draws} from os.urandom, so the "
                         "generator would be ignored; give one or the other")


def secure_uniform(n: int) -> np.ndarray:
    """n uniforms in (0, 1) with 53 random bits each, from os.urandom."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) / float(1 << 53)


def gaussian(shape: torch.Size | tuple[int, ...], std: float, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
             secure: bool = False) -> torch.Tensor:
    """N(0, std^2) samples."""
    if std == 0.0:
        return torch.zeros(shape, dtype=dtype, device=device)
    if not secure:
        return torch.normal(0.0, std, size=tuple(shape), generator=generator, dtype=dtype,
                            device=generator.device if generator is not None else device).to(device)
    n = math.prod(shape)
    u1, u2 = secure_uniform(n), secure_uniform(n)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return torch.from_numpy(z * std).to(dtype=dtype, device=device).reshape(shape)
