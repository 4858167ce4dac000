"""``fastloss.torch``, the PyTorch adapter: against ``torch.nn.functional`` and
the float64 references (``tests/reference.py``).

Groups (in file order):

1. cross_entropy loss and gradient, every option set x every dtype x shapes
   from (64, 1000) to (1, 2), unbatched ``(C,)`` and ``(N, C, d)``;
   mse_loss and linear_cross_entropy likewise;
2. upstream gradients: a non-uniform one for "none", scalars != 1 for mean/sum;
3. gradient accumulation over micro-batches with ``normalizer``;
4. ``torch.autograd.gradcheck`` (float64) for every option;
5. ``inplace_backward``;
6. non-contiguous inputs, result dtypes and shapes;
7. no-grad / eval paths;
8. errors;
9. modules (legacy reduction arguments, state dicts shared with torch.nn);
10. ``backend.chunked_linear_cross_entropy`` (the GPU path) on CPU tensors;
11. real-GPU checks (``@pytest.mark.gpu``, skipped without CUDA);
12. the custom ops (``torch.library.opcheck``; ``torch.compile`` with --runslow);
13. ``import fastloss`` does not import torch.

Tolerances. The 16-bit dtypes are compared with the float64 reference of the
same rounded inputs: the loss and the gradient are computed in float32 and
rounded once, so each element is within one ulp of the dtype (2**-10 relative
for float16, 2**-7 for bfloat16), plus the float32 arithmetic's own error
(an absolute ``1e-6`` for the loss, ``1e-6 * max|grad|`` for the gradient)
and the dtype's subnormal spacing. float32 and float64 are also compared with
PyTorch itself wherever PyTorch has the option.
"""

import subprocess
import sys

import numpy as np
import pytest
from reference import ce_reference, mse_reference, to_float64

torch = pytest.importorskip("torch")

import fastloss  # noqa: E402
import fastloss.torch as flt  # noqa: E402
from fastloss.torch import backend as B  # noqa: E402

F = torch.nn.functional
HALF = (torch.float16, torch.bfloat16)

# (dtype, loss rtol, loss atol, gradient rtol, gradient atol relative to max |grad|)
DTYPES = [
    pytest.param(torch.float32, 2e-6, 1e-6, 1e-5, 1e-6, id="float32"),
    pytest.param(torch.float64, 1e-12, 1e-13, 1e-10, 1e-13, id="float64"),
    pytest.param(torch.float16, 2.0**-10, 1e-6, 2.0**-10, 1e-6, id="float16"),   # one float16 ulp
    pytest.param(torch.bfloat16, 2.0**-7, 1e-6, 2.0**-7, 1e-6, id="bfloat16"),  # one bfloat16 ulp
]

# torch layout: class dimension 1 ((C,) is unbatched, with a 0-d target)
SHAPES = [
    pytest.param((64, 1000), id="64x1000"),
    pytest.param((37, 101), id="37x101"),
    pytest.param((3, 5), id="3x5"),
    pytest.param((1, 2), id="1x2"),
    pytest.param((11,), id="unbatched-11"),
    pytest.param((4, 7, 3), id="N-C-d"),
]

# "weight": class weights drawn per test; "ignored": fraction of targets set to ignore_index
CE_OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param(dict(weight=True), id="weight"),
    pytest.param(dict(label_smoothing=0.15), id="smooth"),
    pytest.param(dict(weight=True, label_smoothing=0.2), id="weight-smooth"),
    pytest.param(dict(ignored=0.3), id="ignore"),
    pytest.param(dict(ignore_index=1, ignored=0.2, weight=True), id="ignore-in-range-weight"),
    pytest.param(dict(z_loss=1e-2, ignored=0.2), id="zloss"),
    pytest.param(dict(weight=True, z_loss=1e-3, ignored=0.2), id="weight-zloss"),
    pytest.param(dict(softcap=4.0), id="softcap"),
    pytest.param(dict(logit_scale=0.7), id="logit_scale"),
    pytest.param(dict(normalizer=50.0, ignored=0.2), id="normalizer"),
    pytest.param(dict(reduction="sum", weight=True, ignored=0.2), id="sum"),
    pytest.param(dict(reduction="none", ignored=0.2), id="none"),
    pytest.param(dict(reduction="sum", weight=True, label_smoothing=0.1, z_loss=1e-2, softcap=3.0,
                      logit_scale=1.3, ignored=0.2), id="all-sum"),
    pytest.param(dict(reduction="none", weight=True, label_smoothing=0.1, z_loss=1e-2, softcap=3.0,
                      logit_scale=1.3, ignored=0.2), id="all-none"),
    pytest.param(dict(weight=True, label_smoothing=0.1, z_loss=1e-2, softcap=3.0, logit_scale=0.5,
                      normalizer=7.0, ignored=0.2), id="all-mean-normalizer"),
]

TORCH_OPTIONS = {"weight", "ignore_index", "reduction", "label_smoothing"}


# --- helpers ------------------------------------------------------------------------------

def gen(seed):
    return torch.Generator().manual_seed(seed)


def classes_of(shape):
    return shape[0] if len(shape) == 1 else shape[1]


def target_shape(shape):
    return () if len(shape) == 1 else (shape[0], *shape[2:])


