"""Poisson sampling: every example joins a batch independently with probability q = L / N, which is
what the accountant's subsampled-Gaussian analysis assumes. Batch sizes vary and can be 0."""

from __future__ import annotations

from typing import Iterator

import torch

from .noise import secure_uniform


class PoissonBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields ``steps`` batches of indices (default: one epoch, round(1 / q) batches).

    Use as ``DataLoader(dataset, batch_sampler=PoissonBatchSampler(...), collate_fn=...)``. An empty
    batch is a list of no indices: call ``optimizer.step()`` for it anyway (a noise-only step that the
    accountant counts). ``secure_mode`` draws the inclusion decisions from os.urandom.
    """

    def __init__(self, dataset_size: int, sample_rate: float, *, steps: int | None = None,
                 generator: torch.Generator | None = None, secure_mode: bool = False) -> None:
        if dataset_size <= 0:
            raise ValueError(f"dataset_size must be > 0, got {dataset_size}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.dataset_size, self.sample_rate = dataset_size, sample_rate
        self.steps = steps if steps is not None else max(1, round(1 / sample_rate))
        self.generator, self.secure_mode = generator, secure_mode

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            if self.secure_mode:
                keep = torch.from_numpy(secure_uniform(self.dataset_size)) < self.sample_rate
            else:
                keep = torch.rand(self.dataset_size, generator=self.generator) < self.sample_rate
            yield keep.nonzero().flatten().tolist()
