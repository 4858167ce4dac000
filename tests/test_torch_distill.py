"""fastloss.torch with two distributions: probability targets in ``cross_entropy`` and ``distill``.

* ``cross_entropy`` with float targets of the input's shape against
  ``torch.nn.functional.cross_entropy`` (probability targets): every dtype, class
  dimension 1 with extra dimensions, class weights, label smoothing, reductions,
  a non-uniform upstream gradient for "none", the module, and errors;
* ``distill`` / ``DistillLoss`` against PyTorch formulas written here
  (``F.kl_div`` of ``log_softmax`` with ``log_target=True``, TRL's generalised
  JSD as a mixture, a top-k teacher as a dense one with ``-inf`` off its
  support): every kind, temperature, ``scale_by_t2``, hard-label term with
  ignored targets, reductions, student/teacher dtypes, retained graphs;
* both under ``torch.compile(fullgraph=True)`` (aot_eager) and
  ``torch.library.opcheck`` on the ``fastloss::distill`` op.

References run in float64 on the same (rounded) input values. Tolerances:
float64 1e-10; float32 2e-5 relative (+2e-6 absolute); half precision at the
rounding of the result's dtype (bfloat16 2e-2, float16 3e-3 relative).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastloss.torch as flt

OPS = torch.ops.fastloss

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
    torch.float16: dict(rtol=3e-3, atol=3e-4),
}
DTYPES = list(TOL)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _probs(shape, gen, dim=-1, dtype=torch.float32):
    """Probability rows along ``dim``, peaked (not uniform)."""
    return torch.softmax(3 * torch.randn(shape, generator=gen, dtype=torch.float64), dim=dim).to(dtype)


def _close(got, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol["rtol"], atol=tol["atol"])


# --- probability targets in cross_entropy ---------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(7, 33), (3, 11, 5), (9,)], ids=["NC", "NCd", "C"])
def test_soft_cross_entropy_matches_torch(dtype, reduction, shape):
    gen = _gen(1)
    x = (2 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_()
    q = _probs(shape, gen, dim=1 if len(shape) > 1 else 0)
    loss = flt.cross_entropy(x, q, reduction=reduction)
    up = torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5 if reduction == "none" else None
    (loss * up.to(loss.dtype)).sum().backward() if up is not None else loss.backward()
    x32 = x.detach().double().requires_grad_()
    ref = F.cross_entropy(x32, q.double(), reduction=reduction)
    (ref * up).sum().backward() if up is not None else ref.backward()
    assert loss.dtype == dtype and loss.shape == ref.shape
    _close(loss, ref, dtype)
    _close(x.grad, x32.grad, dtype)


def test_soft_cross_entropy_options_match_torch():
    gen = _gen(2)
    x = torch.randn(6, 17, dtype=torch.float64, generator=gen, requires_grad=True)
    q = _probs((6, 17), gen, dtype=torch.float64)
    w = torch.rand(17, generator=gen, dtype=torch.float64) + 0.1
    loss = flt.cross_entropy(x, q, weight=w, label_smoothing=0.2, ignore_index=3)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    ref = F.cross_entropy(x2, q, weight=w, label_smoothing=0.2)
    ref.backward()
    _close(loss, ref, torch.float64)
    _close(x.grad, x2.grad, torch.float64)


def test_soft_cross_entropy_z_loss_and_module():
    gen = _gen(3)
    x = torch.randn(5, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    q = _probs((5, 12), gen, dtype=torch.float64)
    loss = flt.CrossEntropyLoss(z_loss=1e-2)(x, q)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    lse = torch.logsumexp(x2, -1)
    ref = F.cross_entropy(x2, q) + 1e-2 * (lse ** 2).mean()
    ref.backward()
    _close(loss, ref, torch.float64)
    _close(x.grad, x2.grad, torch.float64)


def test_soft_cross_entropy_gradcheck():
    gen = _gen(4)
    x = torch.randn(3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    q = _probs((3, 7), gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: flt.cross_entropy(a, q, reduction="none"), (x,))


def test_soft_cross_entropy_errors():
    x = torch.randn(4, 6)
    q = torch.softmax(torch.randn(4, 6), -1)
    with pytest.raises(ValueError, match=r"target: expected probabilities of input's shape \(4, 6\), found \(4, 5\)"):
        flt.cross_entropy(x, q[:, :5])
    with pytest.raises(ValueError, match="target: gradients with respect to probability targets"):
        flt.cross_entropy(x, q.clone().requires_grad_())
    with pytest.raises(TypeError, match="target: expected integer class indices or float probabilities, found "
                                        "torch.bool"):
        flt.cross_entropy(x, q > 0.2)
    with pytest.raises(ValueError, match="targets"):  # a row that is not a distribution (the numpy API's check)
        flt.cross_entropy(x, q * 3)


# --- distill -----------------------------------------------------------------------------------------

def _kl(log_p, log_q):
    """KL(p || q) per row from log-probabilities (0 log 0 = 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _reference(s, t, kind, temperature, beta, scale_by_t2, reduction, target, ignore_index, soft_weight,
               hard_weight, topk=None):
    """The distillation loss in PyTorch (float64 autograd)."""
    ls = F.log_softmax(s / temperature, -1)
    if topk is not None:
        idx, lp = topk
        dense = torch.full(s.shape, -math.inf, dtype=torch.float64).scatter(-1, idx, lp.double())
        lt = F.log_softmax(dense / temperature, -1)
    else:
        lt = F.log_softmax(t.double() / temperature, -1)
    if kind == "kl":
        d = _kl(lt, ls)
    elif kind == "reverse_kl":
        d = _kl(ls, lt)
    elif beta == 0:
        d = _kl(lt, ls)
    elif beta == 1:
        d = _kl(ls, lt)
    else:
        lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
        d = beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)
    if scale_by_t2:
        d = d * temperature ** 2
    per = soft_weight * d
    counted = torch.ones(s.shape[:-1], dtype=torch.bool)
    if target is not None:
        counted = target != ignore_index
        safe = torch.where(counted, target, torch.zeros_like(target))
        h = F.cross_entropy(s.reshape(-1, s.shape[-1]), safe.reshape(-1), reduction="none").reshape(per.shape)
        per = per + hard_weight * h
    per = torch.where(counted, per, torch.zeros_like(per))
    n = counted.sum()
    if reduction == "none":
        return per
    total = per.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / n if n else total * 0
    return total / (n * s.shape[-1]) if n else total * 0


