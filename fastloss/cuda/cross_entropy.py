"""CUDA kernels for softmax cross-entropy with class-index targets.

The twin of ``fastloss.cpu.cross_entropy``: the same per-row formulas (see
that module's docstring for ``ce_i``, ``lse_i`` and the fused gradient
``dL/dx_j = [A e_j - C w_j - [j == t] gce (1 - eps) w_t] dz_j/dx_j``). The
public entry points are in ``fastloss.cuda.api``, which validates and launches.

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
memory otherwise (``block_softmax_for``).

Flat, wide accesses: the kernels take the logits (and the gradient
destination) as flat 1-D views of one C-contiguous buffer, twice: as words
(``uint64`` holding ``per`` = 2 float32 or 4 float16/bfloat16 values, when
the buffer is 8-byte aligned; else ``per = 1`` and the words are the
elements) and as elements. A row's words that hold only its own elements are
read and written 8 bytes per access (unpacked and packed in registers); the
few elements at each end that share a word with the neighbouring row (fewer
than ``per``) go element by element (``row_span``). So every class count,
odd ones like 50257 included, gets 8-byte accesses. Strided logits are first
copied to a contiguous buffer by the API.

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
gradient buffer is not written). ``fastloss.cuda.api`` copies ``stats`` to
pinned host memory without waiting and raises the contract's errors once the
copy has landed (see there). For mean/sum, thread 0 of each
block accumulates its rows' ``ce_i`` and ``lse_i**2`` in float64 and writes
one partial per block; the last block to finish (a ticket from an atomic
counter, which it resets) merges the partials into the one-element loss, in a
fixed order, so the result does not depend on which block is last. (MSE
still merges with the one-block ``finalize`` kernel.)

Indexing is 64-bit: rows and classes are int64 (flat offsets ``i * V + j``
in int64).
"""

import functools

import numba
import numpy as np

from . import _math as M
from ._math import cuda

#: Logit transform modes (as in the CPU kernels), fixed per compiled kernel.
PLAIN, SCALED, SOFTCAP = 0, 1, 2

#: Reductions as the kernels see them.
NONE, SUM, MEAN = 0, 1, 2

#: Where the upstream gradient of a row comes from: a scalar argument, a
#: one-element device array, or one value per row.
G_SCALAR, G_DEVICE_SCALAR, G_ROWS = 0, 1, 2

_NINF = -np.inf


@M.device
def _merge(m1, s1, q1, m2, s2, q2):
    """Two online-softmax states (max, sum of exp(z - max), smoothing sum) as one."""
    mx = m1 if m1 >= m2 else m2
    if mx != _NINF:
        s1 = s1 * M.exp(m1 - mx) + s2 * M.exp(m2 - mx)
    else:
        s1 = s1 + s2
    return mx, s1, q1 + q2


@M.block_device
def _block_softmax(sh_m, sh_s, sh_q, tid, m, s, q):
    """Merge the per-thread online-softmax states (m, s) and sums q of a block
    (tree in shared memory; any block size). Every thread gets the result."""
    nt = sh_m.shape[0]
    sh_m[tid] = m
    sh_s[tid] = s
    sh_q[tid] = q
    cuda.syncthreads()
    stride = 1
    while stride * 2 < nt:
        stride *= 2
    while stride > 0:
        if tid < stride and tid + stride < nt:
            mx, s1, q1 = _merge(sh_m[tid], sh_s[tid], sh_q[tid],
                                sh_m[tid + stride], sh_s[tid + stride], sh_q[tid + stride])
            sh_m[tid] = mx
            sh_s[tid] = s1
            sh_q[tid] = q1
        cuda.syncthreads()
        stride //= 2
    m = sh_m[0]
    s = sh_s[0]
    q = sh_q[0]
    cuda.syncthreads()  # before the arrays are reused for the next row
    return m, s, q


# Warp shuffles. The simulator has none: there they are emulated through the
# block's shared arrays (every thread of the block calls them together, as the
# warp-level code below does), so the simulator runs the same reduction.
if M.SIMULATOR or cuda is None:
    @M.block_device
    def _shfl_down(v, d, sh, tid):
        """v of lane + d of this warp (lanes past 31: v itself)."""
        cuda.syncthreads()
        sh[tid] = v
        cuda.syncthreads()
        r = sh[tid + d] if (tid & 31) + d < 32 else v
        cuda.syncthreads()
        return r

    @M.block_device
    def _shfl_first(v, sh, tid):
        """v of lane 0 of this warp."""
        cuda.syncthreads()
        sh[tid] = v
        cuda.syncthreads()
        r = sh[tid - (tid & 31)]
        cuda.syncthreads()
        return r
