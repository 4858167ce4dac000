"""Element-wise CUDA kernels that stage inputs for the loss kernels: a dtype
conversion of small side inputs (class weights, ``grad_output``) and a copy
of strided 2-D logits into a contiguous buffer (and of a gradient back)."""

import functools

import numpy as np

from . import _math as M
from ._math import cuda

__all__ = ["convert_kernel", "copy2d_kernel"]


@functools.cache
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


@functools.cache
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
