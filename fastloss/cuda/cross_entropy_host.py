"""Host side of the CUDA cross-entropy and logsumexp: the GPU twins of the
plans in ``fastloss.cpu.cross_entropy_host``, called by
``fastloss.ops.cross_entropy`` for GPU logits with the options it validated
(``fastloss.options``); the kernels are in ``fastloss.cuda.cross_entropy``.

* Inputs are numba device arrays, any object with ``__cuda_array_interface__``
  (CuPy, ...) or PyTorch CUDA tensors of any float dtype, bfloat16 included.
  Side inputs (targets, class weights, ``grad_output``) may also be host
  arrays; they are copied to the GPU (small).
* Outputs are GPU arrays: PyTorch tensors (allocated by PyTorch's caching
  allocator, on the tensor's device and current stream) when ``logits`` is a
  tensor, numba device arrays otherwise. Mean and sum give a one-element
  array (shape ``()`` for tensors, ``(1,)`` for numba arrays), float32
  (float64 for float64 data); none gives an array of ``targets.shape``.
* Launch order of a cross-entropy call: ``validate`` (one block), then the
  forward or fused kernel (whose last block to finish merges the mean/sum),
  both queued at once. The mean's denominators stay on the device, where the
  gradient kernel reads them. No call waits for the GPU: ``validate``'s
  numbers are checked asynchronously (``fastloss.cuda.checks``); when they
  flag an error the loss kernels write a NaN loss and nothing else (no
  out-of-range index is ever used, in-place logits are untouched).
  ``logsumexp`` never synchronises either.
* The fused kernel is the resident one (each row kept in shared memory, read
  once) when a row fits in the shared memory a block may have (opting in
  above 48 KiB through the driver), else the streaming one
  (``config.CUDA_FUSED_STRATEGY``; ``fastloss.cuda.launch``).
* Kernels take C-contiguous arrays; strided 2-D logits are staged in a
  contiguous buffer on the device (and the gradient copied back for
  ``inplace``); other strided 1-D views are used as they are. PyTorch inputs
  are made contiguous on the device; other non-contiguous GPU arrays of more
  dimensions raise ``ValueError``.
* GPU class weights are checked (finite, non-negative) in ``validate``.
"""

import numpy as np

from .. import _validate as V
from . import arrays as A
from . import checks, is_device_array, launch
from .host import RowsPlan
from .launch import Gpu, on_input_device

__all__ = ["cross_entropy", "cross_entropy_with_grad", "logsumexp"]


def logit_scalars(opts, acc):
    """The kernels' ``LogitScalars`` for options with ``logit_scale`` and
    ``softcap`` (None: 1), in dtype ``acc``; ``inv`` is ``scale / cap`` rounded
    once."""
    from .cross_entropy import LogitScalars
    a = acc.type
    scale, cap = opts.scale_cap(acc)
    return LogitScalars(a(scale), a(scale / cap), a(cap))


def _ignore_for_kernel(v, tdtype):
    """(ign, has_ign): the kernels compare ``int64(target) == ign``. Matches the
    CPU rule (exact comparison in the targets' dtype): uint64 targets wrap to
    int64 like a wrapped ``ignore_index`` does; a value no target can hold
    ignores nothing."""
    info = np.iinfo(tdtype)
    if not info.min <= v <= info.max:
        return np.int64(0), False
    return np.int64(v - (1 << 64) if v > np.iinfo(np.int64).max else v), True


