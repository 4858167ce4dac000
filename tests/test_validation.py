"""Every error path of the public API: the exception type and a message that names
the offending argument (STYLE.md "Errors": name the argument, what was expected
and what was found).

Where the contract leaves a case open (e.g. ``out`` that *is* the logits, a
non-contiguous ``out``), the test accepts either a correct result or an error
that names the argument, and never a silent wrong answer or a crash.
"""

import re

import ml_dtypes
import numpy as np
import pytest

import fastloss
from reference import ce_reference, lse_reference, mse_reference, to_float64

BF16 = np.dtype(ml_dtypes.bfloat16)
N, V = 6, 5

CE_FUNCS = [
    pytest.param(fastloss.cross_entropy, id="cross_entropy"),
    pytest.param(fastloss.cross_entropy_with_grad, id="cross_entropy_with_grad"),
]
#: logits-only checks also apply to logsumexp (called without targets).
LOGITS_FUNCS = CE_FUNCS + [pytest.param(fastloss.logsumexp, id="logsumexp")]


def ce_inputs(rng, n=N, v=V, dtype=np.float32):
    logits = rng.standard_normal((n, v)).astype(dtype)
    targets = rng.integers(0, v, size=n)
    return logits, targets


def call_logits_fn(fn, logits, targets=None, **kw):
    if fn is fastloss.logsumexp:
        return fn(logits, **kw)
    if targets is None:
        targets = np.zeros(np.shape(logits)[:-1] if np.ndim(logits) else (), np.int64)
    return fn(logits, targets, **kw)


def names(arg):
    """A ``match=`` pattern: the argument's name as a word."""
    return rf"\b{re.escape(arg)}\b"


# --------------------------------------------------------------------------------------
# Valid baseline: the error tests below perturb one argument of a call that works.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", CE_FUNCS)
def test_baseline_call_works(rng, fn):
    logits, targets = ce_inputs(rng)
    fn(logits, targets, weight=np.ones(V, np.float32), label_smoothing=0.1, z_loss=1e-4,
       softcap=30.0, logit_scale=0.5, reduction="mean", normalizer=3.0)
    fastloss.logsumexp(logits, softcap=30.0, logit_scale=0.5)


# --------------------------------------------------------------------------------------
# logits
# --------------------------------------------------------------------------------------

BAD_LOGITS_DTYPES = [np.int8, np.int32, np.int64, np.uint8, np.complex64, np.complex128,
                     np.bool_, np.longdouble, object, "U3"]


