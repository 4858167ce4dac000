"""fastloss.linear_cross_entropy(_with_grad) against PyTorch autograd (F.linear +
F.cross_entropy, F.linear_cross_entropy) in float64 and against tests/reference.py's
ce_reference applied to float64 logits, chained by hand (grad_hidden = G @ W,
grad_W = G.T @ H, grad_b = G.sum(0))."""

import importlib.util
import pathlib
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss import config
from fastloss.ops import _linear as linear_ops
from fastloss.ops._linear import LinearSweep

_spec = importlib.util.spec_from_file_location("lce_reference", pathlib.Path(__file__).with_name("reference.py"))
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

BF16 = np.dtype(ml_dtypes.bfloat16)


def _inputs(n, d, v, dtype=np.float64, seed=0, ignore=0.2, lead=None):
    rng = np.random.default_rng(seed)
    shape = (n,) if lead is None else lead
    h = (rng.standard_normal(shape + (d,)) / np.sqrt(d) * 3).astype(dtype)
    w = rng.standard_normal((v, d)).astype(dtype)
    b = rng.standard_normal(v).astype(dtype)
    t = rng.integers(0, v, shape)
    t[rng.random(shape) < ignore] = -100
    return h, w, b, t


def _hand_reference(h, w, b, t, grad_output=None, **kw):
    """ce_reference on the float64 logits, chained to hidden/weight/bias."""
    h64, w64 = R.to_float64(h), R.to_float64(w)
    d = h64.shape[-1]
    logits = h64 @ w64.T + (0 if b is None else R.to_float64(b))
    loss, g = R.ce_reference(logits, t, grad_output=grad_output, **kw)
    g2 = g.reshape(-1, w64.shape[0])
    gh = (g2 @ w64).reshape(h64.shape)
    gw = g2.T @ h64.reshape(-1, d)
    gb = None if b is None else g2.sum(0)
    return loss, gh, gw, gb


def _torch_reference(h, w, b, t, reduction="mean", fused=False, **kw):
    th = torch.tensor(R.to_float64(h), requires_grad=True)
    tw = torch.tensor(R.to_float64(w), requires_grad=True)
    tb = None if b is None else torch.tensor(R.to_float64(b), requires_grad=True)
    tt = torch.from_numpy(np.asarray(t, np.int64))
    if "weight" in kw and kw["weight"] is not None:
        kw["weight"] = torch.tensor(kw["weight"], dtype=torch.float64)
    if fused:
        loss = F.linear_cross_entropy(th.reshape(-1, th.shape[-1]), tw, tt.reshape(-1), linear_bias=tb,
                                      reduction=reduction, **kw)
        if reduction == "none":
            loss = loss.reshape(tt.shape)
    else:
        logits = F.linear(th, tw, tb)
        loss = F.cross_entropy(logits.reshape(-1, tw.shape[0]), tt.reshape(-1), reduction=reduction, **kw)
        if reduction == "none":
            loss = loss.reshape(tt.shape)
    loss.sum().backward()
    out = loss.detach().numpy()
    return (float(out) if reduction != "none" else out, th.grad.numpy(), tw.grad.numpy(),
            None if tb is None else tb.grad.numpy())


def _check(res, want, rtol, atol):
    loss, gh, gw, gb = want
    np.testing.assert_allclose(np.asarray(res.loss, np.float64), loss, rtol=rtol, atol=atol)
    np.testing.assert_allclose(R.to_float64(res.grad_hidden), gh, rtol=rtol, atol=atol)
    np.testing.assert_allclose(R.to_float64(res.grad_weight), gw, rtol=rtol, atol=atol)
    if gb is None:
        assert res.grad_bias is None
    else:
        np.testing.assert_allclose(R.to_float64(res.grad_bias), gb, rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk", [None, 1, 5, 16, 37, 100])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fused", [False, True])