class CEPlan(RowsPlan):
    """Checked GPU inputs and derived constants of one cross-entropy call
    (the GPU twin of ``fastloss.cpu.cross_entropy_host.CrossEntropyPlan``)."""

    def __init__(self, gpu, logits, targets, weight, opts):
        self.gpu = gpu
        self.opts = opts
        self.logits = logits
        shape, dtype = A.meta(logits)
        V.check_logits_meta(shape, dtype)
        self.shape, self.dtype = shape, dtype
        self.reduction = opts.reduction
        self.nclass = shape[-1]
        self.n = int(np.prod(shape[:-1], dtype=np.int64))
        self.acc = V.acc_dtype(dtype)
        self.tr = logit_scalars(opts, self.acc)
        tshape, tdtype = A.side_meta(targets)
        V.check_targets_meta(tshape, tdtype, shape)
        self.ign, self.has_ign = _ignore_for_kernel(opts.ignore_index, tdtype)
        self.t_u64 = tdtype == np.uint64
        self.targets = targets
        self.rows_shape = tuple(shape[:-1])
        self.weight = weight
        if weight is not None:
            wshape, wdtype = A.side_meta(weight)
            V.check_class_weight_meta(wshape, wdtype, self.nclass)

    def device_inputs(self):
        """Put the inputs on the device: logits (n, V), targets (n,), weights (V,)."""
        gpu = self.gpu
        self.stage_rows(self.logits, "logits")
        t = A.side_array(gpu, self.targets, "targets")
        self.tgt = A.flat(t, (self.n,), "targets")
        if self.weight is None:
            self.w, has_w = gpu.dummy((1,), self.acc), False
        elif is_device_array(self.weight):
            w = A.view(gpu, self.weight, "weight")
            self.w, has_w = A.as_vector(gpu, w, self.acc, self.nclass, "weight"), True
        else:
            wh = V.class_weight(self.weight, self.nclass, self.acc)
            self.w, has_w = A.to_device(gpu, wh)[0], True
        from .cross_entropy import CEScalars
        opts = self.opts
        self.sc = CEScalars(nclass=np.int64(self.nclass), ign=self.ign, has_ign=self.has_ign,
                            has_w=has_w, eps=opts.label_smoothing, zl=opts.z_loss,
                            red=opts.reduction_code)

    def launch_validate(self):
        """Queue ``validate``; returns the device ``stats`` that the loss kernels
        read (they do nothing when it flags an error)."""
        from .cross_entropy import ValidateArgs, validate_kernel
        gpu = self.gpu
        self.stats = gpu.scratch("stats", 11, 0, np.float64)
        norm = self.opts.normalizer if self.opts.normalizer is not None else 0.0
        args = ValidateArgs(tgt=self.tgt, w=self.w, sc=self.sc, norm=norm, stats=self.stats)
        gpu.launch(validate_kernel(gpu.tpb), 1, *args)
        return self.stats

    def check(self):
        """Hand ``validate``'s numbers to the asynchronous checks (see
        ``fastloss.cuda.checks``): raises the contract's error now if this
        call's (or an earlier call's) numbers have landed and flag one; never
        waits unless ``config.CUDA_SYNC_CHECKS``."""
        info = (self.rows_shape, self.nclass, self.opts.ignore_index, self.acc, self.sc.has_w, self.t_u64)
        ring = checks.CHECKS
        ring.poll(ring.submit(self.gpu, self.stats, info))

    def kernels(self, *arrays, tpb=None, per=None):
        """``((forward, fused, lse, fused_resident), per, views)`` for this call
        (``tpb`` threads per block; default gpu.tpb), with ``arrays`` (the
        contiguous logits and gradient destination) as the kernels take them:
        ``(words, elements)`` pairs (see ``arrays.word_views``). Without
        ``arrays``, the kernels for ``per`` elements per word."""
        from .cross_entropy import ce_kernels
        views = None
        if arrays:
            per, views = A.word_views(self.gpu, self.dtype, arrays)
        kernels = ce_kernels(self.acc.name, self.x.kind, self.opts.mode, tpb or self.gpu.tpb, per)
        return kernels, per, views

    def outputs(self, grid):
        """``(loss, out, counter, partial)`` as the loss kernels take them: the
        per-row loss (none), or the one-element loss, the last-block counter
        and per-block partials (mean/sum); the others are placeholders. The
        object handed back is ``self.loss_obj``."""
        gpu = self.gpu
        if self.reduction == "none":
            loss, self.loss_obj = A.empty(gpu, (self.n,), self.acc)
            one = gpu.dummy((1,), self.acc)
            return loss, one, gpu.dummy((1,), np.int32), gpu.dummy((1, 2), np.float64)
        out, self.loss_obj = A.empty(gpu, (1,), self.acc)
        self.partial_all = gpu.scratch("partial", grid, 2, np.float64)
        counter = gpu.scratch("counter", 1, 0, np.int32, zero=True)
        return gpu.dummy((1,), self.acc), out, counter, self.partial_all

    def finish(self):
        """The loss as handed back."""
        if self.reduction == "none":
            return A.reshape(self.gpu, self.loss_obj, self.rows_shape)
        return A.reduced(self.gpu, self.loss_obj)


@on_input_device
def cross_entropy(logits, targets, weight, opts):
    """:func:`fastloss.cross_entropy` for GPU logits (``opts``: a
    ``CrossEntropyOptions``); returns GPU arrays (see the module doc)."""
    from .cross_entropy import ForwardArgs
    gpu = Gpu(logits)
    plan = CEPlan(gpu, logits, targets, weight, opts)
    if plan.n == 0:
        return plan.empty_loss()
    plan.device_inputs()
    (forward, _, _, _), _, ((xw, xe),) = plan.kernels(plan.x2)
    grid = gpu.grid(plan.n)
    loss, out, counter, partial = plan.outputs(grid)
    stats = plan.launch_validate()
    args = ForwardArgs(xw=xw, xe=xe, tgt=plan.tgt, w=plan.w, stats=stats, tr=plan.tr, sc=plan.sc,
                       loss=loss, out=out, counter=counter, partial=partial)
    gpu.launch(forward, grid, *args)
    result = plan.finish()
    plan.check()
    return result


