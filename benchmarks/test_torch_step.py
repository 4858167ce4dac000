"""The PyTorch training step of ``fastloss bench --op torch-step`` under pytest-benchmark.

A step: ``hidden`` (N, D) requires grad, head ``W`` (V, D), ``logits = hidden @ W.T``,
the mean cross-entropy, ``loss.backward()``. Providers (``fastloss.bench.torch_step``):
torch eager, torch.compile, fastloss.torch.cross_entropy (and ``inplace_backward=True``),
F.linear_cross_entropy, fastloss.torch.linear_cross_entropy, and the head-only baseline
(the products with a fixed upstream gradient, no loss), whose median gives each
provider's loss share ``(step - head_only) / step`` in the summary table printed after
the module's last benchmark.

Shapes: by default a reduced one, N x V = 1024 x 8000 with D = 256, float32 and
bfloat16 (seconds per provider); ``--bench-quick``: 256 x 4000, D = 64, without
torch.compile unless ``--bench-providers`` names it; ``FASTLOSS_BENCH_TORCH_STEP_FULL=1``
adds the issue's shapes, 4096 x 32000 and 2048 x 128256 (minutes), with D =
``$FASTLOSS_BENCH_TORCH_STEP_D`` (default 256)::

    python -m pytest benchmarks/test_torch_step.py --benchmark-only
    FASTLOSS_BENCH_TORCH_STEP_FULL=1 python -m pytest benchmarks/test_torch_step.py --benchmark-only

Threads: those of ``benchmarks/conftest.py`` (2 for numba and torch alike, as in
``fastloss bench``). Unlike ``fastloss bench --op torch-step`` (which interleaves the providers round by
round and measures peak memory in child processes), each provider is timed in its own
benchmark here, one after the other.
"""

import contextlib
import gc
import os
import time

import pytest

from fastloss.bench import cases as C
from fastloss.bench import machine as M
from fastloss.bench import torch_step as T

pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

DEFAULT_CASE = (1024, 8000, 256)
QUICK_CASE = (256, 4000, 64)
FULL_ENV = "FASTLOSS_BENCH_TORCH_STEP_FULL"
HIDDEN_ENV = "FASTLOSS_BENCH_TORCH_STEP_D"

_ROWS = []
_STATE = {"conditions": None}


def step_cases(quick):
    n, v, d = QUICK_CASE if quick else DEFAULT_CASE
    cases = [T.StepCase(n, v, d, dt) for dt in T.DTYPES]
    if os.environ.get(FULL_ENV, "") not in ("", "0"):
        d = int(os.environ.get(HIDDEN_ENV, T.DEFAULT_HIDDEN))
        cases += [T.StepCase(n, v, d, dt) for n, v in T.SHAPES for dt in T.DTYPES]
    return cases


def pytest_generate_tests(metafunc):
    if "step_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    names = config.getoption("--bench-providers")
    names = [n for n in names.split(",") if n] if names else None
    quick = config.getoption("--bench-quick")
    if names is not None:  # the suite's other provider names (numpy, jax, ...) select nothing here
        names = [n for n in names if n in T.PROVIDERS or n == "fastloss"]
    providers = T.providers_for(names) if names is None or names else []
    if quick and names is None:  # compiling is not a smoke test's business
        providers = [p for p in providers if p != "torch-compile"]
    params = [pytest.param(case, p, id=f"{case.name}-{p}") for case in step_cases(quick) for p in providers]
    metafunc.parametrize(("step_case", "provider"), params)


_INPUTS = {}


def _inputs(case):
    if case not in _INPUTS:
        _INPUTS.clear()
        gc.collect()
        _INPUTS[case] = T.make_inputs(case)
    return _INPUTS[case]


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """Prints the torch-step table (loss shares, ratios to torch) after the module's benchmarks."""
    _STATE["conditions"] = M.run_conditions()
    yield
    _INPUTS.clear()
    if not _ROWS:
        return
    conditions = dict(_STATE["conditions"])
    conditions["load_end"] = M.load_sample(since=conditions["load_start"]["mark"])
    info = M.machine_info()
    result = {"machine": info, "conditions": conditions, "results": T.add_shares(list(_ROWS), paired=False),
              "warnings": M.noise_warnings(None, conditions, info["cores"], info["numba_threads"]),
              "settings": {"interleaved": False}, "overhead": None}
    text = T.format_table(result).replace("fastloss bench --op torch-step", "benchmarks/test_torch_step.py", 1)
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            reporter.write_line("")
            reporter.write_sep("-", "fastloss torch-step table (columns: fastloss bench --help)")
            reporter.write(text)
    _ROWS.clear()


def test_torch_step(benchmark, step_case, provider, request):
    case = step_case
    try:
        bench = T.build(case, _inputs(case), provider)
    except C.Unavailable as e:
        pytest.skip(f"{provider}: {e}")
    benchmark.group = case.name
    seen = {}

    def step():
        ret = bench.fn()
        if "loss" not in seen:
            seen["loss"] = T.loss_value(ret)

    benchmark.extra_info.update(case=case.name, provider=provider, family=C.family(provider),
                                shape=[case.n, case.v, case.d], dtype=case.dtype, threads=M.numba_threads(),
                                note=bench.note)
    rounds = request.config.getoption("--bench-rounds")
    time.sleep(T.SETTLE_S)  # the previous provider's thread pools stop spinning first
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["loss"] = seen.get("loss")
    if benchmark.disabled or benchmark.stats is None:
        return
    times = list(benchmark.stats.stats.data)
    row = T.new_row(case, provider)
    row.update(status="ok", note=bench.note, rounds=len(times), times_ms=[t * 1e3 for t in times],
               median_ms=benchmark.stats.stats.median * 1e3, min_ms=min(times) * 1e3, loss=seen.get("loss"))
    _ROWS.append(row)
