"""CPU kernels for distillation losses between student and teacher logits.

Layers: per-block and per-row inner functions, the row-range functions
``_dense_rows`` / ``_topk_rows``, then the parallel drivers ``distill_dense``
and ``distill_topk`` that ``fastloss.cpu.distill_host`` calls with validated,
C-contiguous 2-D inputs (half precision as integer views).

Per row, with ``zs = s / T`` and ``zt = t / T`` (``inv = 1 / T``),
``ps = softmax(zs)``, ``pt = softmax(zt)``, ``lse_s``/``lse_t`` their
log-sum-exps:

    kl          S = sum_j pt_j (zt_j - zs_j) + lse_s - lse_t          = KL(pt || ps)
    reverse_kl  S = sum_j ps_j (zs_j - zt_j) + lse_t - lse_s          = KL(ps || pt)
    jsd         m = beta pt + (1 - beta) ps,
                S = beta KL(pt || m) + (1 - beta) KL(ps || m)
    hard        H = lse(s) - s_target              (raw logits, no temperature)

Gradients with respect to ``s`` (``gs``: the row's upstream factor of the
divergence, already divided by ``T`` and the reduction's denominator; ``gh``:
that of the hard term):

    kl          gs (ps_j - pt_j)
    reverse_kl  gs ps_j (d_j - S)            d_j = log ps_j - log pt_j
    jsd         gs (1 - beta) ps_j (log(ps_j / m_j) - KL(ps || m))
    hard        gh (softmax(s)_j - [j == target])

A product whose probability factor is 0 is 0 (``0 log 0 = 0``): a class the
teacher gives no mass adds nothing to forward KL, whatever the student holds.

Pass 1 (``_dense_stats``) walks both rows together in blocks of
``ROW_BLOCK``: ONE loop per block takes one exp per element of each row, adds
them and (when kept) stores them in the task's scratch rows, with each block's
reference maxes in ``shifts``. As in cross-entropy's lazy blocks, a block is
first taken against the running maxes without its own max pass, and redone
against its maxes (rescaling the running sums) only when one of its sums
passes ``LAZY_SUM_LIMIT`` (a value far above the reference, +inf or NaN); the
first block always takes the exact road. At 4096 x 32000 float32 this took
the fused KL from 1.7x to 1.35x cross-entropy's fused time (2 threads). KL and
reverse KL also accumulate ``sum e (z - z')`` online, rescaled with the running
max, so their forward pass needs no scratch. The gradient pass reads the
scratch rows and rescales block ``b`` by ``exp(shift_b - max) / sum``. JSD
needs a second pass for ``log m_j`` (one log per element; the logits are
re-read for ``log ps``/``log pt``, the row was just read and is in cache), and
a third for the gradient, which needs ``KL(ps || m)`` first. Passes 2 and 3
read the task's scratch rows and the just-read logits from cache, so JSD's
cost over KL is arithmetic: the log (``_math.log``, vectorised, about twice
an exp) and ~15 operations per element. Splitting the log's exponent and
mantissa in 32-bit integer IR took pass 2 from 0.51 to 0.39 ns per element
(1 thread) and the fused JSD from 3.1-3.5x to 2.5-2.8x the CE fused time
(KL: 1.3-1.45x; benchmarks/NOTES.md); prefetching the next rows during pass
2 gained ~3% and was left out. With a hard term
and ``T != 1``, a third stream (exps of the raw student logits) runs in the
same block loop; with ``T == 1`` it is the student's stream.

The top-k teacher kernel runs the student's stream(s), then the ``k`` teacher
entries (scalar float64 arithmetic), writes the dense part of the gradient
(the same loop as forward KL with no teacher row) and then overwrites the ``k``
support entries and the target with their full values, rounded once.

Statistics accumulate in float32 (float64 when the student or the teacher is
float64); row-level combinations (log-sum-exps, ratios) are formed in float64.
"""

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .. import _compile, config
from ..codes import JSD, KL, REVERSE_KL
from ._math import as_acc, exp, load, log, row_max, store
from ._rows import LAZY_SUM_LIMIT, ROW_BLOCK, inline_into, task_rows

