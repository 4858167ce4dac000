"""fastloss for PyTorch: the fused losses as autograd-aware functions and modules.

``pip install "fastloss[torch]"``; ``import fastloss`` never imports PyTorch,
``import fastloss.torch`` does (and registers the custom ops).

* functions with ``torch.nn.functional``'s names and signatures plus
  fastloss's options: :func:`cross_entropy` (class indices or
  probabilities), :func:`mse_loss`, :func:`linear_cross_entropy`, and
  :func:`distill` (``fastloss.torch.functional``);
* modules with ``torch.nn``'s constructor arguments:
  :class:`CrossEntropyLoss`, :class:`MSELoss`, :class:`LinearCrossEntropyLoss`,
  and :class:`DistillLoss` (``fastloss.torch.modules``);
* the custom ops ``torch.ops.fastloss.*`` that ``torch.compile`` traces
  (``fastloss.torch.library``);
* :func:`release_buffers`: frees the gradient buffers kept for reuse
  (``fastloss.config.TORCH_GRAD_CACHE_BYTES``).

Layers: ``functional`` (checks, canonical shapes) → ``autograd`` (eager) or
``library`` (custom ops, under ``torch.compile``) → ``backend`` (tensors to
the numpy API's views, or to the CUDA layer) → ``fastloss.ops``.
Guide: ``docs/torch.md``.
"""

try:
    import torch as _torch
except ImportError as e:  # pragma: no cover - the tests run with torch
    raise ImportError("fastloss.torch needs PyTorch: pip install 'fastloss[torch]'") from e

from . import library  # noqa: F401  (registers torch.ops.fastloss.*)
from .backend import release_buffers
from .functional import cross_entropy, distill, linear_cross_entropy, mse_loss
from .modules import CrossEntropyLoss, DistillLoss, LinearCrossEntropyLoss, MSELoss

__all__ = ["cross_entropy", "mse_loss", "linear_cross_entropy", "distill", "CrossEntropyLoss", "MSELoss",
           "LinearCrossEntropyLoss", "DistillLoss", "release_buffers"]

del _torch
