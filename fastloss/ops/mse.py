"""Public mean-squared-error API: ``mse`` and ``mse_with_grad``."""

import numpy as np

from .. import _validate as V
from .. import cuda as _cuda
from ..cpu import mse as K

__all__ = ["mse", "mse_with_grad"]


class _Plan:
    """Validated inputs of one MSE call, with the weight described as
    (wmode, w, inner) for ``fastloss.cpu.mse.mse_kernel``."""

    def __init__(self, pred, target, reduction, weight):
        self.pred = V.float_array(pred, "pred")
        self.target = V.float_array(target, "target")
        if self.pred.shape != self.target.shape:
            raise ValueError(f"target: expected the shape of pred {self.pred.shape}, "
                             f"found {self.target.shape}")
        self.reduction = V.check_reduction(reduction)
        self.acc = V.acc_dtype(np.result_type(V.acc_dtype(self.pred.dtype),
                                              V.acc_dtype(self.target.dtype)))
        self.size = self.pred.size
        self.wmode, self.w, self.inner, self.wsum = V.weight_layout(weight, self.pred.shape, self.acc)
        self.weight = weight

    def broadcast_weight(self):
        """The weight broadcast to pred's shape (a view), 1 without a weight."""
        if self.weight is None:
            return self.acc.type(1)
        return np.broadcast_to(np.asarray(self.weight).astype(self.acc), self.pred.shape)

    def run(self, scale, grad, loss):
        """Run the kernel; returns sum_k w_k d_k^2 as a Python float."""
        if self.size == 0:
            return 0.0
        p = V.kernel_view(self.pred).reshape(-1)
        t = V.kernel_view(self.target).reshape(-1)
        partial = np.empty(V.num_tasks(self.size, self.size), np.float64)
        with V.kernel_launch(partial.size):
            K.mse_kernel(p, t, self.w, self.wmode, self.inner, self.acc.type(scale),
                         grad, loss, partial)
        return float(partial.sum())


def _result(plan, total, loss_elems):
    if plan.reduction == "none":
        return loss_elems.reshape(plan.pred.shape)
    if plan.reduction == "sum":
        return total
    den = plan.wsum
    return total / den if den != 0 else 0.0


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
    if _cuda.is_device_array(pred):
        from ..cuda import api
        return api.mse(pred, target, reduction=reduction, weight=weight)
    plan = _Plan(pred, target, reduction, weight)
    loss = np.empty(plan.size if plan.reduction == "none" else 0, plan.acc)
    total = plan.run(1.0, np.empty(0, plan.acc), loss)
    return _result(plan, total, loss)


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
    loss : float or numpy.ndarray
        As returned by :func:`mse`.
    grad_pred : numpy.ndarray
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
    """
    if _cuda.is_device_array(pred):
        from ..cuda import api
        return api.mse_with_grad(pred, target, reduction=reduction, weight=weight,
                                 grad_output=grad_output, out=out)
    plan = _Plan(pred, target, reduction, weight)
    shape, dtype = plan.pred.shape, plan.pred.dtype
    if out is None:
        grad = np.empty(shape, dtype)
    else:
        grad = V.out_array(out, shape, dtype)
        if np.may_share_memory(out, plan.target) or (
                np.may_share_memory(out, plan.pred) and out is not plan.pred):
            raise ValueError("out: overlaps pred or target")
    if plan.reduction == "none":
        loss = np.empty(plan.size, plan.acc)
        go = 1.0 if grad_output is None else _none_grad_output(grad_output, shape)
        if np.ndim(go) == 0:
            plan.run(go, V.kernel_view(grad).reshape(-1), loss)
        else:
            # Per-element upstream gradient (not the hot path): the kernel gives
            # the loss; the gradient is formed in the accumulation dtype and rounded once.
            plan.run(1.0, np.empty(0, plan.acc), loss)
            d = plan.pred.astype(plan.acc) - plan.target.astype(plan.acc)
            grad[...] = (2 * plan.broadcast_weight() * d * go.astype(plan.acc)).astype(dtype)
        return loss.reshape(shape), grad
    go = 1.0 if grad_output is None else _scalar_grad_output(grad_output, plan.reduction)
    if plan.reduction == "mean":
        den = plan.wsum
        scale = go / den if den != 0 else 0.0
    else:
        scale = go
    total = plan.run(scale, V.kernel_view(grad).reshape(-1), np.empty(0, plan.acc))
    return _result(plan, total, None), grad


def _scalar_grad_output(grad_output, reduction):
    if np.ndim(grad_output) != 0 and np.size(grad_output) != 1:
        raise ValueError(f"grad_output: expected a scalar for reduction={reduction!r}, "
                         f"found shape {np.shape(grad_output)}")
    return V.real_scalar(np.asarray(grad_output).reshape(()), "grad_output")


def _none_grad_output(grad_output, shape):
    if np.ndim(grad_output) == 0:
        return V.real_scalar(grad_output, "grad_output")
    g = np.asarray(grad_output)
    if g.dtype.kind not in "iuf" and g.dtype != V.BFLOAT16:
        raise TypeError(f"grad_output: expected a real array, found dtype {g.dtype}")
    if g.shape != tuple(shape):
        raise ValueError(f"grad_output: expected a scalar or shape {tuple(shape)} "
                         f"(pred.shape) for reduction='none', found {g.shape}")
    return g.astype(np.float64)

