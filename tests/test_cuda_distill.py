"""The CUDA distillation kernels (``fastloss.cuda.distill_host``) under the numba
CUDA simulator:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda_distill.py -q

(in any other run the simulator cases skip). The host functions are called
directly with simulator device arrays and a ``DistillOptions``, and compared
with a float64 numpy reference: ``_reference`` below, itself checked against
``tests/reference_distill.py`` and PyTorch. Blocks of 8 threads (also 3 and
1) and at most 2 blocks make rows span several threads and the grid-stride
loops run several rounds; class counts (37, 19, 5) are not multiples of the
block. The kernels' PTX is checked in ``tests/test_cuda_ptx.py``.
"""

import importlib.util
import os

import numpy as np
import pytest
from cases import BF16
from cuda_sim_support import dev, fast_thread_switching, host, sim, use_small_blocks
from reference import to_float64

import fastloss.config
from fastloss.cuda import is_device_array


# (dtype, loss rtol, gradient tolerance relative to the largest |grad|)
DTYPES = [
    pytest.param(np.dtype(np.float32), 2e-5, 2e-6, id="float32"),
    pytest.param(np.dtype(np.float64), 1e-10, 1e-12, id="float64"),
    pytest.param(np.dtype(np.float16), 2e-5, 1e-3, id="float16"),
    pytest.param(BF16, 2e-5, 8e-3, id="bfloat16"),
]


def make_opts(**kw):
    """The options object the host functions take, as ``fastloss.ops`` builds it."""
    from fastloss.options import DistillOptions
    return DistillOptions.check(**kw)


# --- the float64 reference ---------------------------------------------------------

def _log_softmax(z):
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def _plogq(p, a, b):
    """p (a - b) elementwise, 0 where p == 0."""
    with np.errstate(invalid="ignore"):
        return np.where(p != 0, p * (a - b), 0.0)


def _reference(student, teacher, targets=None, *, kind="kl", temperature=1.0, beta=0.5,
               scale_by_t2=False, reduction="batchmean", ignore_index=-100, soft_weight=1.0,
               hard_weight=0.0, grad_output=None):
    """(loss, grad) in float64, straight from the formulas of the spec."""
    s = to_float64(student)
    shape = s.shape
    nclass = shape[-1]
    s = s.reshape(-1, nclass)
    n = s.shape[0]
    T = float(temperature)
    lps = _log_softmax(s / T)
    ps = np.exp(lps)
    if isinstance(teacher, tuple):
        idx = np.asarray(teacher[0]).reshape(n, -1).astype(np.int64)
        lp = to_float64(teacher[1]).reshape(n, -1)
        pk = np.exp(_log_softmax(lp / T))
        pt = np.zeros_like(s)
        np.put_along_axis(pt, idx, pk, axis=1)
        with np.errstate(divide="ignore"):
            lpt = np.log(pt)
    else:
        lpt = _log_softmax(to_float64(teacher).reshape(n, nclass) / T)
        pt = np.exp(lpt)
    if kind == "jsd" and beta == 0:
        kind = "kl"
    if kind == "jsd" and beta == 1:
        kind = "reverse_kl"
    if kind == "kl":
        S = _plogq(pt, lpt, lps).sum(1)
        gS = ps - pt
    elif kind == "reverse_kl":
        S = _plogq(ps, lps, lpt).sum(1)
        with np.errstate(invalid="ignore"):
            gS = np.where(ps != 0, ps * (lps - lpt - S[:, None]), 0.0)
    else:
        m = beta * pt + (1 - beta) * ps
        with np.errstate(divide="ignore"):
            lm = np.log(m)
        klsm = _plogq(ps, lps, lm).sum(1)
        S = beta * _plogq(pt, lpt, lm).sum(1) + (1 - beta) * klsm
        with np.errstate(invalid="ignore"):
            gS = np.where(ps != 0, (1 - beta) * ps * (lps - lm - klsm[:, None]), 0.0)
    a = soft_weight * (T * T if scale_by_t2 else 1.0)
    loss = a * S if a else np.zeros(n)  # a term of weight 0 is left out (NaN, inf)
    grad = a * gS / T if a else np.zeros_like(s)
    counted = np.ones(n, bool)
    if targets is not None:
        t = np.asarray(targets).reshape(-1).astype(np.int64)
        counted = t != ignore_index
        if hard_weight:
            lsm = _log_softmax(s)
            tc = np.where(counted, t, 0)
            H = -lsm[np.arange(n), tc]
            loss = loss + hard_weight * H
            hg = np.exp(lsm)
            hg[np.arange(n), tc] -= 1.0
            grad = grad + hard_weight * hg
    loss = np.where(counted, loss, 0.0)
    grad = np.where(counted[:, None], grad, 0.0)
    count = int(counted.sum())
    if reduction == "none":
        g = 1.0 if grad_output is None else float(grad_output) if np.ndim(grad_output) == 0 \
            else to_float64(grad_output).reshape(-1)
        grad = grad * (g[:, None] if np.ndim(g) else g)
        return loss.reshape(shape[:-1]), grad.reshape(shape)
    den = {"sum": 1.0, "batchmean": float(count), "mean": float(count * nclass)}[reduction]
    g = 1.0 if grad_output is None else float(np.asarray(grad_output, np.float64).reshape(-1)[0])
    total = loss.sum()
    red = total / den if den else 0.0
    coef = g / den if den else 0.0
    return red, (grad * coef).reshape(shape)


