"""CUDA backend tests: the kernels under the numba CUDA simulator, plus real-GPU
checks against PyTorch (marked ``gpu``).

The simulator cases (``sim``) run in their own pytest step:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda_sim.py -q

(``NUMBA_ENABLE_CUDASIM`` must be set before ``numba.cuda`` is first imported,
so they cannot run in the same process as the rest of the suite, which
imports it for doctest collection and the PTX tests). In any other run they
skip.

The contract itself (losses and gradients against the references for every
option and dtype, masking, NaN isolation, empty inputs, the error messages)
runs on every backend, the simulator included, in ``tests/test_contract.py``;
this file keeps the CUDA mechanics: resident, partly resident and streaming
fused kernels, block sizes, word access, strided and device side inputs,
the asynchronous checks, scratch reuse, launch counts.

They call the public functions (``fastloss.cross_entropy``, ...) with
simulator device arrays, which ``fastloss.ops`` hands to the CUDA host side
(``fastloss.cuda.cross_entropy_host``, ``mse_host``). Every kernel is
compared with the float64 references of ``tests/reference.py`` on small odd
shapes, with threads per block shrunk (``CUDA_THREADS_PER_BLOCK`` = 8, also 3
and 1) and the grid capped (``CUDA_GRID_LIMIT`` = 2), so that rows span
several threads and the grid-stride loops run several rounds.
"""

import numpy as np
import pytest
from cases import BF16, CE_CASES, DTYPES, assert_grad, assert_loss, make_logits, make_targets, resolve
from cuda_sim_support import IN_SIM, dev, fast_thread_switching, host, sim, use_small_blocks
from reference import ce_reference, lse_reference, mse_reference, to_float64

import fastloss
import fastloss.config
import fastloss.cuda
from fastloss.cuda import cuda_available, is_device_array


def test_no_gpu_raises_runtime_error():
    """GPU arrays on a machine that cannot run the kernels: one clear RuntimeError."""
    if cuda_available():
        pytest.skip("a GPU (or the simulator) is available here")

    class FakeGpuArray:
        __cuda_array_interface__ = {"shape": (2, 3), "typestr": "<f4", "data": (0, False),
                                    "version": 3}

    x = FakeGpuArray()
    assert is_device_array(x)
    for call in (lambda: fastloss.cross_entropy(x, np.zeros(2, np.int64)),
                 lambda: fastloss.cross_entropy_with_grad(x, np.zeros(2, np.int64)),
                 lambda: fastloss.logsumexp(x),
                 lambda: fastloss.mse(x, x),
                 lambda: fastloss.mse_with_grad(x, x)):
        with pytest.raises(RuntimeError, match="GPU arrays were passed, but the CUDA backend cannot run"):
            call()


def test_is_device_array_on_host_objects():
    assert not is_device_array(np.zeros(3))
    assert not is_device_array([1.0, 2.0])
    assert not is_device_array(3.0)


# --- helpers for the simulator cases -----------------------------------------------

_fast_thread_switching = pytest.fixture(autouse=True, scope="module")(fast_thread_switching)


@pytest.fixture
def small_blocks(monkeypatch):
    """Small blocks (``use_small_blocks``); returns the API under test."""
    use_small_blocks(monkeypatch)
    return fastloss