@pytest.mark.parametrize("dtype", BAD_LOGITS_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("fn", LOGITS_FUNCS)
def test_logits_bad_dtype(fn, dtype):
    if np.dtype(dtype) == np.longdouble and np.dtype(np.longdouble) == np.float64:
        pytest.skip("longdouble is float64 on this platform")
    logits = np.arange(1, N * V + 1).reshape(N, V).astype(dtype)
    with pytest.raises(TypeError, match=names("logits")):
        call_logits_fn(fn, logits)


@pytest.mark.parametrize("fn", CE_FUNCS)
def test_logits_bad_dtype_even_when_empty(fn):
    with pytest.raises(TypeError, match=names("logits")):
        fn(np.empty((0, V), np.int32), np.empty((0,), np.int64))


@pytest.mark.parametrize("logits", [np.float32(1.5), np.array(2.0), 3.0], ids=["np-scalar", "0d", "float"])
@pytest.mark.parametrize("fn", LOGITS_FUNCS)
def test_logits_zero_dim(fn, logits):
    with pytest.raises(ValueError, match=names("logits")):
        call_logits_fn(fn, logits, targets=np.int64(0))


@pytest.mark.parametrize("shape", [(3, 0), (0,), (2, 3, 0), (0, 0)])
@pytest.mark.parametrize("fn", LOGITS_FUNCS)
def test_logits_no_classes(fn, shape):
    logits = np.empty(shape, np.float32)
    with pytest.raises(ValueError, match=names("logits")):
        call_logits_fn(fn, logits, targets=np.zeros(shape[:-1], np.int64))


# --------------------------------------------------------------------------------------
# targets: dtype, shape, range
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tdtype", [np.complex64, np.bool_, object])
@pytest.mark.parametrize("fn", CE_FUNCS)
def test_targets_bad_dtype(rng, fn, tdtype):
    logits, targets = ce_inputs(rng)
    with pytest.raises(TypeError, match=names("targets")):
        fn(logits, targets.astype(tdtype))


@pytest.mark.parametrize("tdtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("fn", CE_FUNCS)
def test_float_class_indices_are_not_probabilities(rng, fn, tdtype):
    # Integral values in a float dtype of the targets' shape are rejected: float
    # targets are class probabilities (PyTorch's reading), of the logits' shape.
    logits, targets = ce_inputs(rng)
    with pytest.raises(ValueError, match=r"targets: float \(probability\) targets must have the logits' shape"):
        fn(logits, targets.astype(tdtype))


@pytest.mark.parametrize(
    "lshape, tshape",
    [((N, V), (N + 1,)), ((N, V), (N, 1)), ((N, V), (2, 3)), ((N, V), ()), ((N, V), (N, V)),
     ((2, 3, V), (6,)), ((2, 3, V), (3, 2)), ((V,), (1,)), ((0, V), (1,))],
)
@pytest.mark.parametrize("fn", CE_FUNCS)
def test_targets_bad_shape(rng, fn, lshape, tshape):
    logits = rng.standard_normal(lshape).astype(np.float32)
    targets = np.zeros(tshape, np.int64)
    with pytest.raises(ValueError, match=names("targets")):
        fn(logits, targets)


@pytest.mark.parametrize("fn", CE_FUNCS)
def test_one_dim_logits_take_zero_dim_targets(rng, fn):
    """A single token (logits (V,)) takes a 0-d target: the shape rule, not an error."""
    logits = rng.standard_normal(V)
    ref_loss, _ = ce_reference(logits[None], np.array([2]), reduction="sum")
    loss = fn(logits, np.int64(2), reduction="sum")
    loss = loss[0] if isinstance(loss, tuple) else loss
    assert loss == pytest.approx(ref_loss, rel=1e-12)


def _assert_range_message(msg, count, first_pos, value):
    assert re.search(names("targets"), msg), msg
    assert re.search(rf"(?<![\d.]){count}(?![\d.])", msg), f"count {count} missing: {msg}"
    assert re.search(rf"(?<![\d.-]){re.escape(str(value))}(?![\d.])", msg), f"value {value} missing: {msg}"
    assert any(re.search(rf"(?<![\d.-]){re.escape(p)}(?![\d.])", msg) for p in first_pos), (
        f"first position {first_pos} missing: {msg}")


@pytest.mark.parametrize("tdtype", [np.int64, np.int32, np.int16])
@pytest.mark.parametrize("fn", CE_FUNCS)
def test_targets_out_of_range_message_1d(rng, fn, tdtype):
    """13 bad targets (value == V, negatives, far too large); first at 17 with 123."""
    v = 10
    logits = rng.standard_normal((40, v)).astype(np.float32)
    targets = rng.integers(0, v, size=40).astype(tdtype)
    targets[3] = -100  # ignored, not bad
    targets[17] = 123
    for k, bad in zip(range(20, 32), [10, -1, -7, 11, 10, 999, -2, 10, 50, -99, 12, 10]):
        targets[k] = bad
    with pytest.raises(ValueError, match=names("targets")) as exc:
        fn(logits, targets)
    _assert_range_message(str(exc.value), 13, ["17", "(17,)"], 123)


@pytest.mark.parametrize("fn", CE_FUNCS)
def test_targets_out_of_range_message_2d(rng, fn):
    v = 10
    logits = rng.standard_normal((5, 8, v))
    targets = rng.integers(0, v, size=(5, 8))
    targets[2, 1] = 123  # flat 17
    targets[3, 0] = 10
    targets[4, 7] = -5
    with pytest.raises(ValueError, match=names("targets")) as exc:
        fn(logits, targets)
    _assert_range_message(str(exc.value), 3, ["(2, 1)", "[2, 1]", "17"], 123)


@pytest.mark.parametrize("fn", CE_FUNCS)
def test_targets_out_of_range_uint64_not_wrapped(rng, fn):
    """2**64 - 1 must be reported as itself, not as -1 after a cast."""
    logits, _ = ce_inputs(rng)
    targets = np.array([0, 1, 2, 3, 2**64 - 1, 3], np.uint64)
    with pytest.raises(ValueError, match=names("targets")) as exc:
        fn(logits, targets, ignore_index=-1)
    _assert_range_message(str(exc.value), 1, ["4", "(4,)"], 2**64 - 1)


@pytest.mark.parametrize("fn", CE_FUNCS)
def test_targets_ignore_index_is_not_bad_but_default_is(rng, fn):
    logits, targets = ce_inputs(rng)
    targets[1] = 7
    fn(logits, targets.copy(), ignore_index=7)  # fine: position 1 is ignored
    targets[4] = -100  # -100 is only special for the default ignore_index
    with pytest.raises(ValueError, match=names("targets")) as exc:
        fn(logits, targets, ignore_index=7)
    _assert_range_message(str(exc.value), 1, ["4", "(4,)"], -100)


@pytest.mark.parametrize("fn", CE_FUNCS)
def test_targets_out_of_range_single_class(rng, fn):
    """V = 1: the only valid class is 0."""
    logits = rng.standard_normal((9, 1)).astype(np.float32)
    with pytest.raises(ValueError, match=names("targets")) as exc:
        fn(logits, np.array([0, 0, 0, 0, 0, 0, 7, 0, 5]))
    _assert_range_message(str(exc.value), 2, ["6", "(6,)"], 7)


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.5, 2.0, "x", None, [1], np.float64(3.0), 1 + 0j])
@pytest.mark.parametrize("fn", CE_FUNCS)
def test_ignore_index_not_int(rng, fn, bad):
    logits, targets = ce_inputs(rng)
    with pytest.raises(TypeError, match=names("ignore_index")):
        fn(logits, targets, ignore_index=bad)


