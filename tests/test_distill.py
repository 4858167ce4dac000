"""fastloss.distill / distill_with_grad against the float64 reference
(tests/reference_distill.py) and PyTorch (float64 on the same input values).

Tolerances live next to each dtype in ``DTYPES``; references are evaluated on
the input values upcast to float64, so the only error allowed is fastloss's:
float32 (float64) accumulation and one rounding of the gradient.
"""

import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastloss
from reference_distill import distill_reference, per_token, to_float64, topk_to_dense

BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


@dataclass(frozen=True)
class Tol:
    loss: float  # rtol of the loss
    loss_atol: float  # atol of a per-token loss (float32 sums of O(|z|) terms cancel to a small KL)
    grad: float  # rtol of a gradient element (one rounding to the dtype)
    grad_atol: float  # atol as a fraction of max |ref grad|
    tiny: float = 0.0  # absolute atol for rounding into the dtype's subnormal range (float16: 2**-24)


# dtype of the student, tolerance. Gradients are rounded once to the student's dtype
# (bf16 2**-8, f16 2**-11); losses are float32 sums (float64 for float64 input).
DTYPES = [
    pytest.param(F64, Tol(1e-11, 1e-11, 1e-9, 1e-12), id="float64"),
    pytest.param(F32, Tol(2e-5, 2e-5, 2e-5, 2e-6), id="float32"),
    pytest.param(F16, Tol(2e-5, 2e-5, 2e-3, 2e-4, tiny=6e-8), id="float16"),
    pytest.param(BF16, Tol(2e-5, 2e-5, 1e-2, 2e-3), id="bfloat16"),
]
TOLS = {p.values[0]: p.values[1] for p in DTYPES}
KINDS = ["kl", "reverse_kl", "jsd"]
REDUCTIONS = ["batchmean", "mean", "sum", "none"]
SHAPES = [
    pytest.param((64, 32000), id="64x32000"),
    pytest.param((5, 4099), id="5x4099"),  # three row blocks, the last short
    pytest.param((37, 1001), id="37x1001"),
    pytest.param((3, 2), id="3x2"),
    pytest.param((1, 1), id="1x1"),
]


# ----------------------------------------------------------------------------- helpers


def make(rng, shape, dtype, scale=3.0):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(dtype)


def near(rng, s, dtype, noise=1.0):
    """A teacher correlated with the student (a realistic, non-trivial KL)."""
    return (to_float64(s) + noise * rng.standard_normal(s.shape)).astype(dtype)


def targets_with_ignored(rng, shape, V, ignore_index=-100, frac=0.25):
    t = rng.integers(0, V, size=shape)
    t[rng.random(shape) < frac] = ignore_index
    return t


def check(loss, grad, student, reduction, tol, ref_loss, ref_grad, what=""):
    """Contract types, and closeness to (ref_loss, ref_grad)."""
    student = np.asarray(student)
    acc = F64 if np.asarray(student).dtype == F64 else F32
    if reduction == "none":
        assert isinstance(loss, np.ndarray) and loss.shape == student.shape[:-1], what
        assert loss.dtype in (acc, F64), what
    else:
        assert type(loss) is float, f"{what}: {type(loss)}"
    ntok = max(1, int(np.prod(student.shape[:-1]))) if reduction == "sum" else 1
    np.testing.assert_allclose(to_float64(loss), to_float64(ref_loss), rtol=tol.loss,
                               atol=tol.loss_atol * ntok, equal_nan=True, err_msg=f"{what} loss")
    if grad is not None:
        assert isinstance(grad, np.ndarray) and grad.dtype == student.dtype and grad.shape == student.shape
        g, r = to_float64(grad), to_float64(ref_grad)
        fin = np.isfinite(r)
        scale = (float(np.abs(r[fin]).max()) if fin.any() else 0.0) or 1.0
        np.testing.assert_allclose(g, r, rtol=tol.grad, atol=tol.grad_atol * scale + tol.tiny, equal_nan=True,
                                   err_msg=f"{what} grad")


def both(student, teacher, **kw):
    """distill and distill_with_grad; their losses agree up to rounding."""
    grad_kw = {k: kw.pop(k) for k in ("grad_output", "out", "inplace") if k in kw}
    only = fastloss.distill(student, teacher, **kw)
    loss, grad = fastloss.distill_with_grad(student, teacher, **kw, **grad_kw)
    np.testing.assert_allclose(to_float64(only), to_float64(loss), rtol=2e-5, atol=2e-5, equal_nan=True)
    return loss, grad


