"""Benchmark cases: what is measured, on which inputs, by which providers.

A :class:`Case` is an operation (``"ce"``: softmax cross-entropy with
class-index targets, mean reduction; ``"soft-ce"``: the same with probability
targets of the logits' shape; ``"distill-kl"`` / ``"distill-jsd"``:
distillation of a student's logits towards a teacher's, forward KL or TRL's
generalised JSD (``beta`` :data:`DISTILL_BETA`), both at temperature
:data:`DISTILL_TEMPERATURE`, batchmean; ``"mse"``: mean squared error), a
shape, a dtype and a mode (``"forward"``, or ``"fwd+bwd"``: the loss and its
gradient with respect to the logits / student / predictions). It knows the
least work any implementation must do: the bytes it must move (inputs read
once, the gradient written once) and the exp evaluations (one per logit for
both cross-entropies, two per element pair, student and teacher, for
distillation).

:func:`make_inputs` builds a case's inputs (fixed seed); :func:`build` turns a
case, its inputs and a provider name into a :class:`Bench`: the callable to
time plus an optional untimed setup run before every call. Every provider
computes the same loss (the tests check this), so timings compare like with
like. Providers:

=================  ==========================================================
fastloss           ``fastloss.cross_entropy`` / ``fastloss.mse`` (forward)
fastloss-out       ``*_with_grad(..., out=buf)``, ``buf`` allocated once
fastloss-inplace   ``cross_entropy_with_grad(..., inplace=True)``; the logits
                   are restored in the untimed setup before every call
fastloss-alloc     ``*_with_grad(...)`` allocating its gradient every call
torch              eager ``F.cross_entropy`` / ``F.mse_loss`` (+ ``backward``)
torch-compile      ``torch.compile`` of the same function (skipped when it
                   does not compile here)
numpy              plain numpy, float32 only
jax                ``optax.softmax_cross_entropy_with_integer_labels`` under
                   ``jax.jit`` (``jax.value_and_grad``), when JAX is installed
=================  ==========================================================

Probability targets and distillation (inputs and gradient in the case's
dtype, teacher included) have fastloss, fastloss-out, torch and
torch-compile: ``cross_entropy(x, probs)`` / ``distill(s, t, kind=...)`` and
their ``*_with_grad(..., out=buf)``; torch eager ``F.cross_entropy(x,
probs)``, and for distillation ``F.kl_div(F.log_softmax(s / T),
F.log_softmax(t / T), log_target=True, reduction="batchmean")`` (kl) or TRL's
``generalized_jsd_loss`` (jsd: the mixture's log-probabilities by
``logsumexp`` of the two log-probabilities plus ``log(beta)`` /
``log(1 - beta)``, then the two ``kl_div``), computed in float32 for
bfloat16 inputs as autocast does.

Linear cross-entropy (``"lce"``, shape ``(N, D, V)``: the loss of
``hidden @ W.T``; fwd+bwd adds its gradients for hidden and W) has its own
providers:

=================  ==========================================================
fastloss           ``linear_cross_entropy_with_grad`` (chunked, default
                   chunk); forward: ``linear_cross_entropy``
torch              eager ``F.linear`` + ``F.cross_entropy`` + ``backward``
                   (materialises the (N, V) logits)
torch-lce          ``F.linear_cross_entropy`` + ``backward``
blas-floor         the three matrix products alone (logits, grad_hidden,
                   grad_W) with numpy, ``out=`` into preallocated buffers;
                   forward: the logits product alone
=================  ==========================================================

Those cases are not in the cross-entropy/MSE sweeps: see
:func:`linear_ce_cases` and :func:`linear_ce_quick_cases`.
:func:`small_cases` is a set of small shapes of every op, where per-call
overheads dominate, run against torch eager (:data:`SMALL_PROVIDERS`).

torch, JAX and optax are imported only when a provider is built.
"""

import math
from dataclasses import dataclass

import numpy as np

from .. import _validate as V
from ..ops.cross_entropy import cross_entropy, cross_entropy_with_grad
from ..ops.distill import distill, distill_with_grad
from ..ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_with_grad
from ..ops.mse import mse, mse_with_grad

