"""CUDA kernels for softmax cross-entropy with class-index targets.

The twin of ``fastloss.cpu.cross_entropy``: the same per-row formulas (see
that module's docstring for ``ce_i``, ``lse_i`` and the fused gradient
``dL/dx_j = [A e_j - C w_j - [j == t] gce (1 - eps) w_t] dz_j/dx_j``). The
host side, ``fastloss.cuda.cross_entropy_host``, checks the arrays and launches.

Mapping. One thread block per row, with a grid-stride loop over rows (the
grid is capped near the number of resident blocks). The threads of a block
stride over the row's words (``k = tid, tid + T, ...``, coalesced). Each
thread keeps an online softmax in the accumulation type (float32; float64 for
float64 logits): a running max ``m`` and a sum ``s`` of ``exp(z - m)``.

The kernels are bound by instruction issue and latency, not by bandwidth, so
the inner loops are shaped for that. A thread loads a batch of 4 words (``k``,
``k + T``, ``k + 2T``, ``k + 3T``: four independent loads in flight) before
any arithmetic, takes the batch's max (compares and selects on the raw
values: ``z`` is non-decreasing in them, as scale and cap are positive),
rescales ``s`` once per batch and only when the max grew, then adds
``exp(z - m)`` for every element: one exp per element and no data-dependent
branch. A masked ``-inf`` adds ``exp(-inf) = 0``; while ``m`` is still
``-inf`` the shift is 0, so an all ``-inf`` prefix leaves ``m = -inf, s = 0``,
never NaN; NaN never wins the max, but poisons ``s`` and so only its own row.
A tail of fewer than 4 words is handled one word at a time. Float32
accumulation uses the hardware exp (``_math.fast_exp32``, about 2 ulp plus
``|x| 2**-24`` relative for ``x <= 0``; see there); float64 keeps the
accurate exp. The block then merges the per-thread ``(m, s)`` (and the
smoothing sum ``sum_j w_j z_j``): by warp shuffles and one exchange through
shared memory (2 barriers) for blocks of whole warps, by a tree in shared
memory otherwise (``fastloss.cuda.reductions.block_softmax_for``).

Flat, wide accesses: the kernels take the logits (and the gradient
destination) as flat 1-D views of one C-contiguous buffer, twice: as words
(``uint64`` holding ``per`` = 2 float32 or 4 float16/bfloat16 values, when
the buffer is 8-byte aligned; else ``per = 1`` and the words are the
elements) and as elements. A row's words that hold only its own elements are
read and written 8 bytes per access (unpacked and packed in registers); the
few elements at each end that share a word with the neighbouring row (fewer
than ``per``) go element by element (``row_span``). So every class count,
odd ones like 50257 included, gets 8-byte accesses. Strided logits are first
copied to a contiguous buffer by the host side.

Passes over memory per row: the forward and logsumexp kernels read the row
once. The fused kernel has two forms:

* ``fused_resident`` (the default where at least a quarter of a row fits in
  shared memory: up to about 227 KB a block on an H100/H200, e.g. float32 rows of
  50257 classes, bfloat16 rows of 113k): the statistics pass also stores each
  word it reads in dynamic shared memory, in the thread's own slots, and the
  gradient pass reads it back from there. A row that fits is read from global
  memory once and the gradient written once: the minimum traffic. Of a longer
  row only the first ``nslots`` words are kept; the rest is read again, first
  thing in the gradient pass (which walks each thread's words backwards), so
  from L2 while the unkept tails of the rows in flight fit there.
* ``fused`` (streaming): the gradient pass reads the row from global memory
  again. The second read is served by L2 only while the rows in flight (one
  per block: the grid size) fit in it, so its grid may be capped at
  ``config.CUDA_FUSED_L2_BYTES`` / row bytes blocks (at least one per SM).

Both write the gradient in the storage dtype, possibly over the logits (each
element is read and then written by the same thread, after the block barrier
that ends the statistics pass). The block size of the fused kernels is
``config.CUDA_FUSED_THREADS_PER_BLOCK`` (default: ``CUDA_THREADS_PER_BLOCK``).
Kernels with more than 256 threads per block cap registers per thread so a
block fits the register file. ``benchmarks/gpu_check.py`` times the variants.

Reductions stay on the device. ``validate`` (one block) counts bad targets,
counted tokens, the counted target-weight sum and the class-weight sum and
writes them to ``stats`` (float64):

    stats = [n_bad, first_bad, count, n_nonfinite_w, D_ce, D_z, W, min_w, error,
             first_bad_value >> 32, first_bad_value & 0xFFFFFFFF]

The loss kernels read the denominators ``D_ce``/``D_z`` and ``W`` from device
memory; when ``error`` is set they write a NaN loss and nothing else (so a bad
target is never used as an index, ``inplace`` logits stay untouched and a
gradient buffer is not written). ``fastloss.cuda.checks`` copies ``stats`` to
pinned host memory without waiting and raises the contract's errors once the
copy has landed (see there). For mean/sum, thread 0 of each
block accumulates its rows' ``ce_i`` and ``lse_i**2`` in float64 and writes
one partial per block; the last block to finish (a ticket from an atomic
counter, which it resets) merges the partials into the one-element loss, in a
fixed order, so the result does not depend on which block is last. (MSE
still merges with the one-block ``finalize`` kernel.)

Indexing is 64-bit: rows and classes are int64 (flat offsets ``i * V + j``
in int64).

Arguments. What is fixed per compiled kernel (accumulation dtype, storage
kind, transform mode, threads per block, elements per word) is a parameter of
the factory :func:`ce_kernels`; the per-call scalars travel as named tuples
(:class:`LogitScalars`, :class:`CEScalars`, ``_math.GradScalars``), and each
kernel's argument list is a named tuple too (:class:`ForwardArgs`,
:class:`FusedArgs`, :class:`LseArgs`, :class:`ValidateArgs`, whose fields are
the kernel's parameters in order), built by name on the host.
"""