def torch_distill(student, teacher, *, kind="kl", temperature=1.0, beta=0.5, scale_by_t2=False,
                  reduction="batchmean", targets=None, ignore_index=-100, soft_weight=1.0, hard_weight=0.0,
                  grad_output=None):
    """The same loss from torch.nn.functional in float64, gradient by autograd."""
    s = torch.tensor(to_float64(student), requires_grad=True)
    t = torch.tensor(to_float64(teacher))
    T = temperature
    ls = F.log_softmax(s / T, dim=-1)
    lt = F.log_softmax(t / T, dim=-1)
    if kind == "jsd" and beta == 0.0:
        kind = "kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "kl":
        S = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    elif kind == "reverse_kl":
        S = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    else:
        S = trl_jsd(s, t, beta=beta, temperature=T, reduction="none_tokens")
    loss = soft_weight * (T * T if scale_by_t2 else 1.0) * S
    V = s.shape[-1]
    if targets is not None:
        tg = torch.tensor(np.asarray(targets).astype(np.int64))
        counted = tg != ignore_index
        if hard_weight > 0:
            ce = F.cross_entropy(s.reshape(-1, V), tg.reshape(-1), reduction="none", ignore_index=ignore_index)
            loss = loss + hard_weight * ce.reshape(tg.shape)
        loss = torch.where(counted, loss, torch.zeros_like(loss))
        count = int(counted.sum())
    else:
        count = int(np.prod(s.shape[:-1]))
    if reduction == "none":
        g = torch.ones_like(loss) if grad_output is None else torch.as_tensor(
            np.broadcast_to(np.asarray(grad_output, np.float64), loss.shape).copy())
        (loss * g).sum().backward()
        return loss.detach().numpy(), s.grad.numpy()
    den = {"batchmean": count, "mean": count * V, "sum": 1}[reduction]
    total = loss.sum() / den if den else loss.sum() * 0.0
    total = torch.nan_to_num(total) if den == 0 else total
    (total * (1.0 if grad_output is None else float(grad_output))).backward()
    return float(total.detach()), s.grad.numpy()


def trl_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean"):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (huggingface/trl, trl/trainer/gkd_trainer.py),
    transcribed from its formula: both log-softmaxes at temperature T; beta = 0 gives
    kl_div(student, teacher) = KL(p_t || p_s), beta = 1 kl_div(teacher, student), otherwise
    the mixture log m = logsumexp(log p_s + log(1 - beta), log p_t + log(beta)) and
    beta kl_div(m, teacher) + (1 - beta) kl_div(m, student), elementwise; then the label
    mask and TRL's reductions ("batchmean": sum / counted tokens). "none_tokens" (ours):
    the elementwise values summed over V."""
    ls = F.log_softmax(student_logits / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=ls.dtype)
        lm = torch.logsumexp(torch.stack([ls + torch.log(1 - b), lt + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(lm, lt, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            lm, ls, reduction="none", log_target=True)
    if reduction == "none_tokens":
        return jsd.sum(-1)
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / mask.sum() if labels is not None else jsd.sum() / jsd.size(0)
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


# ----------------------------------------------------------------------------- main grid


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_and_torch(rng, kind, shape, dtype, tol):
    s = make(rng, shape, dtype)
    t = near(rng, s, dtype)
    before_s, before_t = s.copy(), t.copy()
    kw = dict(kind=kind, temperature=2.0, beta=0.3)
    for reduction in REDUCTIONS:
        loss, grad = both(s, t, reduction=reduction, **kw)
        check(loss, grad, s, reduction, tol, *distill_reference(s, t, reduction=reduction, **kw), what="ref")
        check(loss, grad, s, reduction, tol, *torch_distill(s, t, reduction=reduction, **kw), what="torch")
    assert np.array_equal(s.view(np.uint8), before_s.view(np.uint8)), "student was modified"
    assert np.array_equal(t.view(np.uint8), before_t.view(np.uint8)), "teacher was modified"


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [DTYPES[1], DTYPES[3]])
@pytest.mark.parametrize("shape", [(512, 32000), (16, 128256)])
@pytest.mark.parametrize("kind", KINDS)
def test_realistic_shapes(rng, kind, shape, dtype, tol):
    s = make(rng, shape, dtype)
    t = near(rng, s, dtype)
    tg = targets_with_ignored(rng, shape[:-1], shape[-1])
    kw = dict(kind=kind, temperature=1.5, targets=tg, hard_weight=0.4, reduction="batchmean")
    loss, grad = fastloss.distill_with_grad(s, t, **kw)
    check(loss, grad, s, "batchmean", tol, *distill_reference(s, t, **kw))


OPTIONS = [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(temperature=0.7, scale_by_t2=True), id="T0.7-t2"),
    pytest.param(dict(temperature=4.0, scale_by_t2=True, beta=0.9), id="T4-t2-beta0.9"),
    pytest.param(dict(temperature=1.0, hard_weight=0.5, soft_weight=2.0, hard=True), id="hard-T1"),
    pytest.param(dict(temperature=2.5, hard_weight=1.0, hard=True), id="hard-T2.5"),
    pytest.param(dict(temperature=2.0, hard_weight=0.3, soft_weight=0.0, hard=True), id="hard-only"),
    pytest.param(dict(temperature=3.0, hard=True, ignore_index=0), id="ignore-only-0"),
]


@pytest.mark.parametrize("dtype,tol", [DTYPES[0], DTYPES[1]])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_options_vs_reference_and_torch(rng, kind, options, reduction, dtype, tol):
    kw = dict(options)
    shape = (6, 2, 2100)  # 3-d, two row blocks
    s = make(rng, shape, dtype)
    t = near(rng, s, dtype, noise=2.0)
    if kw.pop("hard", False):
        kw["targets"] = targets_with_ignored(rng, shape[:-1], shape[-1], kw.get("ignore_index", -100))
    go = rng.standard_normal(shape[:-1]) if reduction == "none" else -1.7
    loss, grad = both(s, t, kind=kind, reduction=reduction, grad_output=go, **kw)
    check(loss, grad, s, reduction, tol, *distill_reference(s, t, kind=kind, reduction=reduction,
                                                            grad_output=go, **kw))
    check(loss, grad, s, reduction, tol, *torch_distill(s, t, kind=kind, reduction=reduction,
                                                        grad_output=go, **kw))
    if "targets" in kw:
        ignored = kw["targets"] == kw.get("ignore_index", -100)
        assert not to_float64(grad)[ignored].any(), "ignored rows must have a zero gradient"
        if reduction == "none":
            assert not to_float64(loss)[ignored].any()


# (student dtype, teacher dtype, tolerance): teachers in another precision than the student
MIXED = [
    pytest.param(F32, BF16, TOLS[F32], id="f32-student-bf16-teacher"),
    pytest.param(BF16, F32, TOLS[BF16], id="bf16-student-f32-teacher"),
    pytest.param(F16, BF16, TOLS[F16], id="f16-student-bf16-teacher"),
    pytest.param(F32, F64, Tol(1e-11, 1e-11, 2e-6, 2e-7), id="f32-student-f64-teacher"),  # float64 accumulation
]


@pytest.mark.parametrize("sdtype,tdtype,tol", MIXED)
@pytest.mark.parametrize("kind", KINDS)
def test_teacher_dtype_independent_of_student(rng, kind, sdtype, tdtype, tol):
    s = make(rng, (9, 3001), sdtype)
    t = near(rng, s, tdtype)
    tg = targets_with_ignored(rng, (9,), 3001)
    for reduction in ("batchmean", "none"):
        kw = dict(kind=kind, temperature=1.3, targets=tg, hard_weight=0.2, reduction=reduction)
        loss, grad = both(s, t, **kw)
        check(loss, grad, s, reduction, tol, *distill_reference(s, t, **kw))
        check(loss, grad, s, reduction, tol, *torch_distill(s, t, **kw))
        if reduction == "none":
            want = F64 if F64 in (sdtype, tdtype) else F32
            assert loss.dtype == want, "float64 accumulation when either input is float64"


def test_jsd_equals_trl_formula(rng):
    """TRL's generalized_jsd_loss (our torch transcription) with labels, every reduction and beta."""
    s = make(rng, (3, 7, 513), F64)
    t = near(rng, s, F64, noise=2.0)
    labels = targets_with_ignored(rng, (3, 7), 513)
    tl = torch.tensor(labels)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        for reduction in ("batchmean", "sum", "mean"):
            want = float(trl_jsd(torch.tensor(s), torch.tensor(t), labels=tl, beta=beta, temperature=1.7,
                                 reduction=reduction))
            got = fastloss.distill(s, t, kind="jsd", beta=beta, temperature=1.7, targets=labels,
                                   reduction=reduction)
            np.testing.assert_allclose(got, want, rtol=1e-11, err_msg=f"beta={beta} {reduction}")
        per_elem = trl_jsd(torch.tensor(s), torch.tensor(t), labels=tl, beta=beta, temperature=1.7,
                           reduction="none")
        got = fastloss.distill(s, t, kind="jsd", beta=beta, temperature=1.7, targets=labels, reduction="none")
        np.testing.assert_allclose(got[labels != -100], per_elem.sum(-1).numpy(), rtol=1e-11)


