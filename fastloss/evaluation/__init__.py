"""Offline evaluation of logits dumps: streaming readers, per-token metrics, the report.

Layers: ``readers`` (arrays and ``.npy`` / ``.safetensors`` / raw shards, mapped one
chunk at a time; ``Layout``, how to read files that do not describe themselves),
``metrics`` (float64 totals of the per-token results of the CPU kernel
``fastloss.cpu.eval_metrics``), ``report`` (``EvalReport``) and ``stream``
(``evaluate``, the chunk loop). ``curves`` and ``plot`` diagnose and draw training
logs and reports.
"""

from .readers import EvalInputError, Layout
from .report import EvalReport
from .stream import evaluate

__all__ = ["evaluate", "EvalReport", "EvalInputError", "Layout"]
