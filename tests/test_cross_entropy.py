"""fastloss.cross_entropy / cross_entropy_with_grad / logsumexp against the float64
reference (tests/reference.py) and against PyTorch (float64, same input values).

Tolerances live next to each dtype in ``DTYPES``. Every comparison is made against
the reference evaluated on the *input values* upcast to float64, so the only error
allowed is fastloss's own: float32 (float64) accumulation and, for the gradient,
one rounding to the input dtype.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastloss
from reference import ce_reference, lse_reference, to_float64

BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class Tol:
    loss: float  # rtol of the loss (mean/sum float, or none array) vs float64
    grad: float  # rtol of each gradient element
    grad_atol: float  # atol of each gradient element, as a fraction of max |ref grad|
    tiny: float = 0.0  # absolute atol for rounding into the dtype's subnormal range


# dtype, tolerance. The loss is accumulated in float32 for every non-float64 dtype
# and returned in float32 (none) or as a Python float, so its tolerance is the
# float32 one; the gradient is rounded once to the input dtype, so its rtol is
# about one unit roundoff of that dtype (bf16 2**-8 = 3.9e-3, f16 2**-11 = 4.9e-4).
# Observed worst errors (512x32000 and 37x1001, with and without softcap/z_loss/
# smoothing): loss f64 1.3e-15, f32/f16/bf16 1.7e-7; grad rel f64 1.3e-14,
# f32 1.9e-6, f16 4.9e-4 (normal range), bf16 3.9e-3.
DTYPES = [
    pytest.param(np.dtype(np.float64), Tol(loss=1e-13, grad=1e-12, grad_atol=1e-14), id="float64"),
    pytest.param(np.dtype(np.float32), Tol(loss=2e-6, grad=1e-5, grad_atol=1e-6), id="float32"),
    pytest.param(np.dtype(np.float16), Tol(loss=2e-6, grad=1e-3, grad_atol=1e-6, tiny=6e-8), id="float16"),
    pytest.param(BF16, Tol(loss=2e-6, grad=5e-3, grad_atol=1e-6), id="bfloat16"),
]
TOLS = {p.values[0]: p.values[1] for p in DTYPES}
REDUCTIONS = ["mean", "sum", "none"]
SHAPES = [
    pytest.param((512, 32000), id="512x32000"),
    pytest.param((37, 1001), id="37x1001"),
    pytest.param((3, 2), id="3x2"),
    pytest.param((1, 1), id="1x1"),
]


# ----------------------------------------------------------------------------- helpers


def make_logits(rng, shape, dtype, scale=3.0):
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return x.astype(dtype)


def make_targets(rng, shape, V, dtype=np.int64):
    return rng.integers(0, V, size=shape).astype(dtype)


def assert_loss_close(actual, desired, rtol, atol=0.0, what="loss"):
    a = to_float64(actual)
    d = to_float64(desired)
    assert a.shape == d.shape, f"{what}: shape {a.shape} != {d.shape}"
    np.testing.assert_allclose(a, d, rtol=rtol, atol=atol, err_msg=what, equal_nan=True)


def assert_grad_close(actual, desired, tol, what="grad"):
    a = to_float64(actual)
    d = to_float64(desired)
    assert a.shape == d.shape, f"{what}: shape {a.shape} != {d.shape}"
    finite = np.isfinite(d)
    # errors are measured against the row scale of the gradient; an all-zero
    # reference (V=1, ...) is measured against 1
    scale = (float(np.abs(d[finite]).max()) if finite.any() else 0.0) or 1.0
    atol = tol.grad_atol * scale + tol.tiny
    with np.errstate(invalid="ignore"):
        ok = np.abs(a - d) <= atol + tol.grad * np.abs(d)  # cheap pre-check for big arrays
    if not ok.all() or not finite.all():
        np.testing.assert_allclose(a, d, rtol=tol.grad, atol=atol, err_msg=what, equal_nan=True)


def torch_ce(logits, targets, *, grad_output=None, **kw):
    """PyTorch float64 cross-entropy + backward on the (upcast) input values."""
    x = torch.tensor(to_float64(logits), requires_grad=True)
    t = torch.tensor(np.asarray(targets).astype(np.int64))
    if kw.get("weight") is not None:
        kw["weight"] = torch.tensor(to_float64(kw["weight"]))
    loss = F.cross_entropy(x.reshape(-1, x.shape[-1]), t.reshape(-1), **kw)
    red = kw.get("reduction", "mean")
    if red == "none":
        loss = loss.reshape(t.shape)
        g = torch.ones(t.shape, dtype=torch.float64) if grad_output is None else torch.as_tensor(
            np.broadcast_to(np.asarray(grad_output, dtype=np.float64), t.shape).copy()
        )
        (loss * g).sum().backward()
        return loss.detach().numpy(), x.grad.numpy()
    g = 1.0 if grad_output is None else float(grad_output)
    (loss * g).backward()
    return float(loss.detach()), x.grad.numpy()


def check_result(loss, grad, logits, reduction, tol, ref_loss, ref_grad):
    """Type/dtype/shape rules of the contract plus closeness to (ref_loss, ref_grad)."""
    logits = np.asarray(logits)
    if reduction == "none":
        assert isinstance(loss, np.ndarray)
        want = np.float64 if logits.dtype == np.float64 else np.float32
        assert loss.dtype == want, f"none loss dtype {loss.dtype}, expected {want}"
        assert loss.shape == logits.shape[:-1]
    else:
        assert type(loss) is float, f"{reduction} loss is {type(loss)}, expected Python float"
    # loss = lse - z_t cancels when p_t ~ 1: allow a few ulps (in the accumulation
    # precision) of the logits' magnitude per token, on top of the relative tolerance
    x = to_float64(logits)
    fin = np.abs(x[np.isfinite(x)])
    mag = (float(fin.max()) if fin.size else 0.0) + np.log(max(logits.shape[-1], 1)) + 1.0
    acc = 2.0**-52 if logits.dtype == np.float64 else 2.0**-23
    ntok = max(int(np.prod(logits.shape[:-1])), 1) if reduction == "sum" else 1
    assert_loss_close(loss, ref_loss, tol.loss, atol=32 * acc * mag * ntok)
    if grad is not None:
        assert isinstance(grad, np.ndarray)
        assert grad.dtype == logits.dtype, f"grad dtype {grad.dtype} != logits dtype {logits.dtype}"
        assert grad.shape == logits.shape
        assert_grad_close(grad, ref_grad, tol)


def both(logits, targets, **kw):
    """Call cross_entropy and cross_entropy_with_grad; check they agree on the loss."""
    grad_kw = {k: kw.pop(k) for k in ("grad_output", "out", "inplace") if k in kw}
    loss_only = fastloss.cross_entropy(logits, targets, **kw)
    loss, grad = fastloss.cross_entropy_with_grad(logits, targets, **kw, **grad_kw)
    if kw.get("reduction", "mean") == "none":
        assert loss_only.dtype == loss.dtype
        np.testing.assert_allclose(loss_only, loss, rtol=1e-6, equal_nan=True)
    else:
        assert type(loss_only) is float
        np.testing.assert_allclose(loss_only, loss, rtol=1e-6, equal_nan=True)
    return loss, grad


# ------------------------------------------------ main grid: dtypes x shapes x reductions

@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_and_torch(rng, shape, dtype, tol):
    """Every reduction, loss and gradient, against the reference and torch."""
    logits = make_logits(rng, shape, dtype)
    targets = make_targets(rng, shape[:-1], shape[-1])
    before = logits.copy()
    for reduction in REDUCTIONS:
        loss, grad = both(logits, targets, reduction=reduction)
        check_result(loss, grad, logits, reduction, tol, *ce_reference(logits, targets, reduction=reduction))
        check_result(loss, grad, logits, reduction, tol, *torch_ce(logits, targets, reduction=reduction))
        del grad
    assert np.array_equal(logits.view(np.uint8), before.view(np.uint8)), "logits were modified"


# ---------------------------------------------- torch options: ignore_index/weight/smoothing

IGNORE_CASES = [
    pytest.param(None, id="ignore-default"),  # default -100, some targets are -100
    pytest.param(0, id="ignore-0"),  # inside [0, V): some targets are 0
    pytest.param(-1, id="ignore-minus1"),
    pytest.param(50000, id="ignore-50000"),  # outside [0, V), some targets are 50000
]


def _targets_with_ignored(rng, n, V, ignore_index):
    t = rng.integers(0, V, size=n)
    mark = rng.random(n) < 0.25
    if n >= 2:  # at least one ignored and at least one counted token
        mark[0], mark[1] = True, False
    t[mark] = -100 if ignore_index is None else ignore_index
    return t


@pytest.mark.parametrize("dtype,tol", [DTYPES[0], DTYPES[1]])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", IGNORE_CASES)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
def test_torch_options(rng, dtype, tol, reduction, ignore_index, weighted, label_smoothing):
    N, V = 37, 1001
    logits = make_logits(rng, (N, V), dtype)
    targets = _targets_with_ignored(rng, N, V, ignore_index)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    if ignore_index is not None:
        kw["ignore_index"] = ignore_index
    if weighted:
        kw["weight"] = (rng.random(V) * 2 + 0.1).astype(dtype)
    loss, grad = both(logits, targets, **kw)
    ref = ce_reference(logits, targets, **kw)
    check_result(loss, grad, logits, reduction, tol, *ref)
    check_result(loss, grad, logits, reduction, tol, *torch_ce(logits, targets, **kw))
    ignored = targets == (-100 if ignore_index is None else ignore_index)
    assert ignored.any()
    assert not np.asarray(grad)[ignored].any(), "ignored rows must have zero gradient"
    if reduction == "none":
        assert not loss[ignored].any(), "ignored positions must have loss 0"


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_weight_and_smoothing_half_dtypes(rng, dtype, tol):
    """The torch options also hold for every dtype (one combined case each)."""
    N, V = 64, 777
    logits = make_logits(rng, (N, V), dtype)
    targets = _targets_with_ignored(rng, N, V, 3)
    kw = dict(weight=rng.random(V) + 0.5, ignore_index=3, label_smoothing=0.2)
    for reduction in REDUCTIONS:
        loss, grad = both(logits, targets, reduction=reduction, **kw)
        check_result(loss, grad, logits, reduction, tol,
                     *ce_reference(logits, targets, reduction=reduction, **kw))
        check_result(loss, grad, logits, reduction, tol,
                     *torch_ce(logits, targets, reduction=reduction, **kw))


# ------------------------------------- options torch lacks: z_loss/softcap/logit_scale/normalizer

EXTRA_OPTIONS = [
    pytest.param(dict(z_loss=1e-4), id="zloss"),
    pytest.param(dict(z_loss=0.1), id="zloss-big"),
    pytest.param(dict(softcap=30.0), id="softcap30"),
    pytest.param(dict(softcap=2.0), id="softcap2"),
    pytest.param(dict(logit_scale=0.5), id="scale0.5"),
    pytest.param(dict(logit_scale=2.5), id="scale2.5"),
    pytest.param(dict(normalizer=1000.0), id="normalizer"),
    pytest.param(dict(z_loss=1e-3, softcap=5.0, logit_scale=1.7), id="zloss-softcap-scale"),
    pytest.param(dict(z_loss=1e-3, softcap=5.0, logit_scale=0.7, label_smoothing=0.1,
                      ignore_index=4, weighted=True), id="everything"),
    pytest.param(dict(z_loss=1e-3, normalizer=123.0, weighted=True, label_smoothing=0.05),
                 id="normalizer-zloss-weight"),
]


@pytest.mark.parametrize(
    "options,reduction",
    [
        pytest.param(p.values[0], r, id=f"{p.id}-{r}")
        for p in EXTRA_OPTIONS
        for r in REDUCTIONS
        if r == "mean" or "normalizer" not in p.values[0]  # normalizer: mean only
    ],
)
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_extra_options_vs_reference(rng, options, reduction, dtype, tol):
    options = dict(options)
    N, V = 29, 513
    logits = make_logits(rng, (N, V), dtype)
    ii = options.get("ignore_index", -100)
    targets = _targets_with_ignored(rng, N, V, ii)
    if options.pop("weighted", False):
        options["weight"] = rng.random(V) + 0.5
    loss, grad = both(logits, targets, reduction=reduction, **options)
    ref = ce_reference(logits, targets, reduction=reduction, **options)
    check_result(loss, grad, logits, reduction, tol, *ref)
    assert not grad[targets == ii].any()


def test_normalizer_shares_denominator_across_microbatches(rng):
    """Two micro-batches with normalizer=total count sum to the full-batch mean."""
    N, V = 40, 300
    logits = make_logits(rng, (N, V), np.float64)
    targets = _targets_with_ignored(rng, N, V, -100)
    count = int((targets != -100).sum())
    full, gfull = fastloss.cross_entropy_with_grad(logits, targets, z_loss=1e-3)
    l1, g1 = fastloss.cross_entropy_with_grad(logits[:15], targets[:15], z_loss=1e-3, normalizer=count)
    l2, g2 = fastloss.cross_entropy_with_grad(logits[15:], targets[15:], z_loss=1e-3, normalizer=count)
    np.testing.assert_allclose(l1 + l2, full, rtol=1e-12)
    np.testing.assert_allclose(np.concatenate([g1, g2]), gfull, rtol=1e-11, atol=1e-15)


def test_softcap_minus_inf_stays_masked(rng):
    """-inf logits stay -inf under softcap (tanh would otherwise map them to -softcap)."""
    x = make_logits(rng, (5, 50), np.float32)
    x[:, ::3] = -np.inf
    t = np.arange(5) * 3 + 1
    for kw in (dict(softcap=4.0), dict(softcap=4.0, logit_scale=2.0), dict(logit_scale=0.5)):
        loss, grad = both(x, t, reduction="none", **kw)
        ref_loss, ref_grad = ce_reference(x, t, reduction="none", **kw)
        check_result(loss, grad, x, "none", TOLS[np.dtype(np.float32)], ref_loss, ref_grad)
        assert np.all(grad[:, ::3] == 0)
        lse = fastloss.logsumexp(x, **kw)
        np.testing.assert_allclose(lse, lse_reference(x, **kw), rtol=1e-6)


# ------------------------------------------------------------------- empty / all ignored


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize(
    "case", ["all-ignored", "empty", "empty-3d", "all-ignored-custom", "all-ignored-zloss"]
)
def test_zero_counted_tokens(rng, dtype, tol, case):
    kw = {}
    if case == "empty":
        logits, targets = make_logits(rng, (0, 17), dtype), np.zeros(0, np.int64)
    elif case == "empty-3d":
        logits, targets = make_logits(rng, (2, 0, 17), dtype), np.zeros((2, 0), np.int64)
    else:
        logits = make_logits(rng, (6, 17), dtype)
        ii = 5 if case == "all-ignored-custom" else -100
        targets = np.full(6, ii)
        if ii != -100:
            kw["ignore_index"] = ii
        if case == "all-ignored-zloss":
            kw.update(z_loss=0.1, label_smoothing=0.1, weight=rng.random(17) + 0.1)
    for reduction in REDUCTIONS:
        loss, grad = both(logits, targets, reduction=reduction, **kw)
        assert grad.shape == logits.shape and grad.dtype == logits.dtype
        assert not grad.any() and not np.isnan(to_float64(grad)).any()
        if reduction == "none":
            assert loss.shape == targets.shape and not loss.any()
        else:
            assert type(loss) is float and loss == 0.0, f"{reduction}: {loss!r}"
    # Also with out= poisoned: every element must be written with 0.
    out = np.full(logits.shape, np.nan, dtype=dtype)
    loss, grad = fastloss.cross_entropy_with_grad(logits, targets, out=out, **kw)
    assert grad is out and not np.isnan(to_float64(out)).any() and not out.any()


def test_zero_weight_sum_mean_is_zero(rng):
    """All counted targets have class weight 0: the mean's denominator is 0, and the
    contract's zero-denominator rule gives 0.0 and a zero gradient (torch gives NaN)."""
    V = 10
    logits = make_logits(rng, (8, V), np.float32)
    targets = rng.integers(0, 5, size=8)
    weight = np.ones(V, np.float32)
    weight[:5] = 0
    loss, grad = fastloss.cross_entropy_with_grad(logits, targets, weight=weight)
    assert loss == 0.0 and not grad.any() and not np.isnan(grad).any()
    ref_loss, ref_grad = ce_reference(logits, targets, weight=weight)
    assert ref_loss == 0.0 and not ref_grad.any()


