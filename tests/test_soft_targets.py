"""Cross-entropy with probability ("soft") targets on the CPU, exhaustively.

Against the float64 reference (``reference.soft_ce_reference``, analytic
gradient) and ``torch.nn.functional.cross_entropy`` with probability targets;
every logits dtype, tiny, odd and realistic shapes, both roads (the serial
small-call kernels and the parallel ones), every option, masking, NaN rows,
every error message, hypothesis properties and finite differences.
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from cases import make_logits as logits
from cases import make_probs as probs
from cases import resolve
from reference import soft_ce_reference, to_float64

import fastloss
import fastloss.config

BF16 = np.dtype(ml_dtypes.bfloat16)
ce, ceg = fastloss.cross_entropy, fastloss.cross_entropy_with_grad

# (dtype, loss rtol, gradient tolerance relative to max(1, max |grad|))
DTYPES = [
    pytest.param(np.dtype(np.float32), 2e-5, 2e-6, id="float32"),
    pytest.param(np.dtype(np.float64), 1e-10, 1e-12, id="float64"),
    pytest.param(np.dtype(np.float16), 2e-5, 1e-3, id="float16"),
    pytest.param(BF16, 2e-5, 8e-3, id="bfloat16"),
]

SHAPES = [pytest.param((1, 1), id="1x1"), pytest.param((3, 5), id="3x5"),
          pytest.param((7, 1001), id="7x1001"), pytest.param((2, 3, 517), id="2x3x517"),
          pytest.param((2, 4500), id="2x4500")]  # 4500: three blocks of the row sweep

OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param(dict(weight="w", label_smoothing=0.2, reduction="sum"), id="weight-smooth-sum"),
    pytest.param(dict(softcap=3.0, logit_scale=0.7, z_loss=0.01, reduction="none", grad_output="rows"),
                 id="none-softcap-zloss-rows"),
    pytest.param(dict(logit_scale=1.3, normalizer=7.0, grad_output=0.5, z_loss=0.02, weight="w"),
                 id="scale-normalizer-go"),
]


@pytest.fixture(params=["serial", "parallel"])
def road(request, monkeypatch):
    """Run a test on the serial small-call kernels and on the parallel ones."""
    if request.param == "parallel":
        monkeypatch.setattr(fastloss.config, "SERIAL_MAX_ELEMENTS", 0)
        monkeypatch.setattr(fastloss.config, "MIN_ELEMENTS_PER_TASK", 1)
    return request.param


def assert_loss(got, ref, rtol, atol=1e-6):
    if np.ndim(ref):
        assert isinstance(got, np.ndarray) and got.shape == np.shape(ref)
        np.testing.assert_allclose(to_float64(got), ref, rtol=rtol, atol=atol)
    else:
        assert isinstance(got, float)
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


def assert_grad(got, ref, tol):
    scale = max(1.0, float(np.nanmax(np.abs(ref)))) if ref.size else 1.0
    np.testing.assert_allclose(to_float64(got), ref, rtol=0, atol=tol * scale + 1e-30)


def torch_soft(x, q, *, grad_output=None, **kw):
    """PyTorch's loss and gradient with probability targets (float64)."""
    torch = pytest.importorskip("torch")
    xt = torch.tensor(to_float64(x), requires_grad=True)
    qt = torch.tensor(to_float64(q))
    if kw.get("weight") is not None:
        kw["weight"] = torch.tensor(to_float64(kw["weight"]))
    loss = torch.nn.functional.cross_entropy(xt, qt, **kw)
    g = torch.ones_like(loss) if grad_output is None else torch.as_tensor(grad_output, dtype=torch.float64)
    loss.backward(g)
    return loss.detach().numpy(), xt.grad.numpy()


# --- against the reference -------------------------------------------------------------

@pytest.mark.parametrize("kw", OPTIONS)
@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(rng, road, shape, dtype, rtol, gtol, kw):
    kw = resolve(rng, shape, kw)
    x = logits(rng, shape, dtype)
    q = probs(rng, shape)
    ref_loss, ref_grad = soft_ce_reference(x, q, **kw)
    loss, grad = ceg(x, q, **kw)
    assert_loss(loss, ref_loss, rtol)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    assert_grad(grad, ref_grad, gtol)
    kw.pop("grad_output", None)
    assert_loss(ce(x, q, **kw), soft_ce_reference(x, q, **kw)[0], rtol)


