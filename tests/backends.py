"""The backends the contract tests run on, behind one small interface.

``cpu``: host numpy arrays (the main pytest step). ``cuda-sim``: numba device
arrays under the numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before
``numba.cuda`` is first imported: the simulator step of the README's test
command), with 8 threads per block and at most 2 blocks, so rows span several
threads and the grid-stride loops run several rounds. ``gpu``: a real CUDA
GPU (skipped without one).

A test takes the ``backend`` fixture (``tests/conftest.py``), moves its inputs
with ``backend.put`` and reads results back with ``backend.get`` /
``backend.scalar``; everything else (the call, the float64 reference, the
tolerances) is the same for every backend.
"""

import os

import ml_dtypes
import numpy as np

import fastloss
import fastloss.config

NAMES = ("cpu", "cuda-sim", "gpu")
BF16 = np.dtype(ml_dtypes.bfloat16)


def simulating():
    """Whether this pytest process runs numba-cuda's simulator."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def unavailable(name):
    """Why backend ``name`` cannot run in this process, or None."""
    if name == "cpu":
        return "the CPU backend runs in the main pytest step" if simulating() else None
    if name == "cuda-sim":
        if not simulating():
            return "runs in the simulator step (NUMBA_ENABLE_CUDASIM=1, see README)"
        return None if fastloss.cuda_available() else "numba-cuda is not installed"
    if simulating() or not fastloss.cuda_available():
        return "needs a real CUDA GPU"
    return None


class Backend:
    """Moves arrays to and from one backend."""

    def __init__(self, name):
        self.name = name
        self.device = name != "cpu"

    def __repr__(self):
        return f"Backend({self.name!r})"

    def put(self, a):
        """A host array as this backend's array (the CPU takes it as is)."""
        if not self.device:
            return a
        a = np.ascontiguousarray(a)
        if self.name == "gpu" and a.dtype == BF16:  # numba has no bfloat16 device arrays
            import torch
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).cuda()
        from numba import cuda
        return cuda.to_device(a)

    def get(self, r):
        """A result as a host numpy array (or a Python float from the CPU)."""
        if not self.device or isinstance(r, float):
            return r
        if hasattr(r, "copy_to_host"):
            return r.copy_to_host()
        import torch
        t = r.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(BF16)
        return t.numpy()

    def scalar(self, r):
        """A mean/sum loss as a Python float: a float on the CPU, a one-element
        GPU array on the GPU (checked)."""
        if not self.device:
            assert isinstance(r, float), type(r)
            return r
        h = np.asarray(self.get(r))
        assert h.size == 1, h.shape
        return float(h.reshape(-1)[0])

    def configure(self, monkeypatch):
        """The simulator's small launches (see the module docstring)."""
        if self.name == "cuda-sim":
            monkeypatch.setattr(fastloss.config, "CUDA_THREADS_PER_BLOCK", 8)
            monkeypatch.setattr(fastloss.config, "CUDA_GRID_LIMIT", 2)