# --------------------------------------------------------------- ND and non-contiguous


@pytest.mark.parametrize("shape", [(4, 7, 33), (2, 3, 5, 17), (1, 1, 1), (3, 1, 200)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype,tol", [DTYPES[1], DTYPES[3]])
def test_nd_inputs(rng, shape, reduction, dtype, tol):
    logits = make_logits(rng, shape, dtype)
    targets = _targets_with_ignored(rng, int(np.prod(shape[:-1])), shape[-1], -100).reshape(shape[:-1])
    go = rng.standard_normal(shape[:-1]) if reduction == "none" else 0.7
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    loss, grad = both(logits, targets, grad_output=go, **kw)
    check_result(loss, grad, logits, reduction, tol, *ce_reference(logits, targets, grad_output=go, **kw))
    kw.pop("z_loss")
    loss, grad = both(logits, targets, grad_output=go, **kw)
    check_result(loss, grad, logits, reduction, tol, *torch_ce(logits, targets, grad_output=go, **kw))


def _noncontiguous_cases(rng, dtype):
    base = make_logits(rng, (40, 2 * 301), dtype)
    t_base = rng.integers(0, 301, size=80)
    t_base[::7] = -100
    yield "column-slice", base[:, ::2], t_base[::2]
    yield "row-slice", base[::3, :301], t_base[1::6][:14]
    yield "transpose", np.ascontiguousarray(base[:, :40].T).T[:, :40], t_base[:40] % 40
    tr = make_logits(rng, (301, 23), dtype).T  # (23, 301), V axis stride != 1
    yield "transposed-V", tr, t_base[:23]
    yield "negative-strides", base[::-1, ::-2], t_base[::-2]
    yield "fortran", np.asfortranarray(base[:, :301]), np.asfortranarray(t_base[:40])
    nd = make_logits(rng, (6, 8, 50), dtype).transpose(1, 0, 2)  # (8, 6, 50)
    yield "nd-transpose", nd, rng.integers(0, 50, size=(6, 8)).T
    yield "broadcast-targets-view", base[:4, :301], np.broadcast_to(np.int64(7), (4,))


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_noncontiguous(rng, dtype, tol, reduction):
    for name, logits, targets in _noncontiguous_cases(rng, dtype):
        assert not (logits.flags.c_contiguous and targets.flags.c_contiguous) or name == "fortran"
        lcopy, tcopy = logits.copy(), targets.copy()
        loss, grad = both(logits, targets, reduction=reduction, label_smoothing=0.05)
        ref = ce_reference(lcopy, tcopy, reduction=reduction, label_smoothing=0.05)
        check_result(loss, grad, logits, reduction, tol, *ref)
        # the same call on contiguous copies gives the same answer
        c_loss, c_grad = both(np.ascontiguousarray(logits), np.ascontiguousarray(targets),
                              reduction=reduction, label_smoothing=0.05)
        np.testing.assert_allclose(to_float64(loss), to_float64(c_loss), rtol=1e-6, err_msg=name)
        # Small contiguous inputs take the serial kernel, the others the parallel
        # one: the same row arithmetic, but vectorised sums may add in another
        # order (alignment), and label smoothing's a e_j - c w_j cancels to
        # tiny elements, so the absolute tolerance follows the gradient's scale.
        g64 = to_float64(c_grad)
        scale = float(np.nanmax(np.abs(g64))) if g64.size else 0.0
        np.testing.assert_allclose(to_float64(grad), g64, rtol=1e-6, atol=1e-6 * scale + 1e-30, err_msg=name)
        assert np.array_equal(to_float64(logits), to_float64(lcopy), equal_nan=True), name
        assert np.array_equal(targets, tcopy), name


# ------------------------------------------------------------------------ out= / inplace


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_out(rng, dtype, tol, reduction):
    N, V = 37, 1001
    logits = make_logits(rng, (N, V), dtype)
    targets = _targets_with_ignored(rng, N, V, -100)
    before = logits.copy()
    out = np.full((N, V), np.nan, dtype=dtype)
    go = rng.standard_normal(N) if reduction == "none" else 1.3
    loss, grad = fastloss.cross_entropy_with_grad(
        logits, targets, reduction=reduction, grad_output=go, out=out, label_smoothing=0.1
    )
    assert grad is out
    assert not np.isnan(to_float64(out)).any(), "some output elements were not written"
    ref = ce_reference(logits, targets, reduction=reduction, grad_output=go, label_smoothing=0.1)
    check_result(loss, grad, logits, reduction, tol, *ref)
    assert not out[targets == -100].any()
    assert np.array_equal(to_float64(logits), to_float64(before))


STREAM_OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"label_smoothing": 0.1, "z_loss": 1e-3}, id="smooth-zloss"),
    pytest.param({"softcap": 7.0, "logit_scale": 0.9}, id="softcap"),
    pytest.param({"weight": True}, id="weights"),
]


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float64)])
@pytest.mark.parametrize("options", STREAM_OPTIONS)
@pytest.mark.parametrize("V", [4099, 777])
def test_out_streaming_stores_same_bits(rng, monkeypatch, dtype, options, V):
    """A gradient written with streaming stores (``out=`` of at least
    config.STREAM_STORE_MIN_BYTES, lowered here to 0) has the same bits as one
    written with plain stores, and matches the float64 reference: rows over
    several blocks with the target in any of them, -inf logits, ignored rows,
    rows and an output not aligned to 64 bytes."""
    N = 29
    opts = dict(options)
    if opts.pop("weight", False):
        opts["weight"] = rng.uniform(0.5, 2.0, V).astype(dtype)
    logits = make_logits(rng, (N, V), dtype)
    logits[1, ::3] = -np.inf
    targets = _targets_with_ignored(rng, N, V, -100)
    targets[0] = V - 1
    plain_out = np.full((N, V), np.nan, dtype)
    monkeypatch.setattr(fastloss.config, "STREAM_STORE_MIN_BYTES", 1 << 62)
    plain_loss, _ = fastloss.cross_entropy_with_grad(logits, targets, out=plain_out, **opts)
    monkeypatch.setattr(fastloss.config, "STREAM_STORE_MIN_BYTES", 0)
    buf = np.full(N * V + 3, np.nan, dtype)
    out = buf[3:].reshape(N, V)  # 12 or 24 bytes past the buffer's alignment
    loss, grad = fastloss.cross_entropy_with_grad(logits, targets, out=out, **opts)
    assert grad is out
    assert loss == plain_loss
    assert np.array_equal(out.view(np.uint8), plain_out.view(np.uint8))
    assert np.isnan(buf[:3]).all()
    ref = ce_reference(logits, targets, **opts)
    check_result(loss, grad, logits, "mean", TOLS[dtype], *ref)


