"""16-bit matmuls with fp32 accumulation and an fp32 result (cuBLAS, through ``out_dtype``) where the device and
this torch have them; elsewhere the factors are widened first. Either way no product is rounded below fp32, and
on a GPU the 16-bit factors keep the tensor cores' 16-bit rate (fp32 matmuls run at a tenth of it)."""

from __future__ import annotations

import contextlib
import functools

import torch

HALF = (torch.bfloat16, torch.float16)


@functools.cache
def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` x ``dtype`` -> fp32 ``mm``, ``bmm`` and in-place ``addmm`` run on ``device``."""
    if device.type != "cuda" or dtype not in HALF:
        return False
    try:
        x = torch.ones(2, 2, dtype=dtype, device=device)
        acc = torch.mm(x, x, out_dtype=torch.float32)
        torch.addmm(acc, x, x, out_dtype=torch.float32, out=acc)
        batched = torch.bmm(x[None], x[None].transpose(1, 2), out_dtype=torch.float32)  # as the Grams call it
        return acc.dtype == batched.dtype == torch.float32 and bool((acc == 4).all()) and bool((batched == 2).all())
    except (RuntimeError, TypeError):
        return False


def no_autocast(device_types) -> contextlib.ExitStack:
    """Autocast off for these device types (those that have it), for computations that must multiply the factors
    they are given: DP-SGD's norms and clipped sums."""
    stack = contextlib.ExitStack()
    for device_type in set(device_types):
        if torch.amp.is_autocast_available(device_type):  # not 'meta'
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` now, or None where it is off."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_as(device_type: str, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device_type`` (None: off): to recompute under the state a forward pass ran under."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else no_autocast([device_type])


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` (2-D or batched 3-D) in fp32 (float64 if either is), from 16-bit factors without widening them
    where ``supported``."""
    if x.dtype == y.dtype and supported(x.device, x.dtype):
        return (torch.bmm if x.dim() == 3 else torch.mm)(x, y, out_dtype=torch.float32)
    dt = accumulation_dtype(x, y)
    return torch.matmul(x.to(dt), y.to(dt))
