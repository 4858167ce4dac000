"""Public cross-entropy API: ``cross_entropy``, ``cross_entropy_with_grad``, ``logsumexp``."""

import numpy as np

from .. import _validate as V
from .. import cuda as _cuda
from ..cpu import cross_entropy as K

__all__ = ["cross_entropy", "cross_entropy_with_grad", "logsumexp"]


class _Plan:
    """Validated inputs and derived constants of one cross-entropy call."""

    def __init__(self, logits, targets, weight, ignore_index, reduction, label_smoothing,
                 z_loss, softcap, logit_scale, normalizer):
        self.logits = V.logits_array(logits)
        self.reduction = V.check_reduction(reduction)
        self.eps = V.check_range(label_smoothing, "label_smoothing", low=0.0, high=1.0)
        self.zl = V.check_range(z_loss, "z_loss", low=0.0)
        self.norm = V.check_range(normalizer, "normalizer", low=0.0, low_open=True, allow_none=True)
        if self.norm is not None and self.reduction != "mean":
            raise ValueError(f"normalizer: only used with reduction='mean', found reduction={self.reduction!r}")
        self.mode, self.scale, self.cap = _transform(softcap, logit_scale)
        shape = self.logits.shape
        self.nclass = shape[-1]
        self.tgt, self.ignored = V.targets_for_kernel(targets, shape, ignore_index)
        self.acc = V.acc_dtype(self.logits.dtype)
        self.weight = V.class_weight(weight, self.nclass, self.acc)
        self.count = int(self.tgt.size - np.count_nonzero(self.ignored))
        if self.weight is None:
            self.wsum = float(self.nclass)
            self.target_wsum = float(self.count)
        else:
            self.wsum = float(self.weight.sum(dtype=np.float64))
            counted = self.tgt[~self.ignored]
            self.target_wsum = float(self.weight[counted].sum(dtype=np.float64))

    def denominators(self):
        """(D_ce, D_z) for mean: cross-entropy is divided by the counted target
        weight (or count), z-loss by the count; ``normalizer`` replaces both."""
        if self.norm is not None:
            return self.norm, self.norm
        return self.target_wsum, float(self.count)

    def kernel_args(self):
        acc = self.acc.type
        w = self.weight if self.weight is not None else np.empty(0, self.acc)
        return (w, self.weight is not None, acc(self.wsum), self.mode, acc(self.scale),
                acc(self.cap), acc(self.eps))

    def reduce(self, loss_rows, lse_rows):
        """Combine per-row cross-entropy and logsumexp into the requested reduction."""
        zl = self.zl
        if self.reduction == "none":
            out = loss_rows
            if zl > 0:
                out = out + self.acc.type(zl) * lse_rows * lse_rows
            return out.reshape(self.logits.shape[:-1])
        ce = float(loss_rows.sum(dtype=np.float64))
        z = float(np.square(lse_rows, dtype=np.float64).sum()) if zl > 0 else 0.0
        if self.reduction == "sum":
            return ce + zl * z
        d_ce, d_z = self.denominators()
        return _safe_div(ce, d_ce) + (_safe_div(zl * z, d_z) if zl > 0 else 0.0)


def _safe_div(num, den):
    """num / den, with a zero denominator (nothing counted) giving 0."""
    return num / den if den != 0 else 0.0


def _transform(softcap, logit_scale):
    scale = V.check_range(logit_scale, "logit_scale", low=0.0, low_open=True)
    cap = V.check_range(softcap, "softcap", low=0.0, low_open=True, allow_none=True)
    if cap is not None:
        return K.SOFTCAP, scale, cap
    return (K.PLAIN if scale == 1.0 else K.SCALED), scale, 1.0


def _scratch(plan, rows, need_z, need_t):
    """Per-task scratch rows for the kernels: (zbuf, tbuf, sbuf); sbuf holds the
    per-block shifts of the fused kernel (allocated with ``need_z``)."""
    ntask = V.num_tasks(rows, rows * plan.nclass)
    zbuf = np.empty((ntask, plan.nclass if need_z else 0), plan.acc)
    tbuf = np.empty((ntask, plan.nclass if need_t else 0), plan.acc)
    sbuf = np.empty((ntask, K.n_row_blocks(plan.nclass) if need_z else 0), plan.acc)
    return zbuf, tbuf, sbuf


