"""pytest-benchmark setup for the suite in ``test_suite.py``.

Every provider gets the same threads (2 by default, ``FASTLOSS_BENCH_THREADS``
to change), set once before anything runs. The machine's ceilings (copy and
read bandwidth, exp rate) are measured once per session, in the same process,
and go into the saved JSON (``machine_info["fastloss"]``) and into the summary
table printed at the end (same table as ``fastloss bench``).

Options: ``--bench-quick`` (small shapes, a smoke test), ``--bench-providers
fastloss,torch`` (names or families), ``--bench-rounds N`` (default 5),
``--bench-calibration-mib`` (default 1024).
"""

import gc

import pytest

from fastloss.bench import cases as C
from fastloss.bench import machine as M
from fastloss.bench import runner as R

_STATE = {"rows": [], "calibration": None}


def pytest_addoption(parser):
    group = parser.getgroup("fastloss benchmarks")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="small shapes of the same cases (smoke test of the suite)")
    group.addoption("--bench-providers", default=None,
                    help="comma-separated providers or families (default: all)")
    group.addoption("--bench-rounds", type=int, default=5, help="timed rounds per benchmark (default 5)")
    group.addoption("--bench-calibration-mib", type=int, default=M.CALIBRATION_BYTES >> 20,
                    help="size of the bandwidth-measurement array (default 1024 MiB, or "
                         "$FASTLOSS_BENCH_CALIBRATION_MIB)")


def pytest_configure(config):
    config.addinivalue_line("markers", "core: the issue-2 core cases (run them alone with -m core)")
    config.addinivalue_line("markers", "lce: the fused linear cross-entropy cases (-m lce; minutes each)")
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
        _STATE["calibration"] = M.calibrate(request.config.getoption("--bench-calibration-mib") << 20)
    return _STATE["calibration"]


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
    info = {"machine": M.machine_info()}
    if _STATE["calibration"] is not None:
        info["calibration"] = _STATE["calibration"]
    machine_info["fastloss"] = info


def pytest_terminal_summary(terminalreporter):
    rows = _STATE["rows"]
    if not rows or _STATE["calibration"] is None:
        return
    result = {"machine": M.machine_info(), "calibration": _STATE["calibration"],
              "results": R.add_ratios(rows)}
    terminalreporter.write_sep("-", "fastloss bench table (columns: benchmarks/README.md)")
    terminalreporter.write(R.format_table(result))