@pytest.mark.parametrize("kw", [dict(), dict(weight=True), dict(label_smoothing=0.3, reduction="sum"),
                                dict(weight=True, label_smoothing=0.1, reduction="none"),
                                dict(weight=True, reduction="mean")])
def test_matches_torch(rng, road, kw):
    """The options PyTorch shares give PyTorch's loss and gradient (float64)."""
    shape = (9, 37)
    x = logits(rng, shape, np.float64)
    q = probs(rng, shape, np.float64)
    kw = dict(kw)
    if kw.get("weight"):
        kw["weight"] = rng.uniform(0.2, 2.0, shape[-1])
    t_loss, t_grad = torch_soft(x, q, **kw)
    loss, grad = ceg(x, q, **kw)
    assert_loss(loss, t_loss if np.ndim(t_loss) else float(t_loss), 1e-12, atol=1e-12)
    assert_grad(grad, t_grad, 1e-12)
    assert_loss(ce(x, q, **kw), t_loss if np.ndim(t_loss) else float(t_loss), 1e-12, atol=1e-12)


def test_one_hot_rows_give_the_class_index_loss(rng, road):
    x = logits(rng, (6, 29), np.float32)
    t = rng.integers(0, 29, 6)
    q = np.eye(29, dtype=np.float32)[t]
    w = rng.uniform(0.5, 2.0, 29)
    a, ga = ceg(x, q, reduction="sum", weight=w, z_loss=1e-3)
    b, gb = ceg(x, t, reduction="sum", weight=w, z_loss=1e-3)
    assert a == pytest.approx(b, rel=1e-6)
    np.testing.assert_allclose(ga, gb, atol=1e-6)


@pytest.mark.parametrize("dtype, rtol, gtol", [DTYPES[0], DTYPES[3]])
def test_realistic_vocabulary(rng, dtype, rtol, gtol):
    shape = (256, 32000)
    x = logits(rng, shape, dtype)
    q = probs(rng, shape, np.float32, sharp=8.0)
    kw = dict(label_smoothing=0.1, z_loss=1e-4)
    ref_loss, ref_grad = soft_ce_reference(x, q, **kw)
    grad = np.full(shape, np.nan, dtype)
    loss, g = ceg(x, q, out=grad, **kw)
    assert g is grad
    assert_loss(loss, ref_loss, rtol)
    assert_grad(grad, ref_grad, gtol)
    assert_loss(ce(x, q, reduction="none", **kw), soft_ce_reference(x, q, reduction="none", **kw)[0], rtol)


# --- target dtypes, buffers, layouts -------------------------------------------------------

@pytest.mark.parametrize("qdtype, qtol", [(np.float16, 1e-3), (BF16, 1e-2), (np.float64, 1e-6),
                                          (np.float32, 1e-6)])
@pytest.mark.parametrize("xdtype", [np.dtype(np.float32), BF16])
def test_target_dtypes(rng, road, qdtype, qtol, xdtype):
    """Targets of any float dtype, also unlike the logits' (the reference reads
    the same rounded targets, so only the logits' tolerance applies)."""
    shape = (5, 300)
    x = logits(rng, shape, xdtype)
    q = probs(rng, shape, qdtype)
    ref_loss, ref_grad = soft_ce_reference(x, q, reduction="none")
    loss, grad = ceg(x, q, reduction="none")
    assert loss.dtype == np.float32
    assert_loss(loss, ref_loss, 2e-5)
    assert_grad(grad, ref_grad, 8e-3 if xdtype == BF16 else 2e-6)


