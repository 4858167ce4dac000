"""Scalar numerics shared by the CPU kernels: bit casts, a vectorisable exp
and log, tanh, and float16/bfloat16 <-> float32 conversion; at the end, their
float64 twins (a vectorisable float64 exp, order-preserving float64 bits).

Everything here is ``inline="always"`` so it is compiled into the loops of the
calling kernel, where LLVM can vectorise it (numba's own ``math.exp`` on
float32 is a scalar libm call, ~10x slower here; see PERF.md).
"""

import math
import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic, overload

from .. import config

_FM = config.FASTMATH

_I16, _I32, _F32 = ir.IntType(16), ir.IntType(32), ir.FloatType()


@intrinsic
def i32_as_f32(typingctx, x):
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
def f32_as_i32(typingctx, x):
    """Reinterpret the bits of a float32 as an int32."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _shifter_k(typingctx, shifted):
    """int32 k from a float32 ``x / ln2 + 1.5 * 2**23``: its bits minus the shifter's.

    This and the two helpers below are 32-bit IR: numba would widen int32
    arithmetic to int64 (and the int->float cast to a 64-bit one), running
    exp's integer part on 8 lanes instead of 16.
    """
    if shifted != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.sub(builder.bitcast(args[0], _I32), ir.Constant(_I32, 0x4B400000))

    return types.int32(types.float32), codegen


@intrinsic
def _i32_to_f32(typingctx, k):
    """float32(k) for an int32 k (a 32-bit conversion)."""
    if k != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _F32)

    return types.float32(types.int32), codegen


@intrinsic
def _pow2(typingctx, k):
    """2**k as a float32 for an int32 k in [-126, 127], built from exponent bits."""
    if k != types.int32:
        return None

    def codegen(context, builder, sig, args):
        e = builder.shl(builder.add(args[0], ir.Constant(_I32, 127)), ir.Constant(_I32, 23))
        return builder.bitcast(e, _F32)

    return types.float32(types.int32), codegen


@njit(fastmath=_FM)
def exp_f32(x):
    """exp(x) for float32 x <= 88 (softmax arguments x - max are <= 0); relative
    error < 5e-7 (3.9e-7 measured over [-87, 88]). Arguments below -87.3
    (including -inf) give exactly 0; NaN gives NaN.

    exp(x) = 2**k * exp(r), k = round(x / ln 2), |r| <= ln2 / 2, exp(r) =
    1 + r + r**2 q(r) with q a cubic fitted for the least maximum relative
    error on that interval (1.6e-7 in float32; the kernels' exp loops are
    bound by the FMA pipes, and a cubic instead of the Taylor quartic saves one
    FMA of nine per element: 7-8% faster from L1 on Zen 4, see
    docs/performance.md); 2**k is built from exponent bits. k is rounded with
    the 1.5 * 2**23 shifter and read back from the float's bits (no floor, no
    float->int conversion; together ~2.4x faster than a floor-based version
    here). k is converted back with an int->float cast rather than by
    subtracting the shifter, which ``reassoc`` would fold away.
    """
    xc = np.float32(-87.3) if x < np.float32(-87.3) else x
    shifted = xc * np.float32(1.4426950408889634) + np.float32(12582912.0)
    ki = _shifter_k(shifted)
    kf = _i32_to_f32(ki)
    r = xc - kf * np.float32(0.693359375)
    r = r - kf * np.float32(-2.12194440e-4)
    p = np.float32(8.31253e-3)
    p = p * r + np.float32(4.189011e-2)
    p = p * r + np.float32(1.6667114e-1)
    p = p * r + np.float32(4.999923e-1)
    p = p * r * r + r + np.float32(1.0)
    y = p * _pow2(ki)
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


@intrinsic
def _log_exponent(typingctx, bits):
    """float32(e) for the bits of a positive normal float32 ``2**e * f`` with
    ``f`` in [sqrt(1/2), sqrt(2)): ``(bits - bits(sqrt(1/2))) >> 23`` (32-bit IR)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, sig, args):
        i = builder.sub(args[0], ir.Constant(_I32, _SQRT_HALF_BITS))
        return builder.sitofp(builder.ashr(i, ir.Constant(_I32, 23)), _F32)

    return types.float32(types.int32), codegen


