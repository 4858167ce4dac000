"""Calls from several Python threads at once are safe and give correct results
(contract, "Common rules").

Four threads run ``cross_entropy_with_grad`` and ``mse_with_grad`` on different
inputs at the same time; every result must equal, bit for bit, what the same call
gives when run alone. Kernels partition work deterministically (each task owns
its rows or its partial sum, merged serially), so any difference means that two
calls interfered: shared scratch, a shared accumulator or a threading layer
entered concurrently.
"""

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest

import fastloss
from reference import ce_reference, mse_reference, to_float64

BF16 = np.dtype(ml_dtypes.bfloat16)
THREADS = 4
ROUNDS = 3  # each thread runs its job this many times


def _ce_jobs(rng):
    """Four different cross-entropy calls: shapes, dtypes and options all differ.
    Sizes pass fastloss.config.MIN_ELEMENTS_PER_TASK several times over, so each
    call itself runs parallel kernels."""
    jobs = []
    for shape, dtype, kw in [
        ((512, 1000), np.float32, {"label_smoothing": 0.1}),
        ((300, 2053), np.float32, {"z_loss": 1e-3, "softcap": 15.0, "reduction": "sum"}),
        ((4, 64, 1024), BF16, {"logit_scale": 0.5, "reduction": "none", "grad_output": None}),
        ((257, 1500), np.float64, {"weight": True, "ignore_index": 3}),
    ]:
        logits = (rng.standard_normal(shape) * 2.0).astype(dtype)
        targets = rng.integers(0, shape[-1], size=shape[:-1])
        targets.reshape(-1)[::7] = kw.get("ignore_index", -100)
        kw = dict(kw)
        if kw.get("weight"):
            kw["weight"] = rng.uniform(0.5, 2.0, size=shape[-1])
        if kw.get("reduction") == "none":
            kw["grad_output"] = rng.uniform(0.5, 2.0, size=shape[:-1])
        jobs.append((logits, targets, kw))
    return jobs


def _mse_jobs(rng):
    jobs = []
    for shape, dtype, kw in [
        ((1024, 513), np.float32, {}),
        ((37, 1001, 9), np.float16, {"reduction": "sum", "weight": (9,)}),
        ((777, 300), BF16, {"reduction": "none", "grad_output": 0.75}),
        ((600, 400), np.float64, {"weight": (600, 1), "grad_output": -2.0}),
    ]:
        pred = rng.standard_normal(shape).astype(dtype)
        target = (rng.standard_normal(shape) + 0.5).astype(dtype)
        kw = dict(kw)
        if "weight" in kw:
            kw["weight"] = rng.uniform(0.5, 2.0, size=kw["weight"]).astype(dtype)
        jobs.append((pred, target, kw))
    return jobs


def _run_ce(job, use_out=False):
    logits, targets, kw = job
    out = np.full(logits.shape, np.nan, logits.dtype) if use_out else None
    return fastloss.cross_entropy_with_grad(logits, targets, out=out, **kw)


def _run_mse(job, use_out=False):
    pred, target, kw = job
    out = np.full(pred.shape, np.nan, pred.dtype) if use_out else None
    return fastloss.mse_with_grad(pred, target, out=out, **kw)


def _same(a, b, what):
    la, ga = a
    lb, gb = b
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb), err_msg=f"{what}: loss")
    assert ga.dtype == gb.dtype
    np.testing.assert_array_equal(ga.view(np.uint8), gb.view(np.uint8), err_msg=f"{what}: grad")


def _concurrent(run, jobs, use_out):
    """Run every job ROUNDS times from THREADS threads; results in submission order."""
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        futures = [(i, pool.submit(run, jobs[i], use_out))
                   for _ in range(ROUNDS) for i in range(len(jobs))]
        return [(i, f.result()) for i, f in futures]


@pytest.mark.parametrize("use_out", [False, True], ids=["alloc", "out"])
def test_cross_entropy_threads(rng, use_out):
    jobs = _ce_jobs(rng)
    serial = [_run_ce(job) for job in jobs]
    # The serial results are themselves right (guards against comparing two wrong answers).
    for (logits, targets, kw), (loss, grad) in zip(jobs, serial):
        ref_loss, ref_grad = ce_reference(logits, targets, **kw)
        # Loose sanity bounds: accuracy itself is test_cross_entropy.py's job.
        f64 = logits.dtype == np.float64
        np.testing.assert_allclose(np.asarray(loss, np.float64), ref_loss, rtol=1e-10 if f64 else 1e-5)
        np.testing.assert_allclose(to_float64(grad), ref_grad, rtol=1e-10 if f64 else 2.0**-7,
                                   atol=1e-15 if f64 else 1e-8)
    for i, res in _concurrent(_run_ce, jobs, use_out):
        _same(res, serial[i], f"cross_entropy job {i}")