@pytest.mark.parametrize("good", [np.int32(-1), np.int64(-100), np.uint8(3), 2**70])
@pytest.mark.parametrize("fn", CE_FUNCS)
def test_ignore_index_integer_types_accepted(rng, fn, good):
    logits, targets = ce_inputs(rng)
    fn(logits, targets, ignore_index=good)


@pytest.mark.parametrize("bad", ["avg", "MEAN", "", " mean", "elementwise_mean", "batchmean"])
@pytest.mark.parametrize("fn", CE_FUNCS)
def test_reduction_bad_string(rng, fn, bad):
    logits, targets = ce_inputs(rng)
    with pytest.raises(ValueError, match=names("reduction")):
        fn(logits, targets, reduction=bad)


@pytest.mark.parametrize("bad", [None, 1, b"mean", ["mean"]])
@pytest.mark.parametrize("fn", CE_FUNCS)
def test_reduction_not_a_string(rng, fn, bad):
    logits, targets = ce_inputs(rng)
    with pytest.raises((ValueError, TypeError), match=names("reduction")):
        fn(logits, targets, reduction=bad)


# (value, exception) for each numeric option; contract: ranges below.
OPTION_CASES = {
    # label_smoothing in [0, 1]
    "label_smoothing": [(-0.1, ValueError), (1.0001, ValueError), (np.nan, ValueError),
                        (np.inf, ValueError), (-np.inf, ValueError), ("0.1", TypeError),
                        (None, TypeError), ([0.1], TypeError)],
    # z_loss >= 0 (and a finite coefficient)
    "z_loss": [(-1e-4, ValueError), (-np.inf, ValueError), (np.nan, ValueError),
               (np.inf, ValueError), ("1e-4", TypeError), (None, TypeError)],
    # softcap > 0 or None
    "softcap": [(0.0, ValueError), (-1.0, ValueError), (-np.inf, ValueError),
                (np.nan, ValueError), ("30", TypeError), ([30.0], TypeError)],
    # logit_scale: a finite real number
    "logit_scale": [(np.nan, ValueError), (np.inf, ValueError), (-np.inf, ValueError),
                    ("2", TypeError), (None, TypeError), ([1.0], TypeError), (1 + 1j, TypeError)],
    # normalizer > 0 or None
    "normalizer": [(0.0, ValueError), (0, ValueError), (-3.0, ValueError), (np.nan, ValueError),
                   (np.inf, ValueError), ("8", TypeError), ([8.0], TypeError)],
}
OPTION_PARAMS = [
    pytest.param(opt, value, exc, id=f"{opt}={value!r}")
    for opt, cases in OPTION_CASES.items()
    for value, exc in cases
]


@pytest.mark.parametrize("option, value, exc", OPTION_PARAMS)
@pytest.mark.parametrize("fn", CE_FUNCS)
def test_option_out_of_range(rng, fn, option, value, exc):
    logits, targets = ce_inputs(rng)
    with pytest.raises(exc, match=names(option)):
        fn(logits, targets, **{option: value})


@pytest.mark.parametrize(
    "option, value, exc",
    [p for p in OPTION_PARAMS if p.values[0] in ("softcap", "logit_scale")],
)
def test_logsumexp_option_out_of_range(rng, option, value, exc):
    logits, _ = ce_inputs(rng)
    with pytest.raises(exc, match=names(option)):
        fastloss.logsumexp(logits, **{option: value})