def make_logits(g, shape, dtype, scale=3.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def make_target(g, shape, c, ignored=0.0, ignore_index=-100):
    """Class indices with about ``ignored`` of them set to ``ignore_index``,
    never all of them."""
    t = torch.randint(0, c, shape, generator=g)
    flat = t.view(-1)
    n = flat.numel()
    if ignored and n > 1:
        k = min(n - 1, max(1, round(ignored * n)))
        flat[torch.randperm(n, generator=g)[:k]] = ignore_index
    if n and bool((flat == ignore_index).all()):
        flat[0] = (ignore_index + 1) % c if 0 <= ignore_index < c else 0
    return t


def make_weight(g, c, dtype):
    return (torch.rand(c, generator=g, dtype=torch.float64) * 1.8 + 0.2).to(dtype)


def ce_inputs(shape, dtype, opts, seed=20240607):
    """(logits, target, fastloss keywords) for an option set of CE_OPTIONS."""
    g = gen(seed)
    kw = dict(opts)
    ignored = kw.pop("ignored", 0.0)
    c = classes_of(shape)
    x = make_logits(g, shape, dtype)
    t = make_target(g, target_shape(shape), c, ignored, kw.get("ignore_index", -100))
    if kw.get("weight") is True:
        kw["weight"] = make_weight(g, c, dtype)
    return x, t, kw


def reference(x, t, grad_output=None, **kw):
    """float64 ``ce_reference`` for torch-layout logits (class dimension 1)."""
    kw = {k: (to_float64(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    xn, tn = to_float64(x), t.numpy()
    go = None if grad_output is None else to_float64(grad_output)
    if x.dim() == 1:
        loss, grad = ce_reference(xn[None], tn.reshape(1), grad_output=go, **kw)
        return (np.asarray(loss).reshape(()) if kw.get("reduction") == "none" else loss), grad[0]
    if x.dim() > 2:
        loss, grad = ce_reference(np.moveaxis(xn, 1, -1), tn, grad_output=go, **kw)
        return loss, np.moveaxis(grad, -1, 1)
    return ce_reference(xn, tn, grad_output=go, **kw)


def tiny(dtype):
    """The spacing of ``dtype``'s subnormals."""
    fi = torch.finfo(dtype)
    return fi.smallest_normal * fi.eps


def assert_close(got, ref, rtol, atol=0.0, atol_rel=0.0, what="value"):
    """``|got - ref| <= rtol * |ref| + atol + atol_rel * max|ref|`` element-wise (NaN fails)."""
    got = to_float64(got)
    ref = to_float64(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    if ref.size == 0:
        return
    bound = rtol * np.abs(ref) + atol + atol_rel * float(np.max(np.abs(ref)))
    err = np.abs(got - ref)
    ok = err <= bound
    if not ok.all():
        i = np.unravel_index(np.argmax(np.where(ok, -np.inf, err - bound)), ref.shape)
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ref.size} elements off; worst at {i}: "
                             f"got {got[i]!r}, want {ref[i]!r} (bound {bound[i]:.3g})")


def backward(loss, grad_output=None):
    if grad_output is not None:
        loss.backward(grad_output)
    elif loss.dim():
        loss.sum().backward()
    else:
        loss.backward()


def torch_has(kw):
    return set(kw) <= TORCH_OPTIONS


# --- 1. against torch and the float64 reference ---------------------------------------------

@pytest.mark.parametrize("dtype, loss_rtol, loss_atol, grad_rtol, grad_atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", CE_OPTIONS)
def test_cross_entropy_matches_reference_and_torch(opts, shape, dtype, loss_rtol, loss_atol, grad_rtol,
                                                   grad_atol):
    """Loss and gradient of every option set, dtype and shape: against the
    float64 reference of the same (rounded) logits, and against PyTorch for
    float32/float64 where PyTorch has the options."""
    check_cross_entropy(opts, shape, dtype, loss_rtol, loss_atol, grad_rtol, grad_atol)


# at LM widths: the options that change the kernel's path (the rest are covered above at every shape)
BIG_OPTIONS = [p for p in CE_OPTIONS
               if p.id in ("plain", "weight-smooth", "ignore", "all-sum", "all-none", "all-mean-normalizer")]


@pytest.mark.slow
@pytest.mark.parametrize("dtype, loss_rtol, loss_atol, grad_rtol, grad_atol", DTYPES)
@pytest.mark.parametrize("shape", [(256, 32000), (16, 3001, 5)], ids=["256x32000", "16x3001x5"])
@pytest.mark.parametrize("opts", BIG_OPTIONS)
def test_cross_entropy_matches_reference_and_torch_big(opts, shape, dtype, loss_rtol, loss_atol, grad_rtol,
                                                       grad_atol):
    check_cross_entropy(opts, shape, dtype, loss_rtol, loss_atol, grad_rtol, grad_atol)


def check_cross_entropy(opts, shape, dtype, loss_rtol, loss_atol, grad_rtol, grad_atol):
    x, t, kw = ce_inputs(shape, dtype, opts)
    xl = x.clone().requires_grad_()
    loss = flt.cross_entropy(xl, t, **kw)
    red = kw.get("reduction", "mean")
    assert loss.dtype == dtype and isinstance(loss, torch.Tensor)
    assert loss.shape == (t.shape if red == "none" else ())
    backward(loss)
    assert xl.grad.dtype == dtype and xl.grad.shape == x.shape
    ref_loss, ref_grad = reference(x, t, **kw)
    assert_close(loss, ref_loss, loss_rtol, loss_atol + tiny(dtype), what="loss")
    assert_close(xl.grad, ref_grad, grad_rtol, tiny(dtype), grad_atol, what="grad")
    if red == "none":  # ignored tokens: loss 0 and gradient rows 0
        ign = t == kw.get("ignore_index", -100)
        assert (loss.detach()[ign] == 0).all()
        if x.dim() > 1:
            assert (xl.grad.movedim(1, -1)[ign] == 0).all()
    if dtype not in HALF and torch_has(kw):
        xt = x.clone().requires_grad_()
        want = F.cross_entropy(xt, t, **kw)
        backward(want)
        # torch's own float32 label-smoothing gradient loses up to ~3e-5 * max|grad| at 32000
        # classes (its smoothing sum, times p); fastloss's is checked against the reference above
        gatol = 1e-4 if dtype == torch.float32 and kw.get("label_smoothing") else 2 * grad_atol
        assert_close(loss, want, 2 * loss_rtol, 2 * loss_atol, what="loss vs torch")
        assert_close(xl.grad, xt.grad, 2 * grad_rtol, 0.0, gatol, what="grad vs torch")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored_and_empty(reduction):
    """Mean over no counted token: 0 with a zero gradient (torch: NaN); sum 0; none zeros."""
    x = make_logits(gen(1), (6, 9), torch.float32).requires_grad_()
    t = torch.full((6,), -100)
    loss = flt.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    backward(loss)
    assert loss.dtype == torch.float32 and torch.equal(loss.detach(), torch.zeros(loss.shape))
    assert torch.equal(x.grad, torch.zeros(6, 9))
    if reduction == "mean":
        assert torch.isnan(F.cross_entropy(x.detach(), t))  # the deliberate difference
    e = torch.zeros(0, 9, requires_grad=True)
    loss = flt.cross_entropy(e, torch.zeros(0, dtype=torch.int64), reduction=reduction)
    backward(loss)
    assert loss.shape == ((0,) if reduction == "none" else ()) and float(loss.detach().sum()) == 0.0
    assert e.grad.shape == (0, 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cross_entropy_nan_and_masked_logits(dtype):
    """A NaN logit makes its token's loss and gradient row NaN and nothing else;
    -inf logits (masked classes) are 0 probability, with zero gradient (as torch)."""
    x = make_logits(gen(83), (6, 10), dtype)
    x[1, 2] = float("nan")
    x[3, :4] = float("-inf")
    x[4, 7:] = float("-inf")
    t = torch.tensor([0, 1, 2, 5, 3, -100])
    xl = x.clone().requires_grad_()
    loss = flt.cross_entropy(xl, t, reduction="none")
    loss.sum().backward()
    assert torch.isnan(loss[1]) and torch.isnan(xl.grad[1]).all()
    keep = torch.tensor([0, 2, 3, 4, 5])
    assert torch.isfinite(loss[keep]).all() and torch.isfinite(xl.grad[keep]).all()
    assert (xl.grad[3, :4] == 0).all() and (xl.grad[4, 7:] == 0).all()
    ref_loss, ref_grad = reference(x[keep], t[keep], reduction="none")
    tol = dict(rtol=2.0**-7, atol_rel=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol_rel=1e-6)
    assert_close(loss[keep], ref_loss, tol["rtol"], 1e-6)
    assert_close(xl.grad[keep], ref_grad, tol["rtol"], 0, tol["atol_rel"])
    xt = x.clone().requires_grad_()
    F.cross_entropy(xt, t, reduction="none").sum().backward()
    if dtype != torch.bfloat16:
        assert_close(xl.grad[keep], xt.grad[keep], 2e-5, 0, 2e-6)
    ls = flt.cross_entropy(x[keep], t[keep], reduction="none", softcap=3.0)  # -inf stays -inf under softcap
    assert_close(ls, reference(x[keep], t[keep], reduction="none", softcap=3.0)[0], tol["rtol"], 1e-6)


def test_uint8_targets_with_ignore_index_255():
    """Segmentation-style uint8 targets with ignore_index=255 (torch needs int64)."""
    g = gen(89)
    x = make_logits(g, (2, 6, 5, 4), torch.float32)
    t = torch.randint(0, 6, (2, 5, 4), generator=g)
    t[0, :2] = 255
    got = flt.cross_entropy(x, t.to(torch.uint8), ignore_index=255, label_smoothing=0.1)
    assert_close(got, F.cross_entropy(x, t, ignore_index=255, label_smoothing=0.1), 4e-6, 2e-6)


@pytest.mark.parametrize("dtype, loss_rtol, loss_atol, grad_rtol, grad_atol", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weight"])
@pytest.mark.parametrize("shape", [(64, 100), (3, 5, 2), (7,)], ids=["64x100", "3x5x2", "7"])
def test_mse_matches_reference_and_torch(shape, weighted, reduction, dtype, loss_rtol, loss_atol, grad_rtol,
                                         grad_atol):
    """mse_loss: loss and the gradients of input and target."""
    g = gen(7)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.1).to(dtype) if weighted else None
    xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = flt.mse_loss(xl, yl, reduction, weight=w)
    assert loss.dtype == dtype and loss.shape == (shape if reduction == "none" else ())
    backward(loss)
    ref_loss, ref_grad = mse_reference(to_float64(x), to_float64(y), reduction=reduction,
                                       weight=None if w is None else to_float64(w))
    assert_close(loss, ref_loss, loss_rtol, loss_atol + tiny(dtype), what="loss")
    assert_close(xl.grad, ref_grad, grad_rtol, tiny(dtype), grad_atol, what="grad input")
    assert_close(yl.grad, -ref_grad, grad_rtol, tiny(dtype), grad_atol, what="grad target")
    if dtype not in HALF:
        xt, yt = x.clone().requires_grad_(), y.clone().requires_grad_()
        want = F.mse_loss(xt, yt, reduction=reduction, weight=None if w is None else w.expand(shape))
        backward(want)
        assert_close(loss, want, 2 * loss_rtol, 2 * loss_atol, what="loss vs torch")
        assert_close(xl.grad, xt.grad, 2 * grad_rtol, 0.0, 2 * grad_atol, what="grad vs torch")
        assert_close(yl.grad, yt.grad, 2 * grad_rtol, 0.0, 2 * grad_atol, what="target grad vs torch")


def lce_inputs(dtype, hshape=(33, 24), v=301, bias=True, seed=3, ignored=0.2, ignore_index=-100):
    g = gen(seed)
    d = hshape[-1]
    h = torch.randn(hshape, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.3).to(dtype) if bias else None
    t = make_target(g, hshape[:-1], v, ignored, ignore_index)
    return g, h, w, b, t


def lce_reference(h, w, b, t, grad_output=None, **kw):
    """float64 loss and gradients (h, w, b) of cross_entropy(h @ w.T + b) by torch autograd
    on the float64 values of the (rounded) inputs."""
    h2, w2 = to_float64(h), to_float64(w)
    h2, w2 = torch.from_numpy(h2).requires_grad_(), torch.from_numpy(w2).requires_grad_()
    b2 = None if b is None else torch.from_numpy(to_float64(b)).requires_grad_()
    kw = {k: (torch.from_numpy(to_float64(v)) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    logits = F.linear(h2, w2, b2)
    x = logits.reshape(-1, logits.shape[-1])
    ref_loss, ref_grad = ce_reference(x.detach().numpy(), t.reshape(-1).numpy(),
                                      grad_output=None if grad_output is None else
                                      to_float64(grad_output).reshape(-1 if grad_output.dim() else ()),
                                      **kw)
    x.backward(torch.from_numpy(ref_grad))
    if kw.get("reduction") == "none":
        ref_loss = np.asarray(ref_loss).reshape(t.shape)
    return ref_loss, h2.grad, w2.grad, (None if b2 is None else b2.grad)


LCE_OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param(dict(reduction="sum", weight=True, label_smoothing=0.1), id="sum-weight-smooth"),
    pytest.param(dict(reduction="none"), id="none"),
    pytest.param(dict(z_loss=1e-2, softcap=4.0, logit_scale=1.5), id="zloss-softcap-scale"),
    pytest.param(dict(normalizer=20.0, weight=True), id="normalizer-weight"),
]


@pytest.mark.parametrize("dtype, loss_rtol, loss_atol, grad_rtol, grad_atol", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("opts", LCE_OPTIONS)
def test_linear_cross_entropy_matches_reference_and_torch(opts, bias, dtype, loss_rtol, loss_atol, grad_rtol,
                                                          grad_atol):
    """linear_cross_entropy: loss and the gradients of hidden, head and bias. The
    16-bit gradients of hidden and head are sums over the vocabulary (or the
    tokens) rounded once: one ulp plus 1e-5 * max|grad|."""
    g, h, w, b, t = lce_inputs(dtype, bias=bias)
    kw = dict(opts)
    if kw.get("weight") is True:
        kw["weight"] = make_weight(g, w.shape[0], dtype)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    bl = None if b is None else b.clone().requires_grad_()
    loss = flt.linear_cross_entropy(hl, wl, t, bl, **kw)
    red = kw.get("reduction", "mean")
    assert loss.dtype == dtype and loss.shape == (t.shape if red == "none" else ())
    backward(loss)
    ref_loss, rh, rw, rb = lce_reference(h, w, b, t, **kw)
    gatol = max(grad_atol, 1e-5) if dtype in HALF else grad_atol
    assert_close(loss, ref_loss, loss_rtol, loss_atol + tiny(dtype), what="loss")
    assert_close(hl.grad, rh, grad_rtol, tiny(dtype), gatol, what="grad hidden")
    assert_close(wl.grad, rw, grad_rtol, tiny(dtype), gatol, what="grad head")
    if bias:
        assert_close(bl.grad, rb, grad_rtol, tiny(dtype), gatol, what="grad bias")
    if dtype not in HALF and torch_has(kw):
        ht, wt = h.clone().requires_grad_(), w.clone().requires_grad_()
        bt = None if b is None else b.clone().requires_grad_()
        want = F.linear_cross_entropy(ht, wt, t, linear_bias=bt, ignore_index=-100, **kw)
        backward(want)
        assert_close(loss, want, 2 * loss_rtol, 2 * loss_atol, what="loss vs torch")
        assert_close(hl.grad, ht.grad, 2 * grad_rtol, 0.0, 2 * grad_atol, what="grad hidden vs torch")
        assert_close(wl.grad, wt.grad, 2 * grad_rtol, 0.0, 2 * grad_atol, what="grad head vs torch")


@pytest.mark.parametrize("hshape", [(24,), (2, 5, 24)], ids=["unbatched", "3d"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_shapes(hshape, reduction):
    """(D,) input with a 0-d target, and (..., D) input: the loss of the flattened call."""
    g, h, w, b, t = lce_inputs(torch.float64, hshape=hshape, v=40, ignored=0.2)
    hl = h.clone().requires_grad_()
    loss = flt.linear_cross_entropy(hl, w, t, b, reduction=reduction)
    assert loss.shape == (t.shape if reduction == "none" else ())
    go = torch.randn(t.shape, generator=g, dtype=torch.float64) if reduction == "none" else None
    backward(loss, go)
    ht = h.clone().requires_grad_()
    want = F.cross_entropy(F.linear(ht.reshape(-1, 24), w, b), t.reshape(-1), reduction=reduction)
    want = want.reshape(t.shape) if reduction == "none" else want
    backward(want, go)
    assert_close(loss, want, 1e-12, 1e-14)
    assert_close(hl.grad, ht.grad, 1e-10, 0, 1e-13)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("opts", [{}, dict(weight=True, label_smoothing=0.1, ignored=0.1)],
                         ids=["plain", "weight-smooth-ignore"])
def test_cross_entropy_big_cpu(dtype, opts):
    """A large vocabulary on the CPU, against PyTorch float32 on the same
    (rounded) logits: the check the GPU test runs, at a size two cores take."""
    compare_big(torch.device("cpu"), 2048, 50257, dtype, opts)


def compare_big(device, n, v, dtype, opts):
    """fastloss.torch against torch's float64 cross_entropy of the same logits
    (upcast): float32 within 2e-5 relative (+1e-6 * max|grad|), bfloat16
    within one bfloat16 ulp (+1e-6 * max|grad|). Compared in blocks of rows
    to bound memory."""
    g = torch.Generator(device=device).manual_seed(11)
    x = (torch.randn(n, v, generator=g, device=device) * 2).to(dtype)
    kw = dict(opts)
    ignored = kw.pop("ignored", 0.0)
    t = torch.randint(0, v, (n,), generator=g, device=device)
    if ignored:
        t[:: round(1 / ignored)] = -100
    if kw.get("weight") is True:
        kw["weight"] = (torch.rand(v, generator=g, device=device) + 0.5).to(dtype)
    xl = x.clone().requires_grad_()
    loss = flt.cross_entropy(xl, t, **kw)
    loss.backward()
    assert loss.device == x.device and xl.grad.device == x.device
    assert loss.dtype == dtype and xl.grad.dtype == dtype
    xr = x.double().requires_grad_()
    want = F.cross_entropy(xr, t, **{k: (w.double() if k == "weight" else w) for k, w in kw.items()})
    want.backward()
    rtol, atol_rel = (2e-5, 1e-6) if dtype == torch.float32 else (2.0**-7, 1e-6)
    assert abs(loss.item() - want.item()) <= rtol * abs(want.item()) + 1e-6
    gmax = float(xr.grad.abs().max())
    for lo in range(0, n, 256):
        got, ref = xl.grad[lo:lo + 256].double(), xr.grad[lo:lo + 256]
        bad = (got - ref).abs() > rtol * ref.abs() + atol_rel * gmax
        assert not bool(bad.any()), f"rows {lo}..: {int(bad.sum())} gradient elements off"


# --- 2. upstream gradients ------------------------------------------------------------------

# (dtype, gradient rtol): 16-bit: the rounded gradient times the upstream gradient, rounded again (two ulps)
GO_DTYPES = [
    pytest.param(torch.float64, 1e-10, id="float64"),
    pytest.param(torch.float32, 1e-5, id="float32"),
    pytest.param(torch.bfloat16, 2.0**-6, id="bfloat16"),
    pytest.param(torch.float16, 2.0**-9, id="float16"),
]


@pytest.mark.parametrize("dtype, rtol", GO_DTYPES)
@pytest.mark.parametrize("shape", [(37, 101), (4, 7, 3), (11,)], ids=["37x101", "N-C-d", "unbatched"])
@pytest.mark.parametrize("opts", [dict(ignored=0.2), dict(weight=True, label_smoothing=0.1, ignored=0.2),
                                  dict(z_loss=1e-2, softcap=3.0, logit_scale=0.8, ignored=0.2)],
                         ids=["ignore", "weight-smooth", "zloss-softcap-scale"])
def test_none_with_non_uniform_grad_output(opts, shape, dtype, rtol):
    """reduction='none' with a random upstream gradient (both signs), the same for
    fastloss, PyTorch and the reference; the upstream tensor is not modified."""
    x, t, kw = ce_inputs(shape, dtype, dict(opts, reduction="none"), seed=5)
    go = torch.randn(t.shape, generator=gen(6), dtype=torch.float64).to(dtype)
    go_copy = go.clone()
    xl = x.clone().requires_grad_()
    flt.cross_entropy(xl, t, **kw).backward(go)
    assert torch.equal(go, go_copy)
    _, ref_grad = reference(x, t, grad_output=go, **kw)
    assert_close(xl.grad, ref_grad, rtol, tiny(dtype), 1e-6 if dtype != torch.float64 else 1e-13)
    if dtype not in HALF and torch_has(kw):
        xt = x.clone().requires_grad_()
        F.cross_entropy(xt, t, **kw).backward(go)
        assert_close(xl.grad, xt.grad, 2 * rtol, 0, 1e-6 if dtype != torch.float64 else 1e-13)


@pytest.mark.parametrize("dtype, rtol", GO_DTYPES)
@pytest.mark.parametrize("go", [1.0, -2.5, 0.37])
@pytest.mark.parametrize("opts", [dict(ignored=0.2), dict(reduction="sum", weight=True, label_smoothing=0.1),
                                  dict(z_loss=1e-2, normalizer=9.0)], ids=["mean", "sum", "mean-zloss-normalizer"])
def test_scalar_grad_output(opts, go, dtype, rtol):
    """A scalar upstream gradient for mean/sum scales the gradient."""
    x, t, kw = ce_inputs((9, 13), dtype, opts, seed=8)
    xl = x.clone().requires_grad_()
    flt.cross_entropy(xl, t, **kw).backward(torch.tensor(go, dtype=dtype))
    _, ref_grad = reference(x, t, grad_output=torch.tensor(go, dtype=torch.float64), **kw)
    assert_close(xl.grad, ref_grad, rtol, tiny(dtype), 1e-6 if dtype != torch.float64 else 1e-13)


def test_retain_graph_backward_twice_accumulates():
    """The kept gradient is not consumed: a second backward adds it again (as torch)."""
    x, t, kw = ce_inputs((8, 10), torch.float64, dict(label_smoothing=0.1, ignored=0.2))
    xl, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    for xx, fn in ((xl, flt.cross_entropy), (xt, F.cross_entropy)):
        loss = fn(xx, t, **kw)
        loss.backward(retain_graph=True)
        loss.backward(torch.tensor(0.5, dtype=torch.float64))
    assert_close(xl.grad, xt.grad, 1e-12, 1e-15)
    x1 = x.clone().requires_grad_()
    flt.cross_entropy(x1, t, **kw).backward()
    assert_close(xl.grad, 1.5 * x1.grad, 1e-12, 1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_grad_output(reduction):
    """Upstream gradients for linear_cross_entropy: per token for "none" (the second
    sweep), a scalar != 1 for mean/sum; also the expanded ones of loss.sum()."""
    g, h, w, b, t = lce_inputs(torch.float64, hshape=(3, 7, 16), v=50)
    go = torch.randn(t.shape, generator=g, dtype=torch.float64) if reduction == "none" \
        else torch.tensor(-1.75, dtype=torch.float64)
    params = [v.clone().requires_grad_() for v in (h, w, b)]
    ref = [v.clone().requires_grad_() for v in (h, w, b)]
    flt.linear_cross_entropy(*params[:2], t, params[2], reduction=reduction, label_smoothing=0.05).backward(go)
    logits = F.linear(*ref)
    F.cross_entropy(logits.movedim(-1, 1), t, reduction=reduction, label_smoothing=0.05).backward(go)
    for p, r in zip(params, ref):
        assert_close(p.grad, r.grad, 1e-10, 0, 1e-13)
    if reduction == "none":  # loss.sum(): an expanded (stride 0) upstream gradient
        p2 = [v.clone().requires_grad_() for v in (h, w, b)]
        flt.linear_cross_entropy(*p2[:2], t, p2[2], reduction="none").sum().backward()
        r2 = [v.clone().requires_grad_() for v in (h, w, b)]
        F.cross_entropy(F.linear(*r2).movedim(-1, 1), t, reduction="sum").backward()
        for p, r in zip(p2, r2):
            assert_close(p.grad, r.grad, 1e-10, 0, 1e-13)


# --- 3. micro-batches with normalizer -------------------------------------------------------

MICRO_OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param(dict(label_smoothing=0.1), id="smooth"),
    pytest.param(dict(z_loss=1e-3), id="zloss"),
    pytest.param(dict(softcap=5.0, logit_scale=0.8), id="softcap-scale"),
    pytest.param(dict(weight=True), id="weight"),
]


def micro_setup(opts, n=60, d=16, c=53):
    g = gen(13)
    kw = dict(opts)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    lin = torch.nn.Linear(d, c, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64) * 0.5)
        lin.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.5)
    t = torch.randint(0, c, (n,), generator=g)
    t[: n // 3 : 2] = -100  # the first micro-batches hold most ignored tokens
    t[n // 2:: 7] = -100
    if kw.get("weight") is True:
        kw["weight"] = make_weight(g, c, torch.float64)
    w = kw.get("weight")
    counted = t != -100
    denom = counted.sum() if w is None else (w[t.clamp(min=0)] * counted).sum()
    return h, lin, t, kw, denom


@pytest.mark.parametrize("k", [2, 3, 7])
@pytest.mark.parametrize("opts", MICRO_OPTIONS)
def test_micro_batch_accumulation_with_normalizer(opts, k):
    """k uneven micro-batches, each with normalizer = the whole batch's counted
    tokens (or class-weight sum), accumulating .grad: the summed losses and the
    gradients equal one full-batch mean; the per-micro-batch means do not."""
    h, lin, t, kw, denom = micro_setup(opts)
    hl = h.clone().requires_grad_()
    full = flt.cross_entropy(lin(hl), t, **kw)
    full.backward()
    want = [hl.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone()]
    lin.zero_grad()
    hl.grad = None
    total = 0.0
    naive = 0.0
    for idx in torch.tensor_split(torch.arange(len(t)), [5, 21, 22, 40, 48, 55][: k - 1]):
        part = flt.cross_entropy(lin(hl[idx]), t[idx], normalizer=denom, **kw)  # a 0-d tensor normalizer
        part.backward()
        total += part.item()
        if bool((t[idx] != -100).any()):
            naive += flt.cross_entropy(lin(h[idx]), t[idx], **kw).item() / k
    assert_close(torch.tensor(total, dtype=torch.float64), full, 1e-12, 1e-14, what="summed loss")
    for got, ref in zip([hl.grad, lin.weight.grad, lin.bias.grad], want):
        assert_close(got, ref, 1e-10, 0, 1e-13, what="accumulated grad")
    assert abs(naive - full.item()) > 1e-3  # without normalizer the micro-batches disagree


@pytest.mark.parametrize("k", [2, 5])
def test_micro_batch_accumulation_linear_cross_entropy(k):
    """The same accumulation through linear_cross_entropy (hidden, head and bias)."""
    h, lin, t, kw, denom = micro_setup(dict(z_loss=1e-3, label_smoothing=0.05))
    hl = h.clone().requires_grad_()
    full = flt.linear_cross_entropy(hl, lin.weight, t, lin.bias, **kw)
    full.backward()
    want = [hl.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone()]
    lin.zero_grad()
    hl.grad = None
    total = 0.0
    for idx in torch.tensor_split(torch.arange(len(t)), k):
        part = flt.linear_cross_entropy(hl[idx], lin.weight, t[idx], lin.bias, normalizer=float(denom),
                                        chunk_size=4, **kw)
        part.backward()
        total += part.item()
    assert_close(torch.tensor(total, dtype=torch.float64), full, 1e-12, 1e-14)
    for got, ref in zip([hl.grad, lin.weight.grad, lin.bias.grad], want):
        assert_close(got, ref, 1e-10, 0, 1e-13)


# --- 4. gradcheck ---------------------------------------------------------------------------

GC = dict(eps=1e-6, atol=1e-8, rtol=1e-6)

GRADCHECK_CE = [
    pytest.param((5, 7), {}, id="plain"),
    pytest.param((5, 7), dict(reduction="none", ignored=0.2), id="none"),
    pytest.param((5, 7), dict(reduction="sum", ignored=0.2), id="sum"),
    pytest.param((5, 7), dict(weight=True, ignored=0.2), id="weight"),
    pytest.param((5, 7), dict(label_smoothing=0.2), id="smooth"),
    pytest.param((5, 7), dict(weight=True, label_smoothing=0.2, reduction="none"), id="weight-smooth-none"),
    pytest.param((5, 7), dict(z_loss=0.05, ignored=0.2), id="zloss"),
    pytest.param((5, 7), dict(weight=True, z_loss=0.05), id="weight-zloss"),
    pytest.param((5, 7), dict(softcap=2.0), id="softcap"),
    pytest.param((5, 7), dict(logit_scale=1.7), id="logit_scale"),
    pytest.param((5, 7), dict(normalizer=3.0, ignored=0.2), id="normalizer"),
    pytest.param((5, 7), dict(weight=True, label_smoothing=0.1, z_loss=0.05, softcap=2.0, logit_scale=0.6,
                              reduction="none", ignored=0.2), id="all-none"),
    pytest.param((2, 5, 3), dict(label_smoothing=0.1, reduction="none"), id="N-C-d-none"),
    pytest.param((6,), dict(z_loss=0.05), id="unbatched"),
]


@pytest.mark.parametrize("shape, opts", GRADCHECK_CE)
def test_gradcheck_cross_entropy(shape, opts):
    x, t, kw = ce_inputs(shape, torch.float64, opts, seed=17)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: flt.cross_entropy(x, t, **kw), (x,), **GC)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weight_shape", [None, (7,), (5, 1), (5, 7)], ids=["noweight", "w7", "w5x1", "w5x7"])
def test_gradcheck_mse(reduction, weight_shape):
    g = gen(19)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w = None if weight_shape is None else torch.rand(weight_shape, generator=g, dtype=torch.float64) + 0.1
    assert torch.autograd.gradcheck(lambda x, y: flt.mse_loss(x, y, reduction, weight=w), (x, y), **GC)


@pytest.mark.parametrize("opts", [
    pytest.param({}, id="mean"),
    pytest.param(dict(reduction="sum", label_smoothing=0.1), id="sum-smooth"),
    pytest.param(dict(reduction="none"), id="none"),
    pytest.param(dict(reduction="none", weight=True, z_loss=0.05, softcap=2.0), id="none-weight-zloss-softcap"),
    pytest.param(dict(weight=True, logit_scale=1.4, normalizer=4.0), id="weight-scale-normalizer"),
    pytest.param(dict(z_loss=0.05, chunk_size=2), id="zloss-chunk2"),
])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_linear_cross_entropy(opts, bias):
    g, h, w, b, t = lce_inputs(torch.float64, hshape=(5, 4), v=7, bias=bias, seed=23)
    kw = dict(opts)
    if kw.get("weight") is True:
        kw["weight"] = make_weight(g, 7, torch.float64)
    args = [h.requires_grad_(), w.requires_grad_()] + ([b.requires_grad_()] if bias else [])
    fn = (lambda h, w, b: flt.linear_cross_entropy(h, w, t, b, **kw)) if bias \
        else (lambda h, w: flt.linear_cross_entropy(h, w, t, **kw))
    assert torch.autograd.gradcheck(fn, tuple(args), **GC)


# --- 5. inplace_backward --------------------------------------------------------------------

def matmul_logits(dtype=torch.float32, n=12, d=8, c=30, seed=29):
    g = gen(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    m = torch.randn(d, c, generator=g, dtype=torch.float64).to(dtype) * 2
    t = make_target(g, (n,), c, 0.2)
    return a, m, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("opts", [{}, dict(reduction="none"), dict(reduction="sum", label_smoothing=0.1, z_loss=1e-2)],
                         ids=["mean", "none", "sum-smooth-zloss"])
def test_inplace_backward_overwrites_logits(opts, dtype):
    """The non-leaf logits hold the gradient after forward (same storage); loss and
    gradients equal the default path."""
    a, m, t = matmul_logits(dtype)
    go = torch.randn(t.shape, generator=gen(2), dtype=torch.float64).to(dtype) if opts.get("reduction") == "none" \
        else None
    a2 = a.detach().clone().requires_grad_()
    z2 = a2 @ m
    ref = flt.cross_entropy(z2, t, **opts)
    expect_grad = torch.autograd.grad(ref, z2, go, retain_graph=True)[0]
    backward(ref, go)

    z = a @ m
    ptr = z.data_ptr()
    assert not torch.equal(z, expect_grad)
    loss = flt.cross_entropy(z, t, inplace_backward=True, **opts)
    assert torch.equal(loss, ref)
    assert z.data_ptr() == ptr
    if go is None:  # the logits' memory holds the gradient (upstream 1)
        assert torch.equal(z.detach(), expect_grad)
    backward(loss, go)
    assert torch.equal(a.grad, a2.grad)


@pytest.mark.parametrize("go", [1.0, 0.5])
def test_inplace_backward_retain_graph(go):
    """A kept graph (retain_graph=True) either refuses a second backward with a
    RuntimeError or runs it correctly (twice the gradient), never a wrong one.
    (docs/torch.md says it refuses; the code since 26be6b8 runs it.)"""
    a, m, t = matmul_logits()
    a2 = a.detach().clone().requires_grad_()
    flt.cross_entropy(a2 @ m, t).backward(torch.tensor(go))
    loss = flt.cross_entropy(a @ m, t, inplace_backward=True)
    loss.backward(torch.tensor(go), retain_graph=True)
    assert_close(a.grad, a2.grad, 1e-6, 0, 1e-7)
    try:
        loss.backward(torch.tensor(go))
    except RuntimeError:
        return
    assert_close(a.grad, 2 * a2.grad, 1e-6, 0, 1e-7)


def _second_backward_cases():
    g = gen(101)
    x = torch.randn(4, 6, generator=g, requires_grad=True)
    t = torch.tensor([1, 2, 3, 4])
    h = torch.randn(4, 3, generator=g, requires_grad=True)
    w = torch.randn(6, 3, generator=g, requires_grad=True)
    return {
        "ce": (lambda: flt.cross_entropy(x, t), x),
        "mse": (lambda: flt.mse_loss(x, x.detach() * 0.5), x),
        "linear": (lambda: flt.linear_cross_entropy(h, w, t), h),
    }


@pytest.mark.parametrize("op", ["ce", "mse", "linear"])
@pytest.mark.parametrize("go", [1.0, 2.0])
def test_second_backward_without_retain_graph_raises(op, go):
    make, leaf = _second_backward_cases()[op]
    loss = make()
    loss.backward(torch.tensor(go))
    first = leaf.grad.clone()
    with pytest.raises(RuntimeError, match="second time|retain_graph"):
        loss.backward(torch.tensor(go))
    assert torch.equal(leaf.grad, first)


@pytest.mark.parametrize("op", ["ce", "mse", "linear"])
def test_retained_grad_result_not_modified_by_later_backward(op):
    """torch.autograd.grad(..., retain_graph=True) then a scaled final backward
    (as GradScaler does): the first result must keep its values."""
    make, leaf = _second_backward_cases()[op]
    loss = make()
    (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    kept = first.clone()
    loss.backward(torch.tensor(0.5))
    assert_close(leaf.grad, 0.5 * kept, 1e-6, 0, 1e-7)
    assert torch.equal(first, kept)


def test_inplace_backward_refuses_leaf():
    x, t, _ = ce_inputs((4, 9), torch.float32, {})
    leaf = x.clone().requires_grad_()
    before = leaf.detach().clone()
    for arg in (leaf, leaf[1:], leaf.view(2, 2, 9).view(4, 9)):
        with pytest.raises(ValueError, match="leaf tensor that requires grad"):
            flt.cross_entropy(arg, t[: arg.shape[0]], inplace_backward=True)
    assert torch.equal(leaf.detach(), before)


def test_inplace_backward_with_saved_logits_raises():
    """tanh saves its output: overwriting it bumps the version and backward refuses."""
    a, m, t = matmul_logits()
    y = torch.tanh(a @ m)
    loss = flt.cross_entropy(y, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_without_grad_does_not_modify():
    a, m, t = matmul_logits()
    with torch.no_grad():
        z = a @ m
    before = z.clone()
    ref = F.cross_entropy(before, t)
    with torch.no_grad():
        zz = a @ m
        loss = flt.cross_entropy(zz, t, inplace_backward=True)
    assert torch.equal(zz, before)
    assert_close(loss, ref, 2e-6, 1e-6)
    loss = flt.cross_entropy(z, t, inplace_backward=True)  # requires_grad False
    assert torch.equal(z, before) and not loss.requires_grad
    leaf = before.clone()  # a leaf without grad: not a leaf that requires grad, not modified either
    flt.cross_entropy(leaf, t, inplace_backward=True)
    assert torch.equal(leaf, before)


@pytest.mark.parametrize("kind", ["transposed", "sliced", "N-C-d", "N-C-d-classes-last"])
def test_inplace_backward_layouts(kind):
    """Non-contiguous (N, C) logits, and (N, C, d) logits stored class-major, are
    copied first (their classes move last): the user's tensor keeps its logits.
    (N, C, d) logits stored classes-last need no copy: the user's tensor holds
    the gradient, as for contiguous (N, C) logits. Results equal the default path."""
    a, m, t = matmul_logits()
    copied = kind != "N-C-d-classes-last"
    if kind == "transposed":
        make = lambda a: (m.T @ a.T).T  # noqa: E731
    elif kind == "sliced":
        m = torch.cat([m, m * 0.5], 1)
        make = lambda a: (a @ m)[:, ::2]  # noqa: E731
    elif kind == "N-C-d":
        t = t.reshape(3, 4)
        make = lambda a: (a @ m).reshape(3, 4, 30).transpose(1, 2).contiguous()  # noqa: E731
    else:
        t = t.reshape(3, 4)
        make = lambda a: (a @ m).reshape(3, 4, 30).transpose(1, 2)  # noqa: E731
    a2 = a.detach().clone().requires_grad_()
    z2 = make(a2)
    ref = flt.cross_entropy(z2, t, label_smoothing=0.1)
    expect_grad = torch.autograd.grad(ref, z2, retain_graph=True)[0]
    ref.backward()
    z = make(a)
    before = z.detach().clone()
    loss = flt.cross_entropy(z, t, inplace_backward=True, label_smoothing=0.1)
    assert torch.equal(z.detach(), before if copied else expect_grad)
    loss.backward()
    assert torch.equal(loss, ref) and torch.equal(a.grad, a2.grad)


def test_inplace_backward_unbatched_overwrites():
    """1-D logits: the (1, C) view is contiguous, so the user's tensor holds the gradient."""
    a, m, t = matmul_logits(n=1)
    z = (a @ m)[0]
    zr = z.detach().clone().requires_grad_()
    flt.cross_entropy(zr, t[0]).backward()
    flt.cross_entropy(z, t[0], inplace_backward=True)
    assert torch.equal(z.detach(), zr.grad)


# --- 6. non-contiguous inputs, dtypes, shapes -----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_non_contiguous_inputs(dtype, reduction):
    """Transposed or sliced logits, strided targets and weight: the results of the
    contiguous copies, bit for bit."""
    g = gen(31)
    base = make_logits(g, (40, 2 * 23), dtype)
    tt = make_target(g, (40, 3), 23, 0.2)
    w = make_weight(g, 46, dtype)[::2]
    cases = [
        (base[:, :23].contiguous(), tt[:, 0].contiguous()),      # the plain layout
        (base[:, :23], tt[:, 1]),                                # rows of stride 46, targets of stride 3
        (base[:, ::2], tt[:, 2]),                                # classes of stride 2
        (base.T.contiguous().T[:, :23], tt[:, 0]),               # column-major
        (base.T.contiguous()[::2].T, tt.T[1]),                   # column-major, classes of stride 2
        (base.unsqueeze(0).expand(2, 40, 46)[1, :, 1::2], tt[:, 1]),  # an expanded tensor's slice
    ]
    for x, t in cases:
        xl = x.detach().requires_grad_()  # a strided leaf
        xc = x.contiguous().detach().requires_grad_()
        kw = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
        loss = flt.cross_entropy(xl, t, **kw)
        want = flt.cross_entropy(xc, t.contiguous(), **dict(kw, weight=w.contiguous()))
        backward(loss)
        backward(want)
        assert torch.equal(loss, want) and torch.equal(xl.grad, xc.grad)
        assert xl.grad.shape == x.shape and loss.dtype == dtype


def test_non_contiguous_mse_and_linear():
    g = gen(37)
    x = torch.randn(9, 12, generator=g, dtype=torch.float64)
    y = torch.randn(12, 9, generator=g, dtype=torch.float64)
    xl, yl = x[:, ::2].requires_grad_(), y.T[:, 1::2].detach().requires_grad_()
    xc, yc = x[:, ::2].contiguous().requires_grad_(), y.T[:, 1::2].contiguous().requires_grad_()
    for red in ("mean", "none"):
        xl.grad = yl.grad = xc.grad = yc.grad = None
        a, b = flt.mse_loss(xl, yl, red), flt.mse_loss(xc, yc, red)
        backward(a)
        backward(b)
        assert torch.equal(a, b) and torch.equal(xl.grad, xc.grad) and torch.equal(yl.grad, yc.grad)
    # linear: head stored (D, V) and used transposed, hidden strided
    _, h, w, bias, t = lce_inputs(torch.float64, hshape=(10, 16), v=31)
    wt = w.T.contiguous()
    wide = torch.zeros(10, 32, dtype=torch.float64)
    wide[:, ::2] = h
    hl, wl = wide[:, ::2].requires_grad_(), wt.detach().requires_grad_()
    hc, wc = h.clone().requires_grad_(), w.clone().requires_grad_()
    a = flt.linear_cross_entropy(hl, wl.T, t[:], bias)
    b = flt.linear_cross_entropy(hc, wc, t, bias)
    a.backward()
    b.backward()
    assert_close(a, b, 1e-14, 0)
    assert_close(hl.grad, hc.grad, 1e-12, 0, 1e-14)
    assert_close(wl.grad.T, wc.grad, 1e-12, 0, 1e-14)


def test_negative_view_input():
    """A tensor with the negative bit (a lazy negation) is read as its values."""
    if not hasattr(torch, "_neg_view"):
        pytest.skip("no torch._neg_view")
    x, t, _ = ce_inputs((6, 8), torch.float64, {})
    nx = torch._neg_view(x)
    assert nx.is_neg()
    assert_close(flt.cross_entropy(nx, t), F.cross_entropy(-x, t), 1e-12, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_result_types(dtype):
    x, t, _ = ce_inputs((5, 6, 2), dtype, {})
    for red, shape in (("mean", ()), ("sum", ()), ("none", (5, 2))):
        loss = flt.cross_entropy(x, t, reduction=red)
        assert type(loss) is torch.Tensor and loss.dtype == dtype and loss.shape == shape
        m = flt.mse_loss(x, x * 0.5, red)
        assert m.dtype == dtype and m.shape == (x.shape if red == "none" else ())
    assert flt.cross_entropy(x[:, :, 0], t[:, 0], reduction="none").shape == (5,)
    assert flt.cross_entropy(x[0, :, 0], t[0, 0], reduction="none").shape == ()
    # any integer target dtype
    for idt in (torch.int32, torch.int16, torch.uint8, torch.int8):
        assert torch.equal(flt.cross_entropy(x, t.to(idt)), flt.cross_entropy(x, t))


# --- 7. no-grad / eval ------------------------------------------------------------------------

def test_no_grad_paths():
    """Under torch.no_grad and with requires_grad False: the same loss, no graph, no
    change to any input."""
    x, t, kw = ce_inputs((10, 17), torch.float32, dict(weight=True, label_smoothing=0.1, ignored=0.2))
    before = x.clone()
    with_grad = flt.cross_entropy(x.clone().requires_grad_(), t, **kw)
    xr = x.clone().requires_grad_()
    with torch.no_grad():
        a = flt.cross_entropy(xr, t, **kw)
        m = flt.mse_loss(xr, x * 0.3)
    b = flt.cross_entropy(x, t, **kw)
    for loss in (a, b, m):
        assert not loss.requires_grad and loss.grad_fn is None
    assert torch.equal(a, with_grad.detach()) and torch.equal(b, a)
    assert torch.equal(x, before) and torch.equal(xr.detach(), before)
    _, h, w, bias, tt = lce_inputs(torch.float32)
    hb = h.clone()
    with torch.no_grad():
        l1 = flt.linear_cross_entropy(h.requires_grad_(), w, tt, bias)
    l2 = flt.linear_cross_entropy(h.detach(), w, tt, bias)
    assert not l1.requires_grad and torch.equal(l1, l2) and torch.equal(h.detach(), hb)


def test_inputs_not_modified():
    """Forward and backward leave logits, targets, weight and upstream gradients as they were."""
    x, t, kw = ce_inputs((10, 17), torch.bfloat16, dict(weight=True, reduction="none", ignored=0.2))
    copies = [x.clone(), t.clone(), kw["weight"].clone()]
    xl = x.requires_grad_()
    go = torch.randn(10, generator=gen(1)).to(torch.bfloat16)
    gc = go.clone()
    flt.cross_entropy(xl, t, **kw).backward(go)
    assert torch.equal(x.detach(), copies[0]) and torch.equal(t, copies[1]) and torch.equal(kw["weight"], copies[2])
    assert torch.equal(go, gc)


# --- 8. errors --------------------------------------------------------------------------------

def test_errors_cross_entropy():
    x = torch.randn(5, 7)
    t = torch.randint(0, 7, (5,))
    with pytest.raises(TypeError, match="input: expected a torch.Tensor, found ndarray"):
        flt.cross_entropy(x.numpy(), t)
    with pytest.raises(TypeError, match="target: expected a torch.Tensor, found list"):
        flt.cross_entropy(x, [1, 2, 3, 4, 5])
    with pytest.raises(TypeError, match="input: expected a float16, bfloat16, float32 or float64 tensor"):
        flt.cross_entropy(x.long(), t)
    with pytest.raises(TypeError, match="target: expected integer class indices or float probabilities, found "
                                        "torch.bool"):
        flt.cross_entropy(x, t > 3)
    with pytest.raises(ValueError, match=r"target: expected shape \(5,\) for input of shape \(5, 7\)"):
        flt.cross_entropy(x, t[:4])
    with pytest.raises(ValueError, match=r"target: expected shape \(5, 3\)"):
        flt.cross_entropy(torch.randn(5, 7, 3), t)
    with pytest.raises(ValueError, match="target: expected a 0-d tensor for 1-D input"):
        flt.cross_entropy(x[0], t[:1])
    with pytest.raises(ValueError, match="input: expected at least one dimension"):
        flt.cross_entropy(torch.tensor(1.0), torch.tensor(0))
    with pytest.raises(ValueError, match=r"2 value\(s\) outside \[0, 7\).*first at position \(2,\): 7"):
        flt.cross_entropy(x, torch.tensor([0, 1, 7, 2, -5]))
    with pytest.raises(ValueError, match="outside"):  # also when only the gradient is wanted
        flt.cross_entropy(x.requires_grad_(), torch.tensor([0, 1, 2, 3, 9]))
    with pytest.raises(ValueError, match="reduction: expected one of 'mean', 'sum', 'none', found 'avg'"):
        flt.cross_entropy(x, t, reduction="avg")
    with pytest.raises(TypeError, match="reduction: expected 'mean', 'sum' or 'none', found int"):
        flt.cross_entropy(x, t, reduction=1)
    with pytest.raises(ValueError, match=r"weight: expected shape \(7,\)"):
        flt.cross_entropy(x, t, weight=torch.ones(8))
    with pytest.raises(TypeError, match="weight: expected a float16"):
        flt.cross_entropy(x, t, weight=torch.ones(7, dtype=torch.int64))
    with pytest.raises(ValueError, match="label_smoothing: expected a finite value in"):
        flt.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(TypeError, match="label_smoothing: expected a number, found str"):
        flt.cross_entropy(x, t, label_smoothing="0.1")
    with pytest.raises(TypeError, match="ignore_index: expected an int, found bool"):
        flt.cross_entropy(x, t, ignore_index=True)
    with pytest.raises(ValueError, match="softcap: expected a finite value"):
        flt.cross_entropy(x, t, softcap=0.0)
    with pytest.raises(ValueError, match="normalizer: expected a finite value"):
        flt.cross_entropy(x, t, normalizer=-1.0)
    with pytest.raises(ValueError, match="normalizer: only used with reduction='mean'"):
        flt.cross_entropy(x, t, normalizer=3.0, reduction="sum")


def test_errors_device():
    """A tensor on another device than input (meta stands in for a GPU here)."""
    x = torch.randn(5, 7)
    t = torch.randint(0, 7, (5,))
    with pytest.raises(ValueError, match="target: expected a tensor on cpu .like input., found one on meta"):
        flt.cross_entropy(x, t.to("meta"))
    with pytest.raises(ValueError, match="weight: expected a tensor on cpu"):
        flt.cross_entropy(x, t, weight=torch.ones(7, device="meta"))
    with pytest.raises(ValueError, match="target: expected a tensor on cpu"):
        flt.mse_loss(x, x.to("meta"))
    with pytest.raises(ValueError, match="linear_weight: expected a tensor on cpu"):
        flt.linear_cross_entropy(x, torch.randn(9, 7, device="meta"), t)


def test_errors_mse_and_linear():
    x = torch.randn(5, 7)
    t = torch.randint(0, 9, (5,))
    with pytest.raises(ValueError, match=r"target: expected input's shape \(5, 7\), found \(4, 7\)"):
        flt.mse_loss(x, x[:4])
    with pytest.raises(ValueError, match="target: expected input's shape"):
        flt.mse_loss(x, x[0])  # torch would broadcast (with a warning)
    with pytest.raises(TypeError, match="target: expected a float16"):
        flt.mse_loss(x, x.long())
    with pytest.raises(ValueError, match="reduction: expected one of"):
        flt.mse_loss(x, x, "bad")
    with pytest.raises(ValueError, match="weight: expected a shape that broadcasts"):
        flt.mse_loss(x, x, weight=torch.ones(3))
    w = torch.randn(9, 7)
    with pytest.raises(ValueError, match="bias: given twice"):
        flt.linear_cross_entropy(x, w, t, torch.zeros(9), linear_bias=torch.zeros(9))
    with pytest.raises(ValueError, match=r"target: expected shape \(5,\) \(input's without its last dimension\)"):
        flt.linear_cross_entropy(x, w, t[:3])
    with pytest.raises(ValueError, match=r"linear_weight: expected shape \(V, 7\)"):
        flt.linear_cross_entropy(x, torch.randn(9, 6), t)
    with pytest.raises(ValueError, match=r"bias: expected shape \(9,\)"):
        flt.linear_cross_entropy(x, w, t, torch.zeros(8))
    with pytest.raises(TypeError, match="linear_weight: expected input's dtype torch.float32, found torch.float64"):
        flt.linear_cross_entropy(x, w.double(), t)
    with pytest.raises(TypeError, match="chunk_size: expected an int, found float"):
        flt.linear_cross_entropy(x, w, t, chunk_size=1.5)
    with pytest.raises(ValueError, match="chunk_size: expected a positive integer"):
        flt.linear_cross_entropy(x, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="input: expected at least one dimension"):
        flt.linear_cross_entropy(torch.tensor(1.0), w, torch.tensor(0))
    with pytest.raises(ValueError, match="outside"):
        flt.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3, 9]))
    with pytest.raises(TypeError, match="probability targets"):
        flt.linear_cross_entropy(x, w, torch.rand(5))
    with pytest.raises(ValueError, match=r"out_features: only \(\)"):
        flt.LinearCrossEntropyLoss(7, 9, out_features=(2,))
    with pytest.raises(ValueError, match=r"weight: expected shape \(9,\), found \(3,\)"):
        flt.LinearCrossEntropyLoss(7, 9, weight=torch.ones(3))


def test_errors_linear_name_torch_arguments():
    x = torch.randn(5, 7)
    with pytest.raises(ValueError, match="linear_weight"):
        flt.linear_cross_entropy(x, torch.randn(9, 6), torch.zeros(5, dtype=torch.int64))


def test_numpy_scalar_options():
    x, t, _ = ce_inputs((5, 7), torch.float64, dict(ignored=0.2))
    want = F.cross_entropy(x, t, label_smoothing=np.float32(0.25))
    assert_close(flt.cross_entropy(x, t, label_smoothing=np.float32(0.25)), want, 1e-6, 0)
    n = np.count_nonzero(t.numpy() != -100) + np.int64(0)
    assert_close(flt.cross_entropy(x, t, normalizer=n), F.cross_entropy(x, t), 1e-12, 0)


def test_linear_ignore_index_none_as_torch():
    _, h, w, b, t = lce_inputs(torch.float64, hshape=(6, 5), v=9)
    want = F.linear_cross_entropy(h, w, t, linear_bias=b, ignore_index=None)
    assert_close(flt.linear_cross_entropy(h, w, t, linear_bias=b, ignore_index=None), want, 1e-12, 0)


def test_linear_options_keyword_as_torch():
    _, h, w, b, t = lce_inputs(torch.float64, hshape=(6, 5), v=9)
    want = F.linear_cross_entropy(h, w, t, linear_bias=b, options=None)
    assert_close(flt.linear_cross_entropy(h, w, t, linear_bias=b, options=None), want, 1e-12, 0)


def test_inplace_backward_refuses_leaf_n_c_d():
    leaf = torch.randn(3, 5, 4, generator=gen(97), requires_grad=True)
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        flt.cross_entropy(leaf, torch.randint(0, 5, (3, 4), generator=gen(98)), inplace_backward=True)


# --- 9. modules -------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, dict(weight=True, ignore_index=2, reduction="sum", label_smoothing=0.1),
                                  dict(reduction="none", z_loss=1e-2, softcap=3.0, logit_scale=0.9),
                                  dict(normalizer=4.0)], ids=["plain", "torch-options", "none-extras", "normalizer"])
def test_cross_entropy_module(opts):
    x, t, kw = ce_inputs((6, 11), torch.float32, opts, seed=41)
    mod = flt.CrossEntropyLoss(**kw)
    xl, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = mod(xl, t), flt.cross_entropy(xf, t, **kw)
    backward(a)
    backward(b)
    assert torch.equal(a, b) and torch.equal(xl.grad, xf.grad)
    if torch_has(kw):
        assert_close(a, torch.nn.CrossEntropyLoss(**kw)(x, t), 4e-6, 2e-6)
    if "weight" in kw:
        assert "weight" in dict(mod.named_buffers())
        assert "weight" in mod.state_dict()
        assert torch.equal(mod.state_dict()["weight"], torch.nn.CrossEntropyLoss(**kw).state_dict()["weight"])


def test_cross_entropy_module_inplace_backward():
    a, m, t = matmul_logits()
    z = a @ m
    mod = flt.CrossEntropyLoss(inplace_backward=True)
    want = F.cross_entropy(z.detach(), t)
    loss = mod(z, t)
    assert_close(loss, want, 4e-6, 2e-6)
    assert not torch.allclose(z.detach(), (a @ m).detach())  # overwritten


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
@pytest.mark.parametrize("size_average, reduce", [(None, False), (False, None), (True, None), (None, True),
                                                  (False, True), (True, False)])
def test_legacy_reduction_arguments(size_average, reduce):
    want = torch.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce).reduction
    assert flt.CrossEntropyLoss(size_average=size_average, reduce=reduce).reduction == want
    assert flt.MSELoss(size_average=size_average, reduce=reduce).reduction == want
    assert torch.nn.MSELoss(size_average=size_average, reduce=reduce).reduction == want
    x, t, _ = ce_inputs((6, 11), torch.float64, {})
    got = flt.CrossEntropyLoss(size_average=size_average, reduce=reduce)(x, t)
    assert_close(got, torch.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce)(x, t), 1e-12, 1e-14)
    assert flt.CrossEntropyLoss(reduce=False).reduction == "none"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_module(reduction):
    g = gen(43)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    w = torch.rand(6, generator=g) + 0.1
    mod = flt.MSELoss(reduction=reduction, weight=w)
    assert torch.equal(mod(x, y), flt.mse_loss(x, y, reduction, weight=w))
    assert_close(flt.MSELoss(reduction=reduction)(x, y), torch.nn.MSELoss(reduction=reduction)(x, y), 2e-6, 1e-7)
    assert "weight" in dict(mod.named_buffers())
    mod64 = mod.to(torch.float64)
    assert mod64.weight.dtype == torch.float64
    assert_close(mod64(x.double(), y.double()), mse_reference(x.double(), y.double(), reduction=reduction,
                                                             weight=w.double())[0], 1e-12, 1e-14)


def test_weight_buffer_moves_with_module():
    w = make_weight(gen(47), 11, torch.float32)
    mod = flt.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    mod = mod.to(torch.float64)
    assert mod.weight.dtype == torch.float64
    x, t, _ = ce_inputs((6, 11), torch.float64, {})
    assert_close(mod(x, t), F.cross_entropy(x, t, weight=w.double(), label_smoothing=0.1), 1e-12, 1e-14)
    lce = flt.LinearCrossEntropyLoss(8, 11, weight=w).to(torch.float64)
    assert lce.weight.dtype == torch.float64 and lce.linear.weight.dtype == torch.float64


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_cross_entropy_module_state_dict_both_ways(bias, weighted):
    """LinearCrossEntropyLoss and torch.nn.LinearCrossEntropyLoss load each other's
    state dicts and then give the same loss and gradients."""
    w = make_weight(gen(53), 40, torch.float64) if weighted else None
    kw = dict(bias=bias, dtype=torch.float64, weight=w, label_smoothing=0.1)
    ours, theirs = flt.LinearCrossEntropyLoss(16, 40, **kw), torch.nn.LinearCrossEntropyLoss(16, 40, **kw)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    torch.manual_seed(0)
    src = torch.nn.LinearCrossEntropyLoss(16, 40, **kw)
    ours.load_state_dict(src.state_dict())
    theirs.load_state_dict(src.state_dict())
    g = gen(59)
    h = torch.randn(9, 16, generator=g, dtype=torch.float64)
    t = make_target(g, (9,), 40, 0.2)
    a, b = ours(h, t), theirs(h, t)
    a.backward()
    b.backward()
    assert_close(a, b, 1e-12, 1e-14)
    assert_close(ours.linear.weight.grad, theirs.linear.weight.grad, 1e-10, 0, 1e-13)
    if bias:
        assert_close(ours.linear.bias.grad, theirs.linear.bias.grad, 1e-10, 0, 1e-13)
    # and back: ours -> a fresh torch module
    with torch.no_grad():
        ours.linear.weight.mul_(1.5)
    back = torch.nn.LinearCrossEntropyLoss(16, 40, **kw)
    back.load_state_dict(ours.state_dict())
    assert_close(ours(h, t), back(h, t), 1e-12, 1e-14)
    assert_close(ours(h[0], t[0]), back(h[0], t[0]), 1e-12, 1e-14)


def test_linear_cross_entropy_module_options():
    mod = flt.LinearCrossEntropyLoss(8, 20, bias=True, reduction="none", z_loss=1e-2, softcap=4.0, chunk_size=3,
                                     dtype=torch.float64)
    assert mod.ignore_index == -100 and mod.out_features == ()
    g = gen(61)
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    t = make_target(g, (2, 5), 20, 0.2)
    got = mod(h, t)
    want = flt.linear_cross_entropy(h, mod.linear.weight, t, mod.linear.bias, reduction="none", z_loss=1e-2,
                                    softcap=4.0)
    assert got.shape == (2, 5)
    assert_close(got, want, 1e-12, 1e-14)


# --- 10. chunked_linear_cross_entropy (the GPU path) on CPU tensors -------------------------

CHUNK_SPECS = [
    pytest.param(B.CESpec(), False, id="mean"),
    pytest.param(B.CESpec(reduction="sum"), True, id="sum-weight"),
    pytest.param(B.CESpec(reduction="none", label_smoothing=0.1), False, id="none-smooth"),
    pytest.param(B.CESpec(label_smoothing=0.1, ignore_index=3), True, id="mean-weight-smooth-ignore3"),
    pytest.param(B.CESpec(z_loss=1e-2, softcap=4.0, logit_scale=0.8), False, id="mean-zloss-softcap"),
    pytest.param(B.CESpec(reduction="none", z_loss=1e-2), True, id="none-weight-zloss"),
    pytest.param(B.CESpec(z_loss=1e-2, normalizer=13.0), True, id="mean-weight-zloss-normalizer"),
]


@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 7, 29, None])
@pytest.mark.parametrize("spec, weighted", CHUNK_SPECS)
def test_chunked_linear_cross_entropy(spec, weighted, chunk_size, with_grad):
    """The GPU path's chunking, run on CPU tensors, against the numpy path and
    PyTorch, with a per-token (or scalar) upstream gradient."""
    g, h, w, b, t = lce_inputs(torch.float64, hshape=(29, 12), v=37, seed=67, ignore_index=spec.ignore_index)
    cw = make_weight(g, 37, torch.float64) if weighted else None
    go = torch.randn(29, generator=g, dtype=torch.float64) if spec.reduction == "none" \
        else torch.tensor(0.7, dtype=torch.float64)
    got = B.chunked_linear_cross_entropy(h, w, t, b, cw, spec, chunk_size, with_grad,
                                         grad_output=go if with_grad else None)
    want = B.linear_cross_entropy(h, w, t, b, cw, spec, chunk_size, with_grad,
                                  grad_output=go if with_grad else None)
    assert got[0].dtype == torch.float64 and got[0].shape == (t.shape if spec.reduction == "none" else ())
    assert_close(got[0], want[0], 1e-12, 1e-14, what="loss vs numpy path")
    if not with_grad:
        assert got[1:] == (None, None, None)
        return
    for a, c, what in zip(got[1:], want[1:], ("hidden", "head", "bias")):
        assert_close(a, c, 1e-10, 0, 1e-13, what=f"grad {what} vs numpy path")
    # against torch (options torch has) or the reference's gradient pushed through the linear map
    ref_loss, rh, rw, rb = lce_reference(h, w, b, t, grad_output=go, weight=cw, **spec.keywords())
    assert_close(got[0], ref_loss, 1e-12, 1e-14, what="loss vs reference")
    for a, c, what in zip(got[1:], (rh, rw, rb), ("hidden", "head", "bias")):
        assert_close(a, c, 1e-10, 0, 1e-13, what=f"grad {what} vs reference")


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2.0**-7)], ids=["float32", "bf16"])
@pytest.mark.parametrize("chunk_size", [5, 64])
def test_chunked_linear_cross_entropy_low_precision(dtype, rtol, chunk_size):
    """float32 and bfloat16: the head gradient accumulates in float32 across chunks."""
    g, h, w, b, t = lce_inputs(dtype, hshape=(40, 16), v=53, seed=71)
    spec = B.CESpec(label_smoothing=0.1)
    loss, gh, gw, gb = B.chunked_linear_cross_entropy(h, w, t, b, None, spec, chunk_size, True)
    assert loss.dtype == gh.dtype == gw.dtype == gb.dtype == dtype
    ref_loss, rh, rw, rb = lce_reference(h, w, b, t, label_smoothing=0.1)
    # 16-bit: the chunk's logits are rounded to bfloat16 by the matrix product, then the gradient
    tol = dict(rtol=rtol, atol_rel=1e-5) if dtype == torch.float32 else dict(rtol=2 * rtol, atol_rel=2.0**-7)
    assert_close(loss, ref_loss, tol["rtol"], 1e-5)
    for a, c in zip((gh, gw, gb), (rh, rw, rb)):
        assert_close(a, c, tol["rtol"], 0, tol["atol_rel"])


