"""CPU kernels for softmax cross-entropy with class-index targets.

Layers: per-row inner functions (``_row_*``), then the parallel drivers
``ce_forward``, ``ce_fused`` and ``lse_forward`` that the public API in
``fastloss.ops.cross_entropy`` calls with validated, C-contiguous 2-D inputs.

Per row ``i`` with transformed logits ``z`` (``z = scale * x``, then
``z = cap * tanh(z / cap)`` when softcapping; ``-inf`` stays ``-inf``):

    m    = max_j z_j
    s    = sum_j exp(z_j - m)
    lse  = m + log(s)
    ce_i = (1 - eps) w_t (lse - z_t) + (eps / V) (W lse - sum_j w_j z_j)

with ``t`` the target, ``w`` the class weights (all 1 without weights) and
``W = sum_j w_j``. The fused kernel also writes, in one pass over the row,

    dL/dx_j = [A e_j - C w_j - [j == t] gce (1 - eps) w_t] * dz_j/dx_j
    A = (gce ((1 - eps) w_t + eps W / V) + gz 2 zl lse) / s,   C = gce eps / V

where ``e_j = exp(z_j - m)``, ``gce``/``gz`` are the per-row upstream
coefficients of the cross-entropy and z-loss terms (already divided by the
reduction's denominator; 0 for ignored rows) and ``dz/dx`` is ``scale``, or
``scale (1 - tanh^2)`` under softcap. A row to which nothing flows back
(``gce = 0`` and ``gz zl = 0``) gets a zero gradient, NaN logits included.

Statistics accumulate in float32 (float64 for float64 logits); half-precision
inputs arrive as integer views and are converted in registers (``_math.load``).

One sweep per row (``_row_stats``): the row is walked in blocks of
``ROW_BLOCK`` elements; a block's max is taken while it sits in L1, the
running sum is rescaled once per block when the max grows, and the block's
``exp(z - running max)`` are summed (and, in the fused kernel, kept in a
per-task scratch row with the block's running max in ``shifts``). The fused
kernel's gradient pass then reads the scratch row (in L2) and rescales block
``b`` by ``exp(shifts[b] - m)``. Each element needs one exp and the logits are
read from memory once; against an earlier three-sweep version (max, exp,
gradient) this was 25-45% faster (benchmarks/NOTES.md).

Raw logits skip the per-block max pass after the first block
(``_block_update_lazy``): a block's exps are taken against the running
reference max and accepted unless their sum passes ``LAZY_SUM_LIMIT``, in
which case the block is redone against its own max. ``m`` below is then that
reference (at most ~21 below the true max), which changes nothing in the
formulas; ``lse`` is formed in float64. In the fused kernel, each block of
the next half-precision row is prefetched during the gradient pass
(``PREFETCH_MAX_ITEMSIZE``); the forward kernels do not prefetch
(``FORWARD_PREFETCH_MAX_ITEMSIZE``).

A large ``out=`` buffer of float32/float64 is written with streaming stores
(``gblocks``, ``_math.stream_copy``): each gradient block is formed in a
per-task buffer in L1 and copied to ``out`` in non-temporal 64-byte lines,
which are not read from memory first (``config.STREAM_STORE_MIN_BYTES``).
"""

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .. import _compile, config
from ..codes import PLAIN, SCALED, SOFTCAP
from ..options import Transform
from ._math import (HAS_STREAM_STORES, as_acc, exp, load, prefetch, row_max, store, store_affine, store_fence,
                    stream_copy, tanh)
from ._rows import (LAZY_SUM_LIMIT, ROW_BLOCK, inline_into, n_row_blocks, row_transform, task_rows,
                    task_scratch)

_compile.install()  # the one-line notice before a cold compile

_FM = config.FASTMATH

# The row plumbing of ``_rows`` is re-exported for the host code and the other row kernels.
__all__ = ["CEConstants", "CEScratch", "FORWARD_PREFETCH_MAX_ITEMSIZE", "HAS_STREAM_STORES", "LAZY_SUM_LIMIT",
           "PREFETCH_MAX_ITEMSIZE", "PREFETCH_STEP", "ROW_BLOCK", "ce_forward", "ce_fused", "ce_serial_forward",
           "ce_serial_fused", "lse_forward", "n_row_blocks", "task_rows", "task_scratch"]


