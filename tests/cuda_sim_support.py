"""What the CUDA simulator test files share (``test_cuda_sim.py``,
``test_cuda_distill.py``): the ``sim`` mark, the GIL switch interval that
makes the simulator quick, small blocks, and device/host copies.

The simulator cases run in their own pytest step (``NUMBA_ENABLE_CUDASIM``
must be set before ``numba.cuda`` is first imported):

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda_sim.py tests/test_cuda_distill.py -q

In any other run they skip.
"""

import os
import sys

import numpy as np
import pytest

import fastloss.config
from fastloss.cuda import simulator_enabled

IN_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and simulator_enabled()


def sim(test):
    """A simulator case: skipped unless this pytest runs under NUMBA_ENABLE_CUDASIM=1.
    numpy scalars warn on inf - inf etc. where the compiled kernels are silent."""
    test = pytest.mark.filterwarnings("ignore::RuntimeWarning")(test)
    return pytest.mark.skipif(not IN_SIM, reason="a simulator case: run with NUMBA_ENABLE_CUDASIM=1 "
                              "python -m pytest tests/test_cuda_sim.py tests/test_cuda_distill.py")(test)


def fast_thread_switching():
    """A module fixture's body: the simulator runs each CUDA thread as a Python
    thread and polls them at every barrier; a short GIL switch interval makes
    it about 5x faster."""
    old = sys.getswitchinterval()
    if IN_SIM:
        sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(old)


def use_small_blocks(monkeypatch):
    """8 threads per block and at most 2 blocks: rows span several threads and
    the grid-stride loops run several rounds."""
    monkeypatch.setattr(fastloss.config, "CUDA_THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(fastloss.config, "CUDA_GRID_LIMIT", 2)


def dev(a):
    """A simulator device array holding a C-contiguous copy of ``a``."""
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(a))


def host(d):
    """A device array's contents on the host."""
    return d.copy_to_host()
