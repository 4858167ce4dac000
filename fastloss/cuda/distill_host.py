"""Host side of the CUDA distillation loss: the GPU twin of
``fastloss.cpu.distill_host``, called by ``fastloss.ops.distill`` for GPU
student logits with the options it validated (``opts``: attributes ``kind``,
``temperature``, ``beta``, ``scale_by_t2``, ``reduction``, ``ignore_index``,
``soft_weight``, ``hard_weight``); the kernels are in ``fastloss.cuda.distill``.

* Inputs follow ``fastloss.cuda.cross_entropy_host``: numba device arrays,
  ``__cuda_array_interface__`` objects or PyTorch CUDA tensors (bfloat16
  included). The teacher is dense logits of the student's shape (any float
  dtype), or a top-k pair ``(indices, logprobs)`` of shape
  ``student.shape[:-1] + (k,)``. Targets and ``grad_output`` may also be host
  arrays (copied to the GPU).
* Outputs are GPU arrays in the student's framework: for mean, sum and
  batchmean a one-element array, for none an array of ``student.shape[:-1]``,
  in the accumulation dtype (float32; float64 when the student or a teacher
  value array is float64).
* Launch order: the targets' ``validate`` (the cross-entropy kernel, whose
  bad-target errors are raised asynchronously by ``fastloss.cuda.checks``, as
  for cross-entropy), the top-k indices' check, the row kernel, then
  ``finalize`` for mean/sum. A flagged call writes a NaN loss and nothing else.
  A bad top-k teacher in a counted row (an index outside ``[0, V)``, a
  repeated index, logprobs all ``-inf``) is raised asynchronously too: the
  check kernel's numbers (with the first bad index's value and the repeated
  index) join the same queue, no call waits for them (see
  ``fastloss.cuda.checks``; the simulator, or ``config.CUDA_SYNC_CHECKS``,
  raises from the call itself). The messages are the CPU backend's.
* ``hard_weight`` without ``targets`` adds no hard term here, as on the CPU
  (``fastloss.ops.distill`` refuses that combination before either); a
  term of weight 0 is left out of loss and gradient (no ``0 * inf``). A row
  whose upstream coefficient is 0 gets a zero gradient (as the CUDA
  cross-entropy), NaN logits included.
* Kernels take C-contiguous arrays: strided 2-D inputs are staged in
  contiguous buffers on the device (and the gradient copied back for
  ``inplace``).
"""

import math
from typing import NamedTuple

import numpy as np

from .. import _validate as V
from .. import codes
from . import arrays as A
from . import checks
from .host import RowsPlan
from .launch import Gpu, on_input_device

__all__ = ["distill", "distill_with_grad"]

_STATS = 20  # validate's 11 numbers (fastloss.cuda.cross_entropy), then the top-k check's 9


class DistillCheck(NamedTuple):
    """What :func:`distill_check_message` needs besides the numbers: targets or
    not, k (0: a dense teacher), V, the rows' shape, the info of
    ``fastloss.cuda.checks.check_message`` for the targets (None without)
    and whether the top-k indices are uint64."""

    has_tgt: bool
    k: int
    nclass: int
    rows_shape: tuple
    targets: object
    idx_u64: bool


def distill_check_message(h, info):
    """The contract's message for a distillation call's check numbers ``h``
    (see ``fastloss.cuda.distill.topk_check_kernel``), or None: bad targets
    first (the cross-entropy's messages), then a bad top-k teacher (the CPU
    backend's messages)."""
    if info.has_tgt:
        msg = checks.check_message(h[:11], info.targets)
        if msg is not None:
            return msg
    if not info.k:
        return None
    k, rows = info.k, info.rows_shape

    def pos(row):
        return tuple(int(p) for p in np.unravel_index(row, rows)) if rows else ()
    nbad, ndup, ndead = int(h[11]), int(h[13]), int(h[15])
    if nbad:
        row, col = divmod(int(h[12]), k)
        value = (int(h[17]) << 32) | int(h[18])
        if info.idx_u64 and value < 0:
            value += 1 << 64
        return (f"teacher indices: {nbad} value(s) outside [0, {info.nclass}); first at "
                f"position {pos(row) + (col,)}: {value}")
    if ndup:
        return (f"teacher indices: {ndup} row(s) repeat a class index; first at "
                f"position {pos(int(h[14]))}: {int(h[19])}")
    if ndead:
        return (f"teacher logprobs: {ndead} row(s) have no finite entry (all -inf); first at "
                f"position {pos(int(h[16]))}")
    return None


