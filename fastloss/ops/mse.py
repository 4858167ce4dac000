"""Public mean-squared-error API: ``mse`` and ``mse_with_grad``.

Each function validates its options once (``fastloss.options``) and hands
``(arrays, options)`` to the backend of ``pred``: ``fastloss.cpu.mse_host``,
or ``fastloss.cuda.mse_host`` for GPU arrays (imported on first use).
"""

from ..options import MSEOptions
from ..results import MSEResult
from ._dispatch import backend_picker

__all__ = ["mse", "mse_with_grad"]

_backend = backend_picker("mse_host")


def mse(pred, target, *, reduction="mean", weight=None):
    """Mean squared error, optionally weighted.

    Parameters
    ----------
    pred, target : array_like
        Same shape; float16, bfloat16, float32 or float64. Not modified.
    reduction : {"mean", "sum", "none"}, default "mean"
    weight : array_like, optional
        Non-negative, finite, broadcastable to ``pred.shape``.

    Returns
    -------
    float or numpy.ndarray
        "mean": ``sum(w d**2) / sum(w)`` (``d = pred - target``; 0.0 when the
        denominator is 0, e.g. an empty array); "sum": ``sum(w d**2)``; "none":
        ``w d**2`` of ``pred.shape`` (float32, float64 for float64 inputs).

    Raises
    ------
    TypeError
        Unsupported dtype of ``pred``, ``target`` or ``weight``.
    ValueError
        Shape mismatch, non-broadcastable or negative ``weight``, bad ``reduction``.

    Notes
    -----
    Equals ``torch.nn.functional.mse_loss(pred, target, reduction=..., weight=...)``
    (PyTorch needs ``weight`` of the full shape; fastloss also takes any
    broadcastable shape without materialising it). Sums accumulate in float64.

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> fastloss.mse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 0.0, 0.0]))
    4.333333333333333
    """
    opts = MSEOptions.check(reduction=reduction)
    return _backend(pred).mse(pred, target, weight, opts)


def mse_with_grad(pred, target, *, reduction="mean", weight=None, grad_output=None, out=None):
    """Mean squared error and its gradient with respect to ``pred``, in one pass.

    Parameters
    ----------
    pred, target, reduction, weight
        As in :func:`mse`.
    grad_output : float or array_like, optional
        Upstream gradient: a scalar for "mean"/"sum" (default 1.0); a scalar or
        an array of ``pred.shape`` for "none".
    out : numpy.ndarray, optional
        Writable C-contiguous array of ``pred.shape`` and ``pred.dtype`` that
        receives the gradient (no allocation).

    Returns
    -------
    MSEResult
        A named tuple ``(loss, grad)`` (unpacks as ``loss, grad_pred = ...``):

        loss : float or numpy.ndarray
            As returned by :func:`mse`.
        grad : numpy.ndarray
            ``2 w (pred - target) * grad_output`` (divided by ``sum(w)`` for
            "mean"), of pred's shape and dtype.

    Raises
    ------
    TypeError, ValueError
        As :func:`mse`, plus a bad ``grad_output`` or ``out``.

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> loss, g = fastloss.mse_with_grad(np.array([1.0, 2.0]), np.array([0.0, 0.0]))
    >>> loss, g
    (2.5, array([1., 2.]))
    >>> fastloss.mse_with_grad(np.array([1.0, 2.0]), np.array([0.0, 0.0])).loss
    2.5
    """
    opts = MSEOptions.check(reduction=reduction)
    loss, grad = _backend(pred).mse_with_grad(pred, target, weight, opts, grad_output, out)
    return MSEResult(loss, grad)
