"""``fastloss.linear_distill_with_grad``: the distillation loss of a student LM
head, chunk by chunk, against

* the float64 reference of ``tests/reference_distill.py`` on explicitly formed
  logits ``h @ W.T + b`` and the chain rule (``G @ W``, ``G.T @ h``, ``G.sum(0)``);
* PyTorch autograd through ``torch.nn.functional`` (``kl_div``, ``log_softmax``,
  ``cross_entropy``) on ``(h @ W.T + b) / T``;

for every kind, dense and top-k teachers, targets with ignored tokens and a
hard term, every reduction and ``grad_output`` form, chunks smaller than the
batch (odd sizes), and float32 / float64 / float16 / bfloat16 inputs. Shapes are
small and odd (V = 23, D = 5, 14 or 15 tokens) so the file runs in seconds
after the kernels' compilation.
"""

import numpy as np
import pytest
from cases import BF16
from reference_distill import distill_reference, to_float64, topk_to_dense

import fastloss
from fastloss.ops import linear_distill as LD

NCLASS, DIM = 23, 5

# (dtype, loss rtol, gradient tolerance relative to the largest |grad|)
DTYPES = [
    pytest.param(np.dtype(np.float32), 2e-5, 2e-5, id="float32"),
    pytest.param(np.dtype(np.float64), 1e-10, 1e-10, id="float64"),
    pytest.param(np.dtype(np.float16), 2e-4, 2e-3, id="float16"),
    pytest.param(BF16, 2e-4, 1e-2, id="bfloat16"),
]


def make_inputs(rng, rows_shape, dtype, *, topk=None, bias=True, n_ignored=2, targets=True):
    """(hidden, head, bias, teacher, targets): the teacher float32 (float64 for
    float64 inputs), dense or top-k with ``topk`` entries per row."""
    h = (rng.standard_normal(rows_shape + (DIM,))).astype(dtype)
    w = (rng.standard_normal((NCLASS, DIM)) * 0.8).astype(dtype)
    b = (rng.standard_normal(NCLASS) * 0.5).astype(dtype) if bias else None
    tdt = np.float64 if dtype == np.float64 else np.float32
    n = int(np.prod(rows_shape))
    if topk:
        idx = np.stack([rng.permutation(NCLASS)[:topk] for _ in range(n)]).reshape(rows_shape + (topk,))
        lp = (rng.standard_normal(rows_shape + (topk,)) * 1.5).astype(tdt)
        teacher = fastloss.TopKTeacher(idx, lp)
    else:
        teacher = (rng.standard_normal(rows_shape + (NCLASS,)) * 2).astype(tdt)
    tg = None
    if targets:
        tg = rng.integers(0, NCLASS, rows_shape)
        tg.reshape(-1)[rng.choice(n, n_ignored, replace=False)] = -100
    return h, w, b, teacher, tg


def reference(h, w, b, teacher, tg, **kw):
    """(loss, grad_hidden, grad_head, grad_bias) in float64: explicit logits, the
    reference distillation, the chain rule."""
    h64, w64 = to_float64(h), to_float64(w)
    z = h64 @ w64.T + (0.0 if b is None else to_float64(b))
    if isinstance(teacher, tuple):
        t = topk_to_dense(teacher[0], teacher[1], NCLASS)
    else:
        t = to_float64(teacher)
    loss, G = distill_reference(z, t, targets=tg, **kw)
    G2 = G.reshape(-1, NCLASS)
    gh = (G2 @ w64).reshape(h.shape)
    gw = G2.T @ h64.reshape(-1, DIM)
    gb = None if b is None else G2.sum(0)
    return loss, gh, gw, gb


def assert_close(got, ref, tol, what):
    got = to_float64(got)
    scale = max(1.0, float(np.max(np.abs(ref)))) if np.size(ref) else 1.0
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol * scale, err_msg=what)


