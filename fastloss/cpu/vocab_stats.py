"""The per-row statistics kernel of vocabulary-sharded logits (numba, parallel over rows).

A tensor-parallel rank holds the columns ``[v0, v0 + w)`` of each row of the
``(N, V)`` logits. ``vocab_stats_rows`` reduces its slice ``z`` of a row
(target ``t``, a global class index) to

    m = max_j z_j,   s = sum_j exp(z_j - m),   a = sum_j exp(z_j - m) (z_j - m),
    z_t (when v0 <= t < v0 + w),   the K largest (z_j, v0 + j)

from which ``fastloss.ops.vocab_parallel`` merges slices exactly (in float64)
and derives the loss, entropy, confidence and rank of ``eval_rows``
(``fastloss.cpu.eval_metrics``).

One sweep over memory. As in ``eval_rows``, the row is walked in blocks of
``ROW_BLOCK`` elements, each summed against a reference ``m`` (the first
block's max, then raised only when a block's sum passes ``LAZY_SUM_LIMIT``:
the block is then redone against its own max after rescaling the running
sums, ``s' = k s``, ``a' = k (a + (m - m') s)``, ``k = exp(m - m')``). The
same loop takes each block's max (an integer max of order-preserving bits,
which vectorises). After the sweep the top-K list is filled from the row, now
in L2, and its first value, the row max, becomes ``m`` by one last rescale.

Precision. The running sums and everything returned are float64. Within a
block the exps and sums are float32 for float16/bfloat16/float32 logits (as
in the cross-entropy and evaluation kernels: ~1e-7 relative per exp), or
float64 when the caller passes a float64 ``zero`` (always for float64
logits): the exp is then ``_math.exp_f64``, a vectorisable float64 exp
(numba's float64 ``math.exp`` is a scalar libm call here: no SVML), and the
statistics are float64 functions of the stored values within a few ulp.
Measured on (4096, 32000) float32 logits, 2-core AMD EPYC (noisy): float32
blocks ~1.4x the time of ``eval_rows``, float64 ones ~3x.

Top-K. The pairs are kept sorted by value descending, index ascending (the
order of a stable sort of ``-z``); NaN never enters. Blocks are offered best
max first, and only while their max can beat the K-th kept pair; in a block,
the max of each ``TOP_CHUNK``-element chunk is taken (vectorised) and only
the chunks that can hold a candidate are scanned, best first, so the scalar
scan reads a few chunks of a 32000-wide row instead of all of it.

Special rows. A -inf logit contributes 0 to ``s`` and ``a`` (the exponent is
clamped below where the exp is exactly 0: no ``0 * -inf``). An all -inf
slice has ``m = -inf``, ``s = a = 0``. A NaN makes ``m``, ``s`` and ``a``
NaN; a +inf (without NaN) makes ``m = +inf`` and ``s = a = NaN``.
"""

import math

import numpy as np
from numba import njit, prange, types
from numba.core.extending import overload

from .. import _compile, config
from ._math import (
    EXP64_LOW,
    as_acc,
    exp_f32,
    exp_f64,
    from_ordered_bits,
    i64_as_f64,
    load,
    ordered_bits,
    ordered_bits64,
    row_max,
)
from ._rows import LAZY_SUM_LIMIT, ROW_BLOCK, task_rows

_compile.install()  # the one-line notice before a cold compile

_FM = config.FASTMATH

#: Elements per chunk of the top-K gate (a divisor of ``ROW_BLOCK``).
TOP_CHUNK = 128
_CHUNKS = ROW_BLOCK // TOP_CHUNK



def _exp_acc(d):
    """exp in the block-sum precision: ``exp_f32`` or ``exp_f64``."""


@overload(_exp_acc, fastmath=_FM)
def _exp_acc_ol(d):
    if d == types.float32:
        return lambda d: exp_f32(d)
    return lambda d: exp_f64(d)


def _exp_low(zero):
    """The low clamp of exp arguments in the precision of ``zero``: below it the exp is 0."""


@overload(_exp_low)
def _exp_low_ol(zero):
    if zero == types.float32:
        return lambda zero: np.float32(-88.0)  # exp_f32 is 0 below -87.3
    return lambda zero: EXP64_LOW


def _key(v):
    """An integer key of a float32 or float64 whose integer max is the float max
    (vectorises where a float max without ``nnan`` does not)."""


@overload(_key, fastmath=_FM)
def _key_ol(v):
    if v == types.float32:
        return lambda v: ordered_bits(v)
    return lambda v: ordered_bits64(v)


def _key_low(zero):
    """A key below that of every value (-inf included)."""


@overload(_key_low)
def _key_low_ol(zero):
    if zero == types.float32:
        return lambda zero: np.int32(-2147483647)
    return lambda zero: np.int64(-9223372036854775807)


def _key_value(k):
    """The float64 whose key is ``k`` (a max over at least one value: never the low key)."""