_compile.install()

_FM = config.FASTMATH


class DistillConstants(NamedTuple):
    """Per-call scalars of the distillation kernels, in the accumulation type
    (flags as bools): the divergence ``kind`` (``fastloss.codes.KL``,
    ``REVERSE_KL``, ``JSD``), ``inv_t = 1 / T``, ``beta`` (JSD), ``hard``
    (a hard-label term is computed), ``same`` (``T == 1``: the hard term's
    softmax is the student's), ``gsoft`` (the divergence's gradient factor
    without the row's upstream gradient: ``soft_weight [T^2] / T``) and ``ghard``
    (``hard_weight``)."""

    kind: int
    inv_t: float
    beta: float
    hard: bool
    same: bool
    gsoft: float
    ghard: float


class DistillScratch(NamedTuple):
    """Per-task scratch rows (padded by ``fastloss.cpu._rows.task_scratch``):
    ``es`` (student exps), ``et`` (teacher exps; for reverse KL ``zs - zt``; for
    JSD then ``log(ps / m)``), ``eh`` (exps of the raw student logits: hard term
    with ``T != 1``), ``shifts`` (3 x blocks: each block's running max of the
    three streams) and ``ex`` (top-k: one value per teacher entry). A row the
    kernel does not need is (ntask, 0)."""

    es: np.ndarray
    et: np.ndarray
    eh: np.ndarray
    shifts: np.ndarray
    ex: np.ndarray


#: The row functions are inlined into the row-range functions only
#: (``fastloss.cpu._rows.inline_into``), as in ``fastloss.cpu.cross_entropy``.
_in_rows = inline_into("_dense_rows", "_topk_rows")