else:
    @M.block_device
    def _shfl_down(v, d, sh, tid):
        """v of lane + d of this warp (lanes past 31: v itself)."""
        return cuda.shfl_down_sync(0xFFFFFFFF, v, d)

    @M.block_device
    def _shfl_first(v, sh, tid):
        """v of lane 0 of this warp."""
        return cuda.shfl_sync(0xFFFFFFFF, v, 0)


@M.block_device
def _warp_softmax(sh_m, sh_s, sh_q, tid, m, s, q):
    """Lane 0 of each warp gets the merge of its warp's states (shuffles; the
    other lanes hold partial merges)."""
    d = 16
    while d > 0:
        m2 = _shfl_down(m, d, sh_m, tid)
        s2 = _shfl_down(s, d, sh_s, tid)
        q2 = _shfl_down(q, d, sh_q, tid)
        m, s, q = _merge(m, s, q, m2, s2, q2)
        d //= 2
    return m, s, q


def block_softmax_for(acc, tpb):
    """The block merge of online-softmax states for blocks of ``tpb`` threads
    accumulating in ``acc``: :func:`_block_softmax` (tree), or for whole warps
    (``tpb`` a multiple of 32) a version with 2 barriers instead of one per
    tree level: each warp merges its states by shuffles, lane 0 posts them in
    shared memory, then every warp merges the posted states itself (no
    broadcast barrier) and hands lane 0's result to its lanes."""
    if tpb % 32:
        return _block_softmax
    ACC = acc
    NW = tpb // 32

    @M.block_device
    def block_softmax(sh_m, sh_s, sh_q, tid, m, s, q):
        lane = tid & 31
        m, s, q = _warp_softmax(sh_m, sh_s, sh_q, tid, m, s, q)
        cuda.syncthreads()  # the arrays may still be read (previous row, emulated shuffles)
        if lane == 0:
            w = tid >> 5
            sh_m[w] = m
            sh_s[w] = s
            sh_q[w] = q
        cuda.syncthreads()
        m = ACC(_NINF)
        s = ACC(0)
        q = ACC(0)
        if lane < NW:
            m = sh_m[lane]
            s = sh_s[lane]
            q = sh_q[lane]
        m, s, q = _warp_softmax(sh_m, sh_s, sh_q, tid, m, s, q)
        m = _shfl_first(m, sh_m, tid)
        s = _shfl_first(s, sh_s, tid)
        q = _shfl_first(q, sh_q, tid)
        return m, s, q
    return block_softmax


def block_sum64_for(tpb):
    """Sum of one float64 per thread over a block of ``tpb`` threads (every
    thread gets it): warp shuffles and one exchange through ``sh`` (one entry
    per warp) for whole warps, else the tree of :func:`_block_reduce` (``sh``
    one entry per thread)."""
    if tpb % 32:
        @M.block_device
        def block_sum64_tree(sh, tid, v):
            return _block_reduce(sh, tid, v, False)
        return block_sum64_tree
    NW = tpb // 32

    @M.block_device
    def block_sum64(sh, tid, v):
        lane = tid & 31
        d = 16
        while d > 0:
            v += _shfl_down(v, d, sh, tid)
            d //= 2
        cuda.syncthreads()  # sh may still be read (previous use, emulated shuffles)
        if lane == 0:
            sh[tid >> 5] = v
        cuda.syncthreads()
        v = sh[lane] if lane < NW else 0.0
        d = 16
        while d > 0:
            v += _shfl_down(v, d, sh, tid)
            d //= 2
        return _shfl_first(v, sh, tid)
    return block_sum64


@M.block_device
def _block_reduce(sh, tid, v, is_min):
    """Sum (or minimum) of one value per thread over the block; every thread gets it."""
    nt = sh.shape[0]
    sh[tid] = v
    cuda.syncthreads()
    stride = 1
    while stride * 2 < nt:
        stride *= 2
    while stride > 0:
        if tid < stride and tid + stride < nt:
            a = sh[tid]
            b = sh[tid + stride]
            if is_min:
                sh[tid] = a if a <= b else b
            else:
                sh[tid] = a + b
        cuda.syncthreads()
        stride //= 2
    r = sh[0]
    cuda.syncthreads()
    return r


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


