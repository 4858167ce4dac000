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
``scale (1 - tanh^2)`` under softcap.

Statistics accumulate in float32 (float64 for float64 logits); half-precision
inputs arrive as integer views and are converted in registers (``_math.load``).
A row's exponentials are kept in a per-task float32 scratch row (it stays in
L2), so each element needs one exp and the logits are read from memory once.
"""

import math

import numpy as np
from numba import njit, prange

from .. import config
from ._math import _exp, _tanh, as_acc, load, row_max, store

_FM = config.FASTMATH

#: Logit transform modes (chosen once per call, so each loop stays branch-free).
PLAIN, SCALED, SOFTCAP = 0, 1, 2


@njit(fastmath=_FM)
def _row_transform(xr, zr, tr, mode, scale, cap):
    """zr[j] = transform(x[j]); under softcap tr[j] = tanh(scale x_j / cap). Returns max_j z_j."""
    n = xr.shape[0]
    if mode == SCALED:
        for j in range(n):
            zr[j] = scale * load(xr[j])
    else:
        inv = scale / cap
        for j in range(n):
            v = load(xr[j])
            t = _tanh(inv * v)
            tr[j] = t
            # -inf is a mask and stays -inf (cap * tanh would give -cap).
            zr[j] = v if v == -np.inf else cap * t
    return row_max(zr)


@njit(fastmath=_FM)
def _row_exp_sum(zr, m):
    """sum_j exp(z_j - m), reading z in the row's storage type."""
    s = m - m  # a zero of the accumulation type
    for j in range(zr.shape[0]):
        s += _exp(load(zr[j]) - m)
    return s


@njit(fastmath=_FM)
def _row_exp_store(zr, er, m):
    """er[j] = exp(z_j - m) (er may alias zr); returns their sum."""
    s = m - m
    for j in range(zr.shape[0]):
        e = _exp(load(zr[j]) - m)
        er[j] = e
        s += e
    return s


@njit(fastmath=_FM)
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


@njit(fastmath=_FM)
def _row_stats(xr, t, w, has_w, mode, scale, cap, eps, zr, tr, er, keep_exp):
    """Softmax statistics of one row: (shift, s, z_t, smooth_sum).

    ``shift`` is the row max (0 for an all -inf row, so the exps are 0, not
    NaN). With ``keep_exp`` the exponentials are stored in ``er``. In PLAIN
    mode the logits are read directly; otherwise z is staged in ``zr``.
    """
    zero = scale - scale
    smooth = zero
    if mode == PLAIN:
        m = row_max(xr)
        zt = load(xr[t])
        shift = zero if m == -np.inf else m
        if eps > zero:
            smooth = _row_smooth_sum(xr, w, has_w, zero)
        if keep_exp:
            s = _row_exp_store(xr, er, shift)
        else:
            s = _row_exp_sum(xr, shift)
    else:
        m = _row_transform(xr, zr, tr, mode, scale, cap)
        zt = zr[t]
        shift = zero if m == -np.inf else m
        if eps > zero:
            smooth = _row_smooth_sum(zr, w, has_w, zero)
        if keep_exp:
            s = _row_exp_store(zr, er, shift)
        else:
            s = _row_exp_sum(zr, shift)
    return shift, s, zt, smooth


@njit(fastmath=_FM)
def _row_loss(shift, s, zt, smooth, wt, wsum, eps, nclass):
    """(ce_i, lse_i) from the row statistics; the smoothing term only when eps > 0
    (so a -inf logit does not turn 0 * inf into NaN)."""
    lse = shift + math.log(s)
    ce = (1 - eps) * wt * (lse - zt)
    if eps > 0:
        ce += eps / nclass * (wsum * lse - smooth)
    return ce, lse


@njit(fastmath=_FM)
def _task_rows(ntask, n, task):
    """Rows [lo, hi) of task ``task`` when n rows are split evenly over ntask tasks."""
    return task * n // ntask, (task + 1) * n // ntask


@njit(fastmath=_FM)
def _row_grad(er, tr, w, has_w, mode, scale, a, c, orow):
    """orow[j] = (a e_j - c w_j) dz_j/dx_j."""
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
            for j in range(n):
                store(orow, j, a * er[j] - c)