def test_2d_without_labels_matches_trl_batchmean(rng):
    # TRL divides by jsd.size(0) without labels: the number of tokens for 2-d input.
    s = make(rng, (11, 300), F64)
    t = near(rng, s, F64)
    want = float(trl_jsd(torch.tensor(s), torch.tensor(t), beta=0.4, temperature=2.0))
    np.testing.assert_allclose(fastloss.distill(s, t, kind="jsd", beta=0.4, temperature=2.0), want, rtol=1e-11)


def test_forward_kl_matches_kl_div_batchmean(rng):
    s = make(rng, (12, 777), F64)
    t = near(rng, s, F64)
    for T in (1.0, 3.0):
        want = float(F.kl_div(F.log_softmax(torch.tensor(s) / T, -1), F.log_softmax(torch.tensor(t) / T, -1),
                              reduction="batchmean", log_target=True))
        np.testing.assert_allclose(fastloss.distill(s, t, temperature=T), want, rtol=1e-12)
        np.testing.assert_allclose(fastloss.distill(s, t, temperature=T, scale_by_t2=True), want * T * T,
                                   rtol=1e-12)


# ----------------------------------------------------------------------------- top-k teacher


def topk_teacher(rng, s, k, dtype, pad=0):
    """Indices of the k largest of a perturbed student, with logprobs (unnormalised);
    ``pad`` entries per row set to -inf (padding)."""
    noisy = to_float64(s) + rng.standard_normal(s.shape)
    idx = np.argsort(-noisy, axis=-1)[..., :k]
    lp = (np.take_along_axis(noisy, idx, axis=-1) + 5.0).astype(dtype)
    if pad:
        lp[..., k - pad:] = -np.inf
    return idx, lp


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kind", ["kl", "jsd"])
@pytest.mark.parametrize("shape,k,pad", [((17, 5000), 20, 3), ((4, 3, 50), 1, 0), ((8, 257), 257, 0),
                                         ((2, 9), 4, 1)])
def test_topk_teacher_vs_dense_reference(rng, kind, shape, k, pad, dtype, tol):
    s = make(rng, shape, dtype)
    idx, lp = topk_teacher(rng, s, k, np.float32 if dtype != F64 else F64, pad)
    dense = topk_to_dense(idx, lp, shape[-1])
    tg = targets_with_ignored(rng, shape[:-1], shape[-1])
    flat_tg = tg.reshape(-1)
    flat_tg[::3] = idx.reshape(-1, k)[::3, 0]  # some targets on the support
    for teacher in (fastloss.TopKTeacher(idx, lp), (idx.astype(np.int32), lp)):
        for reduction, extra in (("batchmean", {}), ("none", dict(targets=tg, hard_weight=0.6)),
                                 ("sum", dict(targets=tg, temperature=2.0, beta=0.2))):
            kw = dict(kind=kind, reduction=reduction, **extra)
            loss, grad = both(s, teacher, **kw)
            check(loss, grad, s, reduction, tol, *distill_reference(s, dense, **kw), what=f"{kind} {reduction}")


