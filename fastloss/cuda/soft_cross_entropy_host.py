"""Host side of the CUDA cross-entropy with probability targets: the GPU twin
of ``fastloss.cpu.soft_cross_entropy_host``, called by
``fastloss.ops.cross_entropy`` for GPU logits with float targets; the kernels
are in ``fastloss.cuda.soft_cross_entropy``.

* Inputs as for class-index targets (``fastloss.cuda.cross_entropy_host``):
  numba device arrays, ``__cuda_array_interface__`` objects or PyTorch CUDA
  tensors; targets and class weights may also be host arrays (copied). The
  targets may have another float dtype than the logits.
* Outputs are GPU arrays of the caller's framework: mean and sum a
  one-element array (float32, float64 for float64 logits), none an array of
  ``logits.shape[:-1]``.
* Launches: the row kernel (forward or fused), then ``finish`` (one block:
  the mean/sum and the target and class-weight checks). No call waits for
  the GPU: ``finish``'s numbers join the asynchronous checks of every op
  (``fastloss.cuda.checks``), and the contract's ``ValueError`` is raised by
  the first fastloss GPU call that finds them landed (the same call in the
  simulator, or on a GPU with ``config.CUDA_SYNC_CHECKS``), or by
  ``fastloss.cuda.synchronize``.
  A flagged call's mean/sum is NaN; its gradient (and ``out=`` /
  ``inplace`` buffer) is unspecified.
"""

import numpy as np

from .. import _validate as V
from . import arrays as A
from . import checks, is_device_array
from .cross_entropy_host import logit_scalars
from .host import RowsPlan
from .launch import Gpu, on_input_device

__all__ = ["cross_entropy", "cross_entropy_with_grad"]


def soft_check_message(h, info):
    """The contract's message for ``finish``'s numbers ``h`` (bad target rows,
    bad class weights), or None. ``info``: ``(rows shape, V, accumulation
    dtype, target-sum tolerance)``."""
    rows_shape, nclass, acc, tol = info
    nbad = int(h[0])
    if nbad:
        first = int(h[1])
        row = np.zeros(nclass)
        fj = int(h[2])
        if fj < nclass:
            row[fj] = h[3]  # the first negative or non-finite entry
        else:
            row[0] = h[4]  # only the sum is wrong: a row with that sum words it
        return str(V.bad_soft_targets_error(nbad, rows_shape, first, row, tol))
    if h[5]:
        return str(V.nonfinite_weight_error())
    if h[6] < 0:
        return str(V.negative_weight_error(acc.type(h[6])))
    return None


