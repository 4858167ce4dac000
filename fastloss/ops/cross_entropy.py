"""Public cross-entropy API: ``cross_entropy``, ``cross_entropy_with_grad``, ``logsumexp``.

Each function validates its options once (``fastloss.options``) and hands
``(arrays, options)`` to the backend of its first array: host arrays to
``fastloss.cpu.cross_entropy_host``, GPU arrays to
``fastloss.cuda.cross_entropy_host`` (imported on first use).
"""

import numpy as np

from .. import _validate as V
from ..cuda import is_device_array
from ..options import CrossEntropyOptions, LogsumexpOptions
from ..results import CrossEntropyResult

__all__ = ["cross_entropy", "cross_entropy_with_grad", "logsumexp"]


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
    opts = CrossEntropyOptions.cached(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                      logit_scale, normalizer)
    return _backend(logits).cross_entropy(logits, targets, weight, opts)


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
    """
    opts = CrossEntropyOptions.cached(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                      logit_scale, normalizer)
    inplace = V.check_inplace_out(inplace, out)
    loss, grad = _backend(logits).cross_entropy_with_grad(logits, targets, weight, opts,
                                                          grad_output, out, inplace)
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


def _backend(x):
    """The host module of the backend that runs ``x``: CPU, or CUDA for GPU
    arrays (each imported on first use: numba is not loaded by ``import fastloss``)."""
    if type(x) is not np.ndarray and is_device_array(x):
        from ..cuda import cross_entropy_host
        return cross_entropy_host
    return _CPU or _load_cpu()


_CPU = None


def _load_cpu():
    """Import the CPU host module once (a function-level import costs ~0.5 us a call)."""
    global _CPU
    from ..cpu import cross_entropy_host
    _CPU = cross_entropy_host
    return _CPU
