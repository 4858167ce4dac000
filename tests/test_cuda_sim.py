"""CUDA backend tests: the kernels under the numba CUDA simulator, plus real-GPU
checks against PyTorch (marked ``gpu``).

How the simulator runs in the ordinary CPU-only suite: ``NUMBA_ENABLE_CUDASIM``
must be set before ``numba.cuda`` is first imported, and the main pytest
process has usually imported it already (doctest collection of
``fastloss.cuda``). So :func:`test_kernels_under_simulator` re-runs this file
in a child pytest process with ``NUMBA_ENABLE_CUDASIM=1``; in that child the
``sim`` cases below run and the wrapper skips. In the parent the ``sim``
cases skip. ``NUMBA_ENABLE_CUDASIM=1 pytest tests/test_cuda_sim.py`` runs
them directly.

Every kernel is compared with the float64 references of ``tests/reference.py``
on small odd shapes, with threads per block shrunk (``CUDA_THREADS_PER_BLOCK``
= 8, also 3 and 1) and the grid capped (``GRID_LIMIT`` = 2), so that rows
span several threads and the grid-stride loops run several rounds.
"""

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from reference import ce_reference, lse_reference, mse_reference, to_float64

import fastloss
import fastloss.config
import fastloss.cuda
from fastloss.cuda import cuda_available, is_device_array, simulator_enabled

_CHILD_FLAG = "FASTLOSS_CUDASIM_CHILD"
IN_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and simulator_enabled()

sim = pytest.mark.skipif(not IN_SIM, reason="runs in the CUDA simulator child process")

BF16 = np.dtype(ml_dtypes.bfloat16)

# (dtype, loss rtol, gradient tolerance relative to the largest |grad|)
DTYPES = [
    pytest.param(np.dtype(np.float32), 2e-5, 2e-6, id="float32"),
    pytest.param(np.dtype(np.float64), 1e-10, 1e-12, id="float64"),
    pytest.param(np.dtype(np.float16), 2e-5, 1e-3, id="float16"),
    pytest.param(BF16, 2e-5, 8e-3, id="bfloat16"),
]


# --- the wrapper that runs the simulator cases -------------------------------------

@pytest.mark.skipif(IN_SIM or os.environ.get(_CHILD_FLAG) == "1",
                    reason="already inside the simulator")