class SoftPlan(RowsPlan):
    """Checked GPU inputs of one soft-target call."""

    def __init__(self, gpu, logits, targets, weight, opts):
        self.gpu = gpu
        self.opts = opts
        shape, dtype = A.meta(logits)
        V.check_logits_meta(shape, dtype)
        tshape, tdtype = A.side_meta(targets)
        V.check_soft_targets_meta(tshape, tdtype, shape)
        self.logits, self.targets, self.weight = logits, targets, weight
        self.shape, self.dtype = shape, dtype
        self.rows_shape = tuple(shape[:-1])
        self.nclass = shape[-1]
        self.n = int(np.prod(self.rows_shape, dtype=np.int64))
        self.acc = V.acc_dtype(dtype)
        self.tr = logit_scalars(opts, self.acc)
        self.reduction = opts.reduction
        if weight is not None:
            wshape, wdtype = A.side_meta(weight)
            V.check_class_weight_meta(wshape, wdtype, self.nclass)

    def device_inputs(self):
        """Logits and targets as contiguous (n, V) kernel arrays, class weights (V,)."""
        from .soft_cross_entropy import SoftScalars
        gpu, n, nclass = self.gpu, self.n, self.nclass
        self.stage_rows(self.logits, "logits")
        q = A.side_array(gpu, self.targets, "targets")
        self.qkind = q.kind
        self.q2 = A.contiguous2d(gpu, A.flat(q, (n, nclass), "targets"), q.dtype)
        if self.weight is None:
            self.w, has_w = gpu.dummy((1,), self.acc), False
        elif is_device_array(self.weight):
            w = A.view(gpu, self.weight, "weight")
            self.w, has_w = A.as_vector(gpu, w, self.acc, nclass, "weight"), True
        else:
            wh = V.class_weight(self.weight, nclass, self.acc)
            self.w, has_w = A.to_device(gpu, wh)[0], True
        opts = self.opts
        norm = opts.normalizer
        eps = opts.label_smoothing
        self.sc = SoftScalars(nclass=np.int64(nclass), has_w=has_w, keep=1.0 - eps, spread=eps / nclass,
                              zl=opts.z_loss, red=opts.reduction_code,
                              den=float(norm) if norm is not None else float(n))

    def run(self, fused, up, gvec, dest):
        """Queue the row kernel and ``finish``; returns the loss as handed back."""
        from ._math import GradScalars
        from .soft_cross_entropy import STATS, FinishArgs, RowsArgs, finish_kernel, soft_kernels
        gpu, n = self.gpu, self.n
        acc = self.acc
        loss, loss_obj = A.empty(gpu, (n,), acc)
        lse = gpu.scratch("soft_lse", n, 0, acc)
        qsum = gpu.scratch("soft_qsum", n, 0, acc)
        forward, fused_k = soft_kernels(acc.name, self.x.kind, self.qkind, self.opts.mode, gpu.tpb)
        xf = self.x2.reshape(n * self.nclass)
        qf = self.q2.reshape(n * self.nclass)
        if fused:
            og = dest.reshape(n * self.nclass)
        else:
            og = gpu.dummy((1,), np.float32)
            up, gvec = GradScalars(0, 1.0), gpu.dummy((1,), np.float64)
        args = RowsArgs(x=xf, q=qf, w=self.w, tr=self.tr, sc=self.sc, up=up, gvec=gvec, og=og,
                        loss=loss, lse=lse, qsum=qsum)
        gpu.launch(fused_k if fused else forward, gpu.grid(n), *args)
        stats = gpu.scratch("soft_stats", STATS, 0, np.float64)
        if self.reduction == "none":
            out, out_obj = gpu.dummy((1,), acc), None
        else:
            out, out_obj = A.empty(gpu, (1,), acc)
        tol = float(V.soft_target_tolerance())
        fargs = FinishArgs(loss=loss, lse=lse, qsum=qsum, q=qf, w=self.w, sc=self.sc, tol=tol,
                           out=out, stats=stats)
        gpu.launch(finish_kernel(self.qkind, gpu.tpb), 1, *fargs)
        call = checks.CHECKS.submit(gpu, stats, (self.rows_shape, self.nclass, acc, tol), soft_check_message)
        if self.reduction == "none":
            result = A.reshape(gpu, loss_obj, self.rows_shape)
        else:
            result = A.reduced(gpu, out_obj)
        return result, call


@on_input_device
def cross_entropy(logits, targets, weight, opts):
    """:func:`fastloss.cross_entropy` with probability targets for GPU logits."""
    gpu = Gpu(logits)
    plan = SoftPlan(gpu, logits, targets, weight, opts)
    checks.CHECKS.poll()
    if plan.n == 0:
        return plan.empty_loss()
    plan.device_inputs()
    result, call = plan.run(False, None, None, None)
    checks.CHECKS.poll(call)
    return result


@on_input_device
def cross_entropy_with_grad(logits, targets, weight, opts, grad_output, out, inplace):
    """:func:`fastloss.cross_entropy_with_grad` with probability targets for GPU
    logits: ``(loss, grad)``, ``grad`` a new GPU array, ``out``, or ``logits``
    itself (``inplace``)."""
    gpu = Gpu(logits)
    plan = SoftPlan(gpu, logits, targets, weight, opts)
    up, gvec, out_arr = plan.grad_args(grad_output, out, "logits.shape[:-1]")
    checks.CHECKS.poll()
    if plan.n == 0:
        return plan.empty_with_grad(logits, out, inplace)
    plan.device_inputs()
    dest, grad, copy_back = plan.destination(logits, out, out_arr, inplace)
    result, call = plan.run(True, up, gvec, dest)
    plan.copy_back(logits, copy_back)
    checks.CHECKS.poll(call)
    return result, grad

