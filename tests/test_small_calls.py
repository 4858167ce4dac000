"""Small calls: the serial cross-entropy and MSE kernels, the small path of the
linear cross-entropy, the options cache, the lazy import and the compile notice.

Every serial result is checked against the parallel path of the same call
(``config.SERIAL_MAX_ELEMENTS = 0`` / ``MSE_SERIAL_MAX_ELEMENTS = 0`` /
``chunk_size=``) and against the float64 references of ``tests/reference.py``.
A spy on the kernels proves which path each run took, so a comparison can
never be the serial path against itself.
"""

import collections
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from cases import DTYPES, assert_grad, assert_loss, make_logits, make_targets, resolve
from reference import ce_reference, mse_reference, to_float64

import fastloss
from fastloss import config
from fastloss.cpu import cross_entropy as CEK
from fastloss.cpu import mse as MSEK

BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
SERIAL_DEFAULT = config.SERIAL_MAX_ELEMENTS
MSE_SERIAL_DEFAULT = config.MSE_SERIAL_MAX_ELEMENTS

# The repo's tolerances against the float64 reference: dtype -> (loss rtol, grad tol).
REF_TOL = {p.values[0]: (p.values[1], p.values[2]) for p in DTYPES}

# Serial against parallel, per dtype: (loss rtol, gradient atol relative to max|grad|).
# float32 accumulation for float32 and half precision (the two paths may add
# vectorised sums in another order); half-precision gradients may differ by
# one unit of their rounding.
PATH_TOL = {
    F32: (1e-6, 1e-6),
    F64: (1e-12, 1e-12),
    F16: (1e-6, 2.0**-11),
    BF16: (1e-6, 2.0**-8),
}

DTYPE_PARAMS = [pytest.param(d, id=str(d)) for d in (F32, F64, F16, BF16)]

SERIAL_KERNELS = ("ce_serial_forward", "ce_serial_fused")
PARALLEL_KERNELS = ("ce_forward", "ce_fused")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the cross-entropy and MSE kernels by name."""
    counts = collections.Counter()

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for name in SERIAL_KERNELS + PARALLEL_KERNELS:
        spy(CEK, name)
    for name in ("mse_serial", "mse_kernel"):
        spy(MSEK, name)
    return counts


def took(counts, names):
    """Whether only kernels in ``names`` ran (at least one of them)."""
    ran = {k for k, v in counts.items() if v}
    return bool(ran) and ran <= set(names)


@pytest.fixture
def restore_threads():
    n = fastloss.get_num_threads()
    yield
    fastloss.set_num_threads(n)


# ---------------------------------------------------------------------------
# Cross-entropy: serial against parallel
# ---------------------------------------------------------------------------

def ce_run(monkeypatch, calls, serial, logits, targets, kwargs, *, with_grad, out=None,
           inplace=False):
    """One cross-entropy call on the chosen path (checked through the spy); the
    inputs are copied so that no call sees another's writes."""
    monkeypatch.setattr(config, "SERIAL_MAX_ELEMENTS", SERIAL_DEFAULT if serial else 0)
    calls.clear()
    x = logits.copy()
    t = targets.copy()
    if with_grad:
        o = None if out is None else out.copy()
        loss, grad = fastloss.cross_entropy_with_grad(x, t, out=o, inplace=inplace, **kwargs)
        if inplace:
            assert grad is x
        elif o is not None:
            assert grad is o
    else:
        loss, grad = fastloss.cross_entropy(x, t, **kwargs), None
    if not inplace:  # inputs untouched
        np.testing.assert_array_equal(x.view(np.uint8), logits.view(np.uint8))
    np.testing.assert_array_equal(t, targets)
    assert took(calls, SERIAL_KERNELS if serial else PARALLEL_KERNELS), dict(calls)
    return loss, grad


def assert_same_loss(a, b, rtol):
    a64, b64 = to_float64(a), to_float64(b)
    assert np.shape(a64) == np.shape(b64)
    scale = max(1.0, float(np.max(np.abs(b64)))) if b64.size else 1.0
    np.testing.assert_allclose(a64, b64, rtol=rtol, atol=rtol * scale)


def assert_same_grad(a, b, tol):
    assert a.dtype == b.dtype and a.shape == b.shape
    a64, b64 = to_float64(a), to_float64(b)
    assert np.isfinite(a64).all() and np.isfinite(b64).all()
    scale = float(np.max(np.abs(b64))) if b64.size else 0.0
    np.testing.assert_allclose(a64, b64, rtol=0, atol=tol * scale + 1e-30)


def ce_inputs(rng, shape, dtype, kw, n_ignored=2):
    logits = make_logits(rng, shape, dtype)
    ignore = kw.get("ignore_index", -100)
    if len(shape) == 1:  # one token: 0-d targets, counted
        return logits, np.array(rng.integers(0, shape[-1]), dtype=np.int64)
    targets = make_targets(rng, shape[:-1], shape[-1], n_ignored=n_ignored, ignore_index=ignore)
    assert (targets == ignore).any() and (targets != ignore).any()
    return logits, targets


