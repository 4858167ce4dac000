"""Public fused linear distillation: ``linear_distill_with_grad`` (the distillation
loss of the student logits ``student_hidden @ student_head.T + bias`` and its
gradients, without ever holding the student's ``(N, V)`` logits).

The tokens are processed in chunks of rows. Per chunk:

1. ``logits = hidden_chunk @ student_head.T (+ bias)``: one BLAS product into a
   reused ``(chunk, V)`` buffer (float32; float64 for float64 input; half
   precision hidden and head are upcast: the head once, the hidden per chunk);
2. the fused distillation kernel (:func:`fastloss.ops.distill.distill_with_grad`
   with ``inplace=True``) turns the buffer into the chunk's losses and, in
   place, ``d(loss)/d(logits)``;
3. ``grad_hidden[chunk] = dlogits @ head``, ``grad_head += dlogits.T @
   hidden_chunk`` (a GEMM accumulating in place when scipy is present),
   ``grad_bias += dlogits.sum(0)``.

The reduction's denominator (counted tokens, from ``targets`` and
``ignore_index``; times V for "mean") is known before the first chunk, so each
chunk runs with ``reduction="sum"`` and ``grad_output / denominator`` (or
"none" with its rows of ``grad_output``): every chunk's gradient is final when
it is computed, and forward and backward are one sweep. Ignored tokens are
skipped (never multiplied).
"""

from typing import NamedTuple

import numpy as np

from .. import _validate as V
from ..options import DistillOptions, safe_div
from ._linear import LinearSweep, check_bias, check_chunk_size, check_hidden_and_head, chunk_rows

__all__ = ["LinearDistillResult", "linear_distill_with_grad"]


class LinearDistillResult(NamedTuple):
    """Loss and gradients of :func:`linear_distill_with_grad`."""

    loss: object
    """Python float for "batchmean"/"mean"/"sum"; an array of
    ``student_hidden.shape[:-1]`` for "none"."""
    grad_hidden: np.ndarray
    """``d(grad_output * loss)/d(student_hidden)``: its shape and dtype."""
    grad_head: np.ndarray
    """``d(grad_output * loss)/d(student_head)``: ``(V, D)`` in the head's dtype."""
    grad_bias: object
    """``d(grad_output * loss)/d(bias)`` in bias's dtype, or None without a bias."""


class _Plan:
    """Validated inputs of one linear distillation call."""

    def __init__(self, hidden, head, teacher, bias, targets, chunk_size, opts):
        h, w = check_hidden_and_head(hidden, head, bias, "linear_distill_with_grad", "student_hidden",
                                     "student_head")
        nclass = w.shape[0]
        rows_shape = h.shape[:-1]
        b = check_bias(bias, nclass, "student_head")
        if targets is not None:
            t = V.as_array(targets, "targets")
            if t.dtype.kind in "iu" and t.shape != rows_shape:
                raise ValueError(f"targets: expected shape {rows_shape} (student_hidden.shape[:-1]), "
                                 f"found {t.shape}")
            targets = t
        self.topk = isinstance(teacher, tuple)
        if not self.topk:
            tt = V.float_array(teacher, "teacher")
            if tt.shape != rows_shape + (nclass,):
                raise ValueError(f"teacher: expected shape {rows_shape + (nclass,)} (student_hidden.shape[:-1] "
                                 f"+ (V,), V = student_head.shape[0]), found {tt.shape}")
            teacher = tt
        check_chunk_size(chunk_size)
        # The logits are computed in the accumulation dtype of hidden.
        self.acc = V.acc_dtype(h.dtype)
        # The distillation plan checks the teacher (top-k indices, logprobs) and
        # the targets against (N, V) student logits: a zero-stride stand-in, so
        # nothing of that size is allocated.
        from ..cpu.distill_host import DistillPlan
        fake = np.broadcast_to(np.zeros((), self.acc), rows_shape + (nclass,))
        dp = DistillPlan(fake, teacher, targets, opts)
        self.n = dp.rows
        self.count = dp.count
        self.denominator = dp.denominator()  # what the summed loss is divided by
        self.loss_dtype = dp.acc  # float64 when hidden or the teacher is float64
        if self.topk:
            kk = dp.indices.shape[-1]
            self.teacher = (dp.idx64.reshape(self.n, kk), dp.logprobs.reshape(self.n, kk))
        else:
            self.teacher = teacher.reshape(self.n, nclass)  # a view when the layout allows
        self.targets = None if targets is None else targets.reshape(-1)
        rows = None if self.count == self.n else np.flatnonzero(~dp.ignored)
        # Chunks are evened out over the call but not rounded to the BLAS row blocking.
        chunk = chunk_rows(chunk_size, self.count, nclass, self.acc.itemsize, multiple=1)
        self.sweep = LinearSweep(h, w, b, self.acc, rows, self.count, chunk, True)
        self.rows_shape = rows_shape
        self.opts = opts

    def teacher_rows(self, idx):
        """The teacher of the rows ``idx``: dense logits or an (indices, logprobs) pair."""
        if self.topk:
            return self.teacher[0][idx], self.teacher[1][idx]
        return self.teacher[idx]