@overload(_key_value)
def _key_value_ol(k):
    if k == types.int32:
        return lambda k: np.float64(from_ordered_bits(k))
    return lambda k: i64_as_f64(k ^ ((k >> np.int64(63)) & np.int64(0x7FFFFFFFFFFFFFFF)))


@njit(fastmath=_FM)
def _block_sums(blk, shift, zero):
    """(sum e_j, sum e_j d_j, max z_j) over a block, d_j = z_j - shift,
    e_j = exp(d_j), in the precision of ``zero``, returned as float64.
    d is clamped to [low, 88]: below ``low`` e is 0 and d finite, so a -inf
    logit adds exactly 0 to both sums (not 0 * -inf); the high clamp keeps exp
    in range (a block that reaches it has a sum far above LAZY_SUM_LIMIT and is
    redone). NaN passes both clamps (and the max may or may not show it)."""
    s = zero
    a = zero
    low = _exp_low(zero)
    high = as_acc(88.0, zero)
    sh = as_acc(shift, zero)
    km = _key_low(zero)
    for j in range(blk.shape[0]):
        v = as_acc(load(blk[j]), zero)
        d = v - sh
        under = d < low
        d = low if under else d
        d = high if d > high else d
        e = _exp_acc(d)
        e = zero if under else e
        s += e
        a += e * d
        kv = _key(v)
        km = kv if kv > km else km
    return np.float64(s), np.float64(a), _key_value(km)


@njit(fastmath=_FM)
def _insert(topv, topi, nfill, v, j):
    """Insert (v, j) into the sorted top list (``nfill`` entries filled) if it
    belongs there; returns the new fill. Order: value descending, index ascending."""
    k = topv.shape[0]
    if nfill == k:
        kv = topv[k - 1]
        if not (v > kv or (v == kv and j < topi[k - 1])):
            return nfill
        p = k - 1
    else:
        p = nfill
        nfill += 1
    while p > 0 and (topv[p - 1] < v or (topv[p - 1] == v and topi[p - 1] > j)):
        topv[p] = topv[p - 1]
        topi[p] = topi[p - 1]
        p -= 1
    topv[p] = v
    topi[p] = j
    return nfill


@njit(fastmath=_FM)
def _scan(xr, lo, hi, v0, topv, topi, nfill):
    """Offer every non-NaN element of xr[lo:hi] to the top list; returns the fill."""
    k = topv.shape[0]
    kv = topv[k - 1]  # while the list is full, what an element must reach
    for j in range(lo, hi):
        v = np.float64(load(xr[j]))
        if nfill == k:
            if not v >= kv:  # below, or NaN
                continue
        elif v != v:
            continue
        nfill = _insert(topv, topi, nfill, v, v0 + j)
        kv = topv[k - 1]
    return nfill


@njit(fastmath=_FM)
def _pick(maxes, done, count, start, step, topv, topi, nfill):
    """The part (block or chunk) c < count not ``done`` with the largest max
    ``maxes[c]`` that may hold a pair the top list takes (part c starts at the
    global index start + c * step); -1 if none. A NaN max (a positive NaN
    hides the part's max) is taken first."""
    k = topv.shape[0]
    kv = topv[k - 1]
    ki = topi[k - 1]
    best = -1
    bv = -np.inf
    for c in range(count):
        if done[c]:
            continue
        v = maxes[c]
        if v != v:
            return c
        # Equal to the K-th value, a part can still win on a lower index.
        takes = nfill < k or v > kv or (v == kv and start + c * step < ki)
        if takes and (best < 0 or v > bv):
            best = c
            bv = v
    return best


@njit(fastmath=_FM)
def _block_top(xr, lo, hi, v0, topv, topi, nfill, cmax, cdone):
    """Offer the block xr[lo:hi] to the top list (``cmax``, ``cdone``: per-chunk
    scratch): its chunks that may hold a candidate are scanned, best first."""
    nch = (hi - lo + TOP_CHUNK - 1) // TOP_CHUNK
    for c in range(nch):
        a = lo + c * TOP_CHUNK
        cmax[c] = np.float64(row_max(xr[a:min(hi, a + TOP_CHUNK)]))
        cdone[c] = False
    while True:
        c = _pick(cmax, cdone, nch, v0 + lo, TOP_CHUNK, topv, topi, nfill)
        if c < 0:
            return nfill
        a = lo + c * TOP_CHUNK
        nfill = _scan(xr, a, min(hi, a + TOP_CHUNK), v0, topv, topi, nfill)
        cdone[c] = True


@njit(fastmath=_FM)
def _row_top(xr, v0, topv, topi, bmax, bdone, cmax, cdone):
    """Fill the top list of a row from its blocks' maxima ``bmax``: the blocks
    that may hold a candidate are offered best first (``bdone``: scratch), so
    that the K-th kept value rises as fast as it can and few blocks are read
    again (from L2: the row was just swept)."""
    k = topv.shape[0]
    for q in range(k):
        topv[q] = -np.inf
        topi[q] = -1
    n = xr.shape[0]
    nb = (n + ROW_BLOCK - 1) // ROW_BLOCK
    for b in range(nb):
        bdone[b] = False
    nfill = 0
    while True:
        b = _pick(bmax, bdone, nb, v0, ROW_BLOCK, topv, topi, nfill)
        if b < 0:
            return
        lo = b * ROW_BLOCK
        nfill = _block_top(xr, lo, min(n, lo + ROW_BLOCK), v0, topv, topi, nfill, cmax, cdone)
        bdone[b] = True