def check(r, ref, dtype, rtol, gtol, h, w, b):
    loss, gh, gw, gb = ref
    if np.ndim(loss):
        assert r.loss.shape == loss.shape
        np.testing.assert_allclose(to_float64(r.loss), loss, rtol=rtol, atol=1e-6)
    else:
        assert isinstance(r.loss, float)
        np.testing.assert_allclose(r.loss, loss, rtol=rtol, atol=1e-6)
    assert r.grad_hidden.shape == h.shape and r.grad_hidden.dtype == h.dtype
    assert r.grad_head.shape == w.shape and r.grad_head.dtype == w.dtype
    assert_close(r.grad_hidden, gh, gtol, "grad_hidden")
    assert_close(r.grad_head, gw, gtol, "grad_head")
    if b is None:
        assert r.grad_bias is None
    else:
        assert r.grad_bias.dtype == b.dtype
        assert_close(r.grad_bias, gb, gtol, "grad_bias")


# (options, top-k entries or None); reverse KL needs a dense teacher
KINDS = [
    pytest.param(dict(kind="kl", temperature=2.0, scale_by_t2=True), None, id="kl-T2-dense"),
    pytest.param(dict(kind="kl", temperature=2.0, scale_by_t2=True), 6, id="kl-T2-top6"),
    pytest.param(dict(kind="reverse_kl", temperature=0.8), None, id="rkl-dense"),
    pytest.param(dict(kind="jsd", beta=0.3, temperature=1.5), None, id="jsd-dense"),
    pytest.param(dict(kind="jsd", beta=0.3, temperature=1.5), 6, id="jsd-top6"),
]


@pytest.mark.parametrize("dtype, rtol, gtol", DTYPES)
@pytest.mark.parametrize("kw, topk", KINDS)
def test_matches_reference(rng, dtype, rtol, gtol, kw, topk):
    """Every kind, dense and top-k, with a hard term, two ignored tokens and
    chunks of 5 of 14 tokens (2 x 7)."""
    h, w, b, teacher, tg = make_inputs(rng, (2, 7), dtype, topk=topk)
    kw = dict(kw, hard_weight=0.3, soft_weight=0.9)
    r = fastloss.linear_distill_with_grad(h, w, teacher, bias=b, targets=tg, chunk_size=5, **kw)
    check(r, reference(h, w, b, teacher, tg, **kw), dtype, rtol, gtol, h, w, b)


@pytest.mark.parametrize("reduction, grad_output", [
    ("batchmean", None), ("batchmean", np.array(0.5)), ("mean", 2.0), ("sum", -0.7),
    ("none", None), ("none", 1.5), ("none", "rows"),
])
@pytest.mark.parametrize("topk", [None, 4], ids=["dense", "top4"])
def test_reductions_and_grad_output(rng, reduction, grad_output, topk):
    h, w, b, teacher, tg = make_inputs(rng, (15,), np.float64, topk=topk, n_ignored=3)
    if isinstance(grad_output, str):
        grad_output = rng.uniform(-1.0, 2.0, 15)
    kw = dict(kind="jsd", beta=0.6, reduction=reduction, hard_weight=0.5, grad_output=grad_output)
    r = fastloss.linear_distill_with_grad(h, w, teacher, bias=b, targets=tg, chunk_size=3, **kw)
    check(r, reference(h, w, b, teacher, tg, **kw), np.float64, 1e-10, 1e-10, h, w, b)
    if reduction == "none":
        assert r.loss.dtype == np.float64 and (r.loss[tg == -100] == 0).all()
        assert (r.grad_hidden[tg == -100] == 0).all()


def test_without_targets_bias_or_chunk_size(rng):
    h, w, _, teacher, _ = make_inputs(rng, (3, 5), np.float32, bias=False, targets=False)
    kw = dict(kind="kl", temperature=1.3, reduction="mean")
    r = fastloss.linear_distill_with_grad(h, w, teacher, **kw)
    check(r, reference(h, w, None, teacher, None, **kw), np.float32, 2e-5, 2e-5, h, w, None)