@pytest.mark.parametrize("fn", CE_FUNCS)
def test_option_boundaries_accepted(rng, fn):
    logits, targets = ce_inputs(rng)
    for kw in ({"label_smoothing": 0.0}, {"label_smoothing": 1.0}, {"z_loss": 0.0},
               {"softcap": None}, {"softcap": 1e-3}, {"normalizer": None}, {"normalizer": 1e-9},
               {"label_smoothing": np.float32(0.5)}, {"logit_scale": 3}):
        fn(logits, targets, **kw)


@pytest.mark.parametrize("scale", [0.0, -0.5])
@pytest.mark.parametrize("fn", LOGITS_FUNCS)
def test_logit_scale_zero_or_negative(rng, fn, scale):
    """The contract only asks for a finite logit_scale. Either the transform is
    applied as written (checked against the reference) or the value is rejected
    with a ValueError that names logit_scale."""
    logits, targets = ce_inputs(rng, dtype=np.float64)
    try:
        res = call_logits_fn(fn, logits, targets, logit_scale=scale)
    except ValueError as exc:
        assert re.search(names("logit_scale"), str(exc)), str(exc)
        return
    if fn is fastloss.logsumexp:
        np.testing.assert_allclose(res, lse_reference(logits, logit_scale=scale), rtol=1e-12)
    else:
        loss = res[0] if isinstance(res, tuple) else res
        ref, _ = ce_reference(logits, targets, logit_scale=scale)
        assert loss == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("fn", LOGITS_FUNCS)
