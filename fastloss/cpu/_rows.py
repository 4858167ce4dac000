"""Row plumbing shared by the CPU row kernels (cross-entropy, soft targets,
distillation, evaluation metrics): the block size of the one-sweep row
statistics, the lazy-block limit, how rows are split over parallel tasks, the
per-task scratch rows, the inlining policy of the row functions, and the
logit transform of a row (cross-entropy with class-index and soft targets).
"""

import numpy as np
from numba import njit

from .. import config
from ..codes import SCALED
from ._math import load, row_max, tanh

_FM = config.FASTMATH

#: Elements per block of the one-sweep row statistics (8 KB of float32: the
#: block is re-read from L1). A compile-time constant of the cached kernels.
ROW_BLOCK = 2048

#: A block whose exps against the running reference max sum to more than this
#: is redone against its own max (the lazy blocks of the row kernels). 2**30
#: keeps every stored exp and the row sum far from float32 overflow, and the
#: gradient coefficients ``1/s`` far from underflow.
LAZY_SUM_LIMIT = float(2**30)


def n_row_blocks(nclass):
    """Blocks per row: the length of each task's ``shifts`` scratch row."""
    return (nclass + ROW_BLOCK - 1) // ROW_BLOCK


@njit(fastmath=_FM)
def task_rows(ntask, n, task):
    """Rows [lo, hi) of task ``task`` when n rows are split evenly over ntask tasks."""
    return task * n // ntask, (task + 1) * n // ntask


def task_scratch(ntask, n, dtype):
    """An (ntask, >= n) scratch array of ``dtype``: one row per parallel task,
    each padded to whole 128-byte blocks plus a 128-byte gap, so no two tasks
    ever write the same cache line (or adjacent-line pair). Kernels use the
    first ``n`` elements of a row. Unpadded, short rows (V = 50: 200 bytes,
    and one ``shifts`` value per task) put both tasks' writes on shared lines
    at every row: 8192 x 50 fused took 533 us on 2 threads against 482 on 1."""
    if n == 0:
        return np.empty((ntask, 0), dtype)
    per_line = 128 // np.dtype(dtype).itemsize
    return np.empty((ntask, -(-n // per_line) * per_line + per_line), dtype)


def inline_into(*range_functions):
    """numba's inlining decision (``njit(inline=...)``) for the row functions of
    a kernel module: inline them, at the numba IR level, into the row-range
    functions named here only (each kernel calls one of those once per task).

    A short row's cost was mostly the calls, each passing several arrays as
    exploded structs (cross-entropy, 256 x 8 forward: 17.6 -> 6.9 us); the
    range functions are compiled without NRT, so the inlined slices take no
    reference counts. The parallel kernels call the range functions instead
    of inlining them: inlined into the parallel kernels they compiled 2-3x
    slower."""
    names = frozenset(range_functions)

    def policy(expr, caller, callee):
        return caller.func_id.func_qualname in names  # caller: the caller's FunctionIR

    return policy


@njit(fastmath=_FM, _nrt=False, inline=inline_into("_forward_rows", "_fused_rows"))
def row_transform(xr, zr, tr, mode, scale, cap):
    """zr[j] = transform(x[j]) (``SCALED``: scale x_j; ``SOFTCAP``: cap tanh(scale
    x_j / cap), with tr[j] = that tanh); returns max_j z_j. Inlined into the
    row-range functions of ``cross_entropy`` and ``soft_cross_entropy``."""
    n = xr.shape[0]
    if mode == SCALED:
        for j in range(n):
            zr[j] = scale * load(xr[j])
    else:
        inv = scale / cap
        for j in range(n):
            v = load(xr[j])
            t = tanh(inv * v)
            tr[j] = t
            # -inf is a mask and stays -inf (cap * tanh would give -cap).
            zr[j] = v if v == -np.inf else cap * t
    return row_max(zr)
