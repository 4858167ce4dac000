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
smoothing sum ``sum_j w_j z_j``) by a tree in shared memory.

Wide accesses: when a row's length is a multiple of 4 (float16/bfloat16) or
2 (float32) and the arrays are C-contiguous and 8-byte aligned, the kernels
see the logits and gradient as uint64 words and each thread moves 8 bytes
per access (``per`` elements, unpacked and packed in registers), which keeps
more bytes in flight per SM than 2-byte loads; otherwise ``per = 1``.

Passes over memory per row: the forward and logsumexp kernels read the row
once. The fused kernel reads it twice (statistics, then gradient) and writes
the gradient once, in the storage dtype, possibly over the logits (each
element is read and then written by the same thread, after the block barrier
that ends the statistics pass). The second read (batched like the first: 4 loads, 4
gradient words, 4 stores, with ``a exp(z - m)`` by the fast exp) is served by
L2 only while the rows in flight (one per block: the grid size) fit in it, so
the fused kernel's grid is capped at ``config.CUDA_FUSED_L2_BYTES`` / row
bytes blocks (at least one per SM); its block size is
``config.CUDA_FUSED_THREADS_PER_BLOCK`` (default: ``CUDA_THREADS_PER_BLOCK``).
Kernels with more than 256 threads per block cap registers per thread so a
block fits the register file. ``benchmarks/gpu_check.py`` times the variants.

Reductions stay on the device. ``validate`` (one block) counts bad targets,
counted tokens, the counted target-weight sum and the class-weight sum and
writes them to ``stats`` (float64):

    stats = [n_bad, first_bad, count, n_nonfinite_w, D_ce, D_z, W, min_w, error]

The loss kernels read the denominators ``D_ce``/``D_z`` and ``W`` from device
memory, and do nothing at all when ``error`` is set (so a bad target is never
used as an index and ``inplace`` logits stay untouched). The host reads
``stats`` once, after everything is queued (the only synchronisation of a
call), and raises the contract's errors. For mean/sum, thread 0 of each
block accumulates its rows' ``ce_i`` and ``lse_i**2`` in float64 and writes
one partial per block; ``finalize`` (one block) merges the partials into the
one-element loss. No atomics: every accumulator has a single writer.