import functools
from typing import NamedTuple

import numpy as np

from . import _math as M
from ._math import GradScalars, cuda
from ..codes import MEAN, NONE, SCALED, SOFTCAP, SUM
from .reductions import block_count_first, block_reduce, block_weight_stats
from .rows import element_functions, kernel_spec, row_stats_function

__all__ = ["CEScalars", "ForwardArgs", "FusedArgs", "GradScalars", "LogitScalars", "LseArgs",
           "ValidateArgs", "ce_kernels", "validate_kernel"]

_NINF = -np.inf


# --- the kernels' arguments ------------------------------------------------------------

class LogitScalars(NamedTuple):
    """The logit transform's scalars in the accumulation type: ``z = scale x``
    (mode SCALED), or ``z = cap tanh(inv x)`` with ``inv = scale / cap``
    (mode SOFTCAP; ``inv`` rounded once from the float64 quotient)."""

    scale: float
    inv: float
    cap: float


class CEScalars(NamedTuple):
    """The per-call constants of the cross-entropy kernels: ``nclass`` (int64),
    ``ign``/``has_ign`` (targets equal to ``ign`` are ignored, int64),
    ``has_w`` (class weights given), ``eps`` (label smoothing) and ``zl``
    (z-loss), float64, and ``red`` (``codes.NONE``, ``SUM`` or ``MEAN``)."""

    nclass: int
    ign: int
    has_ign: bool
    has_w: bool
    eps: float
    zl: float
    red: int


class ValidateArgs(NamedTuple):
    """``validate``'s parameters, in order (``norm``: the mean's normalizer, 0 for none)."""

    tgt: object
    w: object
    sc: CEScalars
    norm: float
    stats: object


class ForwardArgs(NamedTuple):
    """``forward``'s parameters, in order: the logits as words and elements, the
    targets, class weights (a placeholder without), ``validate``'s ``stats``,
    the scalars, then the outputs (see :func:`ce_kernels`)."""

    xw: object
    xe: object
    tgt: object
    w: object
    stats: object
    tr: LogitScalars
    sc: CEScalars
    loss: object
    out: object
    counter: object
    partial: object


class FusedArgs(NamedTuple):
    """``fused``'s (and ``fused_resident``'s) parameters, in order: those of
    :class:`ForwardArgs` plus the upstream gradient (``up``, ``gvec``), the
    gradient destination as words and elements (``ow``, ``oe``) and ``nslots``
    (uint64: words of a row kept in shared memory; the streaming kernel
    ignores it)."""

    xw: object
    xe: object
    tgt: object
    w: object
    stats: object
    tr: LogitScalars
    sc: CEScalars
    up: GradScalars
    gvec: object
    ow: object
    oe: object
    loss: object
    out: object
    counter: object
    partial: object
    nslots: int


