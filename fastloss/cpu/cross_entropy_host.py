"""Host side of the CPU cross-entropy: arrays checked and shaped for the kernels
of ``fastloss.cpu.cross_entropy``, scratch, launch and reduction.

The twin of ``fastloss.cuda.cross_entropy_host``: both take ``(logits, targets,
weight, options)`` with the options already validated by ``fastloss.ops``
(a ``fastloss.options.CrossEntropyOptions``) and never re-check them.
"""

import numpy as np

from .. import _validate as V
from ..codes import PLAIN, SOFTCAP
from ..options import safe_div
from . import cross_entropy as K


class CrossEntropyPlan:
    """Validated host inputs and derived constants of one cross-entropy call."""

    def __init__(self, logits, targets, weight, opts):
        self.opts = opts
        self.logits = V.logits_array(logits)
        shape = self.logits.shape
        self.nclass = shape[-1]
        self.tgt, self.ignored = V.targets_for_kernel(targets, shape, opts.ignore_index)
        self.acc = V.acc_dtype(self.logits.dtype)
        self.mode = opts.mode
        self.tf = opts.transform(self.acc)  # checked against the accumulation dtype's range
        self.weight = V.class_weight(weight, self.nclass, self.acc)
        self.count = int(self.tgt.size - np.count_nonzero(self.ignored))
        if self.weight is None:
            self.wsum = float(self.nclass)
            self.target_wsum = float(self.count)
        else:
            self.wsum = float(self.weight.sum(dtype=np.float64))
            counted = self.tgt[~self.ignored]
            self.target_wsum = float(self.weight[counted].sum(dtype=np.float64))

    def denominators(self):
        """(D_ce, D_z) of the mean (see ``CrossEntropyOptions.denominators``)."""
        return self.opts.denominators(self.count, self.target_wsum)

    def kernel_weight(self):
        """The class weights as the kernels take them (empty without weights)."""
        return self.weight if self.weight is not None else np.empty(0, self.acc)

    def transform(self):
        """The logit transform (``fastloss.options.Transform``) in the accumulation type."""
        return self.tf

    def constants(self):
        """The kernels' per-call scalars (``CEConstants``)."""
        acc = self.acc.type
        return K.CEConstants(self.weight is not None, acc(self.wsum), acc(self.opts.label_smoothing),
                             acc(self.opts.z_loss))

    def scratch(self, rows, fused):
        """Per-task scratch (``CEScratch``) for kernels over ``rows`` rows: the
        z rows when the kernel needs them (fused, or a transform), the tanh rows
        under softcap, the per-block shifts for the fused kernel."""
        ntask = V.num_tasks(rows, rows * self.nclass)
        need_z = fused or self.mode != PLAIN
        need_t = self.mode == SOFTCAP
        return K.CEScratch(np.empty((ntask, self.nclass if need_z else 0), self.acc),
                           np.empty((ntask, self.nclass if need_t else 0), self.acc),
                           np.empty((ntask, K.n_row_blocks(self.nclass) if fused else 0), self.acc))

    def reduce(self, loss_rows, lse_rows):
        """Combine per-row cross-entropy and logsumexp into the requested reduction."""
        zl = self.opts.z_loss
        reduction = self.opts.reduction
        if reduction == "none":
            out = loss_rows
            if zl > 0:
                out = out + self.acc.type(zl) * lse_rows * lse_rows
            return out.reshape(self.logits.shape[:-1])
        ce = float(loss_rows.sum(dtype=np.float64))
        z = float(np.square(lse_rows, dtype=np.float64).sum()) if zl > 0 else 0.0
        if reduction == "sum":
            return ce + zl * z
        d_ce, d_z = self.denominators()
        return safe_div(ce, d_ce) + (safe_div(zl * z, d_z) if zl > 0 else 0.0)

    def row_coefficients(self, grad_output):
        """Per-row upstream coefficients (gce, gz) of the cross-entropy and z-loss
        terms, already divided by the mean's denominators; 0 for ignored rows."""
        n = self.tgt.size
        reduction = self.opts.reduction
        if reduction == "none":
            g = V.rows_grad_output(grad_output, self.logits.shape[:-1], "targets.shape")
            gce = gz = g.reshape(-1) if np.ndim(g) else np.full(n, g)
        else:
            go = V.scalar_grad_output(grad_output, reduction)
            if reduction == "mean":
                d_ce, d_z = self.denominators()
                gce = np.full(n, safe_div(go, d_ce))
                gz = np.full(n, safe_div(go, d_z))
            else:
                gce = gz = np.full(n, go)
        gce = np.where(self.ignored, 0.0, gce).astype(self.acc)
        gz = np.where(self.ignored, 0.0, gz).astype(self.acc)
        return gce, gz


