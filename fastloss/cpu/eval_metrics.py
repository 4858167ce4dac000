"""The per-token metrics kernel of ``fastloss.evaluate`` (numba, parallel over rows).

``eval_rows`` computes everything a token contributes in ONE sweep over its row
of logits ``z`` (target ``t``), walking the row in blocks of ``ROW_BLOCK``
elements. With a reference ``m`` (see below), ``d_j = z_j - m`` and
``e_j = exp(d_j)``, one loop over a block adds

    s = sum_j e_j,   u = sum_j e_j d_j,   em = max_j e_j,
    c = #{j : z_j > z_t} + #{j < t : z_j == z_t}

from which, with ``lse = m + log s`` and ``p_j = e_j / s``,

    loss_i = lse - z_t
    ent_i  = -sum_j p_j log p_j = -sum_j p_j (d_j - log s) = log s - u / s
    conf_i = max_j p_j = em / s                                 (top-1 confidence)
    rank_i = c                                       (0: top-1 correct, < 5: top-5)

(ties are broken by index, as ``np.argmax``/a stable sort do). ``m`` need not be
the row max, only close to it: the first block's max is taken (while the block
sits in L1), and every later block is summed against the current ``m`` and kept
if its ``s`` is at most ``LAZY_SUM_LIMIT``, so that no exp can overflow; a block
whose sum is larger (a value more than ~21 above ``m``, a NaN or +inf) is redone
against its own max, which becomes ``m``, after rescaling the running sums: with
``k = exp(m - m')``, ``s' = k s``, ``u' = k (u + (m - m') s)`` and ``em' = k em``.
Each element then needs one load and one exp. The block sums are in float32
(float64 for float64 logits), the running sums and the results in float64, so
``log s - u / s`` does not cancel the way ``lse - sum_j p_j z_j`` would for large
logits. ``fastloss.evaluation.metrics.Totals`` merges the per-chunk results
serially in float64 / int64, so the sums are race-free and chunk-size
independent up to float64 rounding.

``ROW_BLOCK``, ``LAZY_SUM_LIMIT`` and ``task_rows`` are those of the
cross-entropy kernels (``fastloss.cpu.cross_entropy``): the same 8 KB blocks,
the same lazy-max limit and the same split of rows over parallel tasks.

This replaced a cross-entropy forward pass followed by a metrics sweep that
needed the row's logsumexp first: two reads of every chunk, two exps per element
and a scalar second loop, 14x slower per chunk (benchmarks/NOTES.md,
"Evaluation streaming").
"""

import math

import numpy as np
from numba import njit, prange, types
from numba.core.extending import overload

from .. import config
from ._math import as_acc, exp, f32_as_i32, i32_as_f32, load, row_max
from ._rows import LAZY_SUM_LIMIT, ROW_BLOCK, task_rows

_FM = config.FASTMATH


def _ekey(e):
    """A key whose max is the max of the exps ``e`` (>= 0, or NaN)."""


@overload(_ekey, fastmath=_FM)
def _ekey_ol(e):
    if e == types.float32:
        # The bits of a non-negative float32 order like its value: an int32 max
        # vectorises where a float max without ``nnan`` does not.
        return lambda e: f32_as_i32(e)
    return lambda e: e


def _ekey_low(zero):
    """A key below that of every exp."""


@overload(_ekey_low)
def _ekey_low_ol(zero):
    if zero == types.float32:
        return lambda zero: np.int32(-1)
    return lambda zero: -np.inf


def _ekey_value(k):
    """The exp (as float64) whose key is ``k``; 0 for the low key."""


@overload(_ekey_value)
def _ekey_value_ol(k):
    if k == types.int32:
        return lambda k: np.float64(i32_as_f32(k)) if k >= 0 else 0.0
    return lambda k: k if k > 0 else 0.0