@intrinsic
def _log_mantissa(typingctx, bits):
    """The ``f`` of :func:`_log_exponent`, in [sqrt(1/2), sqrt(2)): the bits with
    ``e`` taken out of the exponent field (32-bit IR)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, sig, args):
        i = builder.sub(args[0], ir.Constant(_I32, _SQRT_HALF_BITS))
        e = builder.shl(builder.ashr(i, ir.Constant(_I32, 23)), ir.Constant(_I32, 23))
        return builder.bitcast(builder.sub(args[0], e), _F32)

    return types.float32(types.int32), codegen


_SQRT_HALF_BITS = 0x3F3504F3  # float32 bits of sqrt(1/2)


@njit(fastmath=_FM)
def log_f32(x):
    """log(x) for float32 x, relative error < 2e-7 (absolute near x = 1),
    vectorisable (no libm call). 0 -> -inf, +inf -> +inf, negative or NaN -> NaN;
    subnormals are scaled by 2**23 first.

    x = 2**e * f with f in [sqrt(1/2), sqrt(2)), both split off in 32-bit
    integer IR (``_log_exponent``/``_log_mantissa``: numba would widen the
    integer part to int64, halving the SIMD width); log(f) = log1p(f - 1) by
    Cephes' degree-8 polynomial; e ln 2 is added in two parts. The special
    values are plain selects (branches kept loops from vectorising).
    """
    tiny = x < np.float32(1.17549435e-38)
    xs = x * np.float32(8388608.0) if tiny else x
    bits = f32_as_i32(xs)
    ef = _log_exponent(bits) - (np.float32(23.0) if tiny else np.float32(0.0))
    f = _log_mantissa(bits) - np.float32(1.0)
    z = f * f
    p = np.float32(7.0376836292e-2)
    p = p * f - np.float32(1.1514610310e-1)
    p = p * f + np.float32(1.1676998740e-1)
    p = p * f - np.float32(1.2420140846e-1)
    p = p * f + np.float32(1.4249322787e-1)
    p = p * f - np.float32(1.6668057665e-1)
    p = p * f + np.float32(2.0000714765e-1)
    p = p * f - np.float32(2.4999993993e-1)
    p = p * f + np.float32(3.3333331174e-1)
    y = f * z * p + ef * np.float32(-2.12194440e-4) - np.float32(0.5) * z
    r = f + y + ef * np.float32(0.693359375)
    r = np.float32(-np.inf) if x == np.float32(0.0) else r
    r = x if x == np.float32(np.inf) else r
    return r if x >= np.float32(0.0) else np.float32(np.nan)


def _by_precision(f32, f64):
    """The body of an ``overload`` that calls ``f32`` for a float32 argument and
    ``f64`` for a float64 one (the accumulation precisions); other types: no match."""
    def impl(x):
        if x == types.float32:
            return lambda x: f32(x)
        if x == types.float64:
            return lambda x: f64(x)
        return None
    return impl


def exp(x):
    """exp in the accumulation precision (dispatched on the argument type)."""


def log(x):
    """log in the accumulation precision (dispatched on the argument type)."""


def tanh(x):
    """tanh in the accumulation precision (dispatched on the argument type)."""


overload(exp, fastmath=_FM)(_by_precision(exp_f32, math.exp))
overload(log, fastmath=_FM)(_by_precision(log_f32, math.log))
overload(tanh, fastmath=_FM)(_by_precision(tanh_f32, math.tanh))


# Half-precision storage. numba has no float16/bfloat16 arrays on the CPU, so
# the API layer hands such arrays to the kernels as integer views: float16 as
# int16, bfloat16 as uint16 (see ``fastloss._validate.kernel_view``). ``load``
# and ``store`` below convert in registers, so no float32 copy is ever made.


# The conversions are LLVM IR written out (intrinsics) rather than numba
# integer code: numba widens int32 arithmetic to int64, which halves the SIMD
# width of the conversion loops (the bfloat16 gradient store ran at float32
# speed per element, i.e. half the bandwidth). float16 uses LLVM's ``half``
# type, so the CPU's F16C instructions (vcvtph2ps / vcvtps2ph) do the exact
# IEEE conversion, subnormals and NaN included; bfloat16 is 32-bit integer IR.



@intrinsic
def f16_to_f32(typingctx, h):
    """Decode float16 bits (held in an int16) to float32, exactly."""
    if h != types.int16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)

    return types.float32(types.int16), codegen


@intrinsic
def f32_to_f16(typingctx, f):
    """Round a float32 to float16 bits (IEEE nearest-even; overflow to inf, NaN stays NaN), as int16."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return types.int16(types.float32), codegen


