"""CUDA kernels for softmax cross-entropy with probability ("soft") targets.

The twin of ``fastloss.cpu.soft_cross_entropy`` (formulas there): per row,
with ``u_j = w_j ((1 - eps) q_j + eps / V)`` and ``U = sum_j u_j``,
``ce_i = sum_j u_j (lse - z_j)`` (a term with ``u_j = 0`` is 0, even at
``z_j = -inf``) and ``dL/dx_j = [A exp(z_j - m) - gce u_j] dz_j/dx_j`` with
``A = (gce U + gz 2 zl lse) / s``. The host side is
``fastloss.cuda.soft_cross_entropy_host``.

Mapping, as ``fastloss.cuda.cross_entropy``: one thread block per row (a
grid-stride loop over rows), the threads striding over the row's elements.
Two passes per row: the first keeps each thread's online softmax ``(m, s)``
(``fastloss.cuda.rows``) with ``U`` and the row's target sum beside it, merged
over the block (``fastloss.cuda.reductions``); the second, with ``lse``
known, adds ``u_j (lse - z_j)`` (no cancellation between two large sums) and,
in the fused kernel, writes the gradient in the storage dtype (in place is
safe: each thread rewrites only the elements it read). Element by element
(no 8-byte words): the simpler form of the class-index kernels, not yet
timed on a GPU.

``finish`` (one block) then sums the rows for mean/sum in float64 and checks
the targets: ``stats = [bad rows, first bad row, its first negative or
non-finite entry (V if none), that entry, the row's sum, non-finite class
weights, smallest class weight]``; a flagged call's mean/sum is NaN (the host
raises the contract's error once ``stats`` reach it, without waiting).
Indexing is 64-bit.
"""

import functools
from typing import NamedTuple

import numpy as np

from . import _math as M
from ._math import cuda
from ..codes import MEAN, NONE, SOFTCAP, SUM
from .reductions import block_count_first, block_reduce, block_weight_stats
from .rows import element_functions, kernel_spec

__all__ = ["STATS", "FinishArgs", "RowsArgs", "SoftScalars", "finish_kernel", "soft_kernels"]

_NINF = -np.inf

#: Entries of ``stats`` written by ``finish``.
STATS = 7


class SoftScalars(NamedTuple):
    """Per-call constants: ``nclass`` (int64), ``has_w``, ``keep = 1 - eps`` and
    ``spread = eps / V`` of the smoothed targets, ``zl`` (z-loss), ``red``
    (``codes.NONE``, ``SUM``, ``MEAN``) and ``den`` (the mean's denominator:
    rows or ``normalizer``), float64."""

    nclass: int
    has_w: bool
    keep: float
    spread: float
    zl: float
    red: int
    den: float


class RowsArgs(NamedTuple):
    """The row kernel's parameters, in order: logits and targets (flat
    elements), class weights (a placeholder without), the logit scalars
    (``fastloss.cuda.cross_entropy.LogitScalars``), :class:`SoftScalars`, the
    upstream gradient (``GradScalars``, ``gvec``), the gradient destination
    (flat; a placeholder for the forward kernel) and the per-row outputs."""

    x: object
    q: object
    w: object
    tr: object
    sc: SoftScalars
    up: object
    gvec: object
    og: object
    loss: object
    lse: object
    qsum: object


class FinishArgs(NamedTuple):
    """``finish``'s parameters, in order (``tol``: the target-sum tolerance)."""

    loss: object
    lse: object
    qsum: object
    q: object
    w: object
    sc: SoftScalars
    tol: float
    out: object
    stats: object


