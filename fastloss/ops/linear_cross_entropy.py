"""Public fused linear cross-entropy API: ``linear_cross_entropy``,
``linear_cross_entropy_with_grad`` (cross-entropy of ``hidden @ lm_head.T + bias``
without ever holding the ``(N, V)`` logits).

The tokens are processed in chunks of ``chunk_size`` rows. Per chunk:

1. ``logits = hidden_chunk @ lm_head.T (+ bias)``: one BLAS product into a
   reused ``(chunk_size, V)`` buffer (float32; float64 for float64 input);
2. the fused cross-entropy kernel (:func:`fastloss.cpu.cross_entropy.ce_fused`)
   turns the buffer into per-row losses and, in place, ``d(loss)/d(logits)``;
3. ``grad_hidden[chunk] = dlogits @ lm_head`` and ``grad_weight += dlogits.T @
   hidden_chunk`` (a GEMM with beta=1 when scipy is present, so no ``(V, D)``
   temporary), ``grad_bias += dlogits.sum(0)``.

All three products go through one BLAS library (scipy's when installed, else
numpy's): see ``_Products``.

The reduction denominators (count / target-weight sum of the counted tokens,
or ``normalizer``) are known from the targets before the first chunk, so each
chunk's per-row upstream coefficients are final when it is processed: forward
and backward are one sweep. Ignored tokens are skipped (never multiplied).
"""

from typing import NamedTuple

import numpy as np

from .. import _validate as V
from .. import config
from ..cuda import is_device_array
from ..options import CrossEntropyOptions

__all__ = ["LinearCrossEntropyResult", "linear_cross_entropy", "linear_cross_entropy_with_grad"]


class LinearCrossEntropyResult(NamedTuple):
    """Loss and gradients of :func:`linear_cross_entropy_with_grad`."""

    loss: object
    """Python float for "mean"/"sum"; array of ``targets.shape`` for "none"."""
    grad_hidden: np.ndarray
    """``d(grad_output * loss)/d(hidden)``: hidden's shape and dtype."""
    grad_weight: np.ndarray
    """``d(grad_output * loss)/d(lm_head)``: ``(V, D)`` in lm_head's dtype."""
    grad_bias: object
    """``d(grad_output * loss)/d(bias)`` in bias's dtype, or None without a bias."""