@pytest.mark.parametrize("chunk", [1, 2, 4, 13, 14, 100])
def test_chunk_size_does_not_change_the_result(rng, chunk):
    """Any chunk size gives the one-chunk result (float64: up to rounding)."""
    h, w, b, teacher, tg = make_inputs(np.random.default_rng(7), (14,), np.float64, topk=5)
    kw = dict(kind="kl", hard_weight=1.0, targets=tg, bias=b)
    one = fastloss.linear_distill_with_grad(h, w, teacher, chunk_size=14, **kw)
    r = fastloss.linear_distill_with_grad(h, w, teacher, chunk_size=chunk, **kw)
    np.testing.assert_allclose(r.loss, one.loss, rtol=1e-13)
    for a, e in zip(r[1:], one[1:], strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-15)


def test_logits_are_never_whole(rng, monkeypatch):
    """Every kernel call sees at most chunk_size rows, counted rows only, and the
    default chunk follows the byte budget in config."""
    from fastloss.ops import distill as D
    seen = []
    real = D.distill_with_grad

    def spy(student, teacher, **kw):
        seen.append((student.shape, kw["inplace"], kw["reduction"]))
        return real(student, teacher, **kw)
    monkeypatch.setattr(D, "distill_with_grad", spy)
    h, w, b, teacher, tg = make_inputs(rng, (3, 7), np.float32, n_ignored=4)
    fastloss.linear_distill_with_grad(h, w, teacher, bias=b, targets=tg, chunk_size=5)
    assert [s for s, _, _ in seen] == [(5, NCLASS), (5, NCLASS), (5, NCLASS), (2, NCLASS)]
    assert all(inplace and red == "sum" for _, inplace, red in seen)
    seen.clear()
    monkeypatch.setattr(fastloss.config, "LINEAR_CE_LOGITS_BUDGET_BYTES", 6 * NCLASS * 4)
    fastloss.linear_distill_with_grad(h, w, teacher, bias=b, targets=tg, reduction="none")
    assert [s for s, _, _ in seen] == [(6, NCLASS)] * 2 + [(5, NCLASS)]  # 17 rows, evened out


def test_all_ignored_and_empty(rng):
    h, w, b, teacher, tg = make_inputs(rng, (4,), np.float32)
    tg[:] = -100
    for red in ("batchmean", "mean", "sum"):
        r = fastloss.linear_distill_with_grad(h, w, teacher, bias=b, targets=tg, reduction=red, hard_weight=1.0)
        assert r.loss == 0.0
        assert not r.grad_hidden.any() and not r.grad_head.any() and not r.grad_bias.any()
    r = fastloss.linear_distill_with_grad(h, w, teacher, targets=tg, reduction="none")
    assert r.loss.shape == (4,) and not r.loss.any()
    e = np.zeros((0, DIM), np.float32)
    r = fastloss.linear_distill_with_grad(e, w, np.zeros((0, NCLASS), np.float32))
    assert r.loss == 0.0 and r.grad_hidden.shape == (0, DIM) and not r.grad_head.any()


def test_non_contiguous_inputs(rng):
    """A strided hidden, a Fortran-order head, a strided teacher and uint8 targets
    (which cannot hold ignore_index -100: every token counts)."""
    h, w, b, teacher, _ = make_inputs(rng, (11,), np.float32, targets=False)
    hs = np.repeat(h, 2, axis=1)[:, ::2]
    wf = np.asfortranarray(w)
    ts = np.repeat(teacher, 2, axis=0)[::2]
    tg = rng.integers(0, NCLASS, 11).astype(np.uint8)
    assert not (hs.flags.c_contiguous or wf.flags.c_contiguous or ts.flags.c_contiguous)
    kw = dict(kind="jsd", beta=0.5, hard_weight=0.2)
    r = fastloss.linear_distill_with_grad(hs, wf, ts, bias=b, targets=tg, chunk_size=4, **kw)
    check(r, reference(h, w, b, teacher, tg, **kw), np.float32, 2e-5, 2e-5, h, w, b)


def test_inputs_untouched(rng):
    h, w, b, teacher, tg = make_inputs(rng, (9,), np.float32)
    copies = [a.copy() for a in (h, w, b, teacher, tg)]
    fastloss.linear_distill_with_grad(h, w, teacher, bias=b, targets=tg, hard_weight=0.5, chunk_size=4)
    for a, c in zip((h, w, b, teacher, tg), copies, strict=True):
        np.testing.assert_array_equal(a, c)


