"""Core benchmarks (issue 2): cross-entropy forward and forward+backward, MSE
forward+grad, fastloss against torch eager on the CPU, same threads, one run.

Run: ``python -m pytest benchmarks --benchmark-only --benchmark-columns=median,min,rounds``.
pytest-benchmark prints each group's medians with the ratio to the fastest
provider of the group in parentheses.
"""

import numpy as np
import pytest

import fastloss

torch = pytest.importorskip("torch")
F = torch.nn.functional

CE_SHAPES = [(4096, 32000), (2048, 128256)]
MSE_SIZE = 1 << 26


def _ce_inputs(n, v):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((n, v), dtype=np.float32) * 2).astype(np.float32)
    t = rng.integers(0, v, n)
    return x, t


def _bench(benchmark, fn, rounds=7, setup=None):
    benchmark.pedantic(fn, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("provider", ["fastloss", "torch"])
def test_ce_forward(benchmark, shape, provider):
    benchmark.group = f"ce-forward-{shape[0]}x{shape[1]}-float32"
    x, t = _ce_inputs(*shape)
    if provider == "fastloss":
        _bench(benchmark, lambda: fastloss.cross_entropy(x, t))
    else:
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)

        def run():
            with torch.no_grad():
                return F.cross_entropy(xt, tt).item()
        _bench(benchmark, run, rounds=5)


@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("provider", ["fastloss-out", "fastloss-inplace", "fastloss-alloc", "torch"])
def test_ce_forward_backward(benchmark, shape, provider):
    benchmark.group = f"ce-fwd+bwd-{shape[0]}x{shape[1]}-float32"
    x, t = _ce_inputs(*shape)
    if provider == "fastloss-out":
        out = np.empty_like(x)
        _bench(benchmark, lambda: fastloss.cross_entropy_with_grad(x, t, out=out))
    elif provider == "fastloss-inplace":
        buf = np.empty_like(x)
        _bench(benchmark, lambda: fastloss.cross_entropy_with_grad(buf, t, inplace=True),
               setup=lambda: np.copyto(buf, x))
    elif provider == "fastloss-alloc":
        _bench(benchmark, lambda: fastloss.cross_entropy_with_grad(x, t))
    else:
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)

        def run():
            a = xt.detach().requires_grad_()
            F.cross_entropy(a, tt).backward()
            return a.grad
        _bench(benchmark, run, rounds=5)


@pytest.mark.parametrize("provider", ["fastloss-out", "fastloss", "torch"])
def test_mse_forward_grad(benchmark, provider):
    benchmark.group = "mse-fwd+grad-2^26-float32"
    rng = np.random.default_rng(1)
    p = rng.standard_normal(MSE_SIZE, dtype=np.float32)
    y = rng.standard_normal(MSE_SIZE, dtype=np.float32)
    if provider == "fastloss-out":
        out = np.empty_like(p)
        _bench(benchmark, lambda: fastloss.mse_with_grad(p, y, out=out))
    elif provider == "fastloss":
        _bench(benchmark, lambda: fastloss.mse_with_grad(p, y))
    else:
        pt, yt = torch.from_numpy(p), torch.from_numpy(y)

        def run():
            a = pt.detach().requires_grad_()
            F.mse_loss(a, yt).backward()
            return a.grad
        _bench(benchmark, run)


@pytest.mark.parametrize("provider", ["fastloss", "torch"])
def test_mse_forward(benchmark, provider):
    benchmark.group = "mse-forward-2^26-float32"
    rng = np.random.default_rng(1)
    p = rng.standard_normal(MSE_SIZE, dtype=np.float32)
    y = rng.standard_normal(MSE_SIZE, dtype=np.float32)
    if provider == "fastloss":
        _bench(benchmark, lambda: fastloss.mse(p, y))
    else:
        pt, yt = torch.from_numpy(p), torch.from_numpy(y)

        def run():
            with torch.no_grad():
                return F.mse_loss(pt, yt).item()
        _bench(benchmark, run)
