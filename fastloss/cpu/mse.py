"""CPU kernels for (weighted) mean squared error.

Inputs arrive flat (C-contiguous, kernel dtypes; see ``fastloss._validate``).
A weight broadcast to the data is described without materialising it:

    wmode 0  no weight             w_k = 1
    wmode 1  full                  w_k = w[k]
    wmode 2  varies along the last ``inner`` elements (shape (..., C) tiled)   w_k = w[k % inner]
    wmode 3  constant along the last ``inner`` elements                      w_k = w[k // inner]

Each parallel task owns the element range ``[n*task/ntask, n*(task+1)/ntask)``
and walks it in segments that never cross a row of length ``inner``, so every
inner loop is a plain vectorisable loop. Sums accumulate in float64 per task
and are merged by the caller (race-free).
"""

import numpy as np
from numba import njit, prange

from .. import config
from ._math import as_acc, load, store

_FM = config.FASTMATH


@njit(fastmath=_FM)
def _segment(p, t, w, wmode, inner, lo, hi, scale, grad, loss):
    """Sum over k in [lo, hi) of w_k (p_k - t_k)^2 (float64), where [lo, hi) lies
    within one row of ``inner`` elements. Writes grad_k = scale w_k 2 (p_k - t_k)
    if ``grad`` is non-empty and loss_k = w_k (p_k - t_k)^2 if ``loss`` is."""
    acc = 0.0
    two = as_acc(2.0, scale)  # typed from the scale, never from the data (NaN/inf safe)
    if wmode == 3:
        wc = w[lo // inner]
    else:
        wc = as_acc(1.0, scale)
    off = lo % inner if wmode == 2 else 0
    do_grad = grad.shape[0] > 0
    do_loss = loss.shape[0] > 0
    gs = scale * two
    for k in range(lo, hi):
        d = load(p[k]) - load(t[k])
        if wmode == 1:
            wk = w[k]
        elif wmode == 2:
            wk = w[k - lo + off]
        else:
            wk = wc
        e = wk * d * d
        acc += e
        if do_grad:
            store(grad, k, gs * wk * d)
        if do_loss:
            loss[k] = e
    return acc


@njit(parallel=True, cache=True, fastmath=_FM)
def mse_kernel(p, t, w, wmode, inner, scale, grad, loss, partial):
    """partial[task] = sum over the task's elements of w_k (p_k - t_k)^2; optionally
    the gradient ``scale * 2 w_k (p_k - t_k)`` into ``grad`` and the per-element
    loss into ``loss`` (either may have length 0 to skip it)."""
    n = p.shape[0]
    ntask = partial.shape[0]
    for task in prange(ntask):
        lo = task * n // ntask
        hi = (task + 1) * n // ntask
        acc = 0.0
        k = lo
        while k < hi:
            end = hi
            if wmode >= 2:
                end = min(hi, (k // inner + 1) * inner)
            acc += _segment(p, t, w, wmode, inner, k, end, scale, grad, loss)
            k = end
        partial[task] = acc