class CEConstants(NamedTuple):
    """Per-call scalars of the cross-entropy kernels (accumulation type):
    whether class weights are given, their sum ``W`` (V without weights),
    label smoothing ``eps`` and the z-loss coefficient ``zl``. The logit
    transform travels beside them as a ``fastloss.options.Transform``."""

    has_w: bool
    wsum: float
    eps: float
    zl: float


class CEScratch(NamedTuple):
    """Per-task scratch rows of the kernels: ``z`` (transformed logits, or the
    fused kernel's exps), ``t`` (tanh values under softcap) and ``shifts``
    (the fused kernel's per-block running max); each (ntask, >= V), (ntask,
    >= n_row_blocks(V)) or (ntask, 0) where the kernel does not need it (rows
    padded by :func:`task_scratch`; kernels use their first V elements). The
    number of tasks is ``z.shape[0]``."""

    z: np.ndarray
    t: np.ndarray
    shifts: np.ndarray


#: Software prefetch of the next row, block by block, in the fused kernel's
#: gradient pass, for logits of at most this itemsize (half precision). Those
#: rows are read at half the bytes per exp, and the kernels were latency-bound
#: at row starts: on a Zen 5 host 4096x32000 bf16 fwd+bwd went 28 -> 20.5 ms.
#: float32 rows already keep memory busy and got slower with it (fwd+bwd 25 ->
#: 34-40 ms).
PREFETCH_MAX_ITEMSIZE = 2

#: The same for the forward kernels (``ce_forward``, ``lse_forward``): 0, no
#: prefetch. Their exp pass has no gradient pass to overlap the fetch with,
#: and on a Zen 4 host the prefetch made 4096x32000 bf16 forward slower
#: (21.8 -> 25.9 ms, same run); on Zen 5 it had gained 8% (11.5 -> 10.6 ms).
FORWARD_PREFETCH_MAX_ITEMSIZE = 0

#: Prefetch stride in elements: every 32-byte half line of a 2-byte row.
PREFETCH_STEP = 16