def test_streaming_stores_chosen_for_large_given_wide_buffers(monkeypatch):
    """Streaming stores are used for a large ``out=`` buffer of 4- or 8-byte
    floats that is not the logits, and not for half precision, in place, a
    fresh gradient or a buffer under the threshold."""
    from fastloss.cpu import cross_entropy as K
    from fastloss.cpu.cross_entropy_host import gradient_blocks

    monkeypatch.setattr(fastloss.config, "STREAM_STORE_MIN_BYTES", 4096)
    x = np.zeros((8, 1000), np.float32)
    g = np.zeros_like(x)
    chosen = gradient_blocks(2, g, x, True)
    assert chosen.shape[0] == 2 and chosen.dtype == g.dtype
    assert chosen.shape[1] >= K.ROW_BLOCK if K.HAS_STREAM_STORES else chosen.shape[1] == 0
    assert gradient_blocks(2, g, x, False).shape[1] == 0
    assert gradient_blocks(2, x, x, True).shape[1] == 0
    assert gradient_blocks(2, np.zeros((8, 1000), np.uint16), x, True).shape[1] == 0
    assert gradient_blocks(2, g[:1, :100], x, True).shape[1] == 0


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_out_nd_and_noncontiguous_logits(rng, dtype, tol):
    logits = make_logits(rng, (3, 5, 2 * 129), dtype)[..., ::2]
    targets = rng.integers(0, 129, size=(3, 5))
    out = np.full(logits.shape, np.nan, dtype=dtype)
    loss, grad = fastloss.cross_entropy_with_grad(logits, targets, out=out, reduction="sum")
    assert grad is out and not np.isnan(to_float64(out)).any()
    check_result(loss, grad, logits, "sum", tol, *ce_reference(logits, targets, reduction="sum"))


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace(rng, dtype, tol, reduction):
    N, V = 37, 1001
    logits = make_logits(rng, (N, V), dtype)
    targets = _targets_with_ignored(rng, N, V, -100)
    original = logits.copy()
    go = rng.standard_normal(N) if reduction == "none" else 0.6
    kw = dict(reduction=reduction, z_loss=1e-3, label_smoothing=0.1)
    loss, grad = fastloss.cross_entropy_with_grad(logits, targets, grad_output=go, inplace=True, **kw)
    assert grad is logits
    ref = ce_reference(original, targets, grad_output=go, **kw)
    check_result(loss, grad, original, reduction, tol, *ref)
    assert not logits[targets == -100].any(), "ignored rows must be overwritten with 0"


