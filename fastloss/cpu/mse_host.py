"""Host side of the CPU mean squared error: arrays checked and shaped for the
kernel of ``fastloss.cpu.mse``, launch and reduction.

The twin of ``fastloss.cuda.mse_host``: both take ``(pred, target, weight,
options)`` with the options already validated by ``fastloss.ops`` (a
``fastloss.options.MSEOptions``).
"""

import numpy as np

from .. import _validate as V
from .. import codes, config
from ..options import safe_div
from . import mse as K


class MSEPlan:
    """Validated host inputs of one MSE call, with the weight described as
    (wmode, w, inner) for ``fastloss.cpu.mse.mse_kernel`` (``fastloss.codes.W_*``)."""

    def __init__(self, pred, target, weight, opts):
        self.pred = V.native_array(pred, "pred")
        self.target = V.native_array(target, "target")
        V.check_pred_target_meta(self.pred.shape, self.pred.dtype, self.target.shape, self.target.dtype)
        self.reduction = opts.reduction
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
            K.mse_kernel(p, t, K.WeightLayout(self.wmode, self.w, self.inner), self.acc.type(scale),
                         grad, loss, partial)
        return float(partial.sum())

    def result(self, total, loss_elems):
        """The loss as handed back: per element, the sum, or the weighted mean."""
        if self.reduction == "none":
            return loss_elems.reshape(self.pred.shape)
        if self.reduction == "sum":
            return total
        return safe_div(total, self.wsum)


def mse(pred, target, weight, opts):
    """``fastloss.mse`` on host arrays."""
    small = _serial_inputs(pred, target)
    if small is not None:
        p, t, acc = small
        wl = _serial_weight(weight, pred.shape, p.size, acc)
        if opts.reduction == "none":
            loss = np.empty(p.size, acc)
            _run_serial(small, wl, 1.0, V.empty(acc), loss)
            return loss.reshape(pred.shape)
        total = _run_serial(small, wl, 1.0, V.empty(acc), V.empty(acc))
        return total if opts.reduction == "sum" else safe_div(total, wl[3])
    plan = MSEPlan(pred, target, weight, opts)
    loss = np.empty(plan.size if plan.reduction == "none" else 0, plan.acc)
    total = plan.run(1.0, np.empty(0, plan.acc), loss)
    return plan.result(total, loss)


def mse_with_grad(pred, target, weight, opts, grad_output, out):
    """``fastloss.mse_with_grad`` on host arrays: ``(loss, grad)``."""
    small = _serial_inputs(pred, target)
    if small is not None and opts.reduction != "none":
        p, t, acc = small
        grad = _grad_buffer(pred, target, out)
        go = V.scalar_grad_output(grad_output, opts.reduction)
        # The mean's scale needs the weight sum first (known without the data).
        wl = _serial_weight(weight, pred.shape, p.size, acc)
        mean = opts.reduction == "mean"
        total = _run_serial(small, wl, safe_div(go, wl[3]) if mean else go,
                            V.kernel_view_fn(grad.dtype)(grad).reshape(-1), V.empty(acc))
        return (safe_div(total, wl[3]) if mean else total), grad
    plan = MSEPlan(pred, target, weight, opts)
    shape, dtype = plan.pred.shape, plan.pred.dtype
    grad = _grad_buffer(plan.pred, plan.target, out)
    if plan.reduction == "none":
        loss = np.empty(plan.size, plan.acc)
        go = V.rows_grad_output(grad_output, shape, "pred.shape")
        if np.ndim(go) == 0:
            plan.run(go, V.kernel_view(grad).reshape(-1), loss)
        else:
            # Per-element upstream gradient (not the hot path): the kernel gives
            # the loss; the gradient is formed in the accumulation dtype and rounded once.
            plan.run(1.0, np.empty(0, plan.acc), loss)
            d = plan.pred.astype(plan.acc) - plan.target.astype(plan.acc)
            grad[...] = (2 * plan.broadcast_weight() * d * go.astype(plan.acc)).astype(dtype)
        return loss.reshape(shape), grad
    go = V.scalar_grad_output(grad_output, plan.reduction)
    scale = safe_div(go, plan.wsum) if plan.reduction == "mean" else go
    total = plan.run(scale, V.kernel_view(grad).reshape(-1), np.empty(0, plan.acc))
    return plan.result(total, None), grad


# The serial path (``K.mse_serial``) for small inputs of the common kinds.

def _serial_inputs(pred, target):
    """``(p, t, acc)`` (flat kernel views) for the serial kernel, or None: plain
    C-contiguous writable numpy arrays of one shape and supported float dtypes,
    at most ``config.MSE_SERIAL_MAX_ELEMENTS`` elements."""
    if type(pred) is not np.ndarray or type(target) is not np.ndarray:
        return None
    pv = V.kernel_view_fn(pred.dtype)
    tv = V.kernel_view_fn(target.dtype)
    if (pv is None or tv is None or pred.shape != target.shape
            or pred.size > config.MSE_SERIAL_MAX_ELEMENTS
            or not (pred.flags.c_contiguous and target.flags.c_contiguous
                    and pred.flags.writeable and target.flags.writeable)):
        return None
    acc = V.acc_dtype(pred.dtype) if pred.dtype == target.dtype else \
        V.acc_dtype(np.result_type(V.acc_dtype(pred.dtype), V.acc_dtype(target.dtype)))
    return pv(pred).reshape(-1), tv(target).reshape(-1), acc


def _serial_weight(weight, shape, size, acc):
    """``V.weight_layout`` (wmode, w, inner, wsum), without numpy work when there is no weight."""
    if weight is None:
        return codes.W_NONE, V.empty(acc), 1, float(size)
    return V.weight_layout(weight, shape, acc)


def _run_serial(small, wl, scale, grad, loss):
    """``K.mse_serial`` on ``(p, t, acc)`` with weight layout ``wl``: sum of w d^2."""
    p, t, acc = small
    wmode, w, inner, _ = wl
    return K.mse_serial(p, t, wmode, w, inner, acc.type(scale), grad, loss)


def _grad_buffer(pred, target, out):
    """Where the gradient goes (both paths): a new array, or ``out`` checked
    (shape, dtype, writable, C-contiguous, not overlapping the inputs unless
    it is ``pred`` itself)."""
    if out is None:
        return np.empty(pred.shape, pred.dtype)
    V.out_array(out, pred.shape, pred.dtype)
    if np.may_share_memory(out, target) or (np.may_share_memory(out, pred) and out is not pred):
        raise V.overlap_error("mse")
    return out
