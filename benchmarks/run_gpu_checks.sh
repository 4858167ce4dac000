#!/usr/bin/env bash
# One command for a GPU session (a machine with torch, numba-cuda and a GPU, no
# network): the GPU-marked tests, then benchmarks/gpu_check.py; results go to
# $OUT (default: ./gpu-results). Run from the repository root:
#     OUT=/some/dir bash benchmarks/run_gpu_checks.sh [--budget 180]
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0
# numba-cuda 0.30 registers np.row_stack, which numpy 2.5 removed: alias it first.
python3 - <<'PY' 2>&1 | tee "$OUT/pytest_gpu.txt"
import sys
import numpy as np
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack
import pytest
sys.exit(pytest.main(["tests/test_cuda_sim.py", "-m", "gpu", "-q", "-o", "addopts=",
                      "--import-mode=importlib", "-p", "no:cacheprovider", "-W", "ignore"]))
PY
python3 benchmarks/gpu_check.py --json "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu_log.txt"
