"""Arrays past 2^31 elements: every offset is 64-bit (slow: ~4.3 GB of bfloat16)."""

import ml_dtypes
import numpy as np
import pytest

import fastloss
from reference import ce_reference, to_float64

pytestmark = pytest.mark.slow

V = 131072
N = (1 << 31) // V + 3  # 2^31 + 3 * V elements


@pytest.fixture(scope="module")
def big_logits():
    rng = np.random.default_rng(7)
    block = (rng.standard_normal((8, V)) * 3).astype(ml_dtypes.bfloat16)
    x = np.empty((N, V), ml_dtypes.bfloat16)
    for i in range(0, N, 8):  # a cheap fill: rows repeat with period 8, then the tail rows differ
        x[i:i + 8] = block[: min(8, N - i)]
    x[-1] = (rng.standard_normal(V) * 5).astype(ml_dtypes.bfloat16)
    return x


def test_loss_and_grad_past_int32_offsets(big_logits):
    x = big_logits
    assert x.size > 2**31
    rng = np.random.default_rng(8)
    t = rng.integers(0, V, N)
    t[N // 2] = -100
    tail = to_float64(x[-2:])
    per_token = fastloss.cross_entropy(x, t, reduction="none")
    ref_tail, _ = ce_reference(tail, t[-2:], reduction="none")
    np.testing.assert_allclose(per_token[-2:], ref_tail, rtol=1e-5)
    head, _ = ce_reference(to_float64(x[:2]), t[:2], reduction="none")
    np.testing.assert_allclose(per_token[:2], head, rtol=1e-5)
    assert per_token[N // 2] == 0

    loss, grad = fastloss.cross_entropy_with_grad(x, t, reduction="sum", inplace=True)
    assert grad is x
    np.testing.assert_allclose(loss, per_token.sum(dtype=np.float64), rtol=1e-6)
    _, ref_grad = ce_reference(tail, t[-2:], reduction="sum")
    # The last row lies entirely past element 2^31.
    np.testing.assert_allclose(to_float64(grad[-2:]), ref_grad, rtol=1e-2, atol=1e-7)
    assert not np.any(to_float64(grad[N // 2]))
