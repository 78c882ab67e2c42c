"""dpkd: private, token-level knowledge distillation of language models for PyTorch."""

import torch  # noqa: F401  (loads libtorch, which dpkd._C links against)

from . import accounting
from ._C import with_cuda

__all__ = ["accounting", "with_cuda"]
__version__ = "0.1.0"