def test_kernels_under_simulator():
    """Run this file's simulator cases in a child pytest with NUMBA_ENABLE_CUDASIM=1."""
    pytest.importorskip("numba_cuda")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.update({"NUMBA_ENABLE_CUDASIM": "1", _CHILD_FLAG: "1",
                "PYTHONPATH": root + os.pathsep + env.get("PYTHONPATH", "")})
    cmd = [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
           "-o", "addopts=", "--import-mode=importlib", "-m", "not gpu",
           # numpy scalars warn on inf - inf etc. where the compiled kernels are silent
           "-W", "ignore::RuntimeWarning"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    if proc.returncode != 0:
        pytest.fail(f"simulator cases failed (exit {proc.returncode}):\n{tail}")
    assert " passed" in proc.stdout, tail


def test_no_gpu_raises_runtime_error():
    """GPU arrays on a machine that cannot run the kernels: one clear RuntimeError."""
    if cuda_available():
        pytest.skip("a GPU (or the simulator) is available here")
    from fastloss.cuda import api

    class FakeGpuArray:
        __cuda_array_interface__ = {"shape": (2, 3), "typestr": "<f4", "data": (0, False),
                                    "version": 3}

    x = FakeGpuArray()
    assert is_device_array(x)
    for call in (lambda: api.cross_entropy(x, np.zeros(2, np.int64)),
                 lambda: api.cross_entropy_with_grad(x, np.zeros(2, np.int64)),
                 lambda: api.logsumexp(x),
                 lambda: api.mse(x, x),
                 lambda: api.mse_with_grad(x, x)):
        with pytest.raises(RuntimeError, match="GPU arrays were passed, but the CUDA backend cannot run"):
            call()


def test_is_device_array_on_host_objects():
    assert not is_device_array(np.zeros(3))
    assert not is_device_array([1.0, 2.0])
    assert not is_device_array(3.0)


# --- helpers for the simulator cases -----------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _fast_thread_switching():
    """The simulator runs each CUDA thread as a Python thread and polls them at
    every barrier; a short GIL switch interval makes it about 5x faster."""
    old = sys.getswitchinterval()
    if IN_SIM:
        sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(old)


@pytest.fixture
def small_blocks(monkeypatch):
    """8 threads per block and at most 2 blocks: rows span several threads and the
    grid-stride loops run several rounds."""
    from fastloss.cuda import api
    monkeypatch.setattr(fastloss.config, "CUDA_THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(api, "GRID_LIMIT", 2)
    return api


def dev(a):
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(a))


def host(d):
    return d.copy_to_host()


def make_logits(rng, shape, dtype, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def make_targets(rng, shape, nclass, n_ignored=1, ignore_index=-100):
    t = rng.integers(0, nclass, shape).astype(np.int64)
    flat = t.reshape(-1)
    if n_ignored and flat.size > 1:
        flat[rng.choice(flat.size, min(n_ignored, flat.size - 1), replace=False)] = ignore_index
    return t


def assert_loss(got, ref, rtol, atol=1e-6):
    got = to_float64(got)
    np.testing.assert_allclose(got.reshape(np.shape(ref)) if np.ndim(ref) else got.reshape(-1)[0],
                               ref, rtol=rtol, atol=atol)


def assert_grad(got, ref, tol):
    got = to_float64(got)
    scale = max(1.0, float(np.nanmax(np.abs(ref)))) if ref.size else 1.0
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol * scale + 1e-30)


# Option sets: (shape, kwargs). Small shapes, none a multiple of 8; a class count
# that is a multiple of 4 (36, 12, 20) takes the wide-access path (uint64 words:
# 4 half-precision or 2 float32 values), an odd one the element-wise path.
CE_CASES = [
    pytest.param((5, 36), {}, id="plain-mean"),
    pytest.param((7, 29), dict(weight="w", label_smoothing=0.2, ignore_index=3), id="weight-smooth-ignore"),
    pytest.param((3, 2), dict(reduction="sum", z_loss=0.01, softcap=2.5, logit_scale=0.7), id="sum-zloss-softcap-scale"),
    pytest.param((2, 3, 12), dict(reduction="none", weight="w", label_smoothing=0.1, z_loss=1e-3,
                                  grad_output="rows"), id="none-3d-rows"),
    pytest.param((6, 20), dict(normalizer=11.0, logit_scale=1.3, grad_output=0.5, z_loss=0.02),
                 id="normalizer-scale-go"),
    pytest.param((1, 1), dict(reduction="none", softcap=5.0, grad_output=2.0), id="1x1-none"),
    pytest.param((7, 130), dict(weight="w", reduction="sum", label_smoothing=0.1, softcap=4.0,
                                ignore_index=5), id="7x130-sum-softcap"),
]


def _resolve(rng, shape, kwargs):
    kw = dict(kwargs)
    nclass = shape[-1]
    if kw.get("weight") == "w":
        kw["weight"] = rng.uniform(0.2, 2.0, nclass)
    if kw.get("grad_output") == "rows":
        kw["grad_output"] = rng.uniform(-1.0, 2.0, shape[:-1])
    return kw


@pytest.fixture
def launches(monkeypatch):
    """Records the dynamic shared memory of every kernel launch (the resident
    fused kernel is the one launched with some)."""
    from fastloss.cuda import api
    seen = []
    orig = api._Gpu.launch

    def spy(self, kernel, grid, *args, tpb=None, smem=0):
        seen.append(smem)
        return orig(self, kernel, grid, *args, tpb=tpb, smem=smem)
    monkeypatch.setattr(api._Gpu, "launch", spy)
    return seen


def use_strategy(monkeypatch, strategy):
    """"partial": the resident kernel with room for 5 words of a row (the rest
    of the row is read again from global memory)."""
    monkeypatch.setattr(fastloss.config, "CUDA_FUSED_STRATEGY",
                        "resident" if strategy == "partial" else strategy)
    if strategy == "partial":
        monkeypatch.setattr(fastloss.config, "CUDA_RESIDENT_MAX_BYTES", 40)


@sim
@pytest.mark.parametrize("strategy", ["resident", "partial", "stream"])
@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
@pytest.mark.parametrize("shape, kwargs", CE_CASES)
def test_ce_with_grad_matches_reference(small_blocks, rng, monkeypatch, launches, strategy, dtype,
                                        rtol, gtol, shape, kwargs):
    """The fused kernels: the row kept in shared memory, partly kept, or read twice."""
    api = small_blocks
    use_strategy(monkeypatch, strategy)
    kw = _resolve(rng, shape, kwargs)
    x = make_logits(rng, shape, dtype)
    t = make_targets(rng, shape[:-1], shape[-1], ignore_index=kw.get("ignore_index", -100))
    ref_loss, ref_grad = ce_reference(x, t, **kw)
    loss, grad = api.cross_entropy_with_grad(dev(x), dev(t), **kw)
    per = 1 if dtype == np.float64 else 2 if dtype == np.float32 else 4
    if x.size < per:
        per = 1
    words = shape[-1] // per  # rows inside one word have no whole word to keep
    assert any(launches) == (strategy != "stream" and words > 0)
    assert is_device_array(loss) and is_device_array(grad)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    acc = np.float64 if dtype == np.float64 else np.float32
    assert loss.dtype == acc
    if kw.get("reduction", "mean") == "none":
        assert loss.shape == t.shape
    else:
        assert loss.shape == (1,)
    assert_loss(host(loss), ref_loss, rtol)
    assert_grad(host(grad), ref_grad, gtol)


@sim
@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
@pytest.mark.parametrize("shape, kwargs", [CE_CASES[1], CE_CASES[2], CE_CASES[3]])
def test_ce_forward_matches_reference(small_blocks, rng, dtype, rtol, gtol, shape, kwargs):
    api = small_blocks
    kw = _resolve(rng, shape, kwargs)
    kw.pop("grad_output", None)
    x = make_logits(rng, shape, dtype)
    t = make_targets(rng, shape[:-1], shape[-1], ignore_index=kw.get("ignore_index", -100))
    loss = api.cross_entropy(dev(x), dev(t), **kw)
    assert_loss(host(loss), ce_reference(x, t, **kw)[0], rtol)


@sim
@pytest.mark.parametrize("tpb", [1, 3, 32, 96])
def test_ce_any_block_size(monkeypatch, rng, tpb):
    """Non-power-of-two and one-thread blocks, more threads than classes; whole
    warps (32, 96) take the shuffle reduction (emulated in the simulator)."""
    from fastloss.cuda import api
    monkeypatch.setattr(fastloss.config, "CUDA_THREADS_PER_BLOCK", tpb)
    monkeypatch.setattr(api, "GRID_LIMIT", 2)
    v = 13 if tpb < 32 else 397  # whole warps: data in every warp of the block
    x = make_logits(rng, (3, v), np.float32)
    x[1, : v // 2] = -np.inf  # a masked half: warps whose states are all -inf
    t = make_targets(rng, (3,), v, n_ignored=0)
    t[1] = v - 1
    kw = dict(z_loss=0.01, reduction="sum")
    ref_loss, ref_grad = ce_reference(x, t, **kw)
    np.testing.assert_allclose(host(api.logsumexp(dev(x))), lse_reference(x), rtol=2e-5)
    assert_loss(host(api.cross_entropy(dev(x), dev(t), **kw)), ref_loss, 2e-5)
    # the resident kernel with the same, then another block size than the streaming one
    for rtpb in (None, 5):
        monkeypatch.setattr(fastloss.config, "CUDA_RESIDENT_THREADS_PER_BLOCK", rtpb)
        loss, grad = api.cross_entropy_with_grad(dev(x), dev(t), **kw)
        assert_loss(host(loss), ref_loss, 2e-5)
        assert_grad(host(grad), ref_grad, 2e-6)


@sim
@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
def test_logsumexp_matches_reference(small_blocks, rng, dtype, rtol, gtol):
    api = small_blocks
    x = make_logits(rng, (4, 21), dtype)
    x[1, :15] = -np.inf  # an all -inf prefix spanning threads
    x[2, :] = -np.inf    # a masked row: -inf, not NaN
    got = host(api.logsumexp(dev(x)))
    np.testing.assert_allclose(got, lse_reference(x), rtol=rtol)
    even = x[:, :20]  # a multiple of 4: the wide-access path
    got = host(api.logsumexp(dev(even)))
    np.testing.assert_allclose(got, lse_reference(even), rtol=rtol)
    got = host(api.logsumexp(dev(x), softcap=4.0, logit_scale=0.5))
    np.testing.assert_allclose(got, lse_reference(x, softcap=4.0, logit_scale=0.5), rtol=rtol)
    assert got[2] == -np.inf


@sim
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_neg_inf_masks(small_blocks, rng, softcap):
    """-inf logits are masked (an all -inf prefix of a row does not give NaN)."""
    api = small_blocks
    x = make_logits(rng, (4, 30), np.float32)
    x[0, :20] = -np.inf
    x[1, ::3] = -np.inf
    t = np.array([25, 1, 7, 29])
    for kw in (dict(reduction="none"), dict(reduction="mean", z_loss=0.01, weight=rng.uniform(0.5, 1, 30)),
               dict(reduction="sum", label_smoothing=0.1)):
        kw["softcap"] = softcap
        loss, grad = api.cross_entropy_with_grad(dev(x), dev(t), **kw)
        ref_loss, ref_grad = ce_reference(x, t, **kw)
        assert np.all(np.isfinite(host(grad)))
        if "label_smoothing" not in kw:  # smoothing sums the -inf logits: an inf loss, as in torch
            assert np.all(np.isfinite(host(loss)))
        assert_loss(host(loss), ref_loss, 2e-5)
        assert_grad(host(grad), ref_grad, 2e-6)


@sim
def test_nan_row_stays_in_its_row(small_blocks, rng):
    api = small_blocks
    x = make_logits(rng, (5, 17), np.float32)
    x[2, 9] = np.nan
    x[4, :] = -np.inf  # all masked: NaN like the reference (lse = -inf), in its row only
    t = np.array([1, 2, 3, 4, 5])
    loss, grad = api.cross_entropy_with_grad(dev(x), dev(t), reduction="none")
    loss, grad = host(loss), host(grad)
    assert np.isnan(loss[2]) and np.all(np.isnan(grad[2]))
    assert np.isnan(loss[4]) and np.all(np.isnan(grad[4]))
    assert np.all(np.isnan(ce_reference(x[4:], t[4:], reduction="none")[0]))
    keep = [0, 1, 3]
    ref_loss, ref_grad = ce_reference(x[keep], t[keep], reduction="none")
    np.testing.assert_allclose(loss[keep], ref_loss, rtol=2e-5)
    assert_grad(grad[keep], ref_grad, 2e-6)
    mean = host(api.cross_entropy(dev(x), dev(t)))
    assert np.isnan(mean[0])


@sim
def test_all_ignored_and_empty(small_blocks, rng):
    api = small_blocks
    x = make_logits(rng, (4, 9), np.float32)
    t = np.full(4, -100)
    for red in ("mean", "sum"):
        loss, grad = api.cross_entropy_with_grad(dev(x), dev(t), reduction=red, z_loss=0.1)
        assert host(loss)[0] == 0.0
        assert np.all(host(grad) == 0)
    loss, grad = api.cross_entropy_with_grad(dev(x), dev(t), reduction="none")
    assert np.all(host(loss) == 0) and np.all(host(grad) == 0)
    assert host(api.cross_entropy(dev(x), dev(t)))[0] == 0.0
    e = dev(np.zeros((0, 5), np.float32))
    loss, grad = api.cross_entropy_with_grad(e, dev(np.zeros(0, np.int64)))
    assert host(loss)[0] == 0.0 and grad.shape == (0, 5)
    assert api.cross_entropy(e, dev(np.zeros(0, np.int64)), reduction="none").shape == (0,)
    assert api.logsumexp(e).shape == (0,)


@sim
@pytest.mark.parametrize("strategy", ["resident", "partial", "stream"])
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float16), BF16])
def test_inplace_and_out(small_blocks, rng, monkeypatch, strategy, dtype):
    """Rows of 23 classes: most rows start and end inside a word shared with
    their neighbours, so in place the edge elements of two rows are written by
    two blocks (element by element) next to each other's words."""
    api = small_blocks
    use_strategy(monkeypatch, strategy)
    x = make_logits(rng, (5, 23), dtype)
    t = make_targets(rng, (5,), 23)
    ref_loss, ref_grad = ce_reference(x, t, label_smoothing=0.1)
    tol = {np.float32: 2e-6, np.float16: 1e-3}.get(dtype.type, 8e-3)
    d = dev(x)
    loss, grad = api.cross_entropy_with_grad(d, dev(t), label_smoothing=0.1, inplace=True)
    assert grad is d
    assert_grad(host(d), ref_grad, tol)
    out = dev(np.full(x.shape, np.nan, dtype))  # poisoned: every element must be written
    d = dev(x)
    loss, grad = api.cross_entropy_with_grad(d, dev(t), label_smoothing=0.1, out=out)
    assert grad is out
    assert_grad(host(out), ref_grad, tol)
    np.testing.assert_array_equal(to_float64(host(d)), to_float64(x))  # input untouched
    assert_loss(host(loss), ref_loss, 2e-5)


