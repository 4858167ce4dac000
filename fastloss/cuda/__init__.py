"""CUDA backend: numba-cuda twins of the CPU kernels (one module per op, same
names as ``fastloss.cpu``), each beside its host side, which ``fastloss.ops``
calls for GPU arrays with the options it validated:

* ``cross_entropy`` / ``cross_entropy_host``: cross-entropy and logsumexp;
* ``soft_cross_entropy`` / ``soft_cross_entropy_host``: cross-entropy with
  probability targets;
* ``distill`` / ``distill_host``: distillation losses;
* ``mse`` / ``mse_host``: mean squared error;
* ``rows``, ``reductions``, ``_math``, ``convert``: device functions and
  helper kernels the op kernels share (reading a row, block reductions,
  scalar math, staging copies); ``host``: what the row-wise ops' host sides
  share (staging the rows, the gradient's destination);
* ``arrays`` (GPU arrays as the kernels see them), ``launch`` (grids, block
  sizes, scratch, the resident kernel's shared memory) and ``checks`` (the
  one queue of asynchronous input checks of every op, :func:`synchronize`).

Importing this package needs neither numba-cuda nor a GPU: ``numba.cuda`` is
imported only inside functions. Running a kernel without a usable GPU raises
one ``RuntimeError`` (:func:`require_gpu`). Under the numba CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1`` set before ``numba.cuda`` is imported) everything
runs, slowly, on the CPU; the test suite uses it.
"""

import sys

__all__ = ["cuda_available", "is_device_array", "require_gpu", "simulator_enabled", "synchronize"]


def _numba_cuda():
    """The ``numba.cuda`` module, or None when numba-cuda cannot be imported."""
    try:
        from numba import cuda
    except Exception:  # ImportError, or a broken CUDA install raising on import
        return None
    return cuda


def simulator_enabled():
    """True when numba-cuda runs kernels in its CPU simulator."""
    if _numba_cuda() is None:
        return False
    from . import _math
    return _math.SIMULATOR


def cuda_available():
    """Whether GPU arrays can be processed here: numba-cuda imports and a real,
    usable GPU is present (or the CUDA simulator is enabled).

    Examples
    --------
    >>> import fastloss.cuda
    >>> isinstance(fastloss.cuda.cuda_available(), bool)
    True
    """
    global _AVAILABLE
    if _AVAILABLE:  # a usable GPU stays usable: every GPU call asks
        return True
    cuda = _numba_cuda()
    if cuda is None:
        return False
    if simulator_enabled():
        return True
    try:
        _AVAILABLE = bool(cuda.is_available()) and len(cuda.gpus) > 0
    except Exception:  # driver present but unusable
        return False
    return _AVAILABLE


_AVAILABLE = False


def synchronize():
    """Wait for the checks of every earlier fastloss call on GPU arrays and
    raise the contract's ``ValueError`` for the first that saw a bad input (a
    target, class weight, probability-target row or top-k teacher).

    Those calls never wait for the GPU (a training step stays ahead of it);
    an error is raised by the first fastloss call after the GPU has flagged
    it, or here. A flagged call's loss is NaN and its kernels wrote nothing
    else. Does nothing when no call is pending (or numba-cuda is missing).

    Examples
    --------
    >>> import fastloss.cuda
    >>> fastloss.cuda.synchronize()
    """
    if "fastloss.cuda.checks" in sys.modules:  # one queue serves every op
        from . import checks
        checks.synchronize()


def require_gpu():
    """Raise the one clear ``RuntimeError`` used when GPU arrays meet a machine
    that cannot run the CUDA kernels."""
    if cuda_available():
        return
    if _numba_cuda() is None:
        why = "numba-cuda is not installed (pip install 'fastloss[cuda]')"
    else:
        why = "numba-cuda found no usable CUDA GPU (check the driver and CUDA_VISIBLE_DEVICES)"
    raise RuntimeError(f"fastloss: GPU arrays were passed, but the CUDA backend cannot run: {why}")


def _torch_tensor_type():
    torch = sys.modules.get("torch")  # never import torch just to ask
    return getattr(torch, "Tensor", None) if torch is not None else None


def is_torch_tensor(obj):
    tensor = _torch_tensor_type()
    return tensor is not None and isinstance(obj, tensor)


def is_device_array(obj):
    """Whether ``obj`` lives on a GPU: a numba device array (simulator arrays
    included), any object exposing ``__cuda_array_interface__`` (CuPy, ...), or
    a PyTorch CUDA tensor of any dtype (bfloat16 CUDA tensors do not expose
    the interface).

    Examples
    --------
    >>> import numpy as np, fastloss.cuda
    >>> fastloss.cuda.is_device_array(np.zeros(3))
    False
    """
    if is_torch_tensor(obj):
        return obj.device.type == "cuda"
    if getattr(obj, "__cuda_ndarray__", False):
        return True
    try:
        return hasattr(obj, "__cuda_array_interface__")
    except Exception:  # a property that raises something else than AttributeError
        return False
