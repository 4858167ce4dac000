"""Scalar device functions shared by the CUDA kernels: bit casts, float16 /
bfloat16 <-> float32 conversion, loads and stores by storage kind, exp/log/tanh.
Block reductions are in ``fastloss.cuda.reductions``.

Half-precision storage follows the CPU convention (``fastloss.cpu._math``),
except that both half types reach the kernels as ``uint16`` bit views (one
unsigned type keeps the bit arithmetic free of sign extension and of int16
overflow in the simulator): the storage kinds ``NATIVE``, ``F16`` and ``BF16``
of ``fastloss.codes`` say how to decode them.
Conversions happen in registers; no float32 copy of the data is ever made.

The functions run in two worlds: compiled by numba-cuda for a real GPU, and as
plain Python under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``). Only the
two bit casts differ (libdevice intrinsics on the GPU, numpy views in the
simulator); everything else is shared, written so that integer arithmetic
stays non-negative and within int64 (numba types most of it as int64 on the
device, Python ints in the simulator: both give the same bits).

Importing this module needs numba-cuda; ``fastloss.cuda`` imports it only
when a kernel is about to run. Without numba-cuda the module still imports
(for doctest collection) and ``device`` is the identity.
"""

import math
from typing import NamedTuple

import numpy as np

from ..codes import BF16, F16, G_DEVICE_SCALAR, G_ROWS, NATIVE

try:
    from numba import cuda
except ImportError:  # numba-cuda missing: fastloss.cuda refuses to launch first
    cuda = None


def _simulator():
    if cuda is None:
        return False
    try:
        from numba.cuda.core import config
    except ImportError:  # older numba-cuda keeps the flag in numba's config
        from numba.core import config
    return bool(config.ENABLE_CUDASIM)


#: True when numba-cuda runs kernels in the CUDA simulator (plain Python).
SIMULATOR = _simulator()


def device(fn):
    """``cuda.jit(device=True)(fn)`` for a device function that uses no ``cuda.*``
    intrinsic. In the simulator (and without numba-cuda) it stays a plain Python
    function: the simulator would wrap every call in its module-swapping
    machinery, which makes the per-element helpers several times slower."""
    if cuda is None or SIMULATOR:
        return fn
    return cuda.jit(device=True)(fn)


def block_device(fn):
    """``cuda.jit(device=True)(fn)`` for a device function that uses ``cuda.*``
    intrinsics (barriers, shared memory); the simulator must wrap it too."""
    if cuda is None:
        return fn
    return cuda.jit(device=True)(fn)


# --- bit casts ---------------------------------------------------------------

if SIMULATOR or cuda is None:
    def _bits_as_f32(b):
        """float32 whose bits are the low 32 bits of the integer ``b``."""
        return np.uint32(int(b) & 0xFFFFFFFF).view(np.float32)

    def _f32_as_bits(f):
        """The bits of the float32 ``f`` as a non-negative integer."""
        return int(np.float32(f).view(np.uint32))
else:
    from numba.cuda import libdevice

    def _bits_as_f32(b):
        """float32 whose bits are the low 32 bits of the integer ``b``."""
        return libdevice.int_as_float(np.int32(b))

    def _f32_as_bits(f):
        """The bits of the float32 ``f`` as a non-negative integer."""
        return np.int64(libdevice.float_as_int(np.float32(f))) & 0xFFFFFFFF

bits_as_f32 = device(_bits_as_f32)
f32_as_bits = device(_f32_as_bits)


# --- half precision ------------------------------------------------------------

@device
def f16_to_f32(h):
    """Decode float16 bits (0..65535) exactly: subnormals, inf and NaN included."""
    u = np.int64(h) & 0xFFFF
    sign = (u & 0x8000) << 16
    em = u & 0x7FFF
    # Exponent+mantissa moved into float32 position and rebiased by 2**112;
    # the multiply also renormalises subnormals. Inf/NaN: all-ones exponent.
    v = bits_as_f32(em << 13) * np.float32(5.192296858534828e33)
    if em >= 0x7C00:
        v = bits_as_f32((em << 13) | 0x7F800000)
    return bits_as_f32(f32_as_bits(v) | sign)


@device
def f32_to_f16(f):
    """Round a float32 to float16 bits (nearest-even, overflow to inf, NaN kept)."""
    u = f32_as_bits(f)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:
        o = np.int64(0x7E00)
    elif a >= 0x47800000:
        o = np.int64(0x7C00)
    elif a < 0x38800000:
        # Subnormal result: let the FPU align the mantissa by adding 0.5.
        o = f32_as_bits(bits_as_f32(a) + np.float32(0.5)) - 0x3F000000
    else:
        # Normal: rebias the exponent, round to nearest even on bit 13.
        o = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13
    return np.uint16(o | sign)


@device
def bf16_to_f32(h):
    """Decode bfloat16 bits: they are the top half of a float32."""
    return bits_as_f32((np.int64(h) & 0xFFFF) << 16)


@device
def f32_to_bf16(f):
    """Round a float32 to bfloat16 bits (nearest-even; NaN stays NaN, quieted)."""
    u = f32_as_bits(f)
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16((u >> 16) | 0x40)
    return np.uint16(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF)


# --- loads and stores by storage kind --------------------------------------------

@device
def load_native(v):
    """A float32/float64 element is already in its accumulation type."""
    return v


def loader(kind):
    """Device function: storage element -> accumulation value, for a storage kind."""
    return {NATIVE: load_native, F16: f16_to_f32, BF16: bf16_to_f32}[kind]


