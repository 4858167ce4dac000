"""fastloss: fused, compiled loss kernels for numpy (numba on the CPU, numba-cuda on GPUs).

Exports (reference: ``docs/api.md``):

* losses with class-index targets: :func:`cross_entropy`,
  :func:`cross_entropy_with_grad` (returns a :class:`CrossEntropyResult`),
  :func:`logsumexp`;
* an LM head without the logits: :func:`linear_cross_entropy`,
  :func:`linear_cross_entropy_with_grad` (returns a
  :class:`LinearCrossEntropyResult`);
* mean squared error: :func:`mse`, :func:`mse_with_grad` (returns an
  :class:`MSEResult`);
* offline evaluation of dumps: :func:`evaluate` (returns an
  :class:`EvalReport`; the file format of raw dumps in a :class:`Layout`);
* threads and GPUs: :func:`set_num_threads`, :func:`get_num_threads`,
  :func:`max_threads`, :func:`cuda_available`;
* ``__version__``.

Layers, top-down: ``fastloss.ops`` (the public functions) → ``fastloss.options``
and ``fastloss._validate`` (checks, once) → ``fastloss.cpu`` / ``fastloss.cuda``
(each op's host module and kernels); ``fastloss.evaluation`` streams dumps
through the CPU kernels; ``fastloss.cli`` is the ``fastloss`` command.
"""

from ._threads import get_num_threads, max_threads, set_num_threads
from ._version import __version__
from .cuda import cuda_available
from .evaluation import EvalReport, Layout, evaluate
from .ops.cross_entropy import cross_entropy, cross_entropy_with_grad, logsumexp
from .ops.linear_cross_entropy import LinearCrossEntropyResult, linear_cross_entropy, linear_cross_entropy_with_grad
from .ops.mse import mse, mse_with_grad
from .results import CrossEntropyResult, MSEResult

__all__ = [
    "__version__",
    "cross_entropy",
    "cross_entropy_with_grad",
    "CrossEntropyResult",
    "logsumexp",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "LinearCrossEntropyResult",
    "mse",
    "mse_with_grad",
    "MSEResult",
    "set_num_threads",
    "get_num_threads",
    "max_threads",
    "cuda_available",
    "evaluate",
    "EvalReport",
    "Layout",
]