CASES = [
    # kind, temperature, beta, scale_by_t2
    ("kl", 1.0, 0.5, False),
    ("kl", 2.0, 0.5, True),
    ("reverse_kl", 1.5, 0.5, False),
    ("jsd", 1.0, 0.5, False),
    ("jsd", 3.0, 0.2, True),
    ("jsd", 1.0, 0.0, False),
    ("jsd", 1.0, 1.0, False),
]


@pytest.mark.parametrize("kind,temperature,beta,scale_by_t2", CASES)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_distill_matches_torch_float64(kind, temperature, beta, scale_by_t2, reduction):
    gen = _gen(5)
    s = (2 * torch.randn(2, 5, 29, dtype=torch.float64, generator=gen)).requires_grad_()
    t = 2 * torch.randn(2, 5, 29, dtype=torch.float64, generator=gen)
    loss = flt.distill(s, t, kind=kind, temperature=temperature, beta=beta, scale_by_t2=scale_by_t2,
                       reduction=reduction)
    up = torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5
    (loss * up).sum().backward()
    s2 = s.detach().clone().requires_grad_()
    ref = _reference(s2, t, kind, temperature, beta, scale_by_t2, reduction, None, -100, 1.0, 0.0)
    (ref * up).sum().backward()
    assert loss.shape == ref.shape
    _close(loss, ref, torch.float64)
    _close(s.grad, s2.grad, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_distill_dtypes(dtype, teacher_dtype):
    gen = _gen(6)
    s = (2 * torch.randn(16, 300, generator=gen)).to(dtype).requires_grad_()
    t = (2 * torch.randn(16, 300, generator=gen)).to(teacher_dtype)
    loss = flt.distill(s, t, kind="kl", temperature=2.0)
    loss.backward()
    s2 = s.detach().double().requires_grad_()
    ref = _reference(s2, t.double(), "kl", 2.0, 0.5, False, "batchmean", None, -100, 1.0, 0.0)
    ref.backward()
    assert loss.dtype == dtype and s.grad.dtype == dtype
    _close(loss, ref, dtype)
    _close(s.grad, s2.grad, dtype)


def test_distill_hard_term_and_ignored_tokens():
    gen = _gen(7)
    s = torch.randn(10, 23, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(10, 23, dtype=torch.float64, generator=gen)
    target = torch.randint(0, 23, (10,), generator=gen)
    target[[1, 4, 5]] = -1
    kw = dict(kind="jsd", beta=0.3, temperature=2.0, ignore_index=-1, soft_weight=0.7, hard_weight=0.4)
    loss_fn = flt.DistillLoss(**kw)
    loss = loss_fn(s, t, target)
    loss.backward()
    assert torch.all(s.grad[[1, 4, 5]] == 0)
    s2 = s.detach().clone().requires_grad_()
    ref = _reference(s2, t, "jsd", 2.0, 0.3, False, "batchmean", target, -1, 0.7, 0.4)
    ref.backward()
    _close(loss, ref, torch.float64)
    _close(s.grad, s2.grad, torch.float64)
    assert "kind='jsd'" in repr(loss_fn)


@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_distill_topk_teacher(kind):
    gen = _gen(8)
    s = torch.randn(6, 40, dtype=torch.float64, generator=gen, requires_grad=True)
    full = torch.randn(6, 40, dtype=torch.float64, generator=gen)
    lp, idx = torch.topk(F.log_softmax(full, -1), 5, dim=-1)
    loss = flt.distill(s, (idx, lp.float()), kind=kind, temperature=1.5)
    loss.backward()
    s2 = s.detach().clone().requires_grad_()
    ref = _reference(s2, None, kind, 1.5, 0.5, False, "batchmean", None, -100, 1.0, 0.0, topk=(idx, lp.float()))
    ref.backward()
    _close(loss, ref, torch.float64)
    _close(s.grad, s2.grad, torch.float64)


def test_distill_retained_graph_and_gradcheck():
    gen = _gen(9)
    s = torch.randn(4, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(4, 9, dtype=torch.float64, generator=gen)
    loss = flt.distill(s, t, kind="reverse_kl")
    loss.backward(retain_graph=True)
    g1 = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * g1)
    assert torch.autograd.gradcheck(lambda a: flt.distill(a, t, kind="jsd", reduction="none"), (s,))


def test_distill_no_grad_and_errors():
    s, t = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        loss = flt.distill(s, t)
    assert loss.shape == () and not loss.requires_grad and float(loss) > 0
    with pytest.raises(TypeError, match="student: expected a torch.Tensor, found ndarray"):
        flt.distill(s.numpy(), t)
    with pytest.raises(ValueError, match=r"teacher: expected student's shape \(3, 8\), found \(3, 7\)"):
        flt.distill(s, t[:, :7])
    with pytest.raises(ValueError, match="teacher: gradients with respect to the teacher"):
        flt.distill(s, t.clone().requires_grad_())
    with pytest.raises(ValueError, match=r"target: expected shape \(3,\)"):
        flt.distill(s, t, target=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="teacher indices: expected an integer tensor, found torch.float32"):
        flt.distill(s, (t[:, :2], t[:, :2]))
    with pytest.raises(ValueError, match=r"teacher logprobs: expected shape \(3, 'k'\)"):
        flt.distill(s, (torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, 2)))
    with pytest.raises(ValueError, match="teacher: expected logits or an"):
        flt.distill(s, (t, t, t))
    with pytest.raises(TypeError, match="scale_by_t2: expected a bool"):
        flt.distill(s, t, scale_by_t2=1)
    with pytest.raises(ValueError, match="kind"):  # the numpy API's check
        flt.distill(s, t, kind="kld")


# --- torch.compile and opcheck -------------------------------------------------------------------

@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("topk", [False, True])
def test_opcheck_distill(dtype, reduction, with_grad, topk):
    gen = _gen(10)
    s = torch.randn(6, 11, generator=gen).to(dtype).requires_grad_()
    t = torch.randn(6, 11, generator=gen).to(dtype)
    idx = None
    if topk:
        t, idx = torch.topk(F.log_softmax(t.float(), -1), 3, dim=-1)
    target = torch.randint(0, 11, (6,), generator=gen)
    target[2] = -100
    args = (s, t, idx, target, "jsd", 2.0, 0.4, True, reduction, -100, 0.8, 0.3, with_grad)
    result = torch.library.opcheck(OPS.distill.default, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("with_grad", [True, False])
def test_opcheck_cross_entropy_probabilities(dtype, reduction, with_grad):
    gen = _gen(12)
    x = torch.randn(6, 11, generator=gen).to(dtype).requires_grad_()
    q = _probs((6, 11), gen, dtype=dtype)
    w = torch.rand(11, generator=gen).to(dtype) + 0.5
    args = (x, q, w, -100, reduction, 0.1, 1e-3, None, 1.0, None, with_grad)
    result = torch.library.opcheck(OPS.cross_entropy.default, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result


def test_compile_distill_and_soft_targets(fresh_dynamo):
    gen = _gen(11)
    student = torch.nn.Linear(8, 20).double()
    teacher = torch.nn.Linear(8, 20).double()
    h = torch.randn(12, 8, dtype=torch.float64, generator=gen)
    target = torch.randint(0, 20, (12,), generator=gen)

    def step(h, target):
        s = student(h)
        with torch.no_grad():
            t = teacher(h)
        q = torch.softmax(t, -1)
        return flt.distill(s, t, kind="jsd", target=target, hard_weight=0.5) + flt.cross_entropy(s, q)

    eager = step(h, target)
    eager.backward()
    g_eager = student.weight.grad.clone()
    student.weight.grad = None
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(h, target)
    got.backward()
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(student.weight.grad, g_eager, rtol=1e-12, atol=1e-12)
    explain = torch._dynamo.explain(step)(h, target)
    assert explain.graph_break_count == 0