class LseArgs(NamedTuple):
    """``lse``'s parameters, in order (``w``: a placeholder; ``out``: one value per row)."""

    xw: object
    xe: object
    nclass: int
    w: object
    tr: LogitScalars
    out: object


# --- per-row loss and the mean/sum ---------------------------------------------------------

class _Loss(NamedTuple):
    row_loss: object
    nan_loss: object
    finish_reduction: object


def _loss_functions(spec, el):
    """The loss of a row from its statistics, the NaN loss of a flagged call,
    and the merge of the mean/sum by the last block."""
    ACC, TPB, block_sum64 = spec.ACC, spec.TPB, spec.block_sum64
    zval = el.zval

    @M.device
    def row_loss(xt, m, s, q, wt, W, eps, nclass, scale, inv, cap):
        """(ce_i, lse_i) from the merged row statistics (per row, float64)."""
        shift = m if m != _NINF else ACC(0)
        lse = np.float64(shift + M.log0(s))
        zt = np.float64(zval(xt, scale, inv, cap))
        ce = (1.0 - eps) * wt * (lse - zt)
        if eps > 0:  # only then: a -inf logit would turn 0 * inf into NaN
            ce += eps / nclass * (W * lse - np.float64(q))
        return ce, lse

    @M.block_device
    def nan_loss(loss, out, red, n, tid):
        """The loss of a call whose inputs validate flagged: NaN (per row for
        reduction none, else the one-element loss, written by block 0)."""
        if tid == 0:
            if red == NONE:
                for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):
                    loss[i] = np.nan
            elif cuda.blockIdx.x == 0:
                out[0] = np.nan

    @M.block_device
    def finish_reduction(ce_sum, z_sum, partial, stats, red, zl, out, counter, sh_f, sh_flag,
                         tid):
        """Mean/sum, called by every thread of every block at its end: thread 0
        writes the block's partial sums (its ``ce_sum``, ``z_sum``); the last
        block to get here (ticket ``gridDim - 1`` of the atomic ``counter``)
        merges all the partials into ``out[0]`` (sum: ce + zl z; mean:
        ce / D_ce + zl z / D_z, 0 for a zero denominator) and resets the
        counter for the next call."""
        if tid == 0:
            partial[cuda.blockIdx.x, 0] = ce_sum
            partial[cuda.blockIdx.x, 1] = z_sum
        cuda.threadfence()  # this block's partials before its ticket
        if tid == 0:
            ticket = cuda.atomic.add(counter, 0, 1)
            sh_flag[0] = 1 if ticket == cuda.gridDim.x - 1 else 0
        cuda.syncthreads()
        if sh_flag[0] == 0:
            return
        ce = 0.0
        z = 0.0
        for b in range(tid, cuda.gridDim.x, TPB):
            ce += partial[b, 0]
            z += partial[b, 1]
        ce = block_sum64(sh_f, tid, ce)
        z = block_sum64(sh_f, tid, z)
        if tid == 0:
            if red == SUM:
                r = ce + zl * z if zl > 0 else ce
            else:
                d_ce = stats[4]
                d_z = stats[5]
                r = ce / d_ce if d_ce != 0 else 0.0
                if zl > 0 and d_z != 0:
                    r += zl * z / d_z
            out[0] = r
            counter[0] = 0

    return _Loss(row_loss, nan_loss, finish_reduction)


# --- the gradient ---------------------------------------------------------------------------

class _Grad(NamedTuple):
    grad_word: object
    grad_edges: object
    zero_row: object
    coefficients: object


