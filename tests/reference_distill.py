"""Float64 references for ``fastloss.distill`` / ``distill_with_grad``.

Plain numpy/scipy in float64, written for clarity; nothing imports fastloss.
Gradients are analytic (derived below), so they check fastloss and PyTorch's
autograd independently.

Per token, ``ls = log_softmax(s / T)``, ``lt = log_softmax(t / T)``, ``ps``,
``pt`` their exponentials, and ``sum_j p_j (a_j - b_j)`` with the convention
``0 * anything = 0`` (written ``KL[p; a, b]``)::

    kl          S = KL[pt; lt, ls]                  dS/ds = (ps - pt) / T
    reverse_kl  S = KL[ps; ls, lt]                  dS/ds = ps (d - S) / T,  d = ls - lt
    jsd         m = beta pt + (1 - beta) ps         (0 < beta < 1; 0 -> kl, 1 -> reverse_kl)
                S = beta KL[pt; lt, log m] + (1 - beta) KL[ps; ls, log m]
                dS/ds = (1 - beta) ps (ls - log m - K) / T,   K = KL[ps; ls, log m]
    hard        H = logsumexp(s) - s_target          dH/ds = softmax(s) - onehot(target)

JSD's gradient: ``S = beta sum pt lt + (1 - beta) sum ps ls - sum m log m``, so
``dS/dps_j = (1 - beta) (log ps_j - log m_j)``; through the softmax Jacobian
``ps_j (g_j - sum_k ps_k g_k)``, and ``sum_k ps_k (ls_k - log m_k) = K``.
Reverse KL the same way with ``dS/dps_j = d_j + 1`` (the 1 cancels).

The per-token loss is ``l = soft_weight [T^2] S + hard_weight H`` (a term
with weight 0 left out), 0 at tokens whose target is ``ignore_index``.
Reductions: "none", "sum", "batchmean" (sum / counted tokens), "mean"
(sum / (counted tokens * V)); a zero denominator gives 0.
"""

from __future__ import annotations

import numpy as np
import scipy.special

__all__ = ["to_float64", "topk_to_dense", "per_token", "distill_reference"]


def to_float64(a):
    """``a`` (any float dtype incl. bfloat16, a torch tensor, a list) as float64 numpy."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        return a.detach().cpu().double().numpy()
    return np.asarray(a).astype(np.float64)


def topk_to_dense(indices, logprobs, nclass):
    """Dense teacher logits equal in distribution to a top-k teacher: the
    logprobs at their indices, -inf elsewhere."""
    idx = np.asarray(indices)
    lp = to_float64(logprobs)
    dense = np.full(idx.shape[:-1] + (nclass,), -np.inf)
    np.put_along_axis(dense, idx.astype(np.int64), lp, axis=-1)
    return dense


def _log_softmax(x):
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return scipy.special.log_softmax(x, axis=-1)


def _kl(p, a, b):
    """sum_j p_j (a_j - b_j) with 0 * anything = 0 (NaN p stays NaN)."""
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (a - b), np.where(p == 0, 0.0, p))
    return terms.sum(axis=-1)


def per_token(student, teacher, *, kind="kl", temperature=1.0, beta=0.5):
    """(S, dS/ds) per token: the divergence (shape ``student.shape[:-1]``) and
    its gradient with respect to the raw student logits, float64."""
    s = to_float64(student)
    t = to_float64(teacher)
    T = float(temperature)
    ls = _log_softmax(s / T)
    lt = _log_softmax(t / T)
    with np.errstate(invalid="ignore", over="ignore"):
        ps = np.exp(ls)
        pt = np.exp(lt)
    if kind == "jsd" and beta == 0.0:
        kind = "kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if kind == "kl":
            S = _kl(pt, lt, ls)
            dS = (ps - pt) / T
        elif kind == "reverse_kl":
            S = _kl(ps, ls, lt)
            d = ls - lt
            dS = np.where(ps > 0, ps * (d - S[..., None]), np.where(ps == 0, 0.0, ps)) / T
        else:
            m = beta * pt + (1 - beta) * ps
            lm = np.log(m)
            K = _kl(ps, ls, lm)
            S = beta * _kl(pt, lt, lm) + (1 - beta) * K
            r = ls - lm
            dS = (1 - beta) * np.where(ps > 0, ps * (r - K[..., None]), np.where(ps == 0, 0.0, ps)) / T
    return S, dS


def distill_reference(student, teacher, *, kind="kl", temperature=1.0, beta=0.5, scale_by_t2=False,
                      reduction="batchmean", targets=None, ignore_index=-100, soft_weight=1.0,
                      hard_weight=0.0, grad_output=None):
    """(loss, grad) of ``fastloss.distill_with_grad`` in float64 (grad as float64).
    ``teacher``: dense logits (use :func:`topk_to_dense` for a top-k teacher)."""
    s = to_float64(student)
    nclass = s.shape[-1]
    S, dS = per_token(s, teacher, kind=kind, temperature=temperature, beta=beta)
    scale = soft_weight * (temperature ** 2 if scale_by_t2 else 1.0)
    loss = np.zeros(s.shape[:-1])
    grad = np.zeros(s.shape)
    if soft_weight > 0:
        loss = loss + scale * S
        grad = grad + scale * dS
    if targets is not None:
        tg = np.asarray(targets).astype(np.int64)
        counted = tg != ignore_index
    else:
        tg = None
        counted = np.ones(s.shape[:-1], bool)
    if tg is not None and hard_weight > 0:
        safe = np.where(counted, tg, 0)
        ls_raw = _log_softmax(s)
        H = -np.take_along_axis(ls_raw, safe[..., None], axis=-1)[..., 0]
        onehot = np.zeros(s.shape)
        np.put_along_axis(onehot, safe[..., None], 1.0, axis=-1)
        with np.errstate(invalid="ignore", over="ignore"):
            loss = loss + hard_weight * H
            grad = grad + hard_weight * (np.exp(ls_raw) - onehot)
    loss = np.where(counted, loss, 0.0)
    grad = np.where(counted[..., None], grad, 0.0)
    count = int(counted.sum())
    den = {"batchmean": count, "mean": count * nclass, "sum": 1, "none": 1}[reduction]
    if reduction == "none":
        g = np.ones(s.shape[:-1]) if grad_output is None else np.broadcast_to(
            np.asarray(grad_output, dtype=np.float64), s.shape[:-1])
        return loss, np.where(counted[..., None], grad * g[..., None], 0.0)
    go = 1.0 if grad_output is None else float(grad_output)
    if den == 0:
        return 0.0, np.zeros(s.shape)
    return float(loss.sum()) / den, grad * (go / den)