def _rows_kernel(spec, el, qload, fused):
    ACC, TPB, MODE, RED = spec.ACC, spec.TPB, spec.MODE, spec.RED
    load, store, fexp = spec.load, spec.store, spec.fexp
    block_softmax, block_sum64 = spec.block_softmax, spec.block_sum64
    zval, elem_stats = el.zval, el.elem_stats

    @M.device
    def target_u(qv, j, w, has_w, keep, spread):
        """u_j = w_j (keep q_j + spread)."""
        u = keep * qv + spread
        if has_w:
            u = u * w[j]
        return u

    @spec.kernel
    def rows(x, q, w, tr, sc, up, gvec, og, loss, lse, qsum):
        """Per row: ``loss[i]`` (ce_i; plus zl lse_i**2 for reduction none),
        ``lse[i]``, ``qsum[i]`` (NaN when an entry is negative) and, in the
        fused kernel, the gradient into ``og``."""
        scale, inv, cap = tr
        nclass, has_w, keep64, spread64, zl, red, den = sc
        gmode, go = up
        keep = ACC(keep64)
        spread = ACC(spread64)
        sh_m = cuda.shared.array(RED, ACC)
        sh_s = cuda.shared.array(RED, ACC)
        sh_u = cuda.shared.array(RED, ACC)
        sh_f = cuda.shared.array(RED, np.float64)
        tid = cuda.threadIdx.x
        n = loss.shape[0]
        for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):
            base = np.int64(i) * nclass
            m = ACC(_NINF)
            s = ACC(0)
            su = ACC(0)
            sq = 0.0
            j = np.int64(tid)
            while j < nclass:
                m, s, _ = elem_stats(load(x[base + j]), j, m, s, ACC(0), w, False, False,
                                     scale, inv, cap)
                qv = ACC(qload(q[base + j]))
                su += target_u(qv, j, w, has_w, keep, spread)
                sq += np.float64(qv) if qv >= 0 else np.nan
                j += TPB
            m, s, su = block_softmax(sh_m, sh_s, sh_u, tid, m, s, su)
            sq = block_sum64(sh_f, tid, sq)
            shift = m if m != _NINF else ACC(0)
            l64 = np.float64(shift) + np.float64(M.log0(s))
            lse_a = ACC(l64)
            a = ACC(0)
            gc = ACC(0)
            nothing = True
            if fused:
                g = M.upstream(gmode, go, gvec, i)
                if red == MEAN:
                    g = M.per_mean(g, den)
                s64 = np.float64(s)
                inv_s = 1.0 / s64 if s64 > 0 else np.nan  # an all -inf row: NaN, as on the CPU
                a = ACC((g * np.float64(su) + g * 2.0 * zl * l64) * inv_s)
                gc = ACC(g)
                nothing = g == 0  # both coefficients (ce, z-loss) are g here
            ce = ACC(0)
            j = np.int64(tid)
            while j < nclass:
                v = load(x[base + j])
                z = zval(v, scale, inv, cap)
                u = target_u(ACC(qload(q[base + j])), j, w, has_w, keep, spread)
                if u != 0:
                    ce += u * (lse_a - z)
                if fused:
                    if nothing:  # nothing flows back: zeros, NaN logits included
                        gj = ACC(0)
                    else:
                        if MODE == SOFTCAP:
                            th = M.tanh(inv * v)
                            d = scale * (ACC(1) - th * th)
                        else:
                            d = scale
                        gj = (a * fexp(z - shift) - gc * u) * d
                    og[base + j] = store(gj)
                j += TPB
            ce64 = block_sum64(sh_f, tid, np.float64(ce))
            if tid == 0:
                if red == NONE and zl > 0:
                    ce64 += zl * l64 * l64
                loss[i] = ce64
                lse[i] = lse_a
                qsum[i] = sq
    return rows


@functools.cache
def soft_kernels(acc, kind, qkind, mode, tpb):
    """``(forward, fused)`` row kernels for one accumulation dtype name, logits
    storage kind, targets storage kind, transform mode and block size; both
    take :class:`RowsArgs`."""
    spec = kernel_spec(acc, kind, mode, tpb, 1)
    el = element_functions(spec)
    qload = M.loader(qkind)
    return _rows_kernel(spec, el, qload, False), _rows_kernel(spec, el, qload, True)


@functools.cache
def finish_kernel(qkind, tpb):
    """The one-block ``finish`` kernel (see the module docstring); takes
    :class:`FinishArgs`."""
    TPB = tpb
    qload = M.loader(qkind)

    @cuda.jit
    def finish(loss, lse, qsum, q, w, sc, tol, out, stats):
        """Mean/sum of the rows into ``out[0]`` (NaN when the targets are bad)
        and the target/weight checks into ``stats``."""
        nclass, has_w, keep, spread, zl, red, den = sc
        sh = cuda.shared.array(TPB, np.float64)
        tid = cuda.threadIdx.x
        n = loss.shape[0]
        ce = 0.0
        zz = 0.0
        nbad = 0.0
        first = np.float64(n)
        for i in range(tid, n, TPB):
            ce += np.float64(loss[i])
            li = np.float64(lse[i])
            zz += li * li
            d = abs(np.float64(qsum[i]) - 1.0)
            if not d <= tol:
                if nbad == 0:
                    first = np.float64(i)  # this thread's rows ascend
                nbad += 1.0
        ce = block_reduce(sh, tid, ce, False)
        zz = block_reduce(sh, tid, zz, False)
        nbad, first = block_count_first(sh, tid, nbad, first)
        fj = np.float64(nclass)
        rsum = 0.0
        if nbad > 0:
            base = np.int64(first) * nclass
            for j in range(tid, nclass, TPB):
                v = np.float64(qload(q[base + j]))
                rsum += v
                if not (v >= 0 and v < np.inf) and fj == nclass:
                    fj = np.float64(j)
        rsum = block_reduce(sh, tid, rsum, False)
        fj = block_reduce(sh, tid, fj, True)
        _, wbad, wmin = block_weight_stats(sh, tid, w, nclass, TPB, has_w)
        if tid == 0:
            stats[0] = nbad
            stats[1] = first
            stats[2] = fj
            stats[3] = np.float64(qload(q[np.int64(first) * nclass + np.int64(fj)])) if fj < nclass else 0.0
            stats[4] = rsum
            stats[5] = wbad
            stats[6] = wmin
            flagged = nbad > 0 or wbad > 0 or wmin < 0
            if red != NONE:
                if flagged:
                    r = np.nan
                elif red == SUM:
                    r = ce + zl * zz if zl > 0 else ce
                else:
                    r = M.per_mean(ce, den)
                    if zl > 0 and den != 0:
                        r += zl * zz / den
                out[0] = r

    return finish

