"""fastloss: fused, compiled loss kernels for numpy (numba on the CPU, numba-cuda on GPUs).

Exports (reference: ``docs/api.md``):

* cross-entropy (class-index or probability targets): :func:`cross_entropy`,
  :func:`cross_entropy_with_grad` (returns a :class:`CrossEntropyResult`),
  :func:`logsumexp`;
* an LM head without the logits: :func:`linear_cross_entropy`,
  :func:`linear_cross_entropy_with_grad` (returns a
  :class:`LinearCrossEntropyResult`);
* mean squared error: :func:`mse`, :func:`mse_with_grad` (returns an
  :class:`MSEResult`);
* distillation: :func:`distill`, :func:`distill_with_grad` (returns a
  :class:`DistillResult`; a sparse teacher as :class:`TopKTeacher`),
  :func:`linear_distill_with_grad` (returns a :class:`LinearDistillResult`);
* offline evaluation of dumps: :func:`evaluate` (returns an
  :class:`EvalReport`; the file format of raw dumps in a :class:`Layout`),
  :func:`compare` of two models' dumps (returns a :class:`CompareReport`);
* threads and GPUs: :func:`set_num_threads`, :func:`get_num_threads`,
  :func:`max_threads`, :func:`cuda_available`;
* ``__version__``.

Layers, top-down: ``fastloss.ops`` (the public functions) → ``fastloss.options``
and ``fastloss._validate`` (checks, once) → ``fastloss.cpu`` / ``fastloss.cuda``
(each op's host module and kernels); ``fastloss.evaluation`` streams dumps
through the CPU kernels; ``fastloss.torch`` is the PyTorch adapter (imports
PyTorch; ``docs/torch.md``); ``fastloss.cli`` is the ``fastloss`` command.
"""

from ._threads import get_num_threads, max_threads, set_num_threads
from ._version import __version__
from .cuda import cuda_available
from .ops.cross_entropy import cross_entropy, cross_entropy_with_grad, logsumexp
from .ops.linear_cross_entropy import LinearCrossEntropyResult, linear_cross_entropy, linear_cross_entropy_with_grad
from .ops.mse import mse, mse_with_grad
from .results import CrossEntropyResult, MSEResult

# ``import fastloss`` loads numpy and these small modules only (about 0.1 s);
# numba, the kernels, ml_dtypes, scipy and tqdm load on first use, and the
# evaluation layer on first access to one of its names (PEP 562).
_LAZY = {"evaluate": "evaluation", "EvalReport": "evaluation", "Layout": "evaluation",
         "compare": "evaluation", "CompareReport": "evaluation",
         "distill": "ops.distill", "distill_with_grad": "ops.distill", "DistillResult": "ops.distill",
         "TopKTeacher": "ops.distill",
         "linear_distill_with_grad": "ops.linear_distill", "LinearDistillResult": "ops.linear_distill",
         "vocab_row_stats": "ops.vocab_parallel", "merge_vocab_row_stats": "ops.vocab_parallel",
         "vocab_parallel_cross_entropy": "ops.vocab_parallel", "VocabRowStats": "ops.vocab_parallel"}


_SUBPACKAGES = ("evaluation", "bench", "cli", "cpu", "demo", "options", "config", "torch")


def __getattr__(name):
    import importlib

    if name in _SUBPACKAGES:  # ``fastloss.evaluation.x`` without importing it first
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastloss' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

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
    "distill",
    "distill_with_grad",
    "DistillResult",
    "TopKTeacher",
    "linear_distill_with_grad",
    "LinearDistillResult",
    "evaluate",
    "EvalReport",
    "compare",
    "CompareReport",
    "Layout",
    "vocab_row_stats",
    "merge_vocab_row_stats",
    "vocab_parallel_cross_entropy",
    "VocabRowStats",
]
