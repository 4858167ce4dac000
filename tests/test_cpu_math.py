"""The scalar numerics of the CPU kernels (fastloss.cpu._math), checked exhaustively
where the domain is small: half-precision decode over all 65536 bit patterns,
encode against numpy/ml_dtypes on millions of float32 bit patterns (ties,
subnormals, overflow, NaN), exp_f32 and log_f32 against float64, ordered_bits order."""

import warnings

import ml_dtypes
import numpy as np
import pytest
from numba import njit

from fastloss.cpu import _math as M


def _elementwise(f):
    """A compiled loop out[i] = f(vals[i])."""
    @njit
    def run(vals, out):
        for i in range(vals.shape[0]):
            out[i] = f(vals[i])
    return run


@njit
def _encode(vals, out):
    for i in range(vals.shape[0]):
        M.store(out, i, vals[i])


_decode = _elementwise(M.load)
_exp = _elementwise(M.exp_f32)
_log = _elementwise(M.log_f32)
_log_acc = _elementwise(M.log)
_ordered = _elementwise(M.ordered_bits)


HALVES = [(np.float16, np.int16), (ml_dtypes.bfloat16, np.uint16)]


def _same_bits(a, b, dtype):
    """Equal bit patterns, any NaN matching any NaN."""
    fa, fb = a.view(dtype).astype(np.float32), b.view(dtype).astype(np.float32)
    return (a == b) | (np.isnan(fa) & np.isnan(fb))


@pytest.mark.parametrize("dtype, view", HALVES, ids=["float16", "bfloat16"])
def test_decode_every_bit_pattern(dtype, view):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(view)
    out = np.empty(bits.size, np.float32)
    _decode(bits, out)
    ref = bits.view(dtype).astype(np.float32)
    nan = np.isnan(ref)
    assert np.isnan(out[nan]).all()
    np.testing.assert_array_equal(out[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def _encode_cases(rng):
    random_bits = rng.integers(0, 1 << 32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    top = np.arange(1 << 16, dtype=np.uint32) << 16
    return np.concatenate([
        random_bits.view(np.float32),
        (top | 0x8000).view(np.float32),             # bfloat16 ties (round half to even)
        (top | 0x7FFF).view(np.float32),             # just below the ties
        (top | 0x8001).view(np.float32),             # just above
        (top | 0x1000).view(np.float32),             # float16 ties in the mantissa bits
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.996, 65520.0,
                  6.0e-8, 2.98e-8, 2.99e-8, 1e-45, -1e-45, 3.4e38, -3.4e38], np.float32),
    ])


@pytest.mark.parametrize("dtype, view", HALVES, ids=["float16", "bfloat16"])
def test_encode_matches_numpy_rounding(rng, dtype, view):
    vals = _encode_cases(rng)
    out = np.empty(vals.size, view)
    _encode(vals, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow to inf is the expected result
        ref = vals.astype(dtype).view(view)
    same = _same_bits(out, ref, dtype)
    assert same.all(), (vals[~same][:5], out[~same][:5], ref[~same][:5])


def test_exp_f32_accuracy_and_specials():
    x = np.linspace(-87.0, 88.0, 1_000_001, dtype=np.float32)
    out = np.empty_like(x)
    _exp(x, out)
    ref = np.exp(x.astype(np.float64))
    assert (np.abs(out - ref) / ref).max() < 5e-7
    special = np.array([-np.inf, -1e30, -87.4, -100.0, np.nan, 0.0], np.float32)
    out = np.empty_like(special)
    _exp(special, out)
    np.testing.assert_array_equal(out[:4], 0.0)
    assert np.isnan(out[4]) and out[5] == 1.0


def test_log_f32_accuracy_over_every_exponent(rng):
    # Random bit patterns of every positive finite float32 (all exponents,
    # subnormals included), plus the neighbourhood of 1 where log is near 0
    # (an absolute bound there) and both ends of the reduction interval.
    bits = rng.integers(1, 0x7F800000, 2_000_000).astype(np.uint32)
    sub = rng.integers(1, 0x00800000, 200_000).astype(np.uint32)   # subnormals only
    near1 = (np.float32(1.0) + rng.uniform(-0.3, 0.42, 500_000)).astype(np.float32)
    edges = np.array([1e-45, 2.8e-45, 1.1754942e-38, 1.17549435e-38, 1.1754945e-38, 0.70710677,
                      0.7071068, 1.4142135, 1.4142137, 0.5, 2.0, 1.0, 3.4028235e38], np.float32)
    x = np.concatenate([bits.view(np.float32), sub.view(np.float32), near1, edges])
    out = np.empty_like(x)
    _log(x, out)
    ref = np.log(x.astype(np.float64))
    assert np.isfinite(out).all()
    err = np.abs(out - ref)
    big = np.abs(ref) > 0.5
    assert (err[big] / np.abs(ref[big])).max() < 2e-7
    assert err[~big].max() < 4e-8
    assert out[np.flatnonzero(x == 1.0)[0]] == 0.0


def test_log_f32_specials():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -1.0, -1e-45, -3.4e38], np.float32)
    out = np.empty_like(x)
    _log(x, out)
    assert out[0] == -np.inf and out[1] == -np.inf and out[2] == np.inf
    assert np.isnan(out[3:]).all()


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-7), (np.float64, 1e-15)], ids=["float32", "float64"])
def test_log_dispatches_on_precision(dtype, rtol):
    x = np.array([1e-30, 0.25, 3.0, 7.5e20], dtype)
    out = np.empty_like(x)
    _log_acc(x, out)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, np.log(x.astype(np.float64)), rtol=rtol)


