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
numpy's): see ``fastloss.ops._linear.Products``.

The reduction denominators (count / target-weight sum of the counted tokens,
or ``normalizer``) are known from the targets before the first chunk, so each
chunk's per-row upstream coefficients are final when it is processed: forward
and backward are one sweep. Ignored tokens are skipped (never multiplied).
"""

from typing import NamedTuple

import numpy as np

from .. import _validate as V
from .. import config
from ..options import CrossEntropyOptions
from ._linear import LinearSweep, check_bias, check_chunk_size, check_hidden_and_head, chunk_rows

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

    def __init__(self, hidden, lm_head, targets, bias, chunk_size, weight, opts, with_grad):
        h, w = check_hidden_and_head(hidden, lm_head, bias, "linear_cross_entropy", "hidden", "lm_head")
        nclass = w.shape[0]
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
        b = check_bias(bias, nclass, "lm_head")
        check_chunk_size(chunk_size)
        ce = self.ce
        rows = None if ce.count == ce.tgt.size else np.flatnonzero(~ce.ignored)
        chunk = chunk_rows(chunk_size, ce.count, nclass, self.acc.itemsize)
        self.sweep = LinearSweep(h, w, b, self.acc, rows, ce.count, chunk, with_grad)


def _kernels():
    """``fastloss.cpu.cross_entropy`` (numba), imported on first use."""
    from ..cpu import cross_entropy
    return cross_entropy


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
    plan = _LinearPlan(hidden, lm_head, targets, bias, chunk_size, weight, opts, False)
    K = _kernels()
    ce, sweep = plan.ce, plan.sweep
    n = ce.tgt.size
    loss = np.zeros(n, plan.acc)
    lse = np.zeros(n, plan.acc)
    if ce.count:
        cmax = sweep.start()
        scratch = ce.scratch(cmax, fused=False)
        w, tf, k = ce.kernel_weight(), ce.transform(), ce.constants()
        lrow = np.empty(cmax, plan.acc)
        srow = np.empty(cmax, plan.acc)
        for idx, c in sweep.chunks():
            _, x = sweep.logits(idx, c)
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
    plan = _LinearPlan(hidden, lm_head, targets, bias, chunk_size, weight, opts, True)
    K = _kernels()
    ce, sweep = plan.ce, plan.sweep
    acc = plan.acc
    n = ce.tgt.size
    gce, gz = ce.row_coefficients(grad_output)
    loss = np.zeros(n, acc)
    lse = np.zeros(n, acc)
    if ce.count:
        cmax = sweep.start()
        scratch = ce.scratch(cmax, fused=True)
        w, tf, k = ce.kernel_weight(), ce.transform(), ce.constants()
        lrow = np.empty(cmax, acc)
        srow = np.empty(cmax, acc)
        for idx, c in sweep.chunks():
            hc, x = sweep.logits(idx, c)
            nt = min(scratch.z.shape[0], c)
            with V.kernel_launch(nt):
                K.ce_fused(x, _sub(idx, ce.tgt), w, tf, k, _sub(idx, gce), _sub(idx, gz), x,
                           _tasks(scratch, nt), x[:nt, :0], lrow[:c], srow[:c])
            loss[idx] = lrow[:c]
            lse[idx] = srow[:c]
            sweep.backward(idx, c, hc, x)  # x now holds dL/dlogits of the chunk
    return LinearCrossEntropyResult(ce.reduce(loss, lse), *sweep.gradients())


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
