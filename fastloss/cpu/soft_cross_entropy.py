"""CPU kernels for softmax cross-entropy with probability ("soft") targets.

The twin of ``fastloss.cpu.cross_entropy`` for targets ``q`` of the logits'
shape. Per row ``i`` with transformed logits ``z`` (``z = scale * x``, then
``z = cap * tanh(z / cap)`` under softcap; ``-inf`` stays ``-inf``), smoothed
targets ``q'_j = (1 - eps) q_j + eps / V`` and class weights ``w`` (ones
without weights), with ``u_j = w_j q'_j``:

    lse  = m + log(sum_j exp(z_j - m))
    ce_i = sum_j u_j (lse - z_j) = U (lse - c) - sum_j u_j (z_j - c),   U = sum_j u_j

where ``c`` is a per-row constant (the first block's max) that keeps the two
terms small, and a term with ``u_j = 0`` is 0 even where ``z_j = -inf``
(0 * inf = 0, where PyTorch gives NaN). The fused kernel also writes

    dL/dx_j = [A e_j - gce u_j] dz_j/dx_j,   A = (gce U + gz 2 zl lse) / s

with ``e_j = exp(z_j - m)``, ``s = sum_j e_j`` and ``gce``/``gz`` the row's
upstream coefficients (already divided by the reduction's denominator). A row
to which nothing flows back (``gce = 0`` and ``gz zl = 0``) gets zeros.

One sweep over both rows (``_row_stats``), in blocks of ``ROW_BLOCK``
elements as in ``fastloss.cpu.cross_entropy``: per block, the max (raw logits:
only for the first block, the others are taken against the running reference
and redone only when their exps grow past ``LAZY_SUM_LIMIT``), then one loop
for the exps and the target sums (``sum q``, ``U``, ``sum u (z - c)``),
rescaled once per block when the max grows. One loop rather than a loop for
the targets beside the exp loop, and U formed from ``sum q`` without class
weights, made the forward 2.4x faster (128 x 32000 float32, one thread,
2-core AMD EPYC, 2026-12-03: 2.73 -> 1.15 ms against 0.71 ms for class
indices). The fused kernel keeps the exps
in a per-task scratch row (in L2) for the gradient pass and recomputes ``u``
there from the targets' block (a re-read from cache: cheaper than storing
and reloading a float32 ``u`` row, most of all for half-precision targets),
so each element needs one exp and each input row is read from memory once.

The targets are checked in the same pass: each row's ``sum_j q_j`` is written
to ``qsum`` (a negative entry adds NaN instead; NaN or inf entries make the
sum NaN or inf), and the host raises for rows whose sum is not within
tolerance of 1. Statistics accumulate in float32 (float64 for float64
logits), whatever the targets' dtype; half-precision inputs arrive as integer
views and are converted in registers (``_math.load``).
"""

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .. import _compile, config
from ..codes import PLAIN, SOFTCAP
from ._math import as_acc, exp, load, prefetch, row_max, store
from ._rows import LAZY_SUM_LIMIT, ROW_BLOCK, inline_into, n_row_blocks, row_transform, task_rows, task_scratch
from .cross_entropy import PREFETCH_MAX_ITEMSIZE, PREFETCH_STEP

_compile.install()

_FM = config.FASTMATH

__all__ = ["SoftConstants", "SoftScratch", "n_row_blocks", "soft_forward", "soft_fused",
           "soft_scratch", "soft_serial_forward", "soft_serial_fused"]


class SoftConstants(NamedTuple):
    """Per-call scalars of the soft-target kernels (accumulation type): whether
    class weights are given, ``keep = 1 - eps`` and ``spread = eps / V`` of the
    smoothed targets ``q' = keep q + spread``, and the z-loss coefficient."""

    has_w: bool
    keep: float
    spread: float
    zl: float


class SoftScratch(NamedTuple):
    """Per-task scratch rows (see ``task_scratch``): ``z`` (transformed logits,
    then the fused kernel's exps; (ntask, 0) for a plain forward), ``t`` (tanh
    values under softcap) and ``shifts`` (the fused kernel's per-block running
    max). The number of tasks is ``shifts.shape[0]``."""

    z: np.ndarray
    t: np.ndarray
    shifts: np.ndarray


def soft_scratch(ntask, nclass, acc, mode, fused):
    """The :class:`SoftScratch` of ``ntask`` tasks over rows of ``nclass`` classes."""
    need_z = fused or mode != PLAIN
    return SoftScratch(task_scratch(ntask, nclass if need_z else 0, acc),
                       task_scratch(ntask, nclass if mode == SOFTCAP else 0, acc),
                       task_scratch(ntask, n_row_blocks(nclass), acc))