def test_inplace_nd(rng):
    logits = make_logits(rng, (4, 6, 77), np.float32)
    original = logits.copy()
    targets = rng.integers(0, 77, size=(4, 6))
    loss, grad = fastloss.cross_entropy_with_grad(logits, targets, inplace=True)
    assert grad is logits
    check_result(loss, grad, original, "mean", TOLS[np.dtype(np.float32)], *ce_reference(original, targets))


# ---------------------------------------------------------------------------- grad_output


@pytest.mark.parametrize("dtype,tol", [DTYPES[0], DTYPES[1], DTYPES[2]])
@pytest.mark.parametrize(
    "reduction,go",
    [
        ("mean", 2.5), ("mean", -0.3), ("mean", np.float32(4.0)), ("mean", np.array(0.5)),
        ("sum", 1e-3), ("sum", -2.0),
        ("none", "array"), ("none", 3.0), ("none", "array-f32"),
    ],
)
def test_grad_output(rng, dtype, tol, reduction, go):
    N, V = 23, 301
    logits = make_logits(rng, (N, V), dtype)
    targets = _targets_with_ignored(rng, N, V, -100)
    if isinstance(go, str):
        go = rng.standard_normal(N).astype(np.float32 if go.endswith("f32") else np.float64)
    go_copy = np.copy(go)
    kw = dict(reduction=reduction, weight=rng.random(V) + 0.5, label_smoothing=0.1)
    loss, grad = fastloss.cross_entropy_with_grad(logits, targets, grad_output=go, **kw)
    check_result(loss, grad, logits, reduction, tol, *ce_reference(logits, targets, grad_output=go, **kw))
    check_result(loss, grad, logits, reduction, tol, *torch_ce(logits, targets, grad_output=go, **kw))
    assert np.array_equal(np.asarray(go), go_copy)


