"""Host side of the CPU cross-entropy with probability targets: arrays checked
and shaped for the kernels of ``fastloss.cpu.soft_cross_entropy``, scratch,
launch, target check and reduction.

Called by ``fastloss.ops.cross_entropy`` for float targets (the options come
validated as a ``fastloss.options.CrossEntropyOptions``; ``ignore_index`` is
not used). Calls of at most ``config.SERIAL_MAX_ELEMENTS`` logits run the
serial kernels on the calling thread; larger ones the parallel kernels.
"""

import numpy as np

from .. import _validate as V
from .. import config
from . import soft_cross_entropy as K
from .cross_entropy_host import RowReduction


class SoftPlan(RowReduction):
    """Validated host inputs and derived constants of one soft-target call."""

    GRAD_OUTPUT_SHAPE = "logits.shape[:-1]"
    ignored = None  # no row is ignored

    def __init__(self, logits, targets, weight, opts):
        super().__init__(logits, opts)
        shape = self.logits.shape
        q = V.native_array(targets, "targets")
        V.check_soft_targets_meta(q.shape, q.dtype, shape)
        self.targets = q
        self.n = int(np.prod(self.rows_shape, dtype=np.int64))
        self.acc = V.acc_dtype(self.logits.dtype)
        self.mode = opts.mode
        self.tf = opts.transform(self.acc)
        self.weight = V.class_weight(weight, self.nclass, self.acc)
        self.serial = self.logits.size <= config.SERIAL_MAX_ELEMENTS

    def kernel_inputs(self):
        """(x, q, w, constants) as the kernels take them: (n, V) C-contiguous views."""
        n, nclass = self.n, self.nclass
        x = V.kernel_view(self.logits).reshape(n, nclass)
        q = V.kernel_view(self.targets).reshape(n, nclass)
        acc = self.acc.type
        w = self.weight if self.weight is not None else V.empty(self.acc)
        eps = self.opts.label_smoothing
        k = K.SoftConstants(self.weight is not None, acc(1.0 - eps), acc(eps / nclass),
                            acc(self.opts.z_loss))
        return x, q, w, k

    def scratch(self, fused):
        """Per-task scratch; one task on the serial path."""
        ntask = 1 if self.serial else V.num_tasks(self.n, self.n * self.nclass)
        return K.soft_scratch(ntask, self.nclass, self.acc, self.mode, fused)

    def denominators(self):
        """(D_ce, D_z) of the mean: the number of rows for both (PyTorch's rule
        for probability targets: class weights do not enter it), or ``normalizer``."""
        return self.opts.denominators(self.n, float(self.n))

    def check_targets(self, qsum):
        """Raise the contract's ValueError for rows that are not distributions."""
        tol = V.soft_target_tolerance()
        with np.errstate(invalid="ignore"):
            bad = ~(np.abs(qsum.astype(np.float64) - 1.0) <= tol)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            row = self.targets.reshape(self.n, self.nclass)[first]
            if V.is_bfloat16(row.dtype):
                row = row.astype(np.float32)
            raise V.bad_soft_targets_error(int(bad.sum()), self.rows_shape, first, row, tol)

    def launch(self, kernel_serial, kernel_parallel, ntask, *args):
        """Run the serial kernel, or the parallel one over ``ntask`` tasks."""
        if self.serial:
            kernel_serial(*args)
        else:
            with V.kernel_launch(ntask):
                kernel_parallel(*args)


def cross_entropy(logits, targets, weight, opts):
    """``fastloss.cross_entropy`` with probability targets on host arrays."""
    plan = SoftPlan(logits, targets, weight, opts)
    n = plan.n
    loss = np.empty(n, plan.acc)
    lse = np.empty(n, plan.acc)
    qsum = np.empty(n, plan.acc)
    if n:
        x, q, w, k = plan.kernel_inputs()
        scratch = plan.scratch(fused=False)
        plan.launch(K.soft_serial_forward, K.soft_forward, scratch.shifts.shape[0],
                    x, q, w, plan.tf, k, scratch, loss, lse, qsum)
        plan.check_targets(qsum)
    return plan.reduce(loss, lse)


def cross_entropy_with_grad(logits, targets, weight, opts, grad_output, out, inplace):
    """``fastloss.cross_entropy_with_grad`` with probability targets on host
    arrays: ``(loss, grad)``. With ``out=`` or ``inplace=True`` the buffer's
    contents are unspecified when the targets are rejected (checked in the
    kernels' pass)."""
    plan = SoftPlan(logits, targets, weight, opts)
    xh = plan.logits
    n = plan.n
    gce, gz = plan.row_coefficients(grad_output)
    grad, copy_back = V.grad_buffer(logits, xh, out, inplace)
    loss = np.empty(n, plan.acc)
    lse = np.empty(n, plan.acc)
    qsum = np.empty(n, plan.acc)
    if n:
        x, q, w, k = plan.kernel_inputs()
        gk = V.kernel_view(grad).reshape(n, plan.nclass)
        scratch = plan.scratch(fused=True)
        plan.launch(K.soft_serial_fused, K.soft_fused, scratch.shifts.shape[0],
                    x, q, w, plan.tf, k, gce, gz, gk, scratch, loss, lse, qsum)
        plan.check_targets(qsum)
    if copy_back:
        xh[...] = grad
    if inplace:
        grad = logits
    return plan.reduce(loss, lse), grad
