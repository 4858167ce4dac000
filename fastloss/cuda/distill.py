"""CUDA kernels for knowledge distillation (``fastloss.distill`` on GPU arrays).

The twin of the CPU distillation kernels; the host side is
``fastloss.cuda.distill_host``. With ``p_s = softmax(x / T)`` (student logits
``x``), ``p_t = softmax(y / T)`` (dense teacher logits ``y``, or a top-k
teacher: ``softmax(lp / T)`` over its k entries, 0 elsewhere), a counted row
``i`` has the loss ``l_i = a S_i + h H_i`` (``a`` = soft weight, times ``T**2``
with ``scale_by_t2``; ``h`` = hard weight) where

    kl          S = sum_j p_t (log p_t - log p_s)
    reverse_kl  S = sum_j p_s (log p_s - log p_t)
    jsd         S = beta KL(p_t || m) + (1 - beta) KL(p_s || m),
                m = beta p_t + (1 - beta) p_s    (0 < beta < 1; the host maps
                beta 0 and 1 to kl and reverse_kl)
    hard        H = logsumexp(x) - x_t           (raw, untempered logits)

(``0 log 0 = 0``: a term whose probability is 0 adds nothing) and the gradient
``dl_i/dx_j`` (times the upstream coefficient ``g_i``, divided by the mean's
denominator):

    kl          a (p_s - p_t) / T
    reverse_kl  a p_s (d - S) / T,  d = log p_s - log p_t
    jsd         a (1 - beta) p_s (log(p_s / m) - KL(p_s || m)) / T
    hard        h (softmax(x) - onehot(t))

Mapping: as the cross-entropy kernels (``fastloss.cuda.cross_entropy``), one
thread block per row with a grid-stride loop over rows; the threads of a
block stride over the row's elements. Each row takes three passes over its
elements:

1. the online softmax statistics (max and sum of exponentials, in the
   accumulation type) of the tempered student, of the teacher (dense: over
   the row; top-k: over its k entries) and, with a hard term, of the raw
   student, merged over the block (``reductions.block_softmax_for``);
2. the sums of the divergence (float64 across threads,
   ``reductions.block_sum64_for``): ``S`` (kl, reverse_kl) or the two halves
   of the JSD (and, for a top-k teacher, the student mass on the k entries);
3. the gradient, written in the storage dtype (possibly over the student
   logits: each element is read and written by one thread, after the block
   barriers of passes 1 and 2). For a top-k teacher the k entries' gradient
   is computed first (before the row is overwritten) into this block's row
   of ``topk_scratch``, the dense pass then writes every element as if the
   teacher had no mass there, and after a barrier the k entries are written
   from the scratch row (indices of one row are distinct, so no two threads
   write one element).

The kernels read rows element by element (no 8-byte words, no row kept in
shared memory: a first version, correct before fast; see the host module).

Reductions: for none the per-row loss (0 at ignored rows); for sum/mean one
float64 partial sum per block, merged by the one-block ``finalize`` kernel,
which divides by the mean's denominator (``count * den_mult``, ``count`` the
counted rows: a host value, or ``stats[2]`` written by the cross-entropy
``validate`` kernel when there are targets). When ``stats[8]`` flags bad
input (a target or top-k index out of range) the kernels write a NaN loss and
nothing else (no out-of-range index is ever used, no gradient is written).

Indexing is 64-bit (``i * V + j`` in int64). The per-call scalars travel as the
named tuple :class:`DistillScalars`; the compile-time choices (accumulation
dtype, storage kinds of student and teacher, divergence, top-k, hard term,
threads per block, gradient or not) are the parameters of
:func:`distill_kernels`.
"""

import functools
from typing import NamedTuple

import numpy as np

from . import _math as M
from ._math import GradScalars, cuda
from ..codes import JSD, KL, MEAN, NONE, PLAIN, REVERSE_KL
from .rows import kernel_spec

