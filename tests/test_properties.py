"""Hypothesis property tests: fastloss against the float64 reference over random
shapes, dtypes, options and extreme values.

Tolerances are derived from the precision model of the contract rather than tuned
per case: accumulation in float32 (float64 for float64 input) gives an absolute
error in ``z - lse`` of a few ulps of the largest transformed logit, which turns into
a relative error of the same size in every probability; the gradient is then
rounded once to the input dtype.
"""

import math
import os

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastloss
from reference import ce_reference, lse_reference, mse_reference, to_float64, transform

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), BF16]
# unit roundoff of one rounding into the dtype
ROUND = {np.dtype(np.float64): 2.0**-53, np.dtype(np.float32): 2.0**-24,
         np.dtype(np.float16): 2.0**-11, BF16: 2.0**-8}
# absolute error of rounding into the dtype's subnormal range
TINY = {np.dtype(np.float64): 0.0, np.dtype(np.float32): 1e-45,
        np.dtype(np.float16): 2.0**-25, BF16: 1e-40}
MAXVAL = {np.dtype(np.float64): 1e300, np.dtype(np.float32): 3e38,
          np.dtype(np.float16): 65504.0, BF16: 3e38}

# FASTLOSS_HYPOTHESIS_EXAMPLES=5000 for a thorough local run
SETTINGS = settings(max_examples=int(os.environ.get("FASTLOSS_HYPOTHESIS_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def acc_eps(dtype):
    return 2.0**-52 if dtype == np.float64 else 2.0**-23


@st.composite
def ce_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(0, 20))
    v = draw(st.integers(1, 300))
    lead = draw(st.sampled_from(["flat", "nd"]))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 3.0, 30.0, 1e3, 1e4]))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, v)) * scale
    if draw(st.booleans()):  # a few exact extremes
        x[rng.random((n, v)) < 0.05] = MAXVAL[dtype] * 0.99 if dtype == np.float16 else scale * 10
    x = np.clip(x, -MAXVAL[dtype], MAXVAL[dtype])

    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    ignore_index = draw(st.sampled_from([-100, 0, v - 1, 7, -1, 1000]))
    targets = rng.integers(0, v, size=n)
    frac_ignored = draw(st.sampled_from([0.0, 0.3, 1.0]))
    targets[rng.random(n) < frac_ignored] = ignore_index
    kw = dict(reduction=reduction, ignore_index=ignore_index)
    if draw(st.booleans()):
        kw["weight"] = rng.uniform(0.5, 2.0, size=v)
    kw["label_smoothing"] = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5]))
    kw["z_loss"] = draw(st.sampled_from([0.0, 0.0, 1e-4, 1e-2]))
    kw["softcap"] = draw(st.sampled_from([None, None, 1.0, 15.0, 50.0]))
    kw["logit_scale"] = draw(st.sampled_from([1.0, 1.0, 0.25, 2.0]))
    if reduction == "mean" and draw(st.booleans()):
        kw["normalizer"] = draw(st.sampled_from([1.0, 7.5, 300.0]))

    # -inf entries (never at a counted target; not with label smoothing, whose
    # sum over all classes is then infinite in torch and the reference alike)
    if kw["label_smoothing"] == 0.0 and draw(st.booleans()):
        mask = rng.random((n, v)) < draw(st.sampled_from([0.2, 0.9]))
        counted = targets != ignore_index
        mask[np.flatnonzero(counted), targets[counted]] = False
        x[mask] = -np.inf
    logits = x.astype(dtype)
    if lead == "nd" and n % 2 == 0:
        logits = logits.reshape(2, n // 2, v)
        targets = targets.reshape(2, n // 2)
    if draw(st.booleans()):  # non-contiguous view of the same values
        big = np.empty(logits.shape[:-1] + (2 * v,), dtype)
        big[..., ::2] = logits
        big[..., 1::2] = np.nan
        logits = big[..., ::2]
    go = None
    if draw(st.booleans()):
        go = rng.standard_normal(targets.shape) if reduction == "none" else float(rng.standard_normal())
    return dtype, logits, targets, kw, go


def _loss_error_bound(dtype, logits, targets, kw):
    """Absolute error budget for the loss from float32/float64 accumulation."""
    z = transform(logits, kw.get("softcap"), kw.get("logit_scale", 1.0))
    finite = z[np.isfinite(z)]
    zmax = float(np.abs(finite).max()) if finite.size else 0.0
    v = logits.shape[-1]
    m = zmax + math.log(v) + 1.0  # size of lse and z_t
    per_token = m * (1.0 + 2.0 * kw.get("z_loss", 0.0) * m)
    if kw.get("weight") is not None:
        per_token *= 4.0  # weights in [0.5, 2] (max/min)
    counted = int((np.asarray(targets) != kw["ignore_index"]).sum())
    if kw["reduction"] == "sum":
        per_token *= max(counted, 1)
    elif kw["reduction"] == "mean" and kw.get("normalizer") is not None:
        per_token *= max(counted, 1) / kw["normalizer"]
    return 16 * acc_eps(dtype) * per_token, zmax


def _coefficient_scale(logits, targets, kw, go):
    """max_i |d(grad_output * loss)/d(ce_i)| * max class weight."""
    v = logits.shape[-1]
    w = np.ones(v) if kw.get("weight") is None else np.asarray(kw["weight"], dtype=np.float64)
    t = np.asarray(targets).reshape(-1)
    counted = t != kw["ignore_index"]
    if not counted.any():
        return 0.0
    if kw["reduction"] == "none":
        g = 1.0 if go is None else float(np.abs(np.asarray(go)).reshape(-1)[counted].max())
        return g * float(w.max())
    g = 1.0 if go is None else abs(float(go))
    if kw["reduction"] == "sum":
        return g * float(w.max())
    if kw.get("normalizer") is not None:
        den = kw["normalizer"]
    else:
        den = float(w[t[counted]].sum()) if kw.get("weight") is not None else float(counted.sum())
    return g * float(w.max()) / den if den else 0.0


@SETTINGS
@given(ce_cases())
def test_cross_entropy_matches_reference(case):
    dtype, logits, targets, kw, go = case
    ref_loss, ref_grad = ce_reference(logits, targets, grad_output=go, **kw)
    assume(np.all(np.isfinite(ref_loss)))
    before = logits.copy()
    loss, grad = fastloss.cross_entropy_with_grad(logits, targets, grad_output=go, **kw)
    loss_only = fastloss.cross_entropy(logits, targets, **kw)
    assert np.array_equal(to_float64(logits), to_float64(before), equal_nan=True)

    atol, zmax = _loss_error_bound(dtype, logits, targets, kw)
    rtol = 8 * acc_eps(dtype)
    if kw["reduction"] == "none":
        assert loss.dtype == (np.float64 if dtype == np.float64 else np.float32)
        assert loss.shape == targets.shape
        assert not loss[targets == kw["ignore_index"]].any()
    else:
        assert type(loss) is float and type(loss_only) is float
    np.testing.assert_allclose(to_float64(loss), ref_loss, rtol=rtol, atol=atol)
    np.testing.assert_allclose(to_float64(loss_only), ref_loss, rtol=rtol, atol=atol)

    assert grad.dtype == dtype and grad.shape == logits.shape
    g = to_float64(grad)
    assert np.all(np.isfinite(g))
    assert not g[targets == kw["ignore_index"]].any()
    gscale = float(np.abs(ref_grad).max()) if ref_grad.size else 0.0
    # probabilities carry a relative error ~ acc_eps * |z|; the result is rounded once
    g_atol = 16 * acc_eps(dtype) * (zmax + math.log(logits.shape[-1]) + 1) * gscale
    g_atol *= 1.0 + 2.0 * kw.get("z_loss", 0.0) * (zmax + math.log(logits.shape[-1]) + 1)
    # p_t - 1 (and W*p_k - w_k) cancel when p_t ~ 1: an absolute error of a few ulps
    # of the per-token coefficient d(loss)/d(ce_i), whatever the size of the gradient
    g_atol += 16 * acc_eps(dtype) * _coefficient_scale(logits, targets, kw, go) * kw.get("logit_scale", 1.0)
    if kw.get("softcap") is not None:
        # d softcap*tanh(s*x/softcap)/dx = s*(1 - tanh**2): the usual formula loses all
        # relative accuracy when tanh saturates, leaving an absolute error of a few ulps
        # of s in the chain-rule factor; bound it with the gradient w.r.t. z
        z = transform(logits, kw["softcap"], kw.get("logit_scale", 1.0))
        zkw = {k: v for k, v in kw.items() if k not in ("softcap", "logit_scale")}
        _, grad_z = ce_reference(z, targets, grad_output=go, **zkw)
        g_atol += 8 * acc_eps(dtype) * kw.get("logit_scale", 1.0) * float(np.abs(grad_z).max(initial=0))
    np.testing.assert_allclose(g, ref_grad, rtol=2 * ROUND[dtype] + 8 * acc_eps(dtype),
                               atol=g_atol + TINY[dtype])


@SETTINGS
@given(ce_cases())
def test_cross_entropy_matches_torch(case):
    """Only the options torch has; both sides in float64 on the same values."""
    dtype, logits, targets, kw, go = case
    for k in ("z_loss", "softcap", "normalizer"):
        kw.pop(k, None)
    kw["logit_scale"] = 1.0
    counted = targets != kw["ignore_index"]
    assume(counted.any() or kw["reduction"] != "mean")
    x = torch.tensor(to_float64(logits), requires_grad=True)
    t = torch.tensor(np.where(counted, targets, kw["ignore_index"]).astype(np.int64))
    w = None if kw.get("weight") is None else torch.tensor(kw["weight"])
    tl = F.cross_entropy(x.reshape(-1, x.shape[-1]), t.reshape(-1), weight=w,
                         ignore_index=kw["ignore_index"], reduction=kw["reduction"],
                         label_smoothing=kw["label_smoothing"])
    assume(bool(torch.isfinite(tl).all()))
    if kw["reduction"] == "none":
        tl = tl.reshape(t.shape)
    loss = fastloss.cross_entropy(logits, targets, **{k: v for k, v in kw.items() if k != "logit_scale"})
    atol, _ = _loss_error_bound(dtype, logits, targets, kw)
    np.testing.assert_allclose(to_float64(loss), tl.detach().numpy(), rtol=8 * acc_eps(dtype), atol=atol)


@SETTINGS
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=2).map(tuple),
    v=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-2, 1.0, 30.0, 1e4]),
    softcap=st.sampled_from([None, 2.0, 30.0]),
    logit_scale=st.sampled_from([1.0, 0.5, 3.0]),
    neg_inf=st.booleans(),
)
def test_logsumexp_matches_reference(dtype, shape, v, seed, scale, softcap, logit_scale, neg_inf):
    rng = np.random.default_rng(seed)
    x = np.clip(rng.standard_normal(shape + (v,)) * scale, -MAXVAL[dtype], MAXVAL[dtype])
    if neg_inf:
        x[rng.random(x.shape) < 0.5] = -np.inf
    logits = x.astype(dtype)
    lse = np.asarray(fastloss.logsumexp(logits, softcap=softcap, logit_scale=logit_scale))
    ref = lse_reference(logits, softcap=softcap, logit_scale=logit_scale)
    assert lse.shape == ref.shape
    z = transform(logits, softcap, logit_scale)
    finite = z[np.isfinite(z)]
    zmax = float(np.abs(finite).max()) if finite.size else 0.0
    np.testing.assert_allclose(to_float64(lse), ref, rtol=8 * acc_eps(dtype),
                               atol=8 * acc_eps(dtype) * (zmax + math.log(v) + 1))


