"""Benchmark layer: the cases, the machine's measured ceilings and the timing
runner shared by ``benchmarks/`` (pytest-benchmark) and ``fastloss bench``.

* :mod:`fastloss.bench.cases`: the benchmark cases (operation, shape, dtype,
  mode), their inputs, the bytes and exp evaluations each one must at least
  cost, and one callable per provider (fastloss variants, torch eager,
  ``torch.compile``, plain numpy, JAX/optax when installed).
* :mod:`fastloss.bench.machine`: thread setup, measured copy and read
  bandwidth, the measured rate of the library's own vectorised exp, and
  machine/version information.
* :mod:`fastloss.bench.runner`: timing with warm-up and medians, the derived
  columns (GB/s, fraction of bandwidth, floor, ratios), the table and JSON.

Nothing here imports torch or JAX at import time; providers import them when
they are built, and are reported as skipped where they are not installed.
"""