def cross_entropy(logits, targets, weight, opts):
    """``fastloss.cross_entropy`` on host arrays."""
    plan = CrossEntropyPlan(logits, targets, weight, opts)
    n = plan.tgt.size
    loss = np.empty(n, plan.acc)
    lse = np.empty(n, plan.acc)
    if n:
        x = V.kernel_view(plan.logits).reshape(n, plan.nclass)
        scratch = plan.scratch(n, fused=False)
        with V.kernel_launch(scratch.z.shape[0]):
            K.ce_forward(x, plan.tgt, plan.kernel_weight(), plan.transform(), plan.constants(),
                         scratch, loss, lse)
    return plan.reduce(loss, lse)


def cross_entropy_with_grad(logits, targets, weight, opts, grad_output, out, inplace):
    """``fastloss.cross_entropy_with_grad`` on host arrays: ``(loss, grad)``.
    ``inplace`` was checked by the caller (a bool, not combined with ``out``)."""
    plan = CrossEntropyPlan(logits, targets, weight, opts)
    x = plan.logits
    n = plan.tgt.size
    gce, gz = plan.row_coefficients(grad_output)
    grad, copy_back = _grad_buffer(logits, x, out, inplace)
    loss = np.empty(n, plan.acc)
    lse = np.empty(n, plan.acc)
    if n:
        xk = V.kernel_view(x).reshape(n, plan.nclass)
        gk = V.kernel_view(grad).reshape(n, plan.nclass)
        scratch = plan.scratch(n, fused=True)
        with V.kernel_launch(scratch.z.shape[0]):
            K.ce_fused(xk, plan.tgt, plan.kernel_weight(), plan.transform(), plan.constants(),
                       gce, gz, gk, scratch, loss, lse)
    if copy_back:
        x[...] = grad
    if inplace:
        grad = logits  # the caller's own object (an ndarray subclass such as np.memmap included)
    return plan.reduce(loss, lse), grad


def _grad_buffer(original, x, out, inplace):
    """Where the gradient goes: (buffer, copy_back). ``copy_back`` is set when
    ``inplace`` targets a non-contiguous array, which is computed into a fresh
    buffer and copied over the logits afterwards."""
    if inplace:
        if not isinstance(original, np.ndarray):
            raise TypeError(f"logits: inplace=True needs a numpy array, found {type(original).__name__}")
        if x is not original and not np.shares_memory(x, original):
            raise ValueError(f"logits: inplace=True needs a native-byte-order float array, "
                             f"found dtype {original.dtype}")
        if not x.flags.writeable:
            raise ValueError("logits: inplace=True needs a writable array, found a read-only one")
        if x.flags.c_contiguous:
            return x, False
        return np.empty(x.shape, x.dtype), True
    if out is None:
        return np.empty(x.shape, x.dtype), False
    V.out_array(out, x.shape, x.dtype)
    same = out.__array_interface__["data"][0] == x.__array_interface__["data"][0] and x.flags.c_contiguous
    if not same and np.may_share_memory(out, x):
        raise V.overlap_error("ce")
    return out, False


def logsumexp(logits, opts):
    """``fastloss.logsumexp`` on host arrays (``opts``: ``LogsumexpOptions``)."""
    x = V.logits_array(logits)
    acc = V.acc_dtype(x.dtype)
    tf = opts.transform(acc)
    nclass = x.shape[-1]
    n = x.size // nclass
    lse = np.empty(n, acc)
    if n:
        xk = V.kernel_view(x).reshape(n, nclass)
        ntask = V.num_tasks(n, x.size)
        mode = opts.mode
        scratch = K.CEScratch(np.empty((ntask, nclass if mode != PLAIN else 0), acc),
                              np.empty((ntask, nclass if mode == SOFTCAP else 0), acc),
                              np.empty((ntask, 0), acc))
        with V.kernel_launch(ntask):
            K.lse_forward(xk, tf, scratch, lse)
    return lse.reshape(x.shape[:-1])