@sim
def test_strided_logits_and_other_target_dtypes(small_blocks, rng):
    api = small_blocks
    big = make_logits(rng, (6, 40), np.float32)
    x = dev(big)[:, 3:34]  # a non-contiguous 2-D view
    xs = big[:, 3:34]
    for tdtype in (np.int32, np.uint8, np.int16):
        t = rng.integers(0, 31, 6).astype(tdtype)
        loss, grad = api.cross_entropy_with_grad(x, dev(t), reduction="sum")
        ref_loss, ref_grad = ce_reference(xs, t, reduction="sum")
        assert_loss(host(loss), ref_loss, 2e-5)
        assert_grad(host(grad), ref_grad, 2e-6)
    # out= overlapping the strided logits (not only their staged copy) is refused
    buf = dev(np.zeros(6 * 40 + 8, np.float32))
    xv = buf[:240].reshape(6, 40)[:, 3:34]
    with pytest.raises(ValueError, match="out: overlaps logits"):
        api.cross_entropy_with_grad(xv, dev(np.zeros(6, np.int64)), out=buf[20:206].reshape(6, 31))
    # in place into the strided view: staged in a contiguous buffer and copied back
    whole = dev(big)
    t = rng.integers(0, 31, 6)
    loss, grad = api.cross_entropy_with_grad(whole[:, 3:34], dev(t), inplace=True, z_loss=0.01)
    ref_loss, ref_grad = ce_reference(xs, t, z_loss=0.01)
    after = host(whole)
    assert_grad(after[:, 3:34], ref_grad, 2e-6)
    np.testing.assert_array_equal(after[:, :3], big[:, :3])  # outside the view: untouched
    np.testing.assert_array_equal(after[:, 34:], big[:, 34:])
    assert_loss(host(loss), ref_loss, 2e-5)
    np.testing.assert_allclose(host(api.logsumexp(dev(big)[:, 3:34])), lse_reference(xs), rtol=2e-5)
    # 1-D logits (one row) with a 0-d target; host targets are accepted too
    loss, grad = api.cross_entropy_with_grad(dev(xs[0]), np.array(4), reduction="none")
    ref_loss, ref_grad = ce_reference(xs[0], np.array(4), reduction="none")
    assert loss.shape == () and grad.shape == (31,)
    assert_loss(host(loss), ref_loss, 2e-5)
    assert_grad(host(grad), ref_grad, 2e-6)