def _forward_rows(plan):
    """Per-row (cross-entropy, logsumexp) arrays in the accumulation dtype."""
    n = plan.tgt.size
    loss = np.empty(n, plan.acc)
    lse = np.empty(n, plan.acc)
    if n:
        x = V.kernel_view(plan.logits).reshape(n, plan.nclass)
        zbuf, tbuf, _ = _scratch(plan, n, plan.mode != K.PLAIN, plan.mode == K.SOFTCAP)
        with V.kernel_launch(zbuf.shape[0]):
            K.ce_forward(x, plan.tgt, *plan.kernel_args(), zbuf, tbuf, loss, lse)
    return loss, lse


def cross_entropy(logits, targets, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                  normalizer=None):
    """Softmax cross-entropy of logits against class-index targets.

    Parameters
    ----------
    logits : array_like, shape (..., V)
        Unnormalised scores; float16, bfloat16 (``ml_dtypes.bfloat16``),
        float32 or float64. Not modified.
    targets : array_like of int, shape ``logits.shape[:-1]``
        Class indices in ``[0, V)``, or ``ignore_index``.
    weight : array_like, shape (V,), optional
        Non-negative, finite per-class weights (as in PyTorch).
    ignore_index : int, default -100
        Target value whose tokens are not counted: zero loss, zero gradient.
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" divides by the summed weight of the counted targets (their
        number without ``weight``), "sum" adds, "none" returns per-token losses.
    label_smoothing : float in [0, 1], default 0.0
        Mixes the one-hot target with the uniform distribution (PyTorch's rule).
    z_loss : float >= 0, default 0.0
        Adds ``z_loss * lse**2`` per counted token (not class-weighted); for
        "mean" it is divided by the number of counted tokens.
    softcap : float > 0, optional
        Caps logits as ``softcap * tanh(x / softcap)`` after scaling; ``-inf`` stays ``-inf``.
    logit_scale : float > 0, default 1.0
        Multiplies the logits first (inverse temperature).
    normalizer : float > 0, optional
        With "mean", divide the summed loss by this instead of the count/weight
        sum (to share one denominator across micro-batches).

    Returns
    -------
    float or numpy.ndarray
        A Python float for "mean"/"sum"; for "none" an array of
        ``targets.shape`` (float32, float64 for float64 logits), 0 at ignored tokens.

    Raises
    ------
    TypeError
        Unsupported dtype of ``logits``, ``targets`` or ``weight``, or a
        non-numeric option.
    ValueError
        Bad shapes, options out of range, or targets outside ``[0, V)`` that
        are not ``ignore_index`` (the message gives their count and the first one).

    Notes
    -----
    With ``z = transform(x)``, ``lse = log sum_j exp(z_j)`` and ``eps =
    label_smoothing``, a counted token with target ``t`` contributes
    ``(1 - eps) w_t (lse - z_t) + eps / V * sum_j w_j (lse - z_j) + z_loss * lse**2``.
    Statistics accumulate in float32 (float64 for float64 logits). A mean
    over zero counted tokens is 0.0, where PyTorch returns NaN.

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], dtype=np.float32)
    >>> round(fastloss.cross_entropy(logits, np.array([0, 2])), 4)
    0.6216
    >>> fastloss.cross_entropy(logits, np.array([-100, -100]))
    0.0
    """
    if _cuda.is_device_array(logits):
        from ..cuda import api
        return api.cross_entropy(
            logits, targets, weight=weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            logit_scale=logit_scale, normalizer=normalizer)
    plan = _Plan(logits, targets, weight, ignore_index, reduction, label_smoothing, z_loss,
                 softcap, logit_scale, normalizer)
    return plan.reduce(*_forward_rows(plan))