def test_out_and_inplace(rng, road):
    shape = (4, 2100)
    x = logits(rng, shape, np.float32)
    q = probs(rng, shape)
    kw = dict(weight=rng.uniform(0.5, 2.0, shape[-1]), label_smoothing=0.1)
    ref_loss, ref_grad = soft_ce_reference(x, q, **kw)
    out = np.full(shape, np.nan, np.float32)  # poisoned: every element must be written
    loss, grad = ceg(x, q, out=out, **kw)
    assert grad is out and not np.isnan(out).any()
    assert_grad(out, ref_grad, 2e-6)
    xc = x.copy()
    loss2, grad2 = ceg(xc, q, inplace=True, **kw)
    assert grad2 is xc
    assert loss2 == pytest.approx(loss, rel=1e-6) and loss == pytest.approx(ref_loss, rel=2e-5)
    np.testing.assert_allclose(xc, out, atol=1e-7)
    xq = x.copy()
    ceg(xq, q, **kw)
    np.testing.assert_array_equal(xq, x)  # inputs untouched without inplace


def test_non_contiguous_inputs(rng, road):
    big = logits(rng, (6, 2, 40), np.float32)
    qbig = np.ascontiguousarray(probs(rng, (6, 2, 40)).astype(np.float64).transpose(0, 2, 1))
    x = big[::2, 1, :]  # strided rows
    q = qbig[::2, :, 0]  # strided elements
    ref_loss, ref_grad = soft_ce_reference(x, q, reduction="sum", z_loss=0.01)
    loss, grad = ceg(x, q, reduction="sum", z_loss=0.01)
    assert_loss(loss, ref_loss, 2e-5)
    assert_grad(grad, ref_grad, 2e-6)
    xs = big[::2, 1, :]
    loss2, g2 = ceg(xs, q, reduction="sum", z_loss=0.01, inplace=True)
    assert g2 is xs
    assert_grad(big[::2, 1, :], ref_grad, 2e-6)
    np.testing.assert_array_equal(big[:, 0, :], logits(np.random.default_rng(20240607), (6, 2, 40),
                                                       np.float32)[:, 0, :])


def test_grad_output_per_row_and_scalar(rng, road):
    shape = (2, 3, 41)
    x = logits(rng, shape, np.float64)
    q = probs(rng, shape, np.float64)
    g = rng.uniform(-1, 2, shape[:-1])
    for go in (g, 0.75, None):
        ref_loss, ref_grad = soft_ce_reference(x, q, reduction="none", grad_output=go, z_loss=0.01)
        loss, grad = ceg(x, q, reduction="none", grad_output=go, z_loss=0.01)
        assert loss.shape == shape[:-1] and loss.dtype == np.float64
        assert_loss(loss, ref_loss, 1e-12)
        assert_grad(grad, ref_grad, 1e-12)


def test_zero_upstream_gradient_gives_zeros(rng, road):
    x = logits(rng, (3, 20), np.float32)
    x[1, 3] = np.nan
    q = probs(rng, (3, 20))
    _, grad = ceg(x, q, reduction="none", grad_output=np.array([1.0, 0.0, 2.0]))
    assert (grad[1] == 0).all() and np.isfinite(grad[[0, 2]]).all()
    _, grad = ceg(x, q, reduction="sum", grad_output=0.0)
    assert (grad == 0).all()


def test_ignore_index_is_not_used(rng, road):
    x = logits(rng, (4, 7), np.float32)
    q = probs(rng, (4, 7))
    base = ceg(x, q)
    for ii in (0, 3, -100):
        got = ceg(x, q, ignore_index=ii)
        assert got.loss == base.loss
        np.testing.assert_array_equal(got.grad, base.grad)


def test_empty_batch(road):
    for red, want in (("mean", 0.0), ("sum", 0.0)):
        loss, grad = ceg(np.zeros((0, 5), np.float32), np.zeros((0, 5), np.float32), reduction=red)
        assert loss == want and isinstance(loss, float) and grad.shape == (0, 5)
    loss = ce(np.zeros((2, 0, 5), np.float32), np.zeros((2, 0, 5), np.float32), reduction="none")
    assert loss.shape == (2, 0)