@sim
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16])
def test_narrow_access_fallbacks(small_blocks, rng, monkeypatch, dtype):
    """Rows that could be read as uint64 words but are misaligned (or with wide
    access switched off) take the element-wise path and give the same results."""
    api = small_blocks
    flat = dev(make_logits(rng, (5 * 36 + 1,), dtype))
    x = flat[1:].reshape(5, 36)  # 2 or 4 bytes past an 8-byte boundary
    xs = host(flat)[1:].reshape(5, 36)
    t = make_targets(rng, (5,), 36)
    ref_loss, ref_grad = ce_reference(xs, t, reduction="none", z_loss=0.01)
    tol = 2e-6 if dtype == np.float32 else 8e-3
    for wide in (True, False):
        monkeypatch.setattr(api, "WIDE_ACCESS", wide)
        loss, grad = api.cross_entropy_with_grad(x, dev(t), reduction="none", z_loss=0.01)
        assert_loss(host(loss), ref_loss, 2e-5)
        assert_grad(host(grad), ref_grad, tol)
    np.testing.assert_allclose(host(api.logsumexp(x)), lse_reference(xs), rtol=2e-5)


@sim
def test_device_weight_and_device_grad_output(small_blocks, rng):
    api = small_blocks
    x = make_logits(rng, (5, 12), np.float32)
    t = make_targets(rng, (5,), 12)
    w = rng.uniform(0.1, 3.0, 12)
    loss, grad = api.cross_entropy_with_grad(dev(x), dev(t), weight=dev(w.astype(np.float16)),
                                             grad_output=dev(np.array([0.25], np.float32)),
                                             label_smoothing=0.05)
    w16 = w.astype(np.float16)
    ref_loss, ref_grad = ce_reference(x, t, weight=w16, grad_output=0.25, label_smoothing=0.05)
    assert_loss(host(loss), ref_loss, 2e-5)
    assert_grad(host(grad), ref_grad, 2e-6)
    go = rng.uniform(0, 1, 5)
    loss, grad = api.cross_entropy_with_grad(dev(x), dev(t), reduction="none", grad_output=dev(go))
    ref_loss, ref_grad = ce_reference(x, t, reduction="none", grad_output=go)
    assert_grad(host(grad), ref_grad, 2e-6)


