"""pytest-benchmark setup for the suite in ``test_suite.py``.

Every provider gets the same threads (2 by default, ``FASTLOSS_BENCH_THREADS``
to change), set once before anything runs. The machine's ceilings (copy and
read bandwidth, exp rate) are measured once per session, in the same process,
and go into every benchmark's ``extra_info`` (with the date and load of the
run) and into the summary table printed at the end (same table as
``fastloss bench``). ``machine_info`` holds only what stays the same between
runs on one machine, so ``--benchmark-compare`` does not warn that it differs.

Options: ``--bench-quick`` (small shapes, a smoke test in seconds: no
torch.compile or JAX unless ``--bench-providers`` names them, a 128 MiB
bandwidth array), ``--bench-providers fastloss,torch`` (names or families),
``--bench-rounds N`` (default 5), ``--bench-calibration-mib`` (default 1024).
"""

import gc

import pytest

from fastloss.bench import cases as C
from fastloss.bench import machine as M
from fastloss.bench import runner as R

_STATE = {"rows": [], "calibration": None, "conditions": None}
#: The bandwidth array of --bench-quick (MiB), unless --bench-calibration-mib says otherwise.
QUICK_CALIBRATION_MIB = 128


def pytest_addoption(parser):
    group = parser.getgroup("fastloss benchmarks")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="small shapes of the same cases and the small set, without "
                         "torch.compile and JAX unless --bench-providers names them "
                         "(smoke test of the suite, seconds)")
    group.addoption("--bench-providers", default=None,
                    help="comma-separated providers or families (default: all)")
    group.addoption("--bench-rounds", type=int, default=5, help="timed rounds per benchmark (default 5)")
    group.addoption("--bench-calibration-mib", type=int, default=None,
                    help="size of the bandwidth-measurement array (default 1024 MiB, or "
                         f"$FASTLOSS_BENCH_CALIBRATION_MIB; {QUICK_CALIBRATION_MIB} with --bench-quick)")


def pytest_configure(config):
    config.addinivalue_line("markers", "core: the issue-2 core cases (run them alone with -m core)")
    config.addinivalue_line("markers", "lce: the fused linear cross-entropy cases (-m lce; minutes each)")
    config.addinivalue_line("markers", "small: the small set of fastloss bench --small (-m small; seconds)")
    # torch.compile's own imports warn about deprecated torch.jit APIs; not ours to fix.
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="session", autouse=True)
def threads():
    """The same threads for numba and torch, for the whole session."""
    return M.set_threads(R.DEFAULT_THREADS)


@pytest.fixture(scope="session")
def calibration(request, threads):
    """Copy/read bandwidth and exp rate, measured once in this session."""
    if _STATE["calibration"] is None:
        _STATE["conditions"] = M.run_conditions()
        _STATE["calibration"] = M.calibrate(calibration_mib(request.config) << 20)
    return _STATE["calibration"]


def calibration_mib(config):
    """The bandwidth array's size in MiB for this session's options."""
    mib = config.getoption("--bench-calibration-mib")
    if mib is not None:
        return mib
    if config.getoption("--bench-quick"):
        return QUICK_CALIBRATION_MIB
    return M.CALIBRATION_BYTES >> 20


@pytest.fixture(scope="session")
def run_conditions(calibration):
    """Date and load of this session, and the ceilings it measured, for ``extra_info``."""
    cond = {k: v for k, v in _STATE["conditions"].items() if k != "load_end"}
    return {"conditions": cond, "calibration": calibration}


@pytest.fixture(scope="session")
def case_inputs():
    """``case_inputs(case)``: the case's inputs, keeping only the latest set in
    memory (cases sharing inputs are adjacent in the suite)."""
    held = {}

    def get(case):
        key = (case.op, case.shape, case.dtype)
        if key not in held:
            held.clear()
            gc.collect()
            held[key] = C.make_inputs(case)
        return held[key]

    yield get
    held.clear()


@pytest.fixture
def bench_rows():
    """Rows for the summary table printed at the end of the session."""
    return _STATE["rows"]


def pytest_benchmark_update_machine_info(config, machine_info):
    """Only what stays the same between runs (pytest-benchmark compares it
    between saved runs); the ceilings, date and load go to ``extra_info``."""
    M.benchmark_machine_info(machine_info, R.DEFAULT_THREADS)


def pytest_terminal_summary(terminalreporter):
    rows = _STATE["rows"]
    if not rows or _STATE["calibration"] is None:
        return
    info = M.machine_info()
    conditions = dict(_STATE["conditions"])
    conditions["load_end"] = M.load_sample(since=conditions["load_start"]["mark"])
    warnings = M.noise_warnings(_STATE["calibration"], conditions, info["cores"],
                                info["numba_threads"])
    # the ceilings again: one that moved during the session makes its floors suspect
    end = M.calibrate(calibration_mib(terminalreporter.config) << 20, cached=False)
    warnings += M.calibration_moves(_STATE["calibration"], end)
    result = {"machine": info, "conditions": conditions, "calibration": _STATE["calibration"],
              "calibration_end": end, "warnings": warnings, "results": R.add_ratios(rows)}
    terminalreporter.write_sep("-", "fastloss bench table (columns: fastloss bench --help)")
    terminalreporter.write(R.format_table(result))


@pytest.fixture
def say(request):
    """``say(line)`` prints a line on the terminal past pytest's output capture."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def _say(line):
        if capture is None:
            print(line)
            return
        with capture.global_and_fixture_disabled():
            print(line, flush=True)
    return _say