# --- PyTorch autograd ----------------------------------------------------------------------

def torch_loss(torch, h, w, b, teacher, tg, *, kind, temperature, beta=0.5, reduction, hard_weight):
    """The loss written with torch.nn.functional on (h @ W.T + b) / T."""
    F = torch.nn.functional
    z = h @ w.T + b
    ls = F.log_softmax(z / temperature, -1)
    ps = ls.exp()
    if isinstance(teacher, tuple):
        idx, lp = teacher
        lt = torch.full_like(z, -torch.inf).scatter(-1, idx, F.log_softmax(lp / temperature, -1))
    else:
        lt = F.log_softmax(teacher / temperature, -1)
    pt = lt.exp()
    zero = torch.zeros((), dtype=z.dtype)
    if kind == "kl" and not isinstance(teacher, tuple):
        S = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    elif kind == "kl":
        S = torch.where(pt > 0, pt * (lt - ls), zero).sum(-1)
    elif kind == "reverse_kl":
        S = torch.where(ps > 0, ps * (ls - lt), zero).sum(-1)
    else:
        lm = torch.log(beta * pt + (1 - beta) * ps)
        S = (beta * torch.where(pt > 0, pt * (lt - lm), zero).sum(-1)
             + (1 - beta) * torch.where(ps > 0, ps * (ls - lm), zero).sum(-1))
    counted = tg != -100
    ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), tg.reshape(-1), ignore_index=-100, reduction="none")
    per = S + hard_weight * ce.reshape(tg.shape)
    per = torch.where(counted, per, zero)
    if reduction == "none":
        return per
    count = counted.sum()
    return {"sum": per.sum(), "batchmean": per.sum() / count, "mean": per.sum() / (count * z.shape[-1])}[reduction]