def _gradient_functions(spec, el):
    """The gradient of a word, of a row's edge elements, of an ignored row, and
    a row's coefficients (a, b, c)."""
    ACC, TPB, MODE, P = spec.ACC, spec.TPB, spec.MODE, spec.P
    load, store, unpack, pack, fexp, T1 = spec.load, spec.store, spec.unpack, spec.pack, spec.fexp, spec.T1
    zero_word = el.zero_word

    @M.device
    def grad_val(v, j, t, a, b, c, shift, w, has_w, scale, inv, cap):
        """The gradient of the element of class ``j`` with logit ``v``:
        ``[a exp(z_j - shift) - c w_j - [j == t] b] dz_j/dx_j`` (not yet rounded),
        with the fast exp for float32; the ``c`` term (label smoothing) is skipped
        when c = 0, which saves the weight loads."""
        if MODE == SOFTCAP:
            th = M.tanh(inv * v)
            z = v if v == _NINF else cap * th
            d = scale * (ACC(1) - th * th)
        elif MODE == SCALED:
            z = scale * v
            d = scale
        else:
            z = v
            d = scale
        gj = a * fexp(z - shift)
        if c != 0:
            if has_w:
                gj -= c * w[j]
            else:
                gj -= c
        if j == t:
            gj -= b
        return gj * d

    @M.device
    def grad_word(word, j0, t, a, b, c, shift, w, has_w, scale, inv, cap):
        """The gradient word of a logits word whose first element is class ``j0``."""
        ow = zero_word()
        for p in range(P):
            ow = pack(ow, grad_val(unpack(word, p), j0 + p, t, a, b, c, shift, w, has_w,
                                   scale, inv, cap), p)
        return ow

    @M.device
    def grad_edges(xe, oe, base, hend, tstart, end, tid, t, a, b, c, shift, w, has_w,
                   scale, inv, cap):
        """The gradient of the head and tail elements of a row (see row_span)."""
        f = base + tid
        while f < hend:
            oe[f] = store(grad_val(load(xe[f]), f - base, t, a, b, c, shift, w, has_w, scale, inv, cap))
            f += TPB
        f = tstart + tid
        while f < end:
            oe[f] = store(grad_val(load(xe[f]), f - base, t, a, b, c, shift, w, has_w, scale, inv, cap))
            f += TPB

    @M.device
    def zero_row(ow, oe, base, w0, w1, hend, tstart, end, tid):
        """Zero the gradient of an ignored row."""
        k = np.uint64(w0) + np.uint64(tid)
        while k < np.uint64(w1):
            ow[k] = zero_word()
            k += T1
        f = base + tid
        while f < hend:
            oe[f] = store(ACC(0))
            f += TPB
        f = tstart + tid
        while f < end:
            oe[f] = store(ACC(0))
            f += TPB

    @M.device
    def coefficients(i, lse, s, wt, W, eps, nclass, zl, stats, red, gmode, go, gvec):
        """(a, b, c, nothing) of the gradient of row i (see grad_val): the upstream
        coefficients in float64, rounded once to the accumulation type;
        ``nothing`` when no gradient flows back to the row (the cross-entropy
        coefficient is 0 and so is the z-loss one, or ``zl``), whose gradient is
        then zeros (as on the CPU), not the formula's 0 * NaN for a NaN row."""
        g = M.upstream(gmode, go, gvec, i)
        gce = g
        gz = g
        if red == MEAN:
            gce = M.per_mean(g, stats[4])
            gz = M.per_mean(g, stats[5])
        s64 = np.float64(s)
        inv_s = 1.0 / s64 if s64 > 0 else np.nan  # s = 0: an all -inf row, NaN as on the CPU
        a = ACC((gce * ((1.0 - eps) * wt + eps * W / nclass) + gz * 2.0 * zl * lse) * inv_s)
        c = ACC(gce * eps / nclass)
        b = ACC(gce * (1.0 - eps) * wt)
        return a, b, c, gce == 0 and (gz == 0 or zl == 0)

    return _Grad(grad_word, grad_edges, zero_row, coefficients)


# --- the kernels ----------------------------------------------------------------------------

