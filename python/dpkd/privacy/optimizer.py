"""The DP-SGD optimizer wrapper: clip (through the engine), add noise once per logical batch, divide by
the expected batch size, step the wrapped optimizer, charge the accountant."""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Any, Callable

import torch

import torch.distributed as dist

from ..accounting import PLDAccountant, RDPAccountant
from . import noise
from .engine import ClippingEngine


def check_arguments(noise_multiplier: float, max_grad_norm: float, expected_batch_size: int) -> None:
    """DP-SGD's parameters, checked wherever an optimizer is made: a NaN, infinite or negative sigma must
    never reach a step (it would step without noise)."""
    for name, value in (("noise_multiplier", noise_multiplier), ("max_grad_norm", max_grad_norm),
                        ("expected_batch_size", expected_batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm}")
    if not (expected_batch_size == int(expected_batch_size) and expected_batch_size > 0):
        # The accountant's rate and the step's divisor must be the same L.
        raise ValueError(f"expected_batch_size must be a whole number > 0, got {expected_batch_size}")


# Elements per noise draw and all-reduce (64 MB in fp32): few kernels and collectives, a bounded transient.
_BUCKET_ELEMENTS = 1 << 24


def _buckets(tensors: list[torch.Tensor], cap: int):
    """Consecutive groups of ``tensors`` of at most ``cap`` elements (a larger tensor alone)."""
    bucket, size = [], 0
    for t in tensors:
        if bucket and size + t.numel() > cap:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


class DPOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer (and is a torch.optim.Optimizer sharing its parameter groups and state, so that
    learning-rate schedulers take it). ``step()`` replaces each parameter's gradient with
    (sum_i c_i g_i + N(0, sigma^2 C^2)) / L and steps the wrapped optimizer.

    For gradient accumulation (a logical batch in several micro-batches) call :meth:`accumulate` after
    each micro-batch's backward pass; ``step()`` accumulates the last one itself. Noise is drawn once,
    in ``step()``. ``last_per_example_norms`` holds the norms of the last logical batch (for logging).

    torch.amp.GradScaler is refused (bf16 autocast needs no loss scale): its scale follows overflows anywhere in
    the batch, so one example would change how the others are scaled, and dropped, in later steps, outside the
    privacy accounting.

    ``distributed=True`` (torch.distributed initialised; do NOT also wrap the model in
    DistributedDataParallel): each rank clips its own examples, rank 0 alone adds the noise to its
    clipped sum, and one all-reduce sums the ranks, so the total carries the noise exactly once.
    ``expected_batch_size`` is then the global one.
    """

    # GradScaler.step hands the step to optimizers that say so, after setting grad_scale and found_inf on them:
    # that is where step() can refuse it with a reason (otherwise GradScaler stops on an assertion of its own).
    _step_supports_amp_scaling = True

    # Optimizer.__init__ is not called: the parameter groups, state and defaults are the wrapped optimizer's
    # (the properties below), and step() is this class's own.
    def __init__(self, optimizer: torch.optim.Optimizer, engine: ClippingEngine, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, sample_rate: float,
                 accountant: RDPAccountant | PLDAccountant | None = None, secure_mode: bool = False,
                 generator: torch.Generator | None = None, distributed: bool = False) -> None:
        check_arguments(noise_multiplier, max_grad_norm, expected_batch_size)
        if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, DPOptimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (not yet private), got {type(optimizer).__name__}")
        self.original_optimizer = optimizer
        self.engine = engine
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.expected_batch_size, self.sample_rate = int(expected_batch_size), float(sample_rate)
        self.accountant = accountant if accountant is not None else RDPAccountant()
        noise.refuse_ignored_generator(secure_mode, generator, "noise")
        self.secure_mode, self.generator = secure_mode, generator
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs torch.distributed to be initialised")
        self.distributed = distributed
        self._sums: dict[int, torch.Tensor] = {}
        self._norms: list[torch.Tensor] = []
        self.last_per_example_norms = torch.zeros(0)
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in engine.params if id(p) not in owned]
        if missing:
            raise ValueError(f"{len(missing)} trainable parameters of the model are not in the optimizer")
        self._clipped = {id(p) for p in engine.params}
        unclipped = [p for group in optimizer.param_groups for p in group["params"]
                     if p.requires_grad and id(p) not in self._clipped]
        if unclipped:
            # Their gradients would be stepped without clipping or noise.
            raise ValueError(f"optimizer holds {len(unclipped)} trainable parameters outside the private model")

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.original_optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.original_optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        # A copy would step copies of the parameters through a detached engine while charging its own accountant.
        raise TypeError("a DP optimizer is bound to its model's clipping engine and cannot be copied or pickled: "
                        "save optimizer.state_dict() (optimizer and accountant) and make_private again to resume")

    # Hooks run around the wrapped optimizer's step, which this step() calls once the gradients are private.
    def register_step_pre_hook(self, hook: Callable) -> Any:
        return self.original_optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable) -> Any:
        return self.original_optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.original_optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.original_optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.original_optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.original_optimizer.register_load_state_dict_post_hook(hook, prepend)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ValueError("parameters cannot join a DP optimizer after make_private: their per-example gradients are "
                         "not captured; make them trainable before make_private")

    def __repr__(self) -> str:
        return (f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, "
                f"expected_batch_size={self.expected_batch_size}, {self.original_optimizer!r})")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self.engine.clear()  # a forward pass still waiting for its backward stays captured (its graph holds it)
        self._sums, self._norms = {}, []

    def _check_unseen_uses(self) -> None:
        """A parameter of a capturing layer that autograd gave a gradient was used outside its module
        (e.g. F.linear(x, layer.weight)): that use is invisible to per-example clipping. A parameter of the
        optimizer outside the engine with a gradient (frozen at make_private, unfrozen since) would be stepped
        with its raw gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in self._clipped:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} that was frozen (or not trainable) at "
                                     "make_private has a gradient: its per-example gradients are not captured, so "
                                     "it cannot be clipped; unfreeze parameters before make_private")
        if self.engine.outside_uses:  # autograd accumulated into a parameter whose module's own uses give it none
            name = self.engine.outside_uses[0]
            raise ValueError(f"parameter {name} received a gradient from outside its module (for example "
                             "F.linear on its weight, or dpkd.fused_linear_distill_loss given a copy, cast or "
                             "view of the weight rather than the parameter itself); DP-SGD cannot clip that use "
                             "per example")

    def accumulate(self) -> torch.Tensor:
        """Clip the micro-batch whose backward pass just ran; returns its per-example norms."""
        self._check_unseen_uses()
        norms = self.engine.flush(self.max_grad_norm, self._sums)
        self._norms.append(norms.detach())  # on the model's device: no host synchronisation
        return norms

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if getattr(self, "found_inf", None) is not None or getattr(self, "grad_scale", None) is not None:
            vars(self).pop("found_inf", None)
            vars(self).pop("grad_scale", None)
            raise ValueError("torch.amp.GradScaler cannot drive DP-SGD: its loss scale follows overflows anywhere in the "
                             "batch, so one example would change how the others are scaled and dropped in later steps, "
                             "outside the privacy accounting; use bf16 autocast, which needs no loss scale")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Also without captured rows (an empty batch's backward delivers none): the flush clears the engine's record
        # of that backward pass, which would otherwise refuse the next forward as one before this step.
        self.accumulate()
        # The micro-batches' sums and norms are consumed here, before anything can raise: a step that fails
        # after this point never re-applies them.
        sums, self._sums = self._sums, {}
        self.last_per_example_norms = torch.cat(self._norms) if self._norms else torch.zeros(0)
        self._norms = []
        # Parameters in groups of one device and accumulation dtype: one noise draw, one all-reduce and a
        # few multi-tensor kernels per group rather than several kernels per parameter.
        groups: dict[tuple, list[torch.nn.Parameter]] = {}
        for p in self.engine.params:
            if p.requires_grad:  # one frozen since make_private is left alone
                groups.setdefault((p.device, torch.float64 if p.dtype == torch.float64 else torch.float32), []).append(p)
        for (device, acc_dtype), params in groups.items():
            # The engine's sums are fresh tensors of its own: noise and scale go in place.
            totals = [torch.zeros(p.shape, dtype=acc_dtype, device=device) if id(p) not in sums
                      else sums[id(p)].to(acc_dtype) for p in params]
            self._add_noise(totals, device, acc_dtype)
            # Divide by the public expected batch size, never the realised one (which would leak it).
            torch._foreach_div_(totals, float(self.expected_batch_size))
            for p, total in zip(params, totals):
                p.grad = total.to(p.dtype)
        self.original_optimizer.step()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return loss

    def _add_noise(self, totals: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
        """N(0, sigma^2 C^2) into every tensor (on rank 0 alone when distributed, then summed over ranks)."""
        std = self.noise_multiplier * self.max_grad_norm
        for bucket in _buckets(totals, _BUCKET_ELEMENTS):
            sizes = [t.numel() for t in bucket]
            if self.distributed:
                flat = torch.cat([t.reshape(-1) for t in bucket])
                if dist.get_rank() == 0 and std > 0:
                    flat.add_(noise.gaussian(flat.shape, std, device=device, dtype=dtype, generator=self.generator,
                                             secure=self.secure_mode))
                dist.all_reduce(flat)
                torch._foreach_copy_(bucket, [part.view_as(t) for t, part in zip(bucket, flat.split(sizes))])
            elif std > 0:
                draw = noise.gaussian((sum(sizes),), std, device=device, dtype=dtype, generator=self.generator,
                                      secure=self.secure_mode)
                torch._foreach_add_(bucket, [part.view_as(t) for t, part in zip(bucket, draw.split(sizes))])

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, the accountant's history and the noise generator's state: a run resumed
        from a seeded generator made afresh would draw again the noise of its first steps, and noise repeated
        across steps is not what the accountant counted. (Without a generator the noise comes from torch's global
        generator: save ``torch.get_rng_state()`` with the checkpoint, or pass one.)"""
        return {"optimizer": self.original_optimizer.state_dict(), "accountant": self.accountant.state_dict(),
                "noise_generator": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("noise_generator")
        if saved is not None and self.generator is None:
            raise ValueError("the checkpoint holds a noise generator's state: give make_private a generator to "
                             "restore it into")
        if saved is None and self.generator is not None and not self.secure_mode:
            warnings.warn("the checkpoint holds no noise generator state: the noise goes on from this generator's "
                          "current state, which repeats the first run's noise if it was seeded alike",
                          RuntimeWarning, stacklevel=2)
        # Checked before anything changes (a torch.load map_location moves the state off the CPU): the generator's
        # state on a probe, the accountant's on a copy; the wrapped optimizer's load is the last that can fail.
        saved = None if saved is None else torch.as_tensor(saved).cpu()
        if saved is not None:
            probe = torch.Generator(device=self.generator.device)
            probe.set_state(saved)
        copy.deepcopy(self.accountant).load_state_dict(state["accountant"])
        self.original_optimizer.load_state_dict(state["optimizer"])
        self.accountant.load_state_dict(state["accountant"])
        if saved is not None:
            self.generator.set_state(saved)