class _LinearPlan:
    """Validated inputs of one linear cross-entropy call."""

    def __init__(self, hidden, lm_head, targets, bias, chunk_size, weight, opts):
        for name, a in (("hidden", hidden), ("lm_head", lm_head), ("bias", bias)):
            if a is not None and is_device_array(a):
                raise TypeError(f"{name}: GPU arrays are not supported by linear_cross_entropy "
                                "yet (CPU only); pass numpy arrays")
        h = V.float_array(hidden, "hidden")
        if h.ndim == 0:
            raise ValueError("hidden: expected shape (..., D) with at least one dimension, "
                             "found a 0-d array")
        w = V.float_array(lm_head, "lm_head")
        if w.ndim != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(f"lm_head: expected shape (V, {h.shape[-1]}) (V, hidden.shape[-1]), "
                             f"found {w.shape}")
        if w.shape[0] == 0:
            raise ValueError(f"lm_head: expected at least one row (class), found shape {w.shape}")
        if w.dtype != h.dtype:
            raise TypeError(f"lm_head: expected the dtype of hidden ({h.dtype}), found {w.dtype}")
        nclass, dim = w.shape
        t = np.asarray(targets)
        if t.dtype.kind in "iu" and t.shape != h.shape[:-1]:
            raise ValueError(f"targets: expected shape {h.shape[:-1]} (hidden.shape[:-1]), "
                             f"found {t.shape}")
        self.acc = V.acc_dtype(h.dtype)
        # The cross-entropy plan sees (N, V) logits of the accumulation dtype: a
        # zero-stride stand-in, so nothing of that size is allocated.
        fake = np.broadcast_to(np.zeros((), self.acc), h.shape[:-1] + (nclass,))
        from ..cpu.cross_entropy_host import CrossEntropyPlan
        self.ce = CrossEntropyPlan(fake, t, weight, opts)
        if bias is not None:
            b = V.float_array(bias, "bias")
            if b.shape != (nclass,):
                raise ValueError(f"bias: expected shape ({nclass},) (lm_head.shape[0]), found {b.shape}")
            self.bias = b
        else:
            self.bias = None
        if chunk_size is not None:
            if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)):
                raise TypeError(f"chunk_size: expected a positive integer or None, "
                                f"found {type(chunk_size).__name__}")
            if chunk_size < 1:
                raise ValueError(f"chunk_size: expected a positive integer, found {int(chunk_size)}")
        self.hidden, self.lm_head = h, w
        self.nclass, self.dim = nclass, dim
        self.h2 = h.reshape(int(np.prod(h.shape[:-1])), dim)  # a view when the layout allows, else one copy of hidden
        self.rows = None if self.ce.count == self.ce.tgt.size else np.flatnonzero(~self.ce.ignored)
        self.chunk = _chunk_rows(chunk_size, self.ce.count, nclass, self.acc.itemsize)

    def compute_head(self):
        """The LM head in the accumulation dtype (converted once for half precision)."""
        w = self.lm_head
        return np.ascontiguousarray(w) if w.dtype == self.acc else w.astype(self.acc)

    def chunks(self):
        """(index, c): the rows of each chunk (a slice, or an index array when some
        tokens are ignored) and their number; only counted tokens are visited."""
        count, c = self.ce.count, self.chunk
        for lo in range(0, count, c):
            hi = min(lo + c, count)
            yield (slice(lo, hi) if self.rows is None else self.rows[lo:hi]), hi - lo

    def logits_into(self, buf, idx, c, head, hbuf, products):
        """buf[:c] = hidden[idx] @ head.T (+ bias); returns the hidden chunk used."""
        hc = self.h2[idx]
        if hc.dtype != self.acc or not hc.flags.c_contiguous:
            np.copyto(hbuf[:c], hc, casting="unsafe")
            hc = hbuf[:c]
        x = buf[:c]
        products.logits(hc, head, x)
        if self.bias is not None:
            x += self.bias_acc
        return hc, x