__all__ = ["JSD", "KL", "REVERSE_KL", "DistillArgs", "DistillScalars", "FinalizeArgs",
           "GradScalars", "distill_kernels", "topk_check_kernel"]

#: The divergence as the kernels see it (a compile-time constant).
KIND_CODES = {"kl": KL, "reverse_kl": REVERSE_KL, "jsd": JSD}

_NINF = -np.inf


class DistillScalars(NamedTuple):
    """The per-call constants of the distillation kernels: ``nclass`` (V) and
    ``k`` (top-k entries; 0 for a dense teacher), int64; ``ign``/``has_ign``
    (targets equal to ``ign`` are not counted) and ``has_tgt``; ``inv_t``
    (``1 / T``) and ``beta`` in the accumulation type; ``soft_w`` (soft weight,
    times ``T**2`` with ``scale_by_t2``), ``hard_w``, ``log1mb``
    (``log(1 - beta)``, jsd) float64; ``red`` (``codes.NONE``, ``SUM`` or
    ``MEAN``), ``count`` (the counted rows when known on the host, else -1:
    read ``stats[2]``) and ``den_mult`` (the mean's denominator is ``count *
    den_mult``: 1 for batchmean, V for mean)."""

    nclass: int
    k: int
    ign: int
    has_ign: bool
    has_tgt: bool
    inv_t: float
    beta: float
    soft_w: float
    hard_w: float
    log1mb: float
    red: int
    count: float
    den_mult: float


class DistillArgs(NamedTuple):
    """The row kernel's parameters, in order: student elements (flat, uint16 bits
    for half precision), teacher values (dense: flat like the student; top-k:
    the flat (n * k) log-probabilities), top-k indices (flat; a placeholder
    for a dense teacher), targets (a placeholder without), ``stats`` (the
    validation numbers), the scalars, the upstream gradient (``up``,
    ``gvec``), the gradient destination (flat, storage dtype; a placeholder
    for the forward kernel), the per-row loss (none), the per-block partials
    (sum/mean) and the top-k scratch rows (one per block)."""

    xe: object
    te: object
    tidx: object
    tgt: object
    stats: object
    sc: DistillScalars
    up: GradScalars
    gvec: object
    oe: object
    loss: object
    partial: object
    topk_scratch: object


class FinalizeArgs(NamedTuple):
    """``finalize``'s parameters, in order."""

    partial: object
    stats: object
    sc: DistillScalars
    out: object