def test_matches_torch_float64(chunk, use_bias, reduction, fused):
    h, w, b, t = _inputs(37, 29, 1001, seed=chunk or 0)
    b = b if use_bias else None
    res = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, reduction=reduction, chunk_size=chunk)
    _check(res, _torch_reference(h, w, b, t, reduction, fused=fused), 1e-10, 1e-12)
    fwd = fastloss.linear_cross_entropy(h, w, t, bias=b, reduction=reduction, chunk_size=chunk)
    np.testing.assert_allclose(fwd, res.loss, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kw", [
    dict(label_smoothing=0.1),
    dict(weight="rand"),
    dict(weight="rand", label_smoothing=0.2, ignore_index=3),
])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_options(kw, reduction):
    h, w, b, t = _inputs(37, 29, 1001, seed=4)
    kw = dict(kw)
    if kw.get("weight") == "rand":
        kw["weight"] = np.random.default_rng(1).random(1001) + 0.1
    if "ignore_index" in kw:
        t[t == -100] = kw["ignore_index"]
        t[::4] = kw["ignore_index"]
    res = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, reduction=reduction, chunk_size=7, **kw)
    for fused in (False, True):
        _check(res, _torch_reference(h, w, b, t, reduction, fused=fused, **kw), 1e-10, 1e-12)


@pytest.mark.parametrize("kw", [
    dict(z_loss=1e-3),
    dict(softcap=2.0),
    dict(logit_scale=0.5),
    dict(normalizer=64.0),
    dict(z_loss=1e-2, softcap=3.0, logit_scale=1.7, label_smoothing=0.1, weight="rand"),
    dict(z_loss=1e-2, softcap=3.0, normalizer=10.0, weight="rand"),
])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [1, 8, None])
def test_every_option_against_reference(kw, reduction, chunk):
    if "normalizer" in kw and reduction != "mean":
        pytest.skip("normalizer is mean-only")
    h, w, b, t = _inputs(37, 29, 1001, seed=5)
    kw = dict(kw)
    if kw.get("weight") == "rand":
        kw["weight"] = np.random.default_rng(2).random(1001) + 0.1
    go = np.random.default_rng(3).standard_normal(t.shape) if reduction == "none" else 0.7
    res = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, reduction=reduction,
                                                  grad_output=go, chunk_size=chunk, **kw)
    _check(res, _hand_reference(h, w, b, t, grad_output=go, reduction=reduction, **kw), 1e-10, 1e-12)
    fwd = fastloss.linear_cross_entropy(h, w, t, bias=b, reduction=reduction, chunk_size=chunk, **kw)
    np.testing.assert_allclose(fwd, res.loss, rtol=1e-12, atol=1e-13)


def test_nd_hidden_and_all_ignored_chunks():
    h, w, b, t = _inputs(0, 29, 1001, seed=6, lead=(3, 13))
    t[1] = -100  # a whole sequence ignored: several whole chunks of 4 ignored
    t[0, :9] = -100
    res = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, chunk_size=4, reduction="none")
    assert res.grad_hidden.shape == h.shape and res.loss.shape == t.shape
    assert np.all(res.grad_hidden[1] == 0) and np.all(res.loss[1] == 0)
    _check(res, _torch_reference(h, w, b, t, "none"), 1e-10, 1e-12)
    res = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, chunk_size=4)
    _check(res, _torch_reference(h, w, b, t, "mean"), 1e-10, 1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_and_empty(reduction):
    h, w, b, t = _inputs(9, 5, 11)
    t[:] = -100
    res = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, reduction=reduction, chunk_size=2)
    assert np.all(np.asarray(res.loss) == 0)
    assert not res.grad_hidden.any() and not res.grad_weight.any() and not res.grad_bias.any()
    e = fastloss.linear_cross_entropy_with_grad(h[:0], w, t[:0], bias=b, reduction=reduction)
    assert e.grad_hidden.shape == (0, 5) and not e.grad_weight.any()
    assert np.asarray(e.loss).size == (0 if reduction == "none" else 1)


@pytest.mark.parametrize("dtype, rtol, atol", [
    (np.float32, 2e-4, 2e-5),
    (np.float64, 1e-10, 1e-12),
    (BF16, 2e-2, 2e-2),       # inputs and gradients rounded to 8 bits of mantissa
    (np.float16, 4e-3, 2e-3),
])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dtypes(dtype, rtol, atol, use_bias):
    h, w, b, t = _inputs(37, 29, 1001, dtype=dtype, seed=7)
    b = b if use_bias else None
    res = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, chunk_size=10, reduction="sum")
    assert res.grad_hidden.dtype == dtype and res.grad_weight.dtype == dtype
    if use_bias:
        assert res.grad_bias.dtype == dtype
    loss, gh, gw, gb = _torch_reference(h, w, b, t, "sum")  # the rounded inputs, in float64
    scale = max(1.0, abs(loss))
    np.testing.assert_allclose(res.loss, loss, rtol=rtol)
    for got, want in ((res.grad_hidden, gh), (res.grad_weight, gw), (res.grad_bias, gb)):
        if want is not None:
            np.testing.assert_allclose(R.to_float64(got), want, rtol=rtol,
                                       atol=atol * np.abs(want).max())
    assert isinstance(res.loss, float) and scale > 0
    fwd = fastloss.linear_cross_entropy(h, w, t, bias=b, reduction="none", chunk_size=7)
    assert fwd.dtype == (np.float64 if dtype == np.float64 else np.float32)