@pytest.fixture
def launches(monkeypatch):
    """Records the dynamic shared memory of every kernel launch (the resident
    fused kernel is the one launched with some)."""
    from fastloss.cuda import launch
    seen = []
    orig = launch.Gpu.launch

    def spy(self, kernel, grid, *args, tpb=None, smem=0):
        seen.append(smem)
        return orig(self, kernel, grid, *args, tpb=tpb, smem=smem)
    monkeypatch.setattr(launch.Gpu, "launch", spy)
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
    kw = resolve(rng, shape, kwargs)
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
@pytest.mark.parametrize("tpb", [1, 3, 32, 96])
def test_ce_any_block_size(monkeypatch, rng, tpb):
    """Non-power-of-two and one-thread blocks, more threads than classes; whole
    warps (32, 96) take the shuffle reduction (emulated in the simulator)."""
    api = fastloss
    monkeypatch.setattr(fastloss.config, "CUDA_THREADS_PER_BLOCK", tpb)
    monkeypatch.setattr(fastloss.config, "CUDA_GRID_LIMIT", 2)
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
        monkeypatch.setattr(fastloss.config, "CUDA_WIDE_ACCESS", wide)
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
def test_ce_gpu_only_errors(small_blocks, rng, monkeypatch):
    """The errors only GPU inputs can meet (the contract's messages run on every
    backend in tests/test_contract.py): a host ``out=``, strides, overlap of
    views, bad tunables; and uint64 targets against a huge ``ignore_index``."""
    api = small_blocks
    x = dev(make_logits(rng, (4, 37), np.float32))
    big = np.array([0, 2**64 - 1, 3, 2**63], dtype=np.uint64)  # wrap to negatives in int64
    loss = api.cross_entropy(x, dev(big[[0, 1, 2, 1]]), ignore_index=2**64 - 1, reduction="none")
    ref = ce_reference(host(x), np.array([0, -1, 3, -1]), ignore_index=-1, reduction="none")[0]
    assert_loss(host(loss), ref, 2e-5)
    with pytest.raises(ValueError, match=r"first at position \(1, 0\): -1"):
        api.cross_entropy_with_grad(dev(make_logits(rng, (2, 2, 5), np.float32)),
                                    dev(np.array([[0, 1], [-1, 2]])))
    t = dev(np.array([0, 1, 2, 3]))
    xi = make_logits(rng, (4, 37), np.float32)
    d = dev(xi)
    with pytest.raises(ValueError, match="weight: expected non-negative"):
        api.cross_entropy_with_grad(d, t, weight=dev(-np.ones(37)), inplace=True)
    np.testing.assert_array_equal(host(d), xi)  # the kernels did nothing: logits untouched
    with pytest.raises(ValueError, match="weight: expected non-negative values"):
        api.cross_entropy(x, t, weight=np.r_[np.ones(36), -1.0])  # a host weight, checked on the host
    with pytest.raises(ValueError, match="out: expected a C-contiguous array, found strides"):
        api.cross_entropy_with_grad(x, t, out=dev(np.zeros((37, 4), np.float32)).T)
    with pytest.raises(TypeError, match="out: expected a GPU array"):
        api.cross_entropy_with_grad(x, t, out=np.zeros((4, 37), np.float32))
    with pytest.raises(ValueError, match="out: overlaps logits"):
        whole = dev(np.zeros((5, 37), np.float32))
        api.cross_entropy_with_grad(whole[:4], t, out=whole[1:])
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


def pending_ring(monkeypatch, slots):
    """A fresh queue of checks with ``slots`` slots in place of the process's,
    whose events never complete (a GPU that has not caught up)."""
    from fastloss.cuda import checks as ring
    checks = ring.Checks()
    checks.SLOTS = slots
    monkeypatch.setattr(ring, "CHECKS", checks)
    monkeypatch.setattr(ring, "event_done", lambda event: False)
    return checks