CE_CASES = [
    pytest.param((6, 37), {}, id="plain-mean"),
    pytest.param((37,), {}, id="1d"),
    pytest.param((2, 3, 19), dict(reduction="sum"), id="3d-sum"),
    pytest.param((5, 23), dict(weight="w", ignore_index=3, label_smoothing=0.15), id="weight-ignore3-smooth"),
    pytest.param((4, 3, 11), dict(reduction="none", z_loss=1e-3, softcap=3.0, grad_output="rows"),
                 id="3d-none-rows-softcap"),
    pytest.param((7, 40), dict(normalizer=9.0, logit_scale=0.8, z_loss=0.01, grad_output=0.7),
                 id="normalizer-scale-zloss"),
    pytest.param((6, 17), dict(reduction="none", grad_output=1.5, weight="w", label_smoothing=0.1),
                 id="none-scalar-go"),
    pytest.param((3, 2100), dict(reduction="sum", softcap=4.0, logit_scale=1.3, weight="w",
                                 grad_output=-0.5, z_loss=2e-3), id="2-row-blocks-sum"),
    pytest.param((9, 5), dict(weight="w", z_loss=0.05, label_smoothing=1.0), id="smooth1-weight-mean"),
]


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("shape,kwargs", CE_CASES)
def test_ce_serial_matches_parallel_and_reference(monkeypatch, calls, rng, dtype, shape, kwargs):
    kw = resolve(rng, shape, kwargs)
    logits, targets = ce_inputs(rng, shape, dtype, kw)
    rtol, gtol = PATH_TOL[dtype]
    ref_rtol, ref_gtol = REF_TOL[dtype]
    fwd = {k: v for k, v in kw.items() if k != "grad_output"}
    ref_loss, ref_grad = ce_reference(logits, targets, **kw)

    s_loss = ce_run(monkeypatch, calls, True, logits, targets, fwd, with_grad=False)[0]
    p_loss = ce_run(monkeypatch, calls, False, logits, targets, fwd, with_grad=False)[0]
    s_loss2, s_grad = ce_run(monkeypatch, calls, True, logits, targets, kw, with_grad=True)
    p_loss2, p_grad = ce_run(monkeypatch, calls, False, logits, targets, kw, with_grad=True)

    reduction = kw.get("reduction", "mean")
    for loss in (s_loss, p_loss, s_loss2, p_loss2):
        if reduction == "none":
            acc = F64 if dtype == F64 else F32
            assert isinstance(loss, np.ndarray) and loss.dtype == acc and loss.shape == shape[:-1]
        else:
            assert type(loss) is float
        assert_loss(loss, ref_loss, ref_rtol)
    assert_same_loss(s_loss, p_loss, rtol)
    assert_same_loss(s_loss2, p_loss2, rtol)
    assert_same_grad(s_grad, p_grad, gtol)
    for g in (s_grad, p_grad):
        assert g.dtype == dtype and g.shape == shape
        assert_grad(g, ref_grad, ref_gtol)
    # Ignored rows have a zero gradient on both paths.
    rows = (targets == kw.get("ignore_index", -100)).reshape(-1)
    assert rows.any() or targets.ndim == 0
    assert not to_float64(s_grad).reshape(-1, shape[-1])[rows].any()


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ce_serial_matches_parallel_every_reduction(monkeypatch, calls, rng, dtype, reduction):
    shape = (11, 29)
    kw = dict(reduction=reduction, weight=rng.uniform(0.1, 3.0, 29), label_smoothing=0.05,
              z_loss=1e-3, ignore_index=-1, logit_scale=1.1)
    kw["grad_output"] = rng.uniform(-2, 2, 11) if reduction == "none" else 1.7
    logits, targets = ce_inputs(rng, shape, dtype, kw, n_ignored=3)
    rtol, gtol = PATH_TOL[dtype]
    s_loss, s_grad = ce_run(monkeypatch, calls, True, logits, targets, kw, with_grad=True)
    p_loss, p_grad = ce_run(monkeypatch, calls, False, logits, targets, kw, with_grad=True)
    assert_same_loss(s_loss, p_loss, rtol)
    assert_same_grad(s_grad, p_grad, gtol)
    ref_loss, ref_grad = ce_reference(logits, targets, **kw)
    assert_loss(s_loss, ref_loss, REF_TOL[dtype][0])
    assert_grad(s_grad, ref_grad, REF_TOL[dtype][1])


@pytest.mark.parametrize("tdtype", [np.int32, np.int64, np.uint8, np.uint64])
@pytest.mark.parametrize("shape", [(8, 13), (2, 4, 13), (13,)], ids=["2d", "3d", "1d"])
def test_ce_target_dtypes(monkeypatch, calls, rng, tdtype, shape):
    logits = make_logits(rng, shape, F32)
    targets = rng.integers(0, 13, shape[:-1]).astype(tdtype)
    kw = dict(ignore_index=5, reduction="sum", label_smoothing=0.1)
    assert (targets != 5).any()
    ref_loss, ref_grad = ce_reference(logits, targets, **kw)
    s_loss, s_grad = ce_run(monkeypatch, calls, True, logits, targets, kw, with_grad=True)
    p_loss, p_grad = ce_run(monkeypatch, calls, False, logits, targets, kw, with_grad=True)
    assert_same_loss(s_loss, p_loss, 1e-6)
    assert_same_grad(s_grad, p_grad, 1e-6)
    assert_loss(s_loss, ref_loss, REF_TOL[F32][0])
    assert_grad(s_grad, ref_grad, REF_TOL[F32][1])
    # The same targets as int64 give the same bits on the serial path.
    s_loss64, s_grad64 = ce_run(monkeypatch, calls, True, logits, targets.astype(np.int64), kw,
                                with_grad=True)
    assert s_loss64 == s_loss
    np.testing.assert_array_equal(s_grad64, s_grad)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("mode", ["out", "inplace"])
