"""Offline evaluation of logits dumps: streaming readers, per-token metrics, the report.

Layers: ``readers`` (arrays and ``.npy`` shards, mapped one chunk at a time),
``metrics`` (numba per-token kernel and float64 totals), ``report`` (``EvalReport``)
and ``stream`` (``evaluate``, the chunk loop over the CPU cross-entropy kernel).
"""

from .readers import EvalInputError
from .report import EvalReport
from .stream import evaluate

__all__ = ["evaluate", "EvalReport", "EvalInputError"]