@sim
def test_pending_checks_ring_full(small_blocks, rng, monkeypatch):
    """With every slot of the pinned ring in flight, the next call waits for
    the oldest check (and raises its error, if any) before reusing its slot."""
    api = small_blocks
    checks = pending_ring(monkeypatch, 2)
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
    from fastloss.cuda import launch
    api = fastloss
    monkeypatch.setattr(fastloss.config, "CUDA_THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(launch, "SCRATCH", {})
    x = make_logits(rng, (5, 21), np.float32)
    t = make_targets(rng, (5,), 21)
    ref_loss, ref_grad = ce_reference(x, t, reduction="sum")
    losses = []
    for limit in (1, 3, 2, 3):
        monkeypatch.setattr(fastloss.config, "CUDA_GRID_LIMIT", limit)
        loss, grad = api.cross_entropy_with_grad(dev(x), dev(t), reduction="sum")
        losses.append(loss)
        assert_grad(host(grad), ref_grad, 2e-6)
    for loss in losses:  # distinct outputs, each right
        assert_loss(host(loss), ref_loss, 2e-5)
    rows = sorted(v[0].shape[0] for k, v in launch.SCRATCH.items() if k[3] == "partial")
    assert rows == [3]  # grown once (1 -> 3), then reused
    assert len([k for k in launch.SCRATCH if k[3] == "stats"]) == 1
    # the last block merged the partials and left the ticket counter at zero
    (counter,) = [v[0] for k, v in launch.SCRATCH.items() if k[3] == "counter"]
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
    from fastloss.cuda import checks
    api = small_blocks
    xi = make_logits(rng, (4, 37), np.float32)
    d = dev(xi)
    bad = dev(np.array([0, 37, -100, 2]))
    monkeypatch.setattr(checks, "event_done", lambda event: False)
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
        monkeypatch.setattr(checks, "event_done", lambda event: True)
        api.cross_entropy(d, good)  # raises the earlier call's error
    api.cross_entropy(d, good)  # and only once
    monkeypatch.setattr(checks, "event_done", lambda event: False)
    monkeypatch.setattr(fastloss.config, "CUDA_SYNC_CHECKS", True)  # waits: raised by the call itself
    with pytest.raises(ValueError, match=r"first at position \(1,\): 37$"):
        api.cross_entropy(d, bad)


@sim
def test_one_queue_serves_every_op(small_blocks, rng, monkeypatch):
    """Class-index and probability-target cross-entropy and distillation queue
    their checks in one ring: while no event has completed no call raises
    (each returns a NaN loss); a full ring waits for the oldest check
    whichever op queued it, and raises its error from the call that waited;
    ``fastloss.cuda.synchronize()`` raises the oldest pending error, counting
    the others."""
    api = small_blocks
    checks = pending_ring(monkeypatch, 3)
    x = dev(make_logits(rng, (3, 9), np.float32))
    q = rng.random((3, 9)).astype(np.float32) + 0.1
    q /= q.sum(axis=1, keepdims=True)
    q[1] *= 2  # row 1 sums to 2
    idx = np.stack([rng.permutation(9)[:4] for _ in range(3)])
    idx[2, 1] = 11
    lp = rng.standard_normal((3, 4)).astype(np.float32)
    good = dev(np.array([0, 1, 2]))
    assert np.isnan(host(api.cross_entropy(x, dev(q)))).all()
    assert np.isnan(host(api.distill(x, (dev(idx), dev(lp))))).all()
    assert np.isnan(host(api.cross_entropy(x, dev(np.array([0, 9, 1]))))).all()
    assert len(checks.pending) == 3 and not checks.free
    with pytest.raises(ValueError, match=r"targets: 1 row\(s\) of probability targets are not distributions "
                                         r".*first at row \(1,\): it sums to (2\.0|1\.99)\d* \(an earlier GPU call"
                                         r"[^\[]*$"):
        api.cross_entropy(x, good)  # ring full: waits for the oldest, the soft-target call
    with pytest.raises(ValueError, match=r"teacher indices: 1 value\(s\) outside \[0, 9\); first at position "
                                         r"\(2, 1\): 11 \(an earlier GPU call.*\[and 1 more flagged call"):
        fastloss.cuda.synchronize()
    assert not checks.pending and len(checks.free) == 3
    fastloss.cuda.synchronize()  # settled: nothing left to raise


# --- MSE ---------------------------------------------------------------------------------

@sim
@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
def test_mse_device_weight(small_blocks, rng, dtype, rtol, gtol):
    """A weight given as a GPU array (summed on the device for the mean); the
    host weight layouts run on every backend in tests/test_contract.py."""
    api = small_blocks
    shape = (4, 6)
    w = rng.uniform(0, 2, shape)
    p = make_logits(rng, shape, dtype, 1.0)
    q = make_logits(rng, shape, np.float32, 1.0)
    ref_loss, ref_grad = mse_reference(p, q, weight=w)
    loss, grad = api.mse_with_grad(dev(p), dev(q), weight=dev(w))
    assert grad.dtype == p.dtype and grad.shape == p.shape
    assert_loss(host(loss), ref_loss, rtol)
    assert_grad(host(grad), ref_grad, gtol)
    assert_loss(host(api.mse(dev(p), dev(q), weight=dev(w))), ref_loss, rtol)


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
    api = fastloss
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
    api = fastloss
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
    api = fastloss
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


# --- fastloss.torch: the adapter's GPU branch under the simulator ---------------------------
# PyTorch has no CUDA tensors here, so these route CPU tensors through the
# adapter's GPU branch (``fastloss.torch.backend``: ``on_gpu`` says yes,
# ``to_device`` makes a simulator array of the tensor's data, ``from_device``
# copies a result back) and compare with the adapter's CPU branch and torch.

@pytest.fixture
def torch_sim(monkeypatch):
    torch = pytest.importorskip("torch")
    import fastloss.torch as flt
    from fastloss.torch import backend

    def to_device(t):
        return None if t is None else dev(backend.as_numpy(t.detach().contiguous()))

    def from_device(a, like):
        return backend.from_numpy(np.ascontiguousarray(host(a)))

    def patch():
        monkeypatch.setattr(fastloss.config, "CUDA_THREADS_PER_BLOCK", 8)
        monkeypatch.setattr(fastloss.config, "CUDA_GRID_LIMIT", 2)
        monkeypatch.setattr(backend, "on_gpu", lambda t: True)
        monkeypatch.setattr(backend, "to_device", to_device)
        monkeypatch.setattr(backend, "from_device", from_device)

    return torch, flt, patch, monkeypatch.undo


def _run_torch(torch, fn, args, grad_output=None):
    """(loss, grads of the float args that require grad) of fn(*args)."""
    args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in args]
    loss = fn(*args)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


TORCH_SIM_CE = [dict(), dict(reduction="sum"), dict(reduction="none"), dict(label_smoothing=0.1, weight=True),
                dict(z_loss=1e-3, softcap=4.0, logit_scale=0.7), dict(normalizer=50.0),
                dict(inplace_backward=True)]