def test_ce_out_and_inplace(monkeypatch, calls, rng, dtype, mode):
    shape = (5, 3, 21)
    kw = dict(reduction="none", grad_output=rng.uniform(0.5, 2.0, shape[:-1]), z_loss=1e-3)
    logits, targets = ce_inputs(rng, shape, dtype, kw)
    poison = np.full(shape, np.nan, dtype=dtype) if mode == "out" else None
    opt = dict(out=poison) if mode == "out" else dict(inplace=True)
    s_loss, s_grad = ce_run(monkeypatch, calls, True, logits, targets, kw, with_grad=True, **opt)
    p_loss, p_grad = ce_run(monkeypatch, calls, False, logits, targets, kw, with_grad=True, **opt)
    # Every element written (the NaN poison is gone; ignored rows hold zeros).
    assert_same_grad(s_grad, p_grad, PATH_TOL[dtype][1])
    assert_same_loss(s_loss, p_loss, PATH_TOL[dtype][0])
    _, ref_grad = ce_reference(logits, targets, **kw)
    assert_grad(s_grad, ref_grad, REF_TOL[dtype][1])
    # The same call without out/inplace gives the same bits on the serial path.
    _, plain = ce_run(monkeypatch, calls, True, logits, targets, kw, with_grad=True)
    np.testing.assert_array_equal(plain.view(np.uint8), s_grad.view(np.uint8))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_ce_all_ignored(monkeypatch, calls, rng, dtype, reduction):
    shape = (4, 9)
    logits = make_logits(rng, shape, dtype)
    targets = np.full(4, 3)
    kw = dict(ignore_index=3, reduction=reduction, weight=rng.uniform(0.5, 1.5, 9), z_loss=0.1,
              label_smoothing=0.2)
    for serial in (True, False):
        loss = ce_run(monkeypatch, calls, serial, logits, targets, kw, with_grad=False)[0]
        poison = np.full(shape, np.nan, dtype)
        loss2, grad = ce_run(monkeypatch, calls, serial, logits, targets, kw, with_grad=True, out=poison)
        for v in (loss, loss2):
            if reduction == "none":
                np.testing.assert_array_equal(v, np.zeros(4))
            else:
                assert v == 0.0 and type(v) is float
        np.testing.assert_array_equal(grad, np.zeros(shape, dtype))


def test_ce_serial_same_bits_on_any_thread_count(monkeypatch, calls, rng, restore_threads):
    logits = make_logits(rng, (64, 300), F32)
    targets = make_targets(rng, (64,), 300, n_ignored=4)
    results = []
    for n in sorted({1, fastloss.max_threads()}):
        fastloss.set_num_threads(n)
        results.append(ce_run(monkeypatch, calls, True, logits, targets, dict(z_loss=1e-3),
                              with_grad=True))
    for loss, grad in results[1:]:
        assert loss == results[0][0]
        np.testing.assert_array_equal(grad, results[0][1])


@pytest.mark.parametrize("go", [
    pytest.param(lambda r: np.array(1.75), id="0d-array"),
    pytest.param(lambda r: np.float32(1.75), id="np-float32"),
    pytest.param(lambda r: 2, id="int"),
    pytest.param(lambda r: r.uniform(-1, 1, (3, 4)).astype(np.float32), id="float32-rows"),
    pytest.param(lambda r: r.integers(-2, 3, (3, 4)), id="int-rows"),
    pytest.param(lambda r: r.uniform(-1, 1, (3, 4)).tolist(), id="list-rows"),
])
def test_ce_none_grad_output_kinds(monkeypatch, calls, rng, go):
    logits = make_logits(rng, (3, 4, 10), F32)
    targets = make_targets(rng, (3, 4), 10, n_ignored=2)
    kw = dict(reduction="none", grad_output=go(rng), label_smoothing=0.1)
    s_loss, s_grad = ce_run(monkeypatch, calls, True, logits, targets, kw, with_grad=True)
    p_loss, p_grad = ce_run(monkeypatch, calls, False, logits, targets, kw, with_grad=True)
    assert_same_loss(s_loss, p_loss, 1e-6)
    assert_same_grad(s_grad, p_grad, 1e-6)
    _, ref_grad = ce_reference(logits, targets, **kw)
    assert_grad(s_grad, ref_grad, REF_TOL[F32][1])


def test_ce_serial_nan_stays_in_its_row(monkeypatch, calls, rng):
    logits = make_logits(rng, (6, 9), F32)
    logits[2, 4] = np.nan
    logits[4, :] = np.nan  # an ignored row
    targets = make_targets(rng, (6,), 9, n_ignored=0)
    targets[4] = -100
    kw = dict(reduction="none", z_loss=1e-3)
    for serial in (True, False):
        loss, grad = ce_run(monkeypatch, calls, serial, logits, targets, kw, with_grad=True)
        np.testing.assert_array_equal(np.isnan(loss), [False, False, True, False, False, False])
        np.testing.assert_array_equal(np.isnan(grad).any(axis=1), [False, False, True, False, False, False])
        assert loss[4] == 0 and not grad[4].any()
        mean = ce_run(monkeypatch, calls, serial, logits, targets, {}, with_grad=False)[0]
        assert np.isnan(mean)


@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_ce_zero_class_weights_of_every_target(monkeypatch, calls, rng, z_loss):
    logits = make_logits(rng, (7, 12), F64)
    targets = make_targets(rng, (7,), 12)
    w = rng.uniform(0.5, 2.0, 12)
    w[targets[targets >= 0]] = 0.0
    kw = dict(weight=w, z_loss=z_loss, grad_output=0.8)
    s_loss, s_grad = ce_run(monkeypatch, calls, True, logits, targets, kw, with_grad=True)
    p_loss, p_grad = ce_run(monkeypatch, calls, False, logits, targets, kw, with_grad=True)
    assert s_loss == pytest.approx(p_loss, rel=1e-12)
    np.testing.assert_allclose(s_grad, p_grad, rtol=0, atol=1e-15)
    ref_loss, ref_grad = ce_reference(logits, targets, **kw)
    assert_loss(s_loss, ref_loss, 1e-10)
    assert_grad(s_grad, ref_grad, 1e-12)
    assert (s_loss == 0.0) == (z_loss == 0.0)