def linear_distill_with_grad(student_hidden, student_head, teacher, *, bias=None, kind="kl", temperature=1.0,
                             beta=0.5, scale_by_t2=False, reduction="batchmean", targets=None, ignore_index=-100,
                             soft_weight=1.0, hard_weight=0.0, grad_output=None, chunk_size=None):
    """Distillation loss of a student LM head and its gradients, never holding the student's logits.

    Equals :func:`fastloss.distill_with_grad` of the student logits
    ``student_hidden @ student_head.T + bias`` against ``teacher``, with the
    chain rule through the linear layer, computed chunk by chunk of tokens.

    Parameters
    ----------
    student_hidden : array_like, shape (..., D)
        The student's final hidden states; float16, bfloat16
        (``ml_dtypes.bfloat16``), float32 or float64. Not modified.
    student_head : array_like, shape (V, D)
        The student's output projection (``nn.Linear`` layout), of the dtype of
        ``student_hidden``.
    teacher : array_like of shape (..., V), or a 2-tuple (indices, logprobs)
        Dense teacher logits of shape ``student_hidden.shape[:-1] + (V,)`` (any
        float dtype), or a top-k teacher (:class:`fastloss.TopKTeacher`) of
        shape ``student_hidden.shape[:-1] + (k,)``, as in :func:`fastloss.distill`.
    bias : array_like, shape (V,), optional
        The student's output bias (any supported float dtype).
    kind, temperature, beta, scale_by_t2, reduction, targets, ignore_index, soft_weight, hard_weight
        As in :func:`fastloss.distill`, applied to the student logits;
        ``targets`` has shape ``student_hidden.shape[:-1]``.
    grad_output : float or array_like, optional
        Upstream gradient: a scalar for "batchmean"/"mean"/"sum" (default
        1.0); a scalar or an array of ``student_hidden.shape[:-1]`` for "none".
    chunk_size : int > 0, optional
        Tokens per chunk. None picks the most tokens whose ``(chunk, V)``
        logits buffer fits in ``fastloss.config.LINEAR_CE_LOGITS_BUDGET_BYTES``
        (read at call time), evened out over the chunks.

    Returns
    -------
    LinearDistillResult
        ``(loss, grad_hidden, grad_head, grad_bias)``: the loss as
        :func:`fastloss.distill` returns it; ``grad_hidden`` of
        ``student_hidden``'s shape and dtype (zero rows for ignored tokens),
        ``grad_head`` of ``(V, D)`` in the head's dtype, ``grad_bias`` of
        ``(V,)`` in bias's dtype, or None without a bias. All are
        ``d(grad_output * loss)/d(input)``.

    Raises
    ------
    TypeError
        Unsupported dtypes, a head of another dtype than ``student_hidden``, a
        non-integer ``chunk_size``, or GPU arrays.
    ValueError
        Shapes that do not fit together, options out of range, bad targets or
        top-k indices (messages name the argument).

    Notes
    -----
    With ``G = d(loss)/d(logits)`` (computed per chunk, in place, by the fused
    distillation kernel): ``grad_hidden = G @ student_head``, ``grad_head =
    G.T @ student_hidden``, ``grad_bias = G.sum(0)``. Logits, products and
    accumulators are float32 (float64 for float64 input); float16/bfloat16
    gradients are rounded once at the end. Extra memory: the ``(chunk, V)``
    logits buffer; for float16/bfloat16 also float32 copies of the head and of
    the ``grad_head`` accumulator (``2 * V * D * 4`` bytes) and ``(chunk, D)``
    float32 buffers; when some tokens are ignored, the teacher rows of each
    chunk are gathered (a ``(chunk, V)`` copy for a dense teacher). Without
    scipy, an 8 MiB temporary for the ``grad_head`` accumulation.

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> rng = np.random.default_rng(0)
    >>> h = rng.standard_normal((6, 4)).astype(np.float32)
    >>> W = rng.standard_normal((10, 4)).astype(np.float32)
    >>> t = rng.standard_normal((6, 10)).astype(np.float32)
    >>> r = fastloss.linear_distill_with_grad(h, W, t, temperature=2.0, chunk_size=4)
    >>> loss, G = fastloss.distill_with_grad(h @ W.T, t, temperature=2.0)
    >>> bool(abs(r.loss - loss) < 1e-6)
    True
    >>> bool(np.allclose(r.grad_hidden, G @ W, atol=1e-6) and np.allclose(r.grad_head, G.T @ h, atol=1e-6))
    True
    >>> r.grad_bias is None
    True
    """
    opts = DistillOptions.check(kind=kind, temperature=temperature, beta=beta, scale_by_t2=scale_by_t2,
                                reduction=reduction, ignore_index=ignore_index, soft_weight=soft_weight,
                                hard_weight=hard_weight)
    V.check_hard_targets(opts.hard_weight, targets)
    plan = _Plan(student_hidden, student_head, teacher, bias, targets, chunk_size, opts)
    none = opts.reduction == "none"
    rows_shape = plan.rows_shape
    if none:
        g_rows = V.rows_grad_output(grad_output, rows_shape, "student_hidden.shape[:-1]")
        if np.ndim(g_rows):
            g_rows = g_rows.reshape(-1)
        g_sum = None
    else:
        g_sum = safe_div(V.scalar_grad_output(grad_output, opts.reduction), plan.denominator)
    sweep = plan.sweep
    loss_rows = np.zeros(plan.n, plan.loss_dtype) if none else None
    total = 0.0
    if plan.count:
        from .distill import distill_with_grad
        sweep.start()
        keywords = dict(kind=opts.kind, temperature=opts.temperature, beta=opts.beta,
                        scale_by_t2=opts.scale_by_t2, reduction="none" if none else "sum",
                        ignore_index=opts.ignore_index, soft_weight=opts.soft_weight,
                        hard_weight=opts.hard_weight)
        for idx, c in sweep.chunks():
            hc, x = sweep.logits(idx, c)
            go = g_sum if not none else (g_rows[idx] if np.ndim(g_rows) else g_rows)
            tgt = None if plan.targets is None else plan.targets[idx]
            loss_c, _ = distill_with_grad(x, plan.teacher_rows(idx), targets=tgt, grad_output=go,
                                          inplace=True, **keywords)
            # x now holds d(loss)/d(logits) of the chunk.
            if none:
                loss_rows[idx] = loss_c
            else:
                total += loss_c
            sweep.backward(idx, c, hc, x)
    if none:
        loss = loss_rows.reshape(rows_shape)
    else:
        loss = float(safe_div(total, plan.denominator))
    return LinearDistillResult(loss, *sweep.gradients())
