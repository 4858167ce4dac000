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
def _segment(ps, ts, w, wmode, inner, base, scale, gr, ls):
    """Sum over the segment of w_k (p_k - t_k)^2 (float64): ``ps``, ``ts`` and,
    when non-empty, ``gr`` and ``ls`` are the segment's slices, starting at
    element ``base`` of the whole array (which places the weights) and lying
    within one row of ``inner`` elements. Writes gr_k = scale w_k 2 (p_k - t_k)
    if ``gr`` is non-empty and ls_k = w_k (p_k - t_k)^2 if ``ls`` is.

    The caller slices, so every loop here runs over ``range(len(slice))``
    from 0: loops over ``range(lo, hi)`` on whole arrays did not vectorise
    (4x slower: numba's negative-index handling), and slicing here at a
    runtime offset kept the gradient loop scalar (a 65536-element fwd+bwd:
    60 us against 5.9 us with the slices made by the caller).
    """
    two = as_acc(2.0, scale)  # typed from the scale, never from the data (NaN/inf safe)
    gs = scale * two
    n = ps.shape[0]
    if wmode == W_NONE or wmode == W_OUTER:
        wc = w[base // inner] if wmode == W_OUTER else as_acc(1.0, scale)
        ws = w[:0]
    else:
        wc = as_acc(1.0, scale)
        off = base % inner if wmode == W_INNER else base
        ws = w[off:off + n]
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


@njit(fastmath=_FM, _nrt=False)
def _range_sum(p, t, w, wmode, inner, lo, hi, scale, grad, loss):
    """Sum over elements [lo, hi) of w_k (p_k - t_k)^2 (float64), walked in
    segments (:func:`_segment`, sliced here) of at most ``SEGMENT`` elements,
    which keep the extra pass for the per-element loss (reduction "none") in
    L1/L2, and never crossing a row of ``inner`` elements. ``grad``/``loss``
    of length 0 are skipped (their slices stay empty)."""
    acc = 0.0
    k = lo
    while k < hi:
        end = min(hi, k + SEGMENT)
        if wmode == W_INNER or wmode == W_OUTER:
            end = min(end, (k // inner + 1) * inner)
        acc += _segment(p[k:end], t[k:end], w, wmode, inner, k, scale, grad[k:end], loss[k:end])
        k = end
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
        partial[task] = _range_sum(p, t, w, wmode, inner, lo, hi, scale, grad, loss)


@njit(cache=True, fastmath=_FM, _nrt=False)
def mse_serial(p, t, wmode, w, inner, scale, grad, loss):
    """:func:`mse_kernel` as one task on the calling thread, for small inputs
    (``fastloss.config.MSE_SERIAL_MAX_ELEMENTS``); the weight layout comes as
    its three fields. Returns the float64 sum of w_k (p_k - t_k)^2."""
    return _range_sum(p, t, w, wmode, inner, 0, p.shape[0], scale, grad, loss)
