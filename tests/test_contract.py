"""The contract (CONTRACT.md), once per backend: cpu, cuda-sim, gpu.

Every test here takes the ``backend`` fixture (``tests/backends.py``): the same
calls, float64 references (``tests/reference.py``), PyTorch checks and
tolerances run on host arrays in the main pytest step and on device arrays in
the simulator step (``NUMBA_ENABLE_CUDASIM=1``, README's test command), and on
a real GPU where there is one. Shapes are small and odd (never a multiple of a
block size) so the simulator stays quick. The exhaustive CPU checks (large
shapes, hypothesis, every error path) live in the per-op test files;
backend-only mechanics in ``test_cuda_sim.py``.

Tolerances per dtype, with the shared inputs and option tables, are in
``tests/cases.py``.
"""

import numpy as np
import pytest
from cases import BF16, CE_CASES, DTYPES, assert_grad, make_logits, make_targets, resolve
from reference import ce_reference, lse_reference, mse_reference, to_float64

import fastloss

def loss_value(backend, loss, reduction):
    """The loss as float64: a float for mean/sum, an array for none."""
    if reduction == "none":
        return to_float64(backend.get(loss))
    return backend.scalar(loss)


# --- cross-entropy ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
@pytest.mark.parametrize("shape, kwargs", CE_CASES)
def test_cross_entropy_matches_reference(backend, rng, dtype, rtol, gtol, shape, kwargs):
    """Loss (forward and fused) and gradient against the float64 reference."""
    kw = resolve(rng, shape, kwargs)
    x = make_logits(rng, shape, dtype)
    t = make_targets(rng, shape[:-1], shape[-1], ignore_index=kw.get("ignore_index", -100))
    ref_loss, ref_grad = ce_reference(x, t, **kw)
    red = kw.get("reduction", "mean")
    call = dict(kw)
    if np.ndim(call.get("grad_output")):
        call["grad_output"] = backend.put(call["grad_output"])
    loss, grad = fastloss.cross_entropy_with_grad(backend.put(x), backend.put(t), **call)
    np.testing.assert_allclose(loss_value(backend, loss, red), ref_loss, rtol=rtol, atol=1e-6)
    assert grad.shape == x.shape and backend.get(grad).dtype == x.dtype
    assert_grad(backend.get(grad), ref_grad, gtol)
    kw.pop("grad_output", None)
    fwd = fastloss.cross_entropy(backend.put(x), backend.put(t), **kw)
    np.testing.assert_allclose(loss_value(backend, fwd, red), ce_reference(x, t, **kw)[0], rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(weight=np.array([0.5, 2.0, 1.0, 1.5, 0.25])),
                                dict(label_smoothing=0.3, reduction="sum"), dict(reduction="none")])