@njit(fastmath=_FM)
def _has_nan(xr):
    """Whether the row holds a NaN (only asked of rows whose sum came out NaN)."""
    for j in range(xr.shape[0]):
        v = load(xr[j])
        if v != v:
            return True
    return False


@njit(fastmath=_FM)
def _rescale(m, mn, s, a):
    """(mn, s, a) with the sums s, a taken against m re-expressed against mn > m."""
    dm = m - mn
    r = math.exp(dm)
    return mn, r * s, r * (a + dm * s)


@njit(fastmath=_FM)
def _row_stats(xr, v0, topv, topi, bmax, bdone, cmax, cdone, zero):
    """(m, s, a) of one row slice in one sweep over memory, then its top list
    (module docstring)."""
    n = xr.shape[0]
    m = -np.inf  # the reference of the sums: at most ~21 below the max so far
    s = 0.0
    a = 0.0
    for b in range((n + ROW_BLOCK - 1) // ROW_BLOCK):
        lo = b * ROW_BLOCK
        blk = xr[lo:min(n, lo + ROW_BLOCK)]
        if m != -np.inf:
            sb, ab, bm = _block_sums(blk, m, zero)
            if sb <= LAZY_SUM_LIMIT:
                s += sb
                a += ab
                bmax[b] = bm
                continue
        mb = np.float64(row_max(blk))
        if mb > m:
            if m != -np.inf:
                m, s, a = _rescale(m, mb, s, a)
            m = mb
        # While every value so far is -inf the exps are taken against 0: they
        # are 0, and a NaN the max missed (a negative one) still reaches s.
        sb, ab, bm = _block_sums(blk, m if m != -np.inf else 0.0, zero)
        s += sb
        a += ab
        bmax[b] = bm
    _row_top(xr, v0, topv, topi, bmax, bdone, cmax, cdone)
    # The largest kept value is the max (NaN never enters the list).
    if m != -np.inf and topv[0] > m:
        m, s, a = _rescale(m, topv[0], s, a)
    if s != s:
        a = np.nan
        if _has_nan(xr):
            m = np.nan
    return m, s, a


@njit(parallel=True, nogil=True, cache=True, fastmath=_FM)
def vocab_stats_rows(x, tgt, v0, zero, ntask, mx, sumexp, dev, zt, has, topv, topi):
    """Per-row statistics of the slice ``x`` (N, w) holding the global columns
    [v0, v0 + w): max, sum of exps, sum of exps times deviations (float64),
    the target logit (NaN and ``has`` False unless v0 <= tgt < v0 + w; ignored
    rows have tgt = -1) and the top-K (value, global index) pairs into the
    (N, K) ``topv``/``topi``. ``ntask`` parallel tasks; releases the GIL."""
    n, w = x.shape
    for task in prange(ntask):
        lo, hi = task_rows(ntask, n, task)
        nb = (w + ROW_BLOCK - 1) // ROW_BLOCK
        bmax = np.empty(nb, np.float64)
        bdone = np.empty(nb, np.bool_)
        cmax = np.empty(_CHUNKS, np.float64)
        cdone = np.empty(_CHUNKS, np.bool_)
        for i in range(lo, hi):
            xr = x[i]
            mx[i], sumexp[i], dev[i] = _row_stats(xr, v0, topv[i], topi[i], bmax, bdone, cmax, cdone, zero)
            lt = tgt[i] - v0
            if 0 <= lt < w:
                zt[i] = np.float64(load(xr[lt]))
                has[i] = True
            else:
                zt[i] = np.nan
                has[i] = False


def row_stats(x, tgt, v0, top_k, zero, ntask, launch):
    """Run :func:`vocab_stats_rows` on the kernel view ``x`` (N, w) and int64
    targets ``tgt`` (-1: ignored); returns (max, sumexp, sumexp_dev,
    target_logit, has_target, top_values, top_index). ``launch``: the context
    manager of a parallel launch (``fastloss._validate.kernel_launch``)."""
    n = x.shape[0]
    mx = np.empty(n, np.float64)
    s = np.empty(n, np.float64)
    a = np.empty(n, np.float64)
    zt = np.empty(n, np.float64)
    has = np.empty(n, np.bool_)
    topv = np.empty((n, top_k), np.float64)
    topi = np.empty((n, top_k), np.int64)
    if n:
        with launch(ntask):
            vocab_stats_rows(x, tgt, np.int64(v0), zero, ntask, mx, s, a, zt, has, topv, topi)
    return mx, s, a, zt, has, topv, topi