def test_mean_divides_by_rows_not_weights(rng, road):
    """PyTorch's rule for probability targets: class weights stay out of the mean's denominator."""
    x = logits(rng, (5, 6), np.float64)
    q = probs(rng, (5, 6), np.float64)
    w = rng.uniform(0.1, 3.0, 6)
    assert ce(x, q, weight=w) == pytest.approx(ce(x, q, weight=w, reduction="sum") / 5, rel=1e-12)
    assert ce(x, q, weight=w, normalizer=2.0) == pytest.approx(ce(x, q, weight=w, reduction="sum") / 2,
                                                                rel=1e-12)


# --- masking and NaN ----------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(softcap=4.0), dict(logit_scale=2.0, weight=np.arange(1.0, 7.0))])
def test_masked_logits_with_zero_target(rng, road, kw):
    """0 * (-inf) is 0: a masked class with q = 0 adds nothing (PyTorch: NaN)."""
    x = logits(rng, (3, 6), np.float32)
    q = probs(rng, (3, 6))
    x[0, 2] = -np.inf
    q[0] = [0.3, 0.2, 0.0, 0.25, 0.15, 0.1]
    x[1, :5] = -np.inf  # a row with one class left
    q[1] = [0, 0, 0, 0, 0, 1]
    ref_loss, ref_grad = soft_ce_reference(x, q, reduction="none", **kw)
    loss, grad = ceg(x, q, reduction="none", **kw)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    assert_loss(loss, ref_loss, 2e-5)
    assert_grad(grad, ref_grad, 2e-6)
    assert grad[0, 2] == 0 and (grad[1, :5] == 0).all()
    if not kw:  # where we deliberately differ from PyTorch
        t_loss, _ = torch_soft(x, q, reduction="none")
        assert np.isnan(t_loss[0])


def test_masked_logit_with_positive_target_is_infinite(rng, road):
    x = logits(rng, (2, 5), np.float32)
    q = probs(rng, (2, 5))
    x[1, 4] = -np.inf
    loss = ce(x, q, reduction="none")
    assert loss[1] == np.inf and np.isfinite(loss[0])
    t_loss, _ = torch_soft(x, q, reduction="none")
    assert t_loss[1] == np.inf


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float64), BF16])
def test_nan_row_does_not_leak(rng, road, dtype):
    shape = (4, 2500)
    x = logits(rng, shape, dtype)
    x[2, 1234] = np.nan
    q = probs(rng, shape)
    ref_loss, ref_grad = soft_ce_reference(x, q, reduction="none")
    loss, grad = ceg(x, q, reduction="none")
    assert np.isnan(loss[2]) and np.isnan(to_float64(grad[2])).all()
    keep = [0, 1, 3]
    assert_loss(loss[keep], ref_loss[keep], 2e-5)
    assert_grad(grad[keep], ref_grad[keep], 8e-3 if dtype == BF16 else 2e-6)
    assert np.isnan(ce(x, q)) and np.isnan(ce(x, q, reduction="none")[2])


# --- errors -------------------------------------------------------------------------------

def _q(shape=(3, 4)):
    return np.full(shape, 1.0 / shape[-1], np.float32)


ROWS_MSG = (r"targets: {n} row\(s\) of probability targets are not distributions \(entries finite "
            r"and >= 0, summing to 1 within 0\.01\); first at row {pos}: {what}$")


@pytest.mark.parametrize("fn", [ce, ceg])
@pytest.mark.parametrize("edit, n, pos, what", [
    (lambda q: q.__setitem__((1, 2), -0.25), 1, r"\(1,\)", r"entry 2 is -0\.25"),
    (lambda q: q.__setitem__((2, 0), np.nan), 1, r"\(2,\)", r"entry 0 is nan"),
    (lambda q: q.__setitem__((0, 3), np.inf), 1, r"\(0,\)", r"entry 3 is inf"),
    (lambda q: q.__setitem__((1, 1), 0.3), 1, r"\(1,\)", r"it sums to 1\.0500000\d*"),
    (lambda q: (q.__setitem__((2, 1), 0.2), q.__setitem__((1, 1), 0.0)), 2, r"\(1,\)", r"it sums to 0\.75$"),
])
def test_bad_target_rows(road, fn, edit, n, pos, what):
    q = _q()
    edit(q)
    with pytest.raises(ValueError, match=ROWS_MSG.format(n=n, pos=pos, what=what)):
        fn(np.ones((3, 4), np.float32), q)