@sim
@pytest.mark.parametrize("opts", TORCH_SIM_CE, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("dtype,tol", [("float32", 2e-6), ("float64", 1e-12), ("float16", 2e-3)])
def test_torch_adapter_cross_entropy_gpu_branch(torch_sim, opts, dtype, tol):
    torch, flt, patch, undo = torch_sim
    F = torch.nn.functional
    g = torch.Generator().manual_seed(5)
    tdtype = getattr(torch, dtype)
    opts = dict(opts)
    x0 = (torch.randn(23, 37, generator=g, dtype=torch.float64) * 2).to(tdtype)
    t = torch.randint(0, 37, (23,), generator=g)
    t[4] = -100
    if opts.pop("weight", False):
        opts["weight"] = (torch.rand(37, generator=g, dtype=torch.float64) + 0.5).to(tdtype)
    up = torch.rand(23, generator=g, dtype=torch.float64).to(tdtype) if opts.get("reduction") == "none" \
        else torch.tensor(0.75, dtype=tdtype)

    def fl(x):  # a non-leaf, so that inplace_backward may overwrite it
        return flt.cross_entropy(x * 1, t, **opts)

    x = x0.clone().requires_grad_()
    cpu_loss, (cpu_grad,) = _run_torch(torch, fl, [x], up)
    patch()
    sim_loss, (sim_grad,) = _run_torch(torch, fl, [x], up)
    undo()
    assert sim_loss.dtype == tdtype and sim_loss.shape == cpu_loss.shape
    torch.testing.assert_close(sim_loss.double(), cpu_loss.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(sim_grad.double(), cpu_grad.double(), rtol=tol, atol=tol)
    if not {"z_loss", "normalizer", "inplace_backward"} & set(opts) and dtype != "float16":
        ref_loss, (ref_grad,) = _run_torch(torch, lambda x: F.cross_entropy(x * 1, t, **opts), [x], up)
        torch.testing.assert_close(sim_loss.double(), ref_loss.double(), rtol=10 * tol, atol=10 * tol)
        torch.testing.assert_close(sim_grad.double(), ref_grad.double(), rtol=10 * tol, atol=10 * tol)


@sim
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_adapter_mse_gpu_branch(torch_sim, reduction):
    torch, flt, patch, undo = torch_sim
    g = torch.Generator().manual_seed(6)
    p = torch.randn(9, 13, generator=g, requires_grad=True)
    q = torch.randn(9, 13, generator=g, requires_grad=True)
    w = torch.rand(9, 13, generator=g) + 0.5  # numba arrays do not broadcast (PyTorch CUDA tensors do)

    def fn(p, q):
        return flt.mse_loss(p, q, reduction, weight=w)

    cpu = _run_torch(torch, fn, [p, q])
    patch()
    got = _run_torch(torch, fn, [p, q])
    undo()
    ref = _run_torch(torch, lambda p, q: torch.nn.functional.mse_loss(p, q, reduction=reduction, weight=w), [p, q])
    for a, b, c in zip([got[0], *got[1]], [cpu[0], *cpu[1]], [ref[0], *ref[1]]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(a, c, rtol=2e-5, atol=2e-5)


@sim
@pytest.mark.parametrize("opts", [dict(), dict(reduction="sum", chunk_size=4), dict(reduction="none", chunk_size=5),
                                  dict(weight=True, label_smoothing=0.05, chunk_size=3),
                                  dict(z_loss=1e-3, softcap=5.0, chunk_size=7)],
                         ids=lambda o: ",".join(o) or "plain")
def test_torch_adapter_linear_cross_entropy_gpu_branch(torch_sim, opts):
    """GPU tensors take the chunked path (PyTorch products around the fused CUDA
    kernel); under the simulator it equals the CPU path and torch."""
    torch, flt, patch, undo = torch_sim
    F = torch.nn.functional
    g = torch.Generator().manual_seed(7)
    opts = dict(opts)
    h = torch.randn(17, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(29, 8, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    b = torch.randn(29, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 29, (17,), generator=g)
    t[2] = -100
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(29, generator=g, dtype=torch.float64) + 0.5
    up = torch.rand(17, generator=g, dtype=torch.float64) if opts.get("reduction") == "none" else None

    def fn(h, w, b):
        return flt.linear_cross_entropy(h, w, t, b, **opts)

    cpu = _run_torch(torch, fn, [h, w, b], up)
    patch()
    got = _run_torch(torch, fn, [h, w, b], up)
    undo()
    for a, c in zip([got[0], *got[1]], [cpu[0], *cpu[1]]):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    if "z_loss" not in opts:
        ce = {k: v for k, v in opts.items() if k != "chunk_size"}
        ref = _run_torch(torch, lambda h, w, b: F.cross_entropy(F.linear(h, w, b), t, **ce), [h, w, b], up)
        for a, c in zip([got[0], *got[1]], [ref[0], *ref[1]]):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