def _forward_kernel(spec, row_stats, lf):
    ACC, RED, load = spec.ACC, spec.RED, spec.load
    block_softmax = spec.block_softmax
    row_loss, nan_loss, finish_reduction = lf.row_loss, lf.nan_loss, lf.finish_reduction

    @spec.kernel
    def forward(xw, xe, tgt, w, stats, tr, sc, loss, out, counter, partial):
        """Per-row loss ce_i + zl lse_i**2 into ``loss`` (reduction none, 0 for
        ignored rows), or (mean/sum) per-block float64 partial sums of ce_i and
        lse_i**2 into ``partial[block]``, merged into ``out[0]`` by the last
        block (see finish_reduction)."""
        scale, inv, cap = tr  # LogitScalars
        nclass, ign, has_ign, has_w, eps, zl, red = sc  # CEScalars
        sh_m = cuda.shared.array(RED, ACC)
        sh_s = cuda.shared.array(RED, ACC)
        sh_q = cuda.shared.array(RED, ACC)
        sh_f = cuda.shared.array(RED, np.float64)
        sh_flag = cuda.shared.array(1, np.int32)
        tid = cuda.threadIdx.x
        if stats[8] != 0:  # validate found bad input: NaN loss, the host raises
            nan_loss(loss, out, red, tgt.shape[0], tid)
            return
        n = tgt.shape[0]
        W = stats[6]
        ce_sum = 0.0
        z_sum = 0.0
        for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):
            t = np.int64(tgt[i])
            if has_ign and t == ign:
                if tid == 0 and red == NONE:
                    loss[i] = 0
                continue
            xt = load(xe[np.int64(i) * nclass + t])
            m, s, q = row_stats(xw, xe, i, nclass, tid, w, has_w, eps > 0, scale, inv, cap, xw,
                                np.uint64(0))
            m, s, q = block_softmax(sh_m, sh_s, sh_q, tid, m, s, q)
            if tid == 0:
                wt = np.float64(w[t]) if has_w else 1.0
                ce, lse = row_loss(xt, m, s, q, wt, W, eps, nclass, scale, inv, cap)
                if red == NONE:
                    if zl > 0:
                        ce += zl * lse * lse
                    loss[i] = ce
                else:
                    ce_sum += ce
                    z_sum += lse * lse
        if red != NONE:
            finish_reduction(ce_sum, z_sum, partial, stats, red, zl, out, counter, sh_f, sh_flag, tid)
    return forward


