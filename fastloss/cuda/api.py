"""Device-array API: the public functions of ``fastloss.ops`` for GPU inputs.

Same signatures, defaults, option checks (the helpers of ``fastloss._validate``,
so the same messages) and semantics as the CPU functions, with the GPU rules
of the contract:

* Inputs are numba device arrays, any object with ``__cuda_array_interface__``
  (CuPy, ...) or PyTorch CUDA tensors of any float dtype, bfloat16 included.
  Side inputs (targets, class weights, ``grad_output``) may also be host
  arrays; they are copied to the GPU (small).
* Outputs are GPU arrays: PyTorch tensors (allocated by PyTorch's caching
  allocator, on the tensor's device and current stream) when ``logits``/``pred``
  is a tensor, numba device arrays otherwise. Mean and sum give a one-element
  array (shape ``()`` for tensors, ``(1,)`` for numba arrays), float32 (float64
  for float64 data); none gives an array of ``targets.shape``.
* Launch order of a cross-entropy call: ``validate`` (one block), then the
  forward or fused kernel (whose last block to finish merges the mean/sum),
  both queued at once. The mean's denominators stay on the device, where the
  gradient kernel reads them. No call waits for the GPU: ``validate``'s eleven numbers (bad targets,
  bad class weights) go to pinned host memory by an asynchronous copy, and
  :class:`_Checks` raises the contract's ``ValueError`` once they have landed
  (from this call or a later one, or from :func:`synchronize`). When they flag
  an error the loss kernels write a NaN loss and nothing else (no out-of-range
  index is ever used, in-place logits are untouched).
  ``logsumexp`` and ``mse`` never synchronise either.
* The fused kernel is the resident one (each row kept in shared memory, read
  once) when a row fits in the shared memory a block may have (opting in
  above 48 KiB through the driver), else the streaming one
  (``config.CUDA_FUSED_STRATEGY``); see ``fastloss.cuda.cross_entropy``.
* Kernels take C-contiguous arrays; strided 2-D logits are staged in a
  contiguous buffer on the device (and the gradient copied back for
  ``inplace``); other strided 1-D views are used as they are. PyTorch inputs
  are made contiguous on the device; other non-contiguous GPU arrays of more
  dimensions raise ``ValueError``.
* GPU class weights of cross-entropy are checked (finite, non-negative) in
  ``validate``. MSE weights given as GPU arrays are not checked (that would
  cost a synchronisation; host weights are) and, unless they are PyTorch
  tensors (broadcast on the device), must have ``pred``'s shape.
"""

import functools
import sys
import threading
import weakref

import numpy as np

from .. import _validate as V
from .. import config
from . import is_device_array, is_torch_tensor, require_gpu

__all__ = ["cross_entropy", "cross_entropy_with_grad", "logsumexp", "mse", "mse_with_grad"]

#: Cap on the number of blocks of the row and element kernels; None: about
#: one full wave of resident blocks (SMs x 2048 / threads per block). Tests
#: lower it so the grid-stride loops run several rounds.
GRID_LIMIT = None

_SIM_GRID = 3  # in the simulator every block is a batch of Python threads

#: Read and write rows as uint64 words where possible (see
#: ``fastloss.cuda.cross_entropy``); tests switch it off to cover both paths.
WIDE_ACCESS = True

NATIVE, F16, BF16 = 0, 1, 2  # storage kinds (fastloss.cuda._math)


def _threads_per_block():
    tpb = config.CUDA_THREADS_PER_BLOCK
    if isinstance(tpb, bool) or not isinstance(tpb, (int, np.integer)) or not 1 <= tpb <= 1024:
        raise ValueError("fastloss.config.CUDA_THREADS_PER_BLOCK: expected an integer in "
                         f"[1, 1024], found {tpb!r}")
    return int(tpb)


def _fused_threads_per_block(gpu):
    """Threads per block of the fused cross-entropy kernel (config; None: gpu.tpb)."""
    tpb = config.CUDA_FUSED_THREADS_PER_BLOCK
    if tpb is None:
        return gpu.tpb
    if isinstance(tpb, bool) or not isinstance(tpb, (int, np.integer)) or not 1 <= tpb <= 1024:
        raise ValueError("fastloss.config.CUDA_FUSED_THREADS_PER_BLOCK: expected None or an "
                         f"integer in [1, 1024], found {tpb!r}")
    return int(tpb)


def _resident_threads_per_block(gpu, ftpb):
    """Threads per block of the resident fused kernel (config; None: 1024 on a
    GPU, ``ftpb`` in the simulator)."""
    tpb = config.CUDA_RESIDENT_THREADS_PER_BLOCK
    if tpb is None:
        return ftpb if gpu.sim else 1024
    if isinstance(tpb, bool) or not isinstance(tpb, (int, np.integer)) or not 1 <= tpb <= 1024:
        raise ValueError("fastloss.config.CUDA_RESIDENT_THREADS_PER_BLOCK: expected None or an "
                         f"integer in [1, 1024], found {tpb!r}")
    return int(tpb)


def _kind(dtype):
    if dtype == np.float16:
        return F16
    if dtype == V.BFLOAT16:
        return BF16
    return NATIVE


class _Arr:
    """A GPU array as the kernels see it: ``dev`` (numba device array; half
    precision as uint16 bits), ``dtype`` (the logical numpy dtype), ``kind``,
    ``shape`` and ``obj`` (the user-facing object: tensor or numba array)."""

    __slots__ = ("dev", "dtype", "kind", "shape", "obj")

    def __init__(self, dev, dtype, shape, obj):
        self.dev = dev
        self.dtype = dtype
        self.kind = _kind(dtype)
        self.shape = tuple(shape)
        self.obj = obj