def test_ordered_bits_preserve_float_order(rng):
    v = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 100,
                        np.array([-np.inf, np.inf, 0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38],
                                 np.float32)])
    out = np.empty(v.size, np.int32)
    _ordered(v, out)
    order = np.argsort(v, kind="stable")
    dv, db = np.diff(v[order]), np.diff(out[order].astype(np.int64))
    assert (db[dv > 0] > 0).all()  # (-0.0 and 0.0 compare equal; their bits may come in either order)


@njit
def _stream_copy_fenced(dst, src):
    M.stream_copy(dst, src)
    M.store_fence()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int16])
def test_stream_copy_every_offset_and_length(dtype):
    """stream_copy writes exactly dst[:n] = src for every alignment of both
    ends and lengths around the 64-byte lines (head only, head + lines +
    tail, whole lines), and nothing past n."""
    src = (np.arange(1, 400) * 7 + 3).astype(dtype)
    for lo in range(0, 40, 3):
        for n in (0, 1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 200, 333):
            for so in (0, 1, 5):
                dst = np.full(400, 99, dtype)
                _stream_copy_fenced(dst[lo:], src[so:so + n])
                want = np.full(400, 99, dtype)
                want[lo:lo + n] = src[so:so + n]
                assert np.array_equal(dst, want), (lo, n, so)


def test_stream_copy_uses_streaming_stores_on_x86():
    """On x86-64 the bulk of the copy is non-temporal vector stores and the
    fence is an sfence (else both are plain code)."""
    a = np.zeros(1024, np.float32)
    _stream_copy_fenced(a, a[:512].copy())
    asm = _stream_copy_fenced.inspect_asm(_stream_copy_fenced.signatures[0])
    if M.HAS_STREAM_STORES:
        assert "vmovnt" in asm or "movnt" in asm
        assert "sfence" in asm
    else:
        assert "movnt" not in asm


@njit
def _affine_scalar(out, er, a, c):
    """The scalar loop store_affine replaces for bfloat16 rows."""
    for j in range(er.shape[0]):
        M.store(out, j, a * er[j] - c)


@njit
def _affine(out, er, a, c, finite):
    M.store_affine(out, er, a, c, finite)


def test_store_affine_bf16_same_bits_as_the_scalar_store(rng):
    """The vectorised bfloat16 store (bulk of 32 + scalar tail) writes exactly
    the bits of the scalar loop, and those are ml_dtypes' rounding of the
    float32 value: ties, values just off the ties, subnormal and overflowing
    results, NaN and +-inf, at every length around the 32-element step and
    nothing past n."""
    vals = _encode_cases(rng)[-200_000:].copy()
    a, c = np.float32(1.0), np.float32(0.0)  # a * v - c == v: the encode cases reach the rounding unchanged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = vals.astype(ml_dtypes.bfloat16).view(np.uint16)
    for finite in (False, True):
        # The finite variant gets the values without NaN, which is its contract.
        v = vals[~np.isnan(vals)] if finite else vals
        r = ref[~np.isnan(vals)] if finite else ref
        got = np.empty(v.size, np.uint16)
        _affine(got, v, a, c, finite)
        same = _same_bits(got, r, ml_dtypes.bfloat16)
        assert same.all(), (finite, v[~same][:5], got[~same][:5], r[~same][:5])
    er = (rng.standard_normal(300) * 3).astype(np.float32)
    er[[40, 77, 101]] = [np.inf, 1e-39, 3.4e38]
    er_nan = er.copy()
    er_nan[3] = np.nan
    for a, c in ((np.float32(0.37), np.float32(1.3e-5)), (np.float32(-2.5), np.float32(-0.75))):
        for n in (0, 1, 31, 32, 33, 63, 64, 65, 100, 257):
            for src, finite in ((er_nan, False), (er, False), (er, True)):
                got = np.full(300, 0xABCD, np.uint16)
                want = np.full(300, 0xABCD, np.uint16)
                _affine(got, src[:n], a, c, finite)
                _affine_scalar(want, src[:n], a, c)
                assert np.array_equal(got, want), (n, a, c, finite)


def test_store_affine_bf16_is_one_word_shuffle_per_32():
    """The bfloat16 bulk packs two rounded vectors with one word shuffle
    (vpermt2w / vpermi2w on AVX-512BW; AVX2 code packs otherwise), not a
    vpmovdw store per 16 elements."""
    out, er = np.empty(64, np.uint16), np.ones(64, np.float32)
    _affine(out, er, np.float32(1.0), np.float32(0.0), False)
    asm = _affine.inspect_asm(_affine.signatures[0])
    if "zmm" in asm:
        assert "vpermt2w" in asm or "vpermi2w" in asm