def test_topk_renormalises_the_logprobs(rng):
    """Logprobs need not be normalised: adding a constant per row changes nothing."""
    s = make(rng, (6, 100), F64)
    idx, lp = topk_teacher(rng, s, 10, F64)
    a = fastloss.distill(s, (idx, lp), reduction="none")
    b = fastloss.distill(s, (idx, lp + rng.standard_normal((6, 1)) * 10), reduction="none")
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_topk_full_support_equals_dense(rng):
    s = make(rng, (5, 64), F64)
    t = make(rng, (5, 64), F64)
    idx = np.tile(np.arange(64)[::-1], (5, 1))
    lp = np.take_along_axis(t, idx, axis=-1)
    for kind in ("kl", "jsd"):
        a = fastloss.distill_with_grad(s, (idx, lp), kind=kind, temperature=1.5)
        b = fastloss.distill_with_grad(s, t, kind=kind, temperature=1.5)
        np.testing.assert_allclose(a.loss, b.loss, rtol=1e-12)
        np.testing.assert_allclose(a.grad, b.grad, rtol=1e-10, atol=1e-15)


# ----------------------------------------------------------------------------- grad_output, out=, inplace


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_out_poisoned(rng, dtype, tol, reduction):
    shape = (13, 2500)
    s = make(rng, shape, dtype)
    t = near(rng, s, dtype)
    tg = targets_with_ignored(rng, (13,), 2500)
    out = np.full(shape, np.nan, dtype)
    go = rng.standard_normal(13) if reduction == "none" else 0.7
    kw = dict(kind="jsd", temperature=2.0, targets=tg, hard_weight=0.5, reduction=reduction)
    loss, grad = fastloss.distill_with_grad(s, t, grad_output=go, out=out, **kw)
    assert grad is out
    assert not np.isnan(to_float64(out)).any(), "some output elements were not written"
    check(loss, grad, s, reduction, tol, *distill_reference(s, t, grad_output=go, **kw))
    # the top-k kernel writes every element too
    out[...] = np.nan
    idx, lp = topk_teacher(rng, s, 7, np.float32)
    loss, grad = fastloss.distill_with_grad(s, (idx, lp), grad_output=go, out=out, **kw)
    assert not np.isnan(to_float64(out)).any()
    check(loss, grad, s, reduction, tol, *distill_reference(s, topk_to_dense(idx, lp, 2500), grad_output=go, **kw))


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_inplace(rng, kind, dtype, tol):
    s = make(rng, (2, 7, 3000), dtype)
    t = near(rng, s, dtype)
    tg = targets_with_ignored(rng, (2, 7), 3000)
    original = s.copy()
    kw = dict(kind=kind, temperature=0.8, targets=tg, hard_weight=0.3, reduction="sum")
    loss, grad = fastloss.distill_with_grad(s, t, inplace=True, **kw)
    assert grad is s
    check(loss, grad, original, "sum", tol, *distill_reference(original, t, **kw))
    if kind != "reverse_kl":
        s2 = original.copy()
        idx, lp = topk_teacher(rng, s2, 5, np.float32)
        loss, grad = fastloss.distill_with_grad(s2, (idx, lp), inplace=True, **kw)
        assert grad is s2
        check(loss, grad, original, "sum", tol, *distill_reference(original, topk_to_dense(idx, lp, 3000), **kw))


def test_inplace_noncontiguous_and_out_is_student(rng):
    base = make(rng, (10, 2 * 301), F32)
    s = base[:, ::2]
    t = near(rng, s, F32)
    original = s.copy()
    loss, grad = fastloss.distill_with_grad(s, t, inplace=True, kind="reverse_kl")
    assert grad is s
    check(loss, grad, original, "batchmean", TOLS[F32], *distill_reference(original, t, kind="reverse_kl"))
    s = original.copy()
    loss, grad = fastloss.distill_with_grad(s, t, out=s)
    assert grad is s
    check(loss, grad, original, "batchmean", TOLS[F32], *distill_reference(original, t))


@pytest.mark.parametrize("reduction,go", [("batchmean", 2.5), ("mean", np.float32(-3.0)), ("sum", np.array(0.5)),
                                          ("none", 3.0), ("none", "array"), ("none", "array-f32")])
def test_grad_output(rng, reduction, go):
    s = make(rng, (4, 5, 300), F64)
    t = near(rng, s, F64)
    if isinstance(go, str):
        go = rng.standard_normal((4, 5)).astype(np.float32 if go.endswith("f32") else np.float64)
    kw = dict(kind="jsd", temperature=1.2, reduction=reduction)
    loss, grad = fastloss.distill_with_grad(s, t, grad_output=go, **kw)
    check(loss, grad, s, reduction, TOLS[F64], *distill_reference(s, t, grad_output=go, **kw))
    check(loss, grad, s, reduction, TOLS[F64], *torch_distill(s, t, grad_output=go, **kw))


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_noncontiguous_inputs(rng, dtype, tol):
    base_s = make(rng, (40, 2 * 301), dtype)
    base_t = make(rng, (80, 40), dtype)
    cases = [
        ("column-slices", base_s[:, ::2], near(rng, base_s, dtype)[:, 1::2]),
        ("transposed-teacher", base_s[:, :80][::-1], base_t.T[:40]),
        ("negative-strides", base_s[::-1, ::-2], base_s[:, :301].copy()),
        ("fortran", np.asfortranarray(base_s[:, :301]), np.asfortranarray(near(rng, base_s[:, :301], dtype))),
    ]
    for name, s, t in cases:
        s_copy, t_copy = s.copy(), t.copy()
        tg = targets_with_ignored(rng, s.shape[:-1], s.shape[-1])
        kw = dict(kind="kl", temperature=2.0, targets=tg, hard_weight=0.5)
        loss, grad = both(s, t, **kw)
        check(loss, grad, s_copy, "batchmean", tol, *distill_reference(s_copy, t_copy, **kw), what=name)
        assert np.array_equal(to_float64(s), to_float64(s_copy)) and np.array_equal(to_float64(t),
                                                                                       to_float64(t_copy))