def test_grad_output_nd_none(rng):
    logits = make_logits(rng, (3, 4, 55), np.float64)
    targets = rng.integers(0, 55, size=(3, 4))
    go = rng.standard_normal((3, 4))
    loss, grad = fastloss.cross_entropy_with_grad(logits, targets, reduction="none", grad_output=go)
    check_result(loss, grad, logits, "none", TOLS[np.dtype(np.float64)],
                 *ce_reference(logits, targets, reduction="none", grad_output=go))


# ------------------------------------------------------------------------ big vocabularies


@pytest.mark.parametrize(
    "N,V",
    [
        pytest.param(3, 131072, id="131072"),
        pytest.param(2, 262144, id="262144-few"),
        pytest.param(16, 262144, marks=pytest.mark.slow, id="262144"),
        pytest.param(64, 262144, marks=pytest.mark.slow, id="262144x64"),
    ],
)
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_large_vocabulary(rng, N, V, dtype, tol):
    logits = make_logits(rng, (N, V), dtype)
    targets = rng.integers(0, V, size=N)
    targets[0] = V - 1  # the last class: beyond any 16-bit index
    if N > 2:
        targets[1] = 65536
        targets[2] = 65535
    for reduction in REDUCTIONS:
        loss, grad = both(logits, targets, reduction=reduction, label_smoothing=0.1)
        check_result(loss, grad, logits, reduction, tol,
                     *ce_reference(logits, targets, reduction=reduction, label_smoothing=0.1))
    lse = fastloss.logsumexp(logits)
    np.testing.assert_allclose(to_float64(lse), lse_reference(logits), rtol=max(tol.loss, 1e-6))


@pytest.mark.slow
def test_more_than_2_31_elements():
    """64-bit indexing: 65,600 x 32,768 float16 logits (2.15e9 elements, 4.3 GB; the
    gradient another 4.3 GB). Rows repeat a 64-row block so the reference is cheap;
    the last rows, past element 2**31, are checked."""
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if avail < 11 * 2**30:
        pytest.skip(f"needs ~11 GiB free memory, have {avail / 2**30:.1f}")
    rng = np.random.default_rng(7)
    B, V, reps = 64, 32768, 1025
    N = B * reps
    assert N * V > 2**31
    block = make_logits(rng, (B, V), np.float16)
    logits = np.empty((reps, B, V), np.float16)
    logits[:] = block
    logits = logits.reshape(N, V)
    targets = rng.integers(0, V, size=N)
    rows = np.arange(N)
    lse_block = lse_reference(block)
    ref_none = lse_block[rows % B] - to_float64(block[rows % B, targets])
    loss = fastloss.cross_entropy(logits, targets, reduction="none")
    np.testing.assert_allclose(loss[-B:], ref_none[-B:], rtol=1e-5)
    np.testing.assert_allclose(loss[:B], ref_none[:B], rtol=1e-5)
    np.testing.assert_allclose(fastloss.cross_entropy(logits, targets), ref_none.mean(), rtol=1e-4)
    lse = fastloss.logsumexp(logits)
    np.testing.assert_allclose(lse[-3:], lse_block[(rows % B)[-3:]], rtol=1e-5)
    loss_m, grad = fastloss.cross_entropy_with_grad(logits, targets, reduction="sum", inplace=True)
    assert grad is logits
    last = slice(N - 3, N)
    _, ref_grad = ce_reference(block[rows[last] % B], targets[last], reduction="sum")
    assert_grad_close(grad[last], ref_grad, TOLS[np.dtype(np.float16)])