def test_bad_target_position_is_in_rows_shape(road):
    q = _q((2, 3, 5))
    q[1, 2, 4] = 0.5
    with pytest.raises(ValueError, match=ROWS_MSG.format(n=1, pos=r"\(1, 2\)", what=r"it sums to 1\.3000000\d*")):
        ce(np.zeros((2, 3, 5), np.float64), q.astype(np.float64))


def test_sum_tolerance(road):
    x = np.zeros((1, 4), np.float32)
    ok = np.array([[0.25, 0.25, 0.25, 0.259]], np.float64)  # sums to 1.009
    assert np.isfinite(ce(x, ok))
    assert ce(x, ok.astype(np.float32)) == pytest.approx(1.009 * np.log(4), rel=1e-6)  # no renormalisation
    bad = np.array([[0.25, 0.25, 0.25, 0.262]])  # 1.012
    with pytest.raises(ValueError, match="it sums to 1.01"):
        ce(x, bad)


def test_bad_targets_with_out_raise(rng, road):
    """Rejected in the kernels' pass: the buffer is written (unspecified), the call raises."""
    x = logits(rng, (3, 4), np.float32)
    q = _q()
    q[0, 0] = -1.0
    with pytest.raises(ValueError, match="targets: 1 row"):
        ceg(x, q, out=np.empty_like(x))
    with pytest.raises(ValueError, match="targets: 1 row"):
        ceg(x.copy(), q, inplace=True)


@pytest.mark.parametrize("fn", [ce, ceg])
@pytest.mark.parametrize("tshape", [(3,), (3, 5), (1, 3, 4), (4, 3)])
def test_float_targets_of_another_shape(fn, tshape):
    with pytest.raises(ValueError, match=r"targets: float \(probability\) targets must have the logits' "
                                         r"shape \(3, 4\), found " + re_shape(tshape)):
        fn(np.zeros((3, 4), np.float32), np.zeros(tshape, np.float32))


def re_shape(shape):
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_unsupported_float_target_dtype():
    if np.dtype(np.longdouble) == np.float64:
        pytest.skip("longdouble is float64 here")
    with pytest.raises(TypeError, match="targets: probability targets need dtype float16, bfloat16, "
                                        "float32 or float64, found float128"):
        ce(np.zeros((3, 4), np.float32), np.full((3, 4), 0.25, np.longdouble))


def test_integer_targets_keep_their_messages():
    with pytest.raises(ValueError, match=r"targets: expected shape \(3,\) \(logits.shape\[:-1\]\), found \(3, 4\)"):
        ce(np.zeros((3, 4), np.float32), np.zeros((3, 4), np.int64))
    with pytest.raises(TypeError, match="targets: expected an integer dtype, found complex64"):
        ce(np.zeros((3, 4), np.float32), np.zeros(3, np.complex64))


def test_other_argument_errors(rng):
    x = np.zeros((3, 4), np.float32)
    q = _q()
    with pytest.raises(ValueError, match=r"grad_output: expected a scalar or shape \(3,\) "
                                         r"\(logits.shape\[:-1\]\) for reduction='none', found \(4,\)"):
        ceg(x, q, reduction="none", grad_output=np.ones(4))
    with pytest.raises(ValueError, match=r"weight: expected shape \(4,\)"):
        ce(x, q, weight=np.ones(3))
    with pytest.raises(ValueError, match="weight: expected non-negative values"):
        ce(x, q, weight=-np.ones(4))
    buf = np.zeros(13, np.float32)
    with pytest.raises(ValueError, match="out: overlaps logits"):
        ceg(buf[:12].reshape(3, 4), q, out=buf[1:].reshape(3, 4))
    with pytest.raises(TypeError, match="out: expected dtype float32, found float64"):
        ceg(x, q, out=np.empty((3, 4)))
    with pytest.raises(ValueError, match="logits: inplace=True needs a writable array"):
        xr = x.copy()
        xr.flags.writeable = False
        ceg(xr, q, inplace=True)