# ----------------------------------------------------------------------------- masking, NaN, zero counted


@pytest.mark.parametrize("dtype", [F64, F32, BF16])
def test_minus_inf_masks(rng, dtype):
    s = make(rng, (4, 3000), dtype)
    t = near(rng, s, dtype)
    t[0, :2500] = -np.inf  # teacher gives no mass there: forward KL stays finite
    t[1, 100] = -np.inf
    s[2, :2100] = -np.inf  # both masked in the same place
    t[2, :2100] = -np.inf
    tol = TOLS[dtype]
    for kind in KINDS:
        loss, grad = fastloss.distill_with_grad(s, t, kind=kind, reduction="none", temperature=1.5)
        ref_loss, ref_grad = distill_reference(s, t, kind=kind, reduction="none", temperature=1.5)
        check(loss, grad, s, "none", tol, ref_loss, ref_grad, what=kind)
        if kind != "reverse_kl":
            assert np.isfinite(loss).all(), kind
        else:
            assert np.isinf(loss[:2]).all() and np.isfinite(loss[2:]).all()
    # the student -inf where the teacher has mass: forward KL is +inf, the gradient finite
    s2 = s.copy()
    s2[3, 7] = -np.inf
    loss, grad = fastloss.distill_with_grad(s2, t, reduction="none")
    assert loss[3] == np.inf and np.isfinite(loss[:3]).all()
    assert np.isfinite(to_float64(grad)).all()