def _teacher_parts(teacher):
    """``(dense, indices, logprobs)``: the dense teacher, or None and the top-k pair."""
    if isinstance(teacher, tuple):
        if len(teacher) != 2:
            raise ValueError(f"teacher: a top-k teacher is a 2-tuple (indices, logprobs), found a tuple of "
                             f"{len(teacher)} items")
        return None, teacher[0], teacher[1]
    return teacher, None, None


class DistillPlan(RowsPlan):
    """Checked GPU inputs and derived constants of one distillation call."""

    def __init__(self, gpu, student, teacher, targets, opts):
        self.gpu = gpu
        self.opts = opts
        self.student = student
        shape, dtype = A.meta(student)
        V.check_logits_meta(shape, dtype, "student")
        self.shape, self.dtype = tuple(shape), dtype
        self.nclass = shape[-1]
        self.n = int(np.prod(shape[:-1], dtype=np.int64))
        self.rows_shape = tuple(shape[:-1])
        dense, idx, lp = _teacher_parts(teacher)
        self.dense, self.idx, self.lp = dense, idx, lp
        if dense is not None:
            tshape, tdtype = A.side_meta(dense)
            V.check_float_dtype(tdtype, "teacher")
            tshape = tuple(tshape)
            if tshape != self.shape:
                if len(tshape) == len(shape) and tshape[:-1] == self.shape[:-1]:
                    raise ValueError(f"teacher: vocabulary size {tshape[-1]} differs from the student's "
                                     f"{shape[-1]} (shapes {tshape} and {self.shape})")
                raise ValueError(f"teacher: expected the student's shape {self.shape}, found {tshape}")
            self.tdtype = tdtype
            self.k = 0
        else:
            ishape, idtype = A.side_meta(idx)
            lshape, ldtype = A.side_meta(lp)
            if getattr(idtype, "kind", "?") not in "iu":
                raise TypeError(f"teacher indices: expected an integer dtype, found {idtype}")
            V.check_float_dtype(ldtype, "teacher logprobs")
            ishape, lshape = tuple(ishape), tuple(lshape)
            if len(ishape) != len(shape) or ishape[:-1] != self.rows_shape or ishape[-1] < 1:
                raise ValueError(f"teacher indices: expected shape {self.rows_shape + ('k',)} "
                                 f"(student.shape[:-1] + (k,), k >= 1), found {ishape}")
            if lshape != ishape:
                raise ValueError(f"teacher logprobs: expected the shape of teacher indices {ishape}, "
                                 f"found {lshape}")
            if opts.kind == "reverse_kl" or (opts.kind == "jsd" and opts.beta == 1):
                raise ValueError("teacher: reverse_kl needs a dense teacher (against a top-k teacher the "
                                 "student's mass off the k entries makes it infinite); found (indices, "
                                 "logprobs)" + (" with kind='jsd', beta=1 (reverse KL)" if opts.kind == "jsd"
                                                else ""))
            self.tdtype = ldtype
            self.k = int(ishape[-1])
        self.idx_u64 = idx is not None and idtype == np.uint64
        self.acc = V.acc_dtype(np.result_type(V.acc_dtype(dtype), V.acc_dtype(self.tdtype)))
        self.targets = targets
        if targets is not None:
            tshape, ttype = A.side_meta(targets)
            V.check_targets_meta(tshape, ttype, shape)
            info = np.iinfo(ttype)
            v = opts.ignore_index
            self.has_ign = info.min <= v <= info.max
            self.ign = np.int64(v - (1 << 64) if v > np.iinfo(np.int64).max else v) if self.has_ign else np.int64(0)
            self.t_u64 = ttype == np.uint64
        self.hard = targets is not None and opts.hard_weight > 0  # without targets: no hard term
        self.reduction = opts.reduction
        # beta 0 and 1 of the jsd are the two KL directions (TRL's convention)
        kind = opts.kind
        if kind == "jsd" and opts.beta == 0:
            kind = "kl"
        elif kind == "jsd" and opts.beta == 1:
            kind = "reverse_kl"
        self.kind = kind

    def scalars(self):
        """The kernels' :class:`fastloss.cuda.distill.DistillScalars`."""
        from .distill import DistillScalars
        o = self.opts
        a = self.acc.type
        T = float(o.temperature)
        red = {"none": codes.NONE, "sum": codes.SUM}.get(self.reduction, codes.MEAN)
        beta = float(o.beta)
        has_tgt = self.targets is not None
        return DistillScalars(
            nclass=np.int64(self.nclass), k=np.int64(max(self.k, 1)),
            ign=self.ign if has_tgt else np.int64(0), has_ign=bool(has_tgt and self.has_ign), has_tgt=has_tgt,
            inv_t=a(1.0 / T), beta=a(beta), soft_w=float(o.soft_weight) * (T * T if o.scale_by_t2 else 1.0),
            hard_w=float(o.hard_weight) if self.hard else 0.0,
            log1mb=math.log1p(-beta) if 0 < beta < 1 else 0.0, red=red,
            count=-1.0 if self.targets is not None else float(self.n),
            den_mult=float(self.nclass) if self.reduction == "mean" else 1.0)

    def device_inputs(self):
        """Put the inputs on the device as the kernels take them: flat,
        contiguous element views."""
        gpu = self.gpu
        n, v = self.n, self.nclass
        self.stage_rows(self.student, "student")
        if self.dense is not None:
            t = A.side_array(gpu, self.dense, "teacher")
            self.tkind = t.kind
            self.te = A.contiguous2d(gpu, A.flat(t, (n, v), "teacher"), t.dtype).reshape(n * v)
            self.tidx = gpu.dummy((1,), np.int64)
        else:
            i = A.side_array(gpu, self.idx, "teacher indices")
            p = A.side_array(gpu, self.lp, "teacher logprobs")
            self.tkind = p.kind
            k = self.k
            self.tidx = A.contiguous2d(gpu, A.flat(i, (n, k), "teacher indices"), i.dtype).reshape(n * k)
            self.te = A.contiguous2d(gpu, A.flat(p, (n, k), "teacher logprobs"), p.dtype).reshape(n * k)
        if self.targets is not None:
            t = A.side_array(gpu, self.targets, "targets")
            self.tgt = A.flat(t, (n,), "targets")
        else:
            self.tgt = gpu.dummy((1,), np.int64)

    def validate(self):
        """Queue the checks of targets and top-k indices; returns the device
        ``stats`` the row kernel reads (a zero array when there is nothing to check)."""
        gpu = self.gpu
        if self.targets is None and self.k == 0:
            return gpu.scratch("distill_nostats", _STATS, 0, np.float64, zero=True)
        stats = gpu.scratch("distill_stats", _STATS, 0, np.float64)
        if self.targets is not None:
            from .cross_entropy import CEScalars, ValidateArgs, validate_kernel
            sc = CEScalars(nclass=np.int64(self.nclass), ign=self.ign, has_ign=self.has_ign,
                           has_w=False, eps=0.0, zl=0.0, red=codes.MEAN)
            args = ValidateArgs(tgt=self.tgt, w=gpu.dummy((1,), self.acc), sc=sc, norm=0.0, stats=stats)
            gpu.launch(validate_kernel(gpu.tpb), 1, *args)
        if self.k:
            from .distill import topk_check_kernel
            gpu.launch(topk_check_kernel(self.tkind, gpu.tpb), 1, self.tidx, self.te, self.tgt,
                       self.scalars(), self.targets is not None, stats)
        self.stats = stats
        return stats

    def check(self):
        """Hand the checks' numbers to the asynchronous queue of
        ``fastloss.cuda.checks`` (as cross-entropy): raises the contract's
        error now if this call's (or an earlier call's) numbers have landed and
        flag one; never waits unless ``config.CUDA_SYNC_CHECKS``. Nothing to
        check (no targets, a dense teacher): nothing queued."""
        if self.targets is None and self.k == 0:
            return
        has_tgt = self.targets is not None
        info = DistillCheck(has_tgt=has_tgt, k=self.k, nclass=self.nclass, rows_shape=self.rows_shape,
                            targets=(self.rows_shape, self.nclass, self.opts.ignore_index, self.acc, False,
                                     self.t_u64) if has_tgt else None,
                            idx_u64=self.idx_u64)
        ring = checks.CHECKS
        ring.poll(ring.submit(self.gpu, self.stats, info, distill_check_message))

    def run(self, up, gvec, dest):
        """Validate, launch the row kernel (and finalize); returns the loss as
        handed back. ``dest``: the flat gradient destination, or None (forward)."""
        from .distill import KIND_CODES, DistillArgs, FinalizeArgs, distill_kernels
        gpu = self.gpu
        n = self.n
        stats = self.validate()
        sc = self.scalars()
        grad = dest is not None
        rows, finalize = distill_kernels(self.acc.name, self.x.kind, self.tkind, KIND_CODES[self.kind],
                                         self.k > 0, self.hard, gpu.tpb, grad)
        grid = gpu.grid(n)
        none = self.reduction == "none"
        if none:
            loss, loss_obj = A.empty(gpu, (n,), self.acc)
            partial = gpu.dummy((1,), np.float64)
        else:
            loss, loss_obj = gpu.dummy((1,), self.acc), None
            partial = gpu.scratch("distill_partial", grid, 0, np.float64)
        scratch = gpu.scratch("distill_topk", grid, max(self.k, 1), self.acc) if self.k and grad \
            else gpu.dummy((1, 1), self.acc)
        oe = dest if grad else gpu.dummy((1,), self.x2.dtype)
        args = DistillArgs(xe=self.x2.reshape(n * self.nclass), te=self.te, tidx=self.tidx,
                           tgt=self.tgt, stats=stats, sc=sc, up=up, gvec=gvec, oe=oe, loss=loss,
                           partial=partial, topk_scratch=scratch)
        gpu.launch(rows, grid, *args)
        if none:
            return A.reshape(gpu, loss_obj, self.rows_shape)
        out, out_obj = A.empty(gpu, (1,), self.acc)
        gpu.launch(finalize, 1, *FinalizeArgs(partial=partial, stats=stats, sc=sc, out=out))
        return A.reduced(gpu, out_obj)