class _Products:
    """The three matrix products of a chunk, all through ONE BLAS library.

    numpy and scipy each bundle their own OpenBLAS with its own thread pool.
    Alternating between them left one pool's workers spinning while the other
    worked: on 2 cores each product after a switch ran ~25% slower (176-row
    chunks of 4096 x 1024 x 128256: 729 -> 638 ms per chunk with one library).
    With scipy, every product is a ``?gemm`` on column-major views (no copies,
    and ``beta=1`` accumulates ``grad_weight`` in place); without it, numpy's
    ``matmul``, with ``grad_weight`` accumulated through a small temporary per
    block of classes (``config.LINEAR_CE_GRAD_WEIGHT_BLOCK_BYTES``).
    All arrays are C-contiguous 2-D of the accumulation dtype.
    """

    def __init__(self, acc, nclass, dim):
        _blas = _scipy_blas()
        # numpy's matmul for D = 0: scipy's f2py gemm refuses empty operands
        self.gemm = None if _blas is None or dim == 0 else (_blas.dgemm if acc == np.float64 else _blas.sgemm)
        block_bytes = int(config.LINEAR_CE_GRAD_WEIGHT_BLOCK_BYTES)
        self.block = max(64, block_bytes // max(1, dim * np.dtype(acc).itemsize))  # D = 0: no temporary
        self.tmp = None
        self.acc, self.nclass, self.dim = acc, nclass, dim

    def _check(self, r, out):
        if not np.shares_memory(r, out):  # pragma: no cover - f2py copied: defensive
            out[...] = r.T

    def logits(self, hc, head, x):
        """x = hc @ head.T"""
        if self.gemm is None:
            np.matmul(hc, head.T, out=x)
        else:  # x.T (V, c) = head (V, D) @ hc.T (D, c)
            self._check(self.gemm(1.0, head.T, hc.T, trans_a=1, c=x.T, overwrite_c=1), x)

    def grad_hidden(self, g, head, out):
        """out = g @ head"""
        if self.gemm is None:
            np.matmul(g, head, out=out)
        else:  # out.T (D, c) = head.T (D, V) @ g.T (V, c)
            self._check(self.gemm(1.0, head.T, g.T, c=out.T, overwrite_c=1), out)

    def add_grad_weight(self, hc, g, gw):
        """gw += g.T @ hc"""
        if self.gemm is not None:  # gw.T (D, V) += hc.T (D, c) @ g (c, V)
            self._check(self.gemm(1.0, hc.T, g.T, beta=1.0, c=gw.T, trans_b=1, overwrite_c=1), gw)
            return
        if self.tmp is None:
            self.tmp = np.empty((min(self.block, self.nclass), self.dim), self.acc)
        for v0 in range(0, self.nclass, self.block):
            v1 = min(self.nclass, v0 + self.block)
            t = self.tmp[: v1 - v0]
            np.matmul(g[:, v0:v1].T, hc, out=t)
            gw[v0:v1] += t


def _scipy_blas():
    """``scipy.linalg.blas`` (GEMM with beta=1 accumulates grad_weight without a
    (V, D) temporary), imported on first use; None without scipy."""
    try:
        from scipy.linalg import blas
    except ImportError:  # pragma: no cover - scipy is optional
        return None
    return blas


def _kernels():
    """``fastloss.cpu.cross_entropy`` (numba), imported on first use."""
    from ..cpu import cross_entropy
    return cross_entropy


def _chunk_rows(chunk_size, count, nclass, itemsize):
    """Rows per chunk: ``chunk_size``, or the most rows whose logits fit in
    ``config.LINEAR_CE_LOGITS_BUDGET_BYTES``, evened out over the chunks and, from
    32 rows up, a multiple of 16 (the BLAS kernels' row blocking: 176-row chunks
    run the three products ~4% faster than 179-row ones here)."""
    if chunk_size is not None:
        return int(chunk_size)
    if count == 0:
        return 1
    c = max(1, int(config.LINEAR_CE_LOGITS_BUDGET_BYTES) // (nclass * itemsize))
    if c >= 32:
        c -= c % 16
    nchunk = -(-count // c)
    rows = -(-count // nchunk)
    if c >= 32:
        rows = min(c, count, -(-rows // 16) * 16)
    return rows


def _prepare(plan):
    """Buffers shared by the forward and fused sweeps."""
    ce = plan.ce
    c = min(plan.chunk, max(ce.count, 1))
    buf = np.empty((c, plan.nclass), plan.acc)
    # A staging buffer for hidden chunks that are not float32/64 C-contiguous rows.
    staged = plan.hidden.dtype != plan.acc or not plan.h2.flags.c_contiguous
    hbuf = np.empty((c, plan.dim), plan.acc) if staged else None
    plan.bias_acc = None if plan.bias is None else plan.bias.astype(plan.acc)
    return buf, hbuf


def _sub(idx, a):
    """a[idx] as a view for a slice (a copy for an index array)."""
    return a[idx]


def _tasks(scratch, nt):
    """The scratch rows of the first ``nt`` tasks (a chunk of fewer rows than tasks)."""
    return _kernels().CEScratch(scratch.z[:nt], scratch.t[:nt], scratch.shifts[:nt])


def linear_cross_entropy(hidden, lm_head, /, targets, *, bias=None, weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, softcap=None, logit_scale=1.0, normalizer=None,
                         chunk_size=None):
    """Cross-entropy of the logits ``hidden @ lm_head.T + bias``, never holding them.

    Parameters
    ----------
    hidden : array_like, shape (..., D)
        Final hidden states; float16, bfloat16, float32 or float64. Not modified.
    lm_head : array_like, shape (V, D)
        The output projection (``nn.Linear`` layout), same dtype as ``hidden``.
        Positional only: ``weight=`` is the class-weight keyword, as in
        :func:`fastloss.cross_entropy`.
    targets : array_like of int, shape ``hidden.shape[:-1]``
        Class indices in ``[0, V)``, or ``ignore_index``.
    bias : array_like, shape (V,), optional
        Output bias (any supported float dtype).
    weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, normalizer
        As in :func:`fastloss.cross_entropy`, applied to the logits.
    chunk_size : int > 0, optional
        Tokens per chunk. None picks the most tokens whose ``(chunk, V)``
        logits buffer fits in ``fastloss.config.LINEAR_CE_LOGITS_BUDGET_BYTES``
        (90 MiB by default, under 5% of the logits at 4096 x 128256; read
        at call time).

    Returns
    -------
    float or numpy.ndarray
        As :func:`fastloss.cross_entropy` returns for these logits.

    Raises
    ------
    TypeError
        Unsupported dtypes, ``lm_head`` of another dtype than ``hidden``, a
        non-integer ``chunk_size``, or a GPU array.
    ValueError
        Shapes that do not fit together, options out of range, bad targets
        (messages name the argument).

    Notes
    -----
    Logits are computed chunk by chunk in float32 (float64 for float64 input)
    by BLAS, then reduced by the cross-entropy kernel; ignored tokens are
    skipped. Extra memory: the ``(chunk, V)`` logits buffer, per-token
    float32 losses, and for float16/bfloat16 a float32 copy of ``lm_head``
    (``V * D * 4`` bytes) plus a ``(chunk, D)`` float32 hidden buffer.

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> rng = np.random.default_rng(0)
    >>> h = rng.standard_normal((6, 4)).astype(np.float32)
    >>> W = rng.standard_normal((10, 4)).astype(np.float32)
    >>> t = np.array([1, 2, 3, -100, 9, 0])
    >>> a = fastloss.linear_cross_entropy(h, W, t, chunk_size=4)
    >>> b = fastloss.cross_entropy(h @ W.T, t)
    >>> bool(abs(a - b) < 1e-5)
    True
    """
    opts = CrossEntropyOptions.cached(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                      logit_scale, normalizer)
    if chunk_size is None and _small(hidden, lm_head, targets, bias):
        return _small_call(hidden, lm_head, targets, bias, weight, opts, False, None)
    plan = _LinearPlan(hidden, lm_head, targets, bias, chunk_size, weight, opts)
    K = _kernels()
    ce = plan.ce
    n = ce.tgt.size
    loss = np.zeros(n, plan.acc)
    lse = np.zeros(n, plan.acc)
    if ce.count:
        head = plan.compute_head()
        buf, hbuf = _prepare(plan)
        scratch = ce.scratch(buf.shape[0], fused=False)
        w, tf, k = ce.kernel_weight(), ce.transform(), ce.constants()
        lrow = np.empty(buf.shape[0], plan.acc)
        srow = np.empty(buf.shape[0], plan.acc)
        products = _Products(plan.acc, plan.nclass, plan.dim)
        for idx, c in plan.chunks():
            _, x = plan.logits_into(buf, idx, c, head, hbuf, products)
            nt = min(scratch.z.shape[0], c)
            with V.kernel_launch(nt):
                K.ce_forward(x, _sub(idx, ce.tgt), w, tf, k, _tasks(scratch, nt), lrow[:c], srow[:c])
            loss[idx] = lrow[:c]
            lse[idx] = srow[:c]
    return ce.reduce(loss, lse)


def linear_cross_entropy_with_grad(hidden, lm_head, /, targets, *, bias=None, weight=None,
                                   ignore_index=-100, reduction="mean", label_smoothing=0.0,
                                   z_loss=0.0, softcap=None, logit_scale=1.0, normalizer=None,
                                   grad_output=None, chunk_size=None):
    """Linear cross-entropy and its gradients for hidden, LM head and bias, in one sweep.

    Parameters
    ----------
    hidden, lm_head, targets, bias, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, \
    logit_scale, normalizer, chunk_size
        As in :func:`linear_cross_entropy`.
    grad_output : float or array_like, optional
        Upstream gradient: a scalar for "mean"/"sum" (default 1.0); a scalar or
        an array of ``targets.shape`` for "none".

    Returns
    -------
    LinearCrossEntropyResult
        ``(loss, grad_hidden, grad_weight, grad_bias)``: the loss as
        :func:`linear_cross_entropy`; ``grad_hidden`` of hidden's shape and
        dtype (zero rows for ignored tokens), ``grad_weight`` of ``(V, D)`` in
        lm_head's dtype, ``grad_bias`` of ``(V,)`` in bias's dtype, or None
        without a bias. All are ``d(grad_output * loss)/d(input)``.

    Raises
    ------
    TypeError, ValueError
        As :func:`linear_cross_entropy`, plus a bad ``grad_output``.

    Notes
    -----
    With ``G = d(loss)/d(logits)`` (computed per chunk, in place, by the
    fused cross-entropy kernel): ``grad_hidden = G @ lm_head``, ``grad_weight
    = G.T @ hidden``, ``grad_bias = G.sum(0)``. Products and accumulators are
    float32 (float64 for float64 input); a float16/bfloat16 gradient is
    rounded once at the end. Extra memory: the ``(chunk, V)`` logits buffer;
    for float16/bfloat16 also a float32 copy of ``lm_head`` and a float32
    ``grad_weight`` accumulator (``2 * V * D * 4`` bytes) and ``(chunk, D)``
    float32 buffers; without scipy, an 8 MiB temporary for the ``grad_weight``
    accumulation (``config.LINEAR_CE_GRAD_WEIGHT_BLOCK_BYTES``). A NaN in one token's logits makes its loss
    NaN and, through the shared weights, ``grad_weight`` NaN (as in PyTorch).

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> rng = np.random.default_rng(0)
    >>> h = rng.standard_normal((5, 3))
    >>> W = rng.standard_normal((7, 3))
    >>> t = np.array([0, 6, 2, 2, 1])
    >>> r = fastloss.linear_cross_entropy_with_grad(h, W, t, bias=np.zeros(7))
    >>> _, G = fastloss.cross_entropy_with_grad(h @ W.T, t)
    >>> bool(np.allclose(r.grad_weight, G.T @ h) and np.allclose(r.grad_hidden, G @ W))
    True
    >>> r.grad_bias.shape
    (7,)
    """
    opts = CrossEntropyOptions.cached(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                      logit_scale, normalizer)
    if chunk_size is None and _small(hidden, lm_head, targets, bias):
        return _small_call(hidden, lm_head, targets, bias, weight, opts, True, grad_output)
    plan = _LinearPlan(hidden, lm_head, targets, bias, chunk_size, weight, opts)
    K = _kernels()
    ce = plan.ce
    acc = plan.acc
    n = ce.tgt.size
    gce, gz = ce.row_coefficients(grad_output)
    loss = np.zeros(n, acc)
    lse = np.zeros(n, acc)
    hdt, wdt = plan.hidden.dtype, plan.lm_head.dtype
    grad_hidden = np.zeros(plan.hidden.shape, hdt) if plan.rows is not None or n == 0 \
        else np.empty(plan.hidden.shape, hdt)
    gh2 = grad_hidden.reshape(plan.h2.shape)  # explicit rows: D may be 0
    gw = np.zeros((plan.nclass, plan.dim), acc)  # the output itself for float32/float64
    gb = None if plan.bias is None else np.zeros(plan.nclass, np.float64)
    if ce.count:
        head = plan.compute_head()
        buf, hbuf = _prepare(plan)
        cmax = buf.shape[0]
        scratch = ce.scratch(cmax, fused=True)
        w, tf, k = ce.kernel_weight(), ce.transform(), ce.constants()
        lrow = np.empty(cmax, acc)
        srow = np.empty(cmax, acc)
        direct = plan.rows is None and hdt == acc  # grad_hidden rows written by the product
        ghbuf = None if direct else np.empty((cmax, plan.dim), acc)
        products = _Products(acc, plan.nclass, plan.dim)
        for idx, c in plan.chunks():
            hc, x = plan.logits_into(buf, idx, c, head, hbuf, products)
            nt = min(scratch.z.shape[0], c)
            with V.kernel_launch(nt):
                K.ce_fused(x, _sub(idx, ce.tgt), w, tf, k, _sub(idx, gce), _sub(idx, gz), x,
                           _tasks(scratch, nt), lrow[:c], srow[:c])
            loss[idx] = lrow[:c]
            lse[idx] = srow[:c]
            # x now holds dL/dlogits of the chunk.
            if direct:
                products.grad_hidden(x, head, gh2[idx])
            else:
                products.grad_hidden(x, head, ghbuf[:c])
                gh2[idx] = ghbuf[:c]
            products.add_grad_weight(hc, x, gw)
            if gb is not None:
                gb += x.sum(axis=0, dtype=np.float64)
    grad_weight = gw if wdt == acc else gw.astype(wdt)
    grad_bias = None if gb is None else gb.astype(plan.bias.dtype)
    return LinearCrossEntropyResult(ce.reduce(loss, lse), grad_hidden, grad_weight, grad_bias)


# Small calls: all logits at once (at most ``config.SERIAL_MAX_ELEMENTS``), one
# numpy product, the serial cross-entropy kernel, two more products; no plan,
# no chunks, no thread launch. The same arithmetic as the chunked sweep (the
# products in the accumulation dtype, ignored tokens never multiplied).

def _small(hidden, lm_head, targets, bias):
    """Whether a call can take the small path: plain numpy arrays of one supported
    float dtype with fitting shapes, integer targets, at most
    ``config.SERIAL_MAX_ELEMENTS`` logits that also fit the chunk budget
    ``config.LINEAR_CE_LOGITS_BUDGET_BYTES``. Anything else (and every error) goes
    through ``_LinearPlan``, which words the messages."""
    if not (type(hidden) is np.ndarray and type(lm_head) is np.ndarray and type(targets) is np.ndarray
            and (bias is None or type(bias) is np.ndarray)):
        return False
    if (hidden.ndim == 0 or lm_head.ndim != 2 or hidden.dtype != lm_head.dtype
            or lm_head.shape[1] != hidden.shape[-1] or lm_head.shape[1] == 0 or lm_head.shape[0] == 0
            or targets.dtype.kind not in "iu" or targets.shape != hidden.shape[:-1]):
        return False
    if not V.is_float_dtype(hidden.dtype):
        return False
    if bias is not None and (bias.shape != (lm_head.shape[0],) or not V.is_float_dtype(bias.dtype)):
        return False
    nlogits = targets.size * lm_head.shape[0]
    return (nlogits <= config.SERIAL_MAX_ELEMENTS
            and nlogits * V.acc_dtype(hidden.dtype).itemsize <= config.LINEAR_CE_LOGITS_BUDGET_BYTES)


def _small_call(hidden, lm_head, targets, bias, weight, opts, with_grad, grad_output):
    """The whole call on the small path (``_small`` was checked)."""
    from ..cpu import cross_entropy_host as H

    acc = V.acc_dtype(hidden.dtype)
    nclass, dim = lm_head.shape
    h2 = hidden.reshape(-1, dim)
    t = targets.reshape(-1)
    n = t.size
    ignored = t == opts.ignore_index
    rows = np.flatnonzero(~ignored) if ignored.any() else None
    hc = h2 if rows is None else h2[rows]
    hc = np.ascontiguousarray(hc, dtype=acc)
    head = np.ascontiguousarray(lm_head, dtype=acc)
    x = hc @ head.T
    if bias is not None:
        x += bias.astype(acc)
    none = opts.reduction == "none"
    go = grad_output
    if rows is None:  # the caller's shapes, so messages about grad_output name them
        xc, tc = x.reshape(targets.shape + (nclass,)), targets
    else:
        xc, tc = x, t[rows]
        if with_grad and none and grad_output is not None:
            g = V.rows_grad_output(grad_output, targets.shape, "targets.shape")
            go = g if type(g) is float else g.reshape(-1)[rows]
    try:
        if with_grad:
            loss, grad = H.cross_entropy_with_grad(xc, tc, weight, opts, go, None, True)
            grad = grad.reshape(-1, nclass)
        else:
            loss = H.cross_entropy(xc, tc, weight, opts)
    except ValueError:
        # Positions in a message must be those of the caller's targets.
        V.targets_for_kernel(targets, hidden.shape[:-1] + (nclass,), opts.ignore_index)
        raise
    if none and rows is not None:
        full = np.zeros(n, loss.dtype)
        full[rows] = loss
        loss = full.reshape(targets.shape)
    if not with_grad:
        return loss
    gh = grad @ head
    if rows is not None:
        full = np.zeros((n, dim), acc)
        full[rows] = gh
        gh = full
    grad_hidden = gh.reshape(hidden.shape).astype(hidden.dtype, copy=False)
    grad_weight = (grad.T @ hc).astype(lm_head.dtype, copy=False)
    grad_bias = None if bias is None else grad.sum(axis=0, dtype=np.float64).astype(bias.dtype)
    return LinearCrossEntropyResult(loss, grad_hidden, grad_weight, grad_bias)