def cross_entropy_with_grad(logits, targets, *, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                            logit_scale=1.0, normalizer=None, grad_output=None, out=None,
                            inplace=False):
    """Cross-entropy and its gradient with respect to the logits, in one fused pass.

    Parameters
    ----------
    logits, targets, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, normalizer
        As in :func:`cross_entropy`.
    grad_output : float or array_like, optional
        Upstream gradient: a scalar for "mean"/"sum" (default 1.0); a scalar or
        an array of ``targets.shape`` for "none".
    out : numpy.ndarray, optional
        Writable C-contiguous array of ``logits.shape`` and dtype that receives
        the gradient (no allocation). Must not overlap ``logits`` unless it is
        ``logits`` itself.
    inplace : bool, default False
        Overwrite ``logits`` (a writable numpy array) with the gradient; the
        returned ``grad is logits``. Cannot be combined with ``out``.

    Returns
    -------
    loss : float or numpy.ndarray
        As returned by :func:`cross_entropy`.
    grad : numpy.ndarray
        ``d(grad_output * loss) / d(logits)``, of logits' shape and dtype,
        computed in the accumulation precision and rounded once; zero in the
        rows of ignored tokens.

    Raises
    ------
    TypeError, ValueError
        As :func:`cross_entropy`, plus a bad ``grad_output``, ``out`` or
        ``inplace`` request (the message names the argument).

    Notes
    -----
    For a counted token, with ``p = softmax(z)`` and upstream ``g`` (already
    divided by the mean's denominator), ``dL/dz_j = g [((1 - eps) w_t + eps W / V) p_j
    - (1 - eps) w_t [j = t] - eps w_j / V] + g_z 2 z_loss lse p_j``, ``W = sum w``,
    then times ``dz/dx`` (``logit_scale``, and ``1 - tanh^2`` under softcap).

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], dtype=np.float32)
    >>> loss, grad = fastloss.cross_entropy_with_grad(logits, np.array([0, 2]))
    >>> grad.shape, grad.dtype
    ((2, 3), dtype('float32'))
    >>> bool(np.allclose(grad.sum(axis=1), 0.0, atol=1e-6))  # softmax - onehot rows sum to 0
    True
    """
    if _cuda.is_device_array(logits):
        from ..cuda import api
        return api.cross_entropy_with_grad(
            logits, targets, weight=weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            logit_scale=logit_scale, normalizer=normalizer,
            grad_output=grad_output, out=out, inplace=inplace)
    plan = _Plan(logits, targets, weight, ignore_index, reduction, label_smoothing, z_loss,
                 softcap, logit_scale, normalizer)
    x = plan.logits
    n = plan.tgt.size
    gce, gz = _row_coefficients(plan, grad_output)
    grad, copy_back = _grad_buffer(logits, x, out, inplace)
    loss = np.empty(n, plan.acc)
    lse = np.empty(n, plan.acc)
    if n:
        xk = V.kernel_view(x).reshape(n, plan.nclass)
        gk = V.kernel_view(grad).reshape(n, plan.nclass)
        zbuf, tbuf, sbuf = _scratch(plan, n, True, plan.mode == K.SOFTCAP)
        w, has_w, wsum, mode, scale, cap, eps = plan.kernel_args()
        with V.kernel_launch(zbuf.shape[0]):
            K.ce_fused(xk, plan.tgt, w, has_w, wsum, mode, scale, cap, eps,
                       plan.acc.type(plan.zl), gce, gz, gk, zbuf, tbuf, sbuf, loss, lse)
    if copy_back:
        x[...] = grad
    if inplace:
        grad = logits  # the caller's own object (an ndarray subclass such as np.memmap included)
    return plan.reduce(loss, lse), grad