# --------------------------------------------------------------------------- extreme values


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_huge_logits(rng, dtype, tol, reduction):
    """|x| ~ 1e4 (float16: up to +-65504): no overflow, loss = lse - x_t accurate
    relative to the size of the logits."""
    N, V = 33, 257
    top = 60000.0 if dtype in (np.float16, BF16) else 1e4
    x = np.clip(rng.standard_normal((N, V)) * top / 3, -65504, 65504)
    x[0, :] = 65504.0  # a whole row at float16's max
    x[1, :5] = [65504.0, 65504.0, 65472.0, -65504.0, 65504.0]
    logits = x.astype(dtype)
    targets = rng.integers(0, V, size=N)
    targets[1] = 2
    targets[2] = int(np.argmax(to_float64(logits[2])))  # loss ~ 0 (tiny) row
    loss, grad = both(logits, targets, reduction=reduction)
    ref_loss, ref_grad = ce_reference(logits, targets, reduction=reduction)
    assert np.all(np.isfinite(to_float64(loss))) and np.all(np.isfinite(to_float64(grad)))
    # float32 accumulation: lse and x_t are ~6.5e4, their difference carries an absolute
    # error of about 2**-24 * 6.5e4 * (a few); the gradient then has p * that error.
    acc_eps = 2.0**-52 if dtype == np.float64 else 2.0**-23
    mag = float(np.abs(to_float64(logits)).max())
    atol = 8 * acc_eps * mag * (N if reduction == "sum" else 1)
    np.testing.assert_allclose(to_float64(loss), ref_loss, rtol=tol.loss, atol=atol)
    gtol = Tol(loss=tol.loss, grad=tol.grad, grad_atol=max(tol.grad_atol, 16 * acc_eps * mag), tiny=tol.tiny)
    assert_grad_close(grad, ref_grad, gtol)
    if reduction == "none":
        t_loss, t_grad = torch_ce(logits, targets, reduction=reduction)
        np.testing.assert_allclose(to_float64(loss), t_loss, rtol=tol.loss, atol=atol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_minus_inf_entries(rng, dtype, tol):
    N, V = 9, 300
    x = make_logits(rng, (N, V), np.float32)
    x[0, :299] = -np.inf  # only the last entry is finite
    x[1, :250] = -np.inf  # leading entries all -inf (a one-sweep running max starts at -inf)
    x[2, rng.random(V) < 0.5] = -np.inf
    x[3, 1:] = -np.inf  # only the first entry finite
    x[4, ::2] = -np.inf
    x[5, :128] = -np.inf
    x[6, :256] = -np.inf
    logits = x.astype(dtype)
    targets = np.array([299, 270, int(np.flatnonzero(np.isfinite(x[2]))[0]), 0, 1, 200, 299, 5, 7])
    for reduction in REDUCTIONS:
        loss, grad = both(logits, targets, reduction=reduction)
        assert np.all(np.isfinite(to_float64(loss))), loss
        assert np.all(np.isfinite(to_float64(grad)))
        ref = ce_reference(logits, targets, reduction=reduction)
        check_result(loss, grad, logits, reduction, tol, *ref)
        check_result(loss, grad, logits, reduction, tol, *torch_ce(logits, targets, reduction=reduction))
        assert np.all(to_float64(grad)[np.isneginf(to_float64(logits))] == 0)
    lse = fastloss.logsumexp(logits)
    np.testing.assert_allclose(to_float64(lse), lse_reference(logits), rtol=1e-5)
    assert np.isclose(float(lse[0]), to_float64(logits[0, 299]), rtol=1e-6)


def test_logsumexp_all_minus_inf_row():
    x = np.full((2, 16), -np.inf, np.float32)
    x[1, 3] = 1.0
    lse = fastloss.logsumexp(x)
    assert np.isneginf(lse[0]) and np.isclose(lse[1], 1.0)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_stays_in_its_row(rng, dtype, tol, reduction):
    N, V = 12, 513
    logits = make_logits(rng, (N, V), dtype)
    logits[4, 100] = np.nan
    logits[7, :] = np.nan
    logits[9, 3] = np.nan  # but token 9 is ignored: no effect anywhere
    targets = rng.integers(0, V, size=N)
    targets[9] = -100
    loss, grad = both(logits, targets, reduction=reduction)
    ref_loss, ref_grad = ce_reference(logits, targets, reduction=reduction)
    nan_rows = [4, 7]
    ok = np.setdiff1d(np.arange(N), nan_rows)
    g = to_float64(grad)
    assert np.all(np.isfinite(g[ok])), "NaN leaked into other tokens' gradients"
    assert_grad_close(g[ok], ref_grad[ok], tol)
    assert not g[9].any()
    if reduction == "none":
        assert np.isnan(loss[nan_rows]).all()
        assert np.all(np.isfinite(loss[ok]))
        assert_loss_close(loss[ok], ref_loss[ok], tol.loss)
        t_loss, _ = torch_ce(logits, targets, reduction="none")
        assert_loss_close(loss[ok], t_loss[ok], tol.loss)
    else:
        assert np.isnan(loss)
    # a NaN only in an ignored row changes nothing
    clean = make_logits(rng, (N, V), dtype)
    clean[9, :7] = np.nan
    loss, grad = both(clean, targets, reduction=reduction)
    assert np.all(np.isfinite(to_float64(loss))) and np.all(np.isfinite(to_float64(grad)))
    check_result(loss, grad, clean, reduction, tol, *ce_reference(clean, targets, reduction=reduction))


# ------------------------------------------------------------------- inputs not modified


def test_inputs_never_modified(rng):
    for dtype in (np.float32, np.float16, BF16, np.float64):
        logits = make_logits(rng, (20, 97), dtype)
        targets = _targets_with_ignored(rng, 20, 97, -100).astype(np.int32)
        weight = (rng.random(97) + 0.5).astype(np.float32)
        go = rng.standard_normal(20)
        copies = [a.copy() for a in (logits, targets, weight, go)]
        kw = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=10.0, logit_scale=1.3)
        fastloss.cross_entropy(logits, targets, **kw)
        fastloss.cross_entropy(logits, targets, reduction="none", **kw)
        fastloss.cross_entropy_with_grad(logits, targets, **kw)
        fastloss.cross_entropy_with_grad(logits, targets, reduction="none", grad_output=go, **kw)
        fastloss.cross_entropy_with_grad(logits, targets, out=np.empty_like(logits), **kw)
        fastloss.logsumexp(logits, softcap=10.0, logit_scale=1.3)
        for a, c in zip((logits, targets, weight, go), copies):
            assert a.dtype == c.dtype and np.array_equal(a.view(np.uint8), c.view(np.uint8))


