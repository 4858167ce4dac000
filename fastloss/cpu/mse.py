"""CPU kernels for (weighted) mean squared error.

Inputs arrive flat (C-contiguous, kernel dtypes; see ``fastloss._validate``).
A weight broadcast to the data is described without materialising it, as a
``WeightLayout(wmode, w, inner)`` (the layouts ``fastloss.codes.W_NONE``,
``W_FULL``, ``W_INNER``, ``W_OUTER``: no weight, one per element, ``w[k %
inner]``, ``w[k // inner]``).

Each parallel task owns the element range ``[n*task/ntask, n*(task+1)/ntask)``
and walks it in segments that never cross a row of length ``inner``, so every
inner loop is a plain vectorisable loop. Sums accumulate in float64 per task
and are merged by the caller (race-free).
"""

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .. import _compile, config
from ..codes import W_INNER, W_NONE, W_OUTER
from ._math import as_acc, load, store

_compile.install()  # the one-line notice before a cold compile

_FM = config.FASTMATH

class WeightLayout(NamedTuple):
    """An MSE weight broadcast to the data (see ``fastloss.codes.W_*``):
    ``wmode``, the weight values ``w`` (accumulation type) and ``inner``."""

    wmode: int
    w: np.ndarray
    inner: int


#: Elements per inner segment (a compile-time constant of the cached kernel).
SEGMENT = 8192


@njit(fastmath=_FM, _nrt=False)
def _segment(p, t, w, wmode, inner, lo, hi, scale, grad, loss):
    """Sum over k in [lo, hi) of w_k (p_k - t_k)^2 (float64), where [lo, hi) lies
    within one row of ``inner`` elements. Writes grad_k = scale w_k 2 (p_k - t_k)
    if ``grad`` is non-empty and loss_k = w_k (p_k - t_k)^2 if ``loss`` is.

    Works on slices indexed from 0: loops over ``range(lo, hi)`` on the whole
    arrays do not vectorise (measured 4x slower: numba's negative-index
    handling), loops over ``range(len(slice))`` do.
    """
    two = as_acc(2.0, scale)  # typed from the scale, never from the data (NaN/inf safe)
    gs = scale * two
    ps = p[lo:hi]
    ts = t[lo:hi]
    n = hi - lo
    if wmode == W_NONE or wmode == W_OUTER:
        wc = w[lo // inner] if wmode == W_OUTER else as_acc(1.0, scale)
        ws = w[:0]
    else:
        wc = as_acc(1.0, scale)
        off = lo % inner if wmode == W_INNER else lo
        ws = w[off:off + n]
    gr = grad[lo:hi] if grad.shape[0] > 0 else grad
    ls = loss[lo:hi] if loss.shape[0] > 0 else loss
    acc = 0.0
    # Nothing flows back (a mean over a zero weight sum, or a zero upstream
    # gradient): the gradient is zeros, written last (after every read of pred,
    # which it may overwrite), even where a NaN or inf difference would give 0 * NaN.
    zero_grad = gr
    if gs == 0:
        gr = gr[:0]
    # The per-element loss is written first: ``grad`` may be ``pred`` itself
    # (``out=pred``), and the gradient loop overwrites each element only after
    # reading it, so every loop that reads ``pred`` after that one would see
    # the gradient instead.
    if ws.shape[0] > 0:
        if ls.shape[0] > 0:
            for k in range(n):
                d = load(ps[k]) - load(ts[k])
                ls[k] = ws[k] * d * d
        if gr.shape[0] > 0:
            for k in range(n):
                d = load(ps[k]) - load(ts[k])
                acc += ws[k] * d * d
                store(gr, k, gs * ws[k] * d)
        else:
            for k in range(n):
                d = load(ps[k]) - load(ts[k])
                acc += ws[k] * d * d
    else:
        gw = gs * wc
        if ls.shape[0] > 0:
            for k in range(n):
                d = load(ps[k]) - load(ts[k])
                ls[k] = wc * d * d
        if gr.shape[0] > 0:
            for k in range(n):
                d = load(ps[k]) - load(ts[k])
                acc += d * d
                store(gr, k, gw * d)
        else:
            for k in range(n):
                d = load(ps[k]) - load(ts[k])
                acc += d * d
        acc *= wc
    if gs == 0:
        for k in range(zero_grad.shape[0]):
            store(zero_grad, k, two - two)
    return acc


@njit(parallel=True, cache=True, fastmath=_FM)
def mse_kernel(p, t, wl, scale, grad, loss, partial):
    """partial[task] = sum over the task's elements of w_k (p_k - t_k)^2; optionally
    the gradient ``scale * 2 w_k (p_k - t_k)`` into ``grad`` and the per-element
    loss into ``loss`` (either may have length 0 to skip it). ``wl``: the
    ``WeightLayout``."""
    wmode, w, inner = wl
    n = p.shape[0]
    ntask = partial.shape[0]
    for task in prange(ntask):
        lo = task * n // ntask
        hi = (task + 1) * n // ntask
        acc = 0.0
        k = lo
        while k < hi:
            # Segments of at most SEGMENT elements keep the extra pass for the
            # per-element loss (reduction="none") in L1/L2.
            end = min(hi, k + SEGMENT)
            if wmode == W_INNER or wmode == W_OUTER:
                end = min(end, (k // inner + 1) * inner)
            acc += _segment(p, t, w, wmode, inner, k, end, scale, grad, loss)
            k = end
        partial[task] = acc


@njit(cache=True, fastmath=_FM, _nrt=False)
def mse_serial(p, t, wmode, w, inner, scale, grad, loss):
    """:func:`mse_kernel` as one task on the calling thread, for small inputs
    (``fastloss.config.MSE_SERIAL_MAX_ELEMENTS``); the weight layout comes as
    its three fields. Returns the float64 sum of w_k (p_k - t_k)^2."""
    n = p.shape[0]
    acc = 0.0
    k = 0
    while k < n:
        end = min(n, k + SEGMENT)
        if wmode == W_INNER or wmode == W_OUTER:
            end = min(end, (k // inner + 1) * inner)
        acc += _segment(p, t, w, wmode, inner, k, end, scale, grad, loss)
        k = end
    return acc
