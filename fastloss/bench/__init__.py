"""Benchmark layer: the cases, the machine's measured ceilings and the timing
runner shared by ``benchmarks/`` (pytest-benchmark) and ``fastloss bench``.

* :mod:`fastloss.bench.cases`: the benchmark cases (operation, shape, dtype,
  mode), their inputs, the bytes and exp evaluations each one must at least
  cost, and one callable per provider (fastloss variants, torch eager,
  ``torch.compile``, plain numpy, JAX/optax when installed).
* :mod:`fastloss.bench.machine`: thread setup, measured copy and read
  bandwidth, the measured rates of the library's own vectorised exp and of
  numpy's ``np.exp``, machine/version information (only what stays the same
  between runs), the date and load of a run, and its noise warnings.
* :mod:`fastloss.bench.runner`: timing with warm-up and medians, the derived
  columns (GB/s, fraction of bandwidth, floor, ratios, speedup vs torch), the
  table and JSON; :mod:`fastloss.bench.legend`: what the columns mean.
* :mod:`fastloss.bench.runs`: saved runs, listed and compared side by side.

Nothing here imports torch or JAX at import time; providers import them when
they are built, and are reported as skipped where they are not installed.
"""
