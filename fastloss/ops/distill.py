"""Public distillation API: ``distill``, ``distill_with_grad``, ``TopKTeacher``.

Each function validates its options once (``fastloss.options.DistillOptions``)
and hands ``(arrays, options)`` to the backend of the student: host arrays to
``fastloss.cpu.distill_host``, GPU arrays to ``fastloss.cuda.distill_host``
(each imported on first use).
"""

from typing import NamedTuple

from .. import _validate as V
from ..options import DistillOptions
from ..results import DistillResult
from ._dispatch import backend_picker

__all__ = ["distill", "distill_with_grad", "DistillResult", "TopKTeacher"]

_backend = backend_picker("distill_host")


class TopKTeacher(NamedTuple):
    """A sparse teacher: the ``k`` classes it keeps per token and their logprobs.

    Any 2-tuple ``(indices, logprobs)`` is accepted as ``teacher`` as well (a
    tuple: a list is read as dense logits). ``indices``: integers in ``[0, V)``
    of shape ``student.shape[:-1] + (k,)``, distinct within a row;
    ``logprobs``: floats of the same shape (any float dtype; ``-inf`` marks a
    padding entry, and a counted row needs at least one finite entry). The
    teacher distribution is ``softmax(logprobs / T)`` over the ``k`` entries
    and 0 elsewhere: the logprobs need not be normalised.
    """

    indices: object
    logprobs: object


def distill(student, teacher, *, kind="kl", temperature=1.0, beta=0.5, scale_by_t2=False,
            reduction="batchmean", targets=None, ignore_index=-100, soft_weight=1.0, hard_weight=0.0):
    """Distillation loss between student logits and teacher logits.

    Parameters
    ----------
    student : array_like, shape (..., V)
        Student logits: float16, bfloat16 (``ml_dtypes.bfloat16``), float32 or
        float64. Not modified.
    teacher : array_like of shape (..., V), or a 2-tuple (indices, logprobs)
        Dense teacher logits of the student's shape, of any of those float
        dtypes independently of the student; or a sparse top-k teacher
        (:class:`TopKTeacher`, or any tuple ``(indices, logprobs)`` of shape
        ``student.shape[:-1] + (k,)``). Never modified.
    kind : {"kl", "reverse_kl", "jsd"}, default "kl"
        Forward ``KL(p_t || p_s)``, reverse ``KL(p_s || p_t)``, or the
        generalised Jensen-Shannon divergence of TRL's GKD trainer.
    temperature : float > 0, default 1.0
        Both distributions are ``softmax(logits / temperature)``.
    beta : float in [0, 1], default 0.5
        JSD's mixture weight (ignored by the other kinds); 0 gives forward and 1
        reverse KL, as in TRL.
    scale_by_t2 : bool, default False
        Multiply the divergence by ``temperature**2`` (Hinton et al.).
    reduction : {"batchmean", "mean", "sum", "none"}, default "batchmean"
        "batchmean" divides the summed loss by the number of counted tokens,
        "mean" by that number times V (``torch.nn.functional.kl_div``'s
        element mean), "sum" adds, "none" returns per-token losses.
    targets : array_like of int, shape ``student.shape[:-1]``, optional
        Class indices for the hard-label term, or ``ignore_index`` for tokens
        that are not counted (zero loss, zero gradient). Checked like
        :func:`fastloss.cross_entropy`'s targets.
    ignore_index : int, default -100
    soft_weight : float >= 0, default 1.0
        Weight of the divergence in the per-token loss.
    hard_weight : float >= 0, default 0.0
        Weight of the hard-label cross-entropy; > 0 needs ``targets``
        (``ValueError`` otherwise).

    Returns
    -------
    float or numpy.ndarray
        A Python float for "batchmean"/"mean"/"sum" (0.0 when no token is
        counted; a one-element GPU array for GPU inputs, as
        :func:`fastloss.cross_entropy`); for "none" an array of
        ``student.shape[:-1]`` (float32, float64 when either input is
        float64), 0 at ignored tokens.

    Raises
    ------
    TypeError
        Unsupported dtype of ``student``, ``teacher`` or ``targets``; a
        non-numeric option.
    ValueError
        Shapes or vocabularies that differ, an option out of range, targets
        or top-k indices out of range, repeated top-k indices, a top-k row
        without a finite logprob, ``reverse_kl`` with a top-k teacher, or
        ``hard_weight > 0`` without ``targets`` (the message names the argument).

    Notes
    -----
    With ``p_s = softmax(s / T)``, ``p_t = softmax(t / T)``, a counted token
    ``i`` contributes ``l_i = soft_weight [T^2] S_i + hard_weight H_i`` with

    * kl: ``S = sum_j p_t,j (log p_t,j - log p_s,j)``;
    * reverse_kl: ``S = sum_j p_s,j (log p_s,j - log p_t,j)``;
    * jsd (``0 < beta < 1``): ``m = beta p_t + (1 - beta) p_s``,
      ``S = beta KL(p_t || m) + (1 - beta) KL(p_s || m)``;
    * ``H = logsumexp(s) - s_target``: the cross-entropy of the raw student
      logits (no temperature), only with ``targets`` and ``hard_weight > 0``.

    ``0 log 0 = 0``: a class the teacher gives no mass (logit ``-inf``) adds
    nothing to forward KL, while a student ``-inf`` where the teacher has
    mass makes it ``+inf``. A term whose weight is 0 is left out. NaN in a
    token's rows makes that token's loss NaN and no other; a row of all
    ``-inf`` has no distribution and also gives NaN (as
    :func:`fastloss.cross_entropy` does). With a top-k teacher, ``p_t`` is
    ``softmax(logprobs / T)`` over its ``k`` entries and 0 elsewhere; forward
    KL then needs only the student's log-sum-exp and its ``k`` values; JSD
    counts the student's mass off the support (there ``m = (1 - beta) p_s``);
    reverse KL would be infinite and raises. Statistics accumulate in
    float32 (float64 when either input is float64).

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> s = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], dtype=np.float32)
    >>> t = np.array([[1.0, 1.0, -1.0], [0.1, 0.2, 0.3]], dtype=np.float32)
    >>> round(fastloss.distill(s, t), 5)  # batchmean; the second token's rows agree: KL 0
    0.12427
    >>> round(fastloss.distill(s, t, kind="jsd", beta=0.5, temperature=2.0), 5)
    0.00744
    >>> top = fastloss.TopKTeacher(np.array([[0, 1], [2, 1]]), np.log(np.array([[0.5, 0.5], [0.9, 0.1]])))
    >>> fastloss.distill(s, top, reduction="none").round(4)  # float64: the logprobs are float64
    array([0.2982, 0.6869])
    """
    opts = DistillOptions.check(kind=kind, temperature=temperature, beta=beta, scale_by_t2=scale_by_t2,
                                reduction=reduction, ignore_index=ignore_index, soft_weight=soft_weight,
                                hard_weight=hard_weight)
    V.check_hard_targets(opts.hard_weight, targets)
    return _backend(student).distill(student, teacher, targets, opts)