@intrinsic
def bf16_to_f32(typingctx, h):
    """Decode bfloat16 bits (held in a uint16): they are the top half of a float32."""
    if h != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        wide = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
        return builder.bitcast(wide, _F32)

    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_bf16(typingctx, f):
    """Round a float32 to bfloat16 bits (nearest-even, overflow to inf, NaN stays a quiet NaN), as uint16.

    Bit-exact with ml_dtypes (tests/test_cpu_math.py). The CPU's own
    conversion (AVX512-BF16 vcvtneps2bf16, LLVM ``fptrunc`` to ``bfloat``) was
    slower here in the gradient loop and flushes subnormals, so it is not used.
    """
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        def c(v):
            return ir.Constant(_I32, v)

        b = builder.bitcast(args[0], _I32)
        high = builder.lshr(b, c(16))
        odd = builder.and_(high, c(1))
        rounded = builder.lshr(builder.add(builder.add(b, c(0x7FFF)), odd), c(16))
        is_nan = builder.icmp_unsigned(">", builder.and_(b, c(0x7FFFFFFF)), c(0x7F800000))
        quiet = builder.or_(high, c(0x40))
        return builder.trunc(builder.select(is_nan, quiet, rounded), _I16)

    return types.uint16(types.float32), codegen


@intrinsic
def prefetch(typingctx, arr, i):
    """Hint the CPU to bring the cache line holding ``arr[i]`` (1-D, C order) into
    cache (``llvm.prefetch``: read, high locality). ``i`` must be in bounds."""
    if not isinstance(arr, types.Array) or arr.ndim != 1 or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p = builder.bitcast(ptr, ir.IntType(8).as_pointer())
        fnty = ir.FunctionType(ir.VoidType(), [i8p.type, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [i8p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(arr, i), codegen


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


@intrinsic
def ordered_bits(typingctx, v):
    """Map float32 bits to int32 so that integer order equals float order.

    Integer max reductions vectorise where LLVM will not vectorise a float max
    without assuming no NaN (see PERF.md); NaN maps above +inf or below -inf,
    which is harmless because NaN propagates through the exp sum anyway.
    Written as 32-bit IR so the max runs on 16 int32 lanes (numba would widen
    the integer ops to int64, halving the SIMD width).
    """
    if v != types.float32:
        return None

    def codegen(context, builder, sig, args):
        b = builder.bitcast(args[0], _I32)
        sign = builder.ashr(b, ir.Constant(_I32, 31))
        return builder.xor(b, builder.and_(sign, ir.Constant(_I32, 0x7FFFFFFF)))

    return types.int32(types.float32), codegen


@njit(fastmath=_FM)
def from_ordered_bits(b):
    """Inverse of :func:`ordered_bits`."""
    return i32_as_f32(np.int32(b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF))))


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


# float64 twins (the float64 block sums of fastloss.cpu.vocab_stats) -------------------

_I64, _F64 = ir.IntType(64), ir.DoubleType()


@intrinsic
def f64_as_i64(typingctx, x):
    """The bits of a float64 as an int64."""
    if x != types.float64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _I64)

    return types.int64(types.float64), codegen