@sim
def test_ce_errors(small_blocks, rng, monkeypatch):
    api = small_blocks
    x = dev(make_logits(rng, (4, 37), np.float32))
    with pytest.raises(ValueError, match=r"targets: 2 value\(s\) outside \[0, 37\) that are not "
                                         r"ignore_index=-100; first at position \(1,\): 40"):
        api.cross_entropy(x, dev(np.array([0, 40, -100, -3])))
    with pytest.raises(ValueError, match=r"first at position \(1, 0\): -1"):
        api.cross_entropy_with_grad(dev(make_logits(rng, (2, 2, 5), np.float32)),
                                    dev(np.array([[0, 1], [-1, 2]])))
    xi = make_logits(rng, (4, 37), np.float32)
    d = dev(xi)
    with pytest.raises(ValueError, match=r"targets: 1 value\(s\)"):
        api.cross_entropy_with_grad(d, dev(np.array([0, 37, 1, 2])), inplace=True)
    np.testing.assert_array_equal(host(d), xi)  # the kernels did nothing: logits untouched
    big = np.array([0, 2**64 - 1, 3, 2**63], dtype=np.uint64)  # wrap to negatives in int64
    with pytest.raises(ValueError, match=r"targets: 2 value\(s\) .* first at position \(1,\): 18446744073709551615"):
        api.cross_entropy(x, dev(big))
    loss = api.cross_entropy(x, dev(big[[0, 1, 2, 1]]), ignore_index=2**64 - 1, reduction="none")
    ref = ce_reference(host(x), np.array([0, -1, 3, -1]), ignore_index=-1, reduction="none")[0]
    assert_loss(host(loss), ref, 2e-5)
    with pytest.raises(ValueError, match="out: expected a C-contiguous array, found strides"):
        api.cross_entropy_with_grad(x, dev(np.array([0, 1, 2, 3])),
                                    out=dev(np.zeros((37, 4), np.float32)).T)
    t = dev(np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="weight: expected non-negative"):
        api.cross_entropy_with_grad(d, t, weight=dev(-np.ones(37)), inplace=True)
    np.testing.assert_array_equal(host(d), xi)
    with pytest.raises(ValueError, match="weight: expected finite values, found NaN or inf"):
        api.cross_entropy(x, t, weight=dev(np.r_[np.ones(36), np.nan]))
    with pytest.raises(ValueError, match="weight: expected non-negative values, found minimum -1.0"):
        api.cross_entropy(x, t, weight=dev(np.r_[np.ones(36), -1.0]))
    with pytest.raises(ValueError, match="weight: expected non-negative values"):
        api.cross_entropy(x, t, weight=np.r_[np.ones(36), -1.0])
    with pytest.raises(ValueError, match=r"weight: expected shape \(37,\)"):
        api.cross_entropy(x, t, weight=dev(np.ones(5)))
    with pytest.raises(ValueError, match="reduction: expected one of"):
        api.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing: expected a finite value"):
        api.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="normalizer: only used with reduction='mean'"):
        api.cross_entropy(x, t, normalizer=3.0, reduction="sum")
    with pytest.raises(TypeError, match="targets: expected an integer dtype"):
        api.cross_entropy(x, dev(np.zeros(4, np.float32)))
    with pytest.raises(ValueError, match=r"targets: expected shape \(4,\)"):
        api.cross_entropy(x, dev(np.zeros(3, np.int64)))
    with pytest.raises(TypeError, match="logits: expected dtype"):
        api.cross_entropy(dev(np.zeros((2, 3), np.int32)), dev(np.zeros(2, np.int64)))
    with pytest.raises(ValueError, match="grad_output: expected a scalar for reduction='mean'"):
        api.cross_entropy_with_grad(x, t, grad_output=dev(np.ones(2)))
    with pytest.raises(ValueError, match=r"grad_output: expected a scalar or shape \(4,\)"):
        api.cross_entropy_with_grad(x, t, reduction="none", grad_output=dev(np.ones(3)))
    with pytest.raises(ValueError, match="out: cannot be combined with inplace=True"):
        api.cross_entropy_with_grad(x, t, inplace=True, out=dev(np.zeros((4, 37), np.float32)))
    with pytest.raises(TypeError, match="out: expected dtype float32"):
        api.cross_entropy_with_grad(x, t, out=dev(np.zeros((4, 37), np.float64)))
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 37\)"):
        api.cross_entropy_with_grad(x, t, out=dev(np.zeros((4, 36), np.float32)))
    with pytest.raises(TypeError, match="out: expected a GPU array"):
        api.cross_entropy_with_grad(x, t, out=np.zeros((4, 37), np.float32))
    with pytest.raises(ValueError, match="out: overlaps logits"):
        big = dev(np.zeros((5, 37), np.float32))
        api.cross_entropy_with_grad(big[:4], t, out=big[1:])
    with pytest.raises(TypeError, match="inplace: expected True or False"):
        api.cross_entropy_with_grad(x, t, inplace=1)
    monkeypatch.setattr(fastloss.config, "CUDA_RESIDENT_THREADS_PER_BLOCK", 0)
    with pytest.raises(ValueError, match="CUDA_RESIDENT_THREADS_PER_BLOCK"):
        api.cross_entropy_with_grad(x, t)
    monkeypatch.setattr(fastloss.config, "CUDA_RESIDENT_THREADS_PER_BLOCK", None)
    monkeypatch.setattr(fastloss.config, "CUDA_FUSED_STRATEGY", "fast")
    with pytest.raises(ValueError, match="CUDA_FUSED_STRATEGY"):
        api.cross_entropy_with_grad(x, t)
    monkeypatch.setattr(fastloss.config, "CUDA_THREADS_PER_BLOCK", 2048)
    with pytest.raises(ValueError, match="CUDA_THREADS_PER_BLOCK"):
        api.cross_entropy(x, t)