@njit(fastmath=_FM)
def _block_sums(blk, shift, zt, ge, zero):
    """(sum e_j, sum e_j d_j, #{j : z_j > z_t}, max e_j) over a block, with
    d_j = z_j - shift clamped to [-88, 88] and e_j = exp(d_j); with ``ge`` the
    count is of z_j >= z_t. The low clamp makes a -inf logit add 0 to the sums
    (e = 0, d finite: not 0 * -inf); the high one keeps exp in range (a block
    that reaches it is redone). NaN passes both. The count is a float so every
    lane stays 32-bit."""
    s = zero
    u = zero
    c = zero
    one = as_acc(1.0, zero)
    low = as_acc(-88.0, zero)
    high = as_acc(88.0, zero)
    k = _ekey_low(zero)
    if ge:
        for j in range(blk.shape[0]):
            v = load(blk[j])
            d = v - shift
            d = low if d < low else d
            d = high if d > high else d
            e = exp(d)
            s += e
            u += e * d
            c += one if v >= zt else zero
            ke = _ekey(e)
            k = ke if ke > k else k
    else:
        for j in range(blk.shape[0]):
            v = load(blk[j])
            d = v - shift
            d = low if d < low else d
            d = high if d > high else d
            e = exp(d)
            s += e
            u += e * d
            c += one if v > zt else zero
            ke = _ekey(e)
            k = ke if ke > k else k
    return s, u, c, _ekey_value(k)


@njit(fastmath=_FM)
def _span_sums(xr, lo, hi, t, shift, zt, zero):
    """``_block_sums`` of xr[lo:hi] as float64 sums, the count an int: ties count
    before the target (>=) and not after it (>), so t's block is split at t."""
    s = 0.0
    u = 0.0
    r = 0
    em = 0.0
    a = lo
    while a < hi:
        z = t if a < t < hi else hi
        sb, ub, cb, eb = _block_sums(xr[a:z], shift, zt, a < t, zero)
        s += sb
        u += ub
        r += int(cb)
        em = eb if eb > em else em
        a = z
    return s, u, r, em


@njit(fastmath=_FM)
def _row_eval(xr, t, zero):
    """(loss, entropy, top-1 confidence, target rank) of one row in one sweep over
    memory (module docstring). A NaN or +inf logit makes s, and so the loss, NaN;
    an all -inf row (s = 0) gets NaN too. While every value so far is -inf the
    exps are taken against 0 (they are 0, and a NaN still reaches s)."""
    n = xr.shape[0]
    zt = load(xr[t])
    m = as_acc(-np.inf, zero)
    s = 0.0
    u = 0.0
    r = 0
    em = 0.0
    for b in range((n + ROW_BLOCK - 1) // ROW_BLOCK):
        lo = b * ROW_BLOCK
        hi = min(n, lo + ROW_BLOCK)
        if m != -np.inf:
            sb, ub, rb, eb = _span_sums(xr, lo, hi, t, m, zt, zero)
            if sb <= LAZY_SUM_LIMIT:
                s += sb
                u += ub
                r += rb
                em = eb if eb > em else em
                continue
        mb = row_max(xr[lo:hi])
        if mb > m:
            if m != -np.inf:
                dm = np.float64(m) - np.float64(mb)
                k = math.exp(dm)
                u = k * (u + dm * s)
                s = k * s
                em = k * em
            m = mb
        sb, ub, rb, eb = _span_sums(xr, lo, hi, t, zero if m == -np.inf else m, zt, zero)
        s += sb
        u += ub
        r += rb
        em = eb if eb > em else em
    if not s > 0 or m == -np.inf:  # NaN; an all -inf row (s = 0, or float64's exp(-88) > 0)
        return np.nan, np.nan, np.nan, r
    ls = math.log(s)
    return np.float64(m) + ls - np.float64(zt), ls - u / s, em / s, r


@njit(parallel=True, nogil=True, cache=True, fastmath=_FM)
def eval_rows(x, tgt, zero, ntask, loss, ent, conf, rank):
    """Per-row loss, entropy, top-1 confidence (float64) and target rank (int64) of
    the logits ``x`` (N, V); rows with ``tgt < 0`` get 0, 0, 0, -1. ``zero`` is 0
    in the accumulation type; ``ntask`` parallel tasks. Releases the GIL while it
    runs (``nogil``), so other Python threads are not held up."""
    n = x.shape[0]
    for task in prange(ntask):
        lo, hi = task_rows(ntask, n, task)
        for i in range(lo, hi):
            t = tgt[i]
            if t < 0:
                loss[i] = 0.0
                ent[i] = 0.0
                conf[i] = 0.0
                rank[i] = -1
                continue
            loss[i], ent[i], conf[i], rank[i] = _row_eval(x[i], t, zero)
