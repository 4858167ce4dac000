"""Input checking and normalisation shared by every public entry point.

Everything a kernel relies on is established here, once: supported dtypes,
shapes, option ranges, targets inside ``[0, V)``. Kernels then trust their
inputs. Half-precision arrays are handed to kernels as integer views (numba
has no float16/bfloat16 arrays on the CPU): float16 as int16, bfloat16 as
uint16; ``fastloss.cpu._math.load``/``store`` convert them in registers.
"""

import math
import numbers
import sys
import threading
from contextlib import contextmanager

import numpy as np

from . import codes, config

NUMPY_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
REDUCTIONS = ("mean", "sum", "none")
_BF16 = None


def bfloat16():
    """``np.dtype(ml_dtypes.bfloat16)`` (imports ml_dtypes: about 0.5 s, so
    ``import fastloss`` does not; the attributes ``BFLOAT16`` and
    ``FLOAT_DTYPES`` of this module call it on first access)."""
    global _BF16
    if _BF16 is None:
        import ml_dtypes
        _BF16 = np.dtype(ml_dtypes.bfloat16)
    return _BF16


def loaded_bfloat16():
    """The bfloat16 dtype if ml_dtypes is loaded, else None: an array (or dtype)
    of bfloat16 cannot exist before ml_dtypes is imported, so dtype checks ask
    this instead of importing it."""
    if _BF16 is None and "ml_dtypes" in sys.modules:
        return bfloat16()
    return _BF16


def is_bfloat16(dtype):
    """Whether ``dtype`` is ml_dtypes' bfloat16 (without importing ml_dtypes)."""
    bf16 = loaded_bfloat16()
    return bf16 is not None and dtype == bf16


def __getattr__(name):
    if name == "BFLOAT16":
        return bfloat16()
    if name == "FLOAT_DTYPES":
        return (NUMPY_FLOAT_DTYPES[0], bfloat16()) + NUMPY_FLOAT_DTYPES[1:]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _dtype_names():
    return "float16, bfloat16, float32 or float64"


def as_array(a, name):
    """``np.asarray(a)``; input numpy cannot turn into an array (a ragged list)
    raises a ValueError naming the argument."""
    try:
        return np.asarray(a)
    except ValueError as e:  # e.g. "setting an array element with a sequence"
        raise ValueError(f"{name}: expected an array, found an object numpy cannot convert ({e})") from e


def native_array(a, name):
    """``as_array(a, name)``; a byte-swapped float array becomes one native copy."""
    arr = as_array(a, name)
    if arr.dtype.kind == "f" and not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def is_float_dtype(dtype):
    """Whether ``dtype`` is one of the supported float dtypes."""
    return dtype in NUMPY_FLOAT_DTYPES or is_bfloat16(dtype)


def check_float_dtype(dtype, name):
    """TypeError unless ``dtype`` is one of the supported float dtypes."""
    if not is_float_dtype(dtype):
        raise TypeError(f"{name}: expected dtype {_dtype_names()}, found {dtype}")


def float_array(a, name):
    """``np.asarray(a)`` (native byte order) checked to have a supported float dtype."""
    arr = native_array(a, name)
    check_float_dtype(arr.dtype, name)
    return arr


