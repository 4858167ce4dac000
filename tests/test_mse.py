"""fastloss.mse / fastloss.mse_with_grad against the float64 reference and PyTorch.

Every check compares the loss *and* the gradient, on inputs that are never all
zero. The reference and PyTorch see the inputs upcast to float64 (exactly the
values fastloss reads), so the only error allowed is fastloss's own: float32
accumulation (float64 for float64 input) and one rounding of the gradient to
the input dtype.

Tolerances (kept next to the dtype in ``DTYPES``):

* ``loss_rtol``: reduced (mean/sum) loss. 1e-6 for float32 accumulation over up
  to 2^20 terms: blocked/pairwise float32 sums or float64 partial sums pass,
  one sequential float32 sum over 2^20 terms (~2e-5) does not. float64 input:
  1e-12.
* ``elem_rtol``: per-element ``none`` loss ``w * d * d``: a few roundings in the
  accumulation dtype (2^-21 = 8 float32 unit roundoffs).
* ``grad_rtol``/``grad_atol``: the gradient is computed in the accumulation dtype
  (a few float32 roundings, < 2^-22) and rounded once to the input dtype, so the
  error is at most half a unit in the last place of that dtype: 2^-11 (float16)
  and 2^-8 (bfloat16) relative, with 1% slack for the float32 error before the
  rounding. ``grad_atol`` for float16 is half a subnormal step (2^-25): mean
  gradients over 2^20 elements (~2e-6) are subnormal in float16.
"""

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastloss
from reference import mse_reference, to_float64

BF16 = np.dtype(ml_dtypes.bfloat16)

#             dtype,             loss_rtol, elem_rtol, grad_rtol, grad_atol
DTYPES = [
    pytest.param(np.dtype(np.float64), 1e-12, 1e-14, 1e-14, 0.0, id="float64"),
    pytest.param(np.dtype(np.float32), 1e-6, 2.0**-21, 2.0**-22, 1e-37, id="float32"),
    pytest.param(np.dtype(np.float16), 1e-6, 2.0**-21, 2.0**-11 * 1.01, 2.0**-25 * 1.01, id="float16"),
    pytest.param(BF16, 1e-6, 2.0**-21, 2.0**-8 * 1.01, 1e-37, id="bfloat16"),
]

#: dtype -> (loss_rtol, elem_rtol, grad_rtol, grad_atol), for tests not parametrized by DTYPES.
TOL = {p.values[0]: p.values[1:] for p in DTYPES}

SHAPES = [
    pytest.param((1024, 1024), id="realistic-2^20"),
    pytest.param((37, 1001), id="odd-37x1001"),
    pytest.param((4, 33, 17), id="3d-4x33x17"),
    pytest.param((3, 2), id="tiny-3x2"),
    pytest.param((1,), id="one-element"),
]

REDUCTIONS = ["mean", "sum", "none"]

#: weight=None, or a weight of one of these shapes (broadcast to pred.shape).
WEIGHT_KINDS = [None, "full", "last", "col", "scalar"]


def weight_shape(kind, shape):
    return {
        "full": tuple(shape),
        "last": (shape[-1],),  # (D,)
        "col": tuple(shape[:-1]) + (1,),  # (N, 1)
        "scalar": (1,),
    }[kind]


def make_pair(rng, shape, dtype):
    """pred, target in ``dtype``: standard-normal, every difference non-zero."""
    pred = rng.standard_normal(shape).astype(dtype)
    target = (rng.standard_normal(shape) + 0.25).astype(dtype)
    same = to_float64(pred) == to_float64(target)
    if same.any():
        target[same] = (to_float64(target[same]) + 1.0).astype(dtype)
    return pred, target


def make_weight(rng, kind, shape, dtype):
    if kind is None:
        return None
    return rng.uniform(0.25, 2.0, size=weight_shape(kind, shape)).astype(dtype)


def torch_mse(pred, target, reduction, weight=None, grad_output=None):
    """PyTorch float64 loss and gradient (weight expanded to pred's full shape)."""
    p = torch.from_numpy(to_float64(pred)).requires_grad_(True)
    t = torch.from_numpy(to_float64(target))
    w = None
    if weight is not None:
        w = torch.from_numpy(np.broadcast_to(to_float64(weight), p.shape).copy())
    loss = F.mse_loss(p, t, reduction=reduction, weight=w)
    if grad_output is None:
        g = torch.ones_like(loss)
    else:
        g = torch.from_numpy(np.broadcast_to(np.asarray(grad_output, np.float64), loss.shape).copy())
    loss.backward(g)
    return loss.detach().numpy(), p.grad.numpy()


