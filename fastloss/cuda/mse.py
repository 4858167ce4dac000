"""CUDA kernels for (weighted) mean squared error; the twin of ``fastloss.cpu.mse``.

Inputs arrive flat (contiguous, kernel storage views). A weight broadcast to
the data is described without materialising it, as on the CPU (the layouts
``codes.W_NONE``, ``W_FULL``, ``W_INNER``, ``W_OUTER``):

    W_NONE   no weight             w_k = 1
    W_FULL   full                  w_k = w[k]
    W_INNER  varies along the last ``inner`` elements   w_k = w[k % inner]
    W_OUTER  constant along the last ``inner`` elements w_k = w[k // inner]

One grid-stride loop over elements (consecutive threads, consecutive
elements: coalesced); each thread sums ``w_k d_k**2`` in float64, the block
merges in shared memory and writes one partial per block; ``finalize`` (one
block) reduces the partials into the one-element loss. The mean's
denominator is a host scalar (no weight, or a host weight) or the device
value ``den[0]`` (a device weight, summed by ``weight_sum``).

The per-call scalars travel as named tuples (:class:`MSEScalars`,
``_math.GradScalars``); the host side is ``fastloss.cuda.mse_host``.
"""

import functools
from typing import NamedTuple

import numpy as np

from . import _math as M
from ._math import GradScalars, cuda
from ..codes import G_DEVICE_SCALAR, G_ROWS, MEAN, NONE, W_FULL, W_INNER, W_OUTER
from .reductions import block_reduce

__all__ = ["FinalizeArgs", "GradScalars", "MSEArgs", "MSEScalars", "mse_kernels"]


class MSEScalars(NamedTuple):
    """The per-call constants of the MSE kernels: the weight layout ``wmode``
    (``codes.W_*``) and ``inner`` (int64), ``red`` (``codes.NONE/SUM/MEAN``),
    the mean's denominator ``den_val`` (float64) or, with ``use_den``, the
    device value ``den[0]``, and ``do_grad`` (write the gradient)."""

    wmode: int
    inner: int
    red: int
    den_val: float
    use_den: bool
    do_grad: bool


class MSEArgs(NamedTuple):
    """``mse``'s parameters, in order: flat pred, target and weight (a
    placeholder without), the scalars, the device denominator (a placeholder
    unless ``use_den``), the upstream gradient (``up``, ``gvec``), then the
    outputs (``grad`` and ``loss`` placeholders when not written)."""

    p: object
    t: object
    w: object
    sc: MSEScalars
    den: object
    up: GradScalars
    gvec: object
    grad: object
    loss: object
    partial: object


class FinalizeArgs(NamedTuple):
    """``finalize``'s parameters, in order."""

    partial: object
    sc: MSEScalars
    den: object
    out: object


@functools.cache
def mse_kernels(acc, pkind, tkind, tpb):
    """``(mse, weight_sum, finalize)`` for one accumulation dtype, the storage
    kinds of pred and target, and threads per block; ``mse`` takes
    :class:`MSEArgs`, ``finalize`` :class:`FinalizeArgs`, ``weight_sum``
    ``(w, times, den)``."""
    ACC = np.float64 if acc == "float64" else np.float32
    TPB = tpb
    load_p = M.loader(pkind)
    load_t = M.loader(tkind)
    store = M.storer(pkind)

    @cuda.jit
    def mse(p, t, w, sc, den, up, gvec, grad, loss, partial):
        """partial[block] = sum over the block's elements of w_k (p_k - t_k)**2;
        loss[k] = w_k d_k**2 for reduction none; with ``do_grad``
        grad[k] = 2 g w_k d_k (g: the upstream gradient, divided by the mean's
        denominator for mean; per element for ``gmode == G_ROWS``)."""
        wmode = sc.wmode
        inner = sc.inner
        red = sc.red
        den_val = sc.den_val
        use_den = sc.use_den
        do_grad = sc.do_grad
        gmode = up.gmode
        go = up.go
        sh = cuda.shared.array(TPB, np.float64)
        tid = cuda.threadIdx.x
        n = p.shape[0]
        g = go
        if gmode == G_DEVICE_SCALAR:
            g = gvec[0]
        if red == MEAN:
            d = den[0] if use_den else den_val
            g = g / d if d != 0 else 0.0
        gs = ACC(2.0 * g)
        one = ACC(1)
        total = 0.0
        start = cuda.blockIdx.x * TPB + tid
        for k in range(start, n, cuda.gridDim.x * TPB):
            dk = ACC(load_p(p[k])) - ACC(load_t(t[k]))
            if wmode == W_FULL:
                wk = ACC(w[k])
            elif wmode == W_INNER:
                wk = ACC(w[k % inner])
            elif wmode == W_OUTER:
                wk = ACC(w[k // inner])
            else:
                wk = one
            e = wk * dk * dk
            total += e
            if red == NONE:
                loss[k] = e
            if do_grad:
                if gmode == G_ROWS:
                    grad[k] = store(ACC(2.0 * gvec[k]) * wk * dk)
                elif gs == 0:  # nothing flows back (as on the CPU): zeros, even for a NaN difference
                    grad[k] = store(ACC(0))
                else:
                    grad[k] = store(gs * wk * dk)
        total = block_reduce(sh, tid, total, False)
        if tid == 0:
            partial[cuda.blockIdx.x] = total

    @cuda.jit
    def weight_sum(w, times, den):
        """One block. den[0] = times * sum_k w[k] (a device weight's broadcast sum)."""
        sh = cuda.shared.array(TPB, np.float64)
        tid = cuda.threadIdx.x
        total = 0.0
        for k in range(tid, w.shape[0], TPB):
            total += np.float64(w[k])
        total = block_reduce(sh, tid, total, False)
        if tid == 0:
            den[0] = total * times

    @cuda.jit
    def finalize(partial, sc, den, out):
        """One block. out[0] = sum of partials (divided by the denominator for
        mean; 0 when it is 0)."""
        red = sc.red
        den_val = sc.den_val
        use_den = sc.use_den
        sh = cuda.shared.array(TPB, np.float64)
        tid = cuda.threadIdx.x
        total = 0.0
        for b in range(tid, partial.shape[0], TPB):
            total += partial[b]
        total = block_reduce(sh, tid, total, False)
        if tid == 0:
            if red == MEAN:
                d = den[0] if use_den else den_val
                total = total / d if d != 0 else 0.0
            out[0] = total

    return mse, weight_sum, finalize
