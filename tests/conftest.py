"""Shared pytest configuration for the fastloss tests.

* ``@pytest.mark.slow`` tests run only with ``--runslow``.
* ``rng``: a numpy Generator with a fixed seed, fresh for every test.
* ``backend``: each test that takes it runs once per backend (``cpu``,
  ``cuda-sim``, ``gpu``; see ``tests/backends.py``); a backend that cannot run
  in this process is skipped (the simulator runs in its own pytest step).
"""

import os
import sys

import numpy as np
import pytest

# Make ``import reference`` work from every test module regardless of rootdir
# or import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from backends import NAMES, Backend, unavailable  # noqa: E402  (needs the path above)


def pytest_addoption(parser):
    parser.addoption(
        "--runslow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test, run only with --runslow")
    config.addinivalue_line("markers", "gpu: needs a real CUDA GPU; skipped without one")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: pass --runslow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(params=NAMES)
def backend(request, monkeypatch):
    """The backend a contract test runs on (``tests/backends.py``)."""
    why = unavailable(request.param)
    if why:
        pytest.skip(why)
    b = Backend(request.param)
    b.configure(monkeypatch)
    return b


@pytest.fixture
def rng():
    """A fresh, fixed-seed numpy random Generator."""
    return np.random.default_rng(20240607)
