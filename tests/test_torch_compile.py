"""fastloss.torch under ``torch.compile``: the custom ops ``torch.ops.fastloss.*``.

* ``torch.library.opcheck`` on every op (schema, fake implementation, autograd
  registration, AOT dispatch with dynamic shapes) over dtypes, reductions,
  ``with_grad``, class weights, the cross-entropy options, bias / no bias, and
  the backward op of the linear cross-entropy;
* ``torch.compile(fullgraph=True)`` of a small model with each function and each
  module: loss and every gradient equal eager fastloss's and PyTorch's; no
  graph break (``torch._dynamo.explain``); ``dynamic=True`` over two batch sizes
  with one compilation; ``inplace_backward=True`` (a no-op under compile);
  reduction "none" with a non-uniform upstream gradient; inference under no_grad.

The default run compiles with ``backend="aot_eager"`` (Dynamo + AOT autograd,
which exercise the fake implementations and the autograd registration without
generating code); the ``slow`` tests compile with inductor.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fastloss.torch as flt

OPS = torch.ops.fastloss
N, D, H, V = 12, 6, 16, 10  # rows, input features, hidden features, classes
IGNORE = -1  # an ignore_index other than PyTorch's default, so that passing it through is tested

# Compiled by aot_eager, the graph runs the same kernels as eager mode: bit-identical results
# (measured 0.0 difference). Inductor fuses the model's own linear/tanh ops, which moves float32
# results by a few ulps; fastloss against PyTorch differs by float32 rounding of the loss.
EXACT = dict(rtol=0.0, atol=0.0)
FLOAT32 = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch, and leaves no cached graph behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _targets(n, v, gen, shape=None, ignore=IGNORE):
    """Class indices with about one in six set to ``ignore``."""
    t = torch.randint(0, v, (n,) if shape is None else shape, generator=gen)
    mask = torch.rand(t.shape, generator=gen) < 1 / 6
    return torch.where(mask, torch.full_like(t, ignore), t)


def _all_success(result):
    assert result, "opcheck ran no test"
    failed = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not failed, failed


# --- opcheck ---------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]


def _slow_unless(dtype, with_grad, core):
    """The default run checks the whole grid in float32 and a core of it (with gradients, the plain
    call and the one with every option) in float64 and bfloat16; --runslow checks the whole grid."""
    return () if dtype == torch.float32 or (with_grad and core) else pytest.mark.slow

#: Option sets of the cross-entropy ops: (name, weight?, label_smoothing, z_loss, softcap, logit_scale,
#: normalizer (mean only)).
CE_OPTIONS = [
    ("plain", False, 0.0, 0.0, None, 1.0, None),
    ("weight", True, 0.0, 0.0, None, 1.0, None),
    ("weight+smoothing", True, 0.1, 0.0, None, 1.0, None),
    ("z_loss+softcap+scale", False, 0.0, 1e-3, 5.0, 2.0, None),
    ("all+normalizer", True, 0.05, 1e-3, 4.0, 0.5, 7.0),
]


def _ce_option_cases():
    for dtype in DTYPES:
        for reduction in REDUCTIONS:
            for with_grad in (True, False):
                for opts in CE_OPTIONS:
                    if opts[-1] is not None and reduction != "mean":
                        continue  # normalizer is only accepted with reduction "mean"
                    core = opts in (CE_OPTIONS[0], CE_OPTIONS[3] if reduction != "mean" else CE_OPTIONS[-1])
                    yield pytest.param(dtype, reduction, with_grad, opts, marks=_slow_unless(dtype, with_grad, core),
                                       id=f"{str(dtype)[6:]}-{reduction}-grad{int(with_grad)}-{opts[0]}")


@pytest.mark.parametrize("dtype,reduction,with_grad,opts", list(_ce_option_cases()))
def test_opcheck_cross_entropy(dtype, reduction, with_grad, opts):
    _, use_weight, smoothing, z_loss, softcap, scale, normalizer = opts
    gen = _gen(1)
    # the gradient output is only defined with with_grad (without it, no input may require grad)
    x = torch.randn(N, V, generator=gen).to(dtype).requires_grad_(with_grad)
    t = _targets(N, V, gen)
    w = (torch.rand(V, generator=gen) + 0.5).to(dtype) if use_weight else None
    args = (x, t, w, IGNORE, reduction, smoothing, z_loss, softcap, scale, _norm(normalizer), with_grad)
    _all_success(torch.library.opcheck(OPS.cross_entropy.default, args))


def _mse_cases():
    for dtype in DTYPES:
        for reduction in REDUCTIONS:
            for with_grad in (True, False):
                for weighted in (False, True):
                    yield pytest.param(dtype, reduction, with_grad, weighted,
                                       marks=_slow_unless(dtype, with_grad, weighted),
                                       id=f"{str(dtype)[6:]}-{reduction}-grad{int(with_grad)}-weight{int(weighted)}")


@pytest.mark.parametrize("dtype,reduction,with_grad,weighted", list(_mse_cases()))
def test_opcheck_mse(dtype, reduction, with_grad, weighted):
    gen = _gen(2)
    x = torch.randn(N, D, generator=gen).to(dtype).requires_grad_(with_grad)
    y = torch.randn(N, D, generator=gen).to(dtype).requires_grad_(with_grad)
    w = torch.rand(1, D, generator=gen).to(dtype) if weighted else None  # broadcast over rows
    _all_success(torch.library.opcheck(OPS.mse.default, (x, y, w, reduction, with_grad)))


#: Option sets of the linear cross-entropy: (name, bias?, weight?, label_smoothing, z_loss, softcap,
#: logit_scale, normalizer (mean only), chunk_size).
LCE_OPTIONS = [
    ("nobias", False, False, 0.0, 0.0, None, 1.0, None, None),
    ("bias", True, False, 0.0, 0.0, None, 1.0, None, None),
    ("bias+weight+chunks", True, True, 0.1, 0.0, None, 1.0, None, 5),
    ("all+normalizer", True, True, 0.05, 1e-3, 4.0, 0.5, 7.0, 4),
]


def _lce_cases():
    for dtype in DTYPES:
        for reduction in REDUCTIONS:
            for with_grad in (True, False):
                for opts in LCE_OPTIONS:
                    if opts[-2] is not None and reduction != "mean":
                        continue
                    core = opts in (LCE_OPTIONS[0], LCE_OPTIONS[2] if reduction != "mean" else LCE_OPTIONS[-1])
                    yield pytest.param(dtype, reduction, with_grad, opts, marks=_slow_unless(dtype, with_grad, core),
                                       id=f"{str(dtype)[6:]}-{reduction}-grad{int(with_grad)}-{opts[0]}")


def _norm(normalizer):
    """The ops take the normalizer as a 0-d float64 tensor (so that a new value does not recompile)."""
    return None if normalizer is None else torch.tensor(normalizer, dtype=torch.float64)


def _lce_args(dtype, reduction, opts, requires_grad, gen):
    _, use_bias, use_weight, smoothing, z_loss, softcap, scale, normalizer, chunk = opts
    h = torch.randn(N, D, generator=gen).to(dtype).requires_grad_(requires_grad)
    lw = (torch.randn(V, D, generator=gen) / D ** 0.5).to(dtype).requires_grad_(requires_grad)
    b = torch.randn(V, generator=gen).to(dtype).requires_grad_(requires_grad) if use_bias else None
    t = _targets(N, V, gen)
    w = (torch.rand(V, generator=gen) + 0.5).to(dtype) if use_weight else None
    return (h, lw, t, b, w, IGNORE, reduction, smoothing, z_loss, softcap, scale, _norm(normalizer), chunk)


@pytest.mark.parametrize("dtype,reduction,with_grad,opts", list(_lce_cases()))
def test_opcheck_linear_cross_entropy(dtype, reduction, with_grad, opts):
    # For "none" the public function passes with_grad=False and the registered backward runs the
    # backward op; with_grad=True is accepted too (its gradients are then unused). Inputs require
    # grad exactly when the op is asked for gradients or when "none" backpropagates through the
    # backward op.
    requires_grad = with_grad or reduction == "none"
    args = _lce_args(dtype, reduction, opts, requires_grad, _gen(3)) + (with_grad,)
    _all_success(torch.library.opcheck(OPS.linear_cross_entropy.default, args))


def _lce_backward_cases():
    for dtype in DTYPES:
        for reduction in REDUCTIONS:
            for opts in LCE_OPTIONS[:3]:
                if dtype == torch.bfloat16 and reduction != "none":
                    continue  # 0-d bfloat16 grad_output: test_linear_cross_entropy_backward_bf16_scalar_grad_output
                yield pytest.param(dtype, reduction, opts, marks=_slow_unless(dtype, True, opts is LCE_OPTIONS[2]),
                                   id=f"{str(dtype)[6:]}-{reduction}-{opts[0]}")


@pytest.mark.parametrize("dtype,reduction,opts", list(_lce_backward_cases()))
def test_opcheck_linear_cross_entropy_backward(dtype, reduction, opts):
    gen = _gen(4)
    # the backward op has no autograd formula of its own (no double backward): plain inputs
    args = _lce_args(dtype, reduction, opts, False, gen)
    go = (torch.rand(N, generator=gen) + 0.5) if reduction == "none" else torch.tensor(1.7)
    _all_success(torch.library.opcheck(OPS.linear_cross_entropy_backward.default, (go.to(dtype),) + args))


def test_linear_cross_entropy_backward_bf16_scalar_grad_output():
    """The backward op takes a 0-d upstream gradient for "mean"/"sum" in float16/32/64, but not in
    bfloat16 (the public functions never call it so: they use the forward's gradients there)."""
    gen = _gen(5)
    args = _lce_args(torch.bfloat16, "mean", LCE_OPTIONS[1], False, gen)
    gh, gw, gb = OPS.linear_cross_entropy_backward(torch.tensor(2.0, dtype=torch.bfloat16), *args)
    ref = OPS.linear_cross_entropy_backward(torch.tensor(2.0, dtype=torch.float32),
                                            *[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                              else a for a in args])
    for got, want in zip((gh, gw, gb), ref):
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def _no_grad_op_call(op):
    gen = _gen(6)
    t = _targets(N, V, gen)
    if op == "cross_entropy":
        x = torch.randn(N, V, generator=gen, requires_grad=True)
        loss = OPS.cross_entropy(x, t, None, IGNORE, "mean", 0.0, 0.0, None, 1.0, None, False)[0]
        return loss, x, lambda: F.cross_entropy(x, t, ignore_index=IGNORE)
    if op == "mse":
        x, y = torch.randn(N, D, generator=gen, requires_grad=True), torch.randn(N, D, generator=gen)
        return OPS.mse(x, y, None, "mean", False)[0], x, lambda: F.mse_loss(x, y)
    h, lw = torch.randn(N, D, generator=gen, requires_grad=True), torch.randn(V, D, generator=gen)
    loss = OPS.linear_cross_entropy(h, lw, t, None, None, IGNORE, "mean", 0.0, 0.0, None, 1.0, None, None,
                                    False)[0]
    return loss, h, lambda: F.cross_entropy(h @ lw.T, t, ignore_index=IGNORE)


@pytest.mark.parametrize("op", ["cross_entropy", "mse", "linear_cross_entropy"])
def test_op_without_grad_then_backward(op):
    """Backward through an op run with with_grad=False should either compute the right gradient
    or refuse with an error that names with_grad; opcheck on such a call fails the same way.
    (The public functions never do this: they pass with_grad=True whenever a gradient is wanted.)"""
    loss, x, ref = _no_grad_op_call(op)
    try:
        loss.backward()
    except RuntimeError as e:
        assert "with_grad" in str(e), str(e)
        return
    (want,) = torch.autograd.grad(ref(), x)
    torch.testing.assert_close(x.grad, want)


# --- compiled models -------------------------------------------------------------------------------

class Net(nn.Module):
    """input (n, D) -> Linear -> tanh -> hidden (n, H) -> Linear -> (n, out)."""

    def __init__(self, out=V):
        super().__init__()
        self.body = nn.Linear(D, H)
        self.head = nn.Linear(H, out)

    def hidden(self, x):
        return torch.tanh(self.body(x))

    def forward(self, x):
        return self.head(self.hidden(x))


def _class_weight():
    return torch.rand(V, generator=_gen(7)) + 0.5


def _ce_kind(net):
    cw = _class_weight()

    def fast(x, t):
        return flt.cross_entropy(net(x), t, cw, IGNORE, label_smoothing=0.1)

    def ref(x, t):
        return F.cross_entropy(net(x), t, cw, ignore_index=IGNORE, label_smoothing=0.1)
    return fast, ref


def _ce_options_kind(net):
    z, cap, scale = 1e-2, 3.0, 1.5

    def fast(x, t):
        return flt.cross_entropy(net(x), t, ignore_index=IGNORE, z_loss=z, softcap=cap, logit_scale=scale)

    def ref(x, t):
        # docs: logits * logit_scale, then softcap * tanh(./softcap), then CE + z_loss * lse**2 per counted token
        y = cap * torch.tanh(net(x) * scale / cap)
        counted = t != IGNORE
        lse = torch.logsumexp(y, dim=-1)
        ce = F.cross_entropy(y, t, ignore_index=IGNORE, reduction="none")
        return (ce + z * lse ** 2 * counted).sum() / counted.sum()
    return fast, ref


def _mse_kind(net):
    def fast(x, y):
        return flt.mse_loss(net(x), y)

    def ref(x, y):
        return F.mse_loss(net(x), y)
    return fast, ref


def _lce_kind(net):
    def fast(x, t):
        return flt.linear_cross_entropy(net.hidden(x), net.head.weight, t, net.head.bias, ignore_index=IGNORE,
                                        label_smoothing=0.1)

    def ref(x, t):
        return F.cross_entropy(net(x), t, ignore_index=IGNORE, label_smoothing=0.1)
    return fast, ref


def _ce_module_kind(net):
    cw = _class_weight()
    net.loss = flt.CrossEntropyLoss(weight=cw, ignore_index=IGNORE, label_smoothing=0.1)
    torch_loss = nn.CrossEntropyLoss(weight=cw, ignore_index=IGNORE, label_smoothing=0.1)

    def fast(x, t):
        return net.loss(net(x), t)

    def ref(x, t):
        return torch_loss(net(x), t)
    return fast, ref


def _mse_module_kind(net):
    net.loss = flt.MSELoss(reduction="sum")

    def fast(x, y):
        return net.loss(net(x), y)

    def ref(x, y):
        return nn.MSELoss(reduction="sum")(net(x), y)
    return fast, ref


def _lce_module_kind(net):
    cw = _class_weight()
    head = net.head
    # the fused head takes the nn.Linear's state dict (same parameter layout)
    net.head = flt.LinearCrossEntropyLoss(H, V, bias=True, weight=cw, ignore_index=IGNORE, label_smoothing=0.1,
                                          chunk_size=5)
    net.head.linear.load_state_dict(head.state_dict())

    def fast(x, t):
        return net.head(net.hidden(x), t)

    def ref(x, t):
        return F.cross_entropy(net.head.linear(net.hidden(x)), t, cw, ignore_index=IGNORE, label_smoothing=0.1)
    return fast, ref


KINDS = {
    "cross_entropy": _ce_kind,
    "cross_entropy_options": _ce_options_kind,
    "mse_loss": _mse_kind,
    "linear_cross_entropy": _lce_kind,
    "CrossEntropyLoss": _ce_module_kind,
    "MSELoss": _mse_module_kind,
    "LinearCrossEntropyLoss": _lce_module_kind,
}


def _setup(kind, n=N, seed=0):
    """(net, fast, ref, x, y): a fresh seeded net with its fastloss and PyTorch loss functions, and a batch."""
    torch.manual_seed(seed)
    net = Net(D if kind in ("mse_loss", "MSELoss") else V)
    fast, ref = KINDS[kind](net)
    gen = _gen(seed + 100)
    x = torch.randn(n, D, generator=gen)
    y = torch.randn(n, D, generator=gen) if "mse" in kind.lower() else _targets(n, V, gen)
    return net, fast, ref, x, y


def _run(net, fn, x, y, grad_output=None):
    """fn's loss and the gradients of every parameter and of the input (from a fresh leaf copy of x)."""
    net.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    loss = fn(x, y)
    (loss if grad_output is None else (loss * grad_output).sum()).backward()
    grads = {name: p.grad.detach().clone() for name, p in net.named_parameters()}
    grads["<input>"] = x.grad.detach().clone()
    return loss.detach(), grads


def _assert_same(got, want, tol):
    (lg, gg), (lw, gw) = got, want
    torch.testing.assert_close(lg, lw, **tol)
    assert gg.keys() == gw.keys()
    for name in gw:
        torch.testing.assert_close(gg[name], gw[name], **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


def _check_compiled(kind, backend, tol_eager):
    net, fast, ref, x, y = _setup(kind)
    compiled = torch.compile(fast, backend=backend, fullgraph=True)
    got = _run(net, compiled, x, y)
    _assert_same(got, _run(net, fast, x, y), tol_eager)
    _assert_same(got, _run(net, ref, x, y), FLOAT32)
    # a second call (new batch, same shapes) reuses the graph and is still right
    x2 = torch.randn_like(x)
    _assert_same(_run(net, compiled, x2, y), _run(net, fast, x2, y), tol_eager)


@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_model_aot_eager(kind):
    _check_compiled(kind, "aot_eager", EXACT)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_model_inductor(kind):
    _check_compiled(kind, "inductor", FLOAT32)


@pytest.mark.parametrize("kind", list(KINDS))
def test_no_graph_break(kind):
    net, fast, _, x, y = _setup(kind)
    x.requires_grad_()
    explanation = torch._dynamo.explain(fast)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # the graph calls the custom op (not a traced-through eager autograd.Function)
    ops = {str(node.target) for g in explanation.graphs for node in g.graph.nodes if node.op == "call_function"}
    assert any(o.startswith("fastloss.") for o in ops), ops


@pytest.mark.parametrize("kind", ["cross_entropy", "mse_loss", "linear_cross_entropy", "LinearCrossEntropyLoss"])
def test_compiled_inference_no_grad(kind):
    """Under no_grad the ops run with with_grad=False; the loss is unchanged."""
    net, fast, ref, x, y = _setup(kind)
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(x, y)
        torch.testing.assert_close(got, fast(x, y), **EXACT)
        torch.testing.assert_close(got, ref(x, y), **FLOAT32)
    assert got.grad_fn is None


# --- dynamic shapes --------------------------------------------------------------------------------

def _check_dynamic(kind, backend, tol_eager):
    net, fast, ref, _, _ = _setup(kind)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fast, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for n in (12, 29):
        _, _, _, x, y = _setup(kind, n=n, seed=n)
        got = _run(net, compiled, x, y)
        frames.append(counter.frame_count)
        _assert_same(got, _run(net, fast, x, y), tol_eager)
        _assert_same(got, _run(net, ref, x, y), FLOAT32)
    # The first call may count 2: with dynamic=True Dynamo first traces the float options as
    # symbolic floats, then restarts the analysis once to specialize them (the ops take Python
    # floats). The second batch size must not compile again.
    assert frames[0] >= 1 and frames[1] == frames[0], f"compiled frames after each call: {frames}"


@pytest.mark.parametrize("kind", ["cross_entropy", "mse_loss", "linear_cross_entropy",
                                  pytest.param("CrossEntropyLoss", marks=pytest.mark.slow),
                                  pytest.param("LinearCrossEntropyLoss", marks=pytest.mark.slow)])
def test_dynamic_batch_size(kind):
    _check_dynamic(kind, "aot_eager", EXACT)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cross_entropy", "linear_cross_entropy"])
def test_dynamic_batch_size_inductor(kind):
    _check_dynamic(kind, "inductor", FLOAT32)


# --- inplace_backward and reduction "none" under compile ----------------------------------------------

def _inplace_fns(net):
    def fast(x, t, inplace):
        return flt.cross_entropy(net(x), t, ignore_index=IGNORE, label_smoothing=0.1, inplace_backward=inplace)
    return fast


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_inplace_backward_is_a_noop_under_compile(backend):
    net, _, ref, x, t = _setup("cross_entropy")
    fast = _inplace_fns(net)
    results = {}
    for inplace in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(lambda x, t, inplace=inplace: fast(x, t, inplace), backend=backend, fullgraph=True)
        results[inplace] = _run(net, compiled, x, t)
    _assert_same(results[True], results[False], EXACT)
    # and both equal eager inplace_backward=True (which does overwrite the logits)
    tol = EXACT if backend == "aot_eager" else FLOAT32
    _assert_same(results[True], _run(net, lambda x, t: fast(x, t, True), x, t), tol)
    _assert_same(results[True], _run(net, lambda x, t: F.cross_entropy(net(x), t, ignore_index=IGNORE,
                                                                       label_smoothing=0.1), x, t), FLOAT32)


def test_inplace_backward_no_graph_break():
    net, _, _, x, t = _setup("cross_entropy")
    fast = _inplace_fns(net)
    explanation = torch._dynamo.explain(lambda x, t: fast(x, t, True))(x.requires_grad_(), t)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def _none_cases():
    """(name, fast(net, x, y), ref(net, x, y), x shape, y maker): reduction "none" in several layouts."""
    def ce(net, x, t):
        return flt.cross_entropy(net(x), t, ignore_index=IGNORE, reduction="none", label_smoothing=0.1)

    def ce_ref(net, x, t):
        return F.cross_entropy(net(x), t, ignore_index=IGNORE, reduction="none", label_smoothing=0.1)

    def ce3(net, x, t):  # (N, C, d1) logits: the class dimension moved to 1, as PyTorch takes it
        return flt.cross_entropy(net(x).movedim(-1, 1), t, ignore_index=IGNORE, reduction="none")

    def ce3_ref(net, x, t):
        return F.cross_entropy(net(x).movedim(-1, 1), t, ignore_index=IGNORE, reduction="none")

    def lce(net, x, t):  # (B, T, D) hidden states, (B, T) targets: the backward op's second sweep
        return flt.linear_cross_entropy(net.hidden(x), net.head.weight, t, net.head.bias, ignore_index=IGNORE,
                                        reduction="none", z_loss=1e-3, chunk_size=7)

    def lce_ref(net, x, t):
        y = net(x)
        lse = torch.logsumexp(y, dim=-1)
        return F.cross_entropy(y.movedim(-1, 1), t, ignore_index=IGNORE, reduction="none") \
            + 1e-3 * lse ** 2 * (t != IGNORE)

    def mse(net, x, y):
        return flt.mse_loss(net(x), y, reduction="none")

    def mse_ref(net, x, y):
        return F.mse_loss(net(x), y, reduction="none")

    def targets(shape):
        return lambda gen: _targets(0, V, gen, shape=shape)

    return [
        ("cross_entropy", ce, ce_ref, (N, D), V, targets((N,))),
        ("cross_entropy_3d", ce3, ce3_ref, (3, 5, D), V, targets((3, 5))),
        ("linear_cross_entropy_3d", lce, lce_ref, (3, 5, D), V, targets((3, 5))),
        ("mse_loss", mse, mse_ref, (N, D), D, lambda gen: torch.randn(N, D, generator=gen)),
    ]


NONE_CASES = {c[0]: c for c in _none_cases()}


def _check_none(name, backend, tol_eager):
    _, fast, ref, xshape, out, make_y = NONE_CASES[name]
    torch.manual_seed(0)
    net = Net(out)
    gen = _gen(11)
    x, y = torch.randn(xshape, generator=gen), make_y(gen)
    eager_loss = fast(net, x, y)
    # a non-uniform upstream gradient: every row (or element) its own weight
    go = torch.linspace(-1.0, 2.0, eager_loss.numel()).reshape(eager_loss.shape)
    compiled = torch.compile(lambda x, y: fast(net, x, y), backend=backend, fullgraph=True)
    got = _run(net, compiled, x, y, go)
    assert got[0].shape == eager_loss.shape
    _assert_same(got, _run(net, lambda x, y: fast(net, x, y), x, y, go), tol_eager)
    _assert_same(got, _run(net, lambda x, y: ref(net, x, y), x, y, go), FLOAT32)


@pytest.mark.parametrize("name", list(NONE_CASES))
def test_reduction_none_upstream_gradient(name):
    _check_none(name, "aot_eager", EXACT)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cross_entropy_3d", "linear_cross_entropy_3d"])
def test_reduction_none_upstream_gradient_inductor(name):
    _check_none(name, "inductor", FLOAT32)


def test_compiled_training_step_matches_eager():
    """A few optimizer steps through a compiled fastloss loss track eager PyTorch's."""
    net, fast, _, _, _ = _setup("linear_cross_entropy")
    net_ref = copy.deepcopy(net)
    ref = _lce_kind(net_ref)[1]
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    runs = [(compiled, torch.optim.SGD(net.parameters(), lr=0.5)), (ref, torch.optim.SGD(net_ref.parameters(), lr=0.5))]
    gen = _gen(12)
    for _ in range(5):
        x, t = torch.randn(N, D, generator=gen), _targets(N, V, gen)
        for fn, opt in runs:
            opt.zero_grad()
            fn(x, t).backward()
            opt.step()
    for (name, p), q in zip(net.named_parameters(), net_ref.parameters()):
        torch.testing.assert_close(p, q, **FLOAT32, msg=lambda m, name=name: f"{name}: {m}")


# --- normalizer under compile (gradient accumulation) ---------------------------------------------

def _accumulation_batches(count):
    """Micro-batches whose counted-target totals differ, as they do with padding: the normalizer
    (the accumulated batch's count) changes from step to step."""
    gen = _gen(13)
    for _ in range(count):
        x, t = torch.randn(N, D, generator=gen), _targets(N, V, gen)
        yield x, t, float((t != IGNORE).sum()) + 3.0  # + the counted targets of a second micro-batch


def test_constant_normalizer_compiles_once():
    net, _, _, _, _ = _setup("cross_entropy")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x, t: flt.cross_entropy(net(x), t, ignore_index=IGNORE, normalizer=20.0),
                             backend=counter, fullgraph=True)
    frames = []
    for x, t, _ in _accumulation_batches(3):
        got = _run(net, compiled, x, t)
        frames.append(counter.frame_count)
        want = _run(net, lambda x, t: F.cross_entropy(net(x), t, ignore_index=IGNORE, reduction="sum") / 20.0, x, t)
        _assert_same(got, want, FLOAT32)
    assert frames[1:] == frames[:1] * 2, frames


def test_varying_normalizer_does_not_recompile():
    """Gradient accumulation's normalizer (the accumulated batch's counted targets) changes every
    step; a compiled loss must not compile once per value. A Python float costs one recompile, when
    it first changes (Dynamo then makes it dynamic: the op takes it as a tensor), never more; a
    tensor normalizer costs none (test_tensor_normalizer_under_fullgraph)."""
    net, _, _, _, _ = _setup("cross_entropy")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x, t, n: flt.cross_entropy(net(x), t, ignore_index=IGNORE, normalizer=n),
                             backend=counter, fullgraph=True)
    frames, seen = [], set()
    for i, (x, t, _) in enumerate(_accumulation_batches(6)):
        n = 20.0 + i  # six distinct values
        got = _run(net, lambda x, t, n=n: compiled(x, t, n), x, t)
        frames.append(counter.frame_count)
        seen.add(n)
        want = _run(net, lambda x, t, n=n: F.cross_entropy(net(x), t, ignore_index=IGNORE, reduction="sum") / n,
                    x, t)
        _assert_same(got, want, FLOAT32)
    assert len(seen) == 6, seen
    assert frames[3:] == [frames[2]] * 3, f"compiled frames after each call: {frames}"


