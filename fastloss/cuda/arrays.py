"""GPU arrays as the CUDA kernels see them: metadata without touching the
data, numba views of PyTorch tensors and ``__cuda_array_interface__`` objects
(half precision as uint16 bits), the PyTorch dtype table, allocation of
outputs in the caller's framework, copies of small host side inputs, staging
of strided logits, contiguity, byte spans and overlap, and the flat word
views of the cross-entropy kernels.

Functions taking ``gpu`` use the call's :class:`fastloss.cuda.launch.Gpu`
(numba.cuda, stream, device, the caller's framework); none of them waits for
the GPU.
"""

import sys
import weakref

import numpy as np

from .. import _validate as V
from .. import codes, config
from . import is_device_array, is_torch_tensor

__all__ = ["Array", "as_vector", "cai_contiguous", "contiguous2d", "copy2d", "empty", "flat",
           "grad_output", "kind_of", "meta", "numpy_to_torch_dtype", "out_array", "overlaps",
           "reduced", "reshape", "same", "side_array", "side_meta", "span", "to_device",
           "torch_to_numpy_dtype", "view", "word_views", "zero_scalar"]


def kind_of(dtype):
    """The storage kind (``codes.NATIVE``, ``F16``, ``BF16``) of a numpy dtype."""
    if dtype == np.float16:
        return codes.F16
    if dtype == V.BFLOAT16:
        return codes.BF16
    return codes.NATIVE


class Array:
    """A GPU array as the kernels see it: ``dev`` (numba device array; half
    precision as uint16 bits), ``dtype`` (the logical numpy dtype), ``kind``,
    ``shape`` and ``obj`` (the user-facing object: tensor or numba array)."""

    __slots__ = ("dev", "dtype", "kind", "shape", "obj")

    def __init__(self, dev, dtype, shape, obj):
        self.dev = dev
        self.dtype = dtype
        self.kind = kind_of(dtype)
        self.shape = tuple(shape)
        self.obj = obj


# --- PyTorch dtypes ------------------------------------------------------------------

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


def torch_to_numpy_dtype(tdtype):
    """The numpy dtype of a torch dtype (an object unequal to every numpy dtype
    when numpy has none)."""
    for t, n in _torch_dtype_table():
        if t == tdtype:
            return n
    return _Unsupported(tdtype)


def numpy_to_torch_dtype(dtype):
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


# --- viewing ---------------------------------------------------------------------------

def meta(obj):
    """(shape, numpy dtype) of a GPU array without touching its data."""
    if is_torch_tensor(obj):
        return tuple(obj.shape), torch_to_numpy_dtype(obj.dtype)
    if getattr(obj, "__cuda_ndarray__", False):
        return tuple(obj.shape), np.dtype(obj.dtype)
    desc = obj.__cuda_array_interface__
    return tuple(desc["shape"]), np.dtype(desc["typestr"])


def view(gpu, obj, name, cache=False):
    """An :class:`Array` for a GPU array (a torch tensor is first made contiguous).

    ``cache``: reuse the numba array made for the same tensor by an earlier
    call (see :func:`_cached_view`). Only for a caller-owned input that the
    call holds until it returns (the logits): the cached array does not own
    the tensor, so it must not outlive the call's reference to it."""
    shape, dtype = meta(obj)
    if is_torch_tensor(obj):
        if gpu.device is not None and obj.device != gpu.device:
            raise ValueError(f"{name}: expected a tensor on {gpu.device} (like the first "
                             f"argument), found one on {obj.device}")
        t = obj.contiguous()
        if cache:
            dev = _cached_view(t, shape, dtype)
            if dev is not None:
                return Array(dev, dtype, shape, t)
        if dtype in (np.dtype(np.float16), V.BFLOAT16):
            desc = dict(t.view(gpu.torch.int16).__cuda_array_interface__)
            desc["typestr"] = "<u2"
        else:
            desc = dict(t.__cuda_array_interface__)
        desc.pop("stream", None)  # we launch on the tensor's current stream
        if cache:
            # No owner: the cache must not keep t alive (the Array, and the
            # caller, hold t until the call returns).
            dev = gpu.cuda.from_cuda_array_interface(desc, owner=None, sync=False)
            _cache_view(t, shape, dtype, dev)
        else:
            dev = gpu.cuda.from_cuda_array_interface(desc, owner=t, sync=False)
        return Array(dev, dtype, shape, t)
    if getattr(obj, "__cuda_ndarray__", False):
        dev = obj.view(np.uint16) if kind_of(dtype) != codes.NATIVE else obj
        return Array(dev, dtype, shape, obj)
    desc = dict(obj.__cuda_array_interface__)
    if dtype == np.float16:
        desc["typestr"] = "<u2"
    dev = gpu.cuda.from_cuda_array_interface(desc, owner=obj)
    return Array(dev, dtype, shape, obj)


