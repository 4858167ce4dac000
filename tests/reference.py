"""Slow, obviously-correct float64 references for the fastloss test suite.

Everything here is plain numpy/scipy in float64, written for clarity rather than
speed. Nothing imports fastloss. Gradients are derived analytically (not by
autograd), so they are an independent check on both fastloss and PyTorch.

Cross-entropy (class-index targets), per counted token ``i`` with target ``t``,
transformed logits ``z`` (see :func:`transform`), ``lse = logsumexp(z)``,
``lp = z - lse``, ``p = softmax(z)``, class weights ``w`` (all ones without
``weight``), ``W = sum_j w_j``, smoothing ``eps`` over ``V`` classes::

    ce_i  = (1 - eps) * w_t * (-lp_t) + (eps / V) * sum_j w_j * (-lp_j)
    zl_i  = z_loss * lse**2                      (never class-weighted)

    mean: sum_i ce_i / D + sum_i zl_i / count    D = sum_i w_{t_i} (count without weight)
          (with ``normalizer`` both terms divide by ``normalizer`` instead;
           a term whose denominator is 0 is 0, so an all-ignored or empty batch
           gives 0.0 and a zero gradient -- fastloss differs from torch's NaN here)
    sum:  sum_i (ce_i + zl_i)
    none: ce_i + zl_i per token, 0 at ignored tokens

    d ce_i / d z_k = (1 - eps) * w_t * (p_k - [k == t]) + (eps / V) * (W * p_k - w_k)
                     (p_t - 1 evaluated as -sum_{j != t} p_j, and 1 - tanh**2 as
                      sech**2, so tiny gradients keep their relative accuracy)
    d zl_i / d z_k = 2 * z_loss * lse * p_k
    d z_k / d x_k  = logit_scale * (1 - tanh(logit_scale * x_k / softcap)**2)   (softcap)
                   = logit_scale                                                (no softcap)
    and a logit of -inf stays -inf (with derivative 0 under softcap).
"""

from __future__ import annotations

import numpy as np
import scipy.special

__all__ = [
    "to_float64",
    "transform",
    "lse_reference",
    "ce_reference",
    "mse_reference",
    "soft_ce_reference",
]


