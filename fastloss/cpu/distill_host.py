"""Host side of the CPU distillation losses: arrays checked and shaped for the
kernels of ``fastloss.cpu.distill``, scratch, launch and reduction.

Takes ``(student, teacher, targets, options)`` with the options already
validated by ``fastloss.ops.distill`` (a ``fastloss.options.DistillOptions``).
The array checks specific to distillation (the teacher, dense or top-k) are
the private functions below; targets, ``out`` and ``grad_output`` go through
``fastloss._validate`` with cross-entropy's messages.
"""

import numpy as np

from .. import _validate as V
from ..options import JSD, REVERSE_KL, safe_div
from . import distill as K
from ._rows import n_row_blocks, task_scratch

_F64 = np.dtype(np.float64)


class DistillPlan:
    """Validated host inputs and derived constants of one distillation call."""

    def __init__(self, student, teacher, targets, opts):
        self.opts = opts
        self.student = V.float_array(student, "student")
        shape = self.student.shape
        V.check_logits_meta(shape, self.student.dtype, "student")
        self.nclass = shape[-1]
        self.rows = int(np.prod(shape[:-1], dtype=np.int64))
        self.topk = isinstance(teacher, tuple)
        if self.topk:
            if opts.kind_code == REVERSE_KL:
                raise ValueError("teacher: reverse_kl needs a dense teacher (against a top-k teacher the "
                                 "student's mass off the k entries makes it infinite); found (indices, logprobs)"
                                 + (" with kind='jsd', beta=1 (reverse KL)" if opts.kind == "jsd" else ""))
            self.indices, self.logprobs = _topk_arrays(teacher, shape)
            tdtype = self.logprobs.dtype
            self.teacher_arrays = (self.indices, self.logprobs)
        else:
            self.teacher = _dense_teacher(teacher, shape)
            tdtype = self.teacher.dtype
            self.teacher_arrays = (self.teacher,)
        self.acc = _F64 if _F64 in (self.student.dtype, tdtype) else np.dtype(np.float32)
        if targets is None:
            self.tgt = np.zeros(self.rows, np.int64)
            self.ignored = None
            self.count = self.rows
        else:
            self.tgt, self.ignored = V.targets_for_kernel(targets, shape, opts.ignore_index)
            self.count = int(self.rows - np.count_nonzero(self.ignored))
        self.hard = targets is not None and opts.hard_weight > 0  # without targets: no hard term
        if self.topk:
            self.idx64 = _check_topk_values(self.indices, self.logprobs, self.nclass, self.ignored, shape)

    def constants(self):
        """The kernels' ``DistillConstants``."""
        a = self.acc.type
        o = self.opts
        return K.DistillConstants(o.kind_code, a(1.0 / o.temperature), a(o.beta), self.hard,
                                  o.temperature == 1.0, a(o.soft_scale / o.temperature), a(o.hard_weight))

    def denominator(self):
        """What the summed loss is divided by: counted tokens (batchmean), times V (mean), or 1."""
        r = self.opts.reduction
        if r == "batchmean":
            return float(self.count)
        if r == "mean":
            return float(self.count) * self.nclass
        return 1.0

    def row_gradients(self, grad_output):
        """Per-row upstream gradient g_i (accumulation type), divided by the
        reduction's denominator; 0 for ignored rows."""
        n = self.rows
        if self.opts.reduction == "none":
            g = V.rows_grad_output(grad_output, self.student.shape[:-1], "student.shape[:-1]")
            g = g.reshape(-1) if np.ndim(g) else np.full(n, g)
        else:
            go = V.scalar_grad_output(grad_output, self.opts.reduction)
            g = np.full(n, safe_div(go, self.denominator()))
        if self.ignored is not None:
            g = np.where(self.ignored, 0.0, g)
        return np.ascontiguousarray(g, dtype=self.acc)

    def scratch(self, grad):
        """Per-task ``DistillScratch`` for this call's kernel."""
        V_ = self.nclass
        ntask = V.num_tasks(self.rows, self.rows * V_)
        sep = self.hard and self.opts.temperature != 1.0
        if self.topk:
            keep_s = grad
            nt = 0
            nk = self.indices.shape[-1]
        else:
            keep_s = grad or self.opts.kind_code == JSD
            nt = V_ if keep_s else 0
            nk = 0
        es = V_ if keep_s else 0
        eh = V_ if (grad and sep) else 0
        return K.DistillScratch(task_scratch(ntask, es, self.acc), task_scratch(ntask, nt, self.acc),
                                task_scratch(ntask, eh, self.acc),
                                task_scratch(ntask, 3 * n_row_blocks(V_), self.acc),
                                task_scratch(ntask, nk, self.acc))

    def run(self, grad, g, out):
        """Run the kernel: (soft, hard) per-row float64 arrays (0 at ignored rows)."""
        n, nclass = self.rows, self.nclass
        soft = np.zeros(n, np.float64)
        hard = np.zeros(n, np.float64)
        if n == 0:
            return soft, hard
        s = V.kernel_view(self.student).reshape(n, nclass)
        scratch = self.scratch(grad)
        with V.kernel_launch(scratch.es.shape[0] if not self.topk else scratch.ex.shape[0]):
            if self.topk:
                kk = self.indices.shape[-1]
                lp = V.kernel_view(self.logprobs).reshape(n, kk)
                K.distill_topk(s, self.idx64.reshape(n, kk), lp, self.tgt, self.constants(), g, out, scratch,
                               grad, soft, hard)
            else:
                t = V.kernel_view(self.teacher).reshape(n, nclass)
                K.distill_dense(s, t, self.tgt, self.constants(), g, out, scratch, grad, soft, hard)
        return soft, hard

    def reduce(self, soft, hard):
        """Per-token losses ``soft_scale S_i + hard_weight H_i`` (a term whose
        weight is 0 is left out), reduced as requested."""
        o = self.opts
        loss = np.zeros(self.rows, np.float64)
        if o.soft_weight > 0:
            loss += o.soft_scale * soft
        if self.hard:
            loss += o.hard_weight * hard
        if self.ignored is not None:
            loss[self.ignored] = 0.0
        if o.reduction == "none":
            return loss.astype(self.acc).reshape(self.student.shape[:-1])
        return safe_div(float(loss.sum()), self.denominator())