@intrinsic
def _pow2_f64(typingctx, k):
    """2**k as a float64 for an int64 k in [-1022, 1023], built from exponent bits."""
    if k != types.int64:
        return None

    def codegen(context, builder, sig, args):
        e = builder.shl(builder.add(args[0], ir.Constant(_I64, 1023)), ir.Constant(_I64, 52))
        return builder.bitcast(e, _F64)

    return types.float64(types.int64), codegen


_SHIFTER64 = 6755399441055744.0  # 1.5 * 2**52: x + it rounds x to an integer in the low bits
_SHIFTER64_BITS = 0x4338000000000000


# No ``reassoc`` here: it would let LLVM merge the two-part ln 2 reduction
# and reorder the polynomial. The flags are per instruction, so they survive
# inlining into the vectorised (``reassoc``) loops of the kernel.
@njit(fastmath={"nsz", "contract"})
def exp_f64(x):
    """exp(x) for float64 x in [EXP64_LOW, 88] (and NaN), within ~2 ulp.

    exp(x) = 2**k exp(r), k = round(x / ln 2) (the shifter, read back from the
    bits), r = x - k ln 2 in two parts, |r| <= ln2 / 2, exp(r) by its Taylor
    polynomial of degree 13 (truncation < 1e-18), 2**k from exponent bits.
    """
    k = f64_as_i64(x * 1.4426950408889634 + _SHIFTER64) - _SHIFTER64_BITS
    kf = np.float64(k)
    r = x - kf * 6.93147180369123816490e-01
    r = r - kf * 1.90821492927058770002e-10
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r * r + r + 1.0
    return p * _pow2_f64(k)


#: The float64 exps are taken of arguments clamped below at this, and are 0
#: there: exp(-708) = 3.3e-308, the smallest normal float64 is 2.2e-308 (no
#: subnormal handling in ``exp_f64``). A term that small cannot change a
#: row's sum, which is >= 1 (its max term is exp(0)).
EXP64_LOW = -708.0


@intrinsic
def ordered_bits64(typingctx, v):
    """Map float64 bits to int64 so that integer order equals float order (the
    float64 twin of ``ordered_bits``: NaN maps above +inf or below -inf)."""
    if v != types.float64:
        return None

    def codegen(context, builder, sig, args):
        b = builder.bitcast(args[0], _I64)
        sign = builder.ashr(b, ir.Constant(_I64, 63))
        return builder.xor(b, builder.and_(sign, ir.Constant(_I64, 0x7FFFFFFFFFFFFFFF)))

    return types.int64(types.float64), codegen


@intrinsic
def i64_as_f64(typingctx, b):
    """Reinterpret int64 bits as a float64."""
    if b != types.int64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _F64)

    return types.float64(types.int64), codegen


# Streaming (non-temporal) stores --------------------------------------------------------

#: Whether this CPU has non-temporal vector stores and ``sfence`` (x86-64).
HAS_STREAM_STORES = platform.machine().lower() in ("x86_64", "amd64")

_V16I32 = ir.VectorType(_I32, 16)


def _data_pointer(context, builder, aryty, ary):
    """The data pointer of a numba array value, as an i8*."""
    return builder.bitcast(context.make_array(aryty)(context, builder, ary).data, ir.IntType(8).as_pointer())


