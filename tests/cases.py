"""Inputs, option tables and comparisons shared by the backend tests
(``test_contract.py``, ``test_cuda_sim.py``).

Tolerances, per dtype (the loss relative; the gradient absolute, relative to
the largest |gradient|): float32 2e-5 / 2e-6, float64 1e-10 / 1e-12, float16
2e-5 / 1e-3, bfloat16 2e-5 / 8e-3 (the loss accumulates in float32 from the
stored half-precision values; the gradient is rounded once to the
half-precision dtype).
"""

import ml_dtypes
import numpy as np
import pytest
from reference import to_float64

BF16 = np.dtype(ml_dtypes.bfloat16)

# (dtype, loss rtol, gradient tolerance relative to the largest |grad|)
DTYPES = [
    pytest.param(np.dtype(np.float32), 2e-5, 2e-6, id="float32"),
    pytest.param(np.dtype(np.float64), 1e-10, 1e-12, id="float64"),
    pytest.param(np.dtype(np.float16), 2e-5, 1e-3, id="float16"),
    pytest.param(BF16, 2e-5, 8e-3, id="bfloat16"),
]

# Cross-entropy option sets: (shape, kwargs); "w" and "rows" are resolved per
# test (class weights, per-row grad_output, see resolve). Small shapes, none a
# multiple of 8; a class count that is a multiple of 4 (36, 12, 20) takes the
# GPU's wide-access path (uint64 words: 4 half-precision or 2 float32 values),
# an odd one the element-wise path.
CE_CASES = [
    pytest.param((5, 36), {}, id="plain-mean"),
    pytest.param((7, 29), dict(weight="w", label_smoothing=0.2, ignore_index=3), id="weight-smooth-ignore"),
    pytest.param((3, 2), dict(reduction="sum", z_loss=0.01, softcap=2.5, logit_scale=0.7),
                 id="sum-zloss-softcap-scale"),
    pytest.param((2, 3, 12), dict(reduction="none", weight="w", label_smoothing=0.1, z_loss=1e-3,
                                  grad_output="rows"), id="none-3d-rows"),
    pytest.param((6, 20), dict(normalizer=11.0, logit_scale=1.3, grad_output=0.5, z_loss=0.02),
                 id="normalizer-scale-go"),
    pytest.param((1, 1), dict(reduction="none", softcap=5.0, grad_output=2.0), id="1x1-none"),
    pytest.param((7, 130), dict(weight="w", reduction="sum", label_smoothing=0.1, softcap=4.0,
                                ignore_index=5), id="7x130-sum-softcap"),
]


def make_logits(rng, shape, dtype, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def make_probs(rng, shape, dtype=np.float32, sharp=3.0):
    """Random rows of probabilities (never uniform, never all zero), rounded to ``dtype``."""
    q = rng.random(shape) ** sharp + 1e-3
    q /= q.sum(axis=-1, keepdims=True)
    return q.astype(dtype)


def make_targets(rng, shape, nclass, n_ignored=1, ignore_index=-100):
    """Targets with ``n_ignored`` ignored tokens (never all of them)."""
    t = rng.integers(0, nclass, shape).astype(np.int64)
    flat = t.reshape(-1)
    if n_ignored and flat.size > 1:
        flat[rng.choice(flat.size, min(n_ignored, flat.size - 1), replace=False)] = ignore_index
    return t


def resolve(rng, shape, kwargs):
    """A CE_CASES option set with its class weights and per-row grad_output drawn."""
    kw = dict(kwargs)
    if kw.get("weight") == "w":
        kw["weight"] = rng.uniform(0.2, 2.0, shape[-1])
    if kw.get("grad_output") == "rows":
        kw["grad_output"] = rng.uniform(-1.0, 2.0, shape[:-1])
    return kw


def assert_loss(got, ref, rtol, atol=1e-6):
    got = to_float64(got)
    np.testing.assert_allclose(got.reshape(np.shape(ref)) if np.ndim(ref) else got.reshape(-1)[0],
                               ref, rtol=rtol, atol=atol)


def assert_grad(got, ref, tol):
    got = to_float64(got)
    scale = max(1.0, float(np.nanmax(np.abs(ref)))) if ref.size else 1.0
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol * scale + 1e-30)
