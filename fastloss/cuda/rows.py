"""How the CUDA kernels read a row: the compile-time constants of a family of
kernels (:class:`KernelSpec`), the split of a row into 8-byte words and edge
elements (:func:`make_row_span`), the device functions on one word or element
(:func:`element_functions`) and a thread's online-softmax statistics over its
share of a row (:func:`row_stats_function`), shared by the cross-entropy and
logsumexp kernels. The access pattern and its reasons are described in
``fastloss.cuda.cross_entropy``.
"""

from typing import NamedTuple

import numba
import numpy as np

from . import _math as M
from ._math import cuda
from ..codes import NATIVE, PLAIN, SCALED
from .reductions import block_softmax_for, block_sum64_for

__all__ = ["Elements", "KernelSpec", "element_functions", "kernel_spec", "make_row_span",
           "row_stats_function"]

_NINF = -np.inf


def make_row_span(per):
    """``row_span(i, nclass)`` for words of ``per`` elements (a plain function;
    the kernels compile it as a device function)."""
    P = per
    PM1 = per - 1

    def row_span(i, nclass):
        """Where row ``i`` lies in the flat views: ``(base, w0, w1, hend, tstart,
        end)``. Its elements are ``[base, end)`` (``base = i V``, int64); the
        words ``[w0, w1)`` hold only elements of this row; the head ``[base,
        hend)`` and tail ``[tstart, end)`` (fewer than ``per`` elements each,
        in words shared with the neighbouring rows) are read and written
        element by element. With ``per = 1`` there is no head or tail. A row
        inside one word (V < per) is all head."""
        base = np.int64(i) * nclass
        end = base + nclass
        w0 = (base + PM1) // P
        w1 = end // P
        if w1 < w0:  # inside one word
            w1 = w0
            hend = end
            tstart = end
        else:
            hend = w0 * P
            tstart = w1 * P
        return base, w0, w1, hend, tstart, end
    return row_span


class KernelSpec(NamedTuple):
    """What one family of kernels is compiled for, and what follows from it
    (see ``fastloss.cuda.cross_entropy.ce_kernels``)."""

    ACC: type      # accumulation type (np.float32 or np.float64)
    TPB: int       # threads per block
    MODE: int      # transform mode
    P: int         # elements per word
    load: object   # storage element -> accumulation value
    store: object  # accumulation value -> storage element
    unpack: object  # (word, p) -> value of element p
    pack: object   # (word, v, p) -> word with element p set
    WORD: object   # numba type of a word (the resident kernel's shared memory)
    kernel: object  # the kernel decorator (with a register cap for big blocks)
    T1: object     # word strides of the batched loops (uint64)
    T2: object
    T3: object
    T4: object
    fexp: object   # exp of the softmax terms (hardware exp for float32)
    RED: int       # entries of the reductions' shared arrays
    block_softmax: object
    block_sum64: object
    vmax: object   # max where NaN never wins


