"""The benchmark suite: every case of ``fastloss.bench.cases`` x every provider.

Cases (``fastloss.bench.cases.suite_cases``): cross-entropy (mean, class-index
targets) at (4096, 32000), (2048, 128256), (8192, 50257), (512, 262144), MSE
at 2^26 and 2^28 elements, cross-entropy with probability targets
(``soft-ce``) and distillation (``distill-kl``, ``distill-jsd``; temperature 2)
at (4096, 32000); float32 and bfloat16; forward and fwd+bwd.
Providers: fastloss (forward; fwd+bwd with ``out=``, ``inplace=True`` and
allocating), torch eager, ``torch.compile``, numpy/scipy (float32), JAX/optax
(when installed); probability targets and distillation have fastloss
(forward), fastloss-out, torch eager and ``torch.compile``. A provider that cannot run a case here is skipped with the
reason. The issue-2 core cases carry the ``core`` mark, the linear
cross-entropy cases ``lce``, and the small set of ``fastloss bench --small``
(``fastloss.bench.cases.small_cases``: cross-entropy, probability targets,
distillation and MSE at 8x100, 64x1000, 256x4096, linear cross-entropy
64x32x500; fastloss against torch eager) ``small``. ``--bench-quick`` runs
every op at small shapes (``quick_cases``: the probability-target and
distillation cases at 256x32000).

Run (see benchmarks/README.md)::

    python -m pytest benchmarks --benchmark-only                 # everything (long)
    python -m pytest benchmarks --benchmark-only -m core         # the core cases
    python -m pytest benchmarks --benchmark-only -m small        # the small set
    python -m pytest benchmarks --benchmark-only --bench-quick   # smoke test

pytest-benchmark groups by case and shows each row's ratio to the fastest of
its group; the summary table at the end adds GB/s, the fraction of the
measured bandwidth and the floor, exactly as ``fastloss bench`` prints them.
"""

import pytest

from fastloss.bench import cases as C
from fastloss.bench import runner as R


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    names = config.getoption("--bench-providers")
    names = [n for n in names.split(",") if n] if names else None
    quick = config.getoption("--bench-quick")
    if quick:
        cases = C.quick_cases()
    else:
        cases = C.suite_cases() + C.linear_ce_cases()
    small = C.small_cases()
    core = set(C.core_cases())

    def marks(case):
        if case in small:
            return [pytest.mark.small]
        if case in core:
            return [pytest.mark.core]
        return [pytest.mark.lce] if case.op == "lce" else []

    def providers(case):
        if case in small and names is None:
            return C.providers_for(case, C.SMALL_PROVIDERS)
        got = C.providers_for(case, names)
        if quick and names is None:  # compiling is not a smoke test's business
            got = [p for p in got if p not in ("torch-compile", "jax")]
        return got

    params = [pytest.param(case, provider, id=f"{case.name}-{provider}", marks=marks(case))
              for case in cases + small for provider in providers(case)]
    metafunc.parametrize(("case", "provider"), params)


def test_loss(benchmark, case, provider, case_inputs, calibration, run_conditions, bench_rows,
              request):
    try:
        bench = C.build(case, case_inputs(case), provider)
    except C.Unavailable as e:
        pytest.skip(f"{provider}: {e}")
    benchmark.group = case.name
    benchmark.extra_info.update(case=case.name, provider=provider, family=C.family(provider),
                                bytes_moved=case.bytes_moved, exp_evals=case.exp_evals,
                                **run_conditions)
    rounds = request.config.getoption("--bench-rounds")
    benchmark.pedantic(bench.fn, setup=bench.setup, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.disabled or benchmark.stats is None:
        return
    row = R.fill_row(R.new_row(case, provider), case, list(benchmark.stats.stats.data), calibration)
    row["note"] = bench.note
    for key in ("gbps", "bandwidth_gbps", "bw_fraction", "floor_ms", "floor_bound",
                "floor_fraction"):
        benchmark.extra_info[key] = row[key]
    bench_rows.append(row)
