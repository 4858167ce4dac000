"""Host side of the CPU cross-entropy: arrays checked and shaped for the kernels
of ``fastloss.cpu.cross_entropy``, scratch, launch and reduction.

The twin of ``fastloss.cuda.cross_entropy_host``: both take ``(logits, targets,
weight, options)`` with the options already validated by ``fastloss.ops``
(a ``fastloss.options.CrossEntropyOptions``) and never re-check them.
"""

import numpy as np

from .. import _validate as V
from .. import config
from ..codes import PLAIN, SOFTCAP
from ..options import safe_div
from . import cross_entropy as K


class RowReduction:
    """The reduction of a cross-entropy call's per-row losses and the per-row
    upstream coefficients of its gradient, shared by the plans of class-index
    and probability targets. A plan provides ``opts``
    (``CrossEntropyOptions``), ``acc``, ``n`` rows of shape ``rows_shape``,
    ``ignored`` (a mask of the rows, or None: no row is ignored),
    ``denominators()`` and ``GRAD_OUTPUT_SHAPE`` (how a message names the shape
    a "none" ``grad_output`` must have)."""

    def __init__(self, logits, opts):
        """The call's logits (checked) and options, and the shapes they give."""
        self.opts = opts
        self.logits = V.logits_array(logits)
        self.nclass = self.logits.shape[-1]
        self.rows_shape = self.logits.shape[:-1]

    def reduce(self, loss_rows, lse_rows):
        """Combine per-row cross-entropy and logsumexp into the requested reduction."""
        zl = self.opts.z_loss
        reduction = self.opts.reduction
        if reduction == "none":
            out = loss_rows
            if zl > 0:
                out = out + self.acc.type(zl) * lse_rows * lse_rows
            return out.reshape(self.rows_shape)
        ce = float(loss_rows.sum(dtype=np.float64))
        z = float(np.square(lse_rows, dtype=np.float64).sum()) if zl > 0 else 0.0
        if reduction == "sum":
            return ce + zl * z
        d_ce, d_z = self.denominators()
        return safe_div(ce, d_ce) + (safe_div(zl * z, d_z) if zl > 0 else 0.0)

    def row_coefficients(self, grad_output):
        """Per-row upstream coefficients (gce, gz) of the cross-entropy and z-loss
        terms, already divided by the mean's denominators; 0 for ignored rows."""
        n = self.n
        reduction = self.opts.reduction
        if reduction == "none":
            g = V.rows_grad_output(grad_output, self.rows_shape, self.GRAD_OUTPUT_SHAPE)
            gce = gz = g.reshape(-1) if np.ndim(g) else np.full(n, g)
        else:
            go = V.scalar_grad_output(grad_output, reduction)
            if reduction == "mean":
                d_ce, d_z = self.denominators()
                gce = np.full(n, safe_div(go, d_ce))
                gz = np.full(n, safe_div(go, d_z))
            else:
                gce = gz = np.full(n, go)
        if self.ignored is not None:
            gce = np.where(self.ignored, 0.0, gce)
            gz = np.where(self.ignored, 0.0, gz)
        return gce.astype(self.acc), gz.astype(self.acc)


class CrossEntropyPlan(RowReduction):
    """Validated host inputs and derived constants of one cross-entropy call."""

    GRAD_OUTPUT_SHAPE = "targets.shape"

    def __init__(self, logits, targets, weight, opts):
        super().__init__(logits, opts)
        shape = self.logits.shape
        self.tgt, self.ignored = V.targets_for_kernel(targets, shape, opts.ignore_index)
        self.n = self.tgt.size
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
        return K.CEScratch(K.task_scratch(ntask, self.nclass if need_z else 0, self.acc),
                           K.task_scratch(ntask, self.nclass if need_t else 0, self.acc),
                           K.task_scratch(ntask, K.n_row_blocks(self.nclass) if fused else 0, self.acc))