def to_float64(a):
    """Return ``a`` (numpy array of any float dtype incl. ml_dtypes.bfloat16,
    a torch tensor, a Python scalar, a list) as a float64 numpy array."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch tensor
        return a.detach().cpu().to(dtype=__import__("torch").float64).numpy()
    arr = np.asarray(a)
    return arr.astype(np.float64)


def _transform_with_derivative(x, softcap=None, logit_scale=1.0):
    """Return (z, dz/dx) in float64 for logits x (any float dtype)."""
    x = to_float64(x)
    neginf = np.isneginf(x)
    with np.errstate(invalid="ignore", over="ignore"):
        z = float(logit_scale) * x
        if softcap is not None:
            c = float(softcap)
            u = z / c
            z = c * np.tanh(u)
            # 1 - tanh(u)**2 written as sech(u)**2: no cancellation when |u| is large
            dz = float(logit_scale) / np.cosh(u) ** 2
        else:
            dz = np.full(x.shape, float(logit_scale))
    z = np.where(neginf, -np.inf, z)
    if softcap is not None:
        dz = np.where(neginf, 0.0, dz)
    return z, dz


def transform(x, softcap=None, logit_scale=1.0):
    """The contract's logit transform, in float64: ``z = logit_scale * x`` then
    ``z = softcap * tanh(z / softcap)`` if softcap is set; -inf stays -inf."""
    return _transform_with_derivative(x, softcap, logit_scale)[0]


def lse_reference(logits, softcap=None, logit_scale=1.0):
    """float64 logsumexp over the last axis of the transformed logits."""
    z = transform(logits, softcap, logit_scale)
    if z.shape[-1] == 0:
        return np.full(z.shape[:-1], -np.inf)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return np.asarray(scipy.special.logsumexp(z, axis=-1), dtype=np.float64)


def ce_reference(
    logits,
    targets,
    *,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    logit_scale=1.0,
    normalizer=None,
    grad_output=None,
):
    """float64 cross-entropy and its gradient; see the module docstring.

    Returns ``(loss, grad)``: loss is a Python float for mean/sum, a float64
    array of ``targets.shape`` for none; grad is a float64 array of
    ``logits.shape`` equal to d(grad_output * loss)/d(logits).
    Targets outside [0, V) that are not ``ignore_index`` raise ValueError.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"bad reduction {reduction!r}")
    z_all, dz_all = _transform_with_derivative(logits, softcap, logit_scale)
    shape = z_all.shape
    V = shape[-1]
    tshape = shape[:-1]
    t_all = np.asarray(targets).astype(np.int64).reshape(-1)
    if np.asarray(targets).shape != tshape:
        raise ValueError("targets shape does not match logits.shape[:-1]")
    z2 = z_all.reshape(-1, V)
    dz2 = dz_all.reshape(-1, V)
    N = z2.shape[0]

    w = np.ones(V) if weight is None else to_float64(weight).reshape(V)
    W = float(w.sum())
    eps = float(label_smoothing)
    zl = float(z_loss)

    counted = t_all != ignore_index
    bad = counted & ((t_all < 0) | (t_all >= V))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} targets out of range")
    rows = np.nonzero(counted)[0]
    count = len(rows)

    # Per-token pieces, counted rows only (ignored rows are never touched,
    # so NaN in an ignored row cannot leak anywhere).
    z = z2[rows]
    t = t_all[rows]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if count and V:
            lse = scipy.special.logsumexp(z, axis=-1)
        else:
            lse = np.zeros(count)
        lp = z - lse[:, None]
        p = np.exp(lp)
        wt = w[t]
        nll = -lp[np.arange(count), t] if count else np.zeros(0)
        # w_j * (-lp_j) with the convention 0 * inf = 0 is NOT used: torch
        # gives inf/NaN there too, so plain arithmetic it is.
        smooth = (-(lp * w[None, :])).sum(axis=-1) if count else np.zeros(0)
        ce = (1.0 - eps) * wt * nll
        if eps != 0.0:  # skip for eps=0 so a -inf logit cannot give 0*inf
            ce = ce + (eps / V) * smooth
        zterm = zl * lse * lse

    # Reduction and per-token coefficients of d ce_i and d zl_i.
    if reduction == "mean":
        g = 1.0 if grad_output is None else float(np.asarray(grad_output, dtype=np.float64))
        if normalizer is not None:
            d_ce = d_z = float(normalizer)
        else:
            d_ce = float(wt.sum()) if weight is not None else float(count)
            d_z = float(count)
        with np.errstate(invalid="ignore"):
            ce_part = ce.sum() / d_ce if d_ce != 0 else 0.0
            z_part = zterm.sum() / d_z if (d_z != 0 and zl != 0.0) else 0.0
        loss = float(ce_part + z_part)
        c_ce = np.full(count, g / d_ce if d_ce != 0 else 0.0)
        c_z = np.full(count, g / d_z if d_z != 0 else 0.0)
    elif reduction == "sum":
        g = 1.0 if grad_output is None else float(np.asarray(grad_output, dtype=np.float64))
        loss = float(ce.sum() + (zterm.sum() if zl != 0.0 else 0.0))
        c_ce = c_z = np.full(count, g)
    else:
        per = ce + (zterm if zl != 0.0 else 0.0)
        out = np.zeros(N)
        out[rows] = per
        loss = out.reshape(tshape)
        if grad_output is None:
            gfull = np.ones(N)
        else:
            gfull = np.broadcast_to(np.asarray(grad_output, dtype=np.float64), tshape).reshape(-1)
        c_ce = c_z = gfull[rows]

    grad2 = np.zeros((N, V))
    if count and V:
        with np.errstate(invalid="ignore", over="ignore"):
            # p_t - 1 written as -(sum of the other p_j): no cancellation when p_t ~ 1
            p_others = p.copy()
            p_others[np.arange(count), t] = 0.0
            gz = (1.0 - eps) * wt[:, None] * p
            gz[np.arange(count), t] = -(1.0 - eps) * wt * p_others.sum(axis=-1)
            if eps != 0.0:
                gz += (eps / V) * (W * p - w[None, :])
            gz *= c_ce[:, None]
            if zl != 0.0:
                gz += (c_z * 2.0 * zl * lse)[:, None] * p
            grad2[rows] = gz * dz2[rows]
    return loss, grad2.reshape(shape)