@on_input_device
def distill(student, teacher, targets, opts):
    """:func:`fastloss.distill` for GPU student logits; returns the loss as a GPU
    array (see the module doc)."""
    from ._math import GradScalars
    gpu = Gpu(student)
    plan = DistillPlan(gpu, student, teacher, targets, opts)
    if plan.n == 0:
        return plan.empty_loss()
    plan.device_inputs()
    result = plan.run(GradScalars(codes.G_SCALAR, 1.0), gpu.dummy((1,), np.float64), None)
    plan.check()
    return result


@on_input_device
def distill_with_grad(student, teacher, targets, opts, grad_output, out, inplace):
    """:func:`fastloss.distill_with_grad` for GPU student logits: ``(loss, grad)``,
    ``grad`` (w.r.t. the student) a new GPU array, ``out``, or ``student``
    itself (``inplace``, a bool the caller checked against ``out``)."""
    gpu = Gpu(student)
    plan = DistillPlan(gpu, student, teacher, targets, opts)
    up, gvec, out_arr = plan.grad_args(grad_output, out, "student.shape[:-1]")
    if plan.n == 0:
        return plan.empty_with_grad(student, out, inplace)
    plan.device_inputs()
    teacher = [plan.te] if plan.dense is not None else [plan.te, plan.tidx]
    # neither the destination nor the student (in place) may share memory with
    # the teacher (the CPU backend's messages)
    dest, grad, copy_back = plan.destination(student, out, out_arr, inplace, "student", ("teacher", teacher))
    result = plan.run(up, gvec, dest.reshape(plan.n * plan.nclass))
    plan.copy_back(student, copy_back)
    plan.check()
    return result, grad