@pytest.mark.parametrize("shape", [(0, 9), (3, 0, 9)])
def test_ce_empty_batch(monkeypatch, calls, shape):
    logits = np.ones(shape, np.float32)
    targets = np.zeros(shape[:-1], np.int64)
    for serial in (True, False):
        monkeypatch.setattr(config, "SERIAL_MAX_ELEMENTS", SERIAL_DEFAULT if serial else 0)
        loss, grad = fastloss.cross_entropy_with_grad(logits, targets)
        assert loss == 0.0 and grad.shape == shape and grad.dtype == np.float32
        none = fastloss.cross_entropy(logits, targets, reduction="none")
        assert none.shape == shape[:-1] and none.dtype == np.float32


def test_ce_neg_inf_logits_under_softcap(monkeypatch, calls, rng):
    logits = make_logits(rng, (6, 9), F32)
    logits[:, 0] = -np.inf
    logits[3, :5] = -np.inf
    targets = rng.integers(1, 9, 6)
    targets[3] = 7
    kw = dict(reduction="none", softcap=2.0, logit_scale=1.5, label_smoothing=0.0, z_loss=1e-3)
    s_loss, s_grad = ce_run(monkeypatch, calls, True, logits, targets, kw, with_grad=True)
    p_loss, p_grad = ce_run(monkeypatch, calls, False, logits, targets, kw, with_grad=True)
    assert np.isfinite(s_loss).all()
    assert_same_loss(s_loss, p_loss, 1e-6)
    assert_same_grad(s_grad, p_grad, 1e-6)
    ref_loss, ref_grad = ce_reference(logits, targets, **kw)
    assert_loss(s_loss, ref_loss, REF_TOL[F32][0])
    assert_grad(s_grad, ref_grad, REF_TOL[F32][1])


@pytest.mark.parametrize("ignore_index", [2**40, -(2**63), 2**63 - 1, 2**63, -(2**64)])
@pytest.mark.parametrize("tdtype", [np.int32, np.uint8])
def test_ce_ignore_index_outside_the_target_dtype(monkeypatch, calls, rng, ignore_index, tdtype):
    logits = make_logits(rng, (6, 9), F32)
    targets = rng.integers(0, 9, 6).astype(tdtype)
    kw = dict(ignore_index=ignore_index)
    expect = fastloss.cross_entropy(logits, targets.astype(np.int64))
    if -(2**63) <= ignore_index < 2**63:
        got = [ce_run(monkeypatch, calls, s, logits, targets, kw, with_grad=False)[0] for s in (True, False)]
    else:  # an ignore_index past int64 always takes the parallel plan
        calls.clear()
        got = [fastloss.cross_entropy(logits, targets, **kw)]
        assert calls == {"ce_forward": 1}
    for g in got:
        assert g == pytest.approx(expect, rel=1e-6)


def test_ce_serial_from_several_threads(rng, calls):
    import threading

    cases = []
    for k in range(4):
        x = make_logits(rng, (20 + k, 50 + 7 * k), F32)
        t = make_targets(rng, (20 + k,), 50 + 7 * k, n_ignored=k)
        cases.append((x, t, fastloss.cross_entropy_with_grad(x, t, z_loss=1e-3, label_smoothing=0.1)))
    bad = []

    def work(x, t, expect):
        for _ in range(50):
            r = fastloss.cross_entropy_with_grad(x, t, z_loss=1e-3, label_smoothing=0.1)
            if r.loss != expect.loss or not np.array_equal(r.grad, expect.grad):
                bad.append(1)

    threads = [threading.Thread(target=work, args=c) for c in cases]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not bad
    assert calls["ce_serial_fused"] == 4 + 4 * 50 and not calls["ce_fused"]


# ---------------------------------------------------------------------------
# Cross-entropy: which path a call takes
# ---------------------------------------------------------------------------

def _call_both(x, t):
    fastloss.cross_entropy(x, t)
    fastloss.cross_entropy_with_grad(x, t)


def test_small_contiguous_calls_take_the_serial_kernels(calls, rng):
    x = make_logits(rng, (64, 100), F32)
    t = make_targets(rng, (64,), 100)
    _call_both(x, t)
    assert calls == {"ce_serial_forward": 1, "ce_serial_fused": 1}
    # Exactly at the threshold: still serial.
    calls.clear()
    n = SERIAL_DEFAULT // 4096
    _call_both(make_logits(rng, (n, 4096), F32), make_targets(rng, (n,), 4096))
    assert calls == {"ce_serial_forward": 1, "ce_serial_fused": 1}


def test_large_calls_take_the_parallel_kernels(calls, rng, restore_threads):
    v = SERIAL_DEFAULT // 2 + 1  # two rows: just above the threshold
    x = make_logits(rng, (2, v), F32)
    t = np.array([0, v - 1])
    _call_both(x, t)
    assert calls == {"ce_forward": 1, "ce_fused": 1}
    calls.clear()
    fastloss.set_num_threads(1)
    assert fastloss.get_num_threads() == 1
    _call_both(x, t)
    assert calls == {"ce_forward": 1, "ce_fused": 1}