# ----------------------------------------------------------------------------- threads


def test_threads_match_serial(rng):
    cases = []
    for i in range(16):
        dtype = [np.float32, np.float64, np.float16, BF16][i % 4]
        N, V = [(64, 3001), (7, 50000), (128, 1000), (1, 17)][i % 4]
        logits = make_logits(rng, (N, V), dtype)
        targets = _targets_with_ignored(rng, N, V, -100)
        kw = dict(reduction=REDUCTIONS[i % 3], label_smoothing=0.1 * (i % 2), z_loss=1e-4 * (i % 3))
        cases.append((logits, targets, kw))

    def run(case):
        logits, targets, kw = case
        loss, grad = fastloss.cross_entropy_with_grad(logits, targets, **kw)
        lse = fastloss.logsumexp(logits)
        return to_float64(loss), to_float64(grad), to_float64(lse)

    serial = [run(c) for c in cases]
    barrier = threading.Barrier(8)

    def run_sync(case):  # all 8 threads enter the kernels at the same moment
        barrier.wait(timeout=60)
        return run(case)

    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            results = list(pool.map(run, cases * 2))
            for (l, g, s), (sl, sg, ss) in zip(results, serial * 2):
                np.testing.assert_allclose(l, sl, rtol=1e-6, atol=0)
                np.testing.assert_allclose(g, sg, rtol=1e-6, atol=1e-30)
                np.testing.assert_allclose(s, ss, rtol=1e-6)
        results = list(pool.map(run_sync, cases[:8]))
        for (l, g, _s), (sl, sg, _ss) in zip(results, serial[:8]):
            np.testing.assert_allclose(l, sl, rtol=1e-6)
            np.testing.assert_allclose(g, sg, rtol=1e-6, atol=1e-30)
    for (logits, targets, kw), (l, g, _) in zip(cases, serial):
        tol = TOLS[np.dtype(logits.dtype)]
        ref_l, ref_g = ce_reference(logits, targets, **kw)
        assert_loss_close(l, ref_l, tol.loss)
        assert_grad_close(g, ref_g, tol)


# ---------------------------------------------------------------------------- logsumexp


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize(
    "kw", [{}, dict(softcap=5.0), dict(logit_scale=0.3), dict(softcap=20.0, logit_scale=3.0)],
    ids=["plain", "softcap", "scale", "softcap-scale"],
)
@pytest.mark.parametrize("shape", [(37, 1001), (2, 3, 130), (1, 1), (0, 5), (5,), (512, 4096)])
def test_logsumexp(rng, dtype, tol, kw, shape):
    logits = make_logits(rng, shape, dtype)
    before = logits.copy()
    lse = fastloss.logsumexp(logits, **kw)
    lse = np.asarray(lse)
    assert lse.shape == shape[:-1]
    assert np.issubdtype(lse.dtype, np.floating)
    assert_loss_close(lse, lse_reference(logits, **kw), tol.loss, what="logsumexp")
    assert np.array_equal(logits.view(np.uint8), before.view(np.uint8))
    if not kw and logits.size:
        t = torch.logsumexp(torch.tensor(to_float64(logits)), dim=-1).numpy()
        assert_loss_close(lse, t, tol.loss, what="logsumexp vs torch")


def test_logsumexp_noncontiguous(rng):
    base = make_logits(rng, (30, 400), np.float32)
    for view in (base[:, ::3], base[::2], base.T[:50].T, base[::-1, ::-1]):
        np.testing.assert_allclose(fastloss.logsumexp(view), lse_reference(view), rtol=1e-6)


# ------------------------------------------------------------------- result types / dtypes


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_result_dtypes(rng, dtype, tol):
    logits = make_logits(rng, (5, 11), dtype)
    targets = rng.integers(0, 11, size=5)
    none_dtype = np.float64 if dtype == np.float64 else np.float32
    for fn in (fastloss.cross_entropy, lambda *a, **k: fastloss.cross_entropy_with_grad(*a, **k)[0]):
        assert type(fn(logits, targets)) is float
        assert type(fn(logits, targets, reduction="sum")) is float
        none = fn(logits, targets, reduction="none")
        assert isinstance(none, np.ndarray) and none.dtype == none_dtype and none.shape == (5,)
    _, grad = fastloss.cross_entropy_with_grad(logits, targets)
    assert grad.dtype == dtype and grad.shape == logits.shape and grad.flags.writeable
    assert not np.shares_memory(grad, logits)


@pytest.mark.parametrize(
    "tdtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
)
def test_target_integer_dtypes(rng, tdtype):
    N, V = 40, 120
    logits = make_logits(rng, (N, V), np.float32)
    targets = rng.integers(0, V, size=N)
    signed = np.dtype(tdtype).kind == "i"
    if signed:
        targets[::5] = -100
    t = targets.astype(tdtype)
    tol = TOLS[np.dtype(np.float32)]
    # same result as int64 targets, and as the reference
    for reduction in REDUCTIONS:
        a = both(logits, t, reduction=reduction)
        b = both(logits, targets, reduction=reduction)
        np.testing.assert_array_equal(to_float64(a[0]), to_float64(b[0]))
        np.testing.assert_array_equal(a[1], b[1])
        check_result(a[0], a[1], logits, reduction, tol, *ce_reference(logits, targets, reduction=reduction))
    if not signed:  # ignore_index inside the unsigned range
        t2 = targets.astype(tdtype)
        t2[::4] = 7
        loss, grad = both(logits, t2, ignore_index=7, reduction="none")
        assert not loss[t2 == 7].any()
        check_result(loss, grad, logits, "none", tol,
                     *ce_reference(logits, t2, ignore_index=7, reduction="none"))


def test_target_python_list_and_logits_list():
    logits = [[1.0, 2.0, 0.5], [0.1, -0.3, 2.2]]
    targets = [2, 0]
    loss, grad = fastloss.cross_entropy_with_grad(logits, targets)
    ref_loss, ref_grad = ce_reference(np.array(logits), np.array(targets))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12)