def distill_with_grad(student, teacher, *, kind="kl", temperature=1.0, beta=0.5, scale_by_t2=False,
                      reduction="batchmean", targets=None, ignore_index=-100, soft_weight=1.0, hard_weight=0.0,
                      grad_output=None, out=None, inplace=False):
    """Distillation loss and its gradient with respect to the student, in one fused pass.

    Parameters
    ----------
    student, teacher, kind, temperature, beta, scale_by_t2, reduction, targets, ignore_index, soft_weight, hard_weight
        As in :func:`distill`.
    grad_output : float or array_like, optional
        Upstream gradient: a scalar for "batchmean"/"mean"/"sum" (default
        1.0); a scalar or an array of ``student.shape[:-1]`` for "none".
    out : numpy.ndarray, optional
        Writable C-contiguous array of the student's shape and dtype that
        receives the gradient (no allocation). Must not overlap the student
        (unless it is the student itself) nor the teacher.
    inplace : bool, default False
        Overwrite ``student`` (a writable numpy array that shares no memory with
        the teacher) with the gradient; the returned ``grad is student``.
        Cannot be combined with ``out``.

    Returns
    -------
    DistillResult
        A named tuple ``(loss, grad)``: ``loss`` as :func:`distill` returns it
        (up to rounding: sums run in another order), ``grad`` =
        ``d(grad_output * loss) / d(student)`` of the student's shape and
        dtype, computed in the accumulation precision and rounded once; zero
        in the rows of ignored tokens.

    Raises
    ------
    TypeError, ValueError
        As :func:`distill`, plus a bad ``grad_output``, ``out`` or
        ``inplace`` request (the message names the argument).

    Notes
    -----
    Per counted token, with upstream ``g`` (divided by the reduction's
    denominator), ``c = g soft_weight [T^2] / T`` and ``d_j = log p_s,j - log p_t,j``:

    * kl: ``c (p_s,j - p_t,j)``;
    * reverse_kl: ``c p_s,j (d_j - KL(p_s || p_t))``;
    * jsd: ``c (1 - beta) p_s,j (log(p_s,j / m_j) - KL(p_s || m))``;
    * hard term: ``g hard_weight (softmax(s)_j - [j = target])``.

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> s = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], dtype=np.float32)
    >>> t = np.array([[1.0, 1.0, -1.0], [0.3, 0.2, 0.1]], dtype=np.float32)
    >>> loss, grad = fastloss.distill_with_grad(s, t, targets=np.array([0, -100]), hard_weight=0.5)
    >>> grad.shape, grad.dtype
    ((2, 3), dtype('float32'))
    >>> bool(np.allclose(grad.sum(axis=1), 0.0, atol=1e-6)), bool((grad[1] == 0).all())
    (True, True)
    """
    opts = DistillOptions.check(kind=kind, temperature=temperature, beta=beta, scale_by_t2=scale_by_t2,
                                reduction=reduction, ignore_index=ignore_index, soft_weight=soft_weight,
                                hard_weight=hard_weight)
    inplace = V.check_inplace_out(inplace, out)
    V.check_hard_targets(opts.hard_weight, targets)
    loss, grad = _backend(student).distill_with_grad(student, teacher, targets, opts, grad_output, out, inplace)
    return DistillResult(loss, grad)