def test_softcap_inf(rng, fn):
    """softcap=inf is the limit of no cap: either exactly that, or rejected naming softcap
    (never cap * tanh(x / cap) = inf * 0 = NaN)."""
    logits, targets = ce_inputs(rng, dtype=np.float64)
    try:
        res = call_logits_fn(fn, logits, targets, softcap=np.inf)
    except ValueError as exc:
        assert re.search(names("softcap"), str(exc)), str(exc)
        return
    plain = call_logits_fn(fn, logits, targets)
    if isinstance(res, tuple):
        np.testing.assert_allclose(res[1], plain[1], rtol=1e-12)
        res, plain = res[0], plain[0]
    np.testing.assert_allclose(res, plain, rtol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("fn", CE_FUNCS)
def test_normalizer_only_with_mean(rng, fn, reduction):
    """normalizer is defined for reduction='mean' only; the library rejects it
    elsewhere rather than silently ignoring it."""
    logits, targets = ce_inputs(rng)
    with pytest.raises(ValueError, match=names("normalizer")):
        fn(logits, targets, reduction=reduction, normalizer=4.0)


# --------------------------------------------------------------------------------------
# Class weight
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("wshape", [(V + 1,), (V - 1,), (1, V), (V, 1), (), (1,), (N, V)])
@pytest.mark.parametrize("fn", CE_FUNCS)
def test_weight_bad_shape(rng, fn, wshape):
    logits, targets = ce_inputs(rng)
    weight = np.full(wshape, 0.5, np.float32)
    with pytest.raises(ValueError, match=names("weight")):
        fn(logits, targets, weight=weight)


@pytest.mark.parametrize("bad", [-0.5, -np.inf, np.nan, np.inf], ids=["negative", "-inf", "nan", "inf"])
@pytest.mark.parametrize("fn", CE_FUNCS)
def test_weight_bad_values(rng, fn, bad):
    logits, targets = ce_inputs(rng)
    weight = np.ones(V, np.float32)
    weight[3] = bad
    with pytest.raises(ValueError, match=names("weight")):
        fn(logits, targets, weight=weight)


@pytest.mark.parametrize("wdtype", [np.complex64, np.bool_, object, "U3"], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("fn", CE_FUNCS)
def test_weight_bad_dtype(rng, fn, wdtype):
    logits, targets = ce_inputs(rng)
    weight = np.ones(V).astype(wdtype)
    with pytest.raises(TypeError, match=names("weight")):
        fn(logits, targets, weight=weight)


@pytest.mark.parametrize("fn", CE_FUNCS)
def test_weight_integer_dtype(rng, fn):
    """Integer class weights: either the same as the float weights, or a TypeError
    naming weight (PyTorch requires a float weight)."""
    logits, targets = ce_inputs(rng)
    iw = np.array([1, 2, 3, 1, 2])
    try:
        res = fn(logits, targets, weight=iw)
    except TypeError as exc:
        assert re.search(names("weight"), str(exc)), str(exc)
        return
    ref = fn(logits, targets, weight=iw.astype(np.float32))
    if isinstance(res, tuple):
        np.testing.assert_array_equal(res[1], ref[1])
        res, ref = res[0], ref[0]
    assert res == ref


# --------------------------------------------------------------------------------------
# grad_output
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gshape", [(N + 1,), (N, 1), (N, V), (1,), (2, 3)])
def test_grad_output_bad_shape_none(rng, gshape):
    logits, targets = ce_inputs(rng)
    with pytest.raises(ValueError, match=names("grad_output")):
        fastloss.cross_entropy_with_grad(logits, targets, reduction="none",
                                         grad_output=np.full(gshape, 0.5))


@pytest.mark.parametrize("gshape", [(N,), (2,), (N, V), (1, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_output_not_scalar_mean_sum(rng, reduction, gshape):
    logits, targets = ce_inputs(rng)
    with pytest.raises((ValueError, TypeError), match=names("grad_output")):
        fastloss.cross_entropy_with_grad(logits, targets, reduction=reduction,
                                         grad_output=np.full(gshape, 0.5))


@pytest.mark.parametrize(
    "reduction, bad",
    [("mean", "1.0"), ("mean", 1 + 2j), ("sum", [1.0, 2.0]), ("none", "1.0"), ("none", 1 + 2j),
     ("none", np.array(["a"] * N)), ("none", np.full(N, 1 + 1j)), ("none", np.ones(N, bool))],
    ids=["mean-str", "mean-complex", "sum-list", "none-str", "none-complex", "none-str-array",
         "none-complex-array", "none-bool-array"],
)
def test_grad_output_bad_type(rng, reduction, bad):
    logits, targets = ce_inputs(rng)
    with pytest.raises((TypeError, ValueError), match=names("grad_output")):
        fastloss.cross_entropy_with_grad(logits, targets, reduction=reduction, grad_output=bad)


# --------------------------------------------------------------------------------------
# out= and inplace=
# --------------------------------------------------------------------------------------


def _ce_expected(logits, targets):
    return ce_reference(logits, targets)


@pytest.mark.parametrize("oshape", [(N, V + 1), (N,), (V, N), (N * V,), (1, N, V)])
def test_out_bad_shape(rng, oshape):
    logits, targets = ce_inputs(rng)
    out = np.full(oshape, np.nan, np.float32)
    with pytest.raises(ValueError, match=names("out")):
        fastloss.cross_entropy_with_grad(logits, targets, out=out)
    assert np.isnan(out).all(), "out was written although the call failed"


@pytest.mark.parametrize("odtype", [np.float64, np.float16, BF16, np.int32])
def test_out_bad_dtype(rng, odtype):
    logits, targets = ce_inputs(rng)  # float32
    out = np.zeros((N, V), odtype)
    with pytest.raises(TypeError, match=names("out")):
        fastloss.cross_entropy_with_grad(logits, targets, out=out)


def test_out_read_only(rng):
    logits, targets = ce_inputs(rng)
    out = np.full((N, V), np.nan, np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match=names("out")):
        fastloss.cross_entropy_with_grad(logits, targets, out=out)


@pytest.mark.parametrize("bad", [[[0.0] * V] * N, "buffer"], ids=["list", "str"])
def test_out_not_an_array(rng, bad):
    logits, targets = ce_inputs(rng)
    with pytest.raises(TypeError, match=names("out")):
        fastloss.cross_entropy_with_grad(logits, targets, out=bad)


@pytest.mark.parametrize("layout", ["fortran", "strided"])
def test_out_not_c_contiguous(rng, layout):
    """Either rejected naming out, or the gradient lands in out, correctly."""
    logits, targets = ce_inputs(rng, dtype=np.float64)
    if layout == "fortran":
        out = np.asfortranarray(np.full((N, V), np.nan))
    else:
        out = np.full((N, 2 * V), np.nan)[:, ::2]
    try:
        loss, grad = fastloss.cross_entropy_with_grad(logits, targets, out=out)
    except ValueError as exc:
        assert re.search(names("out"), str(exc)), str(exc)
        return
    assert grad is out
    np.testing.assert_allclose(out, _ce_expected(logits, targets)[1], rtol=1e-12, atol=1e-15)


def test_out_is_logits(rng):
    """out=logits with inplace=False: either rejected naming out, or the same as
    inplace=True (correct gradient written over the logits)."""
    logits, targets = ce_inputs(rng, dtype=np.float64)
    ref_loss, ref_grad = _ce_expected(logits, targets)
    try:
        loss, grad = fastloss.cross_entropy_with_grad(logits, targets, out=logits)
    except ValueError as exc:
        assert re.search(names("out"), str(exc)), str(exc)
        return
    assert grad is logits
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(logits, ref_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shift", [1, V, V + 2], ids=["one-element", "one-row", "row-and-two"])
def test_out_overlaps_logits(rng, shift):
    """out and logits partly overlapping: a row-by-row kernel would read gradient it
    already wrote. Either rejected naming out, or the exact gradient."""
    buf = rng.standard_normal(N * V + shift)
    logits = buf[:N * V].reshape(N, V)
    out = buf[shift:].reshape(N, V)
    _, targets = ce_inputs(rng)
    ref_loss, ref_grad = _ce_expected(logits.copy(), targets)
    try:
        loss, grad = fastloss.cross_entropy_with_grad(logits, targets, out=out)
    except ValueError as exc:
        assert re.search(names("out"), str(exc)), str(exc)
        return
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-15)


def test_out_with_inplace(rng):
    logits, targets = ce_inputs(rng)
    before = logits.copy()
    out = np.full((N, V), np.nan, np.float32)
    with pytest.raises(ValueError, match=names("out")) as exc:
        fastloss.cross_entropy_with_grad(logits, targets, out=out, inplace=True)
    assert re.search(names("inplace"), str(exc.value)), str(exc.value)
    np.testing.assert_array_equal(logits, before)
    assert np.isnan(out).all()


def test_inplace_read_only_logits(rng):
    logits, targets = ce_inputs(rng)
    logits.flags.writeable = False
    with pytest.raises(ValueError, match=names("logits")):
        fastloss.cross_entropy_with_grad(logits, targets, inplace=True)


def test_inplace_on_a_list(rng):
    """A list cannot be overwritten with the gradient."""
    logits, targets = ce_inputs(rng)
    with pytest.raises((TypeError, ValueError), match=names("logits")):
        fastloss.cross_entropy_with_grad(logits.tolist(), targets, inplace=True)


@pytest.mark.parametrize("bad", ["yes", 1, None, np.bool_(True)])
def test_inplace_not_a_bool(rng, bad):
    """inplace must be a bool; accepting truthy values would make inplace='no' overwrite
    the logits. np.bool_ is accepted or rejected, but then naming inplace."""
    logits, targets = ce_inputs(rng)
    before = logits.copy()
    try:
        _, grad = fastloss.cross_entropy_with_grad(logits, targets, inplace=bad)
    except TypeError as exc:
        assert re.search(names("inplace"), str(exc)), str(exc)
        np.testing.assert_array_equal(logits, before)
        return
    assert isinstance(bad, np.bool_), f"inplace={bad!r} was accepted"
    assert grad is logits


def test_inplace_non_contiguous_logits(rng):
    """inplace=True on a strided view: the gradient must land in that view (grad is
    logits) or the call must be rejected naming logits."""
    base = rng.standard_normal((N, 2 * V))
    logits = base[:, ::2]
    other = base[:, 1::2].copy()
    _, targets = ce_inputs(rng)
    ref_loss, ref_grad = _ce_expected(logits.copy(), targets)
    try:
        loss, grad = fastloss.cross_entropy_with_grad(logits, targets, inplace=True)
    except ValueError as exc:
        assert re.search(names("logits"), str(exc)), str(exc)
        return
    assert grad is logits
    np.testing.assert_allclose(base[:, ::2], ref_grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(base[:, 1::2], other)  # neighbours untouched


@pytest.mark.parametrize(
    "kw",
    [{"label_smoothing": 2.0}, {"reduction": "bad"}, {"weight": -np.ones(V)}, {"grad_output": np.ones(3)}],
    ids=["label_smoothing", "reduction", "weight", "grad_output"],
)
def test_failed_call_leaves_logits_alone(rng, kw):
    """Validation happens before the kernel writes anything, inplace or not."""
    logits, targets = ce_inputs(rng)
    before = logits.copy()
    with pytest.raises((ValueError, TypeError)):
        fastloss.cross_entropy_with_grad(logits, targets, inplace=True, **kw)
    np.testing.assert_array_equal(logits, before)


def test_bad_targets_inplace_leaves_logits_alone(rng):
    logits, targets = ce_inputs(rng)
    targets[2] = 99
    before = logits.copy()
    with pytest.raises(ValueError, match=names("targets")):
        fastloss.cross_entropy_with_grad(logits, targets, inplace=True)
    np.testing.assert_array_equal(logits, before)


# --------------------------------------------------------------------------------------
# mse
# --------------------------------------------------------------------------------------

MSE_FUNCS = [
    pytest.param(fastloss.mse, id="mse"),
    pytest.param(fastloss.mse_with_grad, id="mse_with_grad"),
]


def mse_inputs(rng, shape=(3, 4), dtype=np.float32):
    return (rng.standard_normal(shape).astype(dtype),
            (rng.standard_normal(shape) + 0.5).astype(dtype))


@pytest.mark.parametrize("tshape", [(4,), (4, 3), (3, 4, 1), (1, 4), (3, 1), (12,), ()])
@pytest.mark.parametrize("fn", MSE_FUNCS)
def test_mse_shape_mismatch(rng, fn, tshape):
    """Same shape required: no broadcasting (PyTorch broadcasts with a warning)."""
    pred, _ = mse_inputs(rng)
    target = np.full(tshape, 0.5, np.float32)
    with pytest.raises(ValueError, match=names("target")):
        fn(pred, target)


BAD_FLOAT_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, object, np.longdouble]


@pytest.mark.parametrize("dtype", BAD_FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("which", ["pred", "target"])
@pytest.mark.parametrize("fn", MSE_FUNCS)
def test_mse_bad_dtype(rng, fn, which, dtype):
    if np.dtype(dtype) == np.longdouble and np.dtype(np.longdouble) == np.float64:
        pytest.skip("longdouble is float64 on this platform")
    pred, target = mse_inputs(rng)
    args = {"pred": pred, "target": target}
    args[which] = np.arange(1, 13).reshape(3, 4).astype(dtype)
    with pytest.raises(TypeError, match=names(which)):
        fn(args["pred"], args["target"])


@pytest.mark.parametrize("wshape", [(5,), (2, 4), (3, 3), (4, 3), (2, 3, 4), (1, 1, 1)])
@pytest.mark.parametrize("fn", MSE_FUNCS)
def test_mse_weight_not_broadcastable(rng, fn, wshape):
    """Weight must broadcast *to* pred.shape; a weight that would enlarge the result
    ((2, 3, 4) or (1, 1, 1) over (3, 4)) is an error too."""
    pred, target = mse_inputs(rng)
    with pytest.raises(ValueError, match=names("weight")):
        fn(pred, target, weight=np.full(wshape, 0.5, np.float32))


@pytest.mark.parametrize("bad", [-0.5, -np.inf, np.nan], ids=["negative", "-inf", "nan"])
@pytest.mark.parametrize("fn", MSE_FUNCS)
def test_mse_weight_bad_values(rng, fn, bad):
    pred, target = mse_inputs(rng)
    weight = np.ones(4, np.float32)
    weight[2] = bad
    with pytest.raises(ValueError, match=names("weight")):
        fn(pred, target, weight=weight)


@pytest.mark.parametrize("wdtype", [np.complex64, object, "U3"], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("fn", MSE_FUNCS)
def test_mse_weight_bad_dtype(rng, fn, wdtype):
    pred, target = mse_inputs(rng)
    with pytest.raises(TypeError, match=names("weight")):
        fn(pred, target, weight=np.ones(4).astype(wdtype))


@pytest.mark.parametrize("bad", ["avg", "MEAN", "", None, 0])
@pytest.mark.parametrize("fn", MSE_FUNCS)
def test_mse_bad_reduction(rng, fn, bad):
    pred, target = mse_inputs(rng)
    with pytest.raises((ValueError, TypeError), match=names("reduction")):
        fn(pred, target, reduction=bad)


@pytest.mark.parametrize("oshape", [(4, 3), (12,), (3, 4, 1), (3, 5)])
def test_mse_out_bad_shape(rng, oshape):
    pred, target = mse_inputs(rng)
    out = np.full(oshape, np.nan, np.float32)
    with pytest.raises(ValueError, match=names("out")):
        fastloss.mse_with_grad(pred, target, out=out)
    assert np.isnan(out).all()


@pytest.mark.parametrize("odtype", [np.float64, np.float16, BF16, np.int32])
def test_mse_out_bad_dtype(rng, odtype):
    pred, target = mse_inputs(rng)  # float32
    with pytest.raises(TypeError, match=names("out")):
        fastloss.mse_with_grad(pred, target, out=np.zeros((3, 4), odtype))


def test_mse_out_read_only(rng):
    pred, target = mse_inputs(rng)
    out = np.zeros((3, 4), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match=names("out")):
        fastloss.mse_with_grad(pred, target, out=out)


def test_mse_out_not_c_contiguous(rng):
    pred, target = mse_inputs(rng, dtype=np.float64)
    out = np.full((3, 8), np.nan)[:, ::2]
    try:
        _, grad = fastloss.mse_with_grad(pred, target, out=out)
    except ValueError as exc:
        assert re.search(names("out"), str(exc)), str(exc)
        return
    assert grad is out
    np.testing.assert_allclose(out, mse_reference(pred, target)[1], rtol=1e-14)


@pytest.mark.parametrize("alias", ["pred", "target"])
def test_mse_out_aliases_input(rng, alias):
    """out=pred (or target): elementwise, so writing in place is safe; either the exact
    gradient or an error naming out."""
    pred, target = mse_inputs(rng, dtype=np.float64)
    ref_loss, ref_grad = mse_reference(pred, target)
    out = pred if alias == "pred" else target
    try:
        loss, grad = fastloss.mse_with_grad(pred, target, out=out)
    except ValueError as exc:
        assert re.search(names("out"), str(exc)), str(exc)
        return
    assert grad is out
    assert loss == pytest.approx(ref_loss, rel=1e-14)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-14)


@pytest.mark.parametrize("gshape", [(4,), (3, 1), (3, 4, 1), (12,)])
def test_mse_grad_output_bad_shape_none(rng, gshape):
    pred, target = mse_inputs(rng)
    with pytest.raises(ValueError, match=names("grad_output")):
        fastloss.mse_with_grad(pred, target, reduction="none", grad_output=np.full(gshape, 0.5))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_grad_output_not_scalar(rng, reduction):
    pred, target = mse_inputs(rng)
    with pytest.raises((ValueError, TypeError), match=names("grad_output")):
        fastloss.mse_with_grad(pred, target, reduction=reduction, grad_output=np.full((3, 4), 0.5))
    with pytest.raises((ValueError, TypeError), match=names("grad_output")):
        fastloss.mse_with_grad(pred, target, reduction=reduction, grad_output="1.0")


# --------------------------------------------------------------------------------------
# Edge cases found while writing these tests
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", CE_FUNCS)
def test_uint64_target_equal_to_huge_ignore_index_is_ignored(rng, fn):
    """A target equal to ignore_index is ignored, whatever the integer range: with
    uint64 targets and ignore_index=2**64-1 that value is ignored, not 'bad'."""
    logits, _ = ce_inputs(rng, dtype=np.float64)
    targets = np.array([0, 1, 2, 3, 4, 2**64 - 1], np.uint64)
    res = fn(logits, targets, ignore_index=2**64 - 1, reduction="sum")
    loss = res[0] if isinstance(res, tuple) else res
    ref, _ = ce_reference(logits[:5], targets[:5].astype(np.int64), reduction="sum")
    assert loss == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("order", [">", "<"], ids=["big-endian", "little-endian"])
def test_non_native_byte_order_is_still_float(rng, order):
    """A float64/float32 array in either byte order is a float64/float32 array
    (contract: anything np.asarray accepts, dtype float16/32/64/bfloat16); it is
    read by value, not rejected as an unsupported dtype."""
    logits, targets = ce_inputs(rng, dtype=np.float64)
    ref_loss, ref_grad = ce_reference(logits, targets)
    swapped = logits.astype(order + "f8")
    loss, grad = fastloss.cross_entropy_with_grad(swapped, targets.astype(order + "i4"))
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(to_float64(grad), ref_grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(fastloss.logsumexp(swapped), lse_reference(logits), rtol=1e-12)
    pred, target = mse_inputs(rng, dtype=np.float32)
    ref_loss, ref_grad = mse_reference(pred, target)
    loss, grad = fastloss.mse_with_grad(pred.astype(order + "f4"), target.astype(order + "f4"))
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(to_float64(grad), ref_grad, rtol=2.0**-22)


@pytest.mark.parametrize("call, name", [
    (lambda: fastloss.cross_entropy([[1.0, 2.0], [1.0]], [0, 1]), "logits"),
    (lambda: fastloss.logsumexp([[1.0], [1.0, 2.0]]), "logits"),
    (lambda: fastloss.cross_entropy(np.zeros((2, 3)), [[0], [1, 2]]), "targets"),
    (lambda: fastloss.cross_entropy(np.zeros((2, 3)), [0, 1], weight=[[1.0], [1.0, 2.0]]), "weight"),
    (lambda: fastloss.mse([[1.0, 2.0], [1.0]], [1.0]), "pred"),
    (lambda: fastloss.mse(np.zeros(2), [[1.0], [1.0, 2.0]]), "target"),
    (lambda: fastloss.mse(np.zeros(2), np.zeros(2), weight=[[1.0], [1.0, 2.0]]), "weight"),
    (lambda: fastloss.cross_entropy_with_grad(np.zeros((2, 3)), [0, 1], reduction="none",
                                              grad_output=[[1.0], [1.0, 2.0]]), "grad_output"),
])
def test_ragged_input_names_the_argument(call, name):
    """A ragged list (numpy cannot make an array of it) gets a ValueError naming the argument."""
    with pytest.raises(ValueError, match=rf"^{name}: expected an array, found an object numpy cannot convert"):
        call()
