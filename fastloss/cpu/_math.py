"""Scalar numerics shared by the CPU kernels: bit casts, a vectorisable exp,
tanh, and float16/bfloat16 <-> float32 conversion.

Everything here is ``inline="always"`` so it is compiled into the loops of the
calling kernel, where LLVM can vectorise it (numba's own ``math.exp`` on
float32 is a scalar libm call, ~10x slower here; see PERF.md).
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic, overload

from .. import config

_FM = config.FASTMATH


@intrinsic
def _i32_as_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif x.bitwidth < 32:
            v = builder.sext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _f32_as_i32(typingctx, x):
    """Reinterpret the bits of a float32 as an int32."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@njit(fastmath=_FM)
def exp_f32(x):
    """exp(x) for float32 x <= 88 (softmax arguments x - max are <= 0); relative
    error < 5e-7. Arguments below -87.3 (including -inf) give exactly 0; NaN gives NaN.

    exp(x) = 2**k * exp(r), k = round(x / ln 2), |r| <= ln2 / 2, exp(r) by a
    degree-6 polynomial; 2**k is built from exponent bits. k is rounded with
    the 1.5 * 2**23 shifter and read back from the float's bits (no floor, no
    float->int conversion; together ~2.4x faster than a floor-based version
    here). k is converted back with an int->float cast rather than by
    subtracting the shifter, which ``reassoc`` would fold away.
    """
    xc = np.float32(-87.3) if x < np.float32(-87.3) else x
    shifted = xc * np.float32(1.4426950408889634) + np.float32(12582912.0)
    ki = _f32_as_i32(shifted) - np.int32(0x4B400000)
    kf = np.float32(ki)
    r = xc - kf * np.float32(0.693359375)
    r = r - kf * np.float32(-2.12194440e-4)
    p = np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    y = p * _i32_as_f32(np.int32((ki + np.int32(127)) << np.int32(23)))
    return np.float32(0.0) if x < np.float32(-87.3) else y


@njit(fastmath=_FM)
def tanh_f32(y):
    """tanh(y) for float32 y, absolute error < 3e-7; tanh(+-inf) = +-1, NaN -> NaN.

    |y| >= 0.0625: (1 - e) / (1 + e) with e = exp(-2|y|); below, an odd
    Taylor polynomial, which avoids the cancellation of 1 - e near zero.
    """
    a = -y if y < np.float32(0.0) else y
    e = exp_f32(np.float32(-2.0) * a)
    big = (np.float32(1.0) - e) / (np.float32(1.0) + e)
    y2 = y * y
    small = y * (np.float32(1.0) + y2 * (np.float32(-1.0 / 3.0) + y2 * (
        np.float32(2.0 / 15.0) + y2 * np.float32(-17.0 / 315.0))))
    big = -big if y < np.float32(0.0) else big
    return small if a < np.float32(0.0625) else big


def _exp(x):
    """exp in the accumulation precision (dispatched on the argument type)."""


