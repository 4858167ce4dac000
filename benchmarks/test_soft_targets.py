"""Cross-entropy with probability ("soft") targets: fastloss against torch
eager and against fastloss's own class-index cross-entropy.

Cases: (4096, 32000) float32 and bfloat16 (``--bench-quick``: (256, 4096)),
forward and fwd+bwd. Providers:

* ``fastloss-soft``: ``cross_entropy(x, q)``; fwd+bwd ``cross_entropy_with_grad(x, q, out=buf)``
  into a reused buffer (no page faults).
* ``fastloss-index``: the same calls with class-index targets (what the soft
  pass is measured against per element: it reads two rows instead of one).
* ``torch-soft``: ``F.cross_entropy(x, q)``; fwd+bwd with ``loss.backward()``.

Targets have the logits' dtype. The same threads as the rest of the suite
(``conftest.py``). pytest-benchmark groups by case; compare medians within a
group (one run, one machine)::

    python -m pytest benchmarks/test_soft_targets.py --benchmark-only
"""

import numpy as np
import pytest

import fastloss

SHAPE = (4096, 32000)
QUICK_SHAPE = (256, 4096)
DTYPES = ("float32", "bfloat16")
PASSES = ("fwd", "fwd+bwd")
PROVIDERS = ("fastloss-soft", "fastloss-index", "torch-soft")


def _np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


_HELD = {}


def _inputs(shape, dtype):
    """(logits, probability targets, class indices) of one case, the latest set kept."""
    key = (shape, dtype)
    if key not in _HELD:
        _HELD.clear()
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape, dtype=np.float32) * 2
        q = rng.random(shape, dtype=np.float32) ** 4
        q /= q.sum(axis=1, keepdims=True)
        t = rng.integers(0, shape[1], shape[0])
        dt = _np_dtype(dtype)
        _HELD[key] = (x.astype(dt), q.astype(dt), t)
    return _HELD[key]


def _torch_tensor(a):
    import torch
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _callable(provider, kind, x, q, t):
    """The timed function and its per-round setup (None)."""
    if provider == "torch-soft":
        torch = pytest.importorskip("torch")
        xt, qt = _torch_tensor(x), _torch_tensor(q)
        if kind == "fwd":
            def fn():
                with torch.no_grad():
                    return torch.nn.functional.cross_entropy(xt, qt).item()
            return fn
        xg = xt.clone().requires_grad_(True)

        def fn():
            xg.grad = None
            loss = torch.nn.functional.cross_entropy(xg, qt)
            loss.backward()
            return loss.item()
        return fn
    targets = q if provider == "fastloss-soft" else t
    if kind == "fwd":
        return lambda: fastloss.cross_entropy(x, targets)
    buf = np.empty_like(x)
    buf.fill(0)  # touched once: the rounds write into resident memory
    return lambda: fastloss.cross_entropy_with_grad(x, targets, out=buf)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kind", PASSES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_targets(benchmark, request, dtype, kind, provider):
    shape = QUICK_SHAPE if request.config.getoption("--bench-quick") else SHAPE
    x, q, t = _inputs(shape, dtype)
    fn = _callable(provider, kind, x, q, t)
    fn()  # compile / warm
    benchmark.group = f"soft-ce {kind} {shape[0]}x{shape[1]} {dtype}"
    benchmark.extra_info.update(provider=provider, shape=list(shape), dtype=dtype, kind=kind,
                                elements=int(shape[0] * shape[1]))
    rounds = request.config.getoption("--bench-rounds")
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