def distill(student, teacher, targets, opts):
    """``fastloss.distill`` on host arrays."""
    plan = DistillPlan(student, teacher, targets, opts)
    dummy = np.empty((1, 0), V.kernel_view(plan.student[..., :0]).dtype)
    soft, hard = plan.run(False, np.zeros(plan.rows, plan.acc), dummy)
    return plan.reduce(soft, hard)


def distill_with_grad(student, teacher, targets, opts, grad_output, out, inplace):
    """``fastloss.distill_with_grad`` on host arrays: ``(loss, grad)``.
    ``inplace`` was checked by the caller (a bool, not combined with ``out``)."""
    plan = DistillPlan(student, teacher, targets, opts)
    g = plan.row_gradients(grad_output)
    x = plan.student
    grad, copy_back = V.grad_buffer(student, x, out, inplace, "student", ("teacher", plan.teacher_arrays))
    gk = V.kernel_view(grad).reshape(plan.rows, plan.nclass)
    soft, hard = plan.run(True, g, gk)
    if copy_back:
        x[...] = grad
    if inplace:
        grad = student
    return plan.reduce(soft, hard), grad


# ----------------------------------------------------------------------------- checks


def _dense_teacher(teacher, shape):
    """The dense teacher: a supported float dtype and the student's shape."""
    t = V.float_array(teacher, "teacher")
    if t.shape != shape:
        if t.ndim == len(shape) and t.shape[:-1] == shape[:-1]:
            raise ValueError(f"teacher: vocabulary size {t.shape[-1] if t.ndim else None} differs from the "
                             f"student's {shape[-1]} (shapes {t.shape} and {shape})")
        raise ValueError(f"teacher: expected the student's shape {shape}, found {t.shape}")
    return t


def _topk_arrays(teacher, shape):
    """(indices, logprobs) of a top-k teacher, checked for dtype and shape."""
    if len(teacher) != 2:
        raise ValueError(f"teacher: a top-k teacher is a 2-tuple (indices, logprobs), found a tuple of "
                         f"{len(teacher)} items")
    idx = V.as_array(teacher[0], "teacher indices")
    if idx.dtype.kind not in "iu":
        raise TypeError(f"teacher indices: expected an integer dtype, found {idx.dtype}")
    lp = V.float_array(teacher[1], "teacher logprobs")
    want = tuple(shape[:-1])
    if idx.ndim != len(shape) or idx.shape[:-1] != want or idx.shape[-1] < 1:
        raise ValueError(f"teacher indices: expected shape {want + ('k',)} (student.shape[:-1] + (k,), "
                         f"k >= 1), found {idx.shape}")
    if lp.shape != idx.shape:
        raise ValueError(f"teacher logprobs: expected the shape of teacher indices {idx.shape}, found {lp.shape}")
    return idx, lp


def _position(flat_row, rows_shape):
    return tuple(int(p) for p in np.unravel_index(flat_row, rows_shape)) if len(rows_shape) else ()


def _check_topk_values(idx, lp, nclass, ignored, shape):
    """Indices in [0, V) and distinct, logprobs with a finite entry, in every
    counted row (ignored rows are never read); returns the indices as (n, k)
    int64 (ignored rows zeroed)."""
    rows_shape = tuple(shape[:-1])
    kk = idx.shape[-1]
    flat = idx.reshape(-1, kk)
    counted = np.ones(flat.shape[0], bool) if ignored is None else ~ignored
    bad = ((flat < 0) | (flat >= nclass)) & counted[:, None]
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        row, col = divmod(first, kk)
        where = f"position {_position(row, rows_shape) + (col,)}"
        raise ValueError(f"teacher indices: {int(bad.sum())} value(s) outside [0, {nclass}); first at "
                         f"{where}: {flat.reshape(-1)[first]}")
    i64 = np.where(counted[:, None], flat, 0).astype(np.int64)
    if kk > 1:
        srt = np.sort(i64, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1) & counted
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            r = srt[row]
            value = int(r[1:][r[1:] == r[:-1]][0])
            raise ValueError(f"teacher indices: {int(dup.sum())} row(s) repeat a class index; first at "
                             f"position {_position(row, rows_shape)}: {value}")
    lflat = lp.reshape(-1, kk)
    with np.errstate(invalid="ignore"):
        dead = np.all(np.isneginf(lflat.astype(np.float64)), axis=1) & counted
    if dead.any():
        row = int(np.flatnonzero(dead)[0])
        raise ValueError(f"teacher logprobs: {int(dead.sum())} row(s) have no finite entry (all -inf); first at "
                         f"position {_position(row, rows_shape)}")
    return i64
