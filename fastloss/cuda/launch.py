"""Launching the CUDA kernels: the GPU side of one call (:class:`Gpu`: stream,
device, threads per block), grid sizing, the launch itself, per-thread scratch
buffers and placeholder arguments, and the shared memory of the resident
fused cross-entropy kernel (opting in above 48 KiB through the driver).

The tunables are read at call time from ``fastloss.config`` (``CUDA_*``).
"""

import functools
import sys
import threading

import numpy as np

from .. import config
from . import arrays, is_torch_tensor, require_gpu

__all__ = ["Gpu", "fused_threads_per_block", "on_input_device", "resident_bytes",
           "resident_refused", "resident_threads_per_block", "threads_per_block"]

_SIM_GRID = 3  # blocks per grid in the simulator, where every block is a batch of Python threads


# --- threads per block -------------------------------------------------------------------

def _check_tpb(name, tpb, none_ok):
    if isinstance(tpb, bool) or not isinstance(tpb, (int, np.integer)) or not 1 <= tpb <= 1024:
        what = "None or an integer" if none_ok else "an integer"
        raise ValueError(f"fastloss.config.{name}: expected {what} in [1, 1024], found {tpb!r}")
    return int(tpb)


def threads_per_block():
    """``config.CUDA_THREADS_PER_BLOCK``, checked."""
    return _check_tpb("CUDA_THREADS_PER_BLOCK", config.CUDA_THREADS_PER_BLOCK, False)


def fused_threads_per_block(gpu):
    """Threads per block of the fused cross-entropy kernel (config; None: gpu.tpb)."""
    tpb = config.CUDA_FUSED_THREADS_PER_BLOCK
    if tpb is None:
        return gpu.tpb
    return _check_tpb("CUDA_FUSED_THREADS_PER_BLOCK", tpb, True)


def resident_threads_per_block(gpu, ftpb):
    """Threads per block of the resident fused kernel (config; None: 1024 on a
    GPU, ``ftpb`` in the simulator)."""
    tpb = config.CUDA_RESIDENT_THREADS_PER_BLOCK
    if tpb is None:
        return ftpb if gpu.sim else 1024
    return _check_tpb("CUDA_RESIDENT_THREADS_PER_BLOCK", tpb, True)


# --- the GPU side of a call ---------------------------------------------------------------

