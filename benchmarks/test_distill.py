"""Distillation losses (``fastloss.distill_with_grad``) under pytest-benchmark.

Cases: student float32 logits (N, V) at 4096 x 32000 and 2048 x 128256, teacher
float32 or bfloat16, temperature 2. Providers, each loss and gradient w.r.t. the
student (forward + backward):

* ``fastloss-kl`` / ``fastloss-jsd``: ``distill_with_grad(kind="kl" | "jsd",
  beta=0.5)`` into a reused ``out=`` buffer;
* ``torch-kl``: eager ``F.log_softmax`` of both at T, ``F.kl_div(...,
  log_target=True, reduction="batchmean")``, ``backward()`` (a bfloat16
  teacher is converted with ``.float()`` inside the timed call);
* ``torch-jsd``: eager TRL generalised JSD (mixture by ``logsumexp``), ``backward()``;
* ``fastloss-ce``: ``cross_entropy_with_grad`` at the same shape (``out=``),
  the yardstick per element.

The table printed at the end gives each median, fastloss's speed-up over the
torch eager twin (KL vs ``torch-kl``, JSD vs ``torch-jsd``) and its time per
element over fastloss's own cross-entropy. Threads: ``benchmarks/conftest.py``
(2 for numba and torch). Run::

    python -m pytest benchmarks/test_distill.py --benchmark-only
    python -m pytest benchmarks/test_distill.py --benchmark-only -k 4096x32000
    python -m pytest benchmarks/test_distill.py --benchmark-only --bench-quick   # 256 x 4000

On a shared, noisy machine the ratios to cross-entropy are best taken with the
three fastloss calls interleaved round by round (one process, same load)::

    python benchmarks/test_distill.py 4096 32000 --teacher float32 --rounds 15 [--threads 2] [--cpu-time]

prints each provider's median and minimum and its ratio to CE's. ``--cpu-time``
times with ``time.process_time`` (CPU time of the process: less disturbed by
other processes' load; with one thread it is the kernel's own time).
"""

import argparse
import contextlib
import gc
import os
import time

import ml_dtypes
import numba
import numpy as np
import pytest

import fastloss

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPES = [(4096, 32000), (2048, 128256)]
QUICK_SHAPES = [(256, 4000)]
TEACHER_DTYPES = ["float32", "bfloat16"]
PROVIDERS = ["fastloss-kl", "fastloss-jsd", "fastloss-ce", "torch-kl", "torch-jsd"]
TEMPERATURE = 2.0
BETA = 0.5

_ROWS = []
_HELD = {}


def pytest_generate_tests(metafunc):
    if "distill_case" not in metafunc.fixturenames:
        return
    shapes = QUICK_SHAPES if metafunc.config.getoption("--bench-quick") else SHAPES
    params = []
    for n, v in shapes:
        for td in TEACHER_DTYPES:
            for p in PROVIDERS:
                if p == "fastloss-ce" and td != "float32":
                    continue  # no teacher: one row per shape
                params.append(pytest.param((n, v, td), p, id=f"{n}x{v}-{td}-{p}"))
    metafunc.parametrize(("distill_case", "provider"), params)


def _inputs(n, v, td):
    """Student (float32), teacher (float32 or bfloat16), targets, out buffer; the
    latest set is kept (cases of one shape are adjacent)."""
    key = (n, v, td)
    if key not in _HELD:
        _HELD.clear()
        gc.collect()
        rng = np.random.default_rng(0)
        s = rng.standard_normal((n, v), dtype=np.float32) * np.float32(3)
        t = s + rng.standard_normal((n, v), dtype=np.float32)
        if td == "bfloat16":
            t = t.astype(ml_dtypes.bfloat16)
        tg = rng.integers(0, v, n)
        _HELD[key] = (s, t, tg, np.empty_like(s))
    return _HELD[key]


def _torch_teacher(t):
    if t.dtype == np.float32:
        return torch.from_numpy(t)
    return torch.from_numpy(t.view(np.int16)).view(torch.bfloat16)