def kernel_spec(acc, kind, mode, tpb, per):
    """The :class:`KernelSpec` of kernels for one accumulation dtype name, storage
    kind, transform mode, threads per block and elements per word."""
    ACC = np.float64 if acc == "float64" else np.float32
    # Storage type of one word (the resident kernel's shared memory).
    # (a numba type: the simulator's dynamic shared arrays need one).
    WORD = numba.from_dtype(np.dtype(np.uint64 if per > 1 else np.uint16 if kind != NATIVE else ACC))
    # A block of more than 256 threads must fit the register file (64K registers
    # per SM): cap registers per thread (allocated in multiples of 8), or the launch
    # fails with CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES (seen at 1024 threads).
    regs = None if tpb <= 256 or M.SIMULATOR else max(16, min(255, 65536 // tpb) // 8 * 8)
    kernel = cuda.jit if regs is None else cuda.jit(max_registers=regs)
    # Word strides of the batched loops (unsigned, like the word index).
    T1, T2, T3, T4 = (np.uint64(tpb * u) for u in (1, 2, 3, 4))
    # Hardware exp for float32 accumulation (see _math.fast_exp32); float64 keeps exp.
    fexp = M.fast_exp32 if ACC is np.float32 else M.exp
    # Entries of the reduction's shared arrays: one per warp for the shuffle
    # merge on a GPU (more room for the resident kernel's row), one per thread
    # for the tree and for the simulator's emulated shuffles.
    RED = 32 if tpb % 32 == 0 and not M.SIMULATOR else tpb
    vmax = M.fmax32 if ACC is np.float32 else M.fmax64  # NaN never wins
    return KernelSpec(ACC, tpb, mode, per, M.loader(kind), M.storer(kind), M.unpacker(kind, per),
                      M.packer(kind, per), WORD, kernel, T1, T2, T3, T4, fexp, RED,
                      block_softmax_for(ACC, tpb), block_sum64_for(tpb), vmax)


class Elements(NamedTuple):
    """The device functions of :func:`element_functions`."""

    zero_word: object
    row_span: object
    zval: object
    word_max: object
    word_sum: object
    elem_stats: object


def element_functions(spec):
    """Device functions on one word or element: the transform, a word's max
    and softmax terms, one element's online-softmax update."""
    ACC, MODE, P = spec.ACC, spec.MODE, spec.P
    store, unpack, fexp, vmax = spec.store, spec.unpack, spec.fexp, spec.vmax

    if P == 1:
        @M.device
        def zero_word():
            return store(ACC(0))
    else:
        @M.device
        def zero_word():
            return np.uint64(0)

    row_span = M.device(make_row_span(P))

    @M.device
    def zval(v, scale, inv, cap):
        """The logit transform z(x) in the accumulation type; -inf stays -inf."""
        if MODE == PLAIN:
            return v
        if MODE == SCALED:
            return scale * v
        if v == _NINF:
            return v
        return cap * M.tanh(inv * v)

    @M.device
    def word_max(word, bm):
        """max(bm, the raw values of a word). NaN never wins (a NaN bm stays only
        if it came in, which the callers never pass)."""
        for p in range(P):
            bm = vmax(unpack(word, p), bm)
        return bm

    @M.device
    def word_sum(word, j0, sh, s, q, w, has_w, want_q, scale, inv, cap):
        """s + sum_p exp(z_p - sh) over a word whose first element is class
        ``j0`` (one exp per element, no branch on the data: a masked -inf gives
        exp(-inf) = 0, NaN poisons s), and q + the smoothing terms when ``want_q``."""
        for p in range(P):
            z = zval(unpack(word, p), scale, inv, cap)
            s += fexp(z - sh)
            if want_q:
                if has_w:
                    q += w[j0 + p] * z
                else:
                    q += z
        return s, q

    @M.device
    def elem_stats(v, j, m, s, q, w, has_w, want_q, scale, inv, cap):
        """The online softmax (m, s, q) updated with one element (class j)."""
        z = zval(v, scale, inv, cap)
        if z > m:
            s = s * fexp(m - z)
            m = z
        sh = m if m != _NINF else ACC(0)
        s += fexp(z - sh)
        if want_q:
            if has_w:
                q += w[j] * z
            else:
                q += z
        return m, s, q

    return Elements(zero_word, row_span, zval, word_max, word_sum, elem_stats)


# --- row statistics ------------------------------------------------------------------------

def row_stats_function(spec, el, keep):
    """``row_stats``; with ``keep`` it also stores each word it reads in the
    shared array ``sm`` (slot ``k - w0``: the thread's own slots, the same
    for every row) when the slot is below ``nslots``, for the resident
    kernel's second pass."""
    ACC, TPB, P, load, fexp = spec.ACC, spec.TPB, spec.P, spec.load, spec.fexp
    T1, T2, T3, T4 = spec.T1, spec.T2, spec.T3, spec.T4
    row_span, zval, word_max, word_sum, elem_stats = (
        el.row_span, el.zval, el.word_max, el.word_sum, el.elem_stats)

    @M.device
    def row_stats(xw, xe, i, nclass, tid, w, has_w, want_q, scale, inv, cap, sm, nslots):
        """This thread's online softmax (m, s) over its share of row i, and
        q = sum w_j z_j over it when ``want_q`` (label smoothing).

        Words are read in batches of 4 (k, k + T, k + 2T, k + 3T): four
        independent loads in flight before any arithmetic, then the batch's max
        (compares on the raw values; z is non-decreasing in them), one rescale of
        s per batch (skipped when the max did not grow) and one exp per element.
        +inf makes the row NaN (exp(inf - inf)), as in the CPU kernels."""
        base, w0, w1, hend, tstart, end = row_span(i, nclass)
        m = ACC(_NINF)
        s = ACC(0)
        q = ACC(0)
        # Unsigned word indices: numba adds no negative-index wraparound (a
        # compare and select per load) for them.
        ub = np.uint64(w0)
        wend = np.uint64(w1)
        k = ub + np.uint64(tid)
        while k + T3 < wend:
            a0 = xw[k]
            a1 = xw[k + T1]
            a2 = xw[k + T2]
            a3 = xw[k + T3]
            if keep:
                r = k - ub
                if r + T3 < nslots:
                    sm[r] = a0
                    sm[r + T1] = a1
                    sm[r + T2] = a2
                    sm[r + T3] = a3
                else:  # past the kept prefix of the row (partly resident)
                    if r < nslots:
                        sm[r] = a0
                    if r + T1 < nslots:
                        sm[r + T1] = a1
                    if r + T2 < nslots:
                        sm[r + T2] = a2
            bm = word_max(a0, ACC(_NINF))
            bm = word_max(a1, bm)
            bm = word_max(a2, bm)
            bm = word_max(a3, bm)
            bz = zval(bm, scale, inv, cap)
            if bz > m:
                s = s * fexp(m - bz)
                m = bz
            sh = m if m != _NINF else ACC(0)
            j0 = np.int64(k) * P - base
            s, q = word_sum(a0, j0, sh, s, q, w, has_w, want_q, scale, inv, cap)
            s, q = word_sum(a1, j0 + TPB * P, sh, s, q, w, has_w, want_q, scale, inv, cap)
            s, q = word_sum(a2, j0 + 2 * TPB * P, sh, s, q, w, has_w, want_q, scale, inv, cap)
            s, q = word_sum(a3, j0 + 3 * TPB * P, sh, s, q, w, has_w, want_q, scale, inv, cap)
            k += T4
        while k < wend:  # the last words: at most 3 per thread, one at a time
            a0 = xw[k]
            if keep and k - ub < nslots:
                sm[k - ub] = a0
            bz = zval(word_max(a0, ACC(_NINF)), scale, inv, cap)
            if bz > m:
                s = s * fexp(m - bz)
                m = bz
            sh = m if m != _NINF else ACC(0)
            s, q = word_sum(a0, np.int64(k) * P - base, sh, s, q, w, has_w, want_q,
                            scale, inv, cap)
            k += T1
        f = base + tid  # head and tail elements (fewer than P each)
        while f < hend:
            m, s, q = elem_stats(load(xe[f]), f - base, m, s, q, w, has_w, want_q, scale, inv, cap)
            f += TPB
        f = tstart + tid
        while f < end:
            m, s, q = elem_stats(load(xe[f]), f - base, m, s, q, w, has_w, want_q, scale, inv, cap)
            f += TPB
        return m, s, q
    return row_stats


