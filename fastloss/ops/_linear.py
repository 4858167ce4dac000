"""The linear layer shared by the fused linear losses (``linear_cross_entropy``,
``linear_distill_with_grad``): checks of the hidden states, head and bias,
the chunking of the tokens, the three BLAS products of a chunk and the
gradients they accumulate. Each op supplies only its loss kernel per chunk.

Per chunk of counted tokens: ``logits = hidden_chunk @ head.T (+ bias)`` into
a reused ``(chunk, V)`` buffer of the accumulation dtype (float32; float64 for
float64 input); the op's fused kernel turns it, in place, into
``d(loss)/d(logits)``; then ``grad_hidden[chunk] = dlogits @ head``,
``grad_head += dlogits.T @ hidden_chunk`` and ``grad_bias += dlogits.sum(0)``.
"""

import numpy as np

from .. import _validate as V
from .. import config
from ..cuda import is_device_array

__all__ = ["LinearSweep", "Products", "check_bias", "check_chunk_size", "check_hidden_and_head",
           "chunk_rows", "scipy_blas"]


def check_hidden_and_head(hidden, head, bias, op, hidden_name, head_name):
    """``(hidden, head)`` as float arrays of one dtype and fitting shapes
    (``(..., D)`` and ``(V, D)``, ``V > 0``); GPU arrays (bias included) are
    refused with a message naming ``op``."""
    for name, a in ((hidden_name, hidden), (head_name, head), ("bias", bias)):
        if a is not None and is_device_array(a):
            raise TypeError(f"{name}: GPU arrays are not supported by {op} "
                            "yet (CPU only); pass numpy arrays")
    h = V.float_array(hidden, hidden_name)
    if h.ndim == 0:
        raise ValueError(f"{hidden_name}: expected shape (..., D) with at least one dimension, "
                         "found a 0-d array")
    w = V.float_array(head, head_name)
    if w.ndim != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"{head_name}: expected shape (V, {h.shape[-1]}) (V, {hidden_name}.shape[-1]), "
                         f"found {w.shape}")
    if w.shape[0] == 0:
        raise ValueError(f"{head_name}: expected at least one row (class), found shape {w.shape}")
    if w.dtype != h.dtype:
        raise TypeError(f"{head_name}: expected the dtype of {hidden_name} ({h.dtype}), found {w.dtype}")
    return h, w


def check_bias(bias, nclass, head_name):
    """The bias as a float array of shape ``(V,)``, or None."""
    if bias is None:
        return None
    b = V.float_array(bias, "bias")
    if b.shape != (nclass,):
        raise ValueError(f"bias: expected shape ({nclass},) ({head_name}.shape[0]), found {b.shape}")
    return b