@intrinsic
def stream_copy(typingctx, dst, src):
    """dst[:n] = src[:n], n = src.shape[0] (1-D C-order arrays of one dtype,
    ``dst`` at least as long), the bulk with non-temporal stores of aligned
    64-byte lines: the lines go to memory without being read first (no
    read-for-ownership) and without evicting the caches. Head and tail (up to
    63 bytes each) are copied element by element with plain stores. Without
    ``HAS_STREAM_STORES`` every store is plain. The stores are weakly ordered:
    :func:`store_fence` must run before another thread reads ``dst``."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.ndim == 1
            and src.ndim == 1 and dst.dtype == src.dtype and dst.layout == "C" and src.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        dty, sty = sig.args
        intp = context.get_value_type(types.intp)
        item = context.get_abi_sizeof(context.get_data_type(dty.dtype))
        elt = context.get_data_type(dty.dtype)
        sary = context.make_array(sty)(context, builder, args[1])
        n = cgutils.unpack_tuple(builder, sary.shape, 1)[0]
        d = _data_pointer(context, builder, dty, args[0])
        s = _data_pointer(context, builder, sty, args[1])
        nbytes = builder.mul(n, ir.Constant(intp, item))
        # Elements before the first 64-byte boundary of dst (all of them for a short copy).
        mis = builder.and_(builder.sub(ir.Constant(intp, 0), builder.ptrtoint(d, intp)), ir.Constant(intp, 63))
        head = builder.select(builder.icmp_signed("<", nbytes, mis), nbytes, mis)
        body_end = builder.add(head, builder.and_(builder.sub(nbytes, head), ir.Constant(intp, ~63)))
        if not HAS_STREAM_STORES:
            head = body_end = nbytes

        def copy_elements(lo, hi):
            with cgutils.for_range_slice(builder, lo, hi, ir.Constant(intp, item), intp=intp) as (off, _):
                sp = builder.bitcast(builder.gep(s, [off]), elt.as_pointer())
                dp = builder.bitcast(builder.gep(d, [off]), elt.as_pointer())
                builder.store(builder.load(sp, align=item), dp, align=item)

        copy_elements(ir.Constant(intp, 0), head)
        nt = builder.module.add_metadata([ir.Constant(_I32, 1)])
        with cgutils.for_range_slice(builder, head, body_end, ir.Constant(intp, 64), intp=intp) as (off, _):
            sp = builder.bitcast(builder.gep(s, [off]), _V16I32.as_pointer())
            dp = builder.bitcast(builder.gep(d, [off]), _V16I32.as_pointer())
            st = builder.store(builder.load(sp, align=1), dp, align=64)
            st.set_metadata("nontemporal", nt)
        copy_elements(body_end, nbytes)
        return context.get_dummy_value()

    return types.void(dst, src), codegen


@intrinsic
def store_fence(typingctx):
    """``sfence``: the streaming stores issued so far are globally visible
    before any later store (no-op without ``HAS_STREAM_STORES``)."""

    def codegen(context, builder, sig, args):
        if HAS_STREAM_STORES:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse.sfence")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


# The bfloat16 gradient store ---------------------------------------------------------

#: Elements per iteration of :func:`affine_bf16_bulk`: two 16-lane float32 vectors.
BF16_STORE_STEP = 32

_V16F32 = ir.VectorType(_F32, 16)
_V32I16 = ir.VectorType(_I16, 32)


def _splat(builder, vty, x):
    """A vector of type ``vty`` with every lane ``x`` (an IR value)."""
    lane0 = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vty.count), [ir.Constant(_I32, 0)] * vty.count)
    return builder.shuffle_vector(lane0, ir.Constant(vty, ir.Undefined), zeros)


def _const16(ty, v):
    return ir.Constant(ir.VectorType(ty, 16), [ir.Constant(ty, v)] * 16)


def _round_bf16_v16(builder, v, finite):
    """:func:`f32_to_bf16` of 16 float32 lanes, before the truncation: the
    bfloat16 bits are the high half of each int32 lane. NaN is found with one
    unordered compare (no mask and integer compare); with ``finite`` (no lane
    is NaN) not at all."""
    b = builder.bitcast(v, _V16I32)
    odd = builder.and_(builder.lshr(b, _const16(_I32, 16)), _const16(_I32, 1))
    rounded = builder.add(builder.add(b, _const16(_I32, 0x7FFF)), odd)
    if finite:
        return rounded
    is_nan = builder.fcmp_unordered("uno", v, v)
    return builder.select(is_nan, builder.or_(b, _const16(_I32, 0x400000)), rounded)


def _affine_bf16_bulk(finite):
    """The intrinsic below; with ``finite`` it omits the NaN check (see :func:`store_affine`)."""

    def affine_bf16_bulk(typingctx, out, er, a, c):
        """out[j] = f32_to_bf16(a er[j] - c) for j < n - n % BF16_STORE_STEP, n = er.shape[0]
        (``out``: uint16, ``er``: float32, 1-D C order, ``out`` at least as long);
        the caller stores the rest. The same bits as :func:`store` of ``a * er[j]
        - c`` in a kernel loop (``llvm.fmuladd``, contracted to one FMA where the
        loop's would be), in explicit 16-lane vectors: two float32 vectors are
        rounded and their high halves packed into one vector of 32 bfloat16 by a
        single word shuffle. LLVM vectorises the scalar loop with one
        ``vpmovdw`` store per 16 elements instead, which costs the gradient pass
        ~25% more on Zen 4 (tests/test_cpu_math.py checks the bits)."""
        if not (isinstance(out, types.Array) and isinstance(er, types.Array) and out.ndim == 1 and er.ndim == 1
                and out.dtype == types.uint16 and er.dtype == types.float32 and out.layout == "C"
                and er.layout == "C" and a == types.float32 and c == types.float32):
            return None

        def codegen(context, builder, sig, args):
            intp = context.get_value_type(types.intp)
            oty, ety = sig.args[0], sig.args[1]
            eary = context.make_array(ety)(context, builder, args[1])
            n = cgutils.unpack_tuple(builder, eary.shape, 1)[0]
            o = _data_pointer(context, builder, oty, args[0])
            e = builder.bitcast(eary.data, ir.IntType(8).as_pointer())
            fmuladd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_V16F32, [_V16F32] * 3), "llvm.fmuladd.v16f32")
            av = _splat(builder, _V16F32, args[2])
            ncv = builder.fneg(_splat(builder, _V16F32, args[3]))
            odd_words = ir.Constant(ir.VectorType(_I32, 32), [ir.Constant(_I32, 2 * i + 1) for i in range(32)])
            step = BF16_STORE_STEP
            bulk = builder.mul(builder.udiv(n, ir.Constant(intp, step)), ir.Constant(intp, step))
            with cgutils.for_range_slice(builder, ir.Constant(intp, 0), bulk, ir.Constant(intp, step),
                                         intp=intp) as (j, _):
                halves = []
                for k in (0, 16):
                    p = builder.bitcast(builder.gep(e, [builder.mul(builder.add(j, ir.Constant(intp, k)),
                                                                    ir.Constant(intp, 4))]), _V16F32.as_pointer())
                    v = builder.call(fmuladd, [av, builder.load(p, align=4), ncv])
                    halves.append(builder.bitcast(_round_bf16_v16(builder, v, finite), _V32I16))
                packed = builder.shuffle_vector(halves[0], halves[1], odd_words)
                q = builder.bitcast(builder.gep(o, [builder.mul(j, ir.Constant(intp, 2))]), _V32I16.as_pointer())
                builder.store(packed, q, align=2)
            return context.get_dummy_value()

        return types.void(out, er, a, c), codegen

    return intrinsic(affine_bf16_bulk)


#: The bulk of :func:`store_affine` for bfloat16: any values / values known to be finite.
affine_bf16_bulk = _affine_bf16_bulk(False)
affine_bf16_bulk_finite = _affine_bf16_bulk(True)


def store_affine(row, er, a, c, finite):
    """row[j] = a er[j] - c (rounded once to the row's storage type) for j < er.shape[0].

    ``finite``: the caller knows ``a``, ``c`` and every ``er[j]`` are finite
    (the fused cross-entropy row's are when its sum is), so no ``a er[j] - c``
    is NaN (it may still round to +-inf); bfloat16 rows then skip the NaN
    check, a compare and a blend per vector of the rounding, which AVX2 code
    pays most for."""


@overload(store_affine, fastmath=_FM)
def _store_affine_ol(row, er, a, c, finite):
    if row.dtype == types.uint16 and er.dtype == types.float32 and row.layout == "C" and er.layout == "C":
        def impl(row, er, a, c, finite):
            n = er.shape[0]
            if finite:
                affine_bf16_bulk_finite(row, er, a, c)
            else:
                affine_bf16_bulk(row, er, a, c)
            for j in range(n - n % BF16_STORE_STEP, n):
                store(row, j, a * er[j] - c)
    else:
        def impl(row, er, a, c, finite):
            for j in range(er.shape[0]):
                store(row, j, a * er[j] - c)
    return impl