# ----------------------------------------------------------------------------- pass 1


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _rescale(m, mb, s, a, with_a):
    """Fold a block max ``mb`` into the running max ``m``: (m, s, a) with the sums rescaled."""
    if mb > m:
        if m != -np.inf:
            r = exp(m - mb)
            s = s * r
            if with_a:
                a = a * r
        m = mb
    return m, s, a


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _pair_block(sb, tb, inv, kind, shs, sht, esb, etb, keep, top):
    """One block of both rows: (sum es, sum et, a) with es = exp(min(zs - shs, top)),
    et = exp(min(zt - sht, top)) (stored with ``keep``: es, and et, or zs - zt
    for reverse KL), a = sum et (zt - zs) (KL) or sum es (zs - zt) (reverse KL),
    terms with a zero exp left out. ``top`` is 88 for a block taken against a
    reference max that may be below the block's own (``_dense_stats``: the
    clamp keeps exp finite, so such a block shows up as a large sum), +inf
    (no clamp) otherwise."""
    zero = inv - inv
    ss = zero
    st = zero
    a = zero
    n = sb.shape[0]
    if kind == KL:
        for j in range(n):
            zs = inv * load(sb[j])
            zt = inv * load(tb[j])
            d1 = zs - shs
            d2 = zt - sht
            e1 = exp(d1 if d1 < top else top)
            e2 = exp(d2 if d2 < top else top)
            ss += e1
            st += e2
            a += e2 * (zt - zs) if e2 > zero else zero
            if keep:
                esb[j] = e1
                etb[j] = e2
    elif kind == REVERSE_KL:
        for j in range(n):
            zs = inv * load(sb[j])
            zt = inv * load(tb[j])
            d1 = zs - shs
            d2 = zt - sht
            e1 = exp(d1 if d1 < top else top)
            e2 = exp(d2 if d2 < top else top)
            d = zs - zt
            ss += e1
            st += e2
            a += e1 * d if e1 > zero else zero
            if keep:
                esb[j] = e1
                etb[j] = d
    else:
        for j in range(n):
            d1 = inv * load(sb[j]) - shs
            d2 = inv * load(tb[j]) - sht
            e1 = exp(d1 if d1 < top else top)
            e2 = exp(d2 if d2 < top else top)
            ss += e1
            st += e2
            esb[j] = e1
            etb[j] = e2
    return ss, st, a


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _stream_block(xb, inv, sh, eb, keep):
    """sum_j exp(inv x_j - sh), the exps stored in ``eb`` with ``keep``."""
    s = inv - inv
    if keep:
        for j in range(xb.shape[0]):
            e = exp(inv * load(xb[j]) - sh)
            eb[j] = e
            s += e
    else:
        for j in range(xb.shape[0]):
            s += exp(inv * load(xb[j]) - sh)
    return s


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _dense_stats(sr, tr, k, es, et, eh, shifts, keep, hard_stream, keep_h):
    """Pass 1 over a student row ``sr`` and a teacher row ``tr`` (see the module
    docstring): returns (ms, ss, mt, st, mh, sh, a) with m the reference max of
    each stream (0 for an all -inf row), s its sum of exps and ``a`` the
    online KL / reverse-KL accumulator (relative to ``mt`` / ``ms``). The hard
    stream (raw logits) runs only with ``hard_stream``; its exps are stored
    with ``keep_h`` (the gradient needs them, JSD's loss does not)."""
    inv = k.inv_t
    kind = k.kind
    zero = inv - inv
    one = as_acc(1.0, inv)  # (zero + 1 would be float64 in numba)
    n = sr.shape[0]
    nb = (n + ROW_BLOCK - 1) // ROW_BLOCK
    ninf = as_acc(-np.inf, inv)
    ms = ninf
    mt = ninf
    mh = ninf
    ss = zero
    st = zero
    sh = zero
    a = zero
    limit = as_acc(LAZY_SUM_LIMIT, inv)
    top = as_acc(88.0, inv)
    for b in range(nb):
        lo = b * ROW_BLOCK
        hi = min(n, lo + ROW_BLOCK)
        sb = sr[lo:hi]
        tb = tr[lo:hi]
        lazy = False
        if ms != -np.inf and mt != -np.inf:
            # Against the running maxes without the block's max pass; kept
            # unless a sum shows a value far above its reference (or NaN/inf).
            bss, bst, ba = _pair_block(sb, tb, inv, kind, ms, mt, es[lo:hi], et[lo:hi], keep, top)
            lazy = bss <= limit and bst <= limit
        if not lazy:
            ms, ss, a = _rescale(ms, inv * row_max(sb), ss, a, kind == REVERSE_KL)
            mt, st, a = _rescale(mt, inv * row_max(tb), st, a, kind == KL)
            bss, bst, ba = _pair_block(sb, tb, inv, kind, zero if ms == -np.inf else ms,
                                       zero if mt == -np.inf else mt, es[lo:hi], et[lo:hi], keep,
                                       as_acc(np.inf, inv))
        shs = zero if ms == -np.inf else ms
        sht = zero if mt == -np.inf else mt
        ss += bss
        st += bst
        a += ba
        if keep:
            shifts[b] = shs
            shifts[nb + b] = sht
        if hard_stream:
            mh, sh, _ = _rescale(mh, one * row_max(sb), sh, sh, False)
            shh = zero if mh == -np.inf else mh
            sh += _stream_block(sb, one, shh, eh[lo:hi], keep_h)
            if keep_h:
                shifts[2 * nb + b] = shh
    return ((zero if ms == -np.inf else ms), ss, (zero if mt == -np.inf else mt), st,
            (zero if mh == -np.inf else mh), sh, a)


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _student_stats(sr, inv, e, shifts, keep):
    """Pass 1 of one stream (``inv x``) of a row: (m, s) as in ``_dense_stats``,
    the exps stored in ``e`` and each block's shift in ``shifts`` with ``keep``."""
    zero = inv - inv
    n = sr.shape[0]
    m = as_acc(-np.inf, inv)
    s = zero
    for b in range((n + ROW_BLOCK - 1) // ROW_BLOCK):
        lo = b * ROW_BLOCK
        hi = min(n, lo + ROW_BLOCK)
        xb = sr[lo:hi]
        m, s, _ = _rescale(m, inv * row_max(xb), s, s, False)
        shm = zero if m == -np.inf else m
        s += _stream_block(xb, inv, shm, e[lo:hi], keep)
        if keep:
            shifts[b] = shm
    return (zero if m == -np.inf else m), s


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _lse(shift, s):
    """shift + log(s) in float64 (-inf for s = 0)."""
    if s == 0:
        return -np.inf
    return np.float64(shift) + math.log(np.float64(s))


# ----------------------------------------------------------------------------- JSD pass 2


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _jsd_pass(sr, tr, inv, beta, es, et, shifts, ms, ss, mt, st, lse_s, lse_t):
    """JSD's second pass over a row: returns (KL(pt || m), KL(ps || m)) and
    overwrites ``et`` with ``r_j = log(ps_j / m_j)`` for the gradient pass."""
    zero = inv - inv
    omb = as_acc(1 - beta, inv)  # 1 - float32 would be float64 in numba: scalar libm log in the loop
    n = sr.shape[0]
    nb = (n + ROW_BLOCK - 1) // ROW_BLOCK
    ls0 = as_acc(lse_s, inv)
    lt0 = as_acc(lse_t, inv)
    kt = zero
    ks = zero
    for b in range(nb):
        lo = b * ROW_BLOCK
        hi = min(n, lo + ROW_BLOCK)
        cps = as_acc(exp(shifts[b] - ms) / ss, inv)
        cpt = as_acc(exp(shifts[nb + b] - mt) / st, inv)
        # Block slices indexed from 0: numba then knows the index is not
        # negative (no wraparound select), and the loop vectorises.
        sb, tb, esb, etb = sr[lo:hi], tr[lo:hi], es[lo:hi], et[lo:hi]
        for j in range(hi - lo):
            ps = esb[j] * cps
            pt = etb[j] * cpt
            lm = log(beta * pt + omb * ps)
            rs = (inv * load(sb[j]) - ls0) - lm
            rt = (inv * load(tb[j]) - lt0) - lm
            kt += pt * rt if pt > zero else zero
            ks += ps * rs if ps > zero else zero
            etb[j] = rs
    return kt, ks


# ----------------------------------------------------------------------------- gradient loops


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _grad_linear(orow, lo, es, et, eh, a_s, a_t, a_h, gh, tt):
    """orow[lo + j] = a_s es_j - a_t et_j + a_h eh_j - [lo + j == tt] gh (forward
    KL, the hard term, and the dense part of the top-k kernels)."""
    zero = gh - gh
    for j in range(es.shape[0]):
        v = a_s * es[j] - a_t * et[j] + a_h * eh[j]
        v = v - gh if lo + j == tt else v - zero
        store(orow, lo + j, v)


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _grad_centered(orow, lo, es, r, eh, cps, g1, c, a_h, gh, tt):
    """orow[lo + j] = g1 p_j (r_j - c) + a_h eh_j - [lo + j == tt] gh with
    p_j = cps es_j, and 0 for the first term where p_j = 0 (reverse KL, JSD)."""
    zero = gh - gh
    for j in range(es.shape[0]):
        p = es[j] * cps
        v = g1 * p * (r[j] - c) if p > zero else zero
        v = v + a_h * eh[j]
        v = v - gh if lo + j == tt else v
        store(orow, lo + j, v)


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _zero_row(orow):
    """orow[:] = 0 in its storage type."""
    zero = np.float32(0.0)
    for j in range(orow.shape[0]):
        store(orow, j, zero)


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _ignored(i, ti, out, grad, soft, hard):
    """Whether row i is ignored (``ti < 0``); if so, its losses are set to 0 and,
    with ``grad``, its gradient row to zeros."""
    if ti >= 0:
        return False
    soft[i] = 0.0
    hard[i] = 0.0
    if grad:
        _zero_row(out[i])
    return True


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _hard_coef(k, g, shifts, nb, b, ms, ss, mh, sh):
    """The hard term's factor of block b's stored exps: gh exp(shift_b - m) / s,
    from the student's stream when ``same`` (T == 1), else the raw stream."""
    if not k.hard:
        return as_acc(0.0, k.inv_t)
    gh = g * k.ghard
    if k.same:
        return as_acc(gh * exp(shifts[b] - ms) / ss, k.inv_t)
    return as_acc(gh * exp(shifts[2 * nb + b] - mh) / sh, k.inv_t)


# ----------------------------------------------------------------------------- dense rows


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _dense_row(sr, tr, t, k, g, orow, es, et, eh, shifts, grad):
    """(S_i, H_i) of one counted row, and with ``grad`` its gradient into
    ``orow`` (which may be ``sr``: every read of the row comes before the
    first write). ``t``: the target (used with ``k.hard``); ``g``: the row's
    upstream gradient (already divided by the reduction's denominator)."""
    kind = k.kind
    inv = k.inv_t
    n = sr.shape[0]
    nb = (n + ROW_BLOCK - 1) // ROW_BLOCK
    hard_stream = k.hard and not k.same
    keep = grad or kind == JSD
    ms, ss, mt, st, mh, sh, a = _dense_stats(sr, tr, k, es, et, eh, shifts, keep, hard_stream, grad)
    lse_s = _lse(ms, ss)
    lse_t = _lse(mt, st)
    kt = ks = inv - inv
    if ss == 0 or st == 0:
        soft = np.nan  # an all -inf row: no distribution (cross_entropy's convention)
    elif kind == KL:
        soft = np.float64(a) / np.float64(st) + lse_s - lse_t
    elif kind == REVERSE_KL:
        soft = np.float64(a) / np.float64(ss) + lse_t - lse_s
    else:
        kt, ks = _jsd_pass(sr, tr, inv, k.beta, es, et, shifts, ms, ss, mt, st, lse_s, lse_t)
        soft = k.beta * np.float64(kt) + (1 - k.beta) * np.float64(ks)
    hard = 0.0
    if k.hard:
        lse_h = lse_s if k.same else _lse(mh, sh)
        hard = lse_h - np.float64(load(sr[t]))
    if not grad:
        return soft, hard
    if g == 0:
        _zero_row(orow)  # nothing flows back (NaN rows included)
        return soft, hard
    gs = g * k.gsoft
    gh = as_acc(g * k.ghard if k.hard else 0.0, inv)
    tt = t if k.hard else -1
    if kind == KL:
        c = 0.0
        g1 = gs
    elif kind == REVERSE_KL:
        c = np.float64(soft) + lse_s - lse_t  # E_ps[d] + lse_s - lse_t: d's row constant removed
        g1 = gs
    else:
        c = np.float64(ks)
        g1 = gs * (1 - k.beta)
    eh_row = eh if hard_stream else es
    zero = inv - inv
    for b in range(nb):
        lo = b * ROW_BLOCK
        hi = min(n, lo + ROW_BLOCK)
        cps = exp(shifts[b] - ms) / ss
        a_h = _hard_coef(k, g, shifts, nb, b, ms, ss, mh, sh)
        if gs == 0:
            # soft_weight 0: the divergence is left out, and nothing of the
            # teacher (not even a NaN) enters the gradient.
            _grad_linear(orow, lo, es[lo:hi], es[lo:hi], eh_row[lo:hi], zero, zero, a_h, gh, tt)
        elif kind == KL:
            a_s = as_acc(gs * cps, inv)
            a_t = as_acc(gs * exp(shifts[nb + b] - mt) / st, inv)
            _grad_linear(orow, lo, es[lo:hi], et[lo:hi], eh_row[lo:hi], a_s, a_t, a_h, gh, tt)
        else:
            _grad_centered(orow, lo, es[lo:hi], et[lo:hi], eh_row[lo:hi], as_acc(cps, inv),
                           as_acc(g1, inv), as_acc(c, inv), a_h, gh, tt)
    return soft, hard


@njit(fastmath=_FM, _nrt=False)
def _dense_rows(s, t, tgt, k, g, out, es, et, eh, shifts, lo, hi, grad, soft, hard):
    """Rows [lo, hi) of the dense kernel; rows with ``tgt[i] < 0`` are ignored
    (zero losses, zero gradient)."""
    for i in range(lo, hi):
        ti = tgt[i]
        if _ignored(i, ti, out, grad, soft, hard):
            continue
        si, hi_ = _dense_row(s[i], t[i], ti, k, g[i], out[i] if grad else out[0], es, et, eh, shifts, grad)
        soft[i] = si
        hard[i] = hi_


@njit(parallel=True, cache=True, fastmath=_FM)
def distill_dense(s, t, tgt, k, g, out, scratch, grad, soft, hard):
    """Per-row divergence ``soft[i]`` and hard-label term ``hard[i]`` (float64) of
    student rows ``s`` against dense teacher rows ``t``; with ``grad`` also
    ``out[i, j] = d(g_i (gsoft' S_i + ghard H_i)) / ds_ij`` (``out`` may be
    ``s``). ``k``: ``DistillConstants``; ``scratch``: ``DistillScratch`` (``es``,
    ``et`` (ntask, V) when ``grad`` or JSD, ``eh`` (ntask, V) with a hard
    term, ``T != 1`` and ``grad``); ``tgt[i] < 0``: an ignored row."""
    n = s.shape[0]
    ntask = scratch.es.shape[0]
    for task in prange(ntask):
        lo, hi = task_rows(ntask, n, task)
        _dense_rows(s, t, tgt, k, g, out, scratch.es[task], scratch.et[task], scratch.eh[task],
                    scratch.shifts[task], lo, hi, grad, soft, hard)


# ----------------------------------------------------------------------------- top-k rows


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _topk_row(sr, ir, lr, t, k, g, orow, es, eh, shifts, ex, grad):
    """(S_i, H_i) of one counted row against a top-k teacher (indices ``ir``,
    logprobs ``lr``), and with ``grad`` the gradient into ``orow``. The teacher
    is ``softmax(lr / T)`` on ``ir``, 0 elsewhere."""
    kind = k.kind
    inv = k.inv_t
    beta = k.beta
    n = sr.shape[0]
    nb = (n + ROW_BLOCK - 1) // ROW_BLOCK
    hard_stream = k.hard and not k.same
    ms, ss = _student_stats(sr, inv, es, shifts, grad)
    one = as_acc(1.0, inv)
    mh = ms
    sh = ss
    if hard_stream:
        mh, sh = _student_stats(sr, one, eh, shifts[2 * nb:], grad)
    lse_s = _lse(ms, ss)
    invd = np.float64(inv)
    # The teacher's k entries: log-softmax of lr / T.
    kk = ir.shape[0]
    mt = -np.inf
    for q in range(kk):
        v = invd * np.float64(load(lr[q]))
        mt = v if v > mt else mt
    if mt != mt:
        mt = np.nan
    st = 0.0
    nan = False
    for q in range(kk):
        v = invd * np.float64(load(lr[q]))
        nan = nan or v != v
        st += math.exp(v - mt) if v > -np.inf else 0.0
    lse_t = mt + math.log(st) if st > 0 and not nan else np.nan
    omb = 1.0 - beta
    kt = 0.0
    ks = 0.0
    sps = 0.0
    soft = 0.0
    for q in range(kk):
        lpt = invd * np.float64(load(lr[q])) - lse_t
        pt = math.exp(lpt)
        ls = invd * np.float64(load(sr[ir[q]])) - lse_s
        ps = math.exp(ls)
        if kind == KL:
            soft += pt * (lpt - ls) if pt > 0 else (0.0 if pt == 0 else pt)
            ex[q] = as_acc(pt, inv)
        else:
            lm = math.log(beta * pt + omb * ps) if pt + ps > 0 else -np.inf
            kt += pt * (lpt - lm) if pt > 0 else (0.0 if pt == 0 else pt)
            ks += ps * (ls - lm) if ps > 0 else (0.0 if ps == 0 else ps)
            sps += ps
            ex[q] = as_acc(ls - lm, inv)
    c0 = -math.log1p(-beta) if beta < 1 else 0.0
    if kind != KL:
        ks += max(0.0, 1.0 - sps) * c0  # the student's mass off the support: m = (1 - beta) ps there
        soft = beta * kt + omb * ks
    if ss == 0 or nan:
        soft = np.nan
    hard = 0.0
    if k.hard:
        lse_h = lse_s if k.same else _lse(mh, sh)
        hard = lse_h - np.float64(load(sr[t]))
    if not grad:
        return soft, hard
    if g == 0:
        _zero_row(orow)
        return soft, hard
    gs = g * k.gsoft
    g1 = gs if kind == KL else gs * omb
    # Off the support both kinds are linear in ps: KL gs ps_j, JSD g1 ps_j (c0 - K).
    coef = gs if kind == KL else g1 * (c0 - ks)
    if gs == 0:
        coef = 0.0  # soft_weight 0: nothing of the teacher enters (see _dense_row)
    gh = as_acc(g * k.ghard if k.hard else 0.0, inv)
    tt = t if k.hard else -1
    eh_row = eh if hard_stream else es
    for b in range(nb):
        lo = b * ROW_BLOCK
        hi = min(n, lo + ROW_BLOCK)
        cps = exp(shifts[b] - ms) / ss
        a_h = _hard_coef(k, g, shifts, nb, b, ms, ss, mh, sh)
        _grad_linear(orow, lo, es[lo:hi], es[lo:hi], eh_row[lo:hi], as_acc(coef * cps, inv),
                     as_acc(0.0, inv), a_h, gh, tt)
    # The support entries, each recomputed in full and rounded once.
    for q in range(kk):
        j = ir[q]
        b = j // ROW_BLOCK
        p = np.float64(es[j]) * (exp(shifts[b] - ms) / ss)
        a_h = _hard_coef(k, g, shifts, nb, b, ms, ss, mh, sh)
        v = coef * p + np.float64(a_h) * np.float64(eh_row[j])
        if gs == 0:
            pass
        elif kind == KL:
            v -= gs * np.float64(ex[q])
        elif p > 0:
            v += g1 * p * (np.float64(ex[q]) - c0)
        if j == tt:
            v -= np.float64(gh)
        store(orow, j, as_acc(v, inv))
    return soft, hard


@njit(fastmath=_FM, _nrt=False)
def _topk_rows(s, idx, lp, tgt, k, g, out, es, eh, shifts, ex, lo, hi, grad, soft, hard):
    """Rows [lo, hi) of the top-k kernel (see ``_dense_rows``)."""
    for i in range(lo, hi):
        ti = tgt[i]
        if _ignored(i, ti, out, grad, soft, hard):
            continue
        si, hi_ = _topk_row(s[i], idx[i], lp[i], ti, k, g[i], out[i] if grad else out[0], es, eh, shifts, ex, grad)
        soft[i] = si
        hard[i] = hi_


@njit(parallel=True, cache=True, fastmath=_FM)
def distill_topk(s, idx, lp, tgt, k, g, out, scratch, grad, soft, hard):
    """``distill_dense`` against a top-k teacher: ``idx`` (n, k) int64 class
    indices (distinct per row, in [0, V)), ``lp`` (n, k) logprobs. ``scratch``:
    ``es`` (and ``eh`` with a hard term and ``T != 1``) (ntask, V) with
    ``grad``, ``ex`` (ntask, k)."""
    n = s.shape[0]
    ntask = scratch.ex.shape[0]
    for task in prange(ntask):
        lo, hi = task_rows(ntask, n, task)
        _topk_rows(s, idx, lp, tgt, k, g, out, scratch.es[task], scratch.eh[task], scratch.shifts[task],
                   scratch.ex[task], lo, hi, grad, soft, hard)