def test_outputs_fully_written_and_inputs_untouched():
    h, w, b, t = _inputs(23, 8, 50, dtype=np.float32, ignore=0.0)
    copies = [a.copy() for a in (h, w, b, t)]
    r1 = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, chunk_size=6)
    for a, c in zip((h, w, b, t), copies):
        np.testing.assert_array_equal(a, c)
    assert np.all(np.isfinite(r1.grad_hidden)) and np.all(r1.grad_hidden != 0)
    # non-contiguous inputs give the same result
    hs = np.asfortranarray(h)
    ws = np.asfortranarray(w)
    r2 = fastloss.linear_cross_entropy_with_grad(hs, ws, t, bias=b, chunk_size=6)
    for x, y in zip(r1[1:], r2[1:]):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_auto_chunk_reads_budget(monkeypatch):
    h, w, b, t = _inputs(37, 29, 1001, seed=8)
    want = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, chunk_size=37)
    seen = []
    real = LinearSweep.chunks

    def spy(self):
        seen.append(self.chunk)
        return real(self)

    monkeypatch.setattr(LinearSweep, "chunks", spy)
    monkeypatch.setattr(config, "LINEAR_CE_LOGITS_BUDGET_BYTES", 1001 * 8 * 5)
    got = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b)
    assert seen[-1] <= 5
    _check(got, (want.loss, want.grad_hidden, want.grad_weight, want.grad_bias), 1e-12, 1e-13)
    monkeypatch.setattr(config, "LINEAR_CE_LOGITS_BUDGET_BYTES", 1)
    fastloss.linear_cross_entropy(h, w, t)
    assert seen[-1] == 1


def test_without_scipy_accumulation(monkeypatch):
    h, w, b, t = _inputs(37, 29, 1001, dtype=np.float32, seed=9)
    want = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, chunk_size=8)
    monkeypatch.setattr(linear_ops, "scipy_blas", lambda: None)
    got = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, chunk_size=8)
    np.testing.assert_allclose(got.grad_weight, want.grad_weight, rtol=1e-5, atol=1e-7)
    # grad_weight accumulated block by block (64-class blocks: 16 of them, the last partial)
    monkeypatch.setattr(fastloss.config, "LINEAR_CE_GRAD_WEIGHT_BLOCK_BYTES", 1)
    got = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, chunk_size=8)
    np.testing.assert_allclose(got.grad_weight, want.grad_weight, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.grad_hidden, want.grad_hidden, rtol=1e-5, atol=1e-7)
    assert got.loss == pytest.approx(want.loss, rel=1e-6)


def test_non_contiguous_head_and_hidden():
    """Strided inputs take the same BLAS path (copied once to C order), same results."""
    h, w, b, t = _inputs(37, 29, 1001, dtype=np.float32, seed=12)
    want = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, chunk_size=8)
    hs = np.zeros((37, 58), np.float32)[:, ::2]
    hs[...] = h
    ws = np.asfortranarray(w)
    got = fastloss.linear_cross_entropy_with_grad(hs, ws, t, bias=b, chunk_size=8)
    np.testing.assert_allclose(got.grad_weight, want.grad_weight, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.grad_hidden, want.grad_hidden, rtol=1e-5, atol=1e-7)
    assert got.loss == pytest.approx(want.loss, rel=1e-6)


def test_peak_memory_far_below_logits():
    n, d, v = 2048, 32, 32000
    h, w, b, t = _inputs(n, d, v, dtype=np.float32, seed=10, ignore=0.05)
    fastloss.linear_cross_entropy_with_grad(h[:4], w, t[:4], chunk_size=2)  # compile outside
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        res = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, chunk_size=128)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    outputs = res.grad_hidden.nbytes + res.grad_weight.nbytes + res.grad_bias.nbytes
    assert peak - outputs < 0.1 * n * v * 4, (peak, outputs)
    # and the loss is right
    assert res.loss == pytest.approx(fastloss.cross_entropy(h @ w.T + b, t), rel=1e-4)