__all__ = [
    "OPS", "CE_SHAPES", "MSE_SIZES", "DTYPES", "MODES", "PROVIDERS",
    "DISTILL_KINDS", "DISTILL_TEMPERATURE", "DISTILL_BETA", "SOFT_SHAPES",
    "Case", "Bench", "Unavailable",
    "LCE_SHAPES", "LCE_PROVIDERS", "linear_ce_cases", "linear_ce_quick_cases",
    "SMALL_CE_SHAPES", "SMALL_LCE_SHAPES", "SMALL_PROVIDERS", "small_cases",
    "suite_cases", "core_cases", "quick_cases", "make_inputs", "providers_for", "build",
    "family", "loss_value", "grad_array",
]

#: Cross-entropy shapes (tokens, vocabulary) of the full sweep.
CE_SHAPES = ((4096, 32000), (2048, 128256), (8192, 50257), (512, 262144))
#: MSE sizes (elements) of the full sweep: 2^26 and 2^28.
MSE_SIZES = (1 << 26, 1 << 28)
DTYPES = ("float32", "bfloat16")
MODES = ("forward", "fwd+bwd")
#: Every op a :class:`Case` can be.
OPS = ("ce", "soft-ce", "distill-kl", "distill-jsd", "mse", "lce")
#: The kinds of distillation benchmarked (op ``"distill-<kind>"``).
DISTILL_KINDS = ("kl", "jsd")
#: Temperature of the distillation cases, and JSD's mixture weight.
DISTILL_TEMPERATURE = 2.0
DISTILL_BETA = 0.5
#: Shapes (N, V) of probability-target and distillation cases in the full sweep.
SOFT_SHAPES = ((4096, 32000),)
#: Ops whose inputs are two (N, V) arrays and whose gradient is (N, V).
_PAIR_OPS = ("soft-ce", "distill-kl", "distill-jsd")

#: Every provider, in table order.
PROVIDERS = ("fastloss", "fastloss-out", "fastloss-inplace", "fastloss-alloc",
             "torch", "torch-compile", "numpy", "jax", "torch-lce", "blas-floor")

#: Providers whose fwd+bwd returns a fresh gradient array each call, which pays
#: the first touch of its pages (its floor counts it: ``runner.touch_floor``).
FRESH_GRADIENT = ("fastloss-alloc", "torch", "torch-compile", "numpy", "jax")

#: Linear cross-entropy shapes (N tokens, D hidden, V vocabulary).
LCE_SHAPES = ((4096, 1024, 128256),)
#: The small set (:func:`small_cases`): cross-entropy shapes (N, V); MSE runs
#: at the same element counts; linear cross-entropy (N, D, V).
SMALL_CE_SHAPES = ((8, 100), (64, 1000), (256, 4096))
SMALL_LCE_SHAPES = ((64, 32, 500),)
#: Providers (families) of the small set: fastloss against torch eager.
SMALL_PROVIDERS = ("fastloss", "torch")

#: Providers of the linear cross-entropy cases, in table order.
LCE_PROVIDERS = ("fastloss", "torch", "torch-lce", "blas-floor")

_FORWARD = {op: ("fastloss", "torch", "torch-compile", "numpy", "jax") for op in ("ce", "mse")}
_FORWARD.update({op: ("fastloss", "torch", "torch-compile") for op in _PAIR_OPS})
_BACKWARD = {
    "ce": ("fastloss-out", "fastloss-inplace", "fastloss-alloc", "torch", "torch-compile",
           "numpy", "jax"),
    "mse": ("fastloss-out", "fastloss-alloc", "torch", "torch-compile", "numpy", "jax"),
}
_BACKWARD.update({op: ("fastloss-out", "torch", "torch-compile") for op in _PAIR_OPS})


def _dtype(name):
    if name == "float32":
        return np.dtype(np.float32)
    if name == "bfloat16":
        return V.BFLOAT16
    raise ValueError(f"dtype: expected one of {DTYPES}, found {name!r}")


def size_label(n):
    """``2^k`` for a power of two, else the number."""
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)


