"""The per-token kernel of ``fastloss.compare`` (numba, parallel over row pairs).

``compare_rows`` walks a base row ``a`` and a model row ``b`` of the same token
together, in blocks of ``ROW_BLOCK`` elements. With references ``r_a``, ``r_b``
(see below), ``e_j = exp(a_j - r_a)`` and ``f_j = exp(b_j - r_b)``, ONE loop over a
block pair (one exp per element of each row) adds

    S_a = sum_j e_j,   S_b = sum_j f_j,   U = sum_j e_j (a_j - b_j)

and takes both blocks' exact maxima (as integer keys, which vectorise). A term
with ``e_j = 0`` adds 0 to U, so ``0 * log 0 = 0`` even where both logits are -inf.
As in ``fastloss.cpu.eval_metrics``, the references are the first blocks' maxima
and are kept while a block's sums stay below ``LAZY_SUM_LIMIT`` (so no exp can
overflow); a block whose sum is larger (a value more than ~21 above a reference,
a NaN or +inf), or met while a side has no finite reference yet, is redone
against the block's maxima after rescaling the running sums by
``exp(r_old - r_new)``. With ``lse = r + log S`` and ``p_j = e_j / S_a``,

    KL(base || model) = sum_j p_j (log p_a,j - log p_b,j)
                      = U / S_a - (lse_a - lse_b)

The block sums are in float32 (float64 when either row is float64), the running
sums and the formula in float64. The two halves cancel for nearly equal rows:
a row compared with itself takes the same steps on both sides, so U = 0 and
S_a = S_b bit for bit, and its KL is exactly 0; otherwise the absolute error is
about the relative error of the float32 exp (~5e-7 nats; float64 rows: ~1e-15).
A KL that rounds below 0 is reported as 0. The argmax of each row is the first
index of its maximum (as ``np.argmax``): the block where the exact running
maximum first appeared is rescanned. The target log-probabilities are ``a_t - lse_a`` and
``b_t - lse_b``.

A row holding NaN or +inf, or only -inf, has a sum that is NaN or 0: its
``status`` is 1 (base row), 2 (model row) or 3 (both), and its results are NaN.
"""

import math

import numpy as np
from numba import njit, prange, types
from numba.core.extending import overload

from .. import config
from ._math import as_acc, exp, from_ordered_bits, load, ordered_bits, row_max
from ._rows import LAZY_SUM_LIMIT, ROW_BLOCK, task_rows

_FM = config.FASTMATH

#: ``tgt`` codes of ``compare_rows``: a counted token without a target, and a
#: token left out (its target is ``ignore_index``). Targets are >= 0.
NO_TARGET = -1
SKIP = -2


def _vkey(v):
    """A key of a logit whose max is the key of the max logit."""


@overload(_vkey, fastmath=_FM)
def _vkey_ol(v):
    if v == types.float32:
        # an int32 max vectorises where a float max without ``nnan`` does not
        return lambda v: ordered_bits(v)
    return lambda v: v


def _vkey_low(zero):
    """A key below that of every logit (-inf included)."""


@overload(_vkey_low)
def _vkey_low_ol(zero):
    if zero == types.float32:
        return lambda zero: np.int32(-2147483647)
    return lambda zero: -np.inf


def _vkey_value(k):
    """The logit whose key is ``k`` (-inf for the low key)."""


@overload(_vkey_value)
def _vkey_value_ol(k):
    if k == types.int32:
        return lambda k: from_ordered_bits(k)
    return lambda k: k


@njit(fastmath=_FM)
def _block_sums(xa, xb, ra, rb, zero):
    """(sum e_j, sum f_j, sum e_j (a_j - b_j), max a_j, max b_j) over one block pair,
    e_j = exp(a_j - ra), f_j = exp(b_j - rb), in the accumulation type of ``zero``.
    Exponents above 88 are clamped (the sum then passes ``LAZY_SUM_LIMIT`` and the
    block is redone); NaN passes through to the sums."""
    sa = zero
    sb = zero
    u = zero
    high = as_acc(88.0, zero)
    ka = _vkey_low(zero)
    kb = _vkey_low(zero)
    for j in range(xa.shape[0]):
        a = as_acc(load(xa[j]), zero)
        b = as_acc(load(xb[j]), zero)
        da = a - ra
        db = b - rb
        da = high if da > high else da
        db = high if db > high else db
        e = exp(da)
        f = exp(db)
        sa += e
        sb += f
        t = a - b
        w = t if e > zero else zero
        u += e * w
        ja = _vkey(a)
        jb = _vkey(b)
        ka = ja if ja > ka else ka
        kb = jb if jb > kb else kb
    return sa, sb, u, _vkey_value(ka), _vkey_value(kb)