@njit(parallel=True, cache=True, fastmath=_FM)
def ce_forward(x, tgt, w, has_w, wsum, mode, scale, cap, eps, zbuf, tbuf, loss, lse):
    """Per-row cross-entropy ``loss[i]`` (weighted, smoothed, without z-loss) and
    ``lse[i]``; both 0 for ignored rows (``tgt[i] < 0``).

    ``zbuf``/``tbuf`` are per-task scratch rows, (ntask, V) or (ntask, 0) when
    the mode does not need them; the number of tasks is ``zbuf.shape[0]``.
    """
    n, nclass = x.shape
    ntask = zbuf.shape[0]
    for task in prange(ntask):
        lo, hi = _task_rows(ntask, n, task)
        zr = zbuf[task]
        tr = tbuf[task]
        for i in range(lo, hi):
            t = tgt[i]
            if t < 0:
                loss[i] = 0
                lse[i] = 0
                continue
            shift, s, zt, smooth = _row_stats(x[i], t, w, has_w, mode, scale, cap,
                                              eps, zr, tr, zr, False)
            wt = w[t] if has_w else scale - scale + 1
            ce, l = _row_loss(shift, s, zt, smooth, wt, wsum, eps, nclass)
            loss[i] = ce
            lse[i] = l


@njit(parallel=True, cache=True, fastmath=_FM)
def lse_forward(x, mode, scale, cap, zbuf, tbuf, lse):
    """lse[i] = logsumexp_j z_ij for every row."""
    n = x.shape[0]
    ntask = zbuf.shape[0]
    w = zbuf[0, :0]
    for task in prange(ntask):
        lo, hi = _task_rows(ntask, n, task)
        zr = zbuf[task]
        tr = tbuf[task]
        for i in range(lo, hi):
            shift, s, zt, smooth = _row_stats(x[i], 0, w, False, mode, scale, cap,
                                              scale - scale, zr, tr, zr, False)
            lse[i] = shift + math.log(s)


@njit(parallel=True, cache=True, fastmath=_FM)
def ce_fused(x, tgt, w, has_w, wsum, mode, scale, cap, eps, zl, gce, gz,
             out, zbuf, tbuf, loss, lse):
    """Forward and backward in one sweep per row: ``loss``/``lse`` as in
    :func:`ce_forward` and ``out[i, j] = d(sum_i gce_i ce_i + gz_i zl lse_i**2)/dx_ij``.

    ``out`` may be ``x`` itself (in place): each row is fully read before it
    is written. ``zbuf`` is always (ntask, V); ``tbuf`` is (ntask, V) under
    softcap, else (ntask, 0).
    """
    n, nclass = x.shape
    ntask = zbuf.shape[0]
    one = scale - scale + 1
    for task in prange(ntask):
        lo, hi = _task_rows(ntask, n, task)
        er = zbuf[task]
        tr = tbuf[task]
        for i in range(lo, hi):
            t = tgt[i]
            orow = out[i]
            if t < 0:
                loss[i] = 0
                lse[i] = 0
                for j in range(nclass):
                    store(orow, j, one - one)
                continue
            shift, s, zt, smooth = _row_stats(x[i], t, w, has_w, mode, scale, cap,
                                              eps, er, tr, er, True)
            wt = w[t] if has_w else one
            ce, l = _row_loss(shift, s, zt, smooth, wt, wsum, eps, nclass)
            loss[i] = ce
            lse[i] = l
            g = gce[i]
            a = as_acc((g * ((1 - eps) * wt + eps * wsum / nclass) + gz[i] * 2 * zl * l) / s, one)
            c = as_acc(g * eps / nclass, one)
            _row_grad(er, tr, w, has_w, mode, scale, a, c, orow)
            # The target's extra -gce (1 - eps) w_t term, rounded once with the rest.
            d = scale * (one - tr[t] * tr[t]) if mode == SOFTCAP else scale
            wj = w[t] if has_w else one
            store(orow, t, (a * er[t] - c * wj - g * (1 - eps) * wt) * d)