def check_loss(loss, expected, dtype, reduction, loss_rtol, elem_rtol, what=""):
    if reduction == "none":
        assert isinstance(loss, np.ndarray), f"{what}: none must return an array, got {type(loss)}"
        want = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
        assert loss.dtype == want, f"{what}: none loss dtype {loss.dtype}, expected {want}"
        assert loss.shape == np.shape(expected)
        np.testing.assert_allclose(loss, expected, rtol=elem_rtol, atol=0, err_msg=what)
    else:
        assert type(loss) is float, f"{what}: {reduction} must return a Python float, got {type(loss)}"
        np.testing.assert_allclose(loss, expected, rtol=loss_rtol, atol=0, err_msg=what)


def check_grad(grad, expected, dtype, grad_rtol, grad_atol, what=""):
    assert isinstance(grad, np.ndarray)
    assert grad.dtype == dtype, f"{what}: grad dtype {grad.dtype}, expected {dtype}"
    assert grad.shape == np.shape(expected)
    np.testing.assert_allclose(to_float64(grad), expected, rtol=grad_rtol, atol=grad_atol, err_msg=what)


# --------------------------------------------------------------------------------------
# Loss and gradient vs the reference and PyTorch: dtype x shape x reduction x weight
# --------------------------------------------------------------------------------------