def test_cross_entropy_matches_torch(backend, rng, kw):
    """The options PyTorch shares give PyTorch's loss (float64 logits)."""
    torch = pytest.importorskip("torch")
    x = make_logits(rng, (9, 5), np.float64)
    t = make_targets(rng, (9,), 5)
    tw = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    want = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), **tw).numpy()
    call = {k: (backend.put(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    got = loss_value(backend, fastloss.cross_entropy(backend.put(x), backend.put(t), **call),
                     kw.get("reduction", "mean"))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_named_results(backend, rng):
    """The fused functions return named results that still unpack as (loss, grad)."""
    x = make_logits(rng, (4, 11), np.float32)
    t = make_targets(rng, (4,), 11)
    r = fastloss.cross_entropy_with_grad(backend.put(x), backend.put(t))
    assert isinstance(r, fastloss.CrossEntropyResult) and r._fields == ("loss", "grad")
    loss, grad = r
    assert loss is r.loss and grad is r.grad
    np.testing.assert_allclose(backend.scalar(r.loss), ce_reference(x, t)[0], rtol=2e-5)
    m = fastloss.mse_with_grad(backend.put(x), backend.put(x * 0.5))
    assert isinstance(m, fastloss.MSEResult) and m._fields == ("loss", "grad")
    assert_grad(backend.get(m.grad), mse_reference(x, x * 0.5)[1], 2e-6)


@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
def test_logsumexp_matches_reference(backend, rng, dtype, rtol, gtol):
    x = make_logits(rng, (4, 21), dtype)
    x[1, :15] = -np.inf  # an all -inf prefix spanning threads
    x[2, :] = -np.inf    # a masked row: -inf, not NaN
    got = to_float64(backend.get(fastloss.logsumexp(backend.put(x))))
    np.testing.assert_allclose(got, lse_reference(x), rtol=rtol)
    got = to_float64(backend.get(fastloss.logsumexp(backend.put(x), softcap=4.0, logit_scale=0.5)))
    np.testing.assert_allclose(got, lse_reference(x, softcap=4.0, logit_scale=0.5), rtol=rtol)
    assert got[2] == -np.inf


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_neg_inf_logits_are_masked(backend, rng, softcap):
    """-inf logits stay masked under every transform (an all -inf prefix gives no NaN)."""
    x = make_logits(rng, (4, 30), np.float32)
    x[0, :20] = -np.inf
    x[1, ::3] = -np.inf
    t = np.array([25, 1, 7, 29])
    for kw in (dict(reduction="none"), dict(z_loss=0.01, weight=rng.uniform(0.5, 1, 30)),
               dict(reduction="sum", label_smoothing=0.1)):
        call = {k: (backend.put(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        loss, grad = fastloss.cross_entropy_with_grad(backend.put(x), backend.put(t), softcap=softcap, **call)
        ref_loss, ref_grad = ce_reference(x, t, softcap=softcap, **kw)
        g = backend.get(grad)
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(loss_value(backend, loss, kw.get("reduction", "mean")), ref_loss, rtol=2e-5)
        assert_grad(g, ref_grad, 2e-6)


def test_nan_stays_in_its_row(backend, rng):
    x = make_logits(rng, (5, 17), np.float32)
    x[2, 9] = np.nan
    x[4, :] = -np.inf  # all masked: NaN like the reference (lse = -inf), in its row only
    t = np.array([1, 2, 3, 4, 5])
    loss, grad = fastloss.cross_entropy_with_grad(backend.put(x), backend.put(t), reduction="none")
    loss, grad = backend.get(loss), backend.get(grad)
    assert np.isnan(loss[2]) and np.all(np.isnan(grad[2]))
    assert np.isnan(loss[4]) and np.all(np.isnan(grad[4]))
    keep = [0, 1, 3]
    ref_loss, ref_grad = ce_reference(x[keep], t[keep], reduction="none")
    np.testing.assert_allclose(loss[keep], ref_loss, rtol=2e-5)
    assert_grad(grad[keep], ref_grad, 2e-6)
    assert np.isnan(backend.scalar(fastloss.cross_entropy(backend.put(x), backend.put(t))))


def test_all_ignored_and_empty(backend, rng):
    """A mean over nothing is 0.0 with a zero gradient (not PyTorch's NaN)."""
    x = make_logits(rng, (4, 9), np.float32)
    t = np.full(4, -100)
    for red in ("mean", "sum"):
        loss, grad = fastloss.cross_entropy_with_grad(backend.put(x), backend.put(t), reduction=red,
                                                      z_loss=0.1)
        assert backend.scalar(loss) == 0.0
        assert np.all(backend.get(grad) == 0)
    loss, grad = fastloss.cross_entropy_with_grad(backend.put(x), backend.put(t), reduction="none")
    assert np.all(backend.get(loss) == 0) and np.all(backend.get(grad) == 0)
    e = backend.put(np.zeros((0, 5), np.float32))
    te = backend.put(np.zeros(0, np.int64))
    loss, grad = fastloss.cross_entropy_with_grad(e, te)
    assert backend.scalar(loss) == 0.0 and grad.shape == (0, 5)
    assert fastloss.cross_entropy(e, te, reduction="none").shape == (0,)
    assert fastloss.logsumexp(e).shape == (0,)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float16), BF16])
def test_inplace_and_out(backend, rng, dtype):
    """``inplace=True`` returns the logits holding the gradient; ``out=`` is filled
    completely (it starts poisoned with NaN) and the logits stay untouched."""
    if backend.name == "gpu" and dtype == BF16:
        pytest.skip("bfloat16 GPU inputs are torch tensors: in place is covered in test_cuda_sim")
    x = make_logits(rng, (5, 23), dtype)
    t = make_targets(rng, (5,), 23)
    ref_loss, ref_grad = ce_reference(x, t, label_smoothing=0.1)
    tol = {np.float32: 2e-6, np.float16: 1e-3}.get(dtype.type, 8e-3)
    d = backend.put(x.copy())
    loss, grad = fastloss.cross_entropy_with_grad(d, backend.put(t), label_smoothing=0.1, inplace=True)
    assert grad is d
    assert_grad(backend.get(d), ref_grad, tol)
    out = backend.put(np.full(x.shape, np.nan, dtype))
    d = backend.put(x.copy())
    loss, grad = fastloss.cross_entropy_with_grad(d, backend.put(t), label_smoothing=0.1, out=out)
    assert grad is out
    assert_grad(backend.get(out), ref_grad, tol)
    np.testing.assert_array_equal(to_float64(backend.get(d)), to_float64(x))
    np.testing.assert_allclose(backend.scalar(loss), ref_loss, rtol=2e-5)


# --- mean squared error ---------------------------------------------------------------

MSE_CASES = [
    pytest.param((7, 13), {}, id="mean"),
    pytest.param((3, 5, 4), dict(reduction="sum", weight="full", grad_output=1.5), id="sum-full-weight"),
    pytest.param((6, 9), dict(weight="row"), id="mean-row-weight"),
    pytest.param((6, 9), dict(reduction="none", weight="col", grad_output="elems"), id="none-col-weight-elems"),
    pytest.param((11,), dict(weight="scalar", reduction="none", grad_output=0.5), id="1d-scalar-weight"),
]


@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
@pytest.mark.parametrize("shape, kwargs", MSE_CASES)
def test_mse_matches_reference(backend, rng, dtype, rtol, gtol, shape, kwargs):
    kw = dict(kwargs)
    weights = {"full": lambda: rng.uniform(0, 2, shape), "row": lambda: rng.uniform(0, 2, shape[-1:]),
               "col": lambda: rng.uniform(0, 2, shape[:-1] + (1,)), "scalar": lambda: np.array(0.7)}
    if kw.get("weight"):
        kw["weight"] = weights[kw["weight"]]()
    if kw.get("grad_output") == "elems":
        kw["grad_output"] = rng.uniform(-1, 1, shape)
    p = make_logits(rng, shape, dtype, 1.0)
    q = make_logits(rng, shape, np.float32, 1.0)
    red = kw.get("reduction", "mean")
    ref_loss, ref_grad = mse_reference(p, q, **kw)
    call = dict(kw)
    if np.ndim(call.get("grad_output")):
        call["grad_output"] = backend.put(call["grad_output"])
    loss, grad = fastloss.mse_with_grad(backend.put(p), backend.put(q), **call)
    assert grad.shape == p.shape and backend.get(grad).dtype == p.dtype
    np.testing.assert_allclose(loss_value(backend, loss, red), ref_loss, rtol=rtol, atol=1e-6)
    assert_grad(backend.get(grad), ref_grad, gtol)
    call.pop("grad_output", None)
    kw.pop("grad_output", None)
    np.testing.assert_allclose(loss_value(backend, fastloss.mse(backend.put(p), backend.put(q), **call), red),
                               mse_reference(p, q, **kw)[0], rtol=rtol, atol=1e-6)


def test_mse_out_and_zero_weight(backend, rng):
    p = make_logits(rng, (5, 7), np.float32)
    q = make_logits(rng, (5, 7), np.float32)
    out = backend.put(np.full((5, 7), np.nan, np.float32))
    loss, grad = fastloss.mse_with_grad(backend.put(p), backend.put(q), out=out)
    assert grad is out
    assert_grad(backend.get(out), mse_reference(p, q)[1], 2e-6)
    dp = backend.put(p.copy())
    loss, grad = fastloss.mse_with_grad(dp, backend.put(q), out=dp)  # over pred itself: allowed
    assert grad is dp
    assert_grad(backend.get(dp), mse_reference(p, q)[1], 2e-6)
    z = backend.put(np.zeros((0, 3), np.float32))
    assert backend.scalar(fastloss.mse(z, z)) == 0.0
    assert backend.scalar(fastloss.mse(backend.put(p), backend.put(q), weight=np.zeros((5, 7)))) == 0.0


# --- errors: the same exception and message on every backend ----------------------------

def _ce_errors(b, x, t):
    """(call, exception, message pattern) for bad cross-entropy calls."""
    ce, ceg = fastloss.cross_entropy, fastloss.cross_entropy_with_grad
    return [
        (lambda: ce(x, b.put(np.array([0, 40, -100, -3]))), ValueError,
         r"targets: 2 value\(s\) outside \[0, 37\) that are not ignore_index=-100; first at position \(1,\): 40$"),
        (lambda: ce(x, b.put(np.array([0, 2**64 - 1, 3, 2**63], np.uint64))), ValueError,
         r"targets: 2 value\(s\) .* first at position \(1,\): 18446744073709551615$"),
        (lambda: ce(x, b.put(np.full(4, 2.0, np.float32))), ValueError,
         r"targets: float \(probability\) targets must have the logits' shape"),
        (lambda: ce(x, b.put(np.zeros(3, np.int64))), ValueError,
         r"targets: expected shape \(4,\) \(logits.shape\[:-1\]\), found \(3,\)"),
        (lambda: ce(b.put(np.zeros((2, 3), np.int32)), b.put(np.zeros(2, np.int64))), TypeError,
         "logits: expected dtype float16, bfloat16, float32 or float64, found int32"),
        (lambda: ce(b.put(np.zeros((2, 0), np.float32)), b.put(np.zeros(2, np.int64))), ValueError,
         r"logits: the class dimension \(last\) must be at least 1"),
        (lambda: ce(x, t, weight=b.put(np.ones(5))), ValueError, r"weight: expected shape \(37,\) \(one weight"),
        (lambda: ce(x, t, weight=b.put(np.r_[np.ones(36), np.nan])), ValueError,
         "weight: expected finite values, found NaN or inf"),
        (lambda: ce(x, t, weight=b.put(np.r_[np.ones(36), -1.0])), ValueError,
         "weight: expected non-negative values, found minimum -1.0"),
        (lambda: ce(x, t, reduction="avg"), ValueError, "reduction: expected one of 'mean', 'sum', 'none'"),
        (lambda: ce(x, t, label_smoothing=1.5), ValueError,
         r"label_smoothing: expected a finite value in \[0.0, 1.0\]"),
        (lambda: ce(x, t, z_loss=-1.0), ValueError, "z_loss: expected a finite value"),
        (lambda: ce(x, t, softcap=0.0), ValueError, "softcap: expected a finite value"),
        (lambda: ce(x, t, logit_scale="2"), TypeError, "logit_scale: expected a real number"),
        (lambda: ce(x, t, ignore_index=1.5), TypeError, "ignore_index: expected an integer"),
        (lambda: ce(x, t, normalizer=3.0, reduction="sum"), ValueError,
         "normalizer: only used with reduction='mean', found reduction='sum'"),
        (lambda: ceg(x, t, grad_output=b.put(np.ones(2))), ValueError,
         "grad_output: expected a scalar for reduction='mean', found shape"),
        (lambda: ceg(x, t, reduction="none", grad_output=b.put(np.ones(3))), ValueError,
         r"grad_output: expected a scalar or shape \(4,\) \(targets.shape\) for reduction='none'"),
        (lambda: ceg(x, t, inplace=True, out=b.put(np.zeros((4, 37), np.float32))), ValueError,
         "out: cannot be combined with inplace=True"),
        (lambda: ceg(x, t, out=b.put(np.zeros((4, 37), np.float64))), TypeError, "out: expected dtype float32"),
        (lambda: ceg(x, t, out=b.put(np.zeros((4, 36), np.float32))), ValueError, r"out: expected shape \(4, 37\)"),
        (lambda: ceg(x, t, inplace=1), TypeError, "inplace: expected True or False"),
        (lambda: fastloss.logsumexp(x, logit_scale=-1.0), ValueError, "logit_scale: expected a finite value"),
        (lambda: ce(x, t, softcap=3.5e38), ValueError, r"softcap: 3.5e\+38 overflows the float32 accumulation"),
        (lambda: ceg(x, t, logit_scale=1e39), ValueError, r"logit_scale: 1e\+39 overflows the float32 accumulation"),
        (lambda: fastloss.logsumexp(x, softcap=3.5e38), ValueError, "softcap: .* overflows the float32"),
        (lambda: ce(x, t, softcap=1e-40), ValueError, r"logit_scale / softcap: 1e\+40 overflows the float32"),
    ]


def test_cross_entropy_errors(backend, rng):
    x = backend.put(make_logits(rng, (4, 37), np.float32))
    t = backend.put(np.array([0, 1, 2, 3]))
    for call, exc, pattern in _ce_errors(backend, x, t):
        with pytest.raises(exc, match=pattern):
            call()
    if backend.device:
        fastloss.cuda.synchronize()  # nothing is left pending


def test_huge_softcap_is_no_cap_in_float64(backend, rng):
    """A cap that float64 holds but float32 does not: refused for float32 logits
    (test_cross_entropy_errors), the same as no cap for float64 logits."""
    x = make_logits(rng, (3, 10), np.float64)
    t = make_targets(rng, (3,), 10)
    got = loss_value(backend, fastloss.cross_entropy(backend.put(x), backend.put(t), softcap=3.5e38), "mean")
    np.testing.assert_allclose(got, ce_reference(x, t)[0], rtol=1e-12)


def test_bad_targets_leave_inplace_logits_alone(backend, rng):
    xi = make_logits(rng, (4, 37), np.float32)
    d = backend.put(xi.copy())
    with pytest.raises(ValueError, match=r"targets: 1 value\(s\)"):
        fastloss.cross_entropy_with_grad(d, backend.put(np.array([0, 37, 1, 2])), inplace=True)
    np.testing.assert_array_equal(backend.get(d), xi)


def test_mse_errors(backend, rng):
    p = backend.put(make_logits(rng, (5, 7), np.float32))
    q = make_logits(rng, (5, 7), np.float32)
    dq = backend.put(q)
    cases = [
        (lambda: fastloss.mse_with_grad(p, dq, out=dq), ValueError, "out: overlaps pred or target"),
        (lambda: fastloss.mse(p, backend.put(q[:4])), ValueError, r"target: expected the shape of pred \(5, 7\)"),
        (lambda: fastloss.mse(p, backend.put(q.astype(np.int16))), TypeError, "target: expected dtype"),
        (lambda: fastloss.mse(p, dq, weight=np.ones(3)), ValueError, "weight: shape"),
        (lambda: fastloss.mse(p, dq, reduction="x"), ValueError, "reduction: expected one of"),
        (lambda: fastloss.mse_with_grad(p, dq, reduction="sum", grad_output=np.ones(2)), ValueError,
         "grad_output: expected a scalar for reduction='sum'"),
        (lambda: fastloss.mse_with_grad(p, dq, reduction="none", grad_output=np.ones(3)), ValueError,
         r"grad_output: expected a scalar or shape \(5, 7\) \(pred.shape\)"),
        (lambda: fastloss.mse_with_grad(p, dq, out=backend.put(np.zeros((5, 7)))), TypeError,
         "out: expected dtype float32"),
    ]
    for call, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            call()


# --- aliasing: out= over the input and inplace give what a fresh buffer gives ----------

WEIGHTS = {None: lambda rng, shape: None, "full": lambda rng, shape: rng.uniform(0, 2, shape),
           "row": lambda rng, shape: rng.uniform(0, 2, shape[-1:]),
           "col": lambda rng, shape: rng.uniform(0, 2, shape[:-1] + (1,))}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
@pytest.mark.parametrize("weight", list(WEIGHTS))
def test_mse_out_over_pred_every_reduction(backend, rng, reduction, dtype, rtol, gtol, weight):
    """``out=pred`` (the gradient written over pred) gives the loss and gradient of
    a call with a fresh buffer, for every reduction and weight layout."""
    p = make_logits(rng, (6, 9), dtype, 1.0)
    q = make_logits(rng, (6, 9), np.float32, 1.0)
    w = WEIGHTS[weight](rng, p.shape)
    ref_loss, ref_grad = fastloss.mse_with_grad(backend.put(p), backend.put(q), reduction=reduction, weight=w)
    d = backend.put(p.copy())
    loss, grad = fastloss.mse_with_grad(d, backend.put(q), reduction=reduction, weight=w, out=d)
    assert grad is d
    np.testing.assert_array_equal(to_float64(backend.get(grad)), to_float64(backend.get(ref_grad)))
    # Element-wise results are identical; a sum may be taken in another order (the
    # compiled loop runs unvectorised over overlapping arrays): equal to rounding.
    sum_rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(loss_value(backend, loss, reduction), loss_value(backend, ref_loss, reduction),
                               rtol=sum_rtol, atol=0)
    np.testing.assert_allclose(loss_value(backend, loss, reduction), mse_reference(p, q, reduction=reduction,
                                                                                   weight=w)[0], rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
def test_cross_entropy_inplace_and_out_over_logits_every_reduction(backend, rng, reduction, dtype, rtol, gtol):
    """``inplace=True`` and ``out=logits`` give the loss and gradient of a call with
    a fresh buffer, for every reduction (options that read the logits twice:
    label smoothing, softcap, z-loss)."""
    if backend.name == "gpu" and dtype == BF16:
        pytest.skip("bfloat16 GPU inputs are torch tensors: in place is covered in test_cuda_sim")
    x = make_logits(rng, (5, 23), dtype)
    t = make_targets(rng, (5,), 23)
    kw = dict(reduction=reduction, label_smoothing=0.1, softcap=4.0, z_loss=1e-3)
    ref_loss, ref_grad = fastloss.cross_entropy_with_grad(backend.put(x), backend.put(t), **kw)
    want_grad = to_float64(backend.get(ref_grad))
    want_loss = loss_value(backend, ref_loss, reduction)
    d = backend.put(x.copy())
    loss, grad = fastloss.cross_entropy_with_grad(d, backend.put(t), inplace=True, **kw)
    assert grad is d
    np.testing.assert_array_equal(to_float64(backend.get(grad)), want_grad)
    np.testing.assert_array_equal(loss_value(backend, loss, reduction), want_loss)
    d = backend.put(x.copy())
    loss, grad = fastloss.cross_entropy_with_grad(d, backend.put(t), out=d, **kw)
    assert grad is d
    np.testing.assert_array_equal(to_float64(backend.get(grad)), want_grad)
    np.testing.assert_array_equal(loss_value(backend, loss, reduction), want_loss)


def test_mean_over_nothing_has_zero_gradient_despite_nan(backend, rng):
    """A mean whose denominator is 0 gives 0.0 and exact zeros as gradient, also
    when a NaN sits in a row or element that counts for nothing (docs/semantics.md)."""
    p = make_logits(rng, (4, 6), np.float32, 1.0)
    p[1, 2] = np.nan
    q = make_logits(rng, (4, 6), np.float32, 1.0)
    loss, grad = fastloss.mse_with_grad(backend.put(p), backend.put(q), weight=np.zeros((4, 6)))
    assert backend.scalar(loss) == 0.0
    assert np.all(to_float64(backend.get(grad)) == 0)
    x = make_logits(rng, (5, 9), np.float32)
    x[2, 4] = np.nan
    t = np.array([0, 1, 2, 3, 4])
    loss, grad = fastloss.cross_entropy_with_grad(backend.put(x), backend.put(t), weight=backend.put(np.zeros(9)))
    assert backend.scalar(loss) == 0.0
    assert np.all(to_float64(backend.get(grad)) == 0)
    # grad_output = 0: nothing flows back anywhere
    loss, grad = fastloss.cross_entropy_with_grad(backend.put(x), backend.put(t), grad_output=0.0)
    assert np.isnan(backend.scalar(loss))
    assert np.all(to_float64(backend.get(grad)) == 0)
    # with z-loss the counted rows still get the z-loss gradient (the NaN row: NaN)
    loss, grad = fastloss.cross_entropy_with_grad(backend.put(x), backend.put(t), z_loss=0.1,
                                                  weight=backend.put(np.zeros(9)))
    g = to_float64(backend.get(grad))
    assert np.all(np.isnan(g[2])) and np.all(np.isfinite(np.delete(g, 2, axis=0)))
    assert np.any(np.delete(g, 2, axis=0) != 0)