@on_input_device
def cross_entropy_with_grad(logits, targets, weight, opts, grad_output, out, inplace):
    """:func:`fastloss.cross_entropy_with_grad` for GPU logits: loss and gradient in
    one fused kernel; returns ``(loss, grad)``, ``grad`` a new GPU array,
    ``out``, or ``logits`` itself (``inplace``, a bool the caller checked
    against ``out``)."""
    gpu = Gpu(logits)
    plan = CEPlan(gpu, logits, targets, weight, opts)
    up, gvec, out_arr = plan.grad_args(grad_output, out, "targets.shape")
    if plan.n == 0:
        return plan.empty_with_grad(logits, out, inplace)
    plan.device_inputs()
    dest, grad, copy_back = plan.destination(logits, out, out_arr, inplace)
    _launch_fused(plan, dest, up, gvec)
    result = plan.finish()
    plan.copy_back(logits, copy_back)
    plan.check()
    return result, grad


def _launch_fused(plan, dest, up, gvec):
    """Queue ``validate`` and the fused kernel: the resident one (row kept in
    shared memory) where it fits, else the streaming one
    (``config.CUDA_FUSED_STRATEGY``); each has its own block size."""
    from .cross_entropy import FusedArgs
    gpu = plan.gpu
    ftpb = launch.fused_threads_per_block(gpu)
    rtpb = launch.resident_threads_per_block(gpu, ftpb)
    (_, fused, _, _), per, ((xw, xe), (dw, de)) = plan.kernels(plan.x2, dest, tpb=ftpb)
    resident = plan.kernels(tpb=rtpb, per=per)[0][3]
    grid = max(gpu.grid(plan.n, rtpb), gpu.grid(plan.n, ftpb))  # partials for either
    loss, out, counter, partial = plan.outputs(grid)
    stats = plan.launch_validate()
    args = FusedArgs(xw=xw, xe=xe, tgt=plan.tgt, w=plan.w, stats=stats, tr=plan.tr, sc=plan.sc,
                     up=up, gvec=gvec, ow=dw, oe=de, loss=loss, out=out, counter=counter,
                     partial=partial, nslots=np.uint64(0))
    isz = xw.dtype.itemsize
    smem, per_sm = launch.resident_bytes(gpu, resident, args, plan.nclass // per * isz, rtpb)
    if smem:
        kgrid = gpu.grid(plan.n, rtpb, per_sm=per_sm)
        try:
            gpu.launch(resident, kgrid, *_sized(plan, args, kgrid, grid, nslots=smem // isz),
                       tpb=rtpb, smem=smem)
            return
        except Exception as e:  # the launch refused the shared memory: stream from now on
            if gpu.sim:
                raise
            launch.resident_refused(gpu, resident, args, e)
    kgrid = gpu.grid(plan.n, ftpb, row_bytes=plan.nclass * plan.dtype.itemsize)
    gpu.launch(fused, kgrid, *_sized(plan, args, kgrid, grid), tpb=ftpb)


def _sized(plan, args, kgrid, grid, nslots=0):
    """``args`` for a grid of ``kgrid`` blocks (mean/sum: that many partials
    of the ``grid`` allocated) keeping ``nslots`` words of a row in shared memory."""
    if kgrid < grid and plan.reduction != "none":
        args = args._replace(partial=args.partial[:kgrid])
    return args._replace(nslots=np.uint64(nslots))


@on_input_device
def logsumexp(logits, opts):
    """:func:`fastloss.logsumexp` for GPU logits (``opts``: a ``LogsumexpOptions``);
    a GPU array of ``logits.shape[:-1]``."""
    gpu = Gpu(logits)
    shape, dtype = A.meta(logits)
    V.check_logits_meta(shape, dtype)
    acc = V.acc_dtype(dtype)
    tr = logit_scalars(opts, acc)
    nclass = shape[-1]
    n = int(np.prod(shape[:-1], dtype=np.int64))
    out, out_obj = A.empty(gpu, (n,), acc)
    if n:
        from .cross_entropy import LseArgs, ce_kernels
        x = A.view(gpu, logits, "logits", cache=True)
        x2 = A.contiguous2d(gpu, A.flat(x, (n, nclass), "logits"), dtype)
        per, ((xw, xe),) = A.word_views(gpu, dtype, (x2,))
        lse = ce_kernels(acc.name, x.kind, opts.mode, gpu.tpb, per)[2]
        args = LseArgs(xw=xw, xe=xe, nclass=np.int64(nclass), w=gpu.dummy((1,), acc),
                       tr=tr, out=out)
        gpu.launch(lse, gpu.grid(n), *args)
    return A.reshape(gpu, out_obj, tuple(shape[:-1]))