# Every weight kind on every shape, except the two broadcast kinds on the 2^20 shape
# (covered on the odd and 3-D shapes; saves ~4 s).
SHAPE_WEIGHT = [
    pytest.param(s.values[0], wk, id=f"{s.id}-w{wk}")
    for s in SHAPES
    for wk in WEIGHT_KINDS
    if not (s.values[0] == (1024, 1024) and wk in ("col", "scalar"))
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape, weight_kind", SHAPE_WEIGHT)
@pytest.mark.parametrize("dtype, loss_rtol, elem_rtol, grad_rtol, grad_atol", DTYPES)
def test_matches_reference_and_torch(
    rng, dtype, loss_rtol, elem_rtol, grad_rtol, grad_atol, shape, weight_kind, reduction
):
    pred, target = make_pair(rng, shape, dtype)
    weight = make_weight(rng, weight_kind, shape, dtype)

    loss, grad = fastloss.mse_with_grad(pred, target, reduction=reduction, weight=weight)
    loss_only = fastloss.mse(pred, target, reduction=reduction, weight=weight)

    ref_loss, ref_grad = mse_reference(pred, target, reduction=reduction, weight=weight)
    t_loss, t_grad = torch_mse(pred, target, reduction, weight)
    # The two oracles agree with each other (guards the oracles themselves).
    np.testing.assert_allclose(ref_loss, t_loss, rtol=1e-13)
    np.testing.assert_allclose(ref_grad, t_grad, rtol=1e-13, atol=1e-300)

    for name, exp_loss, exp_grad in (("reference", ref_loss, ref_grad), ("torch", t_loss, t_grad)):
        check_loss(loss, exp_loss, dtype, reduction, loss_rtol, elem_rtol, f"mse_with_grad vs {name}")
        check_loss(loss_only, exp_loss, dtype, reduction, loss_rtol, elem_rtol, f"mse vs {name}")
        check_grad(grad, exp_grad, dtype, grad_rtol, grad_atol, f"grad vs {name}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype, loss_rtol, elem_rtol, grad_rtol, grad_atol", DTYPES)
def test_default_reduction_is_mean(rng, dtype, loss_rtol, elem_rtol, grad_rtol, grad_atol, reduction):
    pred, target = make_pair(rng, (5, 7), dtype)
    assert fastloss.mse(pred, target) == fastloss.mse(pred, target, reduction="mean")
    loss, grad = fastloss.mse_with_grad(pred, target)
    ref_loss, ref_grad = mse_reference(pred, target)
    check_loss(loss, ref_loss, dtype, "mean", loss_rtol, elem_rtol)
    check_grad(grad, ref_grad, dtype, grad_rtol, grad_atol)


WEIGHT_LAYOUTS = [
    # (pred shape, weight shape): every way a weight can broadcast, incl. size-1 dims
    ((4, 33, 17), (17,)),
    ((4, 33, 17), (1, 17)),
    ((4, 33, 17), (33, 17)),
    ((4, 33, 17), (33, 1)),
    ((4, 33, 17), (4, 1, 1)),
    ((4, 33, 17), (4, 33, 1)),
    ((4, 33, 17), (4, 1, 17)),  # mixed: broadcast in the middle only
    ((4, 33, 17), (1, 1, 1)),
    ((4, 33, 17), ()),
    ((2, 1, 3), (1, 3)),
    ((2, 3, 1), (3, 1)),
    ((2, 1, 3), (2, 1, 1)),
    ((5, 1), (1,)),
    ((1, 5), (5,)),
    ((1, 5), (1, 1)),
    ((7,), (7,)),
    ((7,), (1,)),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape, wshape", WEIGHT_LAYOUTS, ids=[f"{a}-w{b}" for a, b in WEIGHT_LAYOUTS])
def test_weight_broadcast_layouts(rng, shape, wshape, reduction):
    pred, target = make_pair(rng, shape, np.dtype(np.float64))
    weight = rng.uniform(0.25, 2.0, size=wshape)
    if weight.size > 2:
        weight.reshape(-1)[::3] = 0.0  # zero weights switch elements off, as in PyTorch
    loss, grad = fastloss.mse_with_grad(pred, target, reduction=reduction, weight=weight)
    ref_loss, ref_grad = mse_reference(pred, target, reduction=reduction, weight=weight)
    t_loss, t_grad = torch_mse(pred, target, reduction, weight)
    for exp_loss, exp_grad in ((ref_loss, ref_grad), (t_loss, t_grad)):
        check_loss(loss, exp_loss, np.dtype(np.float64), reduction, 1e-12, 1e-14)
        check_grad(grad, exp_grad, np.dtype(np.float64), 1e-14, 0.0)
    check_loss(fastloss.mse(pred, target, reduction=reduction, weight=weight), ref_loss,
               np.dtype(np.float64), reduction, 1e-12, 1e-14)


# --------------------------------------------------------------------------------------
# grad_output
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_kind", [None, "last"])
@pytest.mark.parametrize(
    "reduction, go_kind",
    [
        ("mean", "float"),
        ("mean", "np-scalar"),
        ("mean", "0d-array"),
        ("sum", "float"),
        ("sum", "0d-array"),
        ("none", "array"),
        ("none", "float"),
    ],
)
@pytest.mark.parametrize("dtype, loss_rtol, elem_rtol, grad_rtol, grad_atol", DTYPES)
def test_grad_output(
    rng, dtype, loss_rtol, elem_rtol, grad_rtol, grad_atol, reduction, go_kind, weight_kind
):
    shape = (37, 1001)
    pred, target = make_pair(rng, shape, dtype)
    weight = make_weight(rng, weight_kind, shape, dtype)
    if go_kind == "float":
        go = -0.7385
    elif go_kind == "np-scalar":
        go = np.float32(2.5)
    elif go_kind == "0d-array":
        go = np.array(-3.125)
    else:  # per-element upstream gradient for none, both signs, never zero
        go = rng.uniform(0.5, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    go_before = np.array(go, copy=True)

    loss, grad = fastloss.mse_with_grad(pred, target, reduction=reduction, weight=weight, grad_output=go)
    ref_loss, ref_grad = mse_reference(pred, target, reduction=reduction, weight=weight, grad_output=go)
    t_loss, t_grad = torch_mse(pred, target, reduction, weight, grad_output=go)
    np.testing.assert_allclose(ref_grad, t_grad, rtol=1e-13, atol=1e-300)

    # grad_output does not change the loss, only the gradient.
    check_loss(loss, ref_loss, dtype, reduction, loss_rtol, elem_rtol, "loss")
    check_grad(grad, ref_grad, dtype, grad_rtol, grad_atol, "grad vs reference")
    check_grad(grad, t_grad, dtype, grad_rtol, grad_atol, "grad vs torch")
    np.testing.assert_array_equal(np.asarray(go), go_before)


# --------------------------------------------------------------------------------------
# out=
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_kind", [None, "col"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(37, 1001), (4, 33, 17), (1,)], ids=["odd", "3d", "one"])
@pytest.mark.parametrize("dtype, loss_rtol, elem_rtol, grad_rtol, grad_atol", DTYPES)
def test_out(rng, dtype, loss_rtol, elem_rtol, grad_rtol, grad_atol, shape, reduction, weight_kind):
    pred, target = make_pair(rng, shape, dtype)
    weight = make_weight(rng, weight_kind, shape, dtype)
    out = np.full(shape, np.nan, dtype=dtype)  # poisoned: every element must be written
    loss, grad = fastloss.mse_with_grad(pred, target, reduction=reduction, weight=weight, out=out)
    assert grad is out
    assert np.isfinite(to_float64(out)).all(), "some gradient elements were not written"
    ref_loss, ref_grad = mse_reference(pred, target, reduction=reduction, weight=weight)
    check_loss(loss, ref_loss, dtype, reduction, loss_rtol, elem_rtol)
    check_grad(out, ref_grad, dtype, grad_rtol, grad_atol)
    # Same answer as without out=: element-wise values bit for bit; a sum up to
    # float64 rounding (the compiled loop's vectorised order depends on the
    # buffers' alignment; docs/semantics.md: MSE sums may differ in the last bits).
    loss2, grad2 = fastloss.mse_with_grad(pred, target, reduction=reduction, weight=weight)
    np.testing.assert_array_equal(to_float64(grad2), to_float64(out))
    if reduction == "none":
        np.testing.assert_array_equal(np.asarray(loss2), np.asarray(loss))
    else:
        np.testing.assert_allclose(loss2, loss, rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype, loss_rtol, elem_rtol, grad_rtol, grad_atol", DTYPES)
def test_out_with_array_grad_output(rng, dtype, loss_rtol, elem_rtol, grad_rtol, grad_atol):
    """reduction='none' with a per-element grad_output into a poisoned out=."""
    shape = (37, 1001)
    pred, target = make_pair(rng, shape, dtype)
    weight = make_weight(rng, "col", shape, dtype)
    go = rng.uniform(0.5, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    out = np.full(shape, np.nan, dtype)
    loss, grad = fastloss.mse_with_grad(pred, target, reduction="none", weight=weight,
                                        grad_output=go, out=out)
    assert grad is out
    ref_loss, ref_grad = mse_reference(pred, target, reduction="none", weight=weight, grad_output=go)
    check_loss(loss, ref_loss, dtype, "none", loss_rtol, elem_rtol)
    check_grad(out, ref_grad, dtype, grad_rtol, grad_atol)


@pytest.mark.parametrize("dtype", [p.values[0] for p in DTYPES], ids=[p.id for p in DTYPES])
def test_all_weights_zero(rng, dtype):
    """sum(w) = 0: mean is 0.0 with a zero gradient (the reference's rule, as for a
    cross-entropy mean over zero counted tokens; PyTorch gives NaN); sum is 0.0."""
    pred, target = make_pair(rng, (5, 7), dtype)
    weight = np.zeros((7,), dtype)
    loss, grad = fastloss.mse_with_grad(pred, target, weight=weight)
    ref_loss, ref_grad = mse_reference(pred, target, weight=weight)
    assert type(loss) is float and loss == ref_loss == 0.0
    np.testing.assert_array_equal(to_float64(grad), ref_grad)
    assert fastloss.mse(pred, target, weight=weight) == 0.0
    loss, grad = fastloss.mse_with_grad(pred, target, weight=weight, reduction="sum")
    assert loss == 0.0 and not np.any(to_float64(grad))


# --------------------------------------------------------------------------------------
# Empty inputs, single elements, 0-d
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (2, 0, 3)])
@pytest.mark.parametrize("dtype", [p.values[0] for p in DTYPES], ids=[p.id for p in DTYPES])
def test_empty(dtype, shape, weighted):
    pred = np.empty(shape, dtype)
    target = np.empty(shape, dtype)
    weight = np.full((shape[-1],), 1.5, dtype) if weighted else None
    acc = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    for reduction in ("mean", "sum"):
        loss = fastloss.mse(pred, target, reduction=reduction, weight=weight)
        assert type(loss) is float and loss == 0.0, (reduction, loss)
        loss, grad = fastloss.mse_with_grad(pred, target, reduction=reduction, weight=weight)
        assert type(loss) is float and loss == 0.0, (reduction, loss)
        assert grad.shape == shape and grad.dtype == dtype
    loss, grad = fastloss.mse_with_grad(pred, target, reduction="none", weight=weight)
    assert loss.shape == shape and loss.dtype == acc
    assert grad.shape == shape and grad.dtype == dtype
    out = np.empty(shape, dtype)
    loss, grad = fastloss.mse_with_grad(pred, target, out=out)
    assert grad is out and loss == 0.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [p.values[0] for p in DTYPES], ids=[p.id for p in DTYPES])
def test_single_element_exact(dtype, reduction):
    # 1.5 - (-0.25) = 1.75; loss = 3.0625, grad = 3.5: all exact in every dtype.
    pred = np.array([1.5], dtype)
    target = np.array([-0.25], dtype)
    loss, grad = fastloss.mse_with_grad(pred, target, reduction=reduction)
    assert float(np.asarray(loss).reshape(-1)[0]) == 3.0625
    assert to_float64(grad).tolist() == [3.5]
    # weight 0.5, grad_output 2: loss (none/sum) 1.53125, mean 3.0625 (w-normalised).
    loss, grad = fastloss.mse_with_grad(
        pred, target, reduction=reduction, weight=np.array([0.5], dtype), grad_output=2.0
    )
    expect = 3.0625 if reduction == "mean" else 1.53125
    assert float(np.asarray(loss).reshape(-1)[0]) == expect
    assert to_float64(grad).tolist() == [7.0 if reduction == "mean" else 3.5]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_dim_inputs(reduction):
    """0-d pred/target: PyTorch accepts them (the contract defers to it where silent)."""
    pred = np.array(1.5, np.float32)
    target = np.array(-0.25, np.float32)
    loss, grad = fastloss.mse_with_grad(pred, target, reduction=reduction)
    assert grad.shape == () and grad.dtype == np.float32
    assert float(grad) == 3.5
    if reduction == "none":
        assert np.shape(loss) == () and float(loss) == 3.0625
    else:
        assert type(loss) is float and loss == 3.0625


def test_python_lists_accepted():
    loss, grad = fastloss.mse_with_grad([1.0, 2.0, -3.0], [0.5, 2.5, -1.0], reduction="sum")
    # d = [0.5, -0.5, -2.0]
    assert type(loss) is float and loss == 0.25 + 0.25 + 4.0
    assert grad.dtype == np.float64
    np.testing.assert_array_equal(grad, [1.0, -1.0, -4.0])
    assert fastloss.mse([1.0, 2.0, -3.0], [0.5, 2.5, -1.0]) == pytest.approx(4.5 / 3, rel=1e-15)


# --------------------------------------------------------------------------------------
# Non-contiguous inputs, mixed dtypes, inputs untouched
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["strided", "transposed", "reversed", "broadcast-view"])
@pytest.mark.parametrize("dtype, loss_rtol, elem_rtol, grad_rtol, grad_atol", DTYPES)
def test_non_contiguous(rng, dtype, loss_rtol, elem_rtol, grad_rtol, grad_atol, layout, reduction):
    base_p, base_t = make_pair(rng, (74, 2003), dtype)
    if layout == "strided":
        pred, target = base_p[::2, 1::2], base_t[1::2, 2::2]
        weight = rng.uniform(0.5, 2.0, size=(2, 1001)).astype(dtype)[0, :]  # contiguous (D,)
        weight = np.repeat(weight, 2)[::2]  # non-contiguous (D,)
    elif layout == "transposed":
        pred, target = base_p[:, :37].T, np.asfortranarray(base_t[:, :37]).T
        weight = rng.uniform(0.5, 2.0, size=(74, 37)).astype(dtype).T  # full, F-order
    elif layout == "reversed":
        pred, target = base_p[::-1, ::-3], base_t[::-1, ::3]
        weight = rng.uniform(0.5, 2.0, size=(74, 1)).astype(dtype)[::-1]
    else:  # a stride-0 view for target, common for a broadcast label
        pred = base_p[:5]
        target = np.broadcast_to(base_t[0], pred.shape)
        weight = None
    assert not pred.flags.c_contiguous or not target.flags.c_contiguous
    loss, grad = fastloss.mse_with_grad(pred, target, reduction=reduction, weight=weight)
    ref_loss, ref_grad = mse_reference(pred, target, reduction=reduction, weight=weight)
    t_loss, t_grad = torch_mse(pred, target, reduction, weight)
    check_loss(loss, ref_loss, dtype, reduction, loss_rtol, elem_rtol)
    check_loss(loss, t_loss, dtype, reduction, loss_rtol, elem_rtol)
    check_grad(grad, ref_grad, dtype, grad_rtol, grad_atol)
    # Same numbers as from contiguous copies.
    loss_c, grad_c = fastloss.mse_with_grad(
        np.ascontiguousarray(pred),
        np.ascontiguousarray(target),
        reduction=reduction,
        weight=None if weight is None else np.ascontiguousarray(weight),
    )
    np.testing.assert_allclose(np.asarray(loss), np.asarray(loss_c), rtol=loss_rtol)
    np.testing.assert_allclose(to_float64(grad), to_float64(grad_c), rtol=grad_rtol, atol=grad_atol)


# Each pair is a fresh numba specialisation (seconds of compile time): keep it short.
MIXED = [
    (np.dtype(np.float32), np.dtype(np.float64)),
    (BF16, np.dtype(np.float32)),
    (np.dtype(np.float16), BF16),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pdt, tdt", MIXED, ids=[f"{a.name}-{b.name}" for a, b in MIXED])
def test_mixed_pred_target_dtypes(rng, pdt, tdt, reduction):
    """Either computed correctly from the exact values given (grad in pred's dtype) or a
    TypeError naming ``target``; never a silent wrong answer."""
    pred = rng.standard_normal((37, 101)).astype(pdt)
    target = (rng.standard_normal((37, 101)) + 0.5).astype(tdt)
    try:
        loss, grad = fastloss.mse_with_grad(pred, target, reduction=reduction)
    except TypeError as exc:
        assert "target" in str(exc), f"TypeError does not name the argument: {exc}"
        with pytest.raises(TypeError, match="target"):
            fastloss.mse(pred, target, reduction=reduction)
        return
    assert grad.dtype == pdt
    ref_loss, ref_grad = mse_reference(pred, target, reduction=reduction)
    # The wider of the two dtypes decides accumulation; float32 tolerances cover both.
    if reduction == "none":
        np.testing.assert_allclose(np.asarray(loss, np.float64), ref_loss, rtol=2.0**-21)
    else:
        assert type(loss) is float
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    _, _, grad_rtol, grad_atol = TOL[pdt]
    np.testing.assert_allclose(to_float64(grad), ref_grad, rtol=grad_rtol, atol=grad_atol)
    np.testing.assert_allclose(
        fastloss.mse(pred, target, reduction=reduction), loss, rtol=1e-6
    )


@pytest.mark.parametrize("pdt, wdt", [(np.float32, np.float64), (BF16, np.float32), (np.float64, np.float32)])
def test_weight_dtype_may_differ(rng, pdt, wdt):
    pred, target = make_pair(rng, (37, 101), np.dtype(pdt))
    weight = rng.uniform(0.5, 2.0, size=(101,)).astype(wdt)
    loss, grad = fastloss.mse_with_grad(pred, target, weight=weight)
    ref_loss, ref_grad = mse_reference(pred, target, weight=weight)
    loss_rtol, _, grad_rtol, grad_atol = TOL[np.dtype(pdt)]
    np.testing.assert_allclose(loss, ref_loss, rtol=max(loss_rtol, 1e-6))
    assert grad.dtype == np.dtype(pdt)
    np.testing.assert_allclose(to_float64(grad), ref_grad, rtol=grad_rtol, atol=grad_atol)


@pytest.mark.parametrize("use_out", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [p.values[0] for p in DTYPES], ids=[p.id for p in DTYPES])
def test_inputs_not_modified(rng, dtype, reduction, use_out):
    pred, target = make_pair(rng, (37, 1001), dtype)
    weight = make_weight(rng, "last", (37, 1001), dtype)
    go = rng.uniform(0.5, 2.0, size=(37, 1001)) if reduction == "none" else 1.5
    copies = [np.array(a, copy=True) for a in (pred, target, weight, go)]
    out = np.full(pred.shape, np.nan, dtype) if use_out else None
    fastloss.mse_with_grad(pred, target, reduction=reduction, weight=weight, grad_output=go, out=out)
    fastloss.mse(pred, target, reduction=reduction, weight=weight)
    for before, after in zip(copies, (pred, target, weight, go)):
        after = np.asarray(after)
        assert before.dtype == after.dtype
        np.testing.assert_array_equal(before.reshape(-1).view(np.uint8), after.reshape(-1).view(np.uint8))


# --------------------------------------------------------------------------------------
# NaN stays where it is; extreme values use float32 accumulation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["pred", "target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype, loss_rtol, elem_rtol, grad_rtol, grad_atol", DTYPES)
def test_nan_affects_only_its_element(
    rng, dtype, loss_rtol, elem_rtol, grad_rtol, grad_atol, reduction, where
):
    shape = (37, 1001)
    pred, target = make_pair(rng, shape, dtype)
    weight = make_weight(rng, "last", shape, dtype)
    (pred if where == "pred" else target)[17, 503] = np.nan
    loss, grad = fastloss.mse_with_grad(pred, target, reduction=reduction, weight=weight)
    nan_mask = np.zeros(shape, bool)
    nan_mask[17, 503] = True
    g = to_float64(grad)
    np.testing.assert_array_equal(np.isnan(g), nan_mask)
    ref_loss, ref_grad = mse_reference(pred, target, reduction=reduction, weight=weight)
    np.testing.assert_allclose(g[~nan_mask], ref_grad[~nan_mask], rtol=grad_rtol, atol=grad_atol)
    if reduction == "none":
        np.testing.assert_array_equal(np.isnan(loss), nan_mask)
        np.testing.assert_allclose(loss[~nan_mask], ref_loss[~nan_mask], rtol=elem_rtol)
    else:
        assert type(loss) is float and np.isnan(loss)
        assert np.isnan(fastloss.mse(pred, target, reduction=reduction, weight=weight))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float16_accumulates_in_float32(reduction):
    """d = 120000 overflows float16 but not the float32 accumulator."""
    pred = np.full((4, 4), 60000.0, np.float16)
    target = np.full((4, 4), -60000.0, np.float16)
    pred[0, 0] = 1000.0  # not all equal: d = 61000 there
    loss, grad = fastloss.mse_with_grad(pred, target, reduction=reduction)
    ref_loss, ref_grad = mse_reference(pred, target, reduction=reduction)
    assert np.all(np.isfinite(np.asarray(loss)))
    np.testing.assert_allclose(np.asarray(loss, np.float64), ref_loss, rtol=1e-6)
    if reduction == "mean":  # grad = 2 d / 16 <= 15000, finite in float16
        assert np.isfinite(to_float64(grad)).all()
        np.testing.assert_allclose(to_float64(grad), ref_grad, rtol=2.0**-11 * 1.01)
    else:  # 2 d = 240000 > float16 max: rounds to inf, as one rounding of the exact value does
        with np.errstate(over="ignore"):
            expected = to_float64(ref_grad.astype(np.float16))
        np.testing.assert_array_equal(to_float64(grad), expected)


# --------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [p.values[0] for p in DTYPES], ids=[p.id for p in DTYPES])
def test_result_types(rng, dtype):
    pred, target = make_pair(rng, (3, 5), dtype)
    acc = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    for reduction in ("mean", "sum"):
        assert type(fastloss.mse(pred, target, reduction=reduction)) is float
        loss, grad = fastloss.mse_with_grad(pred, target, reduction=reduction)
        assert type(loss) is float
        assert type(grad) is np.ndarray and grad.dtype == dtype and grad.shape == (3, 5)
    loss = fastloss.mse(pred, target, reduction="none")
    assert type(loss) is np.ndarray and loss.dtype == acc and loss.shape == (3, 5)
    loss, grad = fastloss.mse_with_grad(pred, target, reduction="none")
    assert type(loss) is np.ndarray and loss.dtype == acc and loss.shape == (3, 5)
    assert type(grad) is np.ndarray and grad.dtype == dtype and grad.shape == (3, 5)
    # Results are fresh arrays, not views of the inputs.
    assert not np.shares_memory(grad, pred) and not np.shares_memory(grad, target)
