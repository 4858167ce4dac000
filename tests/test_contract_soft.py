"""The probability-target contract of cross-entropy, once per backend (cpu,
cuda-sim, gpu), as ``test_contract.py`` does for class-index targets.

Small, odd shapes against the float64 reference ``soft_ce_reference``; the
exhaustive CPU checks are in ``test_soft_targets.py``.
"""

import numpy as np
import pytest
from cases import BF16, DTYPES, assert_grad, make_logits, resolve
from cases import make_probs as probs
from reference import soft_ce_reference, to_float64

import fastloss

CASES = [
    pytest.param((3, 12), {}, id="plain-mean"),
    pytest.param((4, 13), dict(weight="w", label_smoothing=0.2, ignore_index=3), id="weight-smooth"),
    pytest.param((3, 2), dict(reduction="sum", z_loss=0.01, softcap=2.5, logit_scale=0.7),
                 id="sum-zloss-softcap-scale"),
    pytest.param((2, 2, 7), dict(reduction="none", weight="w", label_smoothing=0.1, z_loss=1e-3,
                                  grad_output="rows"), id="none-3d-rows"),
    pytest.param((4, 9), dict(normalizer=11.0, logit_scale=1.3, grad_output=0.5, z_loss=0.02),
                 id="normalizer-scale-go"),
    pytest.param((1, 1), dict(reduction="none", softcap=5.0, grad_output=2.0), id="1x1-none"),
]


def loss_value(backend, loss, reduction):
    if reduction == "none":
        return to_float64(backend.get(loss))
    return backend.scalar(loss)


@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
@pytest.mark.parametrize("shape, kwargs", CASES)
def test_soft_targets_match_reference(backend, rng, dtype, rtol, gtol, shape, kwargs):
    kw = resolve(rng, shape, kwargs)
    x = make_logits(rng, shape, dtype)
    q = probs(rng, shape)
    ref_loss, ref_grad = soft_ce_reference(x, q, **{k: v for k, v in kw.items() if k != "ignore_index"})
    red = kw.get("reduction", "mean")
    call = {k: (backend.put(v) if k == "grad_output" and np.ndim(v) else v) for k, v in kw.items()}
    loss, grad = fastloss.cross_entropy_with_grad(backend.put(x), backend.put(q), **call)
    np.testing.assert_allclose(loss_value(backend, loss, red), ref_loss, rtol=rtol, atol=1e-6)
    assert grad.shape == x.shape and backend.get(grad).dtype == x.dtype
    assert_grad(backend.get(grad), ref_grad, gtol)
    kw.pop("grad_output", None)
    kw.pop("ignore_index", None)
    fwd = fastloss.cross_entropy(backend.put(x), backend.put(q), **kw)
    np.testing.assert_allclose(loss_value(backend, fwd, red), soft_ce_reference(x, q, **kw)[0],
                               rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("qdtype", [np.dtype(np.float16), BF16, np.dtype(np.float64)])
def test_target_dtype_unlike_logits(backend, rng, qdtype):
    x = make_logits(rng, (4, 13), np.float32)
    q = probs(rng, (4, 13), qdtype)
    ref_loss, ref_grad = soft_ce_reference(x, q, reduction="sum")
    loss, grad = fastloss.cross_entropy_with_grad(backend.put(x), backend.put(q), reduction="sum")
    np.testing.assert_allclose(backend.scalar(loss), ref_loss, rtol=2e-5)
    assert_grad(backend.get(grad), ref_grad, 2e-6)


def test_masking_and_nan_rows(backend, rng):
    """0 * (-inf) = 0 for a masked class with q = 0; a NaN stays in its row."""
    x = make_logits(rng, (4, 17), np.float32)
    q = probs(rng, (4, 17))
    x[0, 3] = -np.inf
    q[0, 3] = 0.0
    q[0] /= q[0].sum()
    x[2, 9] = np.nan
    loss, grad = fastloss.cross_entropy_with_grad(backend.put(x), backend.put(q), reduction="none")
    loss, grad = backend.get(loss), backend.get(grad)
    assert np.isnan(loss[2]) and np.all(np.isnan(grad[2]))
    keep = [0, 1, 3]
    ref_loss, ref_grad = soft_ce_reference(x[keep], q[keep], reduction="none")
    np.testing.assert_allclose(loss[keep], ref_loss, rtol=2e-5)
    assert_grad(grad[keep], ref_grad, 2e-6)
    assert grad[0, 3] == 0


def test_out_and_inplace(backend, rng):
    x = make_logits(rng, (3, 21), np.float32)
    q = probs(rng, (3, 21))
    ref_loss, ref_grad = soft_ce_reference(x, q, label_smoothing=0.1)
    out = backend.put(np.full(x.shape, np.nan, np.float32))
    loss, grad = fastloss.cross_entropy_with_grad(backend.put(x), backend.put(q), out=out,
                                                  label_smoothing=0.1)
    assert grad is out
    assert_grad(backend.get(out), ref_grad, 2e-6)
    xd = backend.put(x)
    loss, grad = fastloss.cross_entropy_with_grad(xd, backend.put(q), inplace=True, label_smoothing=0.1)
    assert grad is xd
    assert_grad(backend.get(xd), ref_grad, 2e-6)
    np.testing.assert_allclose(backend.scalar(loss), ref_loss, rtol=2e-5)


def test_errors(backend, rng):
    x = backend.put(np.zeros((3, 4), np.float32))
    q = np.full((3, 4), 0.25, np.float32)
    q[1, 2] = -0.25
    with pytest.raises(ValueError, match=r"targets: 1 row\(s\) of probability targets are not distributions "
                                         r"\(entries finite and >= 0, summing to 1 within 0\.01\); first at "
                                         r"row \(1,\): entry 2 is -0\.25$"):
        fastloss.cross_entropy(x, backend.put(q))
        _settle(backend)
    q[1, 2] = 0.3
    with pytest.raises(ValueError, match=r"first at row \(1,\): it sums to 1\.0500000\d*$"):
        fastloss.cross_entropy_with_grad(x, backend.put(q))
        _settle(backend)
    with pytest.raises(ValueError, match=r"targets: float \(probability\) targets must have the logits' "
                                         r"shape \(3, 4\), found \(3,\)"):
        fastloss.cross_entropy(x, backend.put(np.zeros(3, np.float32)))


def _settle(backend):
    """On a GPU the checks land asynchronously: wait for them."""
    if backend.device:
        import fastloss.cuda
        fastloss.cuda.synchronize()