# --- the one-sweep blocked statistics (fastloss.cpu.cross_entropy.ROW_BLOCK) -----------


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3},
                                  {"softcap": 30.0, "logit_scale": 0.7}],
                         ids=["plain", "smooth+z", "softcap"])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_rows_spanning_blocks_with_growing_max_and_masks(rng, dtype, opts):
    from fastloss.cpu.cross_entropy import ROW_BLOCK

    V = 2 * ROW_BLOCK + 917  # three blocks, the last one partial
    x = (rng.standard_normal((6, V)) * 3).astype(np.float64)
    x[0, : ROW_BLOCK + 5] = -np.inf            # a whole block (and more) masked first
    x[1] += np.linspace(-400.0, 400.0, V)      # the max grows in every block
    x[2] -= np.linspace(0.0, 1e4, V)           # the max is in the first block; the rest underflows
    x[3, -3:] = 60.0                           # the max sits at the very end
    x[4, ROW_BLOCK + 11] = np.nan              # NaN in a later block: only this row is NaN
    x[5, :ROW_BLOCK] = -1e4                     # a first block far below the rest
    x = x.astype(dtype)
    t = rng.integers(0, V, 6)
    t[0] = ROW_BLOCK + 100                     # a target past the masked prefix
    weight = rng.uniform(0.5, 2.0, V)
    kw = dict(weight=weight, reduction="none", **opts)
    xf = to_float64(x)
    ref_loss, ref_grad = ce_reference(xf, t, **kw)
    loss = fastloss.cross_entropy(x, t, **kw)
    loss2, grad = fastloss.cross_entropy_with_grad(x, t, **kw)
    ok = np.arange(6) != 4
    smoothing = opts.get("label_smoothing", 0.0) > 0
    if smoothing:  # a -inf logit makes the smoothed loss +inf (as in PyTorch): compare the rest
        ok &= np.arange(6) != 0
    assert np.isnan(loss[4]) and np.isnan(loss2[4]) and np.isnan(to_float64(grad[4])).all()
    np.testing.assert_allclose(loss[ok], ref_loss[ok], rtol=2e-6, atol=1e-5)
    np.testing.assert_allclose(loss2[ok], ref_loss[ok], rtol=2e-6, atol=1e-5)
    g = to_float64(grad)[ok]
    r = ref_grad[ok]
    tol = 1e-5 if dtype == np.float32 else 5e-3
    np.testing.assert_allclose(g, r, rtol=tol, atol=1e-6 * np.abs(r).max())
    np.testing.assert_allclose(fastloss.logsumexp(x, softcap=opts.get("softcap"),
                                                  logit_scale=opts.get("logit_scale", 1.0))[ok],
                               lse_reference(xf, softcap=opts.get("softcap"),
                                             logit_scale=opts.get("logit_scale", 1.0))[ok],
                               rtol=2e-6)


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-6), (np.float16, 2e-6), (ml_dtypes.bfloat16, 2e-6)])
def test_later_blocks_above_the_reference_max(rng, dtype, rtol):
    """Blocks after the first are summed against the running max without a max pass
    (``_block_update_lazy``) unless their sum passes ``LAZY_SUM_LIMIT``: values a
    little above the reference keep it (confident rows included), values far
    above force an exact redo. Both must match the float64 reference."""
    from fastloss.cpu.cross_entropy import LAZY_SUM_LIMIT, ROW_BLOCK

    V = 3 * ROW_BLOCK + 100
    x = rng.uniform(-2.0, 0.0, (6, V))
    t = rng.integers(0, V, 6)
    x[0, 2 * ROW_BLOCK + 7] = 12.0            # within the limit: stale reference kept
    t[0] = 2 * ROW_BLOCK + 7                  # ... and the target there: loss ~ 1e-4
    x[1, ROW_BLOCK + 3] = np.log(LAZY_SUM_LIMIT) + 2.0   # just past the limit: redo
    t[1] = ROW_BLOCK + 3
    x[2, 2 * ROW_BLOCK:] += 15.0              # a whole block above: redo (sum > limit)
    x[3, -1] = 300.0                           # far above (exp would overflow): redo
    x[4, ROW_BLOCK:2 * ROW_BLOCK] = 19.0       # many values near the limit per element
    x[5, 2 * ROW_BLOCK + 1] = np.inf           # +inf in a later block: NaN as in torch
    x = x.astype(dtype)
    xf = to_float64(x)
    ref_loss, ref_grad = ce_reference(xf[:5], t[:5], reduction="none")
    loss, grad = fastloss.cross_entropy_with_grad(x, t, reduction="none")
    np.testing.assert_allclose(loss[:5], ref_loss, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(fastloss.cross_entropy(x, t, reduction="none")[:5], ref_loss,
                               rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(fastloss.logsumexp(x)[:5], lse_reference(xf[:5]), rtol=2e-7)
    gtol = 1e-5 if dtype == np.float32 else (1e-3 if dtype == np.float16 else 5e-3)
    g = to_float64(grad[:5])
    # atol: p_t - 1 at a target with p_t ~ 1 cancels to a few float32 ulps of 1 (as in torch)
    np.testing.assert_allclose(g, ref_grad, rtol=gtol, atol=3e-7)
    assert np.isnan(loss[5]) and np.isnan(fastloss.logsumexp(x)[5])


@pytest.mark.parametrize("dtype, bound", [(np.float32, 2e-6), (BF16, 2e-6), (np.float16, 2e-6), (np.float64, 1e-14)])
@pytest.mark.parametrize("nclass", [7, 4099, 32000])
@pytest.mark.parametrize("kw", [dict(), dict(softcap=30.0), dict(logit_scale=0.7, z_loss=1e-3),
                                dict(softcap=5.0, logit_scale=2.0, label_smoothing=0.1)])
def test_fused_loss_equals_forward_loss_up_to_rounding(rng, dtype, bound, nclass, kw):
    """The loss of cross_entropy_with_grad is cross_entropy's up to the documented
    rounding bound (docs/api.md), per token, for every transform."""
    x = (rng.standard_normal((16, nclass)) * 4).astype(dtype)
    t = rng.integers(0, nclass, 16)
    fwd = fastloss.cross_entropy(x, t, reduction="none", **kw).astype(np.float64)
    fused = fastloss.cross_entropy_with_grad(x, t, reduction="none", **kw).loss.astype(np.float64)
    assert np.all(np.abs(fused - fwd) <= bound * np.maximum(1.0, np.abs(fwd)))
