"""dpkd: private, token-level knowledge distillation of language models for PyTorch."""

import torch  # noqa: F401  (loads libtorch, which dpkd._C links against)

from . import _ops, accounting, fused_linear, losses, nn, opd, privacy, select, taid, topk
from ._C import with_cuda
from .losses import (
    TokenStats,
    distill_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    token_stats,
    tvd,
)
from .fused_linear import fused_linear_distill_loss
from .taid import TAIDSchedule, taid_loss
from .topk import topk_distill_loss, topk_forward_kl

__all__ = [
    "TAIDSchedule",
    "TokenStats",
    "accounting",
    "distill_loss",
    "forward_kl",
    "fused_linear",
    "fused_linear_distill_loss",
    "generalized_jsd",
    "losses",
    "nn",
    "opd",
    "privacy",
    "reverse_kl",
    "select",
    "skew_kl",
    "skew_reverse_kl",
    "taid",
    "taid_loss",
    "token_stats",
    "topk",
    "topk_distill_loss",
    "topk_forward_kl",
    "tvd",
    "with_cuda",
]
__version__ = "0.1.0"