def check_chunk_size(chunk_size):
    """``chunk_size``: None or a positive integer (not a bool)."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size: expected a positive integer or None, "
                        f"found {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive integer, found {int(chunk_size)}")


def chunk_rows(chunk_size, count, nclass, itemsize, multiple=16):
    """Rows per chunk: ``chunk_size``, or the most rows whose logits fit in
    ``config.LINEAR_CE_LOGITS_BUDGET_BYTES``, evened out over the chunks and,
    from 32 rows up, a multiple of ``multiple`` (16, the BLAS kernels' row
    blocking: 176-row chunks run the three products ~4% faster than 179-row
    ones here; 1 leaves the evened-out count as it is)."""
    if chunk_size is not None:
        return int(chunk_size)
    if count == 0:
        return 1
    c = max(1, int(config.LINEAR_CE_LOGITS_BUDGET_BYTES) // (nclass * itemsize))
    if c >= 32:
        c -= c % multiple
    nchunk = -(-count // c)
    rows = -(-count // nchunk)
    if c >= 32:
        rows = min(c, count, -(-rows // multiple) * multiple)
    return rows


def scipy_blas():
    """``scipy.linalg.blas`` (GEMM with beta=1 accumulates grad_head without a
    (V, D) temporary), imported on first use; None without scipy."""
    try:
        from scipy.linalg import blas
    except ImportError:  # pragma: no cover - scipy is optional
        return None
    return blas


class Products:
    """The three matrix products of a chunk, all through ONE BLAS library.

    numpy and scipy each bundle their own OpenBLAS with its own thread pool.
    Alternating between them left one pool's workers spinning while the other
    worked: on 2 cores each product after a switch ran ~25% slower (176-row
    chunks of 4096 x 1024 x 128256: 729 -> 638 ms per chunk with one library).
    With scipy, every product is a ``?gemm`` on column-major views (no copies,
    and ``beta=1`` accumulates the head's gradient in place); without it,
    numpy's ``matmul``, with the head's gradient accumulated through a small
    temporary per block of classes (``config.LINEAR_CE_GRAD_WEIGHT_BLOCK_BYTES``).
    All arrays are C-contiguous 2-D of the accumulation dtype.
    """

    def __init__(self, acc, nclass, dim):
        blas = scipy_blas()
        # numpy's matmul for D = 0: scipy's f2py gemm refuses empty operands
        self.gemm = None if blas is None or dim == 0 else (blas.dgemm if acc == np.float64 else blas.sgemm)
        block_bytes = int(config.LINEAR_CE_GRAD_WEIGHT_BLOCK_BYTES)
        self.block = max(64, block_bytes // max(1, dim * np.dtype(acc).itemsize))  # D = 0: no temporary
        self.tmp = None
        self.acc, self.nclass, self.dim = acc, nclass, dim

    @staticmethod
    def _into(r, out):
        if not np.shares_memory(r, out):  # pragma: no cover - f2py copied: defensive
            out[...] = r.T

    def logits(self, hc, head, x):
        """x = hc @ head.T"""
        if self.gemm is None:
            np.matmul(hc, head.T, out=x)
        else:  # x.T (V, c) = head (V, D) @ hc.T (D, c)
            self._into(self.gemm(1.0, head.T, hc.T, trans_a=1, c=x.T, overwrite_c=1), x)

    def grad_hidden(self, g, head, out):
        """out = g @ head"""
        if self.gemm is None:
            np.matmul(g, head, out=out)
        else:  # out.T (D, c) = head.T (D, V) @ g.T (V, c)
            self._into(self.gemm(1.0, head.T, g.T, c=out.T, overwrite_c=1), out)

    def add_grad_head(self, hc, g, gw):
        """gw += g.T @ hc"""
        if self.gemm is not None:  # gw.T (D, V) += hc.T (D, c) @ g (c, V)
            self._into(self.gemm(1.0, hc.T, g.T, beta=1.0, c=gw.T, trans_b=1, overwrite_c=1), gw)
            return
        if self.tmp is None:
            self.tmp = np.empty((min(self.block, self.nclass), self.dim), self.acc)
        for v0 in range(0, self.nclass, self.block):
            v1 = min(self.nclass, v0 + self.block)
            t = self.tmp[: v1 - v0]
            np.matmul(g[:, v0:v1].T, hc, out=t)
            gw[v0:v1] += t


class LinearSweep:
    """The chunked sweep of one call over validated ``hidden`` ``(..., D)``,
    ``head`` ``(V, D)`` and ``bias``: the counted rows (``rows``: their indices
    when some tokens are ignored, else None; ``count`` of them) in chunks of
    ``chunk`` rows, the logits of a chunk, and, with ``with_grad``, the
    gradients accumulated from each chunk's ``d(loss)/d(logits)``.

    Buffers are made by :meth:`start`, called once before the first chunk
    when ``count`` > 0.
    """

    def __init__(self, hidden, head, bias, acc, rows, count, chunk, with_grad):
        self.hidden, self.head, self.bias, self.acc = hidden, head, bias, acc
        self.nclass, self.dim = head.shape
        n = int(np.prod(hidden.shape[:-1]))
        self.h2 = hidden.reshape(n, self.dim)  # a view when the layout allows, else one copy of hidden
        self.rows, self.count, self.chunk = rows, count, chunk
        self.with_grad = with_grad
        if with_grad:
            hdt = hidden.dtype
            self.grad_hidden = np.zeros(hidden.shape, hdt) if rows is not None or n == 0 \
                else np.empty(hidden.shape, hdt)
            self.gh2 = self.grad_hidden.reshape(n, self.dim)  # explicit rows: D may be 0
            self.gw = np.zeros((self.nclass, self.dim), acc)  # the output itself for float32/float64
            self.gb = None if bias is None else np.zeros(self.nclass, np.float64)

    def chunks(self):
        """(index, c): the rows of each chunk (a slice, or an index array when some
        tokens are ignored) and their number; only counted tokens are visited."""
        count, c = self.count, self.chunk
        for lo in range(0, count, c):
            hi = min(lo + c, count)
            yield (slice(lo, hi) if self.rows is None else self.rows[lo:hi]), hi - lo

    def start(self):
        """The head in the accumulation dtype (converted once for half precision),
        the chunk buffers and the products; returns the rows of the largest chunk."""
        acc, dim = self.acc, self.dim
        w = self.head
        self.head_acc = np.ascontiguousarray(w) if w.dtype == acc else w.astype(acc)
        self.bias_acc = None if self.bias is None else self.bias.astype(acc)
        cmax = min(self.chunk, max(self.count, 1))
        self.buf = np.empty((cmax, self.nclass), acc)
        # A staging buffer for hidden chunks that are not float32/64 C-contiguous rows.
        staged = self.hidden.dtype != acc or not self.h2.flags.c_contiguous
        self.hbuf = np.empty((cmax, dim), acc) if staged else None
        if self.with_grad:
            self.direct = self.rows is None and self.hidden.dtype == acc  # grad_hidden rows written by the product
            self.ghbuf = None if self.direct else np.empty((cmax, dim), acc)
        self.products = Products(acc, self.nclass, dim)
        return cmax

    def logits(self, idx, c):
        """``(hc, x)``: the hidden chunk used and ``x = buf[:c] = hc @ head.T (+ bias)``."""
        hc = self.h2[idx]
        if hc.dtype != self.acc or not hc.flags.c_contiguous:
            np.copyto(self.hbuf[:c], hc, casting="unsafe")
            hc = self.hbuf[:c]
        x = self.buf[:c]
        self.products.logits(hc, self.head_acc, x)
        if self.bias_acc is not None:
            x += self.bias_acc
        return hc, x

    def backward(self, idx, c, hc, g):
        """Accumulates the gradients of a chunk from ``g = d(loss)/d(logits)``."""
        p = self.products
        if self.direct:
            p.grad_hidden(g, self.head_acc, self.gh2[idx])
        else:
            p.grad_hidden(g, self.head_acc, self.ghbuf[:c])
            self.gh2[idx] = self.ghbuf[:c]
        p.add_grad_head(hc, g, self.gw)
        if self.gb is not None:
            self.gb += g.sum(axis=0, dtype=np.float64)

    def gradients(self):
        """``(grad_hidden, grad_head, grad_bias)`` in the dtypes of hidden, head and bias."""
        wdt = self.head.dtype
        grad_head = self.gw if wdt == self.acc else self.gw.astype(wdt)
        grad_bias = None if self.gb is None else self.gb.astype(self.bias.dtype)
        return self.grad_hidden, grad_head, grad_bias