def _build(provider, s, t, tg, out):
    """(fn, setup) for one provider."""
    if provider.startswith("fastloss"):
        if provider == "fastloss-ce":
            return (lambda: fastloss.cross_entropy_with_grad(s, tg, out=out)), None
        kind = provider.split("-")[1]
        return (lambda: fastloss.distill_with_grad(s, t, kind=kind, temperature=TEMPERATURE, beta=BETA,
                                                   out=out)), None
    xs = torch.from_numpy(s).requires_grad_(True)
    xt = _torch_teacher(t)

    def setup():
        xs.grad = None

    def kl():
        ls = F.log_softmax(xs / TEMPERATURE, dim=-1)
        lt = F.log_softmax(xt.float() / TEMPERATURE, dim=-1)
        F.kl_div(ls, lt, reduction="batchmean", log_target=True).backward()

    def jsd():
        ls = F.log_softmax(xs / TEMPERATURE, dim=-1)
        lt = F.log_softmax(xt.float() / TEMPERATURE, dim=-1)
        lm = torch.logsumexp(torch.stack([ls + np.log(1 - BETA), lt + np.log(BETA)]), dim=0)
        loss = BETA * F.kl_div(lm, lt, reduction="none", log_target=True) + (1 - BETA) * F.kl_div(
            lm, ls, reduction="none", log_target=True)
        (loss.sum() / xs.shape[0]).backward()

    return (kl if provider == "torch-kl" else jsd), setup


def test_distill(benchmark, distill_case, provider, request):
    n, v, td = distill_case
    s, t, tg, out = _inputs(n, v, td)
    fn, setup = _build(provider, s, t, tg, out)
    benchmark.group = f"distill {n}x{v} teacher {td}"
    benchmark.extra_info.update(shape=[n, v], teacher_dtype=td, provider=provider, temperature=TEMPERATURE)
    rounds = request.config.getoption("--bench-rounds")
    kw = {"setup": setup} if setup else {}
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1, **kw)
    if benchmark.disabled or benchmark.stats is None:
        return
    _ROWS.append(dict(shape=(n, v), teacher=td, provider=provider, median_ms=benchmark.stats.stats.median * 1e3))


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    """Print medians and ratios after the module's last benchmark."""
    yield
    _HELD.clear()
    if not _ROWS:
        return
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        _write_table(tr.write_line if tr else print)
    _ROWS.clear()


def _write_table(write):
    write("")
    write("distillation fwd+bwd: median ms; speed-up over torch eager; time per element / fastloss CE's")
    ce = {r["shape"]: r["median_ms"] for r in _ROWS if r["provider"] == "fastloss-ce"}
    med = {(r["shape"], r["teacher"], r["provider"]): r["median_ms"] for r in _ROWS}
    for r in _ROWS:
        key = (r["shape"], r["teacher"])
        line = f"{r['shape'][0]}x{r['shape'][1]} teacher {r['teacher']:8s} {r['provider']:13s} {r['median_ms']:9.1f} ms"
        if r["provider"] in ("fastloss-kl", "fastloss-jsd"):
            twin = med.get(key + ("torch-" + r["provider"].split("-")[1],))
            if twin:
                line += f"  {twin / r['median_ms']:5.1f}x torch eager"
            if r["shape"] in ce:
                line += f"  {r['median_ms'] / ce[r['shape']]:4.2f}x CE per element"
        write(line)


def interleaved(n, v, teacher="float32", rounds=15, cpu_time=False):
    """{provider: [seconds per round]} for fastloss CE, KL and JSD fwd+bwd at
    (n, v), the three calls interleaved round by round."""
    s, t, tg, out = _inputs(n, v, teacher)
    fns = {p: _build(p, s, t, tg, out)[0] for p in ("fastloss-ce", "fastloss-kl", "fastloss-jsd")}
    clock = time.process_time if cpu_time else time.perf_counter
    for fn in fns.values():
        fn()
        fn()  # compiled and warm
    times = {p: [] for p in fns}
    for _ in range(rounds):
        for p, fn in fns.items():
            t0 = clock()
            fn()
            times[p].append(clock() - t0)
    return times


def _main():
    ap = argparse.ArgumentParser(description="CE / KL / JSD fwd+bwd, interleaved")
    ap.add_argument("n", type=int)
    ap.add_argument("v", type=int)
    ap.add_argument("--teacher", default="float32", choices=TEACHER_DTYPES)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true")
    a = ap.parse_args()
    numba.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    times = interleaved(a.n, a.v, a.teacher, a.rounds, a.cpu_time)
    med = {p: np.median(x) * 1e3 for p, x in times.items()}
    low = {p: np.min(x) * 1e3 for p, x in times.items()}
    print(f"{a.n}x{a.v} teacher {a.teacher}, {a.threads} threads, {a.rounds} rounds, "
          f"{'CPU' if a.cpu_time else 'wall'} time, load {os.getloadavg()[0]:.1f}")
    for p in times:
        print(f"  {p:13s} median {med[p]:8.1f} ms  x{med[p] / med['fastloss-ce']:.2f} CE"
              f"   min {low[p]:8.1f} ms  x{low[p] / low['fastloss-ce']:.2f} CE")


if __name__ == "__main__":
    _main()
