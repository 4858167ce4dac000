"""Named results of the fused loss-and-gradient functions.

Each unpacks like a plain tuple (``loss, grad = ...``) and names its fields.
"""

from typing import NamedTuple


class CrossEntropyResult(NamedTuple):
    """Loss and gradient of :func:`fastloss.cross_entropy_with_grad`."""

    loss: object
    """Python float for "mean"/"sum" (a one-element GPU array on the GPU); an
    array of ``targets.shape`` for "none"."""
    grad: object
    """``d(grad_output * loss)/d(logits)``: logits' shape and dtype."""


class MSEResult(NamedTuple):
    """Loss and gradient of :func:`fastloss.mse_with_grad`."""

    loss: object
    """Python float for "mean"/"sum" (a one-element GPU array on the GPU); an
    array of ``pred.shape`` for "none"."""
    grad: object
    """``d(grad_output * loss)/d(pred)``: pred's shape and dtype."""


class DistillResult(NamedTuple):
    """Loss and gradient of :func:`fastloss.distill_with_grad`."""

    loss: object
    """Python float for "batchmean"/"mean"/"sum"; an array of ``student.shape[:-1]`` for "none"."""
    grad: object
    """``d(grad_output * loss)/d(student)``: student's shape and dtype."""