def _fused_kernel(spec, el, stats_fn, lf, gf, resident):
    """The fused kernel; ``resident``: the first ``nslots`` words of each
    row (all of it when it fits) are kept in dynamic shared memory by the
    statistics pass (``stats_fn`` keeps them), and the gradient pass reads
    them from there, the rest from global memory again; the streaming kernel
    ignores ``nslots``."""
    ACC, TPB, P, RED, WORD, load = spec.ACC, spec.TPB, spec.P, spec.RED, spec.WORD, spec.load
    T1, T2, T3 = spec.T1, spec.T2, spec.T3
    block_softmax = spec.block_softmax
    row_span = el.row_span
    row_loss, nan_loss, finish_reduction = lf.row_loss, lf.nan_loss, lf.finish_reduction
    grad_word, grad_edges, zero_row, coefficients = gf.grad_word, gf.grad_edges, gf.zero_row, gf.coefficients

    @spec.kernel
    def fused(xw, xe, tgt, w, stats, tr, sc, up, gvec, ow, oe, loss, out, counter, partial, nslots):
        """:func:`forward`, plus ``d(sum_i gce_i ce_i + gz_i zl lse_i**2)/dx_ij``
        into ``ow``/``oe`` in the storage type (they may be ``xw``/``xe``: in
        place). For mean the coefficients divide by the denominators in
        ``stats`` (0 when they are 0)."""
        scale, inv, cap = tr  # LogitScalars
        nclass, ign, has_ign, has_w, eps, zl, red = sc  # CEScalars
        gmode, go = up  # GradScalars
        sh_m = cuda.shared.array(RED, ACC)
        sh_s = cuda.shared.array(RED, ACC)
        sh_q = cuda.shared.array(RED, ACC)
        sh_f = cuda.shared.array(RED, np.float64)
        sh_flag = cuda.shared.array(1, np.int32)
        if resident:
            sm = cuda.shared.array(0, WORD)
        else:
            sm = xw
        tid = cuda.threadIdx.x
        if stats[8] != 0:  # validate found bad input: NaN loss, the host raises
            nan_loss(loss, out, red, tgt.shape[0], tid)
            return
        n = tgt.shape[0]
        W = stats[6]
        ce_sum = 0.0
        z_sum = 0.0
        for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):
            t = np.int64(tgt[i])
            base, w0, w1, hend, tstart, end = row_span(i, nclass)
            if has_ign and t == ign:
                zero_row(ow, oe, base, w0, w1, hend, tstart, end, tid)
                if tid == 0 and red == NONE:
                    loss[i] = 0
                continue
            # Read x[i, t] before the barriers in block_softmax: in place, the
            # gradient pass below overwrites it.
            xt = load(xe[base + t])
            m, s, q = stats_fn(xw, xe, i, nclass, tid, w, has_w, eps > 0, scale, inv, cap, sm,
                               nslots)
            m, s, q = block_softmax(sh_m, sh_s, sh_q, tid, m, s, q)
            wt = np.float64(w[t]) if has_w else 1.0
            ce, lse = row_loss(xt, m, s, q, wt, W, eps, nclass, scale, inv, cap)
            if tid == 0:
                if red == NONE:
                    loss[i] = ce + zl * lse * lse if zl > 0 else ce
                else:
                    ce_sum += ce
                    z_sum += lse * lse
            a, b, c, nothing = coefficients(i, lse, s, wt, W, eps, nclass, zl, stats, red, gmode, go,
                                            gvec)
            if nothing:  # nothing flows back to this row: zeros, NaN logits included
                zero_row(ow, oe, base, w0, w1, hend, tstart, end, tid)
                continue
            shift = m if m != _NINF else ACC(0)
            # The gradient pass walks the thread's words backwards: the words
            # the statistics pass read last come first, while they may still
            # be in L2 (the streaming kernel, the unkept tail of a partly
            # resident row). Batches of 4 as in row_stats (slots r, r - T,
            # r - 2T, r - 3T; from shared memory where kept), then 4 words of
            # gradient, then 4 stores (each thread rewrites only the words
            # it read, so in place is safe).
            ub = np.uint64(w0)
            nw = np.uint64(w1) - ub
            tu = np.uint64(tid)
            cnt = (nw - tu - np.uint64(1)) // T1 + np.uint64(1) if tu < nw else np.uint64(0)
            while cnt >= np.uint64(4):
                r = tu + (cnt - np.uint64(1)) * T1  # the batch's last slot
                k = ub + r
                if resident and r < nslots:
                    a0 = sm[r]
                    a1 = sm[r - T1]
                    a2 = sm[r - T2]
                    a3 = sm[r - T3]
                elif resident:  # the end of the kept prefix
                    a0 = xw[k]
                    a1 = sm[r - T1] if r - T1 < nslots else xw[k - T1]
                    a2 = sm[r - T2] if r - T2 < nslots else xw[k - T2]
                    a3 = sm[r - T3] if r - T3 < nslots else xw[k - T3]
                else:
                    a0 = xw[k]
                    a1 = xw[k - T1]
                    a2 = xw[k - T2]
                    a3 = xw[k - T3]
                j0 = np.int64(k) * P - base
                o0 = grad_word(a0, j0, t, a, b, c, shift, w, has_w, scale, inv, cap)
                o1 = grad_word(a1, j0 - TPB * P, t, a, b, c, shift, w, has_w, scale, inv, cap)
                o2 = grad_word(a2, j0 - 2 * TPB * P, t, a, b, c, shift, w, has_w, scale, inv, cap)
                o3 = grad_word(a3, j0 - 3 * TPB * P, t, a, b, c, shift, w, has_w, scale, inv, cap)
                ow[k] = o0
                ow[k - T1] = o1
                ow[k - T2] = o2
                ow[k - T3] = o3
                cnt -= np.uint64(4)
            while cnt > np.uint64(0):
                r = tu + (cnt - np.uint64(1)) * T1
                k = ub + r
                a0 = sm[r] if resident and r < nslots else xw[k]
                ow[k] = grad_word(a0, np.int64(k) * P - base, t, a, b, c, shift, w, has_w,
                                  scale, inv, cap)
                cnt -= np.uint64(1)
            grad_edges(xe, oe, base, hend, tstart, end, tid, t, a, b, c, shift, w, has_w,
                       scale, inv, cap)
        if red != NONE:
            finish_reduction(ce_sum, z_sum, partial, stats, red, zl, out, counter, sh_f,
                             sh_flag, tid)
    return fused


def _lse_kernel(spec, row_stats):
    ACC, RED, block_softmax = spec.ACC, spec.RED, spec.block_softmax

    @spec.kernel
    def lse(xw, xe, nclass, w, tr, out):
        """out[i] = logsumexp_j z_ij (-inf for a row of -inf)."""
        scale, inv, cap = tr  # LogitScalars
        sh_m = cuda.shared.array(RED, ACC)
        sh_s = cuda.shared.array(RED, ACC)
        sh_q = cuda.shared.array(RED, ACC)
        tid = cuda.threadIdx.x
        for i in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
            m, s, q = row_stats(xw, xe, i, nclass, tid, w, False, False, scale, inv, cap, xw,
                                np.uint64(0))
            m, s, q = block_softmax(sh_m, sh_s, sh_q, tid, m, s, q)
            if tid == 0:
                shift = m if m != _NINF else ACC(0)
                out[i] = shift + M.log0(s)
    return lse