#: The row functions are inlined into the row-range functions only
#: (``fastloss.cpu._rows.inline_into``), as in ``fastloss.cpu.cross_entropy``.
_in_rows = inline_into("_forward_rows", "_fused_rows")


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _block_all(src, qb, wb, has_w, keep, spread, c, er, shift, keep_exp, clamp, zero):
    """One loop over a block of z and its targets: (sum_j exp(z_j - shift), sum q
    (NaN when an entry is negative), U, sum u (z - c)), the exps stored in
    ``er`` (which may alias ``src``) with ``keep_exp``; with ``clamp`` the
    exponent is capped at 88 (a lazy block, see ``_row_stats``). ``u_j = w_j
    q'_j``; a term with u_j = 0 is 0 (0 * -inf = 0). Without class weights U
    is formed from sum q after the loop (one accumulator less per element)."""
    top = as_acc(88.0, zero)
    nan = as_acc(np.nan, zero)
    s = zero
    sq = zero
    su = zero
    suz = zero
    n = src.shape[0]
    # Four copies of one loop (with/without stored exps and class weights):
    # a condition inside it kept LLVM from vectorising it.
    if keep_exp and has_w:
        for j in range(n):
            v = load(src[j])
            d = v - shift
            e = exp(d if (not clamp or d < top) else top)
            er[j] = e
            q = as_acc(load(qb[j]), zero)
            u = wb[j] * (keep * q + spread)
            s += e
            sq += q if q >= zero else nan
            su += u
            suz += u * (v - c) if u != zero else zero
    elif keep_exp:
        for j in range(n):
            v = load(src[j])
            d = v - shift
            e = exp(d if (not clamp or d < top) else top)
            er[j] = e
            q = as_acc(load(qb[j]), zero)
            u = keep * q + spread
            s += e
            sq += q if q >= zero else nan
            suz += u * (v - c) if u != zero else zero
    elif has_w:
        for j in range(n):
            v = load(src[j])
            d = v - shift
            s += exp(d if (not clamp or d < top) else top)
            q = as_acc(load(qb[j]), zero)
            u = wb[j] * (keep * q + spread)
            sq += q if q >= zero else nan
            su += u
            suz += u * (v - c) if u != zero else zero
    else:
        for j in range(n):
            v = load(src[j])
            d = v - shift
            s += exp(d if (not clamp or d < top) else top)
            q = as_acc(load(qb[j]), zero)
            u = keep * q + spread
            sq += q if q >= zero else nan
            suz += u * (v - c) if u != zero else zero
    if not has_w:
        su = keep * sq + spread * as_acc(n, zero)
    return s, sq, su, suz


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _rescale(m, s, mb):
    """The running (m, s) after a block of max ``mb``: s rescaled when the max grows."""
    if mb > m:
        if m != -np.inf:
            s = s * exp(m - mb)
        m = mb
    return m, s


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _exps(src, er, m, keep_exp, clamp):
    """sum_j exp(z_j - m) over a block (stored in er with ``keep_exp``); with
    ``clamp`` the exponent is capped at 88 (a lazy block against a reference
    max below the block's own: a large sum shows it)."""
    s = m - m
    top = as_acc(88.0, m)
    if keep_exp:
        for j in range(src.shape[0]):
            d = load(src[j]) - m
            e = exp(d if (not clamp or d < top) else top)
            er[j] = e
            s += e
    else:
        for j in range(src.shape[0]):
            d = load(src[j]) - m
            s += exp(d if (not clamp or d < top) else top)
    return s


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _row_stats(xr, qr, w, tf, k, zr, tr, keep_exp, shifts):
    """One sweep over a row and its targets: (shift, s, c, U, sum u (z - c), sum q)
    (sum q is NaN when an entry is negative). ``shift`` is the reference max (0 for an all -inf row), ``s =
    sum_j exp(z_j - shift)``. With ``keep_exp`` the exps go to ``zr`` (relative
    to ``shifts[b]`` in block b). ``tf``: the
    ``Transform``; ``k``: the ``SoftConstants``."""
    mode, scale, cap = tf
    has_w, keep, spread = k.has_w, k.keep, k.spread
    zero = scale - scale
    n = xr.shape[0]
    m = as_acc(-np.inf, scale)
    s = zero
    c = zero
    sq = zero
    su = zero
    suz = zero
    mb = m
    for b in range((n + ROW_BLOCK - 1) // ROW_BLOCK):
        lo = b * ROW_BLOCK
        hi = min(n, lo + ROW_BLOCK)
        wb = w[lo:hi] if has_w else w
        qb = qr[lo:hi]
        eb = zr[lo:hi]
        if mode == PLAIN:
            # Raw logits: after the first block, the exps are taken against the
            # running reference max without the block's own max pass, and
            # redone against the block's max only when their sum passes
            # LAZY_SUM_LIMIT (a value far above the reference, +inf or NaN).
            # The target sums do not depend on the max: kept either way.
            src = xr[lo:hi]
            lazy = b > 0 and m != -np.inf
            if not lazy:
                mb = row_max(src)
                if b == 0:
                    c = zero if mb == -np.inf else mb
                m, s = _rescale(m, s, mb)
            shift = zero if m == -np.inf else m
            sb, bq, bu, buz = _block_all(src, qb, wb, has_w, keep, spread, c, eb, shift, keep_exp,
                                         lazy, zero)
            if lazy and not sb <= as_acc(LAZY_SUM_LIMIT, zero):
                m, s = _rescale(m, s, row_max(src))
                sb = _exps(src, eb, m, keep_exp, False)
            s += sb
        else:
            mb = row_transform(xr[lo:hi], eb, tr[lo:hi], mode, scale, cap)
            if b == 0:
                c = zero if mb == -np.inf else mb
            m, s = _rescale(m, s, mb)
            shift = zero if m == -np.inf else m
            sb, bq, bu, buz = _block_all(eb, qb, wb, has_w, keep, spread, c, eb, shift, keep_exp,
                                         False, zero)
            s += sb
        sq += bq
        su += bu
        suz += buz
        if keep_exp:
            shifts[b] = m
    return (zero if m == -np.inf else m), s, c, su, suz, sq


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _row_loss(shift, s, c, su, suz):
    """(ce_i, lse_i) from the row statistics, formed in float64."""
    lse = np.float64(shift) + math.log(np.float64(s))
    ce = np.float64(su) * (lse - np.float64(c)) - np.float64(suz)
    return ce, lse


@njit(fastmath=_FM, _nrt=False)
def _forward_rows(x, q, w, tf, k, zr, tr, lo, hi, loss, lse, qsum):
    """Rows [lo, hi) of the forward pass: ``loss[i]`` (without z-loss), ``lse[i]``
    and ``qsum[i]`` (see the module docstring)."""
    for i in range(lo, hi):
        shift, s, c, su, suz, sq = _row_stats(x[i], q[i], w, tf, k, zr, tr, False, zr[:0])
        ce, l = _row_loss(shift, s, c, su, suz)
        loss[i] = as_acc(ce, s)
        lse[i] = as_acc(l, s)
        qsum[i] = sq


@njit(parallel=True, cache=True, fastmath=_FM)
def soft_forward(x, q, w, tf, k, scratch, loss, lse, qsum):
    """Per-row ``loss[i]`` (without z-loss), ``lse[i]`` and target sums
    ``qsum[i]``, in parallel over ``scratch.shifts.shape[0]`` tasks."""
    n = x.shape[0]
    zbuf, tbuf = scratch.z, scratch.t
    ntask = scratch.shifts.shape[0]
    for task in prange(ntask):
        lo, hi = task_rows(ntask, n, task)
        _forward_rows(x, q, w, tf, k, zbuf[task], tbuf[task], lo, hi, loss, lse, qsum)


@njit(cache=True, fastmath=_FM, _nrt=False)
def soft_serial_forward(x, q, w, tf, k, scratch, loss, lse, qsum):
    """:func:`soft_forward` on the calling thread (small calls; task 0's scratch)."""
    _forward_rows(x, q, w, tf, k, scratch.z[0], scratch.t[0], 0, x.shape[0], loss, lse, qsum)


# Compiled without fast-math flags so every path (serial, parallel) rounds
# the row's coefficient the same way (see fastloss.cpu.cross_entropy).
@njit(error_model="numpy")
def _grad_coefficient(g, gzi, su, zl, l, s):
    """A of the row's gradient (module docstring), in the accumulation type."""
    return as_acc((g * su + gzi * 2 * zl * l) / s, s)


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _grad_block(er, qb, wb, has_w, keep, spread, tr, mode, scale, a, g, orow):
    """orow[j] = (a e_j - g u_j) dz_j/dx_j, with u_j = w_j (keep q_j + spread)
    recomputed from the block's targets (still in cache)."""
    one = scale - scale + 1
    if mode == SOFTCAP:
        if has_w:
            for j in range(er.shape[0]):
                u = wb[j] * (keep * as_acc(load(qb[j]), a) + spread)
                store(orow, j, (a * er[j] - g * u) * (scale * (one - tr[j] * tr[j])))
        else:
            for j in range(er.shape[0]):
                u = keep * as_acc(load(qb[j]), a) + spread
                store(orow, j, (a * er[j] - g * u) * (scale * (one - tr[j] * tr[j])))
    else:
        a = a * scale
        g = g * scale
        if has_w:
            for j in range(er.shape[0]):
                u = wb[j] * (keep * as_acc(load(qb[j]), a) + spread)
                store(orow, j, a * er[j] - g * u)
        else:
            for j in range(er.shape[0]):
                u = keep * as_acc(load(qb[j]), a) + spread
                store(orow, j, a * er[j] - g * u)


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _fused_row(xr, qr, w, tf, k, g, gzi, orow, er, tr, shifts, xn, qn, ahead):
    """(ce_i, lse_i, qsum_i) of one row, and its gradient into ``orow`` (which may
    be ``xr``: the row is fully read first). With ``ahead``, the gradient pass
    prefetches the next row's logits ``xn`` and targets ``qn`` block by block
    (half-precision logits, as ``fastloss.cpu.cross_entropy`` does), so memory
    stays busy while this row is computed from cache."""
    nclass = xr.shape[0]
    mode, scale, cap = tf
    zl = k.zl
    shift, s, c, su, suz, sq = _row_stats(xr, qr, w, tf, k, er, tr, True, shifts)
    ce, l = _row_loss(shift, s, c, su, suz)
    zero = scale - scale
    if g == 0 and (gzi == 0 or zl == 0):
        for j in range(nclass):
            store(orow, j, zero)  # nothing flows back: zeros, NaN logits included
        return ce, l, sq
    a = _grad_coefficient(g, gzi, su, zl, l, s)
    for b in range((nclass + ROW_BLOCK - 1) // ROW_BLOCK):
        lo = b * ROW_BLOCK
        hi = min(nclass, lo + ROW_BLOCK)
        if ahead:
            for j in range(lo, hi, PREFETCH_STEP):
                prefetch(xn, j)
                prefetch(qn, j)
        ab = a * exp(shifts[b] - shift)  # block b's exps are relative to shifts[b]
        _grad_block(er[lo:hi], qr[lo:hi], w[lo:hi] if k.has_w else w, k.has_w, k.keep, k.spread,
                    tr[lo:hi] if mode == SOFTCAP else tr, mode, scale, ab, g, orow[lo:hi])
    return ce, l, sq


@njit(fastmath=_FM, _nrt=False)
def _fused_rows(x, q, w, tf, k, gce, gz, out, er, tr, shifts, lo, hi, loss, lse, qsum):
    """Rows [lo, hi) of the fused pass (see :func:`soft_fused`)."""
    for i in range(lo, hi):
        ahead = i + 1 < hi and x.itemsize <= PREFETCH_MAX_ITEMSIZE
        nxt = i + 1 if ahead else i
        ce, l, qs = _fused_row(x[i], q[i], w, tf, k, gce[i], gz[i], out[i], er, tr, shifts, x[nxt], q[nxt],
                               ahead)
        loss[i] = as_acc(ce, qs)
        lse[i] = as_acc(l, qs)
        qsum[i] = qs


@njit(parallel=True, cache=True, fastmath=_FM)
def soft_fused(x, q, w, tf, k, gce, gz, out, scratch, loss, lse, qsum):
    """Forward and backward in one sweep per row: ``loss``/``lse``/``qsum`` as in
    :func:`soft_forward` and ``out[i, j] = d(sum_i gce_i ce_i + gz_i zl lse_i**2)/dx_ij``.
    ``out`` may be ``x`` (in place)."""
    n = x.shape[0]
    zbuf, tbuf, sbuf = scratch
    ntask = sbuf.shape[0]
    for task in prange(ntask):
        lo, hi = task_rows(ntask, n, task)
        _fused_rows(x, q, w, tf, k, gce, gz, out, zbuf[task], tbuf[task], sbuf[task],
                    lo, hi, loss, lse, qsum)


@njit(cache=True, fastmath=_FM, _nrt=False)
def soft_serial_fused(x, q, w, tf, k, gce, gz, out, scratch, loss, lse, qsum):
    """:func:`soft_fused` on the calling thread (small calls; task 0's scratch)."""
    _fused_rows(x, q, w, tf, k, gce, gz, out, scratch.z[0], scratch.t[0], scratch.shifts[0], 0, x.shape[0],
                loss, lse, qsum)