#: The row functions are inlined into the row-range functions only
#: (``fastloss.cpu._rows.inline_into``).
_in_rows = inline_into("_forward_rows", "_fused_rows")


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _row_exp_sum(zr, m):
    """sum_j exp(z_j - m), reading z in the row's storage type."""
    s = m - m  # a zero of the accumulation type
    for j in range(zr.shape[0]):
        s += exp(load(zr[j]) - m)
    return s


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _row_exp_store(zr, er, m):
    """er[j] = exp(z_j - m) (er may alias zr); returns their sum."""
    s = m - m
    for j in range(zr.shape[0]):
        e = exp(load(zr[j]) - m)
        er[j] = e
        s += e
    return s


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _next_row(x, i, hi, max_itemsize):
    """(row to prefetch, whether to): row i + 1 of the task's rows [.., hi) for
    logits of at most ``max_itemsize`` bytes, else none."""
    ahead = i + 1 < hi and x.itemsize <= max_itemsize
    return (x[i + 1] if ahead else x[i]), ahead


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _prefetch_block(row, lo, hi):
    """Prefetch row[lo:hi], every ``PREFETCH_STEP`` elements."""
    for j in range(lo, hi, PREFETCH_STEP):
        prefetch(row, j)


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _row_exp_lazy(zr, er, m, keep_exp):
    """sum_j exp(min(z_j - m, 88)) (stored in er with keep_exp): the exps of a
    block against a reference ``m`` that may be below the block's max. The
    clamp keeps exp in its valid range, so a block with a value far above
    ``m`` shows up as a large sum (see ``_block_update_lazy``)."""
    s = m - m
    top = as_acc(88.0, m)
    if keep_exp:
        for j in range(zr.shape[0]):
            d = load(zr[j]) - m
            e = exp(d if d < top else top)
            er[j] = e
            s += e
    else:
        for j in range(zr.shape[0]):
            d = load(zr[j]) - m
            s += exp(d if d < top else top)
    return s


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _row_smooth_sum(zr, w, has_w, zero):
    """sum_j w_j z_j (sum_j z_j without weights), for label smoothing."""
    acc = zero
    if has_w:
        for j in range(zr.shape[0]):
            acc += w[j] * load(zr[j])
    else:
        for j in range(zr.shape[0]):
            acc += load(zr[j])
    return acc


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _block_update(src, er, m, s, mb, keep_exp, zero):
    """Fold one block (max ``mb``) into the running (m, s): rescale s when the max
    grows, then add the block's exponentials (stored in ``er`` with
    ``keep_exp``). Returns the new (m, s); the block's exponentials are
    relative to ``m`` (to 0 while every value so far is -inf, so they are 0)."""
    if mb > m:
        if m != -np.inf:
            s = s * exp(m - mb)
        m = mb
    shift = zero if m == -np.inf else m
    if keep_exp:
        s += _row_exp_store(src, er, shift)
    else:
        s += _row_exp_sum(src, shift)
    return m, s


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _block_update_lazy(src, er, m, s, keep_exp, zero):
    """``_block_update`` without the block's own max pass, for raw logits.

    Once a reference max ``m`` is known (after the first block that is not all
    -inf), a block's exps are taken against ``m`` in one pass. If their sum is
    at most ``LAZY_SUM_LIMIT`` every one of them is at most that too, and the
    block is folded in as is (its values are relative to ``m``, recorded in
    ``shifts``); otherwise (some value far above ``m``, +inf or NaN) the block
    is redone exactly with its max. This saves the max pass (a reload, the
    half-precision decode and the ordered-bits max) on nearly every block.
    """
    if m != -np.inf:
        sb = _row_exp_lazy(src, er, m, keep_exp)
        if sb <= as_acc(LAZY_SUM_LIMIT, zero):
            return m, s + sb
    return _block_update(src, er, m, s, row_max(src), keep_exp, zero)


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _z_scalar(v, mode, scale, cap):
    """The logit transform of one value (as ``_rows.row_transform``)."""
    if mode == PLAIN:
        return v
    if mode == SCALED:
        return scale * v
    return v if v == -np.inf else cap * tanh(scale / cap * v)


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _row_stats(xr, t, w, tf, k, zr, tr, er, keep_exp, shifts, nxt, ahead):
    """Softmax statistics of one row in ONE sweep over memory: (m, s, z_t, smooth_sum).

    The row is walked in blocks of ``ROW_BLOCK`` elements: each block's max is
    taken while it sits in L1, the running sum is rescaled when the max grows
    (one scalar exp per block), and the block's exponentials are added (and,
    with ``keep_exp``, stored in ``er`` relative to the running max, which is
    recorded in ``shifts[b]`` so the gradient pass can rescale them by
    ``exp(shifts[b] - m)``). ``m`` is the reference max (the row max, or in
    PLAIN mode possibly a value a little below it, see ``_block_update_lazy``),
    ``s = sum_j exp(z_j - m)`` (``m`` is replaced by 0 for an all -inf row, so
    the exps are 0, not NaN). In PLAIN mode the logits are read directly;
    otherwise z is staged in ``zr``. With ``ahead``, each block of the next
    row ``nxt`` is prefetched. ``tf``: the ``Transform``; ``k``: the
    ``CEConstants``.
    """
    mode, scale, cap = tf
    has_w, eps = k.has_w, k.eps
    zero = scale - scale
    smooth = zero
    n = xr.shape[0]
    m = as_acc(-np.inf, scale)
    s = zero
    zt = _z_scalar(load(xr[t]), mode, scale, cap)
    if mode == PLAIN and n <= ROW_BLOCK:
        # One block of raw logits (the loop below, unrolled for short rows,
        # whose cost is mostly per row): the same operations in the same order.
        if ahead:
            _prefetch_block(nxt, 0, n)
        if eps > zero:
            smooth = _row_smooth_sum(xr, w, has_w, zero)
        m, s = _block_update(xr, er, m, s, row_max(xr), keep_exp, zero)
        if keep_exp:
            shifts[0] = m
        return (zero if m == -np.inf else m), s, zt, smooth
    for b in range((n + ROW_BLOCK - 1) // ROW_BLOCK):
        lo = b * ROW_BLOCK
        hi = min(n, lo + ROW_BLOCK)
        wb = w[lo:hi] if has_w else w
        if ahead:
            _prefetch_block(nxt, lo, hi)
        if mode == PLAIN:
            src = xr[lo:hi]
            if eps > zero:
                smooth += _row_smooth_sum(src, wb, has_w, zero)
            m, s = _block_update_lazy(src, er[lo:hi], m, s, keep_exp, zero)
        else:
            zb = zr[lo:hi]
            mb = row_transform(xr[lo:hi], zb, tr[lo:hi], mode, scale, cap)
            if eps > zero:
                smooth += _row_smooth_sum(zb, wb, has_w, zero)
            m, s = _block_update(zb, er[lo:hi], m, s, mb, keep_exp, zero)
        if keep_exp:
            shifts[b] = m
    return (zero if m == -np.inf else m), s, zt, smooth


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _row_lse(shift, s):
    """lse = shift + log(s), formed in float64 (``shift`` may sit ~21 below the max)."""
    return np.float64(shift) + math.log(np.float64(s))


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _row_loss(shift, s, zt, smooth, wt, wsum, eps, nclass):
    """(ce_i, lse_i) from the row statistics; the smoothing term only when eps > 0
    (so a -inf logit does not turn 0 * inf into NaN)."""
    lse = _row_lse(shift, s)
    ce = (1 - eps) * wt * (lse - zt)
    if eps > 0:
        ce += eps / nclass * (wsum * lse - smooth)
    return as_acc(ce, s), as_acc(lse, s)


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _row_grad(er, tr, w, has_w, mode, scale, a, c, finite, orow):
    """orow[j] = (a e_j - c w_j) dz_j/dx_j (``finite``: every e_j, a and c are finite)."""
    n = er.shape[0]
    one = scale - scale + 1
    if mode == SOFTCAP:
        if has_w:
            for j in range(n):
                store(orow, j, (a * er[j] - c * w[j]) * (scale * (one - tr[j] * tr[j])))
        else:
            for j in range(n):
                store(orow, j, (a * er[j] - c) * (scale * (one - tr[j] * tr[j])))
    else:
        a = a * scale
        c = c * scale
        if has_w:
            for j in range(n):
                store(orow, j, a * er[j] - c * w[j])
        else:
            store_affine(orow, er, a, c, finite)


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _forward_row(x, i, hi, t, w, tf, k, zr, tr):
    """(ce_i, lse_i) of counted row ``i`` (target ``t``) of a task whose rows end
    at ``hi``: the statistics, then the loss (weighted, smoothed, without z-loss)."""
    nxt, ahead = _next_row(x, i, hi, FORWARD_PREFETCH_MAX_ITEMSIZE)
    shift, s, zt, smooth = _row_stats(x[i], t, w, tf, k, zr, tr, zr, False, zr[:0], nxt, ahead)
    scale = tf[1]
    wt = w[t] if k.has_w else scale - scale + 1
    return _row_loss(shift, s, zt, smooth, wt, k.wsum, k.eps, x.shape[1])


@njit(fastmath=_FM, _nrt=False)
def _forward_rows(x, tgt, ignore_index, w, tf, k, zr, tr, lo, hi, loss, lse):
    """Rows [lo, hi) of the forward pass: ``loss[i]`` (weighted, smoothed,
    without z-loss) and ``lse[i]``, both 0 for ignored rows (``tgt[i]`` equal
    to ``ignore_index`` or negative). ``zr``/``tr``: the task's scratch rows."""
    zero = tf.scale - tf.scale
    for i in range(lo, hi):
        t = tgt[i]
        if t == ignore_index or t < 0:
            loss[i] = zero
            lse[i] = zero
        else:
            loss[i], lse[i] = _forward_row(x, i, hi, t, w, tf, k, zr, tr)


@njit(parallel=True, cache=True, fastmath=_FM)
def ce_forward(x, tgt, w, tf, k, scratch, loss, lse):
    """Per-row cross-entropy ``loss[i]`` (weighted, smoothed, without z-loss) and
    ``lse[i]``; both 0 for ignored rows (``tgt[i] < 0``).

    ``tf``: the ``Transform``; ``k``: the ``CEConstants``; ``scratch``: a
    ``CEScratch`` whose ``z``/``t`` rows are (ntask, V) or (ntask, 0) when the
    mode does not need them.
    """
    n = x.shape[0]
    zbuf, tbuf = scratch.z, scratch.t
    ntask = zbuf.shape[0]
    for task in prange(ntask):
        lo, hi = task_rows(ntask, n, task)
        _forward_rows(x, tgt, -1, w, tf, k, zbuf[task], tbuf[task], lo, hi, loss, lse)


@njit(parallel=True, cache=True, fastmath=_FM)
def lse_forward(x, tf, scratch, lse):
    """lse[i] = logsumexp_j z_ij for every row (``tf``: the ``Transform``;
    ``scratch``: a ``CEScratch`` as for :func:`ce_forward`)."""
    n = x.shape[0]
    zbuf, tbuf = scratch.z, scratch.t
    ntask = zbuf.shape[0]
    w = zbuf[0, :0]
    zero = tf.scale - tf.scale
    k = CEConstants(False, zero, zero, zero)
    for task in prange(ntask):
        lo, hi = task_rows(ntask, n, task)
        zr = zbuf[task]
        tr = tbuf[task]
        for i in range(lo, hi):
            nxt, ahead = _next_row(x, i, hi, FORWARD_PREFETCH_MAX_ITEMSIZE)
            shift, s, zt, smooth = _row_stats(x[i], 0, w, tf, k, zr, tr, zr, False, zr[:0], nxt, ahead)
            lse[i] = as_acc(_row_lse(shift, s), s)


# The per-row scalars of the gradient are compiled without fast-math flags:
# under ``reassoc``/``arcp`` LLVM may order them differently in each kernel that
# inlines them (serial or parallel), and a row's gradient would then depend on
# the path by an ulp. Exact IEEE order keeps every path bit-identical.
@njit(error_model="numpy")
def _grad_coefficients(g, gzi, wt, wsum, eps, zl, l, s, nclass):
    """(A, C) of the row's gradient (module docstring), in the accumulation type."""
    a = (g * ((1 - eps) * wt + eps * wsum / nclass) + gzi * 2 * zl * l) / s
    return as_acc(a, s), as_acc(g * eps / nclass, s)


@njit(error_model="numpy")
def _target_grad(a, pt, c, wj, g, eps, wt, d):
    """The gradient at the target: the common term and -g (1 - eps) w_t, rounded once."""
    return (a * pt - c * wj - g * (1 - eps) * wt) * d


@njit(fastmath=_FM, _nrt=False, inline=_in_rows)
def _fused_row(x, i, hi, t, w, tf, k, g, gzi, orow, er, tr, shifts, gb):
    """Loss and gradient of row ``i`` of a task whose rows end at ``hi``:
    returns (ce_i, lse_i) and writes ``orow`` (which may be ``x[i]``: the row is
    fully read first). ``t < 0``: an ignored row (zero gradient, zero loss);
    ``g``/``gzi``: the row's upstream coefficients (see :func:`ce_fused`).
    ``gb``: the task's gradient block buffer (storage type, ``ROW_BLOCK``
    long) when the gradient is written with streaming stores, else empty."""
    nclass = x.shape[1]
    mode, scale, cap = tf
    has_w, wsum, eps, zl = k
    one = scale - scale + 1
    if t < 0:
        for j in range(nclass):
            store(orow, j, one - one)
        return one - one, one - one
    shift, s, zt, smooth = _row_stats(x[i], t, w, tf, k, er, tr, er, True, shifts, x[i], False)
    wt = w[t] if has_w else one
    ce, l = _row_loss(shift, s, zt, smooth, wt, wsum, eps, nclass)
    if g == 0 and (gzi == 0 or zl == 0):
        # Nothing flows back to this row (a mean over nothing, e.g. all class
        # weights 0, or a zero upstream gradient): zeros, even where a NaN in
        # the row would make the formula's 0 * NaN a NaN.
        for j in range(nclass):
            store(orow, j, one - one)
        return ce, l
    a, c = _grad_coefficients(g, gzi, wt, wsum, eps, zl, l, s, nclass)
    # The target's extra -gce (1 - eps) w_t term, rounded once with the rest.
    d = scale * (one - tr[t] * tr[t]) if mode == SOFTCAP else scale
    wj = w[t] if has_w else one
    pt = er[t] * exp(shifts[t // ROW_BLOCK] - shift)
    tg = _target_grad(a, pt, c, wj, g, eps, wt, d)
    # A finite sum means every stored exp is finite (each is >= 0 and at most
    # the sum), and each block's factor exp(shifts[b] - shift) is <= 1: with
    # finite coefficients no gradient value is NaN.
    finite = math.isfinite(s) and math.isfinite(a) and math.isfinite(c)
    stream = gb.shape[0] > 0
    nxt, ahead = _next_row(x, i, hi, PREFETCH_MAX_ITEMSIZE)
    for b in range((nclass + ROW_BLOCK - 1) // ROW_BLOCK):
        # Block b's exps are relative to shifts[b]; exp(-inf - shift) = 0
        # for blocks that were all -inf when they were seen.
        blo = b * ROW_BLOCK
        bhi = min(nclass, blo + ROW_BLOCK)
        if ahead:
            # Fetch the next row's block while this one is computed from
            # cache, so memory stays busy between the rows' read sweeps.
            _prefetch_block(nxt, blo, bhi)
        ab = a * exp(shifts[b] - shift)
        trb = tr[blo:bhi] if mode == SOFTCAP else tr
        wb = w[blo:bhi] if has_w else w
        if stream:
            # Into the task's block buffer (in L1), then to memory in
            # streaming stores: no read of the output's lines first.
            gbb = gb[:bhi - blo]
            _row_grad(er[blo:bhi], trb, wb, has_w, mode, scale, ab, c, finite, gbb)
            if blo <= t < bhi:
                store(gbb, t - blo, tg)
            stream_copy(orow[blo:bhi], gbb)
        else:
            _row_grad(er[blo:bhi], trb, wb, has_w, mode, scale, ab, c, finite, orow[blo:bhi])
    if not stream:
        store(orow, t, tg)
    return ce, l


@njit(fastmath=_FM, _nrt=False)
def _fused_rows(x, tgt, ignore_index, w, tf, k, gce, gz, out, er, tr, shifts, gb, lo, hi, loss, lse):
    """Rows [lo, hi) of the fused pass (see :func:`ce_fused`); rows whose
    target equals ``ignore_index`` or is negative are ignored. A non-empty
    ``gb`` streams the gradient to memory (fenced before returning)."""
    for i in range(lo, hi):
        t = tgt[i]
        if t == ignore_index:
            t = -1
        loss[i], lse[i] = _fused_row(x, i, hi, t, w, tf, k, gce[i], gz[i], out[i], er, tr, shifts, gb)
    if gb.shape[0] > 0:
        store_fence()


@njit(parallel=True, cache=True, fastmath=_FM)
def ce_fused(x, tgt, w, tf, k, gce, gz, out, scratch, gblocks, loss, lse):
    """Forward and backward in one sweep per row: ``loss``/``lse`` as in
    :func:`ce_forward` and ``out[i, j] = d(sum_i gce_i ce_i + gz_i zl lse_i**2)/dx_ij``.

    ``out`` may be ``x`` itself (in place): each row is fully read before it
    is written. In ``scratch`` (a ``CEScratch``), ``z`` is always (ntask, V);
    ``t`` is (ntask, V) under softcap, else (ntask, 0); ``shifts`` is (ntask,
    n_row_blocks(V)): the running max each block's stored exponentials are
    relative to. ``gblocks``: (ntask, >= ROW_BLOCK) of ``out``'s storage type
    to write the gradient with streaming stores (``_math.stream_copy``; for a
    large ``out`` that is not ``x``), or (ntask, 0) for plain stores.
    """
    n = x.shape[0]
    zbuf, tbuf, sbuf = scratch
    ntask = zbuf.shape[0]
    for task in prange(ntask):
        lo, hi = task_rows(ntask, n, task)
        gb = gblocks[task, :ROW_BLOCK] if gblocks.shape[1] > 0 else gblocks[task]
        _fused_rows(x, tgt, -1, w, tf, k, gce, gz, out, zbuf[task], tbuf[task], sbuf[task], gb, lo, hi,
                    loss, lse)


@njit
def _ratio(num, den):
    """num / den, 0 for den == 0, correctly rounded (compiled without the
    kernels' ``arcp``, which would multiply by a rounded reciprocal and differ
    from the host's division by an ulp)."""
    return num / den if den != 0 else 0.0


@njit
def _with_zloss(ce, zl, l):
    """ce + zl * l * l rounded as numpy rounds it on arrays (no FMA contraction:
    this function is compiled without fast-math flags)."""
    return ce + zl * l * l


@njit(fastmath=_FM, _nrt=False)
def _serial_targets(tgt, ignore_index, w, has_w, nclass):
    """The serial kernels' target pass: ``(nbad, first_bad, count, target_wsum)``
    (targets outside [0, V) that are not ``ignore_index``, the first one's
    index, the counted rows and their class weights' float64 sum, or their
    number without weights)."""
    nbad = 0
    first = -1
    count = 0
    twsum = 0.0
    for i in range(tgt.shape[0]):
        t = tgt[i]
        if t == ignore_index:
            continue
        if t < 0 or t >= nclass:
            if nbad == 0:
                first = i
            nbad += 1
        else:
            count += 1
            if has_w:
                twsum += np.float64(w[t])
    if not has_w:
        twsum = np.float64(count)
    return nbad, first, count, twsum


@njit(fastmath=_FM, _nrt=False)
def _serial_sums(loss, lse, zl, per_row):
    """(sum ce, sum lse**2) in float64 over the rows; with ``per_row`` (reduction
    "none") each ``loss[i]`` becomes ce + zl lse**2."""
    ce_sum = 0.0
    zz_sum = 0.0
    for i in range(loss.shape[0]):
        ce = loss[i]
        l = lse[i]
        ce_sum += np.float64(ce)
        zz_sum += np.float64(l) * np.float64(l)
        if per_row and zl > 0:
            loss[i] = _with_zloss(ce, zl, l)
    return ce_sum, zz_sum


# The serial kernels run a whole small call (``fastloss.config.SERIAL_MAX_ELEMENTS``
# logits) on the calling thread, where the host-side preparation and a parallel
# launch would cost more than the arithmetic: they check the (int64) targets
# against [0, V) and ``ignore_index`` as given, then run the same row-range
# functions as the parallel kernels over all rows, and sum. Compiled without
# NRT (nothing is allocated here): the caller passes the scratch ``er`` (V, or 0
# for a plain forward), ``tr`` (V under softcap, else 0), ``shifts``
# (``n_row_blocks(V)``) and the (n,) ``loss``/``lse`` rows. Scalars ``wsum``,
# ``scale``, ``cap``, ``eps``, ``zl`` are in the accumulation type; with
# ``per_row`` (reduction "none") ``loss`` ends as ce + zl lse**2 per row.
#
# Both return ``(nbad, first_bad, ce_sum, zz_sum, count, target_wsum)``: on bad
# targets (``nbad > 0``) nothing else is computed; otherwise the float64 sums of
# the rows' ce and lse**2 and the target pass's count and weight sum.

@njit(cache=True, fastmath=_FM, _nrt=False)
def ce_serial_forward(x, tgt, ignore_index, w, has_w, wsum, mode, scale, cap, eps, zl, per_row,
                      er, tr, loss, lse):
    """The forward serial kernel (see above)."""
    n, nclass = x.shape
    nbad, first, count, twsum = _serial_targets(tgt, ignore_index, w, has_w, nclass)
    if nbad > 0:
        return nbad, first, 0.0, 0.0, count, twsum
    _forward_rows(x, tgt, ignore_index, w, Transform(mode, scale, cap), CEConstants(has_w, wsum, eps, zl),
                  er, tr, 0, n, loss, lse)
    ce_sum, zz_sum = _serial_sums(loss, lse, zl, per_row)
    return nbad, first, ce_sum, zz_sum, count, twsum


@njit(cache=True, fastmath=_FM, _nrt=False)
def ce_serial_fused(x, tgt, ignore_index, w, has_w, wsum, mode, scale, cap, eps, zl, per_row,
                    norm, gmode, go, gvec, gce, gz, out, er, tr, shifts, loss, lse):
    """The fused serial kernel (see above): also writes the gradient into ``out``.
    ``gmode``: 1 one upstream gradient ``go`` ("sum", or "none" with a
    scalar), 2 per-row ``gvec`` (float64, "none"), 3 "mean": ``go`` divided
    here by the denominators (``norm`` > 0 replaces both). ``gce``/``gz``:
    (n,) scratch for the per-row coefficients."""
    n, nclass = x.shape
    nbad, first, count, twsum = _serial_targets(tgt, ignore_index, w, has_w, nclass)
    if nbad > 0:
        return nbad, first, 0.0, 0.0, count, twsum
    g_ce = go
    g_z = go
    if gmode == 3:
        g_ce = _ratio(go, norm if norm > 0 else twsum)
        g_z = _ratio(go, norm if norm > 0 else np.float64(count))
    for i in range(n):
        if gmode == 2:
            gce[i] = gvec[i]
            gz[i] = gvec[i]
        else:
            gce[i] = g_ce
            gz[i] = g_z
    _fused_rows(x, tgt, ignore_index, w, Transform(mode, scale, cap), CEConstants(has_w, wsum, eps, zl),
                gce, gz, out, er, tr, shifts, out[0, :0], 0, n, loss, lse)
    ce_sum, zz_sum = _serial_sums(loss, lse, zl, per_row)
    return nbad, first, ce_sum, zz_sum, count, twsum