@pytest.mark.parametrize("kw, topk", [
    pytest.param(dict(kind="kl", temperature=2.0, reduction="batchmean"), None, id="kl-dense"),
    pytest.param(dict(kind="kl", temperature=2.0, reduction="batchmean"), 7, id="kl-top7"),
    pytest.param(dict(kind="reverse_kl", temperature=0.7, reduction="sum"), None, id="rkl-dense"),
    pytest.param(dict(kind="jsd", beta=0.4, temperature=1.2, reduction="mean"), None, id="jsd-dense"),
    pytest.param(dict(kind="jsd", beta=0.4, temperature=1.2, reduction="mean"), 7, id="jsd-top7"),
    pytest.param(dict(kind="jsd", beta=0.5, temperature=1.0, reduction="none"), 7, id="jsd-none-top7"),
])
def test_matches_torch_autograd(rng, kw, topk):
    torch = pytest.importorskip("torch")
    h, w, b, teacher, tg = make_inputs(rng, (13,), np.float64, topk=topk, n_ignored=2)
    go = rng.uniform(-1, 2, 13) if kw["reduction"] == "none" else 0.8
    r = fastloss.linear_distill_with_grad(h, w, teacher, bias=b, targets=tg, hard_weight=0.25, grad_output=go,
                                          chunk_size=4, **kw)
    th, tw, tb = (torch.tensor(a, requires_grad=True) for a in (h, w, b))
    tt = tuple(torch.tensor(np.asarray(a)) for a in teacher) if topk else torch.tensor(teacher)
    loss = torch_loss(torch, th, tw, tb, tt, torch.tensor(tg), hard_weight=0.25, **kw)
    (loss * torch.tensor(go, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(r.loss, loss.detach().numpy(), rtol=1e-10, atol=1e-12)
    for got, t in ((r.grad_hidden, th), (r.grad_head, tw), (r.grad_bias, tb)):
        np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_float32_matches_torch_float32(rng):
    """The float32 path against torch's float32 autograd (the way it is used)."""
    torch = pytest.importorskip("torch")
    h, w, b, teacher, tg = make_inputs(rng, (2, 7), np.float32)
    kw = dict(kind="kl", temperature=2.0, reduction="batchmean")
    r = fastloss.linear_distill_with_grad(h, w, teacher, bias=b, targets=tg, chunk_size=3, **kw)
    th, tw, tb = (torch.tensor(a, requires_grad=True) for a in (h, w, b))
    loss = torch_loss(torch, th, tw, tb, torch.tensor(teacher), torch.tensor(tg), hard_weight=0.0, **kw)
    loss.backward()
    np.testing.assert_allclose(r.loss, loss.item(), rtol=1e-5)
    for got, t in ((r.grad_hidden, th), (r.grad_head, tw), (r.grad_bias, tb)):
        np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-4, atol=1e-6)


# --- errors --------------------------------------------------------------------------------

def test_errors_name_the_argument(rng):
    h, w, b, teacher, tg = make_inputs(rng, (4,), np.float32)
    f = fastloss.linear_distill_with_grad
    cases = [
        (TypeError, "student_hidden: expected dtype", lambda: f(h.astype(np.int32), w, teacher)),
        (ValueError, "student_hidden: expected shape \\(..., D\\)", lambda: f(np.float32(1.0), w, teacher)),
        (ValueError, r"student_head: expected shape \(V, 5\)", lambda: f(h, w[:, :4], teacher)),
        (ValueError, "student_head: expected at least one row", lambda: f(h, w[:0], teacher[:, :0])),
        (TypeError, r"student_head: expected the dtype of student_hidden \(float32\), found float64",
         lambda: f(h, w.astype(np.float64), teacher)),
        (ValueError, r"bias: expected shape \(23,\)", lambda: f(h, w, teacher, bias=b[:5])),
        (TypeError, "bias: expected dtype", lambda: f(h, w, teacher, bias=np.arange(23))),
        (ValueError, r"teacher: expected shape \(4, 23\)", lambda: f(h, w, teacher[:, :5])),
        (TypeError, "teacher: expected dtype", lambda: f(h, w, teacher.astype(np.int64))),
        (ValueError, r"targets: expected shape \(4,\) \(student_hidden.shape\[:-1\]\)",
         lambda: f(h, w, teacher, targets=tg[:2])),
        (ValueError, r"targets: 1 value\(s\) outside \[0, 23\)", lambda: f(h, w, teacher, targets=[0, 1, 23, 2])),
        (ValueError, "teacher: reverse_kl needs a dense teacher",
         lambda: f(h, w, (np.zeros((4, 2), np.int64), np.zeros((4, 2))), kind="reverse_kl")),
        (ValueError, r"teacher indices: 1 value\(s\) outside \[0, 23\)",
         lambda: f(h, w, (np.array([[0, 1], [2, 3], [4, 23], [5, 6]]), np.zeros((4, 2))))),
        (TypeError, "chunk_size: expected a positive integer or None, found float",
         lambda: f(h, w, teacher, chunk_size=2.0)),
        (ValueError, "chunk_size: expected a positive integer, found 0", lambda: f(h, w, teacher, chunk_size=0)),
        (ValueError, "grad_output: expected a scalar or shape \\(4,\\)",
         lambda: f(h, w, teacher, reduction="none", grad_output=np.ones(3))),
        (ValueError, "grad_output: expected a scalar for reduction='sum'",
         lambda: f(h, w, teacher, reduction="sum", grad_output=np.ones(3))),
        (ValueError, "reduction", lambda: f(h, w, teacher, reduction="avg")),
        (ValueError, "temperature", lambda: f(h, w, teacher, temperature=0.0)),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()


def test_gpu_arrays_are_refused():
    class FakeGpuArray:
        __cuda_array_interface__ = {"shape": (2, 3), "typestr": "<f4", "data": (0, False), "version": 3}

    with pytest.raises(TypeError, match="student_hidden: GPU arrays are not supported"):
        fastloss.linear_distill_with_grad(FakeGpuArray(), np.zeros((4, 3), np.float32), np.zeros((2, 4)))


def test_result_names():
    assert LD.LinearDistillResult._fields == ("loss", "grad_hidden", "grad_head", "grad_bias")
    assert fastloss.LinearDistillResult is LD.LinearDistillResult