def test_threshold_is_read_at_call_time(monkeypatch, calls, rng):
    x = make_logits(rng, (4, 10), F64)
    t = make_targets(rng, (4,), 10)
    monkeypatch.setattr(config, "SERIAL_MAX_ELEMENTS", 39)
    _call_both(x, t)
    assert calls == {"ce_forward": 1, "ce_fused": 1}
    calls.clear()
    monkeypatch.setattr(config, "SERIAL_MAX_ELEMENTS", 40)
    _call_both(x, t)
    assert calls == {"ce_serial_forward": 1, "ce_serial_fused": 1}


class _Sub(np.ndarray):
    pass


@pytest.mark.parametrize("kind", ["noncontiguous", "readonly", "subclass", "fortran"])
def test_uncommon_small_logits_take_the_parallel_kernels(calls, rng, kind):
    base = make_logits(rng, (6, 22), F32)
    t = make_targets(rng, (6,), 11)
    if kind == "noncontiguous":
        x = base[:, ::2]
    elif kind == "readonly":
        x = base[:, :11].copy()
        x.flags.writeable = False
    elif kind == "subclass":
        x = base[:, :11].copy().view(_Sub)
    else:
        x = np.asfortranarray(base[:, :11])
    fastloss.cross_entropy(x, t)
    fastloss.cross_entropy_with_grad(x, t)
    assert calls == {"ce_forward": 1, "ce_fused": 1}
    expect = fastloss.cross_entropy(np.ascontiguousarray(x), t)
    assert abs(fastloss.cross_entropy(x, t) - expect) <= 1e-6 * abs(expect)


def test_uint64_targets_past_int64_take_the_parallel_path(calls, rng):
    x = make_logits(rng, (3, 7), F32)
    t = np.array([1, 2**63, 2**64 - 1], dtype=np.uint64)
    with pytest.raises(ValueError, match=r"2 value\(s\) outside \[0, 7\).*position \(1,\): 9223372036854775808"):
        fastloss.cross_entropy(x, t)
    assert not calls["ce_serial_forward"]
    # Small uint64 values take the serial kernel.
    fastloss.cross_entropy(x, np.array([1, 2, 6], dtype=np.uint64))
    assert calls["ce_serial_forward"] == 1


# ---------------------------------------------------------------------------
# Cross-entropy: bad targets, same message on both paths
# ---------------------------------------------------------------------------

def _message(monkeypatch, calls, serial, fn, x, t):
    monkeypatch.setattr(config, "SERIAL_MAX_ELEMENTS", SERIAL_DEFAULT if serial else 0)
    calls.clear()
    with pytest.raises(ValueError) as info:
        fn(x, t)
    if serial:
        kernel = "ce_serial_forward" if fn is fastloss.cross_entropy else "ce_serial_fused"
        assert calls[kernel] == 1  # the serial kernel found the bad targets itself
    else:
        assert not any(calls[k] for k in SERIAL_KERNELS)
    return str(info.value)