@overload(_exp, fastmath=_FM)
def _exp_ol(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    if x == types.float64:
        return lambda x: math.exp(x)
    return None


def _tanh(x):
    """tanh in the accumulation precision (dispatched on the argument type)."""


@overload(_tanh, fastmath=_FM)
def _tanh_ol(x):
    if x == types.float32:
        return lambda x: tanh_f32(x)
    if x == types.float64:
        return lambda x: math.tanh(x)
    return None


# Half-precision storage. numba has no float16/bfloat16 arrays on the CPU, so
# the API layer hands such arrays to the kernels as integer views: float16 as
# int16, bfloat16 as uint16 (see ``fastloss._validate.kernel_view``). ``load``
# and ``store`` below convert in registers, so no float32 copy is ever made.


@njit(fastmath=_FM)
def f16_to_f32(h):
    """Decode float16 bits (held in an int16) exactly, subnormals, inf and NaN included."""
    u = np.int32(h) & np.int32(0xFFFF)
    sign = (u & np.int32(0x8000)) << np.int32(16)
    em = u & np.int32(0x7FFF)
    # Shift exponent+mantissa into float32 position and rebias by 2**112;
    # this also renormalises subnormals. Inf/NaN get the all-ones exponent.
    v = _i32_as_f32(np.int32(em << np.int32(13))) * np.float32(5.192296858534828e33)
    special = _i32_as_f32(np.int32((em << np.int32(13)) | np.int32(0x7F800000)))
    v = special if em >= np.int32(0x7C00) else v
    return _i32_as_f32(np.int32(_f32_as_i32(v) | sign))


@njit(fastmath=_FM)
def f32_to_f16(f):
    """Round a float32 to float16 bits (nearest-even; overflow to inf, NaN kept), as int16."""
    b = _f32_as_i32(f)
    sign = b & np.int32(-2147483648)
    a = b ^ sign
    # Normal range: rebias exponent, round to nearest even on bit 13.
    odd = (a >> np.int32(13)) & np.int32(1)
    normal = (a + np.int32(-939524096 + 0xFFF) + odd) >> np.int32(13)
    # Subnormal range: let the FPU align the mantissa by adding 0.5.
    sub = _f32_as_i32(_i32_as_f32(a) + np.float32(0.5)) - np.int32(0x3F000000)
    o = sub if a < np.int32(0x38800000) else normal
    o = np.int32(0x7C00) if a >= np.int32(0x47800000) else o
    o = np.int32(0x7E00) if a > np.int32(0x7F800000) else o
    return np.int16(o | (sign >> np.int32(16)))


@njit(fastmath=_FM)
def bf16_to_f32(h):
    """Decode bfloat16 bits (held in a uint16): they are the top half of a float32."""
    return _i32_as_f32(np.int32(np.int32(h) << np.int32(16)))


@njit(fastmath=_FM)
def f32_to_bf16(f):
    """Round a float32 to bfloat16 bits (nearest-even, NaN stays NaN), as uint16."""
    b = _f32_as_i32(f)
    r = (b + np.int32(0x7FFF) + ((b >> np.int32(16)) & np.int32(1))) >> np.int32(16)
    nan = (b & np.int32(0x7FFFFFFF)) > np.int32(0x7F800000)
    r = ((b >> np.int32(16)) | np.int32(0x40)) if nan else r
    return np.uint16(r & np.int32(0xFFFF))


def load(v):
    """Element of a kernel array -> accumulation type (float32, or float64 for float64)."""


@overload(load, fastmath=_FM)
def _load_ol(v):
    if v == types.int16:
        return lambda v: f16_to_f32(v)
    if v == types.uint16:
        return lambda v: bf16_to_f32(v)
    if v in (types.float32, types.float64):
        return lambda v: v
    return None


def store(row, j, v):
    """row[j] = v, rounding the accumulation value once to the row's storage type."""


@overload(store, fastmath=_FM)
def _store_ol(row, j, v):
    if row.dtype == types.int16:
        def impl(row, j, v):
            row[j] = f32_to_f16(np.float32(v))
    elif row.dtype == types.uint16:
        def impl(row, j, v):
            row[j] = f32_to_bf16(np.float32(v))
    else:
        def impl(row, j, v):
            row[j] = v
    return impl


@njit(fastmath=_FM)
def ordered_bits(v):
    """Map float32 bits to int32 so that integer order equals float order.

    Integer max reductions vectorise where LLVM will not vectorise a float max
    without assuming no NaN (see PERF.md); NaN maps above +inf or below -inf,
    which is harmless because NaN propagates through the exp sum anyway.
    """
    b = _f32_as_i32(v)
    return b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF))


@njit(fastmath=_FM)
def from_ordered_bits(b):
    """Inverse of :func:`ordered_bits`."""
    return _i32_as_f32(np.int32(b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF))))


def row_max(row):
    """Maximum of ``load(row[j])``; -inf for an all -inf row (NaN handling: see ordered_bits)."""


@overload(row_max, fastmath=_FM)
def _row_max_ol(row):
    if row.dtype == types.float64:
        def impl(row):
            m = -np.inf
            for j in range(row.shape[0]):
                v = row[j]
                m = v if v > m else m
            return m
    else:
        def impl(row):
            m = np.int32(-2147483647)  # ordered_bits(-inf) - 1: below every float
            for j in range(row.shape[0]):
                b = ordered_bits(load(row[j]))
                m = b if b > m else m
            return from_ordered_bits(m)
    return impl


def as_acc(v, like):
    """Cast a scalar to the accumulation type of ``like`` (float32 or float64).

    numba promotes float32 op int64 to float64; row-level coefficients are
    computed in float64 and cast back before they enter a vectorised loop.
    """


@overload(as_acc)
def _as_acc_ol(v, like):
    if like == types.float32:
        return lambda v, like: np.float32(v)
    return lambda v, like: np.float64(v)