@pytest.mark.parametrize("use_out", [False, True], ids=["alloc", "out"])
def test_mse_threads(rng, use_out):
    jobs = _mse_jobs(rng)
    serial = [_run_mse(job) for job in jobs]
    for (pred, target, kw), (loss, grad) in zip(jobs, serial):
        ref_loss, ref_grad = mse_reference(pred, target, **kw)
        np.testing.assert_allclose(np.asarray(loss, np.float64), ref_loss, rtol=1e-6)
        np.testing.assert_allclose(to_float64(grad), ref_grad, rtol=2.0**-8, atol=2.0**-24)
    for i, res in _concurrent(_run_mse, jobs, use_out):
        _same(res, serial[i], f"mse job {i}")


def test_mixed_ops_threads(rng):
    """Cross-entropy, logsumexp and MSE interleaved on the same pool."""
    ce_jobs, mse_jobs = _ce_jobs(rng), _mse_jobs(rng)
    serial_ce = [_run_ce(j) for j in ce_jobs]
    serial_mse = [_run_mse(j) for j in mse_jobs]
    serial_lse = [fastloss.logsumexp(j[0]) for j in ce_jobs]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        futs = []
        for _ in range(ROUNDS):
            for i in range(4):
                futs.append(("ce", i, pool.submit(_run_ce, ce_jobs[i])))
                futs.append(("mse", i, pool.submit(_run_mse, mse_jobs[i])))
                futs.append(("lse", i, pool.submit(fastloss.logsumexp, ce_jobs[i][0])))
        for kind, i, fut in futs:
            if kind == "ce":
                _same(fut.result(), serial_ce[i], f"ce {i}")
            elif kind == "mse":
                _same(fut.result(), serial_mse[i], f"mse {i}")
            else:
                np.testing.assert_array_equal(fut.result(), serial_lse[i])


def test_threads_do_not_modify_shared_inputs(rng):
    """Four threads reading the *same* input arrays at once leave them intact and
    all get the serial answer."""
    logits = rng.standard_normal((512, 1000)).astype(np.float32)
    targets = rng.integers(0, 1000, size=512)
    pred, target = logits[:, :500], logits[:, 500:]  # non-contiguous, overlapping one buffer
    before = logits.copy()
    serial_ce = fastloss.cross_entropy_with_grad(logits, targets)
    serial_mse = fastloss.mse_with_grad(pred, target)
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        ce = [pool.submit(fastloss.cross_entropy_with_grad, logits, targets) for _ in range(8)]
        ms = [pool.submit(fastloss.mse_with_grad, pred, target) for _ in range(8)]
        for f in ce:
            _same(f.result(), serial_ce, "shared ce")
        for f in ms:
            _same(f.result(), serial_mse, "shared mse")
    np.testing.assert_array_equal(logits, before)


_WORKQUEUE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from concurrent.futures import ThreadPoolExecutor
    import numba
    import numpy as np
    import fastloss

    rng = np.random.default_rng(0)
    jobs = [(rng.standard_normal((400, 1000)).astype(np.float32),
             rng.integers(0, 1000, size=400)) for _ in range(4)]
    serial = [fastloss.cross_entropy_with_grad(x, t) for x, t in jobs]
    mserial = [fastloss.mse_with_grad(x, x[::-1]) for x, _ in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            res = [pool.submit(fastloss.cross_entropy_with_grad, x, t) for x, t in jobs]
            mres = [pool.submit(fastloss.mse_with_grad, x, x[::-1]) for x, _ in jobs]
            for f, (l, g) in zip(res, serial):
                l2, g2 = f.result()
                assert l2 == l and np.array_equal(g2, g)
            for f, (l, g) in zip(mres, mserial):
                l2, g2 = f.result()
                assert l2 == l and np.array_equal(g2, g)
    print("layer", numba.threading_layer())
    """
)


@pytest.mark.slow
def test_threads_under_workqueue_layer(tmp_path):
    """numba's workqueue threading layer is not re-entrant: concurrent parallel
    launches abort the process unless fastloss serialises them. Run in a
    subprocess with that layer forced."""
    script = tmp_path / "wq.py"
    script.write_text(_WORKQUEUE_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr[-3000:]}"
    assert "layer workqueue" in proc.stdout


@pytest.mark.parametrize("bad", [0, -1, 10**6, 1.5, True, "2"])
def test_set_num_threads_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match=r"\bn\b.*NUMBA_NUM_THREADS"):
        fastloss.set_num_threads(bad)


def test_one_thread_matches_all_threads(rng):
    x = (rng.standard_normal((301, 4099)) * 3).astype(np.float32)
    t = rng.integers(0, 4099, 301)
    full = fastloss.cross_entropy_with_grad(x, t, label_smoothing=0.1, z_loss=1e-3)
    fastloss.set_num_threads(1)
    try:
        assert fastloss.get_num_threads() == 1
        single = fastloss.cross_entropy_with_grad(x, t, label_smoothing=0.1, z_loss=1e-3)
    finally:
        fastloss.set_num_threads(fastloss.max_threads())
    # Rows are independent, so the split over threads cannot change any row.
    np.testing.assert_array_equal(single[1], full[1])
    np.testing.assert_allclose(single[0], full[0], rtol=1e-12)