class _Gpu:
    """The GPU side of one call: numba.cuda, stream, device, threads per block,
    and how arrays are viewed, allocated and handed back."""

    def __init__(self, like):
        require_gpu()
        from numba import cuda

        from . import _math
        self.cuda = cuda
        self.sim = _math.SIMULATOR
        self.tpb = _threads_per_block()
        self.torch = sys.modules["torch"] if is_torch_tensor(like) else None
        if self.torch is not None:
            # _on_input_device made the tensor's device current: numba uses its
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

    # -- viewing ------------------------------------------------------------
    def meta(self, obj):
        """(shape, numpy dtype or None) of a GPU array without touching its data."""
        if is_torch_tensor(obj):
            return tuple(obj.shape), _torch_to_numpy_dtype(obj.dtype)
        if getattr(obj, "__cuda_ndarray__", False):
            return tuple(obj.shape), np.dtype(obj.dtype)
        desc = obj.__cuda_array_interface__
        return tuple(desc["shape"]), np.dtype(desc["typestr"])

    def view(self, obj, name, cache=False):
        """An :class:`_Arr` for a GPU array (a torch tensor is first made contiguous).

        ``cache``: reuse the numba array made for the same tensor by an earlier
        call (see :func:`_cached_view`). Only for a caller-owned input that the
        call holds until it returns (the logits): the cached array does not own
        the tensor, so it must not outlive the call's reference to it."""
        shape, dtype = self.meta(obj)
        if is_torch_tensor(obj):
            if self.device is not None and obj.device != self.device:
                raise ValueError(f"{name}: expected a tensor on {self.device} (like the first "
                                 f"argument), found one on {obj.device}")
            t = obj.contiguous()
            if cache:
                dev = _cached_view(t, shape, dtype)
                if dev is not None:
                    return _Arr(dev, dtype, shape, t)
            if dtype in (np.dtype(np.float16), V.BFLOAT16):
                desc = dict(t.view(self.torch.int16).__cuda_array_interface__)
                desc["typestr"] = "<u2"
            else:
                desc = dict(t.__cuda_array_interface__)
            desc.pop("stream", None)  # we launch on the tensor's current stream
            if cache:
                # No owner: the cache must not keep t alive (the _Arr, and the
                # caller, hold t until the call returns).
                dev = self.cuda.from_cuda_array_interface(desc, owner=None, sync=False)
                _cache_view(t, shape, dtype, dev)
            else:
                dev = self.cuda.from_cuda_array_interface(desc, owner=t, sync=False)
            return _Arr(dev, dtype, shape, t)
        if getattr(obj, "__cuda_ndarray__", False):
            dev = obj.view(np.uint16) if _kind(dtype) != NATIVE else obj
            return _Arr(dev, dtype, shape, obj)
        desc = dict(obj.__cuda_array_interface__)
        if dtype == np.float16:
            desc["typestr"] = "<u2"
        dev = self.cuda.from_cuda_array_interface(desc, owner=obj)
        return _Arr(dev, dtype, shape, obj)

    def flat(self, arr, shape, name):
        """``arr.dev`` reshaped to ``shape`` (1-D or (rows, V)); a strided array
        of that rank is used as is."""
        dev = arr.dev
        if dev.is_c_contiguous():
            return dev.reshape(*shape)
        if len(arr.shape) == len(shape):
            return dev
        raise ValueError(f"{name}: non-contiguous GPU arrays are supported only with "
                         f"{len(shape)} dimension(s), found shape {arr.shape}; pass a contiguous array")

    # -- allocation and copies ----------------------------------------------------
    def empty(self, shape, dtype):
        """A new GPU array: (kernel view, user-facing object)."""
        dtype = np.dtype(dtype)
        if self.torch is not None:
            t = self.torch.empty(shape, dtype=_numpy_to_torch_dtype(dtype), device=self.device)
            return (self.view(t, "output").dev if t.numel() else None), t
        d = self.cuda.device_array(shape, dtype=dtype, stream=self.stream)
        return (d.view(np.uint16) if _kind(dtype) != NATIVE else d), d

    def to_device(self, a):
        """Copy a (small) host array to the GPU: (kernel view, object)."""
        a = np.ascontiguousarray(a)
        if self.torch is not None:
            t = self.torch.tensor(a, device=self.device)
            return self.view(t, "input").dev, t
        d = self.cuda.to_device(a, stream=self.stream)
        return d, d

    def launch(self, kernel, grid, *args, tpb=None, smem=0):
        kernel[grid, tpb or self.tpb, self.stream, smem](*args)

    def copy2d(self, src, dst):
        """dst[...] = src[...] on the device, for 2-D kernel arrays of any strides."""
        from .cross_entropy import copy2d_kernel
        n = int(src.shape[0]) * int(src.shape[1])
        self.launch(copy2d_kernel(self.tpb), self.grid(-(-n // self.tpb)), src, dst)

    def contiguous2d(self, a, dtype):
        """``a`` (a 2-D kernel array of logical dtype ``dtype``) itself when
        C-contiguous, else a contiguous copy of it made on the device."""
        if a.is_c_contiguous():
            return a
        staged = self.empty(tuple(a.shape), dtype)[0]
        self.copy2d(a, staged)
        return staged

    def scratch(self, name, rows, cols, dtype, zero=False):
        """A (rows, cols) kernel array (cols 0: 1-D) of this call's internal
        scratch, reused by the next calls of the same Python thread on the same
        device and stream (stream order makes that safe: a later call's kernels
        run after this one's are done with it); grown when too small; zeroed
        when made if ``zero`` (the kernels leave it zeroed after use)."""
        key = (self.key, self.stream_key, threading.get_ident(), name, np.dtype(dtype).str, cols)
        buf = _SCRATCH.get(key)
        if buf is None or buf[0].shape[0] < rows:
            if len(_SCRATCH) > _MAX_VIEWS:
                _SCRATCH.clear()
            shape = (max(rows, 1), cols) if cols else (max(rows, 1),)
            buf = _SCRATCH[key] = self.to_device(np.zeros(shape, dtype)) if zero else self.empty(shape, dtype)
        dev = buf[0]
        return dev if dev.shape[0] == rows else dev[:rows]

    def dummy(self, shape, dtype):
        """A small placeholder array for a kernel argument that this call never
        touches (cached: no allocation per call)."""
        key = (self.key, shape, np.dtype(dtype).str)
        d = _DUMMIES.get(key)
        if d is None:
            d = _DUMMIES[key] = self.empty(shape, dtype)[0]
        return d

    def grid(self, work_blocks, tpb=None, row_bytes=0, per_sm=None):
        """Blocks for ``work_blocks`` independent units of block-sized work, of
        ``tpb`` threads (default: ``self.tpb``). With ``row_bytes`` (the fused
        kernel, which reads each row twice) the blocks are also capped so that
        the rows in flight fit in ``config.CUDA_FUSED_L2_BYTES``; ``per_sm``:
        blocks that fit on an SM (default: by threads)."""
        limit = GRID_LIMIT
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

    def reduced(self, obj):
        """A one-element reduced loss as handed back."""
        return obj.reshape(()) if self.torch is not None else obj


_DUMMIES = {}
_SCRATCH = {}
_STREAMS = {}
_VIEWS = {}
_MAX_VIEWS = 64


def _external_stream(cuda, device, ptr):
    """numba's handle on PyTorch's current stream (cached per device and stream)."""
    key = (str(device), ptr)
    st = _STREAMS.get(key)
    if st is None:
        if len(_STREAMS) > _MAX_VIEWS:
            _STREAMS.clear()
        st = _STREAMS[key] = cuda.external_stream(ptr)
    return st


def _cached_view(t, shape, dtype):
    """The numba view of the contiguous tensor ``t`` made by an earlier call, if
    ``t`` is the same live object with the same storage pointer, shape and dtype
    (per call this saves the interface dict and the device-array construction)."""
    hit = _VIEWS.get(id(t))
    if hit is None:
        return None
    ref, ptr, shp, dt, dev = hit
    if ref() is not t or ptr != t.data_ptr() or shp != shape or dt != dtype:
        return None
    return dev


def _cache_view(t, shape, dtype, dev):
    key = id(t)

    def drop(r, key=key):
        e = _VIEWS.get(key)
        if e is not None and e[0] is r:
            del _VIEWS[key]

    try:
        ref = weakref.ref(t, drop)
    except TypeError:  # not weak-referenceable: no caching
        return
    if len(_VIEWS) >= _MAX_VIEWS:
        _VIEWS.clear()
    _VIEWS[key] = (ref, t.data_ptr(), tuple(shape), dtype, dev)
_SM_COUNT = {}


def _sm_count(cuda):
    """Multiprocessors of the current device (cached per device)."""
    dev = cuda.current_context().device
    sms = _SM_COUNT.get(dev.id)
    if sms is None:
        sms = _SM_COUNT[dev.id] = dev.MULTIPROCESSOR_COUNT
    return sms


def _wave(cuda, tpb):
    """Blocks of ``tpb`` threads that fit on the GPU at once (2048 threads per SM)."""
    return _sm_count(cuda) * max(1, 2048 // tpb)


def _on_input_device(fn):
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


_TORCH_DTYPES = None


def _torch_dtype_table():
    global _TORCH_DTYPES
    if _TORCH_DTYPES is None:
        torch = sys.modules["torch"]
        pairs = [(torch.float16, np.float16), (torch.bfloat16, V.BFLOAT16),
                 (torch.float32, np.float32), (torch.float64, np.float64),
                 (torch.int8, np.int8), (torch.int16, np.int16), (torch.int32, np.int32),
                 (torch.int64, np.int64), (torch.uint8, np.uint8), (torch.bool, np.bool_)]
        _TORCH_DTYPES = [(t, np.dtype(n)) for t, n in pairs]
    return _TORCH_DTYPES


def _torch_to_numpy_dtype(tdtype):
    for t, n in _torch_dtype_table():
        if t == tdtype:
            return n
    return _Unsupported(tdtype)


def _numpy_to_torch_dtype(dtype):
    for t, n in _torch_dtype_table():
        if n == dtype:
            return t
    raise TypeError(f"no PyTorch dtype for {dtype}")


class _Unsupported:
    """Stands for a torch dtype numpy has no name for (complex32, ...); it
    compares unequal to every numpy dtype and prints as the torch dtype."""

    kind = "?"

    def __init__(self, tdtype):
        self._t = tdtype

    def __eq__(self, other):
        return False

    def __hash__(self):
        return hash(self._t)

    def __str__(self):
        return str(self._t)


# --- shared checks -------------------------------------------------------------

def _side_array(gpu, obj, name):
    """A side input (targets, weights, grad_output) as an :class:`_Arr`:
    a GPU array as is, a host array copied to the GPU."""
    if is_device_array(obj):
        return gpu.view(obj, name)
    a = np.asarray(obj)
    if a.dtype == V.BFLOAT16:
        a = a.astype(np.float32)
    dev, o = gpu.to_device(a)
    return _Arr(dev, a.dtype, a.shape, o)


def _side_meta(gpu, obj):
    if is_device_array(obj):
        return gpu.meta(obj)
    a = np.asarray(obj)
    return a.shape, a.dtype


def _is_real(dtype):
    return dtype == V.BFLOAT16 or getattr(dtype, "kind", "?") in "iuf"


def _as_vector(gpu, arr, acc, n, name):
    """A 1-D kernel array of ``arr``'s values in dtype ``acc`` (converting on the
    device when needed), length ``n``."""
    from .cross_entropy import convert_kernel
    src = gpu.flat(arr, (n,), name)
    if arr.dtype == acc:
        return src
    if gpu.torch is not None and is_torch_tensor(arr.obj):
        t = arr.obj.to(_numpy_to_torch_dtype(np.dtype(acc))).reshape(-1)
        return gpu.view(t, name).dev
    dst, _ = gpu.empty((n,), acc)
    if n:
        gpu.launch(convert_kernel(arr.kind, gpu.tpb), gpu.grid(-(-n // gpu.tpb)), src, dst)
    return dst


def _grad_output(gpu, grad_output, reduction, want_shape, what):
    """(gmode, go, gvec): the upstream gradient as the kernels take it, with the
    CPU API's checks and messages. ``what`` names the shape in messages."""
    from .cross_entropy import G_DEVICE_SCALAR, G_ROWS, G_SCALAR
    none_vec = gpu.dummy((1,), np.float64)
    if grad_output is None:
        return G_SCALAR, 1.0, none_vec
    on_gpu = is_device_array(grad_output)
    if reduction == "none":
        if not on_gpu and np.ndim(grad_output) == 0:
            return G_SCALAR, V.real_scalar(grad_output, "grad_output"), none_vec
        shape, dtype = _side_meta(gpu, grad_output)
        if not _is_real(dtype):
            raise TypeError(f"grad_output: expected a real array, found dtype {dtype}")
        if tuple(shape) != tuple(want_shape):
            raise ValueError(f"grad_output: expected a scalar or shape {tuple(want_shape)} "
                             f"({what}) for reduction='none', found {tuple(shape)}")
        n = int(np.prod(want_shape, dtype=np.int64))
        arr = _side_array(gpu, grad_output, "grad_output")
        return G_ROWS, 1.0, _as_vector(gpu, arr, np.dtype(np.float64), n, "grad_output")
    if on_gpu:
        shape, dtype = gpu.meta(grad_output)
        if int(np.prod(shape, dtype=np.int64)) != 1:
            raise ValueError(f"grad_output: expected a scalar for reduction={reduction!r}, "
                             f"found shape {tuple(shape)}")
        if not _is_real(dtype):
            raise TypeError(f"grad_output: expected a real number, found an array of shape "
                            f"{tuple(shape)} and dtype {dtype}")
        arr = gpu.view(grad_output, "grad_output")
        arr.shape = (1,)
        return G_DEVICE_SCALAR, 1.0, _as_vector(gpu, arr, np.dtype(np.float64), 1, "grad_output")
    if np.ndim(grad_output) != 0 and np.size(grad_output) != 1:
        raise ValueError(f"grad_output: expected a scalar for reduction={reduction!r}, "
                         f"found shape {np.shape(grad_output)}")
    return G_SCALAR, V.real_scalar(np.asarray(grad_output).reshape(()), "grad_output"), none_vec


def _span(gpu, dev):
    """Byte range [lo, hi) a kernel array covers."""
    if gpu.sim:
        ptr = dev._ary.__array_interface__["data"][0]
    else:
        ptr = dev.__cuda_array_interface__["data"][0]
    lo = hi = ptr
    for s, st in zip(dev.shape, dev.strides):
        if s == 0:
            return ptr, ptr
        if st >= 0:
            hi += (s - 1) * st
        else:
            lo += (s - 1) * st
    return lo, hi + dev.dtype.itemsize


def _flat(gpu, dtype, arrays):
    """``(per, [(words, elements), ...])``: each C-contiguous (rows, V) kernel array
    as the two flat views the cross-entropy kernels take (see
    ``fastloss.cuda.cross_entropy``): its elements, and its uint64 words of
    ``per`` elements (2 float32, 4 half precision) when every array starts on
    an 8-byte boundary; else ``per = 1`` and the words are the elements."""
    total = int(arrays[0].shape[0]) * int(arrays[0].shape[1])
    flats = [a.reshape(total) for a in arrays]
    per = 4 if dtype in (np.dtype(np.float16), V.BFLOAT16) else 2 if dtype == np.float32 else 1
    if not WIDE_ACCESS or per == 1 or total < per or any(_span(gpu, f)[0] % 8 for f in flats):
        return 1, [(f, f) for f in flats]
    nw = total // per
    return per, [(f[:nw * per].view(np.uint64), f) for f in flats]


def _overlaps(gpu, a, b):
    (alo, ahi), (blo, bhi) = _span(gpu, a), _span(gpu, b)
    return alo < bhi and blo < ahi


def _same(gpu, a, b):
    return (_span(gpu, a) == _span(gpu, b) and a.shape == b.shape
            and tuple(a.strides) == tuple(b.strides))


def _out_array(gpu, out, shape, dtype, name="out"):
    """Check a caller-provided GPU output buffer (as ``_validate.out_array``)."""
    if not is_device_array(out):
        raise TypeError(f"{name}: expected a GPU array (like the inputs), found {type(out).__name__}")
    oshape, odtype = gpu.meta(out)
    if tuple(oshape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, found {tuple(oshape)}")
    if odtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, found {odtype}")
    contiguous = out.is_contiguous() if is_torch_tensor(out) else _cai_contiguous(gpu, out)
    if not contiguous:
        strides = tuple(out.stride()) if is_torch_tensor(out) else tuple(
            getattr(out, "strides", None) or out.__cuda_array_interface__.get("strides"))
        raise ValueError(f"{name}: expected a C-contiguous array, found strides {strides}")
    return gpu.view(out, name)


# --- the resident fused kernel's shared memory ---------------------------------------

#: Why the resident kernel was last turned down on a GPU (for benchmarks/gpu_check.py).
RESIDENT_NOTE = None

_SMEM_ALLOWED = {}


def _resident_bytes(gpu, kernel, args, need, tpb):
    """``(bytes, blocks per SM)``: the dynamic shared memory to launch the
    resident fused kernel with, for rows of ``need`` bytes of words (all of
    them, or the prefix that fits), and how many such blocks fit on an SM;
    ``(0, None)`` to run the streaming kernel (``config.CUDA_FUSED_STRATEGY``,
    ``CUDA_RESIDENT_MIN_FRACTION``, ``CUDA_RESIDENT_MAX_BYTES``; see
    ``fastloss.cuda.cross_entropy``)."""
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
    """The cheap key of ``_SMEM_ALLOWED`` (typing 23 arguments costs tens of
    microseconds): the kernel fixes every argument type but the arrays'
    dtypes and layouts. Should it miss a difference, the new overload's launch
    is refused and the call streams (see :func:`_resident_refused`)."""
    return (id(kernel), dev.id) + tuple(
        (a.dtype.str, a.is_c_contiguous()) for a in args if hasattr(a, "is_c_contiguous"))


def _resident_refused(gpu, kernel, args, error):
    """A resident launch failed (the driver refused its shared memory): record
    why and allow this kernel no more than the default 48 KiB from now on."""
    global RESIDENT_NOTE
    RESIDENT_NOTE = f"resident launch failed, streaming instead: {type(error).__name__}: {error}"
    dev = gpu.cuda.current_context().device
    key = (id(kernel), tuple(kernel.typeof_pyval(a) for a in args), dev.id)
    fast = _fast_key(kernel, dev, args)
    allowed, static, per_sm = _SMEM_ALLOWED.get(key, (0, 0, 0))
    _SMEM_ALLOWED[key] = _SMEM_ALLOWED[fast] = min(allowed, 48 * 1024 - static), static, per_sm


def _smem_allowed(gpu, kernel, args):
    """``(allowed, static, per SM)``: the dynamic shared memory this compiled
    kernel may use on the current device, after opting in above the default
    48 KiB (a driver attribute numba does not set itself; 48 KiB less its
    static memory if opting in fails), its static shared memory, and the
    shared memory of an SM."""
    global RESIDENT_NOTE
    dev = gpu.cuda.current_context().device
    fast = _fast_key(kernel, dev, args)
    hit = _SMEM_ALLOWED.get(fast)
    if hit is not None:
        return hit
    sig = tuple(kernel.typeof_pyval(a) for a in args)
    key = (id(kernel), sig, dev.id)
    hit = _SMEM_ALLOWED.get(key)
    if hit is not None:
        _SMEM_ALLOWED[fast] = hit
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
    _SMEM_ALLOWED[key] = _SMEM_ALLOWED[fast] = allowed, static, per_sm
    return allowed, static, per_sm


# --- asynchronous checks of targets and class weights ----------------------------------

class _Checks:
    """``validate``'s numbers (bad targets, bad class weights) on their way to the
    host without a wait.

    Each cross-entropy call queues a copy of its eleven numbers into a slot of
    a pinned host ring, and an event after it, on its stream; then it polls
    every pending slot whose event has completed (no waiting) and raises the
    contract's ``ValueError`` for the first one flagged. A flagged call's
    kernels only wrote a NaN loss. On a GPU the flagged call has usually not
    finished when it returns, so its error comes from the next fastloss call,
    or from :func:`fastloss.cuda.synchronize`; the simulator runs
    synchronously, so there it comes from the call itself, as it does on a
    GPU with ``config.CUDA_SYNC_CHECKS = True`` (each call waits)."""

    SLOTS = 64
    WIDTH = 11

    def __init__(self):
        self.ring = None
        self.free = []
        self.pending = []  # [call id, event, slot, info], oldest first
        self.calls = 0
        self.errors = []  # settled, not yet raised
        self.lock = threading.RLock()  # calls from several Python threads

    def submit(self, gpu, stats, info):
        """Queue the copy of ``stats``; returns the call's id."""
        with self.lock:
            return self._submit(gpu, stats, info)

    def _submit(self, gpu, stats, info):
        cuda = gpu.cuda
        if self.ring is None:
            self.ring = _pinned(gpu, (self.SLOTS, self.WIDTH))
            self.free = list(range(self.SLOTS))
        self.calls += 1
        if not self.free:  # 64 calls in flight: wait for the oldest
            self._poll(self.calls, wait_for=1)
        slot = self.free.pop()
        stats.copy_to_host(self.ring[slot], stream=gpu.stream)
        event = cuda.event() if gpu.sim else cuda.event(timing=False)
        event.record(gpu.stream)
        self.pending.append([self.calls, event, slot, info])
        return self.calls

    def poll(self, current=None, wait_for=0):
        """Settle the pending checks that have landed (waiting for the oldest
        ``wait_for`` of them, or for all with ``config.CUDA_SYNC_CHECKS``) and
        raise the first error found (now or while making room in the ring)."""
        with self.lock:
            self._poll(current, wait_for)
            errors, self.errors = self.errors, []
        if errors:
            more = f" [and {len(errors) - 1} more flagged call(s)]" if len(errors) > 1 else ""
            raise ValueError(errors[0] + more)

    def _poll(self, current, wait_for):
        """Settle what has landed; errors go to ``self.errors``."""
        wait_all = bool(config.CUDA_SYNC_CHECKS)
        keep = []
        for k, entry in enumerate(self.pending):
            call, event, slot, info = entry
            if wait_all or k < wait_for:
                event.synchronize()
            elif not _event_done(event):
                keep.append(entry)
                continue
            msg = _check_message(self.ring[slot], info)
            self.free.append(slot)
            if msg is not None:
                if call != current:
                    msg += " (an earlier GPU call; errors are checked without waiting, see fastloss.cuda.synchronize)"
                self.errors.append(msg)
        self.pending = keep

    def synchronize(self):
        """Wait for every pending check and raise the first error."""
        self.poll(wait_for=len(self.pending))


_CHECKS = _Checks()


def _pinned(gpu, shape):
    """A float64 host array in page-locked memory that every CUDA context sees
    as pinned (so copies into it from any GPU stay asynchronous)."""
    cuda = gpu.cuda
    if not gpu.sim:
        try:
            nbytes = int(np.prod(shape)) * 8
            buf = cuda.current_context().memhostalloc(nbytes, portable=True)
            return np.ndarray(shape=shape, dtype=np.float64, buffer=buf)
        except Exception:  # numba-cuda internals differ: pinned for this context only
            pass
    return cuda.pinned_array(shape, np.float64)


def _event_done(event):
    query = getattr(event, "query", None)  # the simulator's events have none: all done
    return True if query is None else bool(query())


def _check_message(h, info):
    """The contract's error message for one call's ``validate`` numbers, or None."""
    tshape, nclass, ignore_index, acc, has_w, t_u64 = info
    nbad = int(h[0])
    if nbad:
        first = int(h[1])
        pos = np.unravel_index(first, tshape) if tshape else ()
        value = (int(h[9]) << 32) | int(h[10])
        if t_u64 and value < 0:
            value += 1 << 64
        return (f"targets: {nbad} value(s) outside [0, {nclass}) that are not "
                f"ignore_index={ignore_index}; first at position "
                f"{tuple(int(p) for p in pos)}: {value}")
    if h[3]:
        return "weight: expected finite values, found NaN or inf"
    if has_w and h[7] < 0:
        return f"weight: expected non-negative values, found minimum {acc.type(h[7])}"
    return None


def synchronize():
    """Wait for the GPU work of every fastloss call and raise a pending error.

    Cross-entropy calls on GPU arrays never wait for the GPU; their checks of
    the targets and class weights land later (see :class:`_Checks`). This
    waits for them all and raises the contract's ``ValueError`` for the first
    bad call, if any. ``config.CUDA_SYNC_CHECKS = True`` makes every call wait
    instead."""
    _CHECKS.synchronize()


def _cai_contiguous(gpu, obj):
    if getattr(obj, "__cuda_ndarray__", False):
        return obj.is_c_contiguous()
    desc = obj.__cuda_array_interface__
    if desc.get("strides") is None:
        return True
    expect, stride = [], np.dtype(desc["typestr"]).itemsize
    for s in reversed(desc["shape"]):
        expect.append(stride)
        stride *= s
    return tuple(reversed(expect)) == tuple(desc["strides"]) or 0 in desc["shape"]


# --- cross-entropy -----------------------------------------------------------------

class _CEPlan:
    """Validated GPU inputs and derived constants of one cross-entropy call
    (the GPU twin of ``fastloss.ops.cross_entropy._Plan``)."""

    def __init__(self, gpu, logits, targets, weight, ignore_index, reduction, label_smoothing,
                 z_loss, softcap, logit_scale, normalizer):
        from . import cross_entropy as K
        self.gpu = gpu
        self.logits = logits
        shape, dtype = gpu.meta(logits)
        _check_logits(shape, dtype)
        self.shape, self.dtype = shape, dtype
        self.reduction = V.check_reduction(reduction)
        self.red = {"none": K.NONE, "sum": K.SUM, "mean": K.MEAN}[self.reduction]
        self.eps = V.check_range(label_smoothing, "label_smoothing", low=0.0, high=1.0)
        self.zl = V.check_range(z_loss, "z_loss", low=0.0)
        self.norm = V.check_range(normalizer, "normalizer", low=0.0, low_open=True, allow_none=True)
        if self.norm is not None and self.reduction != "mean":
            raise ValueError(f"normalizer: only used with reduction='mean', found reduction={self.reduction!r}")
        self.mode, scale, cap = _transform(softcap, logit_scale)
        self.nclass = shape[-1]
        self.n = int(np.prod(shape[:-1], dtype=np.int64))
        self.acc = V.acc_dtype(dtype)
        acc = self.acc.type
        self.scale, self.inv, self.cap = acc(scale), acc(scale / cap), acc(cap)
        _check_ignore_index(ignore_index)
        self.ignore_index = int(ignore_index)
        tshape, tdtype = _side_meta(gpu, targets)
        if getattr(tdtype, "kind", "?") not in "iu":
            raise TypeError(f"targets: expected an integer dtype, found {tdtype}")
        self.ign, self.has_ign = _ignore_for_kernel(self.ignore_index, tdtype)
        self.t_u64 = tdtype == np.uint64
        want = tuple(shape[:-1])
        if tuple(tshape) != want:
            raise ValueError(f"targets: expected shape {want} (logits.shape[:-1]), found {tuple(tshape)}")
        self.targets = targets
        self.tshape = want
        self.weight = weight
        if weight is not None:
            wshape, wdtype = _side_meta(gpu, weight)
            if not _is_real(wdtype):
                raise TypeError(f"weight: expected a real (float or integer) array, found dtype {wdtype}")
            if tuple(wshape) != (self.nclass,):
                raise ValueError(f"weight: expected shape ({self.nclass},) (one weight per class), "
                                 f"found {tuple(wshape)}")

    def device_inputs(self):
        """Put the inputs on the device: logits (n, V), targets (n,), weights (V,)."""
        gpu = self.gpu
        self.x = gpu.view(self.logits, "logits", cache=True)
        self.x2 = gpu.flat(self.x, (self.n, self.nclass), "logits")
        # The kernels take flat views: a strided 2-D view is staged in a
        # contiguous buffer (and the gradient copied back for inplace).
        self.strided = None if self.x2.is_c_contiguous() else self.x2
        self.x2 = gpu.contiguous2d(self.x2, self.dtype)
        t = _side_array(gpu, self.targets, "targets")
        self.t_arr = t
        self.tgt = gpu.flat(t, (self.n,), "targets")
        if self.weight is None:
            self.w, self.has_w = gpu.dummy((1,), self.acc), False
        elif is_device_array(self.weight):
            w = gpu.view(self.weight, "weight")
            self.w, self.has_w = _as_vector(gpu, w, self.acc, self.nclass, "weight"), True
        else:
            wh = V.class_weight(self.weight, self.nclass, self.acc)
            self.w, self.has_w = gpu.to_device(wh)[0], True

    def launch_validate(self):
        """Queue ``validate``; returns the device ``stats`` that the loss kernels
        read (they do nothing when it flags an error)."""
        from .cross_entropy import validate_kernel
        gpu = self.gpu
        validate = validate_kernel(gpu.tpb)
        self.stats = gpu.scratch("stats", 11, 0, np.float64)
        norm = self.norm if self.norm is not None else 0.0
        gpu.launch(validate, 1, self.tgt, self.ign, self.has_ign, np.int64(self.nclass),
                   self.w, self.has_w, norm, self.stats)
        return self.stats

    def check(self):
        """Hand ``validate``'s numbers to the asynchronous checks (see
        :class:`_Checks`): raises the contract's error now if this call's (or
        an earlier call's) numbers have landed and flag one; never waits
        unless ``config.CUDA_SYNC_CHECKS``."""
        info = (self.tshape, self.nclass, self.ignore_index, self.acc, self.has_w, self.t_u64)
        _CHECKS.poll(_CHECKS.submit(self.gpu, self.stats, info))

    def kernels(self, *arrays, tpb=None, per=None):
        """``((forward, fused, lse, fused_resident), per, views)`` for this call
        (``tpb`` threads per block; default gpu.tpb), with ``arrays`` (the
        contiguous logits and gradient destination) as the kernels take them:
        ``(words, elements)`` pairs (see :func:`_flat`). Without ``arrays``,
        the kernels for ``per`` elements per word."""
        from .cross_entropy import ce_kernels
        views = None
        if arrays:
            per, views = _flat(self.gpu, self.dtype, arrays)
        return ce_kernels(self.acc.name, self.x.kind, self.mode, tpb or self.gpu.tpb, per), per, views

    def outputs(self, grid):
        """``(loss, out, counter, partial)`` as the loss kernels take them: the
        per-row loss (none), or the one-element loss, the last-block counter
        and per-block partials (mean/sum); the others are placeholders. The
        object handed back is ``self.loss_obj``."""
        gpu = self.gpu
        if self.reduction == "none":
            loss, self.loss_obj = gpu.empty((self.n,), self.acc)
            one = gpu.dummy((1,), self.acc)
            return loss, one, gpu.dummy((1,), np.int32), gpu.dummy((1, 2), np.float64)
        out, self.loss_obj = gpu.empty((1,), self.acc)
        self.partial_all = gpu.scratch("partial", grid, 2, np.float64)
        counter = gpu.scratch("counter", 1, 0, np.int32, zero=True)
        return gpu.dummy((1,), self.acc), out, counter, self.partial_all

    def finish(self):
        """The loss as handed back."""
        if self.reduction == "none":
            return _reshape(self.gpu, self.loss_obj, self.tshape)
        return self.gpu.reduced(self.loss_obj)

    def empty_loss(self):
        """The loss of an empty batch (mean/sum 0, none an empty array)."""
        if self.reduction == "none":
            return _reshape(self.gpu, self.gpu.empty((0,), self.acc)[1], self.tshape)
        return _zero_scalar(self.gpu, self.acc)


def _check_logits(shape, dtype):
    if dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"logits: expected dtype {V._dtype_names()}, found {dtype}")
    if len(shape) == 0:
        raise ValueError("logits: expected shape (..., V) with at least one dimension, found a 0-d array")
    if shape[-1] == 0:
        raise ValueError(f"logits: the class dimension (last) must be at least 1, found shape {tuple(shape)}")


def _transform(softcap, logit_scale):
    from .cross_entropy import PLAIN, SCALED, SOFTCAP
    scale = V.check_range(logit_scale, "logit_scale", low=0.0, low_open=True)
    cap = V.check_range(softcap, "softcap", low=0.0, low_open=True, allow_none=True)
    if cap is not None:
        return SOFTCAP, scale, cap
    return (PLAIN if scale == 1.0 else SCALED), scale, 1.0


def _check_ignore_index(ignore_index):
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index: expected an integer, found {type(ignore_index).__name__}")


def _ignore_for_kernel(v, tdtype):
    """(ign, has_ign): the kernels compare ``int64(target) == ign``. Matches the
    CPU rule (exact comparison in the targets' dtype): uint64 targets wrap to
    int64 like a wrapped ``ignore_index`` does; a value no target can hold
    ignores nothing."""
    info = np.iinfo(tdtype)
    if not info.min <= v <= info.max:
        return np.int64(0), False
    return np.int64(v - (1 << 64) if v > np.iinfo(np.int64).max else v), True


def _reshape(gpu, obj, shape):
    if gpu.torch is not None:
        return obj.reshape(shape)
    return obj.reshape(*shape) if len(shape) else obj.reshape(())


def _zero_scalar(gpu, acc):
    dev, obj = gpu.to_device(np.zeros(1, acc))
    return gpu.reduced(obj)


@_on_input_device
def cross_entropy(logits, targets, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                  normalizer=None):
    """:func:`fastloss.cross_entropy` for GPU logits; returns GPU arrays (see the module doc)."""
    gpu = _Gpu(logits)
    plan = _CEPlan(gpu, logits, targets, weight, ignore_index, reduction, label_smoothing,
                   z_loss, softcap, logit_scale, normalizer)
    if plan.n == 0:
        return plan.empty_loss()
    plan.device_inputs()
    (forward, _, _, _), _, ((xw, xe),) = plan.kernels(plan.x2)
    grid = gpu.grid(plan.n)
    loss, out, counter, partial = plan.outputs(grid)
    stats = plan.launch_validate()
    gpu.launch(forward, grid, xw, xe, np.int64(plan.nclass), plan.tgt, plan.ign, plan.has_ign,
               plan.w, plan.has_w, plan.scale, plan.inv, plan.cap, plan.eps, plan.zl, stats,
               plan.red, loss, out, counter, partial)
    result = plan.finish()
    plan.check()
    return result


@_on_input_device
def cross_entropy_with_grad(logits, targets, *, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                            logit_scale=1.0, normalizer=None, grad_output=None, out=None,
                            inplace=False):
    """:func:`fastloss.cross_entropy_with_grad` for GPU logits: loss and gradient in
    one fused kernel; ``grad`` is a new GPU array, ``out``, or ``logits`` itself
    (``inplace=True``, ``grad is logits``)."""
    gpu = _Gpu(logits)
    plan = _CEPlan(gpu, logits, targets, weight, ignore_index, reduction, label_smoothing,
                   z_loss, softcap, logit_scale, normalizer)
    gmode, go, gvec = _grad_output(gpu, grad_output, plan.reduction, plan.tshape, "targets.shape")
    if not isinstance(inplace, (bool, np.bool_)):
        raise TypeError(f"inplace: expected True or False, found {inplace!r}")
    if inplace and out is not None:
        raise ValueError("out: cannot be combined with inplace=True (the gradient goes into logits)")
    out_arr = _out_array(gpu, out, plan.shape, plan.dtype) if out is not None else None
    if plan.n == 0:
        if inplace:
            return plan.empty_loss(), logits
        if out is not None:
            return plan.empty_loss(), out
        return plan.empty_loss(), gpu.empty(plan.shape, plan.dtype)[1]
    plan.device_inputs()
    copy_back = None
    inplace = bool(inplace)
    if inplace:
        dest, grad = plan.x2, logits
        if plan.x.obj is not logits:  # a non-contiguous tensor: computed in a contiguous copy
            copy_back = plan.x.obj
        elif plan.strided is not None:  # a strided 2-D GPU array: computed in a staged copy
            copy_back = plan.strided
    elif out_arr is not None:
        dest = gpu.flat(out_arr, (plan.n, plan.nclass), "out")
        src = plan.strided if plan.strided is not None else plan.x2  # the caller's logits
        if not _same(gpu, dest, src) and _overlaps(gpu, dest, src):
            raise ValueError("out: overlaps logits; pass inplace=True to overwrite the logits")
        grad = out
    else:
        dest, grad = gpu.empty((plan.n, plan.nclass), plan.dtype)
        grad = _reshape(gpu, grad, plan.shape)
    # The resident kernel (row kept in shared memory) where it fits, else the
    # streaming one (config.CUDA_FUSED_STRATEGY); each has its own block size.
    ftpb = _fused_threads_per_block(gpu)
    rtpb = _resident_threads_per_block(gpu, ftpb)
    (_, fused, _, _), per, ((xw, xe), (dw, de)) = plan.kernels(plan.x2, dest, tpb=ftpb)
    resident = plan.kernels(tpb=rtpb, per=per)[0][3]
    grid = max(gpu.grid(plan.n, rtpb), gpu.grid(plan.n, ftpb))  # partials for either
    loss, out, counter, partial = plan.outputs(grid)
    stats = plan.launch_validate()
    args = [xw, xe, np.int64(plan.nclass), plan.tgt, plan.ign, plan.has_ign, plan.w, plan.has_w,
            plan.scale, plan.inv, plan.cap, plan.eps, plan.zl, stats, plan.red,
            gmode, go, gvec, dw, de, loss, out, counter, partial, np.uint64(0)]
    isz = xw.dtype.itemsize
    smem, per_sm = _resident_bytes(gpu, resident, args, plan.nclass // per * isz, rtpb)
    if smem:
        kgrid = gpu.grid(plan.n, rtpb, per_sm=per_sm)
        if kgrid < grid and plan.reduction != "none":
            partial = args[-2] = partial[:kgrid]
        args[-1] = np.uint64(smem // isz)  # words kept per row
        try:
            gpu.launch(resident, kgrid, *args, tpb=rtpb, smem=smem)
        except Exception as e:  # the launch refused the shared memory: stream from now on
            if gpu.sim:
                raise
            _resident_refused(gpu, resident, args, e)
            smem = 0
            partial = args[-2] = partial if plan.reduction == "none" else plan.partial_all
    if not smem:
        kgrid = gpu.grid(plan.n, ftpb, row_bytes=plan.nclass * plan.dtype.itemsize)
        if kgrid < grid and plan.reduction != "none":
            partial = args[-2] = partial[:kgrid]
        gpu.launch(fused, kgrid, *args, tpb=ftpb)
    result = plan.finish()
    if copy_back is not None:
        if is_torch_tensor(logits):
            logits.copy_(copy_back)
        else:
            gpu.copy2d(plan.x2, copy_back)
    plan.check()
    return result, grad


@_on_input_device
def logsumexp(logits, *, softcap=None, logit_scale=1.0):
    """:func:`fastloss.logsumexp` for GPU logits; a GPU array of ``logits.shape[:-1]``."""
    gpu = _Gpu(logits)
    shape, dtype = gpu.meta(logits)
    _check_logits(shape, dtype)
    mode, scale, cap = _transform(softcap, logit_scale)
    acc = V.acc_dtype(dtype)
    nclass = shape[-1]
    n = int(np.prod(shape[:-1], dtype=np.int64))
    out, out_obj = gpu.empty((n,), acc)
    if n:
        from .cross_entropy import ce_kernels
        x = gpu.view(logits, "logits", cache=True)
        x2 = gpu.contiguous2d(gpu.flat(x, (n, nclass), "logits"), dtype)
        per, ((xw, xe),) = _flat(gpu, dtype, (x2,))
        lse = ce_kernels(acc.name, x.kind, mode, gpu.tpb, per)[2]
        a = acc.type
        gpu.launch(lse, gpu.grid(n), xw, xe, np.int64(nclass), gpu.dummy((1,), acc), a(scale),
                   a(scale / cap), a(cap), out)
    return _reshape(gpu, out_obj, tuple(shape[:-1]))


# --- mean squared error ---------------------------------------------------------------

class _MSEPlan:
    """Validated GPU inputs of one MSE call (twin of ``fastloss.ops.mse._Plan``)."""

    def __init__(self, gpu, pred, target, reduction, weight):
        from . import mse as K
        self.gpu = gpu
        pshape, pdtype = gpu.meta(pred)
        if pdtype not in V.FLOAT_DTYPES:
            raise TypeError(f"pred: expected dtype {V._dtype_names()}, found {pdtype}")
        tshape, tdtype = _side_meta(gpu, target)
        if tdtype not in V.FLOAT_DTYPES:
            raise TypeError(f"target: expected dtype {V._dtype_names()}, found {tdtype}")
        if tuple(pshape) != tuple(tshape):
            raise ValueError(f"target: expected the shape of pred {tuple(pshape)}, found {tuple(tshape)}")
        self.reduction = V.check_reduction(reduction)
        self.red = {"none": K.NONE, "sum": K.SUM, "mean": K.MEAN}[self.reduction]
        self.shape, self.dtype = tuple(pshape), pdtype
        self.acc = V.acc_dtype(np.result_type(V.acc_dtype(pdtype), V.acc_dtype(tdtype)))
        self.size = int(np.prod(pshape, dtype=np.int64))
        self.pred, self.target = pred, target
        self.weight = weight
        if weight is None:
            self.wmode, self.inner, self.den_val, self.w_host, self.w_dev = 0, 1, float(self.size), None, None
        elif is_device_array(weight):
            wshape, wdtype = gpu.meta(weight)
            V.check_weight_broadcast(wdtype, wshape, self.shape)
            if tuple(wshape) != self.shape and not is_torch_tensor(weight):
                raise ValueError(f"weight: a GPU weight that is not a PyTorch tensor must have "
                                 f"pred's shape {self.shape}, found {tuple(wshape)}")
            self.wmode, self.inner, self.den_val, self.w_host, self.w_dev = 1, 1, 0.0, None, weight
        else:
            self.wmode, self.w_host, self.inner, self.den_val = V.weight_layout(weight, self.shape, self.acc)
            self.w_dev = None

    def device_inputs(self):
        gpu = self.gpu
        n = self.size
        self.p = gpu.view(self.pred, "pred")
        self.p1 = gpu.flat(self.p, (n,), "pred")
        t = _side_array(gpu, self.target, "target")
        self.t = t
        self.t1 = gpu.flat(t, (n,), "target")
        self.use_den = False
        if self.w_dev is not None:
            w = self.w_dev
            if is_torch_tensor(w) and tuple(w.shape) != self.shape:
                w = gpu.torch.broadcast_to(w, self.shape)
            self.w = _as_vector(gpu, gpu.view(w, "weight"), self.acc, n, "weight")
            if self.reduction == "mean":
                from .mse import mse_kernels
                _, weight_sum, _ = mse_kernels(self.acc.name, self.p.kind, self.t.kind, gpu.tpb)
                self.den, _ = gpu.empty((1,), np.float64)
                gpu.launch(weight_sum, 1, self.w, 1.0, self.den)
                self.use_den = True
            else:
                self.den = gpu.dummy((1,), np.float64)
        else:
            if self.w_host is None:
                self.w = gpu.dummy((1,), self.acc)
            else:
                self.w = gpu.to_device(self.w_host)[0]
            self.den = gpu.dummy((1,), np.float64)

    def run(self, gmode, go, gvec, grad):
        """Launch the MSE kernel (and finalize); returns the loss as handed back."""
        from .mse import mse_kernels
        gpu = self.gpu
        n = self.size
        kernel, _, finalize = mse_kernels(self.acc.name, self.p.kind, self.t.kind, gpu.tpb)
        grid = gpu.grid(-(-n // gpu.tpb))
        none = self.reduction == "none"
        if none:
            loss, loss_obj = gpu.empty((n,), self.acc)
        else:
            loss, loss_obj = gpu.dummy((1,), self.acc), None
        partial = gpu.scratch("mse_partial", grid, 0, np.float64)
        do_grad = grad is not None
        if grad is None:
            grad = gpu.dummy((1,), self.dtype)
        gpu.launch(kernel, grid, self.p1, self.t1, self.w, self.wmode, np.int64(self.inner),
                   self.red, float(self.den_val), self.den, self.use_den, gmode, go, gvec,
                   do_grad, grad, loss, partial)
        if none:
            return _reshape(gpu, loss_obj, self.shape)
        out, out_obj = gpu.empty((1,), self.acc)
        gpu.launch(finalize, 1, partial, self.red, float(self.den_val), self.den, self.use_den, out)
        return gpu.reduced(out_obj)

    def empty_loss(self):
        if self.reduction == "none":
            return _reshape(self.gpu, self.gpu.empty((0,), self.acc)[1], self.shape)
        return _zero_scalar(self.gpu, self.acc)


@_on_input_device
def mse(pred, target, *, reduction="mean", weight=None):
    """:func:`fastloss.mse` for GPU ``pred``; returns GPU arrays (see the module doc)."""
    gpu = _Gpu(pred)
    plan = _MSEPlan(gpu, pred, target, reduction, weight)
    if plan.size == 0:
        return plan.empty_loss()
    plan.device_inputs()
    from .cross_entropy import G_SCALAR
    return plan.run(G_SCALAR, 1.0, gpu.dummy((1,), np.float64), None)


@_on_input_device
def mse_with_grad(pred, target, *, reduction="mean", weight=None, grad_output=None, out=None):
    """:func:`fastloss.mse_with_grad` for GPU ``pred``: loss and ``grad_pred`` (a new
    GPU array, or ``out``) in one kernel."""
    gpu = _Gpu(pred)
    plan = _MSEPlan(gpu, pred, target, reduction, weight)
    gmode, go, gvec = _grad_output(gpu, grad_output, plan.reduction, plan.shape, "pred.shape")
    out_arr = _out_array(gpu, out, plan.shape, plan.dtype) if out is not None else None
    if plan.size == 0:
        grad = out if out is not None else gpu.empty(plan.shape, plan.dtype)[1]
        return plan.empty_loss(), grad
    plan.device_inputs()
    if out_arr is not None:
        dest = gpu.flat(out_arr, (plan.size,), "out")
        if _overlaps(gpu, dest, plan.t1) or (
                _overlaps(gpu, dest, plan.p1) and not _same(gpu, dest, plan.p1)):
            raise ValueError("out: overlaps pred or target")
        grad = out
    else:
        dest, grad = gpu.empty((plan.size,), plan.dtype)
        grad = _reshape(gpu, grad, plan.shape)
    return plan.run(gmode, go, gvec, dest), grad