@functools.cache
def distill_kernels(acc, skind, tkind, kind, topk, hard, tpb, grad):
    """``(row_kernel, finalize)`` for one accumulation dtype name, storage kinds
    of the student and the teacher values (``codes.NATIVE/F16/BF16``),
    divergence (:data:`KL`, :data:`REVERSE_KL`, :data:`JSD`), top-k teacher or
    not, hard term or not, threads per block and gradient or not. The row
    kernel takes :class:`DistillArgs`, ``finalize`` :class:`FinalizeArgs`."""
    spec = kernel_spec(acc, skind, PLAIN, tpb, 1)
    ACC, TPB, RED = spec.ACC, spec.TPB, spec.RED
    sload, store, fexp = spec.load, spec.store, spec.fexp
    tload = M.loader(tkind)
    block_softmax, block_sum64 = spec.block_softmax, spec.block_sum64
    KIND, TOPK, HARD, GRAD = kind, topk, hard, grad

    @M.device
    def online(v, m, s):
        """The online softmax (m, s) updated with one value."""
        if v > m:
            s = s * fexp(m - v)
            m = v
        sh = m if m != _NINF else ACC(0)
        return m, s + fexp(v - sh)

    @M.device
    def lse_of(m, s):
        """log sum exp from a merged state (-inf for a row of -inf)."""
        shift = m if m != _NINF else ACC(0)
        return shift + ACC(M.log0(s))

    @M.device
    def kl_term(p, lp, lq):
        """p (lp - lq), 0 for p = 0 (0 log 0 = 0; NaN stays NaN)."""
        if p != 0:
            return p * (lp - lq)
        return ACC(0)

    @M.device
    def jsd_terms(pt, lpt, ps, lps, beta):
        """(pt log(pt / m), ps log(ps / m)) with m = beta pt + (1 - beta) ps."""
        mm = beta * pt + (ACC(1) - beta) * ps
        lm = ACC(M.log0(mm))
        return kl_term(pt, lpt, lm), kl_term(ps, lps, lm)

    @M.device
    def soft_grad(ps, lps, pt, lpt, c1, beta, b1):
        """The divergence's gradient of one element before the ``a g / T``
        factor: kl ``ps - pt``; reverse_kl ``ps (d - S)`` (``c1`` = S);
        jsd ``(1 - beta) ps (log(ps / m) - KL(ps || m))`` (``c1`` = KL(ps || m),
        ``b1`` = 1 - beta)."""
        if KIND == KL:
            return ps - pt
        if ps == 0:
            return ACC(0)
        if KIND == REVERSE_KL:
            return ps * ((lps - lpt) - c1)
        mm = beta * pt + b1 * ps
        return b1 * ps * ((lps - ACC(M.log0(mm))) - c1)

    @M.device
    def div_terms(lps, lpt, beta):
        """One element's shares of the divergence sums (float64) and its
        student probability: kl ``(pt log(pt/ps), 0)``, reverse_kl ``(ps
        log(ps/pt), 0)``, jsd ``(pt log(pt/m), ps log(ps/m))``."""
        ps = fexp(lps)
        pt = fexp(lpt)
        if KIND == KL:
            return np.float64(kl_term(pt, lpt, lps)), 0.0, ps
        if KIND == REVERSE_KL:
            return np.float64(kl_term(ps, lps, lpt)), 0.0, ps
        ta, tb = jsd_terms(pt, lpt, ps, lps, beta)
        return np.float64(ta), np.float64(tb), ps

    @M.block_device
    def row_stats(xe, te, base, tbase, nclass, k, tid, inv_t):
        """This thread's online softmax states over its share of the row: the
        tempered student (ms, ss), the teacher (mt, st) and the raw student
        (mr, sr; only with a hard term)."""
        ms = ACC(_NINF)
        ss = ACC(0)
        mt = ACC(_NINF)
        st = ACC(0)
        mr = ACC(_NINF)
        sr = ACC(0)
        j = np.int64(tid)
        while j < nclass:
            v = sload(xe[base + j])
            ms, ss = online(v * inv_t, ms, ss)
            if HARD:
                mr, sr = online(v, mr, sr)
            if not TOPK:
                mt, st = online(ACC(tload(te[base + j])) * inv_t, mt, st)
            j += TPB
        if TOPK:
            e = np.int64(tid)
            while e < k:
                mt, st = online(ACC(tload(te[tbase + e])) * inv_t, mt, st)
                e += TPB
        return ms, ss, mt, st, mr, sr

    @M.block_device
    def row_sums(xe, te, tidx, base, tbase, nclass, k, tid, inv_t, beta, lse_s, lse_t):
        """This thread's shares of the divergence sums (float64): kl and
        reverse_kl ``(S, 0, 0)``; jsd ``(sum pt log(pt/m), sum ps log(ps/m),
        top-k student mass)`` (for a top-k teacher only over its entries)."""
        a = 0.0
        b = 0.0
        c = 0.0
        if not TOPK:
            j = np.int64(tid)
            while j < nclass:
                ta, tb, _ = div_terms(sload(xe[base + j]) * inv_t - lse_s,
                                      ACC(tload(te[base + j])) * inv_t - lse_t, beta)
                a += ta
                b += tb
                j += TPB
        else:
            e = np.int64(tid)
            while e < k:
                col = np.int64(tidx[tbase + e])
                ta, tb, ps = div_terms(sload(xe[base + col]) * inv_t - lse_s,
                                       ACC(tload(te[tbase + e])) * inv_t - lse_t, beta)
                a += ta
                b += tb
                if KIND == JSD:
                    c += np.float64(ps)
                e += TPB
        return a, b, c

    @M.block_device
    def zero_row(oe, base, nclass, tid):
        """Zero the gradient of a row."""
        j = np.int64(tid)
        while j < nclass:
            oe[base + j] = store(ACC(0))
            j += TPB

    @M.block_device
    def nan_loss(loss, partial, red, n, tid):
        """The loss of a call whose inputs were flagged: NaN (per row for none,
        else in every block's partial)."""
        if tid == 0:
            if red == NONE:
                for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):
                    loss[i] = np.nan
            else:
                partial[cuda.blockIdx.x] = np.nan

    @M.device
    def mean_den(stats, count, den_mult):
        """The mean's denominator: the counted rows (``count``, or ``stats[2]``
        when the host does not know it) times ``den_mult``."""
        cnt = count if count >= 0 else stats[2]
        return cnt * den_mult

    @M.device
    def upstream(i, stats, count, den_mult, red, gmode, go, gvec):
        """The upstream coefficient of row i (float64): grad_output (scalar,
        device scalar or per row), divided by the mean's denominator (0 when it
        is 0)."""
        g = M.upstream(gmode, go, gvec, i)
        if red == MEAN:
            g = M.per_mean(g, mean_den(stats, count, den_mult))
        return g

    @spec.kernel
    def rows(xe, te, tidx, tgt, stats, sc, up, gvec, oe, loss, partial, topk_scratch):
        """Per-row distillation loss (none: into ``loss``; sum/mean: this
        block's float64 partial sum into ``partial[block]``) and, for the
        gradient kernel, ``d(sum_i g_i l_i)/dx`` into ``oe`` (storage dtype; may
        be ``xe``: in place)."""
        nclass = sc.nclass
        k = sc.k
        ign = sc.ign
        has_ign = sc.has_ign
        has_tgt = sc.has_tgt
        inv_t = sc.inv_t
        beta = sc.beta
        soft_w = sc.soft_w
        hard_w = sc.hard_w
        log1mb = sc.log1mb
        red = sc.red
        gmode = up.gmode
        go = up.go
        sh_m = cuda.shared.array(RED, ACC)
        sh_s = cuda.shared.array(RED, ACC)
        sh_q = cuda.shared.array(RED, ACC)
        sh_f = cuda.shared.array(RED, np.float64)
        tid = cuda.threadIdx.x
        n = np.int64(xe.shape[0]) // nclass
        if stats[8] != 0:  # validation flagged bad input: NaN loss, the host raises
            nan_loss(loss, partial, red, n, tid)
            return
        b1 = ACC(1) - beta
        total = 0.0
        for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):
            base = np.int64(i) * nclass
            tbase = np.int64(i) * k
            t = np.int64(-1)
            if has_tgt:
                t = np.int64(tgt[i])
                if has_ign and t == ign:
                    if GRAD:
                        zero_row(oe, base, nclass, tid)
                    if tid == 0 and red == NONE:
                        loss[i] = 0
                    continue
            xt = ACC(0)
            if HARD:
                xt = sload(xe[base + t])  # before any barrier: in place, overwritten below
            ms, ss, mt, st, mr, sr = row_stats(xe, te, base, tbase, nclass, k, tid, inv_t)
            q = ACC(0)
            ms, ss, q = block_softmax(sh_m, sh_s, sh_q, tid, ms, ss, q)
            mt, st, q = block_softmax(sh_m, sh_s, sh_q, tid, mt, st, q)
            lse_s = lse_of(ms, ss)
            lse_t = lse_of(mt, st)
            lse_r = ACC(0)
            if HARD:
                mr, sr, q = block_softmax(sh_m, sh_s, sh_q, tid, mr, sr, q)
                lse_r = lse_of(mr, sr)
            a, b, c = row_sums(xe, te, tidx, base, tbase, nclass, k, tid, inv_t, beta, lse_s, lse_t)
            a = block_sum64(sh_f, tid, a)
            c1 = 0.0  # the gradient's row constant (S, or KL(ps || m))
            if KIND == JSD:
                b = block_sum64(sh_f, tid, b)
                if TOPK:
                    # off the entries m = (1 - beta) ps: ps log(ps / m) = -ps log(1 - beta)
                    c = block_sum64(sh_f, tid, c)
                    b -= (1.0 - c) * log1mb
                s_div = np.float64(beta) * a + np.float64(b1) * b
                c1 = b
            else:
                s_div = a
                c1 = a
            li = soft_w * s_div if soft_w != 0 else 0.0  # a term of weight 0 is left out (NaN, inf)
            if HARD:
                li += hard_w * (np.float64(lse_r) - np.float64(xt))
            if tid == 0:
                if red == NONE:
                    loss[i] = li
                else:
                    total += li
            if not GRAD:
                continue
            g = upstream(i, stats, sc.count, sc.den_mult, red, gmode, go, gvec)
            if g == 0:  # nothing flows back to this row: zeros, NaN logits included
                zero_row(oe, base, nclass, tid)
                continue
            cs = ACC(g * soft_w * np.float64(inv_t))
            ch = ACC(g * hard_w)
            cr = ACC(c1)
            if TOPK:
                # The k entries' full gradient, before the row is overwritten.
                e = np.int64(tid)
                while e < k:
                    col = np.int64(tidx[tbase + e])
                    v = sload(xe[base + col])
                    lps = v * inv_t - lse_s
                    lpt = ACC(tload(te[tbase + e])) * inv_t - lse_t
                    gj = ACC(0)
                    if soft_w != 0:
                        gj = cs * soft_grad(fexp(lps), lps, fexp(lpt), lpt, cr, beta, b1)
                    if HARD:
                        gj += ch * fexp(v - lse_r)
                        if col == t:
                            gj -= ch
                    topk_scratch[cuda.blockIdx.x, e] = gj
                    e += TPB
                cuda.syncthreads()
            # The dense pass: every element (off the top-k entries the teacher has no mass).
            j = np.int64(tid)
            while j < nclass:
                v = sload(xe[base + j])
                lps = v * inv_t - lse_s
                ps = fexp(lps)
                if TOPK:
                    if KIND == KL:
                        gs = ps
                    else:  # jsd: log(ps / m) = -log(1 - beta) off the entries
                        gs = b1 * ps * (ACC(-log1mb) - cr) if ps != 0 else ACC(0)
                else:
                    lpt = ACC(tload(te[base + j])) * inv_t - lse_t
                    gs = soft_grad(ps, lps, fexp(lpt), lpt, cr, beta, b1)
                gj = cs * gs if soft_w != 0 else ACC(0)
                if HARD:
                    gj += ch * fexp(v - lse_r)
                    if j == t:
                        gj -= ch
                oe[base + j] = store(gj)
                j += TPB
            if TOPK:
                cuda.syncthreads()
                e = np.int64(tid)
                while e < k:
                    oe[base + np.int64(tidx[tbase + e])] = store(topk_scratch[cuda.blockIdx.x, e])
                    e += TPB
                cuda.syncthreads()  # the scratch row is reused by the next row
        if red != NONE and tid == 0:
            partial[cuda.blockIdx.x] = total

    @cuda.jit
    def finalize(partial, stats, sc, out):
        """One block. out[0] = sum of the partials (divided by the mean's
        denominator, 0 when it is 0)."""
        sh = cuda.shared.array(RED, np.float64)
        tid = cuda.threadIdx.x
        total = 0.0
        for blk in range(tid, partial.shape[0], TPB):
            total += partial[blk]
        total = block_sum64(sh, tid, total)
        if tid == 0:
            if sc.red == MEAN:
                total = M.per_mean(total, mean_den(stats, sc.count, sc.den_mult))
            out[0] = total

    return rows, finalize