def gradient_blocks(ntask, grad, x, given):
    """The fused kernels' ``gblocks`` argument: per-task gradient blocks of
    ``grad``'s (kernel view) dtype when the gradient should go to memory in
    streaming stores, else (ntask, 0).

    Streaming paid (docs/performance.md, "Streaming stores") only for a
    ``given`` buffer (``out=``) of 4- or 8-byte floats that is large (at least
    ``config.STREAM_STORE_MIN_BYTES``: it will not be read back from the
    caches) and is not ``x`` (an in-place row was just read, so its lines are
    in the cache already). A fresh array's cost is its page faults, which
    streaming does not save, and the half-precision kernels are bound by
    arithmetic, which the extra copy through the block adds to."""
    stream = (K.HAS_STREAM_STORES and given and grad.itemsize >= 4
              and grad.nbytes >= config.STREAM_STORE_MIN_BYTES and not np.may_share_memory(grad, x))
    return K.task_scratch(ntask, K.ROW_BLOCK if stream else 0, grad.dtype)


def cross_entropy(logits, targets, weight, opts):
    """``fastloss.cross_entropy`` on host arrays."""
    small = _serial_inputs(logits, targets, opts)
    if small is not None:
        return _serial(small, logits, targets, weight, opts, 0, 0.0, _NO_ROWS, None)
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
    small = _serial_inputs(logits, targets, opts)
    if small is not None:
        grad, _ = V.grad_buffer(logits, logits, out, inplace)  # C-contiguous, logits' dtype
        gmode, go, gvec = _serial_grad_output(grad_output, opts, logits.shape[:-1])
        loss = _serial(small, logits, targets, weight, opts, gmode, go, gvec,
                       V.kernel_view_fn(grad.dtype)(grad).reshape(small[0].shape))
        return loss, grad
    plan = CrossEntropyPlan(logits, targets, weight, opts)
    x = plan.logits
    n = plan.tgt.size
    gce, gz = plan.row_coefficients(grad_output)
    grad, copy_back = V.grad_buffer(logits, x, out, inplace)
    loss = np.empty(n, plan.acc)
    lse = np.empty(n, plan.acc)
    if n:
        xk = V.kernel_view(x).reshape(n, plan.nclass)
        gk = V.kernel_view(grad).reshape(n, plan.nclass)
        scratch = plan.scratch(n, fused=True)
        ntask = scratch.z.shape[0]
        with V.kernel_launch(ntask):
            K.ce_fused(xk, plan.tgt, plan.kernel_weight(), plan.transform(), plan.constants(),
                       gce, gz, gk, scratch, gradient_blocks(ntask, gk, xk, out is not None), loss, lse)
    if copy_back:
        x[...] = grad
    if inplace:
        grad = logits  # the caller's own object (an ndarray subclass such as np.memmap included)
    return plan.reduce(loss, lse), grad


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
        scratch = K.CEScratch(K.task_scratch(ntask, nclass if mode != PLAIN else 0, acc),
                              K.task_scratch(ntask, nclass if mode == SOFTCAP else 0, acc),
                              np.empty((ntask, 0), acc))
        with V.kernel_launch(ntask):
            K.lse_forward(xk, tf, scratch, lse)
    return lse.reshape(x.shape[:-1])


# The serial path (``K.ce_serial_forward`` / ``K.ce_serial_fused``): small inputs of the common kinds in one
# kernel call on the calling thread; everything else takes the plans above.

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_INT64_DTYPE = np.dtype(np.int64)
_NO_ROWS = np.empty(0, np.float64)
_INT64 = (-(1 << 63), 1 << 63)
#: Kernel scalars per (options, accumulation dtype): (mode, scale, cap, eps, zl, norm).
_SCALARS = {}