def test_chunk_rows_evened_out_and_rounded(monkeypatch):
    """The default chunk: the budget's rows (179 here) evened out over the chunks
    (1000 tokens: 6 chunks of 167), rounded up to the BLAS row blocking (176) for
    the linear cross-entropy, left at 167 with ``multiple=1`` (linear distillation)."""
    monkeypatch.setattr(config, "LINEAR_CE_LOGITS_BUDGET_BYTES", 179 * 1000 * 4)
    assert linear_ops.chunk_rows(None, 1000, 1000, 4) == 176
    assert linear_ops.chunk_rows(None, 1000, 1000, 4, multiple=1) == 167
    assert linear_ops.chunk_rows(None, 100, 1000, 4) == 100
    assert linear_ops.chunk_rows(None, 0, 1000, 4) == 1
    assert linear_ops.chunk_rows(7, 1000, 1000, 4) == 7
    monkeypatch.setattr(config, "LINEAR_CE_LOGITS_BUDGET_BYTES", 20 * 1000 * 4)  # under 32 rows: no rounding
    assert linear_ops.chunk_rows(None, 1000, 1000, 4) == 20


def test_default_chunk_meets_the_five_percent_budget(monkeypatch):
    """chunk_size=None: the buffer is the budget's worth of rows, so at the issue's
    shape (4096 tokens, V = 128256) it stays under 5% of the float32 logits; and the
    whole call allocates little beyond the buffer (budget scaled to a small case)."""
    rows = linear_ops.chunk_rows(None, 4096, 128256, 4)
    assert rows * 128256 * 4 <= fastloss.config.LINEAR_CE_LOGITS_BUDGET_BYTES
    assert rows * 128256 * 4 < 0.05 * 4096 * 128256 * 4 and rows >= 128
    n, d, v = 2048, 32, 32000
    h, w, b, t = _inputs(n, d, v, dtype=np.float32, seed=11, ignore=0.05)
    monkeypatch.setattr(fastloss.config, "LINEAR_CE_LOGITS_BUDGET_BYTES", int(0.04 * n * v * 4))
    fastloss.linear_cross_entropy_with_grad(h[:4], w, t[:4])  # compile outside
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        res = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    outputs = res.grad_hidden.nbytes + res.grad_weight.nbytes + res.grad_bias.nbytes
    assert peak - outputs < 0.05 * n * v * 4, (peak, outputs)


lce, lceg = fastloss.linear_cross_entropy, fastloss.linear_cross_entropy_with_grad


@pytest.mark.parametrize("call, exc, match", [
    (lambda h, w, b, t: lce(h.astype(np.int32), w, t), TypeError, "hidden: expected dtype"),
    (lambda h, w, b, t: lce(h[0, 0], w, t), ValueError, "hidden: expected shape"),
    (lambda h, w, b, t: lce(h, w[:, :3], t), ValueError, r"lm_head: expected shape \(V, 5\)"),
    (lambda h, w, b, t: lce(h, w[0], t), ValueError, "lm_head: expected shape"),
    (lambda h, w, b, t: lce(h, w[:0], t), ValueError, "lm_head: expected at least one row"),
    (lambda h, w, b, t: lce(h, w.astype(np.float32), t), TypeError, "lm_head: expected the dtype of hidden"),
    (lambda h, w, b, t: lce(h, w, t[:2]), ValueError, r"targets: expected shape \(4,\) \(hidden"),
    (lambda h, w, b, t: lce(h, w, t.astype(float)), TypeError, "targets: expected an integer dtype"),
    (lambda h, w, b, t: lce(h, w, t + 20), ValueError, r"targets: \d+ value\(s\) outside \[0, 11\)"),
    (lambda h, w, b, t: lce(h, w, t, bias=b[:3]), ValueError, r"bias: expected shape \(11,\)"),
    (lambda h, w, b, t: lce(h, w, t, bias=b.astype(int)), TypeError, "bias: expected dtype"),
    (lambda h, w, b, t: lce(h, w, t, chunk_size=0), ValueError, "chunk_size: expected a positive integer, found 0"),
    (lambda h, w, b, t: lce(h, w, t, chunk_size=2.0), TypeError, "chunk_size: expected a positive integer or None"),
    (lambda h, w, b, t: lce(h, w, t, chunk_size=True), TypeError, "chunk_size"),
    (lambda h, w, b, t: lce(h, w, t, weight=np.ones(5)), ValueError, r"weight: expected shape \(11,\)"),
    (lambda h, w, b, t: lce(h, w, t, reduction="avg"), ValueError, "reduction: expected one of"),
    (lambda h, w, b, t: lce(h, w, t, z_loss=-1), ValueError, "z_loss"),
    (lambda h, w, b, t: lce(h, w, t, normalizer=2.0, reduction="sum"), ValueError, "normalizer: only used"),
    (lambda h, w, b, t: lceg(h, w, t, grad_output=np.ones(3)), ValueError, "grad_output: expected a scalar"),
    (lambda h, w, b, t: lceg(h, w, t, reduction="none", grad_output=np.ones(3)), ValueError,
     r"grad_output: expected a scalar or shape \(4,\)"),
])
def test_errors_name_the_argument(call, exc, match):
    h, w, b, t = _inputs(4, 5, 11, ignore=0.0)
    with pytest.raises(exc, match=match):
        call(h, w, b, t)