@pytest.mark.parametrize("dtype", [F64, F32, BF16])
@pytest.mark.parametrize("kind", KINDS)
def test_blocks_above_the_running_max(rng, kind, dtype):
    """Later row blocks (2048 elements) above the running max: slightly (kept
    against the old reference), far (redone against their own max), +inf; a
    leading all -inf block; a small temperature that stretches the logits."""
    V = 3 * 2048 + 5
    s = make(rng, (6, V), F64, scale=1.0)
    t = s + rng.standard_normal((6, V))
    s[0, 2100] += 12.0  # block 1 above the reference, kept
    t[0, 4500] += 15.0
    s[1, 3000] += 60.0  # far above: redone
    t[2, 6146] += 80.0  # in the short last block
    s[3, :2048] = -np.inf  # a leading block of -inf in both
    t[3, :2048] = -np.inf
    s[4, 5000] = 40.0
    t[4, 100] = 40.0
    s, t = s.astype(dtype), t.astype(dtype)
    tol = TOLS[dtype]
    for T in (1.0, 0.25):
        tg = rng.integers(0, V, 6)
        kw = dict(kind=kind, temperature=T, reduction="none", targets=tg, hard_weight=0.5)
        loss, grad = both(s, t, **kw)
        ref_loss, ref_grad = distill_reference(s, t, **kw)
        check(loss, grad, s, "none", tol, ref_loss, ref_grad, what=f"T={T}")
    s2 = s.copy()
    s2[5, 4000] = np.inf  # +inf: NaN in its row only
    loss = fastloss.distill(s2, t, kind=kind, reduction="none")
    assert np.isnan(loss[5]) and np.isfinite(loss[:5]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_nan_stays_in_its_row(rng, kind):
    s = make(rng, (5, 2500), F32)
    t = near(rng, s, F32)
    s[1, 2200] = np.nan
    t[3, 10] = np.nan
    loss, grad = fastloss.distill_with_grad(s, t, kind=kind, reduction="none")
    assert np.isnan(loss[[1, 3]]).all() and np.isfinite(loss[[0, 2, 4]]).all()
    assert np.isfinite(grad[[0, 2, 4]]).all()
    ref_loss, ref_grad = distill_reference(s, t, kind=kind, reduction="none")
    np.testing.assert_allclose(grad[[0, 2, 4]], ref_grad[[0, 2, 4]], rtol=2e-5, atol=1e-7)
    assert np.isnan(fastloss.distill(s, t, kind=kind))
    # an ignored NaN row does not count and gets a zero gradient
    tg = np.array([0, -100, 1, -100, 2])
    loss, grad = fastloss.distill_with_grad(s, t, kind=kind, targets=tg)
    assert np.isfinite(loss) and not grad[[1, 3]].any()


@pytest.mark.parametrize("topk", [False, True])
@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_zero_soft_weight_leaves_the_teacher_out(rng, kind, topk):
    s = make(rng, (4, 300), F64)
    t = near(rng, s, F64)
    t[1, 5] = np.nan
    tg = rng.integers(0, 300, 4)
    if topk:
        t = topk_teacher(rng, s, 5, F64)
        t[1][1, 2] = np.nan
    for T in (1.0, 2.0):
        kw = dict(kind=kind, temperature=T, targets=tg, soft_weight=0.0, hard_weight=0.8, reduction="none")
        loss, grad = fastloss.distill_with_grad(s, t, **kw)
        ce_loss, ce_grad = fastloss.cross_entropy_with_grad(s, tg, reduction="none")
        np.testing.assert_allclose(loss, 0.8 * ce_loss, rtol=1e-12)
        np.testing.assert_allclose(grad, 0.8 * ce_grad, rtol=1e-10, atol=1e-16)


@pytest.mark.parametrize("kind", KINDS)
def test_all_minus_inf_rows_are_nan_like_cross_entropy(kind):
    s = np.array([[-np.inf, -np.inf], [1.0, 2.0]], np.float32)
    t = np.array([[-np.inf, -np.inf], [0.0, 1.0]], np.float32)
    assert np.isnan(fastloss.cross_entropy(s[:1], np.array([0]), reduction="none")[0])
    loss = fastloss.distill(s, t, kind=kind, reduction="none")
    assert np.isnan(loss[0]) and np.isfinite(loss[1])
    loss = fastloss.distill(np.array([[0.0, 1.0]], np.float32), t[:1], kind=kind, reduction="none")
    assert np.isnan(loss[0]), "an all -inf teacher row has no distribution"


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
@pytest.mark.parametrize("topk", [False, True])
def test_zero_counted_tokens(rng, reduction, topk):
    s = make(rng, (3, 40), F32)
    t = near(rng, s, F32)
    teacher = topk_teacher(rng, s, 3, np.float32) if topk else t
    for tg, ss in ((np.full(3, -100), s), (np.zeros(0, np.int64), s[:0])):
        tt = (teacher[0][: len(ss)], teacher[1][: len(ss)]) if topk else teacher[: len(ss)]
        loss, grad = fastloss.distill_with_grad(ss, tt, targets=tg, reduction=reduction, hard_weight=1.0)
        assert loss == 0.0 and type(loss) is float
        assert grad.shape == ss.shape and not grad.any()
        assert fastloss.distill(ss, tt, targets=tg, reduction=reduction) == 0.0


def test_hard_weight_needs_targets(rng):
    s = make(rng, (3, 50), F64)
    t = near(rng, s, F64)
    msg = r"hard_weight: 0.7 asks for a hard-label term, which needs targets; found targets=None"
    with pytest.raises(ValueError, match=msg):
        fastloss.distill_with_grad(s, t, hard_weight=0.7)
    with pytest.raises(ValueError, match=msg):
        fastloss.distill(s, t, hard_weight=0.7)
    with pytest.raises(ValueError, match=msg):
        fastloss.linear_distill_with_grad(s, np.eye(50), t, hard_weight=0.7)
    # a zero hard weight needs none
    assert fastloss.distill(s, t, hard_weight=0.0) == fastloss.distill(s, t)


def test_result_named_tuple_and_dtypes(rng):
    s = make(rng, (3, 10), BF16)
    t = make(rng, (3, 10), F16)
    r = fastloss.distill_with_grad(s, t, reduction="none")
    assert isinstance(r, fastloss.DistillResult) and r.loss is r[0] and r.grad is r[1]
    assert r.grad.dtype == BF16 and r.loss.dtype == F32
    loss, grad = r
    assert loss is r.loss


def test_fused_and_forward_agree_and_thread_counts(rng):
    s = make(rng, (300, 1000), F32)
    t = near(rng, s, F32)
    before = fastloss.get_num_threads()
    try:
        results = []
        for n in (1, before):
            fastloss.set_num_threads(n)
            results.append(fastloss.distill(s, t, kind="jsd", reduction="none"))
        np.testing.assert_array_equal(results[0], results[1])
    finally:
        fastloss.set_num_threads(before)


# ----------------------------------------------------------------------------- hypothesis properties

HYP = settings(max_examples=int(os.environ.get("FASTLOSS_HYPOTHESIS_EXAMPLES", "60")), deadline=None)


@st.composite
def rows(draw, max_v=300):
    n = draw(st.integers(1, 4))
    v = draw(st.integers(1, max_v))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 20.0]))
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, v)) * scale, rng


@HYP
@given(rows(), st.sampled_from([0.5, 1.0, 3.0]), st.sampled_from([F32, F64]))
def test_kl_nonnegative_and_zero_iff_shifted(case, T, dtype):
    x, rng = case
    s = x.astype(dtype)
    other = (x + rng.standard_normal(x.shape)).astype(dtype)
    shift = (to_float64(s) + rng.standard_normal((x.shape[0], 1)) * 10).astype(dtype)
    eps = 1e-12 if dtype == F64 else 2e-5
    mag = 1.0 + float(np.abs(to_float64(shift)).max()) / T
    for kind in KINDS:
        loss = fastloss.distill(s, other, kind=kind, temperature=T, reduction="none")
        assert (loss >= -eps * mag).all(), (kind, loss)
        ref, _ = per_token(s, other, kind=kind, temperature=T)
        np.testing.assert_allclose(loss, ref, rtol=1e-4 if dtype == F32 else 1e-10, atol=eps * mag)
        same = fastloss.distill(s, shift, kind=kind, temperature=T, reduction="none")
        # equal up to a constant per row: the divergence is 0 up to rounding of the shifted values
        assert (np.abs(same) <= 4 * eps * mag * (1 if dtype == F64 else 4) + (
            0 if dtype == F64 else 1e-4 * mag)).all(), (kind, same)