@njit(fastmath=_FM)
def _first_max(xr, lo, hi, m, zero):
    """The first index in [lo, hi) whose value equals ``m`` (``lo`` if none does)."""
    for j in range(lo, hi):
        if as_acc(load(xr[j]), zero) == m:
            return j
    return lo


@njit(fastmath=_FM)
def _row_pair(xa, xb, t, zero):
    """(KL, argmax a, argmax b, log p_a(t), log p_b(t), status) of one row pair
    (module docstring); the log-probabilities are 0 when ``t`` < 0."""
    n = xa.shape[0]
    hi0 = min(n, ROW_BLOCK)
    ra = as_acc(row_max(xa[:hi0]), zero)  # the first block's maxima: the references
    rb = as_acc(row_max(xb[:hi0]), zero)
    ma = ra  # the exact running maxima, and the blocks where they first appeared
    mb = rb
    blk_a = 0
    blk_b = 0
    sa = 0.0
    sb = 0.0
    u = 0.0
    for lo in range(0, n, ROW_BLOCK):
        hi = min(n, lo + ROW_BLOCK)
        bsa, bsb, bu, bma, bmb = _block_sums(xa[lo:hi], xb[lo:hi], zero if ra == -np.inf else ra,
                                             zero if rb == -np.inf else rb, zero)
        if not (bsa <= LAZY_SUM_LIMIT and bsb <= LAZY_SUM_LIMIT) or ra == -np.inf or rb == -np.inf:
            # a value far above a reference (or NaN, +inf), or no finite reference yet
            # (every value so far -inf): move the references up to the block's maxima
            if bma > ra:
                if ra != -np.inf:
                    k = math.exp(np.float64(ra) - np.float64(bma))
                    sa *= k
                    u *= k
                ra = bma
            if bmb > rb:
                if rb != -np.inf:
                    sb *= math.exp(np.float64(rb) - np.float64(bmb))
                rb = bmb
            bsa, bsb, bu, bma, bmb = _block_sums(xa[lo:hi], xb[lo:hi],
                                                 zero if ra == -np.inf else ra,
                                                 zero if rb == -np.inf else rb, zero)
        sa += bsa
        sb += bsb
        u += bu
        if bma > ma:
            ma = bma
            blk_a = lo
        if bmb > mb:
            mb = bmb
            blk_b = lo
    status = (0 if sa > 0 else 1) + (0 if sb > 0 else 2)  # NaN or 0: invalid
    if status:
        return np.nan, -1, -1, np.nan, np.nan, status
    la = np.float64(ra) + math.log(sa)  # log-sum-exps
    lb = np.float64(rb) + math.log(sb)
    kl = u / sa - (la - lb)
    kl = kl if kl > 0.0 else 0.0
    ia = _first_max(xa, blk_a, min(n, blk_a + ROW_BLOCK), ma, zero)
    ib = _first_max(xb, blk_b, min(n, blk_b + ROW_BLOCK), mb, zero)
    lpa = 0.0
    lpb = 0.0
    if t >= 0:
        lpa = np.float64(as_acc(load(xa[t]), zero)) - la
        lpb = np.float64(as_acc(load(xb[t]), zero)) - lb
    return kl, ia, ib, lpa, lpb, status


@njit(parallel=True, nogil=True, cache=True, fastmath=_FM)
def compare_rows(xa, xb, tgt, zero, ntask, kl, arg_a, arg_b, lp_a, lp_b, status):
    """Per-row KL(a || b), argmaxes, target log-probabilities (float64 / int64) and
    status of the row pairs of ``xa``, ``xb`` (N, V); rows with ``tgt == SKIP`` get
    0, -1, -1, 0, 0, 0. ``zero``: 0 in the accumulation type; ``ntask`` parallel
    tasks. Releases the GIL while it runs."""
    n = xa.shape[0]
    for task in prange(ntask):
        lo, hi = task_rows(ntask, n, task)
        for i in range(lo, hi):
            t = tgt[i]
            if t == SKIP:
                kl[i] = 0.0
                arg_a[i] = -1
                arg_b[i] = -1
                lp_a[i] = 0.0
                lp_b[i] = 0.0
                status[i] = 0
                continue
            kl[i], arg_a[i], arg_b[i], lp_a[i], lp_b[i], status[i] = _row_pair(xa[i], xb[i], t, zero)