@functools.cache
def ce_kernels(acc, kind, mode, tpb, per=1):
    """Compile-time specialised kernels for one accumulation dtype (``"float32"``
    or ``"float64"``), storage kind (``codes.NATIVE/F16/BF16``), transform mode,
    threads per block and elements per word (``per``: 1, or 2 float32 / 4 half
    precision values per uint64 word). Returns ``(forward, fused, lse,
    fused_resident)``, taking :class:`ForwardArgs`, :class:`FusedArgs`,
    :class:`LseArgs` and :class:`FusedArgs`.

    Every kernel takes the logits twice, as flat 1-D views of the same
    C-contiguous buffer: ``xw``, its words (uint64 when ``per > 1``; else the
    elements) and ``xe``, its elements (uint16 bits for half precision), plus
    the class count; the fused kernels take the gradient destination the same
    way (``ow``, ``oe``). See ``fastloss.cuda.rows.make_row_span`` for how a row
    splits into words."""
    spec = kernel_spec(acc, kind, mode, tpb, per)
    el = element_functions(spec)
    row_stats = row_stats_function(spec, el, keep=False)
    row_stats_keep = row_stats_function(spec, el, keep=True)
    lf = _loss_functions(spec, el)
    gf = _gradient_functions(spec, el)
    forward = _forward_kernel(spec, row_stats, lf)
    fused = _fused_kernel(spec, el, row_stats, lf, gf, resident=False)
    fused_resident = _fused_kernel(spec, el, row_stats_keep, lf, gf, resident=True)
    lse = _lse_kernel(spec, row_stats)
    return forward, fused, lse, fused_resident


@functools.cache
def validate_kernel(tpb):
    """The one-block ``validate`` kernel (it does not depend on the logits' dtype);
    takes :class:`ValidateArgs`."""
    TPB = tpb

    @cuda.jit
    def validate(tgt, w, sc, norm, stats):
        """One block. Fills ``stats`` (see the module docstring): bad targets
        (neither ignored nor in [0, nclass)), the first one's flat position, the
        counted tokens, non-finite class weights, the mean's denominators
        (``norm`` when > 0), the class-weight sum W, the smallest weight and
        an error flag (any of these wrong)."""
        ign = sc.ign
        has_ign = sc.has_ign
        nclass = sc.nclass
        has_w = sc.has_w
        sh = cuda.shared.array(TPB, np.float64)
        tid = cuda.threadIdx.x
        n = tgt.shape[0]
        nbad = 0.0
        first = np.float64(n)
        count = 0.0
        twsum = 0.0
        for k in range(tid, n, TPB):
            t = np.int64(tgt[k])
            if has_ign and t == ign:
                continue
            if t < 0 or t >= nclass:
                if nbad == 0:
                    first = np.float64(k)  # this thread's positions ascend
                nbad += 1.0
            else:
                count += 1.0
                twsum += np.float64(w[t]) if has_w else 1.0
        nbad, first = block_count_first(sh, tid, nbad, first)
        count = block_reduce(sh, tid, count, False)
        twsum = block_reduce(sh, tid, twsum, False)
        wsum, wbad, wmin = block_weight_stats(sh, tid, w, nclass, TPB, has_w)
        if tid == 0:
            stats[0] = nbad
            stats[1] = first
            stats[2] = count
            stats[3] = wbad
            stats[4] = norm if norm > 0 else twsum
            stats[5] = norm if norm > 0 else count
            stats[6] = wsum if has_w else np.float64(nclass)
            stats[7] = wmin
            stats[8] = 1.0 if nbad > 0 or wbad > 0 or (has_w and wmin < 0) else 0.0
            # The first bad target's value, exactly, as two 32-bit halves (the
            # host reads it later, when the targets may have changed).
            v = np.int64(tgt[np.int64(first)]) if nbad > 0 else np.int64(0)
            stats[9] = np.float64(v >> 32)
            stats[10] = np.float64(v & 0xFFFFFFFF)

    return validate