@sim
def test_pending_checks_ring_full(small_blocks, rng, monkeypatch):
    """With every slot of the pinned ring in flight, the next call waits for
    the oldest check (and raises its error, if any) before reusing its slot."""
    api = small_blocks
    checks = api._Checks()
    checks.SLOTS = 2
    monkeypatch.setattr(api, "_CHECKS", checks)
    monkeypatch.setattr(api, "_event_done", lambda event: False)
    x = dev(make_logits(rng, (3, 9), np.float32))
    bad, good = dev(np.array([0, 9, 1])), dev(np.array([0, 1, 2]))
    api.cross_entropy(x, bad)
    api.cross_entropy(x, good)
    assert len(checks.pending) == 2 and not checks.free
    with pytest.raises(ValueError, match=r"position \(1,\): 9 \(an earlier GPU call"):
        api.cross_entropy(x, good)  # ring full: waits for the oldest, the bad one
    assert len(checks.pending) == 2  # this call's check was still queued
    api.cross_entropy(x, bad)  # waits for the oldest (good) and queues its own
    with pytest.raises(ValueError, match=r"position \(1,\): 9 \(an earlier"):
        checks.synchronize()
    assert not checks.pending and len(checks.free) == 2


@sim
def test_scratch_buffers_are_reused_and_grown(rng, monkeypatch):
    """validate's numbers and the per-block partials live in per-thread,
    per-stream scratch buffers, reused by the next call and grown when a
    call needs more blocks; every call still gets its own loss."""
    from fastloss.cuda import api
    monkeypatch.setattr(fastloss.config, "CUDA_THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(api, "_SCRATCH", {})
    x = make_logits(rng, (5, 21), np.float32)
    t = make_targets(rng, (5,), 21)
    ref_loss, ref_grad = ce_reference(x, t, reduction="sum")
    losses = []
    for limit in (1, 3, 2, 3):
        monkeypatch.setattr(api, "GRID_LIMIT", limit)
        loss, grad = api.cross_entropy_with_grad(dev(x), dev(t), reduction="sum")
        losses.append(loss)
        assert_grad(host(grad), ref_grad, 2e-6)
    for loss in losses:  # distinct outputs, each right
        assert_loss(host(loss), ref_loss, 2e-5)
    rows = sorted(v[0].shape[0] for k, v in api._SCRATCH.items() if k[3] == "partial")
    assert rows == [3]  # grown once (1 -> 3), then reused
    assert len([k for k in api._SCRATCH if k[3] == "stats"]) == 1
    # the last block merged the partials and left the ticket counter at zero
    (counter,) = [v[0] for k, v in api._SCRATCH.items() if k[3] == "counter"]
    assert host(counter)[0] == 0


@sim
def test_mean_and_sum_take_two_launches(small_blocks, rng, launches):
    """validate, then the loss kernel, whose last block merges the partials
    (no separate finalize launch)."""
    api = small_blocks
    x = dev(make_logits(rng, (5, 12), np.float32))
    t = dev(make_targets(rng, (5,), 12))
    api.cross_entropy(x, t)
    api.cross_entropy_with_grad(x, t, reduction="sum")
    assert len(launches) == 4


@sim
def test_errors_raised_without_waiting(small_blocks, rng, monkeypatch):
    """On a GPU a call does not wait for its checks: while they have not landed
    (events not complete, as patched here) the call returns a NaN loss and
    writes nothing else; the error comes from the next call or from
    fastloss.cuda.synchronize(), naming the earlier call."""
    api = small_blocks
    xi = make_logits(rng, (4, 37), np.float32)
    d = dev(xi)
    bad = dev(np.array([0, 37, -100, 2]))
    monkeypatch.setattr(api, "_event_done", lambda event: False)
    loss, grad = api.cross_entropy_with_grad(d, bad, inplace=True)
    assert np.isnan(host(loss)).all()
    np.testing.assert_array_equal(host(d), xi)  # untouched
    loss = api.cross_entropy(d, bad, reduction="none")
    assert np.isnan(host(loss)).all()
    with pytest.raises(ValueError, match=r"targets: 1 value\(s\) outside \[0, 37\).*position \(1,\): 37 "
                                         r"\(an earlier GPU call.*\[and 1 more flagged call"):
        fastloss.cuda.synchronize()
    fastloss.cuda.synchronize()  # settled: nothing left to raise
    good = dev(np.array([0, 1, 2, 3]))
    api.cross_entropy(d, bad)
    with pytest.raises(ValueError, match="an earlier GPU call"):
        monkeypatch.setattr(api, "_event_done", lambda event: True)
        api.cross_entropy(d, good)  # raises the earlier call's error
    api.cross_entropy(d, good)  # and only once
    monkeypatch.setattr(api, "_event_done", lambda event: False)
    monkeypatch.setattr(fastloss.config, "CUDA_SYNC_CHECKS", True)  # waits: raised by the call itself
    with pytest.raises(ValueError, match=r"first at position \(1,\): 37$"):
        api.cross_entropy(d, bad)


# --- MSE ---------------------------------------------------------------------------------

MSE_CASES = [
    pytest.param((7, 13), {}, id="mean"),
    pytest.param((3, 5, 4), dict(reduction="sum", weight="full", grad_output=1.5), id="sum-full-weight"),
    pytest.param((6, 9), dict(weight="row"), id="mean-row-weight"),
    pytest.param((6, 9), dict(reduction="none", weight="col", grad_output="elems"), id="none-col-weight-elems"),
    pytest.param((11,), dict(weight="scalar", reduction="none", grad_output=0.5), id="1d-scalar-weight"),
    pytest.param((4, 6), dict(weight="device"), id="mean-device-weight"),
]


@sim
@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
@pytest.mark.parametrize("shape, kwargs", MSE_CASES)
def test_mse_matches_reference(small_blocks, rng, dtype, rtol, gtol, shape, kwargs):
    api = small_blocks
    kw = dict(kwargs)
    weights = {"full": lambda: rng.uniform(0, 2, shape), "row": lambda: rng.uniform(0, 2, shape[-1:]),
               "col": lambda: rng.uniform(0, 2, shape[:-1] + (1,)), "scalar": lambda: np.array(0.7),
               "device": lambda: rng.uniform(0, 2, shape)}
    kind = kw.get("weight")
    if kind:
        kw["weight"] = weights[kind]()
    if kw.get("grad_output") == "elems":
        kw["grad_output"] = rng.uniform(-1, 1, shape)
    p = make_logits(rng, shape, dtype, 1.0)
    q = make_logits(rng, shape, np.float32, 1.0)
    ref_loss, ref_grad = mse_reference(p, q, **kw)
    call = dict(kw)
    if kind == "device":
        call["weight"] = dev(kw["weight"])
    loss, grad = api.mse_with_grad(dev(p), dev(q), **call)
    assert grad.dtype == p.dtype and grad.shape == p.shape
    assert_loss(host(loss), ref_loss, rtol)
    assert_grad(host(grad), ref_grad, gtol)
    call.pop("grad_output", None)
    kw.pop("grad_output", None)
    assert_loss(host(api.mse(dev(p), dev(q), **call)), mse_reference(p, q, **kw)[0], rtol)


@sim
def test_mse_out_errors_and_empty(small_blocks, rng):
    api = small_blocks
    p = make_logits(rng, (5, 7), np.float32)
    q = make_logits(rng, (5, 7), np.float32)
    out = dev(np.full((5, 7), np.nan, np.float32))
    loss, grad = api.mse_with_grad(dev(p), dev(q), out=out)
    assert grad is out
    assert_grad(host(out), mse_reference(p, q)[1], 2e-6)
    dp = dev(p)
    loss, grad = api.mse_with_grad(dp, dev(q), out=dp)  # in place over pred is allowed
    assert_grad(host(dp), mse_reference(p, q)[1], 2e-6)
    dq = dev(q)
    with pytest.raises(ValueError, match="out: overlaps pred or target"):
        api.mse_with_grad(dev(p), dq, out=dq)
    with pytest.raises(ValueError, match=r"target: expected the shape of pred \(5, 7\)"):
        api.mse(dev(p), dev(q[:4]))
    with pytest.raises(ValueError, match="weight: shape"):
        api.mse(dev(p), dev(q), weight=np.ones(3))
    with pytest.raises(ValueError, match="reduction: expected one of"):
        api.mse(dev(p), dev(q), reduction="x")
    with pytest.raises(ValueError, match="grad_output: expected a scalar for reduction='sum'"):
        api.mse_with_grad(dev(p), dev(q), reduction="sum", grad_output=np.ones(2))
    z = dev(np.zeros((0, 3), np.float32))
    assert host(api.mse(z, z))[0] == 0.0
    zero_w = api.mse(dev(p), dev(q), weight=np.zeros((5, 7)))
    assert host(zero_w)[0] == 0.0


# --- real GPU: compare with PyTorch ---------------------------------------------------------

def _torch_cuda():
    if IN_SIM or not cuda_available():
        pytest.skip("needs a real CUDA GPU")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA")
    return torch


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["auto", "stream", "resident"])
@pytest.mark.parametrize("tdtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("shape", [(8192, 128256), (7, 130), (33, 50257), (3, 1)])
def test_gpu_cross_entropy_vs_torch(monkeypatch, strategy, tdtype, tol, shape):
    """Every fused kernel on the GPU (auto: resident where a quarter of a row
    fits; resident forced keeps a prefix of the float32 128256-class rows)."""
    torch = _torch_cuda()
    F = torch.nn.functional
    from fastloss.cuda import api
    monkeypatch.setattr(fastloss.config, "CUDA_FUSED_STRATEGY", strategy)
    dtype = getattr(torch, tdtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(shape, device="cuda", generator=g) * 2).to(dtype)
    t = torch.randint(0, shape[-1], shape[:-1], device="cuda", generator=g)
    t[::7] = -100
    for kw in (dict(), dict(label_smoothing=0.1, reduction="sum"),
               dict(weight=torch.rand(shape[-1], device="cuda") + 0.5, reduction="none")):
        xr = x.detach().float().requires_grad_(True)
        ref = F.cross_entropy(xr, t, **kw)
        ref.backward(torch.ones_like(ref))
        loss, grad = api.cross_entropy_with_grad(x, t, **kw)
        assert isinstance(loss, torch.Tensor) and loss.device == x.device
        assert grad.dtype == x.dtype and grad.shape == x.shape
        torch.testing.assert_close(loss.float().reshape(ref.shape), ref.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(grad.float(), xr.grad.to(dtype).float(), rtol=tol,
                                   atol=tol * float(xr.grad.abs().max()) + 1e-7)
        fwd = api.cross_entropy(x, t, **kw)
        torch.testing.assert_close(fwd.float().reshape(ref.shape), ref.detach(), rtol=tol, atol=tol)
    y = x.clone()
    loss, grad = api.cross_entropy_with_grad(y, t, inplace=True)
    assert grad is y


@pytest.mark.gpu
def test_gpu_bad_target_reported_without_waiting():
    """On a GPU a bad target gives a NaN loss at once and its ValueError from
    fastloss.cuda.synchronize() (or from the call with CUDA_SYNC_CHECKS)."""
    torch = _torch_cuda()
    from fastloss.cuda import api
    x = torch.randn(16, 1000, device="cuda")
    t = torch.randint(0, 1000, (16,), device="cuda")
    t[5] = 1000
    loss, _ = api.cross_entropy_with_grad(x, t)
    assert torch.isnan(loss).item()
    with pytest.raises(ValueError, match=r"position \(5,\): 1000"):
        fastloss.cuda.synchronize()
    fastloss.cuda.synchronize()
    fastloss.config.CUDA_SYNC_CHECKS = True
    try:
        with pytest.raises(ValueError, match=r"position \(5,\): 1000$"):
            api.cross_entropy(x, t)
    finally:
        fastloss.config.CUDA_SYNC_CHECKS = False


@pytest.mark.gpu
@pytest.mark.parametrize("tdtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_gpu_mse_vs_torch(tdtype, tol):
    torch = _torch_cuda()
    F = torch.nn.functional
    from fastloss.cuda import api
    dtype = getattr(torch, tdtype)
    p = torch.randn(513, 1001, device="cuda").to(dtype)
    q = torch.randn(513, 1001, device="cuda").to(dtype)
    for red in ("mean", "sum", "none"):
        pr = p.detach().float().requires_grad_(True)
        ref = F.mse_loss(pr, q.float(), reduction=red)
        ref.backward(torch.ones_like(ref))
        loss, grad = api.mse_with_grad(p, q, reduction=red)
        torch.testing.assert_close(loss.float().reshape(ref.shape), ref.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(grad.float(), pr.grad.to(dtype).float(), rtol=tol, atol=tol * 1e-3)