@functools.cache
def topk_check_kernel(tkind, tpb):
    """``check(tidx, lp, tgt, sc, merge, stats)`` (one block, each thread whole
    rows): in the counted rows, top-k indices outside ``[0, nclass)``, rows
    repeating an index and rows whose log-probabilities are all ``-inf``, into
    ``stats[11:20]`` (bad indices, the first one's flat position, rows with
    a repeat, the first such row, rows without a finite entry, the first such
    row, the first bad index's value as two 32-bit halves, the smallest index
    the first repeating row repeats) and the error flag ``stats[8]``
    (``merge``: or-ed into the flag the targets' ``validate`` wrote before,
    else set). The host words the errors from these numbers alone, when they
    land (``fastloss.cuda.checks``). ``lp``: storage kind ``tkind``; ``sc``:
    :class:`DistillScalars`."""
    from .reductions import block_count_first, block_reduce
    TPB = tpb
    load = M.loader(tkind)

    @cuda.jit
    def check(tidx, lp, tgt, sc, merge, stats):
        sh = cuda.shared.array(TPB, np.float64)
        tid = cuda.threadIdx.x
        k = sc.k
        nclass = sc.nclass
        n = np.int64(tidx.shape[0]) // k
        nbad = 0.0
        first = np.float64(n * k)
        ndup = 0.0
        first_dup = np.float64(n)
        ndead = 0.0
        first_dead = np.float64(n)
        for i in range(tid, n, TPB):  # this thread's rows ascend
            if sc.has_tgt and sc.has_ign and np.int64(tgt[i]) == sc.ign:
                continue
            base = np.int64(i) * k
            dup = False
            finite = False
            for e in range(k):
                v = np.int64(tidx[base + e])
                if v < 0 or v >= nclass:
                    if nbad == 0:
                        first = np.float64(base + e)
                    nbad += 1.0
                elif not dup:
                    for f in range(e):
                        if np.int64(tidx[base + f]) == v:
                            dup = True
                            break
                if load(lp[base + e]) > -np.inf:
                    finite = True
            if dup:
                if ndup == 0:
                    first_dup = np.float64(i)
                ndup += 1.0
            if not finite:
                if ndead == 0:
                    first_dead = np.float64(i)
                ndead += 1.0
        nbad, first = block_count_first(sh, tid, nbad, first)
        ndup, first_dup = block_count_first(sh, tid, ndup, first_dup)
        ndead, first_dead = block_count_first(sh, tid, ndead, first_dead)
        # the smallest index repeated in the first repeating row (its entries
        # are in range when no index is bad, the only case its message is used)
        rep = np.float64(nclass)
        if ndup > 0:
            base = np.int64(first_dup) * k
            for e in range(tid, k, TPB):
                v = np.int64(tidx[base + e])
                for f in range(e):
                    if np.int64(tidx[base + f]) == v and np.float64(v) < rep:
                        rep = np.float64(v)
        rep = block_reduce(sh, tid, rep, True)
        if tid == 0:
            stats[11] = nbad
            stats[12] = first
            stats[13] = ndup
            stats[14] = first_dup
            stats[15] = ndead
            stats[16] = first_dead
            # the first bad index exactly (the host reads it later, when the
            # indices may have changed)
            v = np.int64(tidx[np.int64(first)]) if nbad > 0 else np.int64(0)
            stats[17] = np.float64(v >> 32)
            stats[18] = np.float64(v & 0xFFFFFFFF)
            stats[19] = rep
            bad = nbad > 0 or ndup > 0 or ndead > 0
            if bad or not merge:
                stats[8] = 1.0 if bad else 0.0

    return check