def _serial_inputs(logits, targets, opts):
    """``(x, tgt, acc)`` for the serial kernel when this call can take it: plain
    C-contiguous writable logits of a supported float dtype, at most
    ``config.SERIAL_MAX_ELEMENTS`` of them, integer targets of the right shape
    (int64 as they are, others converted); else None. Only cheap
    metadata is read for the common case. The choice never depends on the
    thread count, so one call gives the same bits on any number of threads."""
    if type(logits) is not np.ndarray or type(targets) is not np.ndarray:
        return None
    view = V.kernel_view_fn(logits.dtype)
    if (view is None or not logits.flags.c_contiguous or not logits.flags.writeable
            or logits.ndim == 0 or logits.size > config.SERIAL_MAX_ELEMENTS
            or targets.shape != logits.shape[:-1]):
        return None
    nclass = logits.shape[-1]
    if nclass == 0 or not _INT64[0] <= opts.ignore_index < _INT64[1]:
        return None
    if targets.dtype != _INT64_DTYPE or not targets.flags.c_contiguous:
        # Other integer targets as int64 (a copy of at most a few thousand values,
        # and one kernel specialisation for all); uint64 only when no value wraps.
        kind = targets.dtype.kind
        if kind not in "iu" or (targets.dtype == np.uint64 and targets.size
                                and targets.max() >= np.uint64(1 << 63)):
            return None
        targets = targets.astype(np.int64)
    x = view(logits)
    if logits.ndim != 2:
        x = x.reshape(-1, nclass)
        targets = targets.reshape(-1)
    return x, targets, _F64 if logits.dtype == _F64 else _F32


def _kernel_scalars(opts, acc):
    key = (opts, acc)
    got = _SCALARS.get(key)
    if got is None:
        tf = opts.transform(acc)
        a = acc.type
        got = (tf.mode, tf.scale, tf.cap, a(opts.label_smoothing), a(opts.z_loss),
               0.0 if opts.normalizer is None else opts.normalizer)
        if len(_SCALARS) > 256:
            _SCALARS.clear()
        _SCALARS[key] = got
    return got


def _serial_grad_output(grad_output, opts, rows_shape):
    """(gmode, go, gvec) of ``K.ce_serial_fused`` for the upstream gradient."""
    reduction = opts.reduction
    if reduction == "none":
        g = V.rows_grad_output(grad_output, rows_shape, "targets.shape")
        if type(g) is float:
            return 1, g, _NO_ROWS
        return 2, 0.0, g.reshape(-1)
    go = V.scalar_grad_output(grad_output, reduction)
    return (3 if reduction == "mean" else 1), go, _NO_ROWS


def _serial(small, logits, targets, weight, opts, gmode, go, gvec, out):
    """Run a serial kernel (forward for ``gmode`` 0, else fused into ``out``) and
    reduce; raises the plans' errors for bad targets."""
    x, tgt, acc = small
    nclass = x.shape[1]
    mode, scale, cap, eps, zl, norm = _kernel_scalars(opts, acc)
    w = V.class_weight(weight, nclass, acc)
    if w is None:
        w, has_w, wsum = V.empty(acc), False, acc.type(nclass)
    else:
        has_w, wsum = True, acc.type(w.sum(dtype=np.float64))
    none = opts.reduction == "none"
    n = x.shape[0]
    loss = np.empty(n, acc)
    lse = np.empty(n, acc)
    tr = np.empty(nclass, acc) if mode == SOFTCAP else V.empty(acc)
    if gmode:
        nbad, first, ce, zz, count, twsum = K.ce_serial_fused(
            x, tgt, opts.ignore_index, w, has_w, wsum, mode, scale, cap, eps, zl, none,
            norm, gmode, go, gvec, np.empty(n, acc), np.empty(n, acc), out,
            np.empty(nclass, acc), tr, np.empty(K.n_row_blocks(nclass), acc), loss, lse)
    else:
        er = np.empty(nclass, acc) if mode != PLAIN else V.empty(acc)
        nbad, first, ce, zz, count, twsum = K.ce_serial_forward(
            x, tgt, opts.ignore_index, w, has_w, wsum, mode, scale, cap, eps, zl, none, er, tr, loss, lse)
    if nbad:
        raise V.bad_targets_error(nbad, nclass, opts.ignore_index, targets.shape, first,
                                  targets.reshape(-1)[first])
    if none:
        return loss.reshape(logits.shape[:-1])
    zl = opts.z_loss
    if opts.reduction == "sum":
        return ce + (zl * zz if zl > 0 else 0.0)
    d_ce, d_z = opts.denominators(count, twsum)
    return safe_div(ce, d_ce) + (safe_div(zl * zz, d_z) if zl > 0 else 0.0)