Indexing is 64-bit: rows and classes are int64 and the kernels index 2-D
arrays, so ``row * V`` offsets are computed in int64.
"""

import functools

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
            m1 = sh_m[tid]
            m2 = sh_m[tid + stride]
            mx = m1 if m1 >= m2 else m2
            s1 = sh_s[tid]
            s2 = sh_s[tid + stride]
            if mx != _NINF:
                s1 = s1 * M.exp(m1 - mx) + s2 * M.exp(m2 - mx)
            else:
                s1 = s1 + s2
            sh_m[tid] = mx
            sh_s[tid] = s1
            sh_q[tid] = sh_q[tid] + sh_q[tid + stride]
        cuda.syncthreads()
        stride //= 2
    m = sh_m[0]
    s = sh_s[0]
    q = sh_q[0]
    cuda.syncthreads()  # before the arrays are reused for the next row
    return m, s, q


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


@functools.lru_cache(maxsize=None)
def ce_kernels(acc, kind, mode, tpb, per=1):
    """Compile-time specialised kernels for one accumulation dtype (``"float32"``
    or ``"float64"``), storage kind (``_math.NATIVE/F16/BF16``), transform mode,
    threads per block and elements per word (``per``: 1, or 2 float32 / 4 half
    precision values per uint64 word; the logits and gradient arrays are then
    (rows, V / per) uint64 views). Returns ``(forward, fused, lse)``."""
    ACC = np.float64 if acc == "float64" else np.float32
    TPB = tpb
    MODE = mode
    P = per
    unpack = M.unpacker(kind, per)
    pack = M.packer(kind, per)
    store = M.storer(kind)
    # A block of more than 256 threads must fit the register file (64K registers
    # per SM): cap registers per thread (allocated in multiples of 8), or the launch
    # fails with CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES (seen at 1024 threads).
    regs = None if TPB <= 256 or M.SIMULATOR else max(16, min(255, 65536 // TPB) // 8 * 8)
    kernel = cuda.jit if regs is None else cuda.jit(max_registers=regs)
    # Word strides of the batched loops (unsigned, like the word index).
    T1, T2, T3, T4 = (np.uint64(TPB * u) for u in (1, 2, 3, 4))
    # Hardware exp for float32 accumulation (see _math.fast_exp32); float64 keeps exp.
    fexp = M.fast_exp32 if ACC is np.float32 else M.exp
    vmax = M.fmax32 if ACC is np.float32 else M.fmax64  # NaN never wins

    if per == 1:
        @M.device
        def zero_word():
            return store(ACC(0))
    else:
        @M.device
        def zero_word():
            return np.uint64(0)

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
    def word_sum(word, k, sh, s, q, w, has_w, want_q, scale, inv, cap):
        """s + sum_p exp(z_p - sh) over a word (one exp per element, no branch on
        the data: a masked -inf gives exp(-inf) = 0, NaN poisons s), and q + the
        smoothing terms when ``want_q``."""
        for p in range(P):
            z = zval(unpack(word, p), scale, inv, cap)
            s += fexp(z - sh)
            if want_q:
                if has_w:
                    q += w[np.int64(k) * P + p] * z
                else:
                    q += z
        return s, q

    @M.device
    def row_stats(x, i, tid, w, has_w, want_q, scale, inv, cap):
        """This thread's online softmax (m, s) over its strided words of row i,
        and q = sum w_j z_j over them when ``want_q`` (label smoothing).

        Words are read in batches of 4 (k, k + T, k + 2T, k + 3T): four
        independent loads in flight before any arithmetic, then the batch's max
        (compares on the raw values; z is non-decreasing in them), one rescale of
        s per batch (skipped when the max did not grow) and one exp per element.
        +inf makes the row NaN (exp(inf - inf)), as in the CPU kernels."""
        m = ACC(_NINF)
        s = ACC(0)
        q = ACC(0)
        # Unsigned word indices: numba adds no negative-index wraparound (a
        # compare and select per load) for them.
        nw = np.uint64(x.shape[1])
        k = np.uint64(tid)
        while k + T3 < nw:
            a0 = x[i, k]
            a1 = x[i, k + T1]
            a2 = x[i, k + T2]
            a3 = x[i, k + T3]
            bm = word_max(a0, ACC(_NINF))
            bm = word_max(a1, bm)
            bm = word_max(a2, bm)
            bm = word_max(a3, bm)
            bz = zval(bm, scale, inv, cap)
            if bz > m:
                s = s * fexp(m - bz)
                m = bz
            sh = m if m != _NINF else ACC(0)
            s, q = word_sum(a0, k, sh, s, q, w, has_w, want_q, scale, inv, cap)
            s, q = word_sum(a1, k + T1, sh, s, q, w, has_w, want_q, scale, inv, cap)
            s, q = word_sum(a2, k + T2, sh, s, q, w, has_w, want_q, scale, inv, cap)
            s, q = word_sum(a3, k + T3, sh, s, q, w, has_w, want_q, scale, inv, cap)
            k += T4
        while k < nw:  # the tail: at most 3 words, one at a time
            a0 = x[i, k]
            bz = zval(word_max(a0, ACC(_NINF)), scale, inv, cap)
            if bz > m:
                s = s * fexp(m - bz)
                m = bz
            sh = m if m != _NINF else ACC(0)
            s, q = word_sum(a0, k, sh, s, q, w, has_w, want_q, scale, inv, cap)
            k += T1
        return m, s, q

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
    def grad_word(word, k, t, a, b, c, shift, w, has_w, scale, inv, cap):
        """The gradient word of logits word ``k`` (elements j = k P + p):
        ``[a exp(z_j - shift) - c w_j - [j == t] b] dz_j/dx_j``, with the fast
        exp for float32; the ``c`` term (label smoothing) is skipped when c = 0,
        which saves the weight loads."""
        ow = zero_word()
        for p in range(P):
            j = np.int64(k) * P + p
            v = unpack(word, p)
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
            ow = pack(ow, gj * d, p)
        return ow

    @kernel
    def forward(x, tgt, ign, has_ign, w, has_w, scale, inv, cap, eps, zl, stats, red,
                loss, partial):
        """Per-row loss ce_i + zl lse_i**2 into ``loss`` (reduction none, 0 for
        ignored rows), or per-block float64 partial sums of ce_i and lse_i**2 into
        ``partial[block]`` (mean/sum)."""
        sh_m = cuda.shared.array(TPB, ACC)
        sh_s = cuda.shared.array(TPB, ACC)
        sh_q = cuda.shared.array(TPB, ACC)
        if stats[8] != 0:  # validate found bad input: the host raises
            return
        tid = cuda.threadIdx.x
        n = x.shape[0]
        nclass = x.shape[1] * P
        W = stats[6]
        ce_sum = 0.0
        z_sum = 0.0
        for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):
            t = np.int64(tgt[i])
            if has_ign and t == ign:
                if tid == 0 and red == NONE:
                    loss[i] = 0
                continue
            xt = unpack(x[i, t // P], t % P)
            m, s, q = row_stats(x, i, tid, w, has_w, eps > 0, scale, inv, cap)
            m, s, q = _block_softmax(sh_m, sh_s, sh_q, tid, m, s, q)
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
        if tid == 0 and red != NONE:
            partial[cuda.blockIdx.x, 0] = ce_sum
            partial[cuda.blockIdx.x, 1] = z_sum

    @kernel
    def fused(x, tgt, ign, has_ign, w, has_w, scale, inv, cap, eps, zl, stats, red,
              gmode, go, gvec, out, loss, partial):
        """:func:`forward`, plus ``out[i, j] = d(sum_i gce_i ce_i + gz_i zl lse_i**2)/dx_ij``
        in out's storage type (``out`` may be ``x``: in place). For mean the
        coefficients divide by the denominators in ``stats`` (0 when they are 0)."""
        sh_m = cuda.shared.array(TPB, ACC)
        sh_s = cuda.shared.array(TPB, ACC)
        sh_q = cuda.shared.array(TPB, ACC)
        if stats[8] != 0:  # validate found bad input: the host raises
            return
        tid = cuda.threadIdx.x
        n = x.shape[0]
        nwords = x.shape[1]
        nclass = nwords * P
        W = stats[6]
        ce_sum = 0.0
        z_sum = 0.0
        for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):
            t = np.int64(tgt[i])
            if has_ign and t == ign:
                for k in range(tid, nwords, TPB):
                    out[i, k] = zero_word()
                if tid == 0 and red == NONE:
                    loss[i] = 0
                continue
            # Read x[i, t] before the barrier in _block_softmax: in place, the
            # gradient pass below overwrites it.
            xt = unpack(x[i, t // P], t % P)
            m, s, q = row_stats(x, i, tid, w, has_w, eps > 0, scale, inv, cap)
            m, s, q = _block_softmax(sh_m, sh_s, sh_q, tid, m, s, q)
            wt = np.float64(w[t]) if has_w else 1.0
            ce, lse = row_loss(xt, m, s, q, wt, W, eps, nclass, scale, inv, cap)
            if tid == 0:
                if red == NONE:
                    loss[i] = ce + zl * lse * lse if zl > 0 else ce
                else:
                    ce_sum += ce
                    z_sum += lse * lse
            # Upstream coefficients of this row (float64; rounded once below).
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
            shift = m if m != _NINF else ACC(0)
            # Same batching as row_stats: 4 independent loads, then 4 words of
            # gradient, then 4 stores (each thread rewrites only the words it read,
            # so in place is safe).
            k = np.uint64(tid)
            nwu = np.uint64(nwords)
            while k + T3 < nwu:
                a0 = x[i, k]
                a1 = x[i, k + T1]
                a2 = x[i, k + T2]
                a3 = x[i, k + T3]
                o0 = grad_word(a0, k, t, a, b, c, shift, w, has_w, scale, inv, cap)
                o1 = grad_word(a1, k + T1, t, a, b, c, shift, w, has_w, scale, inv, cap)
                o2 = grad_word(a2, k + T2, t, a, b, c, shift, w, has_w, scale, inv, cap)
                o3 = grad_word(a3, k + T3, t, a, b, c, shift, w, has_w, scale, inv, cap)
                out[i, k] = o0
                out[i, k + T1] = o1
                out[i, k + T2] = o2
                out[i, k + T3] = o3
                k += T4
            while k < nwu:
                out[i, k] = grad_word(x[i, k], k, t, a, b, c, shift, w, has_w, scale, inv, cap)
                k += T1
        if tid == 0 and red != NONE:
            partial[cuda.blockIdx.x, 0] = ce_sum
            partial[cuda.blockIdx.x, 1] = z_sum

    @kernel
    def lse(x, w, scale, inv, cap, out):
        """out[i] = logsumexp_j z_ij (-inf for a row of -inf)."""
        sh_m = cuda.shared.array(TPB, ACC)
        sh_s = cuda.shared.array(TPB, ACC)
        sh_q = cuda.shared.array(TPB, ACC)
        tid = cuda.threadIdx.x
        for i in range(cuda.blockIdx.x, x.shape[0], cuda.gridDim.x):
            m, s, q = row_stats(x, i, tid, w, False, False, scale, inv, cap)
            m, s, q = _block_softmax(sh_m, sh_s, sh_q, tid, m, s, q)
            if tid == 0:
                shift = m if m != _NINF else ACC(0)
                out[i] = shift + M.log0(s)

    return forward, fused, lse


@functools.lru_cache(maxsize=None)
def support_kernels(tpb):
    """Kernels that do not depend on the logits' dtype: ``(validate, finalize)``."""
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

    @cuda.jit
    def finalize(partial, stats, red, zl, out):
        """One block. out[0] = the reduced loss from the per-block partial sums:
        sum: ce + zl z; mean: ce / D_ce + zl z / D_z (a zero denominator gives 0)."""
        sh = cuda.shared.array(TPB, np.float64)
        tid = cuda.threadIdx.x
        ce = 0.0
        z = 0.0
        for b in range(tid, partial.shape[0], TPB):
            ce += partial[b, 0]
            z += partial[b, 1]
        ce = _block_reduce(sh, tid, ce, False)
        z = _block_reduce(sh, tid, z, False)
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

    return validate, finalize


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