def test_reference_matches_the_shared_reference(rng):
    """The reference above agrees with tests/reference_distill.py (once that exists)."""
    path = os.path.join(os.path.dirname(__file__), "reference_distill.py")
    if not os.path.exists(path):
        pytest.skip("tests/reference_distill.py does not exist yet")
    spec = importlib.util.spec_from_file_location("reference_distill", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn = getattr(mod, "distill_reference", None)
    if fn is None:
        pytest.skip("tests/reference_distill.py has no distill_reference")
    s = rng.standard_normal((4, 11)) * 2
    t = rng.standard_normal((4, 11)) * 2
    tg = np.array([1, -100, 3, 10])
    for kw in (dict(kind="kl", temperature=2.0), dict(kind="reverse_kl"),
               dict(kind="jsd", beta=0.3, scale_by_t2=True, temperature=1.5),
               dict(kind="kl", hard_weight=0.5, soft_weight=0.7, reduction="mean")):
        mine = _reference(s, t, tg if kw.get("hard_weight") else None, **kw)
        try:
            theirs = fn(s, t, targets=tg if kw.get("hard_weight") else None, **kw)
        except TypeError:
            pytest.skip("tests/reference_distill.py has another signature")
        np.testing.assert_allclose(np.asarray(theirs[0], np.float64), mine[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(theirs[1], np.float64), mine[1], rtol=1e-10, atol=1e-14)
    idx, lp = make_topk(rng, (4,), 11, 3, np.float64)
    for kw in (dict(kind="kl", temperature=0.8), dict(kind="jsd", beta=0.6, reduction="none")):
        mine = _reference(s, (idx, lp), **kw)
        theirs = fn(s, mod.topk_to_dense(idx, lp, 11), **kw)
        np.testing.assert_allclose(np.asarray(theirs[0], np.float64), mine[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(theirs[1], np.float64), mine[1], rtol=1e-10, atol=1e-14)


def test_reference_matches_torch(rng):
    """The reference's kl against torch.nn.functional.kl_div and autograd."""
    torch = pytest.importorskip("torch")
    s = rng.standard_normal((3, 9)) * 2
    t = rng.standard_normal((3, 9)) * 2
    T = 1.7
    st = torch.tensor(s, requires_grad=True)
    loss = torch.nn.functional.kl_div(torch.log_softmax(st / T, -1), torch.log_softmax(
        torch.tensor(t) / T, -1), reduction="batchmean", log_target=True) * T * T
    loss.backward()
    ref_loss, ref_grad = _reference(s, t, kind="kl", temperature=T, scale_by_t2=True)
    np.testing.assert_allclose(ref_loss, loss.item(), rtol=1e-12)
    np.testing.assert_allclose(ref_grad, st.grad.numpy(), rtol=1e-10, atol=1e-14)


# --- helpers -------------------------------------------------------------------------

_fast_thread_switching = pytest.fixture(autouse=True, scope="module")(fast_thread_switching)


@pytest.fixture
def host_api(monkeypatch):
    """Small blocks (``use_small_blocks``); the CUDA host module."""
    use_small_blocks(monkeypatch)
    from fastloss.cuda import distill_host
    return distill_host


def make_topk(rng, rows_shape, nclass, k, dtype=np.float32):
    """Distinct indices per row and arbitrary log-probabilities (normalised by the kernel)."""
    n = int(np.prod(rows_shape))
    idx = np.stack([rng.permutation(nclass)[:k] for _ in range(n)]).reshape(rows_shape + (k,))
    lp = (rng.standard_normal(rows_shape + (k,)) * 2 - 1).astype(dtype)
    return idx.astype(np.int64), lp


def make_targets(rng, rows_shape, nclass, ignore_index=-100):
    t = rng.integers(0, nclass, rows_shape).astype(np.int64)
    t.reshape(-1)[0] = ignore_index  # one ignored token (never all)
    return t


def check_with_grad(api, s, teacher, targets, kw, rtol, gtol, acc, grad_output=None):
    """``api.distill_with_grad`` on device copies of the host inputs (``teacher``
    dense, or a top-k pair), checked against the reference."""
    go = host(grad_output) if is_device_array(grad_output) else grad_output
    ref_loss, ref_grad = _reference(s, teacher, targets, grad_output=go, **kw)
    tdev = (dev(teacher[0]), dev(teacher[1])) if isinstance(teacher, tuple) else dev(teacher)
    loss, grad = api.distill_with_grad(dev(s), tdev, None if targets is None else dev(targets),
                                       make_opts(**kw), grad_output, None, False)
    check(loss, grad, ref_loss, ref_grad, rtol, gtol, acc)


def check(loss, grad, ref_loss, ref_grad, rtol, gtol, acc):
    loss_h = to_float64(host(loss))
    if np.ndim(ref_loss):
        assert loss.shape == np.shape(ref_loss)
        np.testing.assert_allclose(loss_h, ref_loss, rtol=rtol, atol=1e-6)
    else:
        assert loss.shape == (1,)
        np.testing.assert_allclose(loss_h[0], ref_loss, rtol=rtol, atol=1e-6)
    assert loss.dtype == acc
    if grad is not None:
        g = to_float64(host(grad))
        scale = max(1.0, float(np.nanmax(np.abs(ref_grad))))
        np.testing.assert_allclose(g, ref_grad, rtol=0, atol=gtol * scale + 1e-30)


# --- the cases ---------------------------------------------------------------------------

CASES = [
    pytest.param((3, 37), dict(kind="kl"), False, id="kl-batchmean"),
    pytest.param((3, 37), dict(kind="reverse_kl", temperature=2.0, scale_by_t2=True), False,
                 id="rkl-T2-t2"),
    pytest.param((2, 5, 19), dict(kind="jsd", beta=0.3, temperature=0.7, reduction="sum"), False,
                 id="jsd-sum-3d"),
    pytest.param((3, 37), dict(kind="kl", temperature=1.5, reduction="mean", hard_weight=0.4,
                               soft_weight=0.8), True, id="kl-mean-hard"),
    pytest.param((2, 5, 19), dict(kind="jsd", beta=0.6, reduction="none", hard_weight=1.0,
                                  ignore_index=-1), True, id="jsd-none-hard-ign"),
    pytest.param((3, 37), dict(kind="jsd", beta=0.0, reduction="sum"), False, id="jsd-beta0"),
    pytest.param((3, 37), dict(kind="jsd", beta=1.0), False, id="jsd-beta1"),
]


@sim
@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
@pytest.mark.parametrize("shape, kw, with_targets", CASES)
def test_dense_matches_reference(host_api, rng, dtype, rtol, gtol, shape, kw, with_targets):
    s = (rng.standard_normal(shape) * 2).astype(dtype)
    t = (rng.standard_normal(shape) * 2).astype(dtype)
    tg = make_targets(rng, shape[:-1], shape[-1], kw.get("ignore_index", -100)) if with_targets else None
    opts = make_opts(**kw)
    ref_loss, ref_grad = _reference(s, t, tg, **kw)
    acc = np.float64 if dtype == np.float64 else np.float32
    loss = host_api.distill(dev(s), dev(t), None if tg is None else dev(tg), opts)
    check(loss, None, ref_loss, None, rtol, gtol, acc)
    loss, grad = host_api.distill_with_grad(dev(s), dev(t), None if tg is None else dev(tg), opts,
                                            None, None, False)
    assert is_device_array(loss) and is_device_array(grad)
    assert grad.shape == s.shape and grad.dtype == s.dtype
    check(loss, grad, ref_loss, ref_grad, rtol, gtol, acc)


TOPK_CASES = [
    pytest.param((3, 37), 5, dict(kind="kl", temperature=2.0), False, id="kl-k5"),
    pytest.param((2, 5, 19), 19, dict(kind="kl", reduction="sum"), False, id="kl-k=V"),
    pytest.param((3, 37), 11, dict(kind="jsd", beta=0.4, reduction="none", hard_weight=0.5), True,
                 id="jsd-k11-hard-none"),
    pytest.param((2, 5, 19), 1, dict(kind="jsd", beta=0.7, temperature=0.5, scale_by_t2=True,
                                     reduction="mean"), False, id="jsd-k1-mean"),
    pytest.param((3, 37), 7, dict(kind="kl", hard_weight=1.0, soft_weight=0.5), True,
                 id="kl-k7-hard"),
]


@sim
@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
@pytest.mark.parametrize("shape, k, kw, with_targets", TOPK_CASES)
def test_topk_matches_reference(host_api, rng, dtype, rtol, gtol, shape, k, kw, with_targets):
    s = (rng.standard_normal(shape) * 2).astype(dtype)
    idx, lp = make_topk(rng, shape[:-1], shape[-1], k, dtype)
    tg = make_targets(rng, shape[:-1], shape[-1]) if with_targets else None
    if tg is not None:  # a target among the teacher's entries, and one off them
        tg.reshape(-1)[1] = idx.reshape(-1, k)[1, 0]
    opts = make_opts(**kw)
    ref_loss, ref_grad = _reference(s, (idx, lp), tg, **kw)
    acc = np.float64 if dtype == np.float64 else np.float32
    tdev = None if tg is None else dev(tg)
    loss = host_api.distill(dev(s), (dev(idx), dev(lp)), tdev, opts)
    check(loss, None, ref_loss, None, rtol, gtol, acc)
    x = dev(s)  # in place: the top-k entries are read before the row is overwritten
    loss, grad = host_api.distill_with_grad(x, (dev(idx), dev(lp)), tdev, opts, None, None, True)
    assert grad is x
    check(loss, grad, ref_loss, ref_grad, rtol, gtol, acc)


@sim
@pytest.mark.parametrize("tpb", [1, 3, 32])
def test_block_sizes(monkeypatch, rng, tpb):
    """One-thread and odd blocks, more threads than classes; 32 takes the
    shuffle reductions (emulated in the simulator)."""
    monkeypatch.setattr(fastloss.config, "CUDA_THREADS_PER_BLOCK", tpb)
    monkeypatch.setattr(fastloss.config, "CUDA_GRID_LIMIT", 2)
    from fastloss.cuda import distill_host
    s = rng.standard_normal((3, 13)) * 2
    t = rng.standard_normal((3, 13)) * 2
    s[1, :6] = -np.inf  # masked student entries: forward KL is inf there unless the teacher is too
    t[1, :6] = -np.inf
    kw = dict(kind="jsd", beta=0.25, reduction="sum", temperature=1.3)
    check_with_grad(distill_host, s, t, None, kw, 1e-10, 1e-12, np.float64)
    idx, lp = make_topk(rng, (3,), 13, 4, np.float64)
    kw = dict(kind="kl", reduction="none", temperature=0.9)
    check_with_grad(distill_host, s, (idx, lp), None, kw, 1e-10, 1e-12, np.float64)


@sim
def test_mixed_dtypes_and_grad_output(host_api, rng):
    """A float16 student with a float32 teacher; grad_output scalar, device scalar, per row."""
    s = (rng.standard_normal((4, 19)) * 2).astype(np.float16)
    t = (rng.standard_normal((4, 19)) * 2).astype(np.float32)
    tg = np.array([3, -100, 0, 18])
    for red, go in (("batchmean", 0.5), ("sum", dev(np.array([2.0]))),
                    ("none", rng.uniform(-1, 2, 4)), ("none", 3.0)):
        kw = dict(kind="kl", temperature=2.0, reduction=red, hard_weight=0.3)
        check_with_grad(host_api, s, t, tg, kw, 2e-5, 1e-3, np.float32, grad_output=go)


@sim
def test_float64_teacher_accumulates_in_float64(host_api, rng):
    s = rng.standard_normal((3, 5)).astype(np.float32)
    t = rng.standard_normal((3, 5))
    loss = host_api.distill(dev(s), dev(t), None, make_opts(kind="reverse_kl"))
    assert loss.dtype == np.float64
    np.testing.assert_allclose(host(loss)[0], _reference(s, t, kind="reverse_kl")[0], rtol=1e-7)


@sim
def test_out_and_poisoned_buffer(host_api, rng):
    """out= receives every element (NaN-poisoned first); out overlapping the student is refused."""
    s = (rng.standard_normal((3, 37)) * 2).astype(np.float32)
    t = (rng.standard_normal((3, 37)) * 2).astype(np.float32)
    tg = np.array([1, -100, 36])
    kw = dict(kind="reverse_kl", hard_weight=0.5)
    out = dev(np.full(s.shape, np.nan, np.float32))
    loss, grad = host_api.distill_with_grad(dev(s), dev(t), dev(tg), make_opts(**kw), None, out, False)
    assert grad is out
    ref_loss, ref_grad = _reference(s, t, tg, **kw)
    check(loss, grad, ref_loss, ref_grad, 2e-5, 2e-6, np.float32)
    assert not np.isnan(host(out)).any()
    big = dev(np.concatenate([s.reshape(-1), s[0]]))
    x, shifted = big[:s.size].reshape(3, 37), big[37:].reshape(3, 37)
    with pytest.raises(ValueError, match="out: overlaps student; pass inplace=True"):
        host_api.distill_with_grad(x, dev(t), None, make_opts(), None, shifted, False)
    with pytest.raises(ValueError, match="out: overlaps teacher"):
        host_api.distill_with_grad(dev(s), x, None, make_opts(), None, shifted, False)
    with pytest.raises(ValueError, match="teacher: shares memory with student"):
        host_api.distill_with_grad(x, shifted, None, make_opts(), None, None, True)


@sim
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16])
def test_strided_student_and_teacher(host_api, rng, dtype):
    """Strided 2-D student and teacher views are staged in contiguous buffers;
    in place, the gradient is copied back into the strided student."""
    big_s = (rng.standard_normal((3, 40)) * 2).astype(dtype)
    big_t = (rng.standard_normal((3, 45)) * 2).astype(dtype)
    s, t = big_s[:, 1:38], big_t[:, 3:40]
    tg = np.array([5, 0, -100])
    kw = dict(kind="jsd", beta=0.2, hard_weight=0.4, reduction="sum")
    ref_loss, ref_grad = _reference(s, t, tg, **kw)
    ds, dt = dev(big_s), dev(big_t)
    xs = ds[:, 1:38]
    assert not xs.is_c_contiguous()
    loss, grad = host_api.distill_with_grad(xs, dt[:, 3:40], dev(tg), make_opts(**kw), None, None, True)
    assert grad is xs
    gtol = 2e-6 if dtype == np.float32 else 8e-3
    check(loss, None, ref_loss, None, 2e-5, gtol, np.float32)
    full = host(ds)
    assert_grad = np.testing.assert_allclose
    scale = max(1.0, float(np.abs(ref_grad).max()))
    assert_grad(to_float64(full[:, 1:38]), ref_grad, rtol=0, atol=gtol * scale)
    np.testing.assert_array_equal(full[:, [0, 38, 39]], big_s[:, [0, 38, 39]])  # outside the view: untouched


@sim
def test_ignored_rows_and_empty(host_api, rng):
    """All tokens ignored: loss 0 and a zero gradient for every reduction; an empty batch."""
    s = (rng.standard_normal((2, 7)) * 2).astype(np.float32)
    t = (rng.standard_normal((2, 7)) * 2).astype(np.float32)
    tg = np.array([-100, -100])
    for red in ("batchmean", "mean", "sum", "none"):
        opts = make_opts(reduction=red, hard_weight=1.0)
        loss, grad = host_api.distill_with_grad(dev(s), dev(t), dev(tg), opts, None, None, False)
        assert np.all(host(loss) == 0)
        assert np.all(host(grad) == 0)
    e = np.zeros((0, 7), np.float32)
    loss, grad = host_api.distill_with_grad(dev(e), dev(e), None, make_opts(), None, None, False)
    assert host(loss).tolist() == [0.0] and grad.shape == (0, 7)


@sim
def test_topk_padding_entries(host_api, rng):
    """-inf logprobs mark padding entries: no teacher mass there (0 log 0 = 0)."""
    s = (rng.standard_normal((4, 19)) * 2).astype(np.float32)
    idx, lp = make_topk(rng, (4,), 19, 6)
    lp[0, 4:] = -np.inf
    lp[2, 0] = -np.inf
    for kw in (dict(kind="kl", temperature=1.5), dict(kind="jsd", beta=0.35, reduction="none")):
        assert np.all(np.isfinite(_reference(s, (idx, lp), **kw)[0]))
        check_with_grad(host_api, s, (idx, lp), None, kw, 2e-5, 2e-6, np.float32)


@sim
def test_nan_stays_in_its_row(host_api, rng):
    s = (rng.standard_normal((3, 11)) * 2).astype(np.float32)
    t = (rng.standard_normal((3, 11)) * 2).astype(np.float32)
    s[1, 4] = np.nan
    opts = make_opts(kind="jsd", reduction="none")
    loss, grad = host_api.distill_with_grad(dev(s), dev(t), None, opts, None, None, False)
    lh, gh = host(loss), host(grad)
    assert np.isnan(lh[1]) and np.isfinite(lh[[0, 2]]).all()
    assert np.isfinite(gh[[0, 2]]).all()


@sim
def test_bad_targets_and_teachers(host_api, rng):
    """Bad targets: the cross-entropy's asynchronous error (the simulator raises at
    once); bad or repeated top-k indices and all -inf rows (ignored rows are not
    checked); reverse KL with a top-k teacher; shapes and dtypes. The messages
    are the CPU backend's."""
    s = (rng.standard_normal((2, 6)) * 2).astype(np.float32)
    t = (rng.standard_normal((2, 6)) * 2).astype(np.float32)
    with pytest.raises(ValueError, match=r"targets: 1 value\(s\) outside \[0, 6\).*position \(1,\): 6"):
        host_api.distill(dev(s), dev(t), dev(np.array([0, 6])), make_opts(hard_weight=1.0))
    lp = rng.standard_normal((2, 3)).astype(np.float32)
    idx = np.array([[0, 1, 2], [3, 9, 4]])
    with pytest.raises(ValueError, match=r"teacher indices: 1 value\(s\) outside \[0, 6\); "
                       r"first at position \(1, 1\): 9"):
        host_api.distill_with_grad(dev(s), (dev(idx), dev(lp)), None, make_opts(), None, None, False)
    # the same row ignored: never read, not checked
    loss = host_api.distill(dev(s), (dev(idx), dev(lp)), dev(np.array([2, -100])), make_opts())
    ref = _reference(s, (np.array([[0, 1, 2], [0, 1, 2]]), lp), np.array([2, -100]))[0]
    np.testing.assert_allclose(host(loss)[0], ref, rtol=2e-5)
    idx = np.array([[0, 1, 2], [3, 5, 3]])
    with pytest.raises(ValueError, match=r"teacher indices: 1 row\(s\) repeat a class index; first at "
                       r"position \(1,\): 3"):
        host_api.distill(dev(s), (dev(idx), dev(lp)), None, make_opts())
    dead = lp.copy()
    dead[0] = -np.inf
    with pytest.raises(ValueError, match=r"teacher logprobs: 1 row\(s\) have no finite entry \(all -inf\); "
                       r"first at position \(0,\)"):
        host_api.distill(dev(s), (dev(np.array([[0, 1, 2], [3, 4, 5]])), dev(dead)), None, make_opts())
    for kw in (dict(kind="reverse_kl"), dict(kind="jsd", beta=1.0)):
        with pytest.raises(ValueError, match="teacher: reverse_kl needs a dense teacher"):
            host_api.distill(dev(s), (dev(idx), dev(lp)), None, make_opts(**kw))
    with pytest.raises(ValueError, match=r"teacher: vocabulary size 5 differs from the student's 6"):
        host_api.distill(dev(s), dev(t[:, :5].copy()), None, make_opts())
    with pytest.raises(ValueError, match=r"teacher: expected the student's shape \(2, 6\), found \(12,\)"):
        host_api.distill(dev(s), dev(t.reshape(-1)), None, make_opts())
    with pytest.raises(ValueError, match=r"teacher: a top-k teacher is a 2-tuple"):
        host_api.distill(dev(s), (dev(idx), dev(lp), dev(lp)), None, make_opts())
    with pytest.raises(ValueError, match=r"teacher indices: expected shape \(2, 'k'\)"):
        host_api.distill(dev(s), (dev(idx.reshape(-1)), dev(lp.reshape(-1))), None, make_opts())
    with pytest.raises(ValueError, match="teacher logprobs: expected the shape of teacher indices"):
        host_api.distill(dev(s), (dev(idx), dev(lp[:, :2].copy())), None, make_opts())
    with pytest.raises(TypeError, match="teacher indices: expected an integer dtype"):
        host_api.distill(dev(s), (dev(lp), dev(lp)), None, make_opts())
    with pytest.raises(TypeError, match="teacher: expected dtype"):
        host_api.distill(dev(s), dev(idx[:, [0, 1, 2, 0, 1, 2]]), None, make_opts())
    with pytest.raises(TypeError, match="student: expected dtype"):
        host_api.distill(dev(idx), dev(t[:, :3].copy()), None, make_opts())


@sim
def test_soft_weight_zero_leaves_the_divergence_out(host_api, rng):
    """soft_weight 0: the hard term alone, even where the divergence is inf
    (a student -inf where the teacher has mass)."""
    s = (rng.standard_normal((3, 7)) * 2).astype(np.float32)
    t = (rng.standard_normal((3, 7)) * 2).astype(np.float32)
    s[0, 2] = -np.inf
    tg = np.array([1, 4, -100])
    kw = dict(soft_weight=0.0, hard_weight=0.7, reduction="sum")
    assert np.isfinite(_reference(s, t, tg, **kw)[0])
    check_with_grad(host_api, s, t, tg, kw, 2e-5, 2e-6, np.float32)


@sim
def test_hard_weight_without_targets_has_no_hard_term(host_api, rng):
    s = (rng.standard_normal((3, 7)) * 2).astype(np.float32)
    t = (rng.standard_normal((3, 7)) * 2).astype(np.float32)
    loss, grad = host_api.distill_with_grad(dev(s), dev(t), None, make_opts(hard_weight=1.0), None, None, False)
    ref_loss, ref_grad = _reference(s, t)  # no hard term
    check(loss, grad, ref_loss, ref_grad, 2e-5, 2e-6, np.float32)


@sim
def test_topk_errors_are_raised_without_waiting(host_api, rng, monkeypatch):
    """The top-k checks join the one queue of asynchronous checks
    (``fastloss.cuda.checks``): while the events have not completed (as on a
    GPU that has not caught up; patched here) the call returns a NaN loss and
    writes no gradient; the error, worded from the kernel's numbers alone (the
    indices may have changed since), comes from ``fastloss.cuda.synchronize()``
    or the next call; ``CUDA_SYNC_CHECKS`` makes the call itself raise it."""
    import fastloss.cuda
    from fastloss.cuda import checks
    s = (rng.standard_normal((3, 6)) * 2).astype(np.float32)
    lp = rng.standard_normal((3, 4)).astype(np.float32)
    good = np.array([[0, 1, 2, 3], [2, 3, 4, 5], [0, 1, 2, 3]])
    monkeypatch.setattr(checks, "event_done", lambda event: False)
    x = dev(s)
    idx = dev(np.array([[0, 1, 2, 3], [5, 4, 5, 4], [2, 3, 4, 5]]))  # row 1 repeats 5 and 4
    loss, grad = host_api.distill_with_grad(x, (idx, dev(lp)), None, make_opts(), None, None, True)
    assert grad is x and np.isnan(host(loss)).all()
    np.testing.assert_array_equal(host(x), s)  # in place, flagged: untouched
    idx.copy_to_device(good)  # changed before the check is read: the message does not look
    with pytest.raises(ValueError, match=r"teacher indices: 1 row\(s\) repeat a class index; first at "
                                         r"position \(1,\): 4 \(an earlier GPU call"):
        fastloss.cuda.synchronize()
    fastloss.cuda.synchronize()  # settled: nothing left to raise
    big = np.array([[0, 1, 2, 3], [1, 2**64 - 1, 3, 2**63], [0, 1, 2, 3]], np.uint64)
    loss = host_api.distill(dev(s), (dev(big), dev(lp)), None, make_opts(reduction="none"))
    assert np.isnan(host(loss)).all()
    monkeypatch.setattr(checks, "event_done", lambda event: True)
    with pytest.raises(ValueError, match=r"teacher indices: 2 value\(s\) outside \[0, 6\); first at "
                                         r"position \(1, 1\): 18446744073709551615 \(an earlier GPU call"):
        host_api.distill(dev(s), (dev(good), dev(lp)), None, make_opts())  # raises the earlier error
    host_api.distill(dev(s), (dev(good), dev(lp)), None, make_opts())  # and only once
    monkeypatch.setattr(checks, "event_done", lambda event: False)
    monkeypatch.setattr(fastloss.config, "CUDA_SYNC_CHECKS", True)  # waits: raised by the call itself
    dead = lp.copy()
    dead[2] = -np.inf
    with pytest.raises(ValueError, match=r"teacher logprobs: 1 row\(s\) have no finite entry \(all -inf\); "
                                         r"first at position \(2,\)$"):
        host_api.distill(dev(s), (dev(good), dev(dead)), None, make_opts())
