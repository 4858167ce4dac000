"""Offline evaluation of logits dumps: streaming readers, per-token metrics, the report.

Layers: ``readers`` (arrays and ``.npy`` / ``.safetensors`` / raw shards, mapped one
chunk at a time; ``Layout``, how to read files that do not describe themselves),
``metrics`` (float64 totals of the per-token results of the CPU kernel
``fastloss.cpu.eval_metrics``, and their merge), ``report`` (``EvalReport``) and
``stream`` (``evaluate``: tasks, the chunk loop, the merge of partials);
``distributed`` (where the tasks run: this process or a Dask cluster);
``comparison`` (``compare``, ``CompareReport``: the KL divergence and agreement of two
models' dumps, with the kernel ``fastloss.cpu.compare_metrics``). ``curves`` and
``plot`` diagnose and draw training logs and reports.
"""

from .comparison import CompareReport, compare
from .readers import EvalInputError, Layout
from .report import EvalReport
from .stream import evaluate

__all__ = ["evaluate", "EvalReport", "compare", "CompareReport", "EvalInputError", "Layout"]
