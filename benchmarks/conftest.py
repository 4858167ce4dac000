"""Benchmark setup: the same number of threads for every provider (2 by default,
``FASTLOSS_BENCH_THREADS`` to change), set before anything runs."""

import os

import numba
import pytest

THREADS = int(os.environ.get("FASTLOSS_BENCH_THREADS", "2"))


@pytest.fixture(scope="session", autouse=True)
def _threads():
    numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
    try:
        import torch
        torch.set_num_threads(THREADS)
    except ImportError:
        pass
    yield