@dataclass(frozen=True)
class Case:
    """One benchmark case. ``shape`` is (N, V) for ``"ce"``, ``"soft-ce"`` and
    ``"distill-*"``, (n,) for ``"mse"``, (N, D, V) for ``"lce"``."""

    op: str
    shape: tuple
    dtype: str = "float32"
    mode: str = "forward"

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op: expected one of {', '.join(OPS)}, found {self.op!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, found {self.mode!r}")
        _dtype(self.dtype)
        want = {"mse": 1, "lce": 3}.get(self.op, 2)
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != want or min(shape) < 1:
            raise ValueError(f"shape: expected {want} positive sizes for op {self.op!r}, "
                             f"found {self.shape!r}")
        object.__setattr__(self, "shape", shape)

    @property
    def size_label(self):
        if self.op != "mse":
            return "x".join(str(s) for s in self.shape)
        return size_label(self.shape[0])

    @property
    def name(self):
        """e.g. ``ce-fwd+bwd-4096x32000-float32``, ``mse-forward-2^26-bfloat16``."""
        return f"{self.op}-{self.mode}-{self.size_label}-{self.dtype}"

    @property
    def elements(self):
        return math.prod(self.shape)

    @property
    def itemsize(self):
        return _dtype(self.dtype).itemsize

    @property
    def flops(self):
        """lce: the (N, D) x (D, V) matrix products, 2 N D V each: one forward,
        three for fwd+bwd; else 0."""
        if self.op != "lce":
            return 0
        n, d, v = self.shape
        return (6 if self.mode == "fwd+bwd" else 2) * n * d * v

    @property
    def bytes_read(self):
        """Logits (ce); logits and probabilities (soft-ce); student and teacher
        (distill-*); prediction and target (mse); each read once. hidden and W
        for lce."""
        if self.op == "lce":
            n, d, v = self.shape
            return (n * d + v * d) * self.itemsize
        return self.elements * self.itemsize * (1 if self.op == "ce" else 2)

    @property
    def bytes_written(self):
        """The gradient, written once (fwd+bwd only); lce: grad_hidden and grad_W."""
        if self.op == "lce":
            return self.bytes_read if self.mode == "fwd+bwd" else 0
        return self.elements * self.itemsize if self.mode == "fwd+bwd" else 0

    @property
    def bytes_moved(self):
        return self.bytes_read + self.bytes_written

    @property
    def exp_evals(self):
        """Least number of exp evaluations: one per logit for ce and soft-ce
        (the backward pass can reuse the forward's), two per element pair for
        distillation (the student's and the teacher's softmax), none for mse."""
        if self.op == "lce":
            return self.shape[0] * self.shape[2]
        return {"mse": 0, "distill-kl": 2, "distill-jsd": 2}.get(self.op, 1) * self.elements

    @property
    def distill_kind(self):
        """``"kl"`` / ``"jsd"`` for a distillation case, else None."""
        return self.op[len("distill-"):] if self.op.startswith("distill-") else None


def _sweep(op, sizes, dtypes, modes):
    out = []
    for size in sizes:
        shape = (size,) if op == "mse" else size
        for dtype in dtypes:
            for mode in modes:
                out.append(Case(op, shape, dtype, mode))
    return out


def _soft_sweep(shapes, dtypes, modes):
    """soft-ce and both distillation kinds over ``shapes``."""
    return [c for op in _PAIR_OPS for c in _sweep(op, shapes, dtypes, modes)]


def suite_cases():
    """The full sweep: cross-entropy over :data:`CE_SHAPES`, MSE over
    :data:`MSE_SIZES`, probability targets and distillation (kl, jsd) over
    :data:`SOFT_SHAPES`, each in float32 and bfloat16, forward and fwd+bwd.
    Cases sharing inputs are adjacent."""
    return (_sweep("ce", CE_SHAPES, DTYPES, MODES) + _sweep("mse", MSE_SIZES, DTYPES, MODES)
            + _soft_sweep(SOFT_SHAPES, DTYPES, MODES))


def core_cases():
    """The issue-2 core set: ce (4096, 32000) and (2048, 128256) float32 forward
    and fwd+bwd, MSE 2^26 float32 forward and fwd+bwd."""
    return _sweep("ce", CE_SHAPES[:2], ("float32",), MODES) + \
        _sweep("mse", MSE_SIZES[:1], ("float32",), MODES)


def quick_cases():
    """Small cases of the same kinds, for smoke-testing the suite in seconds."""
    return (_sweep("ce", ((256, 32000), (16, 262144)), DTYPES, MODES)
            + _sweep("mse", (1 << 20,), DTYPES, MODES)
            + _soft_sweep(((256, 32000),), DTYPES, MODES))


def small_cases():
    """Small shapes where call overheads dominate: cross-entropy, probability
    targets and distillation (kl, jsd) at :data:`SMALL_CE_SHAPES`, MSE at the
    same element counts (8 x 100 -> 800), linear cross-entropy at
    :data:`SMALL_LCE_SHAPES`; float32, forward and fwd+bwd."""
    return (_sweep("ce", SMALL_CE_SHAPES, ("float32",), MODES)
            + _soft_sweep(SMALL_CE_SHAPES, ("float32",), MODES)
            + _sweep("mse", [n * v for n, v in SMALL_CE_SHAPES], ("float32",), MODES)
            + _sweep("lce", SMALL_LCE_SHAPES, ("float32",), MODES))


def linear_ce_cases():
    """Linear cross-entropy, float32, fwd+bwd, over :data:`LCE_SHAPES`."""
    return [Case("lce", s, "float32", "fwd+bwd") for s in LCE_SHAPES]


def linear_ce_quick_cases():
    """A small linear cross-entropy case (512 x 256 x 32000) for smoke tests."""
    return [Case("lce", (512, 256, 32000), "float32", "fwd+bwd")]


def make_inputs(case, seed=0):
    """The inputs of ``case`` (a dict of numpy arrays), from a fixed seed.

    ce: ``logits`` (N, V) of standard normals times 2 in the case's dtype and
    ``targets`` (N,) int64 in [0, V). soft-ce: the same ``logits`` and
    ``probs`` (N, V), rows of uniform**4 normalised in float32, then rounded to
    the case's dtype. distill-*: ``student`` (N, V) of standard normals times
    2 and ``teacher`` = student + standard normals (float32, then the case's
    dtype). mse: ``pred`` and ``target`` (n,). Inputs depend only on (op,
    shape, dtype), so the two modes share them.
    """
    rng = np.random.default_rng(seed)
    dt = _dtype(case.dtype)

    def normal(shape, scale):
        a = rng.standard_normal(shape, dtype=np.float32)
        if scale != 1:
            a *= np.float32(scale)
        return a if dt == np.float32 else a.astype(dt)

    if case.op == "lce":
        n, d, v = case.shape
        return {"hidden": normal((n, d), 1.0), "weight": normal((v, d), 1.0 / math.sqrt(d)),
                "targets": rng.integers(0, v, n)}
    if case.op == "ce":
        n, v = case.shape
        return {"logits": normal((n, v), 2.0), "targets": rng.integers(0, v, n)}
    if case.op == "soft-ce":
        logits = normal(case.shape, 2.0)
        q = rng.random(case.shape, dtype=np.float32)
        q **= 4  # peaked rows: a few classes carry most of the mass
        q /= q.sum(axis=1, keepdims=True)
        return {"logits": logits, "probs": q if dt == np.float32 else q.astype(dt)}
    if case.distill_kind is not None:
        s = rng.standard_normal(case.shape, dtype=np.float32)
        s *= np.float32(2.0)
        t = rng.standard_normal(case.shape, dtype=np.float32)
        t += s
        if dt != np.float32:
            s, t = s.astype(dt), t.astype(dt)
        return {"student": s, "teacher": t}
    return {"pred": normal(case.shape, 1.0), "target": normal(case.shape, 1.0)}


class Unavailable(Exception):
    """A provider that cannot run this case here (not installed, dtype not
    supported, does not compile); the message says why."""


@dataclass
class Bench:
    """``fn()`` is timed; ``setup()`` (optional) runs untimed before every call.

    ``fn`` returns the loss for ``"forward"`` and ``(loss, grad)`` for
    ``"fwd+bwd"``, in the provider's own types (see :func:`loss_value`,
    :func:`grad_array`). ``note`` is shown beside the result.
    """

    fn: object
    setup: object = None
    note: str = ""


def family(provider):
    """The implementation a provider belongs to: ``fastloss-out`` -> ``fastloss``.
    Rows of other families are a row's peers."""
    return "fastloss" if provider.startswith("fastloss") else provider


def providers_for(case, names=None):
    """Providers that apply to ``case`` (by op and mode), in table order.

    ``names`` filters them: each entry is a provider name or a family
    (``"fastloss"`` selects every fastloss variant). Unknown names raise
    ValueError. Whether a provider can run here is only known from :func:`build`.
    """
    if case.op == "lce":
        applicable = LCE_PROVIDERS
    else:
        applicable = (_FORWARD if case.mode == "forward" else _BACKWARD)[case.op]
    if names is None:
        return list(applicable)
    names = list(names)
    for nm in names:
        if nm not in PROVIDERS:
            raise ValueError(f"providers: unknown provider {nm!r}; expected some of "
                             f"{', '.join(PROVIDERS)}")
    return [p for p in applicable if p in names or family(p) in names]


def build(case, inputs, provider):
    """The :class:`Bench` of ``provider`` on ``case``; raises :class:`Unavailable`."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider: unknown provider {provider!r}")
    if provider not in providers_for(case):
        raise Unavailable(f"not applicable to {case.op} {case.mode}")
    if case.op == "lce":
        return _linear_ce(case, inputs, provider)
    if provider.startswith("fastloss"):
        return _fastloss(case, inputs, provider)
    if provider in ("torch", "torch-compile"):
        return _torch(case, inputs, compiled=provider == "torch-compile")
    if provider == "numpy":
        return _numpy(case, inputs)
    return _jax(case, inputs)


# --- fastloss ---------------------------------------------------------------

def _fastloss(case, inputs, provider):
    if case.op in _PAIR_OPS:
        return _fastloss_pair(case, inputs)
    if case.op == "ce":
        x, t = inputs["logits"], inputs["targets"]
        if case.mode == "forward":
            return Bench(lambda: cross_entropy(x, t))
        if provider == "fastloss-out":
            out = np.empty_like(x)
            return Bench(lambda: cross_entropy_with_grad(x, t, out=out))
        if provider == "fastloss-inplace":
            buf = np.empty_like(x)
            return Bench(lambda: cross_entropy_with_grad(buf, t, inplace=True),
                         setup=lambda: np.copyto(buf, x), note="logits restored untimed")
        return Bench(lambda: cross_entropy_with_grad(x, t))
    p, y = inputs["pred"], inputs["target"]
    if case.mode == "forward":
        return Bench(lambda: mse(p, y))
    if provider == "fastloss-out":
        out = np.empty_like(p)
        return Bench(lambda: mse_with_grad(p, y, out=out))
    return Bench(lambda: mse_with_grad(p, y))


def _distill_kwargs(case):
    return {"kind": case.distill_kind, "temperature": DISTILL_TEMPERATURE, "beta": DISTILL_BETA}


def _fastloss_pair(case, inputs):
    """fastloss (forward) / fastloss-out (fwd+bwd) of soft-ce and distill-*."""
    if case.op == "soft-ce":
        a, b, kw = inputs["logits"], inputs["probs"], {}
        loss, with_grad = cross_entropy, cross_entropy_with_grad
    else:
        a, b, kw = inputs["student"], inputs["teacher"], _distill_kwargs(case)
        loss, with_grad = distill, distill_with_grad
    if case.mode == "forward":
        return Bench(lambda: loss(a, b, **kw))
    out = np.empty_like(a)
    return Bench(lambda: with_grad(a, b, out=out, **kw))


# --- torch ------------------------------------------------------------------

def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise Unavailable(f"torch is not installed ({e})") from None
    return torch


def _to_torch(torch, a):
    """Zero-copy tensor of a numpy array; bfloat16 through its bits."""
    if a.dtype == V.BFLOAT16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _torch_distill_fn(torch, kind):
    """The eager torch distillation loss (student, teacher) -> batchmean loss;
    bfloat16 inputs are computed in float32 (as autocast does for log_softmax)."""
    F = torch.nn.functional
    T, beta = DISTILL_TEMPERATURE, DISTILL_BETA

    def log_probs(s, t):
        return F.log_softmax(s.float() / T, dim=-1), F.log_softmax(t.float() / T, dim=-1)

    if kind == "kl":
        def fn(s, t):
            ls, lt = log_probs(s, t)
            return F.kl_div(ls, lt, reduction="batchmean", log_target=True)
        return fn

    def jsd(s, t):  # TRL's generalized_jsd_loss, batchmean
        ls, lt = log_probs(s, t)
        lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), dim=0)
        div = beta * F.kl_div(lm, lt, reduction="none", log_target=True) + \
            (1 - beta) * F.kl_div(lm, ls, reduction="none", log_target=True)
        return div.sum() / div.shape[0]
    return jsd


def _torch(case, inputs, compiled):
    torch = _import_torch()
    F = torch.nn.functional
    if case.op == "soft-ce":
        a, b = _to_torch(torch, inputs["logits"]), _to_torch(torch, inputs["probs"])

        def fn(x, q):
            return F.cross_entropy(x, q)
    elif case.distill_kind is not None:
        a, b = _to_torch(torch, inputs["student"]), _to_torch(torch, inputs["teacher"])
        fn = _torch_distill_fn(torch, case.distill_kind)
    elif case.op == "ce":
        a, b = _to_torch(torch, inputs["logits"]), _to_torch(torch, inputs["targets"])

        def fn(x, t):
            return F.cross_entropy(x, t)
    else:
        a, b = _to_torch(torch, inputs["pred"]), _to_torch(torch, inputs["target"])

        def fn(x, y):
            return F.mse_loss(x, y)
    notes = []
    if case.distill_kind is not None and case.dtype != "float32":
        notes.append("log_softmax in float32 (.float() in the timed call)")
    if compiled:
        # One compiled function at a time: reset dynamo so the recompilations of a
        # sweep never reach its cache limit (past it, dynamo silently runs eager).
        torch._dynamo.reset()
        fn = torch.compile(fn, dynamic=False)
        notes.append("first call (compilation) untimed")
    note = "; ".join(notes)

    if case.mode == "forward":
        def run():
            with torch.no_grad():
                return fn(a, b)
    else:
        def run():
            x = a.detach().requires_grad_()
            loss = fn(x, b)
            loss.backward()
            return loss.detach(), x.grad

    if compiled:
        try:
            run()  # compiles; a failure (no C++ compiler, unsupported op) skips the provider
        except Exception as e:  # noqa: BLE001 - any compile failure means "not available here"
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise Unavailable(f"torch.compile failed: {type(e).__name__}: {first}") from None
    return Bench(run, note=note)


# --- linear cross-entropy --------------------------------------------------

def _linear_ce(case, inputs, provider):
    """``fn()`` returns the loss (forward) or ``(loss, grad_hidden, grad_W)``
    (fwd+bwd) in the provider's types."""
    h, w, t = inputs["hidden"], inputs["weight"], inputs["targets"]
    forward = case.mode == "forward"
    if provider == "fastloss":
        if forward:
            return Bench(lambda: linear_cross_entropy(h, w, t))
        return Bench(lambda: linear_cross_entropy_with_grad(h, w, t)[:3])
    if provider == "blas-floor":
        if case.dtype != "float32":
            raise Unavailable("float32 only")
        n, d, v = case.shape
        logits = np.empty((n, v), np.float32)
        if forward:
            def product():
                np.matmul(h, w.T, out=logits)
                return float("nan")

            return Bench(product, note="the logits product only (loss not computed)")
        gh = np.empty_like(h)
        gw = np.empty_like(w)

        def floor():
            np.matmul(h, w.T, out=logits)
            np.matmul(logits, w, out=gh)
            np.matmul(logits.T, h, out=gw)
            return float("nan"), gh, gw

        return Bench(floor, note="three matmuls only (loss not computed); holds (N, V) logits")
    torch = _import_torch()
    F = torch.nn.functional
    th, tw, tt = _to_torch(torch, h), _to_torch(torch, w), _to_torch(torch, t)
    fused = provider == "torch-lce"
    if fused and not hasattr(F, "linear_cross_entropy"):
        raise Unavailable("torch has no F.linear_cross_entropy")

    def loss_of(x, W):
        if fused:
            return F.linear_cross_entropy(x, W, tt)
        return F.cross_entropy(F.linear(x, W), tt)

    if forward:
        def run_forward():
            with torch.no_grad():
                return loss_of(th, tw)

        return Bench(run_forward)

    def run():
        # detach() of a from_numpy tensor shares the numpy memory: no copy.
        x = th.detach().requires_grad_()
        W = tw.detach().requires_grad_()
        loss = loss_of(x, W)
        loss.backward()
        return loss.detach(), x.grad, W.grad

    return Bench(run)


# --- numpy ------------------------------------------------------------------

def _numpy_softmax_parts(x):
    """(e, s, lse): e = exp(x - rowmax) (a new array), s = its row sums, lse = log-sum-exp."""
    m = x.max(axis=1, keepdims=True)
    e = np.subtract(x, m)
    np.exp(e, out=e)
    s = e.sum(axis=1, keepdims=True)
    return e, s, (m + np.log(s))[:, 0]


def _numpy_mean_ce(x, lse, rows, cols):
    if not rows.size:
        return 0.0
    return float((lse[rows].sum(dtype=np.float64) - x[rows, cols].sum(dtype=np.float64)) / rows.size)


def numpy_ce(x, t, ignore_index=-100):
    """Mean cross-entropy of float32 logits, plain numpy."""
    keep = t != ignore_index
    _, _, lse = _numpy_softmax_parts(x)
    return _numpy_mean_ce(x, lse, np.arange(x.shape[0])[keep], t[keep])


def numpy_ce_with_grad(x, t, ignore_index=-100):
    """Mean cross-entropy and its gradient (softmax - onehot) / count, plain numpy."""
    keep = t != ignore_index
    rows, cols = np.arange(x.shape[0])[keep], t[keep]
    e, s, lse = _numpy_softmax_parts(x)
    loss = _numpy_mean_ce(x, lse, rows, cols)
    e /= s
    e[rows, cols] -= 1.0
    e[~keep] = 0.0
    e *= np.float32(1.0 / rows.size if rows.size else 0.0)
    return loss, e


def numpy_mse(p, y):
    """Mean squared error, plain numpy."""
    d = p - y
    return float(np.dot(d, d)) / d.size


def numpy_mse_with_grad(p, y):
    """Mean squared error and its gradient 2 (p - y) / n, plain numpy."""
    d = p - y
    loss = float(np.dot(d, d)) / d.size
    d *= np.float32(2.0 / d.size)
    return loss, d


def _numpy(case, inputs):
    if case.dtype != "float32":
        raise Unavailable("float32 only (numpy has no bfloat16 arithmetic)")
    if case.op == "ce":
        x, t = inputs["logits"], inputs["targets"]
        if case.mode == "forward":
            return Bench(lambda: numpy_ce(x, t))
        return Bench(lambda: numpy_ce_with_grad(x, t))
    p, y = inputs["pred"], inputs["target"]
    if case.mode == "forward":
        return Bench(lambda: numpy_mse(p, y))
    return Bench(lambda: numpy_mse_with_grad(p, y))


# --- JAX / optax (optional) -------------------------------------------------

def _jax(case, inputs):
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as e:
        raise Unavailable(f"JAX is not installed ({e})") from None
    if case.op == "ce":
        try:
            import optax
            ce_rows = optax.softmax_cross_entropy_with_integer_labels
        except ImportError:
            def ce_rows(x, t):
                return jax.nn.logsumexp(x, axis=-1) - jnp.take_along_axis(x, t[:, None], axis=-1)[:, 0]

        def loss_fn(x, t):
            return ce_rows(x.astype(jnp.float32), t).mean()

        a, b = jnp.asarray(inputs["logits"]), jnp.asarray(inputs["targets"])
    else:
        def loss_fn(x, y):
            d = x.astype(jnp.float32) - y.astype(jnp.float32)
            return jnp.mean(d * d)

        a, b = jnp.asarray(inputs["pred"]), jnp.asarray(inputs["target"])
    f = jax.jit(loss_fn if case.mode == "forward" else jax.value_and_grad(loss_fn))

    def run():
        return jax.block_until_ready(f(a, b))

    return Bench(run, note="threads: XLA's own pool (not set by fastloss)")


# --- results in common types ------------------------------------------------

def loss_value(ret, mode):
    """The loss a provider's ``fn()`` returned, as a Python float."""
    loss = ret if mode == "forward" else ret[0]
    if hasattr(loss, "detach"):
        loss = loss.detach().float().item()
    return float(np.asarray(loss, dtype=np.float64))


def grad_array(ret):
    """The gradient of a fwd+bwd ``fn()`` result as a float32 numpy array."""
    g = ret[1]
    if hasattr(g, "detach"):
        return g.detach().float().numpy()
    return np.asarray(g).astype(np.float32)