@device
def store_native(v):
    return v


def storer(kind):
    """Device function: accumulation value -> storage element (rounded once)."""
    return {NATIVE: store_native, F16: f32_to_f16, BF16: f32_to_bf16}[kind]


# --- words: several elements per 64-bit load/store ------------------------------------
# A row whose length is a multiple of 4 (half precision) or 2 (float32) is read
# and written as uint64 words, so each thread moves 8 bytes per access instead
# of 2 or 4 (more bytes in flight per SM; see fastloss.cuda.cross_entropy).
# With ``per == 1`` the "word" is the storage element itself.

def unpacker(kind, per):
    """Device function ``(word, p) -> accumulation value`` of element ``p`` of a word
    holding ``per`` elements of storage kind ``kind``."""
    load = loader(kind)
    if per == 1:
        @device
        def unpack(word, p):
            return load(word)
    elif per == 2:  # two float32
        @device
        def unpack(word, p):
            return bits_as_f32((word >> np.uint64(32 * p)) & np.uint64(0xFFFFFFFF))
    else:  # four float16/bfloat16
        @device
        def unpack(word, p):
            return load((word >> np.uint64(16 * p)) & np.uint64(0xFFFF))
    return unpack


def packer(kind, per):
    """Device function ``(word, v, p) -> word`` with element ``p`` set to the accumulation
    value ``v`` rounded to storage (``per == 1``: returns the element)."""
    store = storer(kind)
    if per == 1:
        @device
        def pack(word, v, p):
            return store(v)
    elif per == 2:
        @device
        def pack(word, v, p):
            return word | (np.uint64(f32_as_bits(v)) << np.uint64(32 * p))
    else:
        @device
        def pack(word, v, p):
            return word | (np.uint64(store(v)) << np.uint64(16 * p))
    return pack


# --- transcendental functions ------------------------------------------------------
# math.exp / math.log / math.tanh on float32 compile to expf / logf / tanhf
# (float64 versions for float64), so the accumulation type is kept.

@device
def exp(x):
    """exp in the argument's precision. Callers pass only arguments <= 0, -inf
    or NaN, so the simulator's ``math.exp`` never overflows."""
    return math.exp(x)


# Fast float32 exp: libdevice ``__nv_fast_expf`` is ``ex2.approx.ftz.f32(x * log2(e))``,
# a multiply and one MUFU instruction instead of expf's ~10-instruction range
# reduction. Error: ex2.approx is within ~2 ulp, and rounding ``x * log2(e)``
# adds a relative error of about ``|x| * 2**-24`` to the result. The kernels
# call it only with ``x <= 0`` (softmax terms ``exp(z - max)``), where a term
# with large ``|x|`` is tiny: the absolute error of ``exp(x)`` stays below
# ``max_x |x| e**x 2**-24 ~ 2.2e-8``, and the sum's relative error ~1e-7, well
# inside the float32 tolerances (loss rtol 2e-5). exp(-inf) = +0, NaN stays
# NaN, and results below 2**-126 flush to 0 (they are negligible against the
# max term, which is 1). Float64 accumulation keeps the accurate exp. The
# simulator has no libdevice: there it is math.exp.
if SIMULATOR or cuda is None:
    fast_exp32 = exp
else:
    from numba.cuda import libdevice as _libdevice

    @device
    def fast_exp32(x):
        """exp(x) of a float32 by the hardware approximation (see above)."""
        return _libdevice.fast_expf(x)


# max(a, b) where NaN never wins (the other operand is returned), as PTX
# max.f32/max.f64: one instruction instead of a compare and a select.
if SIMULATOR or cuda is None:
    def _fmax(a, b):
        return a if (a > b or b != b) else b

    fmax32 = fmax64 = device(_fmax)
else:
    @device
    def fmax32(a, b):
        """max of two float32, NaN never wins."""
        return _libdevice.fmaxf(a, b)

    @device
    def fmax64(a, b):
        """max of two float64, NaN never wins."""
        return _libdevice.fmax(a, b)


if SIMULATOR or cuda is None:
    def _log0(s):
        return -np.inf if s == 0 else math.log(s)
else:
    def _log0(s):
        return math.log(s)

#: log(s) for s >= 0 or NaN, with log(0) = -inf (the simulator's math.log would raise).
log0 = device(_log0)


@device
def tanh(x):
    """tanh in the argument's precision."""
    return math.tanh(x)


# --- per-call scalars shared by the kernels of several ops ---------------------------

class GradScalars(NamedTuple):
    """Where the upstream gradient comes from, as the gradient kernels take it:
    ``gmode`` (``codes.G_SCALAR``: the value ``go``; ``G_DEVICE_SCALAR``:
    ``gvec[0]``; ``G_ROWS``: ``gvec[i]`` per row or element; ``gvec`` is a
    separate array argument) and ``go`` (float64)."""

    gmode: int
    go: float


@device
def upstream(gmode, go, gvec, i):
    """The upstream coefficient of row ``i`` (float64) from :class:`GradScalars`
    ``(gmode, go)`` and ``gvec``: ``go``, ``gvec[0]`` or ``gvec[i]``."""
    if gmode == G_DEVICE_SCALAR:
        return np.float64(gvec[0])
    if gmode == G_ROWS:
        return np.float64(gvec[i])
    return np.float64(go)


@device
def per_mean(g, den):
    """``g / den``, 0 when the denominator is 0 (an all-ignored batch)."""
    return g / den if den != 0 else 0.0