def acc_dtype(dtype):
    """Accumulation dtype: float64 for float64 data, float32 for everything else."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


#: How the kernels see each float dtype (half precision as integer views);
#: bfloat16 is added by :func:`kernel_view_fn` once ml_dtypes is loaded.
_KERNEL_VIEWS = {
    np.dtype(np.float32): lambda a: a,
    np.dtype(np.float64): lambda a: a,
    np.dtype(np.float16): lambda a: a.view(np.int16),
}


def kernel_view_fn(dtype):
    """The function turning an array of ``dtype`` into the kernels' view of it
    (the same memory), or None for an unsupported dtype. A dict lookup: the
    small-call paths use it on every call."""
    view = _KERNEL_VIEWS.get(dtype)
    if view is None and is_bfloat16(dtype):
        view = _KERNEL_VIEWS[dtype] = lambda a: a.view(np.uint16)
    return view


def kernel_view(arr):
    """A C-contiguous view (copy only if needed) in the dtype the kernels take."""
    arr = np.ascontiguousarray(arr)
    view = kernel_view_fn(arr.dtype)
    return arr if view is None else view(arr)


_EMPTY = {}


def empty(dtype):
    """A shared (0,) array of ``dtype``: the kernels' "no array here" argument
    (never written, so one per dtype serves every call)."""
    e = _EMPTY.get(dtype)
    if e is None:
        e = _EMPTY[dtype] = np.empty(0, dtype)
    return e


def check_reduction(reduction):
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of 'mean', 'sum', 'none', found {reduction!r}")
    return reduction


def real_scalar(value, name):
    """A Python float from a real number (0-d arrays accepted); TypeError otherwise."""
    # The common cases without numpy (as numpy would convert them; bool is not int here).
    if type(value) is float:
        return value
    if type(value) is int and -(1 << 63) <= value < (1 << 63):
        return float(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.ndarray, np.generic)):
        raise TypeError(f"{name}: expected a real number, found {type(value).__name__}")
    arr = np.asarray(value)
    if arr.ndim != 0 or arr.dtype.kind not in "iuf":
        raise not_a_number_error(name, arr.shape, arr.dtype)
    return float(arr)


def not_a_number_error(name, shape, dtype):
    """The error for an array given where one real number is expected."""
    return TypeError(f"{name}: expected a real number, found an array of shape {tuple(shape)} "
                     f"and dtype {dtype}")


def check_range(value, name, *, low=None, high=None, low_open=False, allow_none=False):
    """Validate a real scalar option against [low, high] (or (low, ...) with low_open)."""
    if value is None and allow_none:
        return None
    v = real_scalar(value, name)
    if math.isnan(v):
        raise ValueError(f"{name}: expected a number, found NaN")
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and v > high
    if too_low or too_high or math.isinf(v):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if low_open else '['}{lo}, {hi}{']' if high is not None else ')'}"
        raise ValueError(f"{name}: expected a finite value in {interval}, found {v!r}")
    return v


def check_finite(value, name):
    v = real_scalar(value, name)
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, found {v!r}")
    return v


def logits_array(logits):
    """Validated logits array with at least one dimension and V >= 1."""
    arr = float_array(logits, "logits")
    check_logits_meta(arr.shape, arr.dtype)
    return arr


def check_ignore_index(ignore_index):
    """``ignore_index`` as a Python int; TypeError for anything but an integer."""
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, (numbers.Integral, np.integer)):
        raise TypeError(f"ignore_index: expected an integer, found {type(ignore_index).__name__}")
    return int(ignore_index)


def is_real_dtype(dtype):
    """Whether ``dtype`` holds real numbers (integers, floats, bfloat16)."""
    return getattr(dtype, "kind", "?") in "iuf" or is_bfloat16(dtype)


def check_logits_meta(shape, dtype, name="logits"):
    """Logits of ``shape`` and ``dtype``: a supported float dtype, shape (..., V), V >= 1."""
    check_float_dtype(dtype, name)
    if len(shape) == 0:
        raise ValueError(f"{name}: expected shape (..., V) with at least one dimension, found a 0-d array")
    if shape[-1] == 0:
        raise ValueError(f"{name}: the class dimension (last) must be at least 1, found shape {tuple(shape)}")


def check_targets_meta(shape, dtype, logits_shape):
    """Class-index targets: an integer dtype and shape ``logits_shape[:-1]``."""
    if getattr(dtype, "kind", "?") not in "iu":
        raise TypeError(f"targets: expected an integer dtype, found {dtype}")
    want = tuple(logits_shape[:-1])
    if tuple(shape) != want:
        raise ValueError(f"targets: expected shape {want} (logits.shape[:-1]), found {tuple(shape)}")


def check_weight_dtype(dtype):
    """A ``weight`` (class weights, MSE weights) of a real dtype."""
    if not is_real_dtype(dtype):
        raise TypeError(f"weight: expected a real (float or integer) array, found dtype {dtype}")


def check_class_weight_meta(shape, dtype, nclass):
    """Class weights of cross-entropy: a real dtype and shape (V,)."""
    check_weight_dtype(dtype)
    if tuple(shape) != (nclass,):
        raise ValueError(f"weight: expected shape ({nclass},) (one weight per class), found {tuple(shape)}")


def check_pred_target_meta(pshape, pdtype, tshape, tdtype):
    """MSE ``pred`` and ``target``: supported float dtypes and one shape."""
    check_float_dtype(pdtype, "pred")
    check_float_dtype(tdtype, "target")
    if tuple(pshape) != tuple(tshape):
        raise ValueError(f"target: expected the shape of pred {tuple(pshape)}, found {tuple(tshape)}")


def check_grad_output_meta(shape, dtype, reduction, want_shape, what):
    """An array ``grad_output``: for "none" a real array of ``want_shape`` (named
    ``what`` in the message), for mean/sum one real value."""
    if reduction == "none":
        if not is_real_dtype(dtype):
            raise TypeError(f"grad_output: expected a real array, found dtype {dtype}")
        if tuple(shape) != tuple(want_shape):
            raise ValueError(f"grad_output: expected a scalar or shape {tuple(want_shape)} "
                             f"({what}) for reduction='none', found {tuple(shape)}")
        return
    if int(np.prod(shape, dtype=np.int64)) != 1:
        raise ValueError(f"grad_output: expected a scalar for reduction={reduction!r}, "
                         f"found shape {tuple(shape)}")
    if not is_real_dtype(dtype):
        raise not_a_number_error("grad_output", shape, dtype)


def scalar_grad_output(grad_output, reduction):
    """A host ``grad_output`` for mean/sum as a Python float (1.0 for None)."""
    if grad_output is None:
        return 1.0
    g = as_array(grad_output, "grad_output")
    if g.ndim != 0 and g.size != 1:
        check_grad_output_meta(g.shape, None, reduction, (), "")
    return real_scalar(g.reshape(()), "grad_output")


def rows_grad_output(grad_output, want_shape, what):
    """A host ``grad_output`` for reduction "none": a Python float (1.0 for None,
    or a scalar) or a float64 array of ``want_shape``."""
    if grad_output is None:
        return 1.0
    g = as_array(grad_output, "grad_output")
    if g.ndim == 0:
        return real_scalar(grad_output, "grad_output")
    check_grad_output_meta(g.shape, g.dtype, "none", want_shape, what)
    return g.astype(np.float64)


def outside_message(count, nclass, ignore_index, first_at, value, noun="value(s)"):
    """The one wording of out-of-range targets: how many, and the first one."""
    return (f"{count} {noun} outside [0, {nclass}) that are not ignore_index={ignore_index}; "
            f"first at {first_at}: {value}")


def bad_targets_error(count, nclass, ignore_index, shape, first, value):
    """The contract's ValueError for ``count`` targets outside [0, V): the first at
    flat index ``first`` of targets of ``shape``, holding ``value``."""
    pos = np.unravel_index(first, shape) if len(shape) else ()
    where = f"position {tuple(int(p) for p in pos)}"
    return ValueError("targets: " + outside_message(count, nclass, ignore_index, where, value))


def targets_for_kernel(targets, logits_shape, ignore_index):
    """Validate targets and return them flat as int64 with ignored positions set to -1.

    Raises ValueError naming the number of out-of-range targets, the first
    bad position and its value.
    """
    ignore_index = check_ignore_index(ignore_index)
    t = as_array(targets, "targets")
    check_targets_meta(t.shape, t.dtype, logits_shape)
    nclass = logits_shape[-1]
    flat = t.reshape(-1)
    t64 = flat.astype(np.int64)
    # uint64 values past int64's range would wrap to negatives: flag them as bad.
    huge = flat > np.iinfo(np.int64).max if t.dtype == np.uint64 else np.zeros(flat.shape, bool)
    # Compare in the targets' own dtype: numpy compares exactly with any Python int.
    ignored = flat == ignore_index
    bad = ~ignored & ((t64 < 0) | (t64 >= nclass) | huge)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise bad_targets_error(int(bad.sum()), nclass, ignore_index, t.shape, first, flat[first])
    return np.where(ignored, np.int64(-1), t64), ignored


def class_weight(weight, nclass, acc):
    """Validated class-weight vector of shape (V,) in the accumulation dtype, or None."""
    if weight is None:
        return None
    w = as_array(weight, "weight")
    check_class_weight_meta(w.shape, w.dtype, nclass)
    return finite_nonnegative(w, "weight", acc)


def nonfinite_weight_error(name="weight"):
    """The error for weights holding NaN or inf (host and GPU checks)."""
    return ValueError(f"{name}: expected finite values, found NaN or inf")


def negative_weight_error(minimum, name="weight"):
    """The error for negative weights, naming the smallest (host and GPU checks)."""
    return ValueError(f"{name}: expected non-negative values, found minimum {minimum}")


def finite_nonnegative(w, name, acc):
    """``w`` converted to ``acc``, checked finite (also after the conversion) and >= 0."""
    w64 = np.asarray(w, dtype=np.float64)
    if not np.all(np.isfinite(w64)):
        raise nonfinite_weight_error(name)
    if np.any(w64 < 0):
        raise negative_weight_error(w64.min(), name)
    if w64.size and w64.max() > np.finfo(acc).max:
        raise ValueError(f"{name}: values up to {w64.max()} overflow the {acc} accumulation")
    return np.ascontiguousarray(w64, dtype=acc)


def check_weight_broadcast(wdtype, wshape, shape):
    """MSE ``weight``: a real dtype whose shape broadcasts to pred's ``shape``."""
    check_weight_dtype(wdtype)
    try:
        full_shape = np.broadcast_shapes(tuple(wshape), tuple(shape))
    except ValueError:
        full_shape = None
    if full_shape != tuple(shape):
        raise ValueError(f"weight: shape {tuple(wshape)} does not broadcast to pred's shape {tuple(shape)}")