def test_chunked_linear_cross_entropy_empty_and_all_ignored():
    _, h, w, b, t = lce_inputs(torch.float64, hshape=(6, 5), v=9)
    t = torch.full_like(t, -100)
    loss, gh, gw, gb = B.chunked_linear_cross_entropy(h, w, t, b, None, B.CESpec(), 4, True)
    assert float(loss) == 0.0 and not gh.any() and not gw.any() and not gb.any()
    loss, gh, gw, gb = B.chunked_linear_cross_entropy(h[:0], w, t[:0], b, None, B.CESpec(reduction="none"), 4, True)
    assert loss.shape == (0,) and gh.shape == (0, 5) and not gw.any()


def test_chunked_linear_cross_entropy_weight_zloss_mean_needs_normalizer():
    g, h, w, b, t = lce_inputs(torch.float64, hshape=(6, 5), v=9)
    with pytest.raises(NotImplementedError, match="need normalizer="):
        B.chunked_linear_cross_entropy(h, w, t, b, make_weight(g, 9, torch.float64), B.CESpec(z_loss=1e-3), 4, True)


# --- 11. real GPU -------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("opts", [{}, dict(weight=True, label_smoothing=0.1, ignored=0.1)],
                         ids=["plain", "weight-smooth-ignore"])
def test_gpu_cross_entropy_llama_vocabulary(dtype, opts):
    """(8192, 128256) logits on the GPU against torch CUDA float32 on the same
    logits: float32 within 2e-5 relative, bfloat16 within one bfloat16 ulp."""
    compare_big(torch.device("cuda"), 8192, 128256, dtype, opts)
    torch.cuda.empty_cache()


