"""DP-SGD for the student in an ordinary training loop.

    model, optimizer = dpkd.privacy.make_private(model, optimizer, noise_multiplier=1.0, max_grad_norm=1.0,
                                                 expected_batch_size=32, dataset_size=len(dataset))
    loader = dpkd.privacy.poisson_loader(dataset, optimizer=optimizer)  # at the optimizer's rate
    for batch in loader:                       # Poisson batches (empty ones as empty tensors)
        optimizer.zero_grad()
        loss_per_example = model_loss(batch)   # shape [B]: each example's own loss
        loss_per_example.sum().backward()
        optimizer.step()                       # clip, noise once, / expected batch size, step, account
    optimizer.accountant.get_epsilon(delta)

Per-example gradient norms come from the layers' inputs and output gradients (ghost norms for linear
layers where cheaper, DESIGN.md), in one backward pass. Supported trainable layers: nn.Linear, GPT-2's
Conv1D, nn.Embedding, LayerNorm/GroupNorm/RMSNorm (incl. Hugging Face's *RMSNorm), Conv1d/2d/3d;
anything else that has trainable parameters is listed in one error at wrap time.
"""

from __future__ import annotations

import numbers
import warnings

import torch

from ..accounting import Accountant, PLDAccountant, RDPAccountant, make_accountant
from .engine import ClippingEngine, LossReduction, attached_engine, layer_kind
from .noise import gaussian
from .optimizer import DPOptimizer, check_arguments
from .sampler import EmptyBatchCollate, PoissonBatchSampler, poisson_loader

__all__ = ["ClippingEngine", "DPOptimizer", "EmptyBatchCollate", "PoissonBatchSampler", "gaussian", "layer_kind",
           "make_private", "poisson_loader"]


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, dataset_size: int | None = None,
                 sample_rate: float | None = None, loss_reduction: LossReduction = "sum",
                 secure_mode: bool = False, accountant: RDPAccountant | PLDAccountant | Accountant | None = None,
                 generator: torch.Generator | None = None, distributed: bool = False,
                 ) -> tuple[torch.nn.Module, DPOptimizer]:
    """Attach per-example clipping to ``model`` and wrap ``optimizer`` for DP-SGD.

    Args:
        noise_multiplier: sigma; the noise std is sigma * max_grad_norm (see dpkd.accounting.calibrate_noise).
        max_grad_norm: C, the per-example clipping norm of the whole model's gradient.
        expected_batch_size: L, public; gradients are divided by it (never by the realised batch size).
        dataset_size / sample_rate: N, or q = L / N directly, for the accountant.
        loss_reduction: ``"sum"`` if you backpropagate loss_per_example.sum(), ``"mean"`` for .mean().
        accountant: ``"rdp"`` (the default), ``"pld"`` (tighter), or an accountant to go on charging (a resumed
            run's).
        secure_mode: noise (and the draws of ``poisson_loader(dataset, optimizer=...)``, which takes it) from a
            CSPRNG; see dpkd.privacy.noise for what that does and does not protect.
        generator: the noise's torch.Generator (seeded, a run is reproducible; its state is in the optimizer's
            state_dict); refused with secure_mode, whose noise comes from os.urandom. Default: torch's global
            generator.
        distributed: data-parallel training over torch.distributed ranks (see DPOptimizer); the model is
            not wrapped in DistributedDataParallel: the optimizer does the one all-reduce itself.

    The batch dimension must come first in every layer's input (one example per row; a sequence-first model would
    be clipped per time step), and Hugging Face models need position_ids of shape [B, T]. Examples must not meet
    inside the model (batch statistics, attention or means across the batch dimension): per-example clipping then
    bounds no example's influence; batch norm in training mode is refused, other mixing cannot be detected.
    Returns the same model (hooks attached; ``optimizer.engine.remove()`` detaches them) and a DPOptimizer.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not model.training:
        raise ValueError("model is in eval mode: call model.train() before make_private")
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    if isinstance(model, wrappers) or type(model).__name__ == "FullyShardedDataParallel":
        # Their all-reduce of the non-private gradients is not DP-SGD's (clip per rank, noise once).
        raise ValueError(f"model is wrapped in {type(model).__name__}: pass the unwrapped model with "
                         "distributed=True, which clips per rank and all-reduces the clipped, noised sum itself")
    attached = [name or "<root>" for name, m in model.named_modules() if attached_engine(m) is not None]
    if attached:
        raise ValueError(f"make_private was already called on {attached[0]}: its engine still captures every forward "
                         "pass; call optimizer.engine.remove() on the earlier DP optimizer first")
    check_arguments(noise_multiplier, max_grad_norm, expected_batch_size)
    if dataset_size is not None and (isinstance(dataset_size, bool) or not isinstance(dataset_size, numbers.Integral)
                                     or dataset_size <= 0):
        raise ValueError(f"dataset_size must be an int > 0, got {dataset_size!r}")
    if sample_rate is None:
        if dataset_size is None:
            raise ValueError("give dataset_size (> 0) or sample_rate")
        if expected_batch_size > dataset_size:
            raise ValueError(f"expected_batch_size ({expected_batch_size}) must be at most dataset_size ({dataset_size})")
        sample_rate = expected_batch_size / dataset_size
    elif dataset_size is not None and abs(sample_rate - expected_batch_size / dataset_size) > 1e-12 * sample_rate:
        raise ValueError(f"sample_rate={sample_rate} disagrees with expected_batch_size / dataset_size = "
                         f"{expected_batch_size}/{dataset_size}: give one of dataset_size and sample_rate")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
    if grouped and not distributed and torch.distributed.get_world_size() > 1:
        warnings.warn("make_private(distributed=False) in a process group of several ranks: each rank clips, noises "
                      "and steps on its own batches, and the replicas drift apart; pass distributed=True for "
                      "data-parallel DP-SGD", RuntimeWarning, stacklevel=2)
    if distributed and grouped:
        # Every rank starts from rank 0's weights (what DistributedDataParallel would do): with one noise draw
        # and one all-reduce per step, ranks that start apart stay apart.
        for t in list(model.parameters()) + list(model.buffers()):
            torch.distributed.broadcast(t.data, src=0)
    engine = ClippingEngine(model, loss_reduction)
    try:
        if isinstance(accountant, str):
            accountant = make_accountant(accountant)
        dp = DPOptimizer(optimizer, engine, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, sample_rate=sample_rate, accountant=accountant,
                         secure_mode=secure_mode, generator=generator, distributed=distributed)
    except Exception:
        engine.remove()
        raise
    return model, dp