@functools.lru_cache(maxsize=None)
def ce_kernels(acc, kind, mode, tpb, per=1):
    """Compile-time specialised kernels for one accumulation dtype (``"float32"``
    or ``"float64"``), storage kind (``_math.NATIVE/F16/BF16``), transform mode,
    threads per block and elements per word (``per``: 1, or 2 float32 / 4 half
    precision values per uint64 word). Returns ``(forward, fused, lse,
    fused_resident)``.

    Every kernel takes the logits twice, as flat 1-D views of the same
    C-contiguous buffer: ``xw``, its words (uint64 when ``per > 1``; else the
    elements) and ``xe``, its elements (uint16 bits for half precision), plus
    the class count; the fused kernels take the gradient destination the same
    way (``ow``, ``oe``). See :func:`row_span` for how a row splits into words."""
    ACC = np.float64 if acc == "float64" else np.float32
    TPB = tpb
    MODE = mode
    P = per
    load = M.loader(kind)
    unpack = M.unpacker(kind, per)
    pack = M.packer(kind, per)
    store = M.storer(kind)
    # Storage type of one word (the resident kernel's shared memory).
    # (a numba type: the simulator's dynamic shared arrays need one).
    WORD = numba.from_dtype(np.dtype(np.uint64 if per > 1 else np.uint16 if kind != M.NATIVE else ACC))
    # A block of more than 256 threads must fit the register file (64K registers
    # per SM): cap registers per thread (allocated in multiples of 8), or the launch
    # fails with CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES (seen at 1024 threads).
    regs = None if TPB <= 256 or M.SIMULATOR else max(16, min(255, 65536 // TPB) // 8 * 8)
    kernel = cuda.jit if regs is None else cuda.jit(max_registers=regs)
    # Word strides of the batched loops (unsigned, like the word index).
    T1, T2, T3, T4 = (np.uint64(TPB * u) for u in (1, 2, 3, 4))
    # Hardware exp for float32 accumulation (see _math.fast_exp32); float64 keeps exp.
    fexp = M.fast_exp32 if ACC is np.float32 else M.exp
    block_softmax = block_softmax_for(ACC, TPB)
    # Entries of the reduction's shared arrays: one per warp for the shuffle
    # merge on a GPU (more room for the resident kernel's row), one per thread
    # for the tree and for the simulator's emulated shuffles.
    RED = 32 if TPB % 32 == 0 and not M.SIMULATOR else TPB
    block_sum64 = block_sum64_for(TPB)
    vmax = M.fmax32 if ACC is np.float32 else M.fmax64  # NaN never wins

    if per == 1:
        @M.device
        def zero_word():
            return store(ACC(0))
    else:
        @M.device
        def zero_word():
            return np.uint64(0)

    row_span = M.device(make_row_span(per))

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

    def make_row_stats(keep):
        """``row_stats``; with ``keep`` it also stores each word it reads in the
        shared array ``sm`` (slot ``k - w0``: the thread's own slots, the same
        for every row) when the slot is below ``nslots``, for the resident
        kernel's second pass."""
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

    row_stats = make_row_stats(False)
    row_stats_keep = make_row_stats(True)

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
        """(a, b, c) of the gradient of row i (see grad_val): the upstream
        coefficients in float64, rounded once to the accumulation type."""
        g = go
        if gmode == G_DEVICE_SCALAR:
            g = gvec[0]
        elif gmode == G_ROWS:
            g = gvec[i]
        gce = g
        gz = g
        if red == MEAN:
            d_ce = stats[4]
            d_z = stats[5]
            gce = g / d_ce if d_ce != 0 else 0.0
            gz = g / d_z if d_z != 0 else 0.0
        s64 = np.float64(s)
        inv_s = 1.0 / s64 if s64 > 0 else np.nan  # s = 0: an all -inf row, NaN as on the CPU
        a = ACC((gce * ((1.0 - eps) * wt + eps * W / nclass) + gz * 2.0 * zl * lse) * inv_s)
        c = ACC(gce * eps / nclass)
        b = ACC(gce * (1.0 - eps) * wt)
        return a, b, c

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

    @kernel
    def forward(xw, xe, nclass, tgt, ign, has_ign, w, has_w, scale, inv, cap, eps, zl, stats,
                red, loss, out, counter, partial):
        """Per-row loss ce_i + zl lse_i**2 into ``loss`` (reduction none, 0 for
        ignored rows), or (mean/sum) per-block float64 partial sums of ce_i and
        lse_i**2 into ``partial[block]``, merged into ``out[0]`` by the last
        block (see finish_reduction)."""
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

    def make_fused(resident):
        """The fused kernel; ``resident``: the first ``nslots`` words of each
        row (all of it when it fits) are kept in dynamic shared memory by the
        statistics pass, and the gradient pass reads them from there, the
        rest from global memory again; the streaming kernel ignores
        ``nslots``."""
        stats_fn = row_stats_keep if resident else row_stats

        @kernel
        def fused(xw, xe, nclass, tgt, ign, has_ign, w, has_w, scale, inv, cap, eps, zl, stats,
                  red, gmode, go, gvec, ow, oe, loss, out, counter, partial, nslots):
            """:func:`forward`, plus ``d(sum_i gce_i ce_i + gz_i zl lse_i**2)/dx_ij``
            into ``ow``/``oe`` in the storage type (they may be ``xw``/``xe``: in
            place). For mean the coefficients divide by the denominators in
            ``stats`` (0 when they are 0)."""
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
                a, b, c = coefficients(i, lse, s, wt, W, eps, nclass, zl, stats, red, gmode, go, gvec)
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

    fused = make_fused(False)
    fused_resident = make_fused(True)

    @kernel
    def lse(xw, xe, nclass, w, scale, inv, cap, out):
        """out[i] = logsumexp_j z_ij (-inf for a row of -inf)."""
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

    return forward, fused, lse, fused_resident


@functools.lru_cache(maxsize=None)
def validate_kernel(tpb):
    """The one-block ``validate`` kernel (it does not depend on the logits' dtype)."""
    TPB = tpb

    @cuda.jit
    def validate(tgt, ign, has_ign, nclass, w, has_w, norm, stats):
        """One block. Fills ``stats`` (see the module docstring): bad targets
        (neither ignored nor in [0, nclass)), the first one's flat position, the
        counted tokens, non-finite class weights, the mean's denominators
        (``norm`` when > 0), the class-weight sum W, the smallest weight and
        an error flag (any of these wrong)."""
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
        wsum = 0.0
        wbad = 0.0
        wmin = np.inf
        if has_w:
            for j in range(tid, nclass, TPB):
                v = np.float64(w[j])
                if v > -np.inf and v < np.inf:
                    wsum += v
                    wmin = v if v < wmin else wmin
                else:
                    wbad += 1.0
        nbad = _block_reduce(sh, tid, nbad, False)
        first = _block_reduce(sh, tid, first, True)
        count = _block_reduce(sh, tid, count, False)
        twsum = _block_reduce(sh, tid, twsum, False)
        wsum = _block_reduce(sh, tid, wsum, False)
        wbad = _block_reduce(sh, tid, wbad, False)
        wmin = _block_reduce(sh, tid, wmin, True)
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


@functools.lru_cache(maxsize=None)
def convert_kernel(kind, tpb):
    """``convert(src, dst)``: dst[k] = value of src[k] (storage kind ``kind``),
    cast to dst's dtype; for small side inputs (weights, grad_output)."""
    load = M.loader(kind)

    @cuda.jit
    def convert(src, dst):
        start = cuda.blockIdx.x * tpb + cuda.threadIdx.x
        for k in range(start, src.shape[0], cuda.gridDim.x * tpb):
            dst[k] = load(src[k])

    return convert


@functools.lru_cache(maxsize=None)
def copy2d_kernel(tpb):
    """``copy2d(src, dst)``: dst[i, j] = src[i, j] for 2-D arrays of one dtype and
    any strides (stages strided logits in a contiguous buffer, and back)."""

    @cuda.jit
    def copy2d(src, dst):
        v = np.int64(src.shape[1])
        total = np.int64(src.shape[0]) * v
        start = np.int64(cuda.blockIdx.x) * tpb + cuda.threadIdx.x
        step = np.int64(cuda.gridDim.x) * tpb
        for f in range(start, total, step):
            i = f // v
            j = f - i * v
            dst[i, j] = src[i, j]

    return copy2d