@pytest.mark.gpu
@needs_cuda
def test_gpu_cross_entropy_grad_output_and_inplace():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(3)
    a = torch.randn(512, 256, generator=g, device=dev, requires_grad=True)
    m = torch.randn(256, 4099, generator=g, device=dev)
    t = torch.randint(0, 4099, (512,), generator=g, device=dev)
    go = torch.randn(512, generator=g, device=dev)
    a2 = a.detach().clone().requires_grad_()
    want = F.cross_entropy(a2 @ m, t, reduction="none", label_smoothing=0.1)
    want.backward(go)
    z = a @ m
    ptr = z.data_ptr()
    loss = flt.cross_entropy(z, t, reduction="none", label_smoothing=0.1, inplace_backward=True)
    assert loss.device == dev and z.data_ptr() == ptr
    loss.backward(go)
    torch.testing.assert_close(loss, want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_linear_cross_entropy(dtype, reduction):
    """(1024, 512) hidden, a 32000-class head, on the GPU (the chunked path) against
    torch's float32 logits of the same (rounded) inputs: float32 1e-4 relative
    (+1e-5 max|grad|); bfloat16: the chunk's logits are bfloat16 matrix products
    (rounded), so 2e-2 relative (+2e-2 max|grad|)."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(5)
    h = torch.randn(1024, 512, generator=g, device=dev).to(dtype)
    w = (torch.randn(32000, 512, generator=g, device=dev) * 0.05).to(dtype)
    b = (torch.randn(32000, generator=g, device=dev) * 0.1).to(dtype)
    t = torch.randint(0, 32000, (1024,), generator=g, device=dev)
    t[::9] = -100
    go = torch.randn(1024, generator=g, device=dev).to(dtype) if reduction == "none" else None
    ps = [v.clone().requires_grad_() for v in (h, w, b)]
    loss = flt.linear_cross_entropy(ps[0], ps[1], t, ps[2], reduction=reduction, chunk_size=300)
    backward(loss, go)
    rs = [v.float().requires_grad_() for v in (h, w, b)]
    want = F.cross_entropy(F.linear(*rs), t, reduction=reduction)
    backward(want, None if go is None else go.float())
    assert loss.device == dev and loss.dtype == dtype
    rtol, arel = (1e-4, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    torch.testing.assert_close(loss.float(), want, rtol=rtol, atol=arel)
    for p, r in zip(ps, rs):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad.float(), r.grad, rtol=rtol, atol=arel * float(r.grad.abs().max()))


# --- 12. the custom ops (the torch.compile path) --------------------------------------------

def test_custom_ops_opcheck():
    """torch.library.opcheck on every registered op (schema, fake tensors,
    autograd registration), and their values equal the eager functions'."""
    g = gen(73)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = make_target(g, (5,), 7, 0.2)
    w = make_weight(g, 7, torch.float64)
    ops = torch.ops.fastloss
    for red in ("mean", "none"):
        args = (x, t, w, -100, red, 0.1, 1e-3, 3.0, 1.2, None, True)
        torch.library.opcheck(ops.cross_entropy.default, args)
        loss, grad = ops.cross_entropy(*args)
        want = flt.cross_entropy(x, t, w, reduction=red, label_smoothing=0.1, z_loss=1e-3, softcap=3.0,
                                 logit_scale=1.2)
        assert_close(loss, want, 1e-14, 0)
        assert_close(grad, reference(x.detach(), t, weight=w, reduction=red, label_smoothing=0.1, z_loss=1e-3,
                                     softcap=3.0, logit_scale=1.2)[1], 1e-10, 0, 1e-13)
    torch.library.opcheck(ops.mse.default, (x, y, None, "sum", True))
    _, h, lw, b, tt = lce_inputs(torch.float64, hshape=(6, 4), v=7)
    h.requires_grad_(), lw.requires_grad_(), b.requires_grad_()
    torch.library.opcheck(ops.linear_cross_entropy.default,
                          (h, lw, tt, b, None, -100, "mean", 0.0, 1e-3, None, 1.0, None, None, True))
    torch.library.opcheck(ops.linear_cross_entropy.default,
                          (h, lw, tt, b, None, -100, "none", 0.1, 0.0, None, 1.0, None, 2, False))
    go = torch.randn(6, generator=g, dtype=torch.float64)
    torch.library.opcheck(ops.linear_cross_entropy_backward.default,
                          (go, h.detach(), lw.detach(), tt, b.detach(), None, -100, "none", 0.0, 0.0, None, 1.0,
                           None, 3))


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """Under torch.compile (aot_eager: the custom ops and their registered autograd,
    without a C++ compiler) every function gives the eager losses and gradients;
    inplace_backward has no effect there (the input keeps its logits)."""
    g = gen(79)
    x, t, kw = ce_inputs((6, 9), torch.float64, dict(weight=True, label_smoothing=0.1, z_loss=1e-2, ignored=0.2))
    _, h, lw, b, tt = lce_inputs(torch.float64, hshape=(2, 3, 4), v=9)
    go = torch.randn(6, generator=g, dtype=torch.float64)

    def step(x, y, h, lw, b):
        ce = flt.cross_entropy(x * 1.0, t, **kw, inplace_backward=True)
        ce_none = flt.cross_entropy(x, t, reduction="none", softcap=2.0)
        m = flt.mse_loss(x, y, "mean")
        lce = flt.linear_cross_entropy(h, lw, tt, b, z_loss=1e-2)
        lce_none = flt.linear_cross_entropy(h, lw, tt, b, reduction="none")
        return ce + (ce_none * go).sum() + m + lce + (lce_none * go.reshape(2, 3)).sum(), x

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    y = torch.randn(6, 9, generator=g, dtype=torch.float64)
    results = []
    for fn in (step, compiled):
        leaves = [v.clone().requires_grad_() for v in (x, y, h, lw, b)]
        total, xout = fn(*leaves)
        total.backward()
        assert torch.equal(xout.detach(), x)
        results.append((total.detach(), [v.grad for v in leaves]))
    assert_close(results[1][0], results[0][0], 1e-13, 0)
    for a, c in zip(results[1][1], results[0][1]):
        assert_close(a, c, 1e-12, 0, 1e-14)


# --- 13. import ---------------------------------------------------------------------------------

def test_import_fastloss_does_not_import_torch():
    code = "import fastloss, sys; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch" in sys.modules and hasattr(fastloss, "cross_entropy")  # this process did import it


# --- 14. gradient buffers kept for reuse (fastloss.config.TORCH_GRAD_CACHE_BYTES) ----------------

def test_gradient_buffer_reused_only_when_free(monkeypatch):
    """A training loop's next step writes into the last step's gradient buffer
    once nothing holds it; never into one that a .grad, a view or a kept
    result still holds."""
    import fastloss.config
    monkeypatch.setattr(fastloss.config, "TORCH_GRAD_CACHE_MIN_BYTES", 0)
    B.release_buffers()
    x, t, _ = ce_inputs((6, 13), torch.float32, {}, seed=77)

    def step():
        xr = x.clone().requires_grad_()
        flt.cross_entropy(xr, t).backward()
        return xr.grad

    g1 = step()
    g2 = step()  # g1 is held: a new buffer
    assert g1.data_ptr() != g2.data_ptr()
    want = g1.clone()
    p1 = g1.data_ptr()
    view = g1[2:]
    del g1
    g3 = step()  # g1's memory is held by a view
    assert p1 not in (g3.data_ptr(), g2.data_ptr()) and torch.equal(view, want[2:])
    del view, g2, g3
    got = [step() for _ in range(3)]  # all held at once: three distinct buffers
    assert len({g.data_ptr() for g in got}) == 3
    for g in got:
        torch.testing.assert_close(g, want)
    B.release_buffers()


def test_gradient_buffer_reuse_off_and_bfloat16(monkeypatch):
    import fastloss.config
    monkeypatch.setattr(fastloss.config, "TORCH_GRAD_CACHE_MIN_BYTES", 0)
    B.release_buffers()
    x, t, _ = ce_inputs((5, 9), torch.bfloat16, {}, seed=78)
    xr = x.clone().requires_grad_()
    flt.cross_entropy(xr, t).backward()
    p = xr.grad.data_ptr()
    del xr
    xr = x.clone().requires_grad_()
    flt.cross_entropy(xr, t).backward()
    assert xr.grad.dtype == torch.bfloat16 and xr.grad.data_ptr() == p  # freed, so reused
    monkeypatch.setattr(fastloss.config, "TORCH_GRAD_CACHE_BYTES", 0)
    B.release_buffers()
    del xr
    xr = x.clone().requires_grad_()
    flt.cross_entropy(xr, t).backward()
    assert not B._KEPT