def mse_reference(pred, target, *, reduction="mean", weight=None, grad_output=None):
    """float64 (optionally weighted) mean squared error and d(grad_output*loss)/d(pred).

    ``d = pred - target``; with ``w`` (ones without weight, broadcast to pred.shape):
    none = w*d**2, sum = sum(w*d**2), mean = sum(w*d**2) / sum(w) (= / pred.size
    without weight). grad = 2*w*d*grad_output, divided by the mean's denominator
    for mean. A mean whose denominator is 0 (empty input, or all weights 0)
    returns 0.0 and a zero gradient.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"bad reduction {reduction!r}")
    x = to_float64(pred)
    y = to_float64(target)
    if x.shape != y.shape:
        raise ValueError("pred and target shapes differ")
    d = x - y
    w = np.ones(x.shape) if weight is None else np.broadcast_to(to_float64(weight), x.shape)
    if reduction == "none":
        g = (
            np.ones(x.shape)
            if grad_output is None
            else np.broadcast_to(np.asarray(grad_output, dtype=np.float64), x.shape)
        )
        return w * d * d, 2.0 * w * d * g
    g = 1.0 if grad_output is None else float(np.asarray(grad_output, dtype=np.float64))
    if reduction == "sum":
        return float((w * d * d).sum()), 2.0 * w * d * g
    den = float(w.sum())
    if den == 0.0:
        return 0.0, np.zeros(x.shape)
    return float((w * d * d).sum() / den), 2.0 * w * d * g / den


def soft_ce_reference(
    logits,
    targets,
    *,
    weight=None,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    logit_scale=1.0,
    normalizer=None,
    grad_output=None,
):
    """float64 cross-entropy with probability targets ``q`` (logits' shape) and
    its analytic gradient.

    Per row, with ``z = transform(x)``, ``lse = logsumexp(z)``, ``p = softmax(z)``,
    ``u_j = w_j ((1 - eps) q_j + eps / V)`` and ``U = sum_j u_j``::

        ce_i = sum_j u_j (lse - z_j)       (a term with u_j = 0 is 0, even at z_j = -inf)
        zl_i = z_loss * lse**2
        mean: (sum_i ce_i + sum_i zl_i) / N   (N rows; ``normalizer`` replaces N;
                                               N = 0 gives 0.0)
        d ce_i / d z_k = U p_k - u_k,   d zl_i / d z_k = 2 z_loss lse p_k

    Returns ``(loss, grad)`` as :func:`ce_reference`. No check of ``q``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"bad reduction {reduction!r}")
    z_all, dz_all = _transform_with_derivative(logits, softcap, logit_scale)
    shape = z_all.shape
    V = shape[-1]
    q = to_float64(targets)
    if q.shape != shape:
        raise ValueError("targets shape does not match logits.shape")
    z = z_all.reshape(-1, V)
    dz = dz_all.reshape(-1, V)
    q = q.reshape(-1, V)
    N = z.shape[0]
    w = np.ones(V) if weight is None else to_float64(weight).reshape(V)
    eps = float(label_smoothing)
    zl = float(z_loss)
    u = w[None, :] * ((1.0 - eps) * q + eps / V)
    U = u.sum(axis=-1)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        lse = scipy.special.logsumexp(z, axis=-1) if N else np.zeros(0)
        d = lse[:, None] - z
        terms = np.where(u == 0.0, 0.0, u * d)
        ce = terms.sum(axis=-1)
        p = np.exp(z - lse[:, None])
        zterm = zl * lse * lse
    if reduction == "none":
        loss = (ce + (zterm if zl != 0.0 else 0.0)).reshape(shape[:-1])
        g = np.ones(N) if grad_output is None else np.broadcast_to(
            np.asarray(grad_output, dtype=np.float64), shape[:-1]).reshape(-1)
        c_ce = c_z = g
    else:
        g = 1.0 if grad_output is None else float(np.asarray(grad_output, dtype=np.float64))
        total = ce.sum() + (zterm.sum() if zl != 0.0 else 0.0)
        if reduction == "sum":
            loss = float(total)
            c_ce = c_z = np.full(N, g)
        else:
            den = float(normalizer) if normalizer is not None else float(N)
            loss = float(total / den) if den != 0 else 0.0
            c_ce = c_z = np.full(N, g / den if den != 0 else 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        gz = c_ce[:, None] * (U[:, None] * p - u)
        if zl != 0.0:
            gz = gz + (c_z * 2.0 * zl * lse)[:, None] * p
        grad = gz * dz
    return loss, grad.reshape(shape)