def flat(arr, shape, name):
    """``arr.dev`` reshaped to ``shape`` (1-D or (rows, V)); a strided array
    of that rank is used as is."""
    dev = arr.dev
    if dev.is_c_contiguous():
        return dev.reshape(*shape)
    if len(arr.shape) == len(shape):
        return dev
    raise ValueError(f"{name}: non-contiguous GPU arrays are supported only with "
                     f"{len(shape)} dimension(s), found shape {arr.shape}; pass a contiguous array")


_VIEWS = {}
MAX_CACHED = 64  # entries of each per-process cache (views, scratch, streams)


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
    if len(_VIEWS) >= MAX_CACHED:
        _VIEWS.clear()
    _VIEWS[key] = (ref, t.data_ptr(), tuple(shape), dtype, dev)


# --- allocation and copies ------------------------------------------------------------------

def empty(gpu, shape, dtype):
    """A new GPU array: (kernel view, user-facing object)."""
    dtype = np.dtype(dtype)
    if gpu.torch is not None:
        t = gpu.torch.empty(shape, dtype=numpy_to_torch_dtype(dtype), device=gpu.device)
        return (view(gpu, t, "output").dev if t.numel() else None), t
    d = gpu.cuda.device_array(shape, dtype=dtype, stream=gpu.stream)
    return (d.view(np.uint16) if kind_of(dtype) != codes.NATIVE else d), d


def to_device(gpu, a):
    """Copy a (small) host array to the GPU: (kernel view, object)."""
    a = np.ascontiguousarray(a)
    if gpu.torch is not None:
        t = gpu.torch.tensor(a, device=gpu.device)
        return view(gpu, t, "input").dev, t
    d = gpu.cuda.to_device(a, stream=gpu.stream)
    return d, d


def reshape(gpu, obj, shape):
    """A user-facing array reshaped to ``shape`` (numba arrays take ``()`` too)."""
    if gpu.torch is not None:
        return obj.reshape(shape)
    return obj.reshape(*shape) if len(shape) else obj.reshape(())


def reduced(gpu, obj):
    """A one-element reduced loss as handed back (shape () for tensors, (1,) else)."""
    return obj.reshape(()) if gpu.torch is not None else obj


def zero_scalar(gpu, acc):
    """The reduced loss 0 (of an empty batch)."""
    _, obj = to_device(gpu, np.zeros(1, acc))
    return reduced(gpu, obj)