def weight_layout(weight, shape, acc):
    """Describe an MSE ``weight`` broadcast to ``shape`` without materialising it
    (shared by the CPU and GPU paths).

    Returns (wmode, w, inner, wsum) as ``fastloss.cpu.mse`` takes them, with
    wsum = sum of the broadcast weight.
    """
    size = int(np.prod(shape, dtype=np.int64))
    if weight is None:
        return codes.W_NONE, np.empty(0, acc), 1, float(size)
    w = as_array(weight, "weight")
    check_weight_broadcast(w.dtype, w.shape, shape)
    w = finite_nonnegative(w, "weight", acc)
    ws = (1,) * (len(shape) - w.ndim) + w.shape
    ndim = len(shape)
    if all(s == 1 for s in ws) or size == 0:
        # A scalar weight: a constant for every element.
        wc = w.reshape(-1)[:1] if w.size else np.ones(1, acc)
        return codes.W_OUTER, np.ascontiguousarray(wc), max(size, 1), float(wc[0]) * size
    if ws == tuple(shape):
        flat = np.ascontiguousarray(w).reshape(-1)
        return codes.W_FULL, flat, 1, float(flat.sum(dtype=np.float64))
    for k in range(1, ndim):
        lead, trail = ws[:k], ws[k:]
        inner = int(np.prod(shape[k:], dtype=np.int64))
        if all(s == 1 for s in lead) and trail == tuple(shape[k:]):
            row = np.ascontiguousarray(w).reshape(-1)
            return codes.W_INNER, row, inner, float(row.sum(dtype=np.float64)) * (size // inner)
        if lead == tuple(shape[:k]) and all(s == 1 for s in trail):
            col = np.ascontiguousarray(w).reshape(-1)
            return codes.W_OUTER, col, inner, float(col.sum(dtype=np.float64)) * inner
    # Mixed broadcasting (e.g. (A, 1, C) over (A, B, C)): materialise once.
    flat = np.ascontiguousarray(np.broadcast_to(w, shape)).reshape(-1)
    return codes.W_FULL, flat, 1, float(flat.sum(dtype=np.float64))


def check_out_meta(oshape, odtype, shape, dtype, name="out"):
    """A caller-provided output buffer's shape and dtype (host or GPU)."""
    if tuple(oshape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, found {tuple(oshape)}")
    if odtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, found {odtype}")


def not_contiguous_error(strides, name="out"):
    return ValueError(f"{name}: expected a C-contiguous array, found strides {tuple(strides)}")


def check_inplace_out(inplace, out):
    """``inplace`` is a bool and not combined with ``out``; returns it as a bool."""
    if not isinstance(inplace, (bool, np.bool_)):
        raise TypeError(f"inplace: expected True or False, found {inplace!r}")
    if inplace and out is not None:
        raise ValueError("out: cannot be combined with inplace=True (the gradient goes into logits)")
    return bool(inplace)


def overlap_error(op, name="logits"):
    """The error for an ``out=`` that overlaps the inputs (``op``: "ce" or "mse";
    ``name``: what "ce" overwrites in place, the logits or distillation's student)."""
    if op == "ce":
        return ValueError(f"out: overlaps {name}; pass inplace=True to overwrite the {name}")
    return ValueError("out: overlaps pred or target")


def out_array(out, shape, dtype, name="out"):
    """Check a caller-provided output buffer: right shape and dtype, writable, C-contiguous."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, found {type(out).__name__}")
    check_out_meta(out.shape, out.dtype, shape, dtype, name)
    if not out.flags.writeable:
        raise ValueError(f"{name}: the array is read-only")
    if not out.flags.c_contiguous:
        raise not_contiguous_error(out.strides, name)
    return out


def grad_buffer(original, x, out, inplace, name="logits", keep=None):
    """Where a host gradient goes: ``(buffer, copy_back)``.

    ``x`` is ``original`` as converted for the kernels (the same memory when
    ``inplace`` is allowed). ``inplace``: ``x`` itself, or a fresh buffer with
    ``copy_back`` set when ``x`` is not C-contiguous (the caller copies the
    gradient over it afterwards); ``out``: checked by :func:`out_array` and
    not overlapping ``x`` unless it is ``x`` itself; else a fresh buffer.
    ``keep``, ``(label, arrays)``: inputs that neither the buffer nor, in
    place, ``x`` may share memory with (distillation's teacher).
    """
    if inplace:
        if not isinstance(original, np.ndarray):
            raise TypeError(f"{name}: inplace=True needs a numpy array, found {type(original).__name__}")
        if x is not original and not np.shares_memory(x, original):
            raise ValueError(f"{name}: inplace=True needs a native-byte-order float array, "
                             f"found dtype {original.dtype}")
        if not x.flags.writeable:
            raise ValueError(f"{name}: inplace=True needs a writable array, found a read-only one")
        if keep is not None:
            for a in keep[1]:
                if np.may_share_memory(a, x):
                    raise ValueError(f"{keep[0]}: shares memory with {name}; inplace=True would overwrite it")
        if x.flags.c_contiguous:
            return x, False
        return np.empty(x.shape, x.dtype), True
    if out is None:
        return np.empty(x.shape, x.dtype), False
    out_array(out, x.shape, x.dtype)
    same = out.__array_interface__["data"][0] == x.__array_interface__["data"][0] and x.flags.c_contiguous
    if not same and np.may_share_memory(out, x):
        raise overlap_error("ce", name)
    if keep is not None:
        for a in keep[1]:
            if np.may_share_memory(out, a):
                raise ValueError(f"out: overlaps {keep[0]} (the {keep[0]} is never modified)")
    return out, False


def threads():
    """Threads the next kernel launched from this Python thread may use
    (numba's ``get_num_threads``)."""
    import numba  # loaded by then: the kernels import it
    return numba.get_num_threads()


def num_tasks(rows, elements):
    """How many parallel tasks to split ``rows`` rows of ``elements`` elements into."""
    by_size = max(1, elements // config.MIN_ELEMENTS_PER_TASK)
    return max(1, min(threads(), rows, by_size))


_LAUNCH_LOCK = threading.Lock()
_LAYER_SAFE = None  # whether numba's threading layer runs concurrent launches (known after the first)


def _layer_safe(numba):
    global _LAYER_SAFE
    if _LAYER_SAFE is None:
        try:
            _LAYER_SAFE = numba.threading_layer() in ("omp", "tbb")
        except ValueError:  # no parallel region has run yet in this process
            return False
    return _LAYER_SAFE


@contextmanager
def kernel_launch(tasks=None):
    """Launch a parallel kernel of ``tasks`` tasks.

    With fewer tasks than threads, the calling thread's numba thread count is
    lowered to ``tasks`` for the launch (and restored): a one-task kernel then
    runs on the calling thread alone instead of waking the pool and waiting at
    its barrier for a second thread, which can take a scheduler time slice
    (~4-8 ms instead of ~40 us for a 128 x 97 input) when the other core is
    busy, e.g. with OpenBLAS workers spinning after a matrix product.
    Launches are serialised only where numba's threading layer is not
    thread-safe (``workqueue``); OpenMP and TBB layers run concurrent calls as is.
    """
    import numba

    safe = _layer_safe(numba)
    threads = numba.get_num_threads()
    narrow = tasks is not None and 1 <= tasks < threads
    if narrow:
        numba.set_num_threads(int(tasks))
    try:
        if safe:
            yield
        else:
            with _LAUNCH_LOCK:
                yield
    finally:
        if narrow:
            numba.set_num_threads(threads)


# --- probability ("soft") targets of cross-entropy ---------------------------------------

def soft_target_tolerance():
    """How far a row of probability targets may sum from 1 (absolute):
    ``config.SOFT_TARGET_SUM_TOL``. Read at call time."""
    return config.SOFT_TARGET_SUM_TOL


def is_soft_targets(targets):
    """Whether ``targets`` holds probabilities (a float dtype: numpy, ml_dtypes'
    bfloat16, or a float torch tensor) rather than class indices. Reads only
    the dtype; objects without one (lists) are not looked at."""
    dtype = getattr(targets, "dtype", None)
    if dtype is None:
        return False
    kind = getattr(dtype, "kind", None)
    if kind is not None:
        return kind == "f" or is_bfloat16(dtype)
    return bool(getattr(dtype, "is_floating_point", False))  # a torch dtype


def check_soft_targets_meta(shape, dtype, logits_shape):
    """Probability targets: a supported float dtype and exactly the logits' shape."""
    if not is_float_dtype(dtype):
        raise TypeError(f"targets: probability targets need dtype {_dtype_names()}, found {dtype}")
    if tuple(shape) != tuple(logits_shape):
        raise ValueError(f"targets: float (probability) targets must have the logits' shape "
                         f"{tuple(logits_shape)}, found {tuple(shape)} (class indices need an "
                         f"integer dtype)")


def bad_soft_targets_error(nbad, rows_shape, first, row, tol):
    """The ValueError for ``nbad`` rows of probability targets that are not
    distributions: the first is row ``first`` (flat index over
    ``rows_shape`` = logits.shape[:-1]) holding ``row`` (any float array);
    names its first negative or non-finite entry, else its sum."""
    pos = tuple(int(p) for p in np.unravel_index(first, rows_shape)) if len(rows_shape) else ()
    r = np.asarray(row, dtype=np.float64).reshape(-1)
    badj = np.flatnonzero(~(np.isfinite(r) & (r >= 0)))
    if badj.size:
        what = f"entry {int(badj[0])} is {float(r[badj[0]])!r}"
    else:
        what = f"it sums to {float(r.sum())!r}"
    return ValueError(f"targets: {nbad} row(s) of probability targets are not distributions "
                      f"(entries finite and >= 0, summing to 1 within {tol}); first at row "
                      f"{pos}: {what}")


def check_hard_targets(hard_weight, targets):
    """A distillation's hard-label term needs targets: ValueError for
    ``hard_weight > 0`` without them (silently dropping the term would hide a
    forgotten argument)."""
    if targets is None and hard_weight > 0:
        raise ValueError(f"hard_weight: {hard_weight!r} asks for a hard-label term, which needs targets; "
                         "found targets=None (pass targets, or hard_weight=0)")