@HYP
@given(rows(), st.sampled_from([0.7, 1.0, 2.0]))
def test_jsd_symmetric_at_half_and_kl_at_the_ends(case, T):
    x, rng = case
    s = x
    t = x + rng.standard_normal(x.shape) * 2
    a = fastloss.distill(s, t, kind="jsd", beta=0.5, temperature=T, reduction="none")
    b = fastloss.distill(t, s, kind="jsd", beta=0.5, temperature=T, reduction="none")
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    for beta, kind in ((0.0, "kl"), (1.0, "reverse_kl")):
        ja = fastloss.distill_with_grad(s, t, kind="jsd", beta=beta, temperature=T, reduction="sum")
        ka = fastloss.distill_with_grad(s, t, kind=kind, temperature=T, reduction="sum")
        np.testing.assert_allclose(ja.loss, ka.loss, rtol=1e-12)
        np.testing.assert_array_equal(ja.grad, ka.grad)


@HYP
@given(rows(max_v=40), st.sampled_from(KINDS), st.sampled_from([0.6, 1.0, 2.5]), st.floats(0.05, 0.95),
       st.booleans())
def test_float64_gradient_matches_central_differences(case, kind, T, beta, hard):
    x, rng = case
    s = x
    t = x + rng.standard_normal(x.shape)
    kw = dict(kind=kind, temperature=T, beta=beta, reduction="sum", scale_by_t2=True)
    if hard:
        kw.update(targets=rng.integers(0, x.shape[1], x.shape[0]), hard_weight=0.7)
    _, grad = fastloss.distill_with_grad(s, t, **kw)
    h = 1e-6
    fd = np.zeros_like(s)
    for idx in np.ndindex(s.shape):
        sp, sm = s.copy(), s.copy()
        sp[idx] += h
        sm[idx] -= h
        fd[idx] = (fastloss.distill(sp, t, **kw) - fastloss.distill(sm, t, **kw)) / (2 * h)
    scale = 1.0 + np.abs(fd).max()
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6 * scale * (1 + np.abs(x).max()))


# ----------------------------------------------------------------------------- errors


def _s():
    return np.zeros((2, 3), np.float32) + np.arange(3, dtype=np.float32)


ERRORS = [
    (dict(kind="forward"), ValueError, r"kind: expected one of 'kl', 'reverse_kl', 'jsd', found 'forward'"),
    (dict(temperature=0.0), ValueError, r"temperature: expected a finite value in \(0.0, inf\), found 0.0"),
    (dict(temperature=-1), ValueError, r"temperature: expected a finite value"),
    (dict(temperature=float("inf")), ValueError, r"temperature: expected a finite value"),
    (dict(temperature=float("nan")), ValueError, r"temperature: expected a number, found NaN"),
    (dict(temperature="2"), TypeError, r"temperature: expected a real number, found str"),
    (dict(beta=1.5), ValueError, r"beta: expected a finite value in \[0.0, 1.0\], found 1.5"),
    (dict(beta=-0.1), ValueError, r"beta: expected a finite value in \[0.0, 1.0\]"),
    (dict(soft_weight=-1.0), ValueError, r"soft_weight: expected a finite value in \[0.0, inf\)"),
    (dict(hard_weight=-0.5), ValueError, r"hard_weight: expected a finite value in \[0.0, inf\)"),
    (dict(hard_weight=float("inf")), ValueError, r"hard_weight: expected a finite value"),
    (dict(reduction="avg"), ValueError, r"reduction: expected one of 'batchmean', 'mean', 'sum', 'none', found 'avg'"),
    (dict(scale_by_t2=1), TypeError, r"scale_by_t2: expected True or False, found 1"),
    (dict(ignore_index=1.5), TypeError, r"ignore_index: expected an integer, found float"),
    (dict(targets=np.array([0, 3])), ValueError,
     r"targets: 1 value\(s\) outside \[0, 3\) that are not ignore_index=-100; first at position \(1,\): 3"),
    (dict(targets=np.array([0.0, 1.0])), TypeError, r"targets: expected an integer dtype, found float64"),
    (dict(targets=np.array([0, 1, 2])), ValueError, r"targets: expected shape \(2,\)"),
]


@pytest.mark.parametrize("kw,exc,match", ERRORS)
def test_option_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        fastloss.distill(_s(), _s(), **kw)
    with pytest.raises(exc, match=match):
        fastloss.distill_with_grad(_s(), _s(), **kw)


