"""Poisson sampling: every example joins a batch independently with probability q = L / N, which is
what the accountant's subsampled-Gaussian analysis assumes. Batch sizes vary and can be 0."""

from __future__ import annotations

import hashlib
import numbers
import os
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .noise import refuse_ignored_generator, secure_uniform


class PoissonBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields ``steps`` batches of indices (default: one epoch, round(1 / q) batches).

    Use as ``DataLoader(dataset, batch_sampler=PoissonBatchSampler(...), collate_fn=...)``, or through
    :func:`poisson_loader`, whose collate function turns an empty batch into empty tensors. An empty batch is a
    list of no indices: call ``optimizer.step()`` for it anyway (a noise-only step that the accountant counts).
    ``secure_mode`` draws the inclusion decisions from os.urandom.

    Gradient accumulation (``micro_batches`` = k): each Poisson batch comes as k consecutive parts of it (some may be
    empty), for one ``optimizer.step()`` after the k-th; call ``optimizer.accumulate()`` after each part's backward.
    k independent Poisson batches per step instead would hold an example twice in some steps, which the accountant's
    rate and sensitivity do not cover.

    Data-parallel training (``num_replicas`` ranks, this one ``rank``; by default, as for DistributedSampler, those
    of the initialised torch.distributed process group): each rank samples the indices i = rank (mod num_replicas) at
    the same rate, so that together the ranks draw one Poisson batch of the whole dataset (every rank sampling all of
    it would put an example in several ranks' batches: twice the sensitivity the accountant assumes). A process group
    whose ranks train apart passes ``num_replicas=1, rank=0`` (poisson_loader does, given a non-distributed
    DPOptimizer). The ranks' draws must be independent: a ``generator`` (usually seeded alike on every rank) seeds,
    with one draw from it and the rank, a generator of this rank's own; without one (and outside secure mode) each
    rank seeds its own from os.urandom.
    """

    def __init__(self, dataset_size: int, sample_rate: float, *, steps: int | None = None,
                 generator: torch.Generator | None = None, secure_mode: bool = False,
                 num_replicas: int | None = None, rank: int | None = None, micro_batches: int = 1) -> None:
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
        self.micro_batches = micro_batches
        if dataset_size <= 0:
            raise ValueError(f"dataset_size must be > 0, got {dataset_size}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0):
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        refuse_ignored_generator(secure_mode, generator, "inclusions")
        if (num_replicas is None) != (rank is None):
            raise ValueError("give both num_replicas and rank, or neither")
        if num_replicas is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            num_replicas, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if num_replicas is not None and not (num_replicas >= 1 and 0 <= rank < num_replicas):
            raise ValueError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}")
        self.dataset_size, self.sample_rate = dataset_size, sample_rate
        self.steps = steps if steps is not None else max(1, round(1 / sample_rate))
        self.num_replicas, self.rank = num_replicas or 1, rank or 0
        if self.num_replicas > 1 and not secure_mode:
            # Equal draws on every rank would include the ranks' i-th indices together, not independently. A draw
            # from the caller's generator (alike on every rank, and advancing it: a sampler made again draws anew),
            # hashed with the rank, seeds this rank's own.
            if generator is None:
                seed = int.from_bytes(os.urandom(8), "little")
            else:
                base = int(torch.randint(0, 2**62, (1,), generator=generator))
                seed = int.from_bytes(hashlib.sha256(f"{base}/{self.rank}".encode()).digest()[:8], "little")
            generator = torch.Generator().manual_seed(seed >> 1)
        self.generator, self.secure_mode = generator, secure_mode

    def __len__(self) -> int:
        return self.steps * self.micro_batches

    def state_dict(self) -> dict[str, Any]:
        """The sampling generator's state, for a checkpoint (None in secure mode, or without a generator: then the
        draws come from os.urandom or torch's global generator). A DataLoader with workers draws batches ahead of
        the training loop: a run resumed from this state skips the batches drawn but not trained on, which changes
        the data order but not the guarantee (every step's batch is still a fresh Poisson sample)."""
        return {"generator": None if self.secure_mode or self.generator is None else self.generator.get_state(),
                "rank": self.rank, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s generator state: each rank its own (a rank given another's would draw the same
        inclusions, not independent ones)."""
        if (state.get("rank", 0), state.get("num_replicas", 1)) != (self.rank, self.num_replicas):
            raise ValueError(f"the state is rank {state.get('rank', 0)} of {state.get('num_replicas', 1)}'s, this "
                             f"sampler is rank {self.rank} of {self.num_replicas}'s: save and load one state per rank")
        saved = state["generator"]
        if saved is not None:
            if self.secure_mode or self.generator is None:
                raise ValueError("the checkpoint holds a sampling generator's state, and this sampler has no "
                                 "generator to restore it into (secure mode, or none given)")
            self.generator.set_state(torch.as_tensor(saved).cpu())

    def __iter__(self) -> Iterator[list[int]]:
        indices = torch.arange(self.rank, self.dataset_size, self.num_replicas)
        for _ in range(self.steps):
            if self.secure_mode:
                keep = torch.from_numpy(secure_uniform(indices.numel())) < self.sample_rate
            else:
                keep = torch.rand(indices.numel(), generator=self.generator) < self.sample_rate
            for part in indices[keep].tensor_split(self.micro_batches):
                yield part.tolist()


def _empty_like(batch: Any) -> Any:
    """A collated batch of one item cut to zero items: tensors and arrays [:0] inside dicts, lists and tuples; a list
    of plain values (default_collate's strings) becomes []; None stays. Anything else is refused: returned as it is,
    it would carry the one item into a batch that must be empty."""
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return batch[:0]
    if batch is None:
        return None
    if isinstance(batch, Mapping):
        return type(batch)({k: _empty_like(v) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        if isinstance(batch, list) and all(isinstance(v, (str, bytes, int, float, bool)) for v in batch):
            return []
        parts = [_empty_like(v) for v in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    raise TypeError(f"EmptyBatchCollate cannot make an empty batch out of a {type(batch).__name__}: give a "
                    "collate_fn that returns an empty batch for [] (it is tried first)")


class EmptyBatchCollate:
    """``collate_fn`` for Poisson batches: an empty batch becomes the collated first item cut to zero items (so that
    a loop runs as for any batch, and ``optimizer.step()`` takes its noise-only step), any other batch goes to
    ``collate_fn``. Models that cannot run zero examples (Hugging Face's reshape on the batch dimension) need the
    forward and backward skipped for it: ``if batch["input_ids"].shape[0]: ...`` before ``optimizer.step()``."""

    def __init__(self, dataset: Any, collate_fn: Callable[[list], Any] | None = None) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn if collate_fn is not None else torch.utils.data.default_collate

    def __call__(self, items: list) -> Any:
        if items:
            return self.collate_fn(items)
        try:
            return self.collate_fn([])  # a collate_fn that handles no items knows best
        except Exception:  # default_collate([]) raises IndexError
            return _empty_like(self.collate_fn([self.dataset[0]]))


def poisson_loader(dataset: Any, expected_batch_size: int | None = None, *, optimizer: Any = None,
                   steps: int | None = None, generator: torch.Generator | None = None,
                   secure_mode: bool | None = None, collate_fn: Callable[[list], Any] | None = None,
                   num_replicas: int | None = None, rank: int | None = None, micro_batches: int = 1,
                   **loader_kwargs: Any) -> torch.utils.data.DataLoader:
    """A DataLoader of Poisson batches at rate q = expected_batch_size / len(dataset) (PoissonBatchSampler), empty
    batches included as empty tensors (EmptyBatchCollate). ``optimizer``: the DPOptimizer the batches are for: its
    expected batch size and secure mode are taken (or checked, where given too), and its sample rate must be this
    loader's (the accountant charges that rate; a loader drawing at another would make the reported epsilon wrong).
    ``loader_kwargs`` go to the DataLoader (num_workers, pin_memory, ...); with ``num_replicas``/``rank`` (by default
    the process group's, if one is initialised), expected_batch_size is the global one; with ``micro_batches`` = k,
    each Poisson batch (of expected size expected_batch_size) comes in k parts (see PoissonBatchSampler)."""
    n = len(dataset)
    if optimizer is not None:
        if not all(hasattr(optimizer, a) for a in ("expected_batch_size", "sample_rate", "secure_mode", "distributed")):
            raise TypeError(f"optimizer must be the DPOptimizer of dpkd.privacy.make_private, got "
                            f"{type(optimizer).__name__}")
        if expected_batch_size is None:
            expected_batch_size = optimizer.expected_batch_size
        elif expected_batch_size != optimizer.expected_batch_size:
            raise ValueError(f"expected_batch_size={expected_batch_size} but the optimizer's is "
                             f"{optimizer.expected_batch_size}")
        if n and abs(optimizer.sample_rate - expected_batch_size / n) > 1e-12 * optimizer.sample_rate:
            raise ValueError(f"the optimizer's sample_rate is {optimizer.sample_rate} but this loader draws at "
                             f"expected_batch_size / len(dataset) = {expected_batch_size}/{n}: the accountant would "
                             "charge another rate than the one sampled; give make_private dataset_size=len(dataset)")
        if secure_mode is None:
            secure_mode = optimizer.secure_mode
        elif secure_mode != optimizer.secure_mode:
            raise ValueError(f"secure_mode={secure_mode} but the optimizer's is {optimizer.secure_mode}")
        # A distributed optimizer's ranks draw one Poisson batch, each rank its share; a non-distributed one's whole
        # batch is this process's. Any other split changes the rate or the sensitivity the accountant assumes.
        want = ((torch.distributed.get_world_size(), torch.distributed.get_rank()) if optimizer.distributed else (1, 0))
        if num_replicas is None and rank is None:
            num_replicas, rank = want
        elif (num_replicas, rank) != want:
            kind = "distributed" if optimizer.distributed else "non-distributed"
            raise ValueError(f"num_replicas={num_replicas}, rank={rank} for a {kind} optimizer, whose batches take "
                             f"num_replicas={want[0]}, rank={want[1]}")
    if expected_batch_size is None:
        raise ValueError("give expected_batch_size, or the optimizer (whose expected batch size is taken)")
    # Checked here by the names the caller used (PoissonBatchSampler names the rate it is given).
    if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, numbers.Real) or not (
            0 < expected_batch_size <= n):  # q N need not be whole
        raise ValueError(f"expected_batch_size must be in (0, len(dataset) = {n}], got {expected_batch_size!r}")
    sampler = PoissonBatchSampler(n, expected_batch_size / n, steps=steps, generator=generator,
                                  secure_mode=bool(secure_mode), num_replicas=num_replicas, rank=rank,
                                  micro_batches=micro_batches)
    collate = EmptyBatchCollate(dataset, collate_fn)
    collate([])  # an empty batch this collate cannot make fails now, not thousands of steps into the run
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **loader_kwargs)