@pytest.mark.parametrize("tdtype", [np.int32, np.uint8, np.int64])
@pytest.mark.parametrize("tshape", [(5, 4), (2, 3, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("fn", [fastloss.cross_entropy, fastloss.cross_entropy_with_grad],
                         ids=["forward", "with_grad"])
def test_bad_target_message_same_on_both_paths(monkeypatch, calls, rng, tdtype, tshape, fn):
    V = 17
    x = make_logits(rng, tshape + (V,), F32)
    t = rng.integers(0, V, tshape).astype(tdtype)
    flat = t.reshape(-1)
    flat[2] = 200 if tdtype == np.uint8 else -7  # the first bad one
    flat[5] = V
    flat[-1] = 250 if tdtype == np.uint8 else 1000
    pos = tuple(int(p) for p in np.unravel_index(2, tshape))
    first = 200 if tdtype == np.uint8 else -7
    serial = _message(monkeypatch, calls, True, fn, x, t)
    parallel = _message(monkeypatch, calls, False, fn, x, t)
    assert serial == parallel
    assert serial == (f"targets: 3 value(s) outside [0, {V}) that are not ignore_index=-100; "
                      f"first at position {pos}: {first}")


@pytest.mark.parametrize("serial", [True, False])
def test_bad_target_with_ignore_index_keyword(monkeypatch, calls, rng, serial):
    x = make_logits(rng, (4, 6), F64)
    t = np.array([3, 6, 3, -100], dtype=np.int32)
    monkeypatch.setattr(config, "SERIAL_MAX_ELEMENTS", SERIAL_DEFAULT if serial else 0)
    with pytest.raises(ValueError) as info:
        fastloss.cross_entropy_with_grad(x, t, ignore_index=3)
    assert str(info.value) == ("targets: 2 value(s) outside [0, 6) that are not ignore_index=3; "
                               "first at position (1,): 6")


# ---------------------------------------------------------------------------
# The options cache
# ---------------------------------------------------------------------------

def _ce(**kw):
    x = np.array([[2.0, 0.5, -1.0, 0.3], [0.1, 0.2, 0.3, -2.0], [1.5, -0.5, 0.0, 0.25]])
    return fastloss.cross_entropy(x, np.array([0, 3, 1]), **kw)


def test_cache_keeps_bool_apart_from_int():
    assert _ce(label_smoothing=1) == pytest.approx(_ce(label_smoothing=1.0), rel=1e-12)
    for _ in range(2):
        with pytest.raises(TypeError, match="label_smoothing"):
            _ce(label_smoothing=True)
    assert _ce(label_smoothing=1) == pytest.approx(_ce(label_smoothing=1.0), rel=1e-12)


def test_cache_keeps_float_ignore_index_apart():
    a = _ce(ignore_index=-100)
    for _ in range(2):
        with pytest.raises(TypeError, match="ignore_index: expected an integer, found float"):
            _ce(ignore_index=-100.0)
    with pytest.raises(TypeError, match="ignore_index: expected an integer, found bool"):
        _ce(ignore_index=True)
    assert _ce(ignore_index=-100) == a
    assert _ce(ignore_index=1) != a  # token 3 (target 1) no longer counted


@pytest.mark.parametrize("name", ["label_smoothing", "z_loss", "softcap", "logit_scale", "normalizer"])
def test_cache_nan_always_raises(name):
    for _ in range(3):
        with pytest.raises(ValueError, match=f"{name}: expected a number, found NaN"):
            _ce(**{name: float("nan")})
        with pytest.raises(ValueError, match=f"{name}: expected a number, found NaN"):
            fastloss.cross_entropy_with_grad(np.ones((2, 3)), np.array([0, 1]), **{name: np.nan})


@pytest.mark.parametrize("name,value", [("label_smoothing", 0.1), ("z_loss", 0.01), ("softcap", 2.5),
                                        ("logit_scale", 0.7), ("normalizer", 4.0)])
def test_cache_numpy_scalars_and_0d_arrays(name, value):
    expect = _ce(**{name: value})
    assert expect != _ce()  # the option changes the result
    for v in (np.float64(value), np.float32(value), np.array(value), np.array(value, np.float32)):
        got = _ce(**{name: v})
        assert got == pytest.approx(expect, rel=1e-6)
        assert _ce(**{name: value}) == expect  # the float's cached entry is untouched
    assert _ce(ignore_index=np.int64(1)) == _ce(ignore_index=1)


# ---------------------------------------------------------------------------
# MSE: serial against parallel
# ---------------------------------------------------------------------------

def mse_run(monkeypatch, calls, serial, pred, target, kw, *, with_grad, out=None):
    monkeypatch.setattr(config, "MSE_SERIAL_MAX_ELEMENTS", MSE_SERIAL_DEFAULT if serial else 0)
    calls.clear()
    p, t = pred.copy(), target.copy()
    if with_grad:
        o = None if out is None else out.copy()
        loss, grad = fastloss.mse_with_grad(p, t, out=o, **kw)
        if o is not None:
            assert grad is o
    else:
        loss, grad = fastloss.mse(p, t, **{k: v for k, v in kw.items() if k != "grad_output"}), None
    np.testing.assert_array_equal(p.view(np.uint8), pred.view(np.uint8))
    np.testing.assert_array_equal(t.view(np.uint8), target.view(np.uint8))
    serial_path = serial and not (with_grad and kw.get("reduction", "mean") == "none")
    assert calls.keys() == {"mse_serial" if serial_path else "mse_kernel"}, dict(calls)
    return loss, grad


MSE_DTYPES = [
    pytest.param(F32, F32, id="float32"),
    pytest.param(F64, F64, id="float64"),
    pytest.param(F16, F16, id="float16"),
    pytest.param(BF16, BF16, id="bfloat16"),
    pytest.param(F32, F64, id="float32-float64"),
    pytest.param(BF16, F32, id="bfloat16-float32"),
    pytest.param(F64, F16, id="float64-float16"),
]

MSE_WEIGHTS = ["none", "scalar", "rows", "cols", "full"]


def mse_weight(rng, kind, shape):
    return {"none": None, "scalar": 0.75, "rows": rng.uniform(0.1, 2.0, (shape[0], 1)),
            "cols": rng.uniform(0.1, 2.0, shape[-1]), "full": rng.uniform(0.0, 2.0, shape)}[kind]


def _mse_tol(pdt, tdt):
    acc64 = F64 in (pdt, tdt)
    loss_rtol = 1e-12 if acc64 else 1e-6
    grad_tol = PATH_TOL[pdt][1] if pdt != F64 else 1e-12
    if pdt == F32 and acc64:
        grad_tol = 2.0**-24  # float64 arithmetic, one rounding to float32
    ref = tuple(max(REF_TOL[pdt][i], REF_TOL[tdt][i]) for i in range(2))
    return loss_rtol, grad_tol, ref


@pytest.mark.parametrize("pdt,tdt", MSE_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("wkind", MSE_WEIGHTS)
def test_mse_serial_matches_parallel_and_reference(monkeypatch, calls, rng, pdt, tdt, reduction, wkind):
    shape = (13, 37)
    pred = (rng.standard_normal(shape) * 2).astype(pdt)
    target = rng.standard_normal(shape).astype(tdt)
    kw = dict(reduction=reduction, weight=mse_weight(rng, wkind, shape))
    kw["grad_output"] = rng.uniform(-1, 2, shape) if reduction == "none" else -0.6
    loss_rtol, grad_tol, (ref_rtol, ref_gtol) = _mse_tol(pdt, tdt)
    ref_loss, ref_grad = mse_reference(pred, target, **kw)

    s_loss = mse_run(monkeypatch, calls, True, pred, target, kw, with_grad=False)[0]
    p_loss = mse_run(monkeypatch, calls, False, pred, target, kw, with_grad=False)[0]
    out = np.full(shape, np.nan, pdt)
    s_loss2, s_grad = mse_run(monkeypatch, calls, True, pred, target, kw, with_grad=True, out=out)
    p_loss2, p_grad = mse_run(monkeypatch, calls, False, pred, target, kw, with_grad=True, out=out)

    for loss in (s_loss, p_loss, s_loss2, p_loss2):
        if reduction == "none":
            assert loss.shape == shape
        else:
            assert type(loss) is float
        assert_loss(loss, ref_loss, ref_rtol)
    assert_same_loss(s_loss, p_loss, loss_rtol)
    assert_same_loss(s_loss2, p_loss2, loss_rtol)
    assert_same_grad(s_grad, p_grad, grad_tol)
    for g in (s_grad, p_grad):
        assert g.dtype == pdt and g.shape == shape
        assert_grad(g, ref_grad, ref_gtol)


@pytest.mark.parametrize("pdt", [F32, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape,wshape", [((4, 5, 6), (5, 6)), ((4, 5, 6), (4, 1, 1)),
                                          ((4, 5, 6), (4, 1, 6)), ((50,), ()), ((3, 70), (3, 1))])
def test_mse_weight_layouts_3d(monkeypatch, calls, rng, pdt, shape, wshape):
    pred = rng.standard_normal(shape).astype(pdt)
    target = rng.standard_normal(shape).astype(pdt)
    w = rng.uniform(0.1, 2.0, wshape)
    for reduction in ("mean", "sum"):
        kw = dict(reduction=reduction, weight=w, grad_output=1.25)
        s = mse_run(monkeypatch, calls, True, pred, target, kw, with_grad=True)
        p = mse_run(monkeypatch, calls, False, pred, target, kw, with_grad=True)
        assert_same_loss(s[0], p[0], 1e-6)
        assert_same_grad(s[1], p[1], PATH_TOL[pdt][1])
        ref_loss, ref_grad = mse_reference(pred, target, **kw)
        assert_loss(s[0], ref_loss, REF_TOL[pdt][0])
        assert_grad(s[1], ref_grad, REF_TOL[pdt][1])


def test_mse_path_choice(calls, rng, monkeypatch):
    n = MSE_SERIAL_DEFAULT
    a, b = rng.standard_normal(n), rng.standard_normal(n)
    fastloss.mse(a, b)
    fastloss.mse_with_grad(a, b, reduction="sum")
    assert calls == {"mse_serial": 2}
    calls.clear()
    a1, b1 = rng.standard_normal(n + 1), rng.standard_normal(n + 1)
    fastloss.mse(a1, b1)
    assert calls == {"mse_kernel": 1}
    calls.clear()
    fastloss.mse(a[::2], b[::2])  # strided
    ro = a[:10].copy()
    ro.flags.writeable = False
    fastloss.mse(ro, b[:10])  # read-only
    fastloss.mse_with_grad(a[:10].copy(), b[:10].copy(), reduction="none")  # none with grad
    assert calls == {"mse_kernel": 3}


# ---------------------------------------------------------------------------
# Linear cross-entropy: small path against the chunked one
# ---------------------------------------------------------------------------

LCE_TOL = {F32: 1e-5, F64: 1e-12, BF16: 2.0**-8}


def lce_run(calls, small, h, W, t, kw, with_grad=True):
    calls.clear()
    chunk = None if small else 7
    hc, Wc, tc = h.copy(), W.copy(), t.copy()
    if with_grad:
        r = fastloss.linear_cross_entropy_with_grad(hc, Wc, tc, chunk_size=chunk, **kw)
    else:
        r = fastloss.linear_cross_entropy(hc, Wc, tc, chunk_size=chunk,
                                          **{k: v for k, v in kw.items() if k != "grad_output"})
    np.testing.assert_array_equal(hc.view(np.uint8), h.view(np.uint8))
    np.testing.assert_array_equal(Wc.view(np.uint8), W.view(np.uint8))
    kernels = SERIAL_KERNELS if small else PARALLEL_KERNELS
    assert took(calls, kernels), dict(calls)
    return r


LCE_CASES = [
    pytest.param((20,), {}, id="plain"),
    pytest.param((4, 5), dict(bias=True, weight=True, ignored=3), id="3d-bias-weight-ignored"),
    pytest.param((19,), dict(reduction="none", grad_output="rows", ignored=4, bias=True, z_loss=1e-3),
                 id="none-rows-ignored"),
    pytest.param((19,), dict(reduction="sum", label_smoothing=0.1, softcap=3.0, ignored=2,
                             grad_output=0.4), id="sum-smooth-softcap"),
]


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("tshape,opts", LCE_CASES)
def test_linear_ce_small_matches_chunked(calls, rng, dtype, tshape, opts):
    D, V = 16, 53
    h = (rng.standard_normal(tshape + (D,)) * 0.7).astype(dtype)
    W = (rng.standard_normal((V, D)) * 0.5).astype(dtype)
    t = make_targets(rng, tshape, V, n_ignored=opts.get("ignored", 0))
    kw = {k: v for k, v in opts.items() if k not in ("ignored", "bias", "weight", "grad_output")}
    if opts.get("bias"):
        kw["bias"] = rng.standard_normal(V).astype(dtype)
    if opts.get("weight"):
        kw["weight"] = rng.uniform(0.2, 2.0, V)
    if opts.get("grad_output") == "rows":
        kw["grad_output"] = rng.uniform(-1, 2, tshape)
    elif "grad_output" in opts:
        kw["grad_output"] = opts["grad_output"]
    tol = LCE_TOL[dtype]
    s = lce_run(calls, True, h, W, t, kw)
    c = lce_run(calls, False, h, W, t, kw)
    assert_same_loss(s.loss, c.loss, 1e-12 if dtype == F64 else 1e-5)
    for a, b in ((s.grad_hidden, c.grad_hidden), (s.grad_weight, c.grad_weight)):
        assert a.dtype == dtype
        assert_same_grad(a, b, tol)
    if "bias" in kw:
        assert_same_grad(s.grad_bias, c.grad_bias, tol)
    else:
        assert s.grad_bias is None and c.grad_bias is None
    s_fwd = lce_run(calls, True, h, W, t, kw, with_grad=False)
    c_fwd = lce_run(calls, False, h, W, t, kw, with_grad=False)
    assert_same_loss(s_fwd, c_fwd, 1e-12 if dtype == F64 else 1e-5)
    # Against the float64 reference on the float64 logits.
    h64, W64 = to_float64(h), to_float64(W)
    b64 = to_float64(kw["bias"]) if "bias" in kw else 0.0
    ref_kw = {k: v for k, v in kw.items() if k != "bias"}
    ref_loss, G = ce_reference(h64 @ W64.T + b64, t, **ref_kw)
    G2 = G.reshape(-1, V)
    rtol, gtol = (1e-9, 1e-9) if dtype == F64 else (1e-4, 1e-4)
    if dtype == BF16:
        gtol = 2.0**-7
    assert_loss(s.loss, ref_loss, rtol, atol=rtol)
    assert_grad(s.grad_hidden.reshape(-1, D), G2 @ W64, gtol)
    assert_grad(s.grad_weight, G2.T @ h64.reshape(-1, D), gtol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_nan_in_ignored_row_stays_out(calls, rng, reduction):
    D, V = 8, 30
    h = rng.standard_normal((10, D)).astype(np.float32)
    W = rng.standard_normal((V, D)).astype(np.float32)
    t = rng.integers(0, V, 10)
    t[[2, 7]] = -100
    h[2, 3] = np.nan
    h[7, :] = np.inf
    kw = dict(reduction=reduction, bias=rng.standard_normal(V).astype(np.float32))
    if reduction == "none":
        kw["grad_output"] = rng.uniform(0.5, 1.5, 10)
    for small in (True, False):
        r = lce_run(calls, small, h, W, t, kw)
        assert np.isfinite(r.loss).all()
        assert np.isfinite(r.grad_weight).all() and np.isfinite(r.grad_bias).all()
        assert np.isfinite(r.grad_hidden).all()
        assert not r.grad_hidden[[2, 7]].any()
        loss = lce_run(calls, small, h, W, t, kw, with_grad=False)
        assert np.isfinite(loss).all()
    # The counted rows alone give the same result.
    keep = t != -100
    s = lce_run(calls, True, h[keep], W, t[keep], dict(kw, grad_output=kw["grad_output"][keep])
                if reduction == "none" else kw)
    r = lce_run(calls, True, h, W, t, kw)
    np.testing.assert_allclose(r.grad_weight, s.grad_weight, rtol=1e-5, atol=1e-6)
    if reduction != "none":
        assert r.loss == pytest.approx(s.loss, rel=1e-6)


@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("tshape", [(12,), (3, 4)], ids=["2d", "3d"])
def test_linear_ce_bad_target_message_same(calls, rng, with_grad, tshape):
    D, V = 6, 9
    h = rng.standard_normal(tshape + (D,))
    W = rng.standard_normal((V, D))
    t = rng.integers(0, V, tshape)
    flat = t.reshape(-1)
    flat[[0, 1]] = -100  # ignored rows before the bad one shift positions on a compacted copy
    flat[6] = V + 4
    flat[9] = -3
    pos = tuple(int(p) for p in np.unravel_index(6, tshape))
    msgs = []
    for small in (True, False):
        calls.clear()
        with pytest.raises(ValueError) as info:
            if with_grad:
                fastloss.linear_cross_entropy_with_grad(h, W, t, chunk_size=None if small else 7)
            else:
                fastloss.linear_cross_entropy(h, W, t, chunk_size=None if small else 7)
        msgs.append(str(info.value))
        if small:
            assert any(calls[k] for k in SERIAL_KERNELS)
    assert msgs[0] == msgs[1] == (f"targets: 2 value(s) outside [0, {V}) that are not "
                                  f"ignore_index=-100; first at position {pos}: {V + 4}")


# ---------------------------------------------------------------------------
# Import and compile notice (subprocesses)
# ---------------------------------------------------------------------------

def _python(code, env=None, timeout=300):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_import_is_lazy():
    r = _python("""
        import sys
        import fastloss
        heavy = ['numba', 'ml_dtypes', 'scipy', 'tqdm', 'fastloss.evaluation']
        print('LOADED', [m for m in heavy if m in sys.modules])
        print(fastloss.evaluate.__name__, fastloss.Layout.__name__, fastloss.EvalReport.__name__)
        print(fastloss.evaluation.__name__, 'fastloss.evaluation' in sys.modules)
    """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "LOADED []"
    assert lines[1] == "evaluate Layout EvalReport"
    assert lines[2] == "fastloss.evaluation True"


def test_compile_notice(tmp_path):
    code = """
        import numpy as np, fastloss
        {quiet}
        print(fastloss.mse(np.arange(3.0), np.ones(3)))
    """
    quiet = 'import logging; logging.getLogger("fastloss.compile").setLevel(logging.ERROR)'

    def run(cache, silence=False):
        env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
        r = _python(code.format(quiet=quiet if silence else ""), env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == str((1.0 + 0.0 + 1.0) / 3)  # (0-1)^2 + 0 + (2-1)^2 over 3
        return r.stderr

    first = run(tmp_path / "cache1")
    assert "fastloss: compiling kernel mse_serial for float64" in first
    assert str(tmp_path / "cache1") in first
    assert first.count("compiling kernel mse_serial") == 1
    second = run(tmp_path / "cache1")
    assert "compiling" not in second
    third = run(tmp_path / "cache2", silence=True)
    assert third == ""
    assert any((tmp_path / "cache2").rglob("*.nbi"))  # it did compile (and cache), silently