def test_tensor_normalizer_compiles_once():
    net, _, _, _, _ = _setup("cross_entropy")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x, t, n: flt.cross_entropy(net(x), t, ignore_index=IGNORE, normalizer=n),
                             backend=counter, fullgraph=True)
    frames = []
    for x, t, n in _accumulation_batches(4):
        got = _run(net, lambda x, t, n=n: compiled(x, t, torch.tensor(n)), x, t)
        frames.append(counter.frame_count)
        want = _run(net, lambda x, t, n=n: F.cross_entropy(net(x), t, ignore_index=IGNORE, reduction="sum") / n,
                    x, t)
        _assert_same(got, want, FLOAT32)
    assert frames == [frames[0]] * 4, f"compiled frames after each call: {frames}"


def test_tensor_normalizer_under_fullgraph():
    """The count of counted targets as a tensor (how a training loop computes it) as normalizer:
    accepted in eager mode, and should be under fullgraph compile."""
    net, _, _, _, _ = _setup("cross_entropy")

    def fast(x, t):
        return flt.cross_entropy(net(x), t, ignore_index=IGNORE, normalizer=(t != IGNORE).sum() + 3)

    x, t, n = next(_accumulation_batches(1))
    want = _run(net, lambda x, t: F.cross_entropy(net(x), t, ignore_index=IGNORE, reduction="sum") / n, x, t)
    _assert_same(_run(net, fast, x, t), want, FLOAT32)  # eager: fine
    _assert_same(_run(net, torch.compile(fast, backend="aot_eager", fullgraph=True), x, t), want, FLOAT32)
