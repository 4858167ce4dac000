"""Public cross-entropy API: ``cross_entropy``, ``cross_entropy_with_grad``, ``logsumexp``.

Each function validates its options once (``fastloss.options``) and hands
``(arrays, options)`` to the backend of its first array: host arrays to
``fastloss.cpu.cross_entropy_host``, GPU arrays to
``fastloss.cuda.cross_entropy_host`` (imported on first use). Float
(probability) targets go to the soft-target host module of that backend
(``fastloss.cpu.soft_cross_entropy_host``, ``fastloss.cuda.soft_cross_entropy_host``).
"""

import numpy as np

from .. import _validate as V
from ..options import CrossEntropyOptions, LogsumexpOptions
from ..results import CrossEntropyResult
from ._dispatch import backend_picker

__all__ = ["cross_entropy", "cross_entropy_with_grad", "logsumexp"]

_backend = backend_picker("cross_entropy_host")
_soft_backend = backend_picker("soft_cross_entropy_host")


def cross_entropy(logits, targets, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                  normalizer=None):
    """Softmax cross-entropy of logits against class-index or probability targets.

    Parameters
    ----------
    logits : array_like, shape (..., V)
        Unnormalised scores; float16, bfloat16 (``ml_dtypes.bfloat16``),
        float32 or float64. Not modified.
    targets : array_like
        Either class indices: any integer dtype, shape ``logits.shape[:-1]``,
        values in ``[0, V)`` or ``ignore_index``. Or probability ("soft")
        targets: a float dtype (float16, bfloat16, float32 or float64, not
        necessarily the logits' dtype) and exactly ``logits.shape``; each row
        must hold finite entries >= 0 summing to 1 within
        ``config.SOFT_TARGET_SUM_TOL`` (absolute, 1e-2). The loss uses the
        targets as given (no renormalisation), as PyTorch does.
    weight : array_like, shape (V,), optional
        Non-negative, finite per-class weights (as in PyTorch).
    ignore_index : int, default -100
        Class-index target value whose tokens are not counted: zero loss,
        zero gradient. Accepted and not used with probability targets (as
        in PyTorch).
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" divides by the summed weight of the counted targets (their
        number without ``weight``); with probability targets by the number
        of rows N (PyTorch's rule: class weights do not enter it). "sum"
        adds, "none" returns per-token losses.
    label_smoothing : float in [0, 1], default 0.0
        Mixes the one-hot target with the uniform distribution (PyTorch's rule).
    z_loss : float >= 0, default 0.0
        Adds ``z_loss * lse**2`` per counted token (not class-weighted); for
        "mean" it is divided by the number of counted tokens (rows with
        probability targets).
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
        ``logits.shape[:-1]`` (float32, float64 for float64 logits), 0 at
        ignored tokens.

    Raises
    ------
    TypeError
        Unsupported dtype of ``logits``, ``targets`` or ``weight``, or a
        non-numeric option.
    ValueError
        Bad shapes (float targets of another shape than the logits' included),
        options out of range, class-index targets outside ``[0, V)`` that
        are not ``ignore_index`` (the message gives their count and the first
        one), or rows of probability targets that are not distributions (the
        message gives their count, the first row's position in
        ``logits.shape[:-1]`` and its first bad entry or its sum).

    Notes
    -----
    With ``z = transform(x)``, ``lse = log sum_j exp(z_j)`` and ``eps =
    label_smoothing``, a counted token with class-index target ``t`` contributes
    ``(1 - eps) w_t (lse - z_t) + eps / V * sum_j w_j (lse - z_j) + z_loss * lse**2``.
    A row with probability targets ``q`` contributes
    ``sum_j w_j q'_j (lse - z_j) + z_loss * lse**2`` with
    ``q'_j = (1 - eps) q_j + eps / V``; a term with ``q'_j = 0`` is 0 even
    where ``z_j = -inf`` (a masked class; PyTorch gives NaN there), while
    ``q'_j > 0`` at ``z_j = -inf`` gives an infinite loss (as PyTorch).
    Statistics accumulate in float32 (float64 for float64 logits), whatever
    the targets' dtype. A mean over zero counted tokens (or zero rows) is
    0.0, where PyTorch returns NaN.

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], dtype=np.float32)
    >>> round(fastloss.cross_entropy(logits, np.array([0, 2])), 4)
    0.6216
    >>> fastloss.cross_entropy(logits, np.array([-100, -100]))
    0.0

    Probability targets (one-hot rows give the class-index loss):

    >>> q = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    >>> round(fastloss.cross_entropy(logits, q), 4)
    0.6216
    >>> q = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], dtype=np.float32)
    >>> round(fastloss.cross_entropy(logits, q, reduction="sum"), 4)
    1.9183
    """
    opts = CrossEntropyOptions.cached(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                      logit_scale, normalizer)
    backend, targets = _ce_backend(logits, targets)
    return backend.cross_entropy(logits, targets, weight, opts)


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
        an array of ``logits.shape[:-1]`` for "none".
    out : numpy.ndarray, optional
        Writable C-contiguous array of ``logits.shape`` and dtype that receives
        the gradient (no allocation). Must not overlap ``logits`` unless it is
        ``logits`` itself.
    inplace : bool, default False
        Overwrite ``logits`` (a writable numpy array) with the gradient; the
        returned ``grad is logits``. Cannot be combined with ``out``.
        Probability targets are checked in the kernels' pass over them: when
        they are rejected (``ValueError``), the contents of the ``out`` or
        ``inplace`` buffer are unspecified.

    Returns
    -------
    CrossEntropyResult
        A named tuple ``(loss, grad)`` (unpacks as ``loss, grad = ...``):

        loss : float or numpy.ndarray
            As returned by :func:`cross_entropy`, up to rounding (at most
            ``2e-6 * max(1, |loss|)`` per token in float32, ``1e-14`` in float64:
            the exponentials are summed in another order).
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
    With probability targets, ``dL/dz_j = g (p_j sum_k w_k q'_k - w_j q'_j) +
    g_z 2 z_loss lse p_j``, times ``dz/dx``, in the accumulation precision and
    rounded once.

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], dtype=np.float32)
    >>> loss, grad = fastloss.cross_entropy_with_grad(logits, np.array([0, 2]))
    >>> r = fastloss.cross_entropy_with_grad(logits, np.array([0, 2]))
    >>> r.loss == loss and bool((r.grad == grad).all())
    True
    >>> grad.shape, grad.dtype
    ((2, 3), dtype('float32'))
    >>> bool(np.allclose(grad.sum(axis=1), 0.0, atol=1e-6))  # softmax - onehot rows sum to 0
    True
    >>> q = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], dtype=np.float32)
    >>> loss, grad = fastloss.cross_entropy_with_grad(logits, q, reduction="sum")
    >>> bool(np.allclose(grad.sum(axis=1), 0.0, atol=1e-6))  # softmax - q rows sum to 0
    True
    """
    opts = CrossEntropyOptions.cached(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                      logit_scale, normalizer)
    inplace = V.check_inplace_out(inplace, out)
    backend, targets = _ce_backend(logits, targets)
    loss, grad = backend.cross_entropy_with_grad(logits, targets, weight, opts, grad_output, out, inplace)
    return CrossEntropyResult(loss, grad)


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
    opts = LogsumexpOptions.check(softcap=softcap, logit_scale=logit_scale)
    return _backend(logits).logsumexp(logits, opts)


def _ce_backend(logits, targets):
    """``(host module, targets)`` for a cross-entropy call: the class-index module
    of :func:`_backend`, or for float (probability) targets the soft-target
    host module of the logits' backend. Targets without a dtype (lists) are
    converted here, once, so the kind of their values decides."""
    if type(targets) is np.ndarray and targets.dtype.kind in "iu":
        return _backend(logits), targets  # the common case: one dtype test
    if getattr(targets, "dtype", None) is None:
        targets = V.as_array(targets, "targets")
    if not V.is_soft_targets(targets):
        return _backend(logits), targets
    return _soft_backend(logits), targets