class Gpu:
    """The GPU side of one call: ``cuda`` (numba.cuda), ``sim``, ``tpb``,
    ``torch`` (the module when the first argument is a tensor, else None),
    ``device``, ``stream``; launches kernels, sizes grids, and hands out
    scratch buffers and placeholders."""

    def __init__(self, like):
        require_gpu()
        from numba import cuda

        from . import _math
        self.cuda = cuda
        self.sim = _math.SIMULATOR
        self.tpb = threads_per_block()
        self.torch = sys.modules["torch"] if is_torch_tensor(like) else None
        if self.torch is not None:
            # on_input_device made the tensor's device current: numba uses its
            # primary context, and we launch on PyTorch's current stream.
            self.device = like.device
            ptr = self.torch.cuda.current_stream(self.device).cuda_stream
            self.stream = _external_stream(cuda, self.device, ptr) if ptr else cuda.default_stream()
            self.key = str(self.device)
            self.stream_key = ptr
        else:
            self.device = None
            self.stream = 0 if self.sim else cuda.default_stream()
            self.key = "numba"
            self.stream_key = 0

    def launch(self, kernel, grid, *args, tpb=None, smem=0):
        """``kernel[grid, tpb, stream, smem](*args)`` (``tpb`` default: ``self.tpb``)."""
        kernel[grid, tpb or self.tpb, self.stream, smem](*args)

    def grid(self, work_blocks, tpb=None, row_bytes=0, per_sm=None):
        """Blocks for ``work_blocks`` independent units of block-sized work, of
        ``tpb`` threads (default: ``self.tpb``). With ``row_bytes`` (the fused
        kernel, which reads each row twice) the blocks are also capped so that
        the rows in flight fit in ``config.CUDA_FUSED_L2_BYTES``; ``per_sm``:
        blocks that fit on an SM (default: by threads). At most
        ``config.CUDA_GRID_LIMIT`` when set."""
        limit = config.CUDA_GRID_LIMIT
        if limit is None:
            if self.sim:
                limit = _SIM_GRID
            else:
                sms = _sm_count(self.cuda)
                tpb = tpb or self.tpb
                per_sm = per_sm or config.CUDA_BLOCKS_PER_SM or max(1, 2048 // tpb)
                limit = sms * max(1, int(per_sm))
                l2 = config.CUDA_FUSED_L2_BYTES
                if row_bytes and l2:
                    limit = min(limit, max(sms, int(l2) // int(row_bytes)))
        return max(1, min(int(work_blocks), int(limit)))

    def scratch(self, name, rows, cols, dtype, zero=False):
        """A (rows, cols) kernel array (cols 0: 1-D) of this call's internal
        scratch, reused by the next calls of the same Python thread on the same
        device and stream (stream order makes that safe: a later call's kernels
        run after this one's are done with it); grown when too small; zeroed
        when made if ``zero`` (the kernels leave it zeroed after use)."""
        key = (self.key, self.stream_key, threading.get_ident(), name, np.dtype(dtype).str, cols)
        buf = SCRATCH.get(key)
        if buf is None or buf[0].shape[0] < rows:
            if len(SCRATCH) > arrays.MAX_CACHED:
                SCRATCH.clear()
            shape = (max(rows, 1), cols) if cols else (max(rows, 1),)
            if zero:
                buf = arrays.to_device(self, np.zeros(shape, dtype))
            else:
                buf = arrays.empty(self, shape, dtype)
            SCRATCH[key] = buf
        dev = buf[0]
        return dev if dev.shape[0] == rows else dev[:rows]

    def dummy(self, shape, dtype):
        """A small placeholder array for a kernel argument that this call never
        touches (cached: no allocation per call)."""
        key = (self.key, shape, np.dtype(dtype).str)
        d = _DUMMIES.get(key)
        if d is None:
            d = _DUMMIES[key] = arrays.empty(self, shape, dtype)[0]
        return d


#: Scratch buffers by (device, stream, Python thread, name, dtype, columns):
#: (kernel view, object). Tests replace it to look inside.
SCRATCH = {}
_DUMMIES = {}
_STREAMS = {}
_SM_COUNT = {}


def _external_stream(cuda, device, ptr):
    """numba's handle on PyTorch's current stream (cached per device and stream)."""
    key = (str(device), ptr)
    st = _STREAMS.get(key)
    if st is None:
        if len(_STREAMS) > arrays.MAX_CACHED:
            _STREAMS.clear()
        st = _STREAMS[key] = cuda.external_stream(ptr)
    return st


def _sm_count(cuda):
    """Multiprocessors of the current device (cached per device)."""
    dev = cuda.current_context().device
    sms = _SM_COUNT.get(dev.id)
    if sms is None:
        sms = _SM_COUNT[dev.id] = dev.MULTIPROCESSOR_COUNT
    return sms


def on_input_device(fn):
    """Run ``fn`` with the device of its first argument current, when that is a
    PyTorch tensor on another GPU than the current one."""
    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        if is_torch_tensor(first) and first.device.type == "cuda" and first.device.index is not None:
            torch = sys.modules["torch"]
            if first.device.index != torch.cuda.current_device():
                with torch.cuda.device(first.device):
                    return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)
    return wrapper


# --- the resident fused kernel's shared memory ---------------------------------------

#: Why the resident kernel was last turned down on a GPU (for benchmarks/gpu_check.py).
RESIDENT_NOTE = None

#: The dynamic shared memory each compiled kernel may use, by kernel, argument
#: types and device: (allowed, static, per SM). Tests replace it.
SMEM_ALLOWED = {}


def resident_bytes(gpu, kernel, args, need, tpb):
    """``(bytes, blocks per SM)``: the dynamic shared memory to launch the
    resident fused kernel with, for rows of ``need`` bytes of words (all of
    them, or the prefix that fits), and how many such blocks fit on an SM;
    ``(0, None)`` to run the streaming kernel (``config.CUDA_FUSED_STRATEGY``,
    ``CUDA_RESIDENT_MIN_FRACTION``, ``CUDA_RESIDENT_MAX_BYTES``; see
    ``fastloss.cuda.cross_entropy``). ``args``: the kernel's arguments, the
    logits' words first."""
    strategy = config.CUDA_FUSED_STRATEGY
    if strategy not in ("auto", "resident", "stream"):
        raise ValueError("fastloss.config.CUDA_FUSED_STRATEGY: expected 'auto', 'resident' or "
                         f"'stream', found {strategy!r}")
    if strategy == "stream" or need <= 0:
        return 0, None
    word = args[0].dtype.itemsize
    if gpu.sim:
        allowed, static, per_sm_bytes = need, 0, 0
    else:
        allowed, static, per_sm_bytes = _smem_allowed(gpu, kernel, args)
    cap = config.CUDA_RESIDENT_MAX_BYTES
    if cap is not None:
        allowed = min(allowed, int(cap))
    smem = min(need, allowed) // word * word
    if smem <= 0 or (strategy == "auto" and smem < config.CUDA_RESIDENT_MIN_FRACTION * need):
        return 0, None
    if gpu.sim:
        return smem, None
    by_smem = per_sm_bytes // (smem + static + 1024)  # 1 KiB reserved per block
    return smem, max(1, min(2048 // tpb, by_smem))


def _fast_key(kernel, dev, args):
    """The cheap key of ``SMEM_ALLOWED`` (typing every argument costs tens of
    microseconds): the kernel fixes every argument type but the arrays'
    dtypes and layouts. Should it miss a difference, the new overload's launch
    is refused and the call streams (see :func:`resident_refused`)."""
    return (id(kernel), dev.id) + tuple(
        (a.dtype.str, a.is_c_contiguous()) for a in args if hasattr(a, "is_c_contiguous"))


def resident_refused(gpu, kernel, args, error):
    """A resident launch failed (the driver refused its shared memory): record
    why and allow this kernel no more than the default 48 KiB from now on."""
    global RESIDENT_NOTE
    RESIDENT_NOTE = f"resident launch failed, streaming instead: {type(error).__name__}: {error}"
    dev = gpu.cuda.current_context().device
    key = (id(kernel), tuple(kernel.typeof_pyval(a) for a in args), dev.id)
    fast = _fast_key(kernel, dev, args)
    allowed, static, per_sm = SMEM_ALLOWED.get(key, (0, 0, 0))
    SMEM_ALLOWED[key] = SMEM_ALLOWED[fast] = min(allowed, 48 * 1024 - static), static, per_sm


def _smem_allowed(gpu, kernel, args):
    """``(allowed, static, per SM)``: the dynamic shared memory this compiled
    kernel may use on the current device, after opting in above the default
    48 KiB (a driver attribute numba does not set itself; 48 KiB less its
    static memory if opting in fails), its static shared memory, and the
    shared memory of an SM."""
    global RESIDENT_NOTE
    dev = gpu.cuda.current_context().device
    fast = _fast_key(kernel, dev, args)
    hit = SMEM_ALLOWED.get(fast)
    if hit is not None:
        return hit
    sig = tuple(kernel.typeof_pyval(a) for a in args)
    key = (id(kernel), sig, dev.id)
    hit = SMEM_ALLOWED.get(key)
    if hit is not None:
        SMEM_ALLOWED[fast] = hit
        return hit
    allowed, static, per_sm = -1, 0, 0  # if numba's internals differ: no resident kernel
    try:
        # numba-cuda internals (0.2x-0.30): the compiled kernel's driver function.
        cufunc = kernel.compile(sig)._codelibrary.get_cufunc()
        static = int(cufunc.attrs.shared)
        per_sm = int(dev.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)
        allowed = 48 * 1024 - static
        from numba.cuda.cudadrv.driver import binding, driver
        optin = int(dev.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN) - static
        if optin > allowed:
            attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            if hasattr(cufunc, "kernel"):  # a CUkernel handle (cuda.core)
                driver.cuKernelSetAttribute(attr, optin, cufunc.handle, dev.id)
            else:  # older numba-cuda: a CUfunction handle
                driver.cuFuncSetAttribute(cufunc.handle, attr, optin)
            allowed = optin
    except Exception as e:  # stay within what was established before the failure
        RESIDENT_NOTE = f"shared-memory opt-in failed: {type(e).__name__}: {e}"
    SMEM_ALLOWED[key] = SMEM_ALLOWED[fast] = allowed, static, per_sm
    return allowed, static, per_sm
