"""fastloss: fused, compiled loss kernels for numpy (numba on the CPU).

Public API (see ``docs/api.md``): :func:`cross_entropy`,
:func:`cross_entropy_with_grad`, :func:`logsumexp`, :func:`mse`,
:func:`mse_with_grad`; thread control: :func:`set_num_threads`.
"""

from ._threads import get_num_threads, max_threads, set_num_threads
from ._version import __version__
from .cuda import cuda_available
from .evaluation import EvalReport, evaluate
from .ops.cross_entropy import cross_entropy, cross_entropy_with_grad, logsumexp
from .ops.linear_cross_entropy import LinearCrossEntropyResult, linear_cross_entropy, linear_cross_entropy_with_grad
from .ops.mse import mse, mse_with_grad

__all__ = [
    "__version__",
    "cross_entropy",
    "cross_entropy_with_grad",
    "logsumexp",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "LinearCrossEntropyResult",
    "mse",
    "mse_with_grad",
    "set_num_threads",
    "get_num_threads",
    "max_threads",
    "cuda_available",
    "evaluate",
    "EvalReport",
]