@SETTINGS
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 12), min_size=0, max_size=3).map(tuple),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 100.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    weighted=st.sampled_from([None, "full", "last-axis", "scalar"]),
    with_go=st.booleans(),
)
def test_mse_matches_reference(dtype, shape, seed, scale, reduction, weighted, with_go):
    rng = np.random.default_rng(seed)
    pred = (rng.standard_normal(shape) * scale).astype(dtype)
    target = (rng.standard_normal(shape) * scale).astype(dtype)
    kw = dict(reduction=reduction)
    if weighted == "full":
        kw["weight"] = rng.uniform(0.5, 2.0, size=shape)
    elif weighted == "last-axis" and len(shape):
        kw["weight"] = rng.uniform(0.5, 2.0, size=shape[-1:])
    elif weighted == "scalar":
        kw["weight"] = np.float64(1.5)
    go = None
    if with_go:
        go = rng.standard_normal(shape) if reduction == "none" else float(rng.standard_normal())
    ref_loss, ref_grad = mse_reference(pred, target, grad_output=go, **kw)
    p0, t0 = pred.copy(), target.copy()
    loss, grad = fastloss.mse_with_grad(pred, target, grad_output=go, **kw)
    loss_only = fastloss.mse(pred, target, **kw)
    assert np.array_equal(to_float64(pred), to_float64(p0))
    assert np.array_equal(to_float64(target), to_float64(t0))
    eps = acc_eps(dtype)
    d2max = float((to_float64(pred) - to_float64(target)).__pow__(2).max()) if pred.size else 0.0
    if reduction == "none":
        assert loss.shape == shape
        # per element, the result is computed in float32/64 then stored (float32 or
        # float64, or maybe the input dtype): allow one rounding into the input dtype
        np.testing.assert_allclose(to_float64(loss), ref_loss,
                                   rtol=2 * ROUND[dtype] + 8 * eps, atol=8 * eps * d2max + TINY[dtype])
    else:
        assert type(loss) is float and type(loss_only) is float
        n = max(pred.size, 1)
        atol = 8 * eps * d2max * 2.0 * (n if reduction == "sum" else 1) * (4 if weighted else 1)
        np.testing.assert_allclose(loss, ref_loss, rtol=math.sqrt(n) * 8 * eps, atol=atol)
        np.testing.assert_allclose(loss_only, ref_loss, rtol=math.sqrt(n) * 8 * eps, atol=atol)
    assert grad.dtype == dtype and grad.shape == shape
    gscale = float(np.abs(ref_grad).max()) if ref_grad.size else 0.0
    np.testing.assert_allclose(to_float64(grad), ref_grad, rtol=2 * ROUND[dtype] + 8 * eps,
                               atol=8 * eps * gscale + TINY[dtype])
