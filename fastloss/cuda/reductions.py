"""Block-level reductions of the CUDA kernels: online-softmax merges, sums and
minima over the threads of a block, by warp shuffles or a tree in shared memory.

Every function here is called by all the threads of a block together (they
contain barriers) and hands every thread the result.

Whole warps (blocks of a multiple of 32 threads) merge by warp shuffles and one
exchange through shared memory (2 barriers); other block sizes by a tree in
shared memory (one barrier per level). The simulator has no shuffles: there
they are emulated through the block's shared arrays, so it runs the same
reduction.
"""

import numpy as np

from . import _math as M
from ._math import cuda

__all__ = ["block_count_first", "block_reduce", "block_softmax_for", "block_softmax_tree", "block_sum64_for",
           "block_weight_stats", "merge", "shfl_down", "shfl_first", "warp_softmax"]

_NINF = -np.inf


@M.device
def merge(m1, s1, q1, m2, s2, q2):
    """Two online-softmax states (max, sum of exp(z - max), smoothing sum) as one."""
    mx = m1 if m1 >= m2 else m2
    if mx != _NINF:
        s1 = s1 * M.exp(m1 - mx) + s2 * M.exp(m2 - mx)
    else:
        s1 = s1 + s2
    return mx, s1, q1 + q2


@M.block_device
def block_softmax_tree(sh_m, sh_s, sh_q, tid, m, s, q):
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
            mx, s1, q1 = merge(sh_m[tid], sh_s[tid], sh_q[tid],
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
    def shfl_down(v, d, sh, tid):
        """v of lane + d of this warp (lanes past 31: v itself)."""
        cuda.syncthreads()
        sh[tid] = v
        cuda.syncthreads()
        r = sh[tid + d] if (tid & 31) + d < 32 else v
        cuda.syncthreads()
        return r

    @M.block_device
    def shfl_first(v, sh, tid):
        """v of lane 0 of this warp."""
        cuda.syncthreads()
        sh[tid] = v
        cuda.syncthreads()
        r = sh[tid - (tid & 31)]
        cuda.syncthreads()
        return r
else:
    @M.block_device
    def shfl_down(v, d, sh, tid):
        """v of lane + d of this warp (lanes past 31: v itself)."""
        return cuda.shfl_down_sync(0xFFFFFFFF, v, d)

    @M.block_device
    def shfl_first(v, sh, tid):
        """v of lane 0 of this warp."""
        return cuda.shfl_sync(0xFFFFFFFF, v, 0)


@M.block_device
def warp_softmax(sh_m, sh_s, sh_q, tid, m, s, q):
    """Lane 0 of each warp gets the merge of its warp's states (shuffles; the
    other lanes hold partial merges)."""
    d = 16
    while d > 0:
        m2 = shfl_down(m, d, sh_m, tid)
        s2 = shfl_down(s, d, sh_s, tid)
        q2 = shfl_down(q, d, sh_q, tid)
        m, s, q = merge(m, s, q, m2, s2, q2)
        d //= 2
    return m, s, q


def block_softmax_for(acc, tpb):
    """The block merge of online-softmax states for blocks of ``tpb`` threads
    accumulating in ``acc``: :func:`block_softmax_tree`, or for whole warps
    (``tpb`` a multiple of 32) a version with 2 barriers instead of one per
    tree level: each warp merges its states by shuffles, lane 0 posts them in
    shared memory, then every warp merges the posted states itself (no
    broadcast barrier) and hands lane 0's result to its lanes."""
    if tpb % 32:
        return block_softmax_tree
    ACC = acc
    NW = tpb // 32

    @M.block_device
    def block_softmax(sh_m, sh_s, sh_q, tid, m, s, q):
        lane = tid & 31
        m, s, q = warp_softmax(sh_m, sh_s, sh_q, tid, m, s, q)
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
        m, s, q = warp_softmax(sh_m, sh_s, sh_q, tid, m, s, q)
        m = shfl_first(m, sh_m, tid)
        s = shfl_first(s, sh_s, tid)
        q = shfl_first(q, sh_q, tid)
        return m, s, q
    return block_softmax


def block_sum64_for(tpb):
    """Sum of one float64 per thread over a block of ``tpb`` threads (every
    thread gets it): warp shuffles and one exchange through ``sh`` (one entry
    per warp) for whole warps, else the tree of :func:`block_reduce` (``sh``
    one entry per thread)."""
    if tpb % 32:
        @M.block_device
        def block_sum64_tree(sh, tid, v):
            return block_reduce(sh, tid, v, False)
        return block_sum64_tree
    NW = tpb // 32

    @M.block_device
    def block_sum64(sh, tid, v):
        lane = tid & 31
        d = 16
        while d > 0:
            v += shfl_down(v, d, sh, tid)
            d //= 2
        cuda.syncthreads()  # sh may still be read (previous use, emulated shuffles)
        if lane == 0:
            sh[tid >> 5] = v
        cuda.syncthreads()
        v = sh[lane] if lane < NW else 0.0
        d = 16
        while d > 0:
            v += shfl_down(v, d, sh, tid)
            d //= 2
        return shfl_first(v, sh, tid)
    return block_sum64


@M.block_device
def block_reduce(sh, tid, v, is_min):
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


@M.block_device
def block_count_first(sh, tid, count, first):
    """``(count, first)`` over the block: the sum of the threads' counts of
    flagged items and the smallest of their first flagged positions (each
    thread's positions ascend, so that is the first in the whole range)."""
    count = block_reduce(sh, tid, count, False)
    first = block_reduce(sh, tid, first, True)
    return count, first


@M.block_device
def block_weight_stats(sh, tid, w, nclass, stride, has_w):
    """``(sum of the finite class weights, count of non-finite ones, smallest
    finite one)`` over ``w[:nclass]``, the threads striding by ``stride``
    (``(0, 0, inf)`` without weights: ``has_w`` False); float64, every
    thread gets them."""
    wsum = 0.0
    wbad = 0.0
    wmin = np.inf
    if has_w:
        for j in range(tid, nclass, stride):
            v = np.float64(w[j])
            if v > -np.inf and v < np.inf:
                wsum += v
                wmin = v if v < wmin else wmin
            else:
                wbad += 1.0
    wsum = block_reduce(sh, tid, wsum, False)
    wbad = block_reduce(sh, tid, wbad, False)
    wmin = block_reduce(sh, tid, wmin, True)
    return wsum, wbad, wmin