def copy2d(gpu, src, dst):
    """dst[...] = src[...] on the device, for 2-D kernel arrays of any strides."""
    from .convert import copy2d_kernel
    n = int(src.shape[0]) * int(src.shape[1])
    gpu.launch(copy2d_kernel(gpu.tpb), gpu.grid(-(-n // gpu.tpb)), src, dst)


def contiguous2d(gpu, a, dtype):
    """``a`` (a 2-D kernel array of logical dtype ``dtype``) itself when
    C-contiguous, else a contiguous copy of it made on the device."""
    if a.is_c_contiguous():
        return a
    staged = empty(gpu, tuple(a.shape), dtype)[0]
    copy2d(gpu, a, staged)
    return staged


# --- side inputs -------------------------------------------------------------------------

def side_array(gpu, obj, name):
    """A side input (targets, weights, grad_output) as an :class:`Array`:
    a GPU array as is, a host array copied to the GPU."""
    if is_device_array(obj):
        return view(gpu, obj, name)
    a = np.asarray(obj)
    if a.dtype == V.BFLOAT16:
        a = a.astype(np.float32)
    dev, o = to_device(gpu, a)
    return Array(dev, a.dtype, a.shape, o)


def side_meta(obj):
    """(shape, dtype) of a side input, on the GPU or the host."""
    if is_device_array(obj):
        return meta(obj)
    a = np.asarray(obj)
    return a.shape, a.dtype


def as_vector(gpu, arr, acc, n, name):
    """A 1-D kernel array of ``arr``'s values in dtype ``acc`` (converting on the
    device when needed), length ``n``."""
    from .convert import convert_kernel
    src = flat(arr, (n,), name)
    if arr.dtype == acc:
        return src
    if gpu.torch is not None and is_torch_tensor(arr.obj):
        t = arr.obj.to(numpy_to_torch_dtype(np.dtype(acc))).reshape(-1)
        return view(gpu, t, name).dev
    dst, _ = empty(gpu, (n,), acc)
    if n:
        gpu.launch(convert_kernel(arr.kind, gpu.tpb), gpu.grid(-(-n // gpu.tpb)), src, dst)
    return dst


def grad_output(gpu, grad_output, reduction, want_shape, what):
    """``(GradScalars, gvec)``: the upstream gradient as the kernels take it,
    with the checks (and messages) of ``fastloss._validate``. ``what`` names
    ``want_shape`` in messages. ``gvec`` is float64: one value per row or
    element (``G_ROWS``), the one value (``G_DEVICE_SCALAR``), or a
    placeholder (``G_SCALAR``)."""
    from ._math import GradScalars
    none_vec = gpu.dummy((1,), np.float64)
    if grad_output is None:
        return GradScalars(codes.G_SCALAR, 1.0), none_vec
    f64 = np.dtype(np.float64)
    on_gpu = is_device_array(grad_output)
    if reduction == "none":
        if not on_gpu and np.ndim(grad_output) == 0:
            return GradScalars(codes.G_SCALAR, V.real_scalar(grad_output, "grad_output")), none_vec
        shape, dtype = side_meta(grad_output)
        V.check_grad_output_meta(shape, dtype, reduction, want_shape, what)
        n = int(np.prod(want_shape, dtype=np.int64))
        arr = side_array(gpu, grad_output, "grad_output")
        return GradScalars(codes.G_ROWS, 1.0), as_vector(gpu, arr, f64, n, "grad_output")
    if on_gpu:
        shape, dtype = meta(grad_output)
        V.check_grad_output_meta(shape, dtype, reduction, (), what)
        arr = view(gpu, grad_output, "grad_output")
        arr.shape = (1,)
        return GradScalars(codes.G_DEVICE_SCALAR, 1.0), as_vector(gpu, arr, f64, 1, "grad_output")
    return GradScalars(codes.G_SCALAR, V.scalar_grad_output(grad_output, reduction)), none_vec


# --- layout: contiguity, spans, overlap, word views ---------------------------------------------

def cai_contiguous(obj):
    """Whether a numba array or ``__cuda_array_interface__`` object is C-contiguous."""
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


def out_array(gpu, out, shape, dtype, name="out"):
    """Check a caller-provided GPU output buffer (as ``_validate.out_array``)
    and return its :class:`Array`."""
    if not is_device_array(out):
        raise TypeError(f"{name}: expected a GPU array (like the inputs), found {type(out).__name__}")
    oshape, odtype = meta(out)
    V.check_out_meta(oshape, odtype, shape, dtype, name)
    contiguous = out.is_contiguous() if is_torch_tensor(out) else cai_contiguous(out)
    if not contiguous:
        strides = tuple(out.stride()) if is_torch_tensor(out) else tuple(
            getattr(out, "strides", None) or out.__cuda_array_interface__.get("strides"))
        raise V.not_contiguous_error(strides, name)
    return view(gpu, out, name)


def span(gpu, dev):
    """Byte range [lo, hi) a kernel array covers."""
    if gpu.sim:
        ptr = dev._ary.__array_interface__["data"][0]
    else:
        ptr = dev.__cuda_array_interface__["data"][0]
    lo = hi = ptr
    for s, st in zip(dev.shape, dev.strides, strict=True):
        if s == 0:
            return ptr, ptr
        if st >= 0:
            hi += (s - 1) * st
        else:
            lo += (s - 1) * st
    return lo, hi + dev.dtype.itemsize


def overlaps(gpu, a, b):
    """Whether the byte ranges of two kernel arrays overlap."""
    (alo, ahi), (blo, bhi) = span(gpu, a), span(gpu, b)
    return alo < bhi and blo < ahi


def same(gpu, a, b):
    """Whether two kernel arrays are the same memory, shape and strides."""
    return (span(gpu, a) == span(gpu, b) and a.shape == b.shape
            and tuple(a.strides) == tuple(b.strides))


def word_views(gpu, dtype, arrays):
    """``(per, [(words, elements), ...])``: each C-contiguous (rows, V) kernel array
    as the two flat views the cross-entropy kernels take (see
    ``fastloss.cuda.cross_entropy``): its elements, and its uint64 words of
    ``per`` elements (2 float32, 4 half precision) when every array starts on
    an 8-byte boundary (and ``config.CUDA_WIDE_ACCESS``); else ``per = 1`` and
    the words are the elements."""
    total = int(arrays[0].shape[0]) * int(arrays[0].shape[1])
    flats = [a.reshape(total) for a in arrays]
    per = 4 if dtype in (np.dtype(np.float16), V.BFLOAT16) else 2 if dtype == np.float32 else 1
    if not config.CUDA_WIDE_ACCESS or per == 1 or total < per or any(span(gpu, f)[0] % 8 for f in flats):
        return 1, [(f, f) for f in flats]
    nw = total // per
    return per, [(f[:nw * per].view(np.uint64), f) for f in flats]
