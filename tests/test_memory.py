"""Peak extra memory of each entry point, measured with tracemalloc (numpy
reports its allocations to it). Forward and the fused pass with ``out=`` or
``inplace=True`` must allocate O(N + threads * V), never O(N * V)."""

import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import fastloss

N, V = 512, 32000


def _peak(fn):
    fn()  # compile / warm up outside the measurement
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_peak_memory_is_small_beyond_inputs(rng, dtype):
    x = (rng.standard_normal((N, V)) * 2).astype(dtype)
    t = rng.integers(0, V, N)
    logits_bytes = x.nbytes
    small = 0.05 * logits_bytes
    out = np.empty_like(x)
    buf = x.copy()
    assert _peak(lambda: fastloss.cross_entropy(x, t)) < small
    assert _peak(lambda: fastloss.cross_entropy(x, t, label_smoothing=0.1, softcap=20.0)) < small
    assert _peak(lambda: fastloss.cross_entropy_with_grad(x, t, out=out)) < small
    assert _peak(lambda: fastloss.cross_entropy_with_grad(buf, t, inplace=True)) < small
    assert _peak(lambda: fastloss.logsumexp(x)) < small
    # Without out/inplace the gradient itself is the only large allocation.
    alloc = _peak(lambda: fastloss.cross_entropy_with_grad(x, t))
    assert logits_bytes <= alloc < logits_bytes + small


def test_mse_peak_memory(rng):
    p = rng.standard_normal(1 << 22).astype(np.float32)
    y = rng.standard_normal(1 << 22).astype(np.float32)
    w = rng.uniform(0.5, 2.0, 1 << 11).astype(np.float32)
    out = np.empty_like(p)
    small = 0.05 * p.nbytes
    assert _peak(lambda: fastloss.mse(p, y)) < small
    assert _peak(lambda: fastloss.mse_with_grad(p, y, out=out)) < small
    p2, y2 = p.reshape(-1, 1 << 11), y.reshape(-1, 1 << 11)
    out2 = out.reshape(p2.shape)
    assert _peak(lambda: fastloss.mse_with_grad(p2, y2, weight=w, out=out2)) < small