ARRAY_ERRORS = [
    (lambda: (_s().astype(np.int32), _s()), TypeError,
     r"student: expected dtype float16, bfloat16, float32 or float64, found int32"),
    (lambda: (_s(), _s().astype(np.complex64)), TypeError, r"teacher: expected dtype .*found complex64"),
    (lambda: (_s(), np.zeros((3, 3), np.float32)), ValueError,
     r"teacher: expected the student's shape \(2, 3\), found \(3, 3\)"),
    (lambda: (_s(), np.zeros((2, 4), np.float32)), ValueError,
     r"teacher: vocabulary size 4 differs from the student's 3"),
    (lambda: (np.float32(1.0), np.float32(1.0)), ValueError, r"student: expected shape \(\.\.\., V\)"),
    (lambda: (np.zeros((2, 0), np.float32), np.zeros((2, 0), np.float32)), ValueError,
     r"student: the class dimension \(last\) must be at least 1"),
    (lambda: (_s(), (np.array([[0], [1]]),)), ValueError, r"teacher: a top-k teacher is a 2-tuple"),
    (lambda: (_s(), (np.array([[0.0], [1.0]]), np.zeros((2, 1)))), TypeError,
     r"teacher indices: expected an integer dtype, found float64"),
    (lambda: (_s(), (np.array([[0], [1]]), np.zeros((2, 1), np.int64))), TypeError,
     r"teacher logprobs: expected dtype .*found int64"),
    (lambda: (_s(), (np.array([0, 1]), np.zeros(2))), ValueError,
     r"teacher indices: expected shape \(2, 'k'\)"),
    (lambda: (_s(), (np.zeros((2, 0), np.int64), np.zeros((2, 0)))), ValueError,
     r"teacher indices: expected shape \(2, 'k'\)"),
    (lambda: (_s(), (np.array([[0], [1]]), np.zeros((2, 2)))), ValueError,
     r"teacher logprobs: expected the shape of teacher indices \(2, 1\), found \(2, 2\)"),
    (lambda: (_s(), (np.array([[0, 3], [1, -1]]), np.zeros((2, 2)))), ValueError,
     r"teacher indices: 2 value\(s\) outside \[0, 3\); first at position \(0, 1\): 3"),
    (lambda: (_s(), (np.array([[0, 1], [2, 2]]), np.zeros((2, 2)))), ValueError,
     r"teacher indices: 1 row\(s\) repeat a class index; first at position \(1,\): 2"),
    (lambda: (_s(), (np.array([[0, 1], [2, 1]]), np.array([[0.0, 0.0], [-np.inf, -np.inf]]))), ValueError,
     r"teacher logprobs: 1 row\(s\) have no finite entry \(all -inf\); first at position \(1,\)"),
]


@pytest.mark.parametrize("make_args,exc,match", ARRAY_ERRORS)
def test_array_errors(make_args, exc, match):
    s, t = make_args()
    with pytest.raises(exc, match=match):
        fastloss.distill(s, t)
    with pytest.raises(exc, match=match):
        fastloss.distill_with_grad(s, t)


def test_reverse_kl_needs_a_dense_teacher():
    top = (np.array([[0], [1]]), np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"teacher: reverse_kl needs a dense teacher"):
        fastloss.distill(_s(), top, kind="reverse_kl")
    with pytest.raises(ValueError, match=r"teacher: reverse_kl needs a dense teacher .*kind='jsd', beta=1"):
        fastloss.distill_with_grad(_s(), top, kind="jsd", beta=1.0)


def test_topk_checks_skip_ignored_rows():
    idx = np.array([[0, 0], [5, 1]])  # row 0 is ignored: never read, never checked
    lp = np.array([[-np.inf, -np.inf], [0.0, 0.0]])
    msg = r"teacher indices: 1 value\(s\) outside \[0, 3\); first at position \(1, 0\): 5"
    with pytest.raises(ValueError, match=msg):
        fastloss.distill(_s(), (idx, lp), targets=np.array([-100, 1]))
    idx[1, 0] = 2
    assert np.isfinite(fastloss.distill(_s(), (idx, lp), targets=np.array([-100, 1])))


def test_grad_out_inplace_errors():
    s, t = _s(), _s() + 1
    cases = [
        (dict(grad_output=np.ones(2)), ValueError,
         r"grad_output: expected a scalar for reduction='batchmean', found shape \(2,\)"),
        (dict(grad_output="x"), TypeError, r"grad_output: expected a real number"),
        (dict(reduction="none", grad_output=np.ones(3)), ValueError,
         r"grad_output: expected a scalar or shape \(2,\) \(student.shape\[:-1\]\) for reduction='none', found \(3,\)"),
        (dict(out=np.empty((2, 4), np.float32)), ValueError, r"out: expected shape \(2, 3\), found \(2, 4\)"),
        (dict(out=np.empty((2, 3), np.float64)), TypeError, r"out: expected dtype float32, found float64"),
        (dict(out=[[0.0] * 3] * 2), TypeError, r"out: expected a numpy array, found list"),
        (dict(out=np.empty((3, 2), np.float32).T), ValueError, r"out: expected a C-contiguous array"),
        (dict(out=s, inplace=True), ValueError, r"out: cannot be combined with inplace=True"),
        (dict(inplace=1), TypeError, r"inplace: expected True or False, found 1"),
        (dict(out=t), ValueError, r"out: overlaps teacher \(the teacher is never modified\)"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            fastloss.distill_with_grad(s, t, **kw)
    ro = _s()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"out: the array is read-only"):
        fastloss.distill_with_grad(s, t, out=ro)
    with pytest.raises(ValueError, match=r"student: inplace=True needs a writable array"):
        fastloss.distill_with_grad(ro, t, inplace=True)
    with pytest.raises(TypeError, match=r"student: inplace=True needs a numpy array, found list"):
        fastloss.distill_with_grad(s.tolist(), t, inplace=True)
    big = np.zeros((2, 6), np.float32) + np.arange(6, dtype=np.float32)
    with pytest.raises(ValueError, match=r"out: overlaps student; pass inplace=True"):
        fastloss.distill_with_grad(big[:, :3], t, out=big.reshape(-1)[1:7].reshape(2, 3))
    with pytest.raises(ValueError, match=r"teacher: shares memory with student; inplace=True would overwrite it"):
        fastloss.distill_with_grad(big[:, :3], big[:, 3:], inplace=True)
    swapped = _s().astype(">f4")
    with pytest.raises(ValueError, match=r"student: inplace=True needs a native-byte-order float array"):
        fastloss.distill_with_grad(swapped, t, inplace=True)