def _row_coefficients(plan, grad_output):
    """Per-row upstream coefficients (gce, gz) of the cross-entropy and z-loss terms,
    already divided by the mean's denominators; 0 for ignored rows."""
    n = plan.tgt.size
    if plan.reduction == "none":
        if grad_output is None:
            g = np.ones(n)
        elif np.ndim(grad_output) == 0:
            g = np.full(n, V.real_scalar(grad_output, "grad_output"))
        else:
            g = np.asarray(grad_output)
            if g.dtype.kind not in "iuf" and g.dtype != V.BFLOAT16:
                raise TypeError(f"grad_output: expected a real array, found dtype {g.dtype}")
            want = plan.logits.shape[:-1]
            if g.shape != want:
                raise ValueError(f"grad_output: expected a scalar or shape {want} "
                                 f"(targets.shape) for reduction='none', found {g.shape}")
            g = g.astype(np.float64).reshape(-1)
        gce = g
        gz = g
    else:
        if grad_output is None:
            go = 1.0
        else:
            if np.ndim(grad_output) != 0 and np.size(grad_output) != 1:
                raise ValueError(f"grad_output: expected a scalar for reduction={plan.reduction!r}, "
                                 f"found shape {np.shape(grad_output)}")
            go = V.real_scalar(np.asarray(grad_output).reshape(()), "grad_output")
        if plan.reduction == "mean":
            d_ce, d_z = plan.denominators()
            gce = np.full(n, _safe_div(go, d_ce))
            gz = np.full(n, _safe_div(go, d_z))
        else:
            gce = np.full(n, go)
            gz = gce
    gce = np.where(plan.ignored, 0.0, gce).astype(plan.acc)
    gz = np.where(plan.ignored, 0.0, gz).astype(plan.acc)
    return gce, gz


def _grad_buffer(original, x, out, inplace):
    """Where the gradient goes: (buffer, copy_back). ``copy_back`` is set when
    ``inplace`` targets a non-contiguous array, which is computed into a fresh
    buffer and copied over the logits afterwards."""
    if not isinstance(inplace, (bool, np.bool_)):
        raise TypeError(f"inplace: expected True or False, found {inplace!r}")
    if inplace:
        if out is not None:
            raise ValueError("out: cannot be combined with inplace=True (the gradient goes into logits)")
        if not isinstance(original, np.ndarray):
            raise TypeError(f"logits: inplace=True needs a numpy array, found {type(original).__name__}")
        if x is not original and not np.shares_memory(x, original):
            raise ValueError(f"logits: inplace=True needs a native-byte-order float array, "
                             f"found dtype {original.dtype}")
        if not x.flags.writeable:
            raise ValueError("logits: inplace=True needs a writable array, found a read-only one")
        if x.flags.c_contiguous:
            return x, False
        return np.empty(x.shape, x.dtype), True
    if out is None:
        return np.empty(x.shape, x.dtype), False
    V.out_array(out, x.shape, x.dtype)
    same = out.__array_interface__["data"][0] == x.__array_interface__["data"][0] and x.flags.c_contiguous
    if not same and np.may_share_memory(out, x):
        raise ValueError("out: overlaps logits; pass inplace=True to overwrite the logits")
    return out, False


def logsumexp(logits, *, softcap=None, logit_scale=1.0):
    """Row-wise log-sum-exp of (transformed) logits.

    Parameters
    ----------
    logits : array_like, shape (..., V)
        float16, bfloat16, float32 or float64; not modified.
    softcap : float > 0, optional
        As in :func:`cross_entropy`.
    logit_scale : float > 0, default 1.0
        As in :func:`cross_entropy`.

    Returns
    -------
    numpy.ndarray
        ``log(sum_j exp(z_j))`` of shape ``logits.shape[:-1]``, float32
        (float64 for float64 logits); ``-inf`` for a row of ``-inf``.

    Raises
    ------
    TypeError, ValueError
        Bad dtype, shape or option (the message names the argument).

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> fastloss.logsumexp(np.log(np.array([[1.0, 3.0]])))
    array([1.38629436])
    """
    if _cuda.is_device_array(logits):
        from ..cuda import api
        return api.logsumexp(logits, softcap=softcap, logit_scale=logit_scale)
    x = V.logits_array(logits)
    mode, scale, cap = _transform(softcap, logit_scale)
    acc = V.acc_dtype(x.dtype)
    nclass = x.shape[-1]
    n = x.size // nclass
    lse = np.empty(n, acc)
    if n:
        xk = V.kernel_view(x).reshape(n, nclass)
        ntask = V.num_tasks(n, x.size)
        zbuf = np.empty((ntask, nclass if mode != K.PLAIN else 0), acc)
        tbuf = np.empty((ntask, nclass if mode == K.SOFTCAP else 0), acc)
        with V.kernel_launch(ntask):
            K.lse_forward(xk, mode, acc.type(scale), acc.type(cap), zbuf, tbuf, lse)
    return lse.reshape(x.shape[:-1])