# --- properties ---------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 6), v=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       scale=st.floats(0.1, 30.0), sharp=st.floats(0.5, 20.0), dtype=st.sampled_from(["float32", "float64"]))
def test_gibbs_and_zero_sum_gradient(n, v, seed, scale, sharp, dtype):
    """Cross-entropy >= entropy of q (Gibbs), and with sum w q' = 1 and no
    z-loss each gradient row sums to ~0 (p and q both sum to 1)."""
    r = np.random.default_rng(seed)
    x = (r.standard_normal((n, v)) * scale).astype(dtype)
    q = r.random((n, v)) ** sharp
    q[np.arange(n), r.integers(0, v, n)] += 1e-3
    q = (q / q.sum(axis=1, keepdims=True)).astype(dtype)
    loss, grad = ceg(x, q, reduction="none")
    qq = q.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(qq > 0, qq * np.log(qq), 0.0).sum(axis=1)
    tol = 1e-4 * (1 + scale) if dtype == "float32" else 1e-9 * (1 + scale)
    assert (loss >= ent - tol).all()
    np.testing.assert_allclose(loss, soft_ce_reference(x, q, reduction="none")[0],
                               rtol=2e-5 if dtype == "float32" else 1e-10, atol=tol)
    np.testing.assert_allclose(grad.astype(np.float64).sum(axis=1), 0.0,
                               atol=(2e-5 if dtype == "float32" else 1e-12) * max(1.0, v ** 0.5))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), eps=st.floats(0.0, 1.0), zl=st.sampled_from([0.0, 1e-3, 0.1]),
       softcap=st.sampled_from([None, 2.0, 30.0]), scale=st.sampled_from([1.0, 0.5, 2.5]),
       red=st.sampled_from(["mean", "sum", "none"]), weighted=st.booleans())
def test_options_against_reference(seed, eps, zl, softcap, scale, red, weighted):
    r = np.random.default_rng(seed)
    shape = (int(r.integers(1, 5)), int(r.integers(1, 70)))
    x = r.standard_normal(shape) * 4
    q = r.random(shape) + 1e-3
    q /= q.sum(axis=1, keepdims=True)
    kw = dict(label_smoothing=eps, z_loss=zl, softcap=softcap, logit_scale=scale, reduction=red,
              weight=r.uniform(0, 3, shape[1]) if weighted else None)
    ref_loss, ref_grad = soft_ce_reference(x, q, **kw)
    loss, grad = ceg(x, q, **kw)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert_grad(grad, ref_grad, 1e-12)


def test_finite_differences(rng):
    """The analytic gradient against central differences of the loss (float64, every option)."""
    shape = (3, 7)
    x = rng.standard_normal(shape) * 2
    q = probs(rng, shape, np.float64)
    kw = dict(weight=rng.uniform(0.5, 2.0, 7), label_smoothing=0.15, z_loss=0.05, softcap=3.0,
              logit_scale=1.4, reduction="mean")
    _, grad = ceg(x, q, **kw)
    h = 1e-6
    num = np.empty(shape)
    for idx in np.ndindex(shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        num[idx] = (ce(xp, q, **kw) - ce(xm, q, **kw)) / (2 * h)
    np.testing.assert_allclose(grad, num, atol=1e-8)


def test_serial_and_parallel_roads_agree(rng, monkeypatch):
    shape = (8, 3000)
    x = logits(rng, shape, np.float32)
    q = probs(rng, shape)
    a = ceg(x, q, reduction="none", label_smoothing=0.1)
    monkeypatch.setattr(fastloss.config, "SERIAL_MAX_ELEMENTS", 0)
    monkeypatch.setattr(fastloss.config, "MIN_ELEMENTS_PER_TASK", 1)
    b = ceg(x, q, reduction="none", label_smoothing=0.1)
    np.testing.assert_array_equal(a.loss, b.loss)
    np.testing.assert_array_equal(a.grad, b.grad)


def test_nested_lists(rng):
    """Targets without a dtype are converted first: float values are probabilities."""
    x = logits(rng, (3, 4), np.float64)
    q = probs(rng, (3, 4), np.float64)
    assert ce(x, q.tolist()) == ce(x, q)
    assert ce(x, [1, 0, 3]) == ce(x, np.array([1, 0, 3]))