def test_head_is_positional_only_and_weight_is_class_weight():
    h, w, b, t = _inputs(6, 5, 11, ignore=0.0)
    with pytest.raises(TypeError):
        fastloss.linear_cross_entropy(h, lm_head=w, targets=t)
    cw = np.linspace(0.5, 2.0, 11)
    got = fastloss.linear_cross_entropy(h, w, targets=t, weight=cw)
    assert got == pytest.approx(_torch_reference(h, w, None, t, weight=cw)[0], rel=1e-12)


def test_bench_case_providers_agree():
    from fastloss.bench import cases as C

    case = C.Case("lce", (64, 32, 500), "float32", "fwd+bwd")
    assert case.name == "lce-fwd+bwd-64x32x500-float32" and case.flops == 6 * 64 * 32 * 500
    assert C.providers_for(case) == list(C.LCE_PROVIDERS)
    assert [c.shape for c in C.linear_ce_cases()] == [(4096, 1024, 128256)]
    inputs = C.make_inputs(case)
    ref = C.build(case, inputs, "fastloss").fn()
    for provider in C.LCE_PROVIDERS[1:]:
        ret = C.build(case, inputs, provider).fn()
        if provider != "blas-floor":
            assert C.loss_value(ret, case.mode) == pytest.approx(ref[0], rel=1e-5)
            for a, b in zip(ret[1:], ref[1:]):
                np.testing.assert_allclose(C.grad_array((None, a)), b, rtol=1e-3, atol=1e-6)
    # linear CE is measured forward too (fastloss bench --small)
    fwd = C.Case("lce", (64, 32, 500), "float32", "forward")
    assert fwd.name == "lce-forward-64x32x500-float32"
    assert C.loss_value(C.build(fwd, inputs, "fastloss").fn(), fwd.mode) == pytest.approx(ref[0], rel=1e-5)
    with pytest.raises(ValueError, match="mode: expected one of"):
        C.Case("lce", (4, 3, 2), mode="backward")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_hidden_size(dtype, reduction):
    """D = 0: every logit is the bias (here 0), so the loss is ln V per counted
    token as in torch; grad_hidden and grad_weight are empty, grad_bias is the
    cross-entropy gradient of all-zero logits."""
    torch = pytest.importorskip("torch")
    h = np.zeros((3, 2, 0), dtype)
    w = np.zeros((7, 0), dtype)
    b = np.zeros(7, dtype)
    t = np.array([[0, 6], [-100, 3], [2, 2]])
    r = fastloss.linear_cross_entropy_with_grad(h, w, t, bias=b, reduction=reduction)
    want = torch.nn.functional.cross_entropy(torch.zeros(6, 7, dtype=torch.float64),
                                             torch.from_numpy(t.reshape(-1)), reduction=reduction)
    np.testing.assert_allclose(np.asarray(r.loss).reshape(-1), want.numpy().reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fastloss.linear_cross_entropy(h, w, t, reduction=reduction)).reshape(-1),
                               want.numpy().reshape(-1), rtol=1e-6)
    assert r.grad_hidden.shape == h.shape and r.grad_weight.shape == w.shape
    _, g = fastloss.cross_entropy_with_grad(np.zeros((3, 2, 7), dtype), t, reduction=reduction)
    np.testing.assert_allclose(r.grad_bias, g.reshape(-1, 7).sum(0), rtol=1e-6, atol=1e-7)
