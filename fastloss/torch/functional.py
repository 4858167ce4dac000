"""The public functions of ``fastloss.torch``: PyTorch's loss signatures on
fastloss's fused kernels.

Each function checks its tensors with PyTorch's argument names, brings them
to the canonical layout the kernels take (logits ``(N, V)``, targets
``(N,)``), then runs the op: through an eager ``autograd.Function``
(``fastloss.torch.autograd``), or, while ``torch.compile`` traces, through the
registered custom op (``fastloss.torch.library``), so a compiled model keeps
the op in one graph.

Shapes follow ``torch.nn.functional``: ``cross_entropy`` takes ``(C,)``,
``(N, C)`` or ``(N, C, d1, ...)`` input (class dimension 1; the last form
costs one copy to put the classes last); ``linear_cross_entropy`` takes
``(D,)``, ``(N, D)`` and, beyond PyTorch, ``(..., D)`` input with targets of
``input.shape[:-1]``.
"""

import numbers

import torch

from . import autograd as A
from . import library as L
from .backend import FLOAT_DTYPES, CESpec, DistillSpec

__all__ = ["cross_entropy", "mse_loss", "linear_cross_entropy", "distill"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")
    return t


def _float(name, t):
    if _tensor(name, t).dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16, bfloat16, float32 or float64 tensor, found {t.dtype}")
    return t


def _classes(name, t, probabilities_ok=False):
    if _tensor(name, t).dtype not in _INT_DTYPES:
        if t.is_floating_point() and not probabilities_ok:
            raise TypeError(f"{name}: expected integer class indices, found {t.dtype} (probability targets "
                            "are taken by cross_entropy only)")
        if not (probabilities_ok and t.dtype in FLOAT_DTYPES):
            kinds = "integer class indices or float probabilities" if probabilities_ok else "integer class indices"
            raise TypeError(f"{name}: expected {kinds}, found {t.dtype}")
    return t


def _same_device(name, t, like):
    if t is not None and t.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device} (like input), found one on {t.device}")


def _optional_float(name, t):
    if t is None:
        return None
    _float(name, t)
    return t


def _number(name, value, allow_none=False):
    """A Python float from a number (Python, numpy, or a one-element tensor),
    as the custom ops take it."""
    if value is None and allow_none:
        return None
    if type(value) is float:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, found {type(value).__name__}")
    return float(value)


def _spec(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, normalizer):
    if type(ignore_index) is not int:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index: expected an int, found {type(ignore_index).__name__}")
        ignore_index = int(ignore_index)
    if not isinstance(reduction, str):
        raise TypeError(f"reduction: expected 'mean', 'sum' or 'none', found {type(reduction).__name__}")
    return CESpec(ignore_index, reduction, _number("label_smoothing", label_smoothing),
                  _number("z_loss", z_loss), _number("softcap", softcap, True),
                  _number("logit_scale", logit_scale), _number("normalizer", normalizer, True))


def _normalizer_tensor(normalizer):
    """The normalizer as the custom ops take it under ``torch.compile``: a 0-d
    float64 tensor (a Python number would be a constant of the graph, and a
    new value every step would recompile it)."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer: expected a number or a one-element tensor, found shape "
                             f"{tuple(normalizer.shape)}")
        return normalizer.reshape(()).to(torch.float64)
    if isinstance(normalizer, bool) or not isinstance(normalizer, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"normalizer: expected a number, found {type(normalizer).__name__}")
    # arithmetic with a tensor keeps a number that Dynamo made dynamic symbolic
    # (float() or scalar_tensor() would specialise it: one recompile per value)
    return torch.ones((), dtype=torch.float64) * normalizer


def _compiling():
    return torch.compiler.is_compiling()


def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                  z_loss=0.0, softcap=None, logit_scale=1.0, normalizer=None, inplace_backward=False):
    """Softmax cross-entropy with class-index targets, as ``torch.nn.functional.cross_entropy``,
    on fastloss's fused kernel.

    Forward computes the loss and its gradient in one pass over the logits
    and keeps the gradient; backward reads no logits.

    Parameters
    ----------
    input : Tensor, shape (C,), (N, C) or (N, C, d1, ...)
        Logits (class dimension 1, as in PyTorch); float16, bfloat16, float32
        or float64, on the CPU or a CUDA device. For LM logits ``(B, T, V)``
        pass ``input.view(-1, V)`` and ``target.view(-1)``, as with PyTorch.
    target : Tensor of int, or float Tensor of ``input``'s shape
        Class indices, shape ``()``, ``(N,)`` or ``(N, d1, ...)``, in
        ``[0, C)`` or ``ignore_index``; any integer dtype. Or class
        probabilities of ``input``'s shape (any float dtype; each row sums to 1
        up to rounding, see ``fastloss.cross_entropy``), as in PyTorch:
        ``ignore_index`` does not apply and "mean" divides by the number of
        rows. No gradient flows to probability targets (a target that
        requires grad raises ``ValueError``; detach it).
    weight : Tensor, shape (C,), optional
        Class weights (no gradient).
    ignore_index : int, default -100
    reduction : {"mean", "sum", "none"}, default "mean"
    label_smoothing : float in [0, 1], default 0.0
        As in PyTorch.
    z_loss : float, default 0.0
        Adds ``z_loss * logsumexp(x)**2`` per counted token.
    softcap : float > 0, optional
        Logits become ``softcap * tanh(x / softcap)`` first (after ``logit_scale``).
    logit_scale : float, default 1.0
        Logits are multiplied by this first.
    normalizer : float > 0 or one-element tensor, optional
        For "mean": divide the summed loss by this instead of the count (or
        class-weight sum) of counted tokens, so that micro-batches of one
        accumulated batch share one denominator. A tensor is read once on the
        host (a GPU tensor waits for the GPU); under ``torch.compile`` a value
        that changes every step does not recompile the graph.
    inplace_backward : bool, default False
        Write the gradient into ``input``'s memory instead of a new tensor
        (saves one logits-sized buffer). The logits are then gone: their
        tensor holds the gradient. Anything else that saved them for its own
        backward makes backward raise (their version counter is bumped).
        Refused for a leaf tensor that requires grad. No effect without a
        gradient to compute or under ``torch.compile`` (the compiler owns the
        buffers there).

    Returns
    -------
    Tensor
        In ``input``'s dtype: 0-d for "mean"/"sum", ``target``'s shape for
        "none" (0 at ignored positions).

    Raises
    ------
    TypeError
        A non-tensor, a non-float ``input``, non-integer ``target``.
    ValueError
        Shapes or devices that do not match, a target outside ``[0, C)``, a bad option.

    Notes
    -----
    Semantics are ``fastloss.cross_entropy``'s (``docs/semantics.md``), which
    equal PyTorch's except that a mean over no counted token is 0 with a zero
    gradient (PyTorch: NaN). Non-contiguous input costs one copy. Gradients
    flow to ``input`` only.

    Examples
    --------
    >>> import torch, fastloss.torch as flt
    >>> x = torch.randn(4, 10, requires_grad=True)
    >>> t = torch.tensor([1, 0, 9, -100])
    >>> loss = flt.cross_entropy(x, t)
    >>> loss.backward()
    >>> ref = torch.nn.functional.cross_entropy(x, t)
    >>> bool(torch.allclose(loss, ref)), x.grad.shape
    (True, torch.Size([4, 10]))
    """
    _float("input", input)
    _classes("target", target, probabilities_ok=True)
    _same_device("target", target, input)
    weight = _optional_float("weight", weight)
    _same_device("weight", weight, input)
    if target.is_floating_point():
        x, t, restore = _canonical_soft_ce(input, target)
    else:
        x, t, restore = _canonical_ce(input, target)
    if _compiling():
        spec = _spec(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, None)
        loss, _ = L.cross_entropy(x, t, weight, *spec[:-1], _normalizer_tensor(normalizer), _wants_grad(x))
        return restore(loss)
    spec = _spec(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, normalizer)
    if inplace_backward and _wants_grad(x):
        _check_inplace(input)
        if not x.is_contiguous():
            x = x.contiguous()
    return restore(A.CrossEntropy.apply(x, t, weight, spec, bool(inplace_backward)))


def _canonical_ce(input, target):
    """(x (N, C), t (N,), restore): restore maps a "none" loss of shape (N,)
    back to ``target``'s shape."""
    if input.dim() == 0:
        raise ValueError("input: expected at least one dimension (the classes), found a 0-d tensor")
    if input.dim() == 1:
        if target.dim() != 0:
            raise ValueError(f"target: expected a 0-d tensor for 1-D input (unbatched), found shape "
                             f"{tuple(target.shape)}")
        return input.unsqueeze(0), target.reshape(1), _reshape_to(())
    want = (input.shape[0], *input.shape[2:])
    if tuple(target.shape) != want:
        raise ValueError(f"target: expected shape {want} for input of shape {tuple(input.shape)} (classes in "
                         f"dimension 1, as in PyTorch), found {tuple(target.shape)}")
    if input.dim() == 2:
        return input, target, _same
    c = input.shape[1]
    x = input.movedim(1, -1).reshape(-1, c)
    return x, target.reshape(-1), _reshape_to(tuple(target.shape))


def _canonical_soft_ce(input, target):
    """(x (N, C), q (N, C), restore) for probability targets of ``input``'s shape."""
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(f"target: expected probabilities of input's shape {tuple(input.shape)}, found "
                         f"{tuple(target.shape)}")
    if target.requires_grad and torch.is_grad_enabled():
        raise ValueError("target: gradients with respect to probability targets are not computed; pass "
                         "target.detach()")
    if input.dim() == 0:
        raise ValueError("input: expected at least one dimension (the classes), found a 0-d tensor")
    if input.dim() == 1:
        return input.unsqueeze(0), target.unsqueeze(0), _reshape_to(())
    if input.dim() == 2:
        return input, target, _same
    c = input.shape[1]
    rows = (input.shape[0], *input.shape[2:])
    return (input.movedim(1, -1).reshape(-1, c), target.movedim(1, -1).reshape(-1, c), _reshape_to(rows))


def _broadcasts(shape, to):
    if len(shape) > len(to):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(to)))


def _same(loss):
    return loss


def _reshape_to(shape):
    def restore(loss):
        return loss.reshape(shape) if loss.dim() else loss
    return restore


def _check_inplace(input):
    base = input
    while base._base is not None:
        base = base._base
    if base.is_leaf and base.requires_grad:
        raise ValueError("inplace_backward: input is (a view of) a leaf tensor that requires grad; overwriting "
                         "it with the gradient would destroy it (pass inplace_backward=False)")


def mse_loss(input, target, reduction="mean", *, weight=None):
    """Mean squared error, as ``torch.nn.functional.mse_loss``, on fastloss's fused kernel.

    Parameters
    ----------
    input, target : Tensor
        Same shape (no broadcasting: a shape mismatch raises ``ValueError``,
        where PyTorch warns and broadcasts); float dtypes, one device.
    reduction : {"mean", "sum", "none"}, default "mean"
    weight : Tensor, optional
        Broadcastable to ``input.shape``; "mean" is ``sum(w * d**2) / sum(w)``.
        No gradient.

    Returns
    -------
    Tensor
        In ``input``'s dtype: 0-d for "mean"/"sum", ``input``'s shape for "none".

    Notes
    -----
    Gradients flow to ``input`` and ``target`` (``d/dtarget = -d/dinput``).

    Examples
    --------
    >>> import torch, fastloss.torch as flt
    >>> p, q = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5)
    >>> flt.mse_loss(p, q).backward()
    >>> bool(torch.allclose(p.grad, 2 * (p - q).detach() / 15))
    True
    """
    _float("input", input)
    _float("target", target)
    _same_device("target", target, input)
    weight = _optional_float("weight", weight)
    _same_device("weight", weight, input)
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(f"target: expected input's shape {tuple(input.shape)}, found {tuple(target.shape)}")
    if weight is not None and not _broadcasts(weight.shape, input.shape):
        raise ValueError(f"weight: expected a shape that broadcasts to input's {tuple(input.shape)}, found "
                         f"{tuple(weight.shape)}")
    if not isinstance(reduction, str):
        raise TypeError(f"reduction: expected 'mean', 'sum' or 'none', found {type(reduction).__name__}")
    if _compiling():
        loss, _ = L.mse(input, target, weight, reduction, _wants_grad(input, target))
        return loss
    return A.MSE.apply(input, target, weight, reduction)


def linear_cross_entropy(input, linear_weight, target, bias=None, *, linear_bias=None, weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                         logit_scale=1.0, normalizer=None, chunk_size=None, options=None):
    """Cross-entropy of the logits ``input @ linear_weight.T + bias``, never holding them,
    as ``torch.nn.functional.linear_cross_entropy``.

    Parameters
    ----------
    input : Tensor, shape (D,), (N, D) or (..., D)
        Hidden states; float dtypes.
    linear_weight : Tensor, shape (V, D)
        The LM head (``nn.Linear`` layout), same dtype as ``input``.
    target : Tensor of int, shape ``input.shape[:-1]``
    bias : Tensor, shape (V,), optional
        Output bias (also accepted as ``linear_bias=``, PyTorch's name).
    weight : Tensor, shape (V,), optional
        Class weights (a keyword, as in PyTorch).
    ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, normalizer
        As in :func:`cross_entropy`.
    ignore_index : int or None, default -100
        None means -100, as in PyTorch.
    chunk_size : int, optional
        Tokens per chunk of logits (default: a chunk of logits of at most
        90 MiB on the CPU, 64 MiB on a GPU).
    options : optional
        PyTorch's ``LinearCrossEntropyOptions`` (its chunking strategy):
        accepted for compatibility and ignored; ``chunk_size`` sets the chunk.

    Returns
    -------
    Tensor
        In ``input``'s dtype: 0-d for "mean"/"sum", ``target``'s shape for "none".

    Notes
    -----
    Gradients flow to ``input``, ``linear_weight`` and ``bias``. For "mean"
    and "sum" the forward computes them in the same sweep over the
    vocabulary; for "none" backward sweeps again with the per-token upstream
    gradient. On the CPU this is ``fastloss.linear_cross_entropy_with_grad``;
    on a GPU, chunked PyTorch matrix products around the fused CUDA kernel.

    Examples
    --------
    >>> import torch, fastloss.torch as flt
    >>> h = torch.randn(6, 8, requires_grad=True)
    >>> head = torch.nn.Linear(8, 50)
    >>> t = torch.randint(0, 50, (6,))
    >>> loss = flt.linear_cross_entropy(h, head.weight, t, head.bias)
    >>> loss.backward()
    >>> ref = torch.nn.functional.cross_entropy(head(h), t)
    >>> bool(torch.allclose(loss, ref, atol=1e-6)), head.weight.grad.shape
    (True, torch.Size([50, 8]))
    """
    if linear_bias is not None:
        if bias is not None:
            raise ValueError("bias: given twice (as bias and as linear_bias)")
        bias = linear_bias
    if ignore_index is None:
        ignore_index = -100
    _float("input", input)
    _float("linear_weight", linear_weight)
    _classes("target", target)
    bias = _optional_float("bias", bias)
    weight = _optional_float("weight", weight)
    for name, t in (("linear_weight", linear_weight), ("target", target), ("bias", bias), ("weight", weight)):
        _same_device(name, t, input)
    if input.dim() == 0:
        raise ValueError("input: expected at least one dimension (the features), found a 0-d tensor")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(f"linear_weight: expected shape (V, {input.shape[-1]}) (input's last dimension), found "
                         f"{tuple(linear_weight.shape)}")
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight: expected input's dtype {input.dtype}, found {linear_weight.dtype}")
    if bias is not None and tuple(bias.shape) != (linear_weight.shape[0],):
        raise ValueError(f"bias: expected shape ({linear_weight.shape[0]},) (linear_weight's rows), found "
                         f"{tuple(bias.shape)}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target: expected shape {tuple(input.shape[:-1])} (input's without its last "
                         f"dimension), found {tuple(target.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(f"chunk_size: expected an int, found {type(chunk_size).__name__}")
    shape = tuple(target.shape)
    h = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1)
    if _compiling():
        spec = _spec(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, None)
        with_grad = _wants_grad(h, linear_weight, bias) and spec.reduction != "none"
        loss = L.linear_cross_entropy(h, linear_weight, t, bias, weight, *spec[:-1], _normalizer_tensor(normalizer),
                                      chunk_size, with_grad)[0]
    else:
        spec = _spec(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, normalizer)
        loss = A.LinearCrossEntropy.apply(h, linear_weight, t, bias, weight, spec, chunk_size)
    return loss.reshape(shape) if spec.reduction == "none" else loss


def distill(student, teacher, *, kind="kl", temperature=1.0, beta=0.5, scale_by_t2=False,
            reduction="batchmean", target=None, ignore_index=-100, soft_weight=1.0, hard_weight=0.0):
    """Distillation loss of student logits against a teacher, on fastloss's fused kernel
    (``fastloss.distill``).

    Forward computes the loss and its gradient with respect to the student in
    one pass over both rows and keeps the gradient; backward reads no logits.

    Parameters
    ----------
    student : Tensor, shape (..., V)
        Student logits (classes last); float16, bfloat16, float32 or float64,
        on the CPU or a CUDA device. Gradients flow here only.
    teacher : Tensor (..., V), or tuple (indices, logprobs) of Tensors (..., k)
        Teacher logits of the student's shape (any float dtype), or a top-k
        teacher: integer class ``indices`` and their log-probabilities
        (renormalised over the k classes after the temperature; see
        ``fastloss.distill``). No gradient flows to the teacher: a teacher
        that requires grad raises ``ValueError`` (pass ``teacher.detach()``).
    kind : {"kl", "reverse_kl", "jsd"}, default "kl"
        KL(teacher || student), KL(student || teacher), or the generalised
        Jensen-Shannon divergence with ``beta`` (TRL's definition).
    temperature : float > 0, default 1.0
        Both distributions are softmaxes of logits divided by it.
    beta : float in [0, 1], default 0.5
        The JSD's mixture weight (``kind="jsd"`` only).
    scale_by_t2 : bool, default False
        Multiply the divergence by ``temperature**2`` (Hinton's convention).
    reduction : {"batchmean", "mean", "sum", "none"}, default "batchmean"
        "batchmean" divides the sum by the number of counted tokens, "mean" by
        that number times V (``F.kl_div``'s element mean).
    target : Tensor of int, shape ``student.shape[:-1]``, optional
        Class indices: tokens at ``ignore_index`` are not counted, and with
        ``hard_weight > 0`` a cross-entropy term on the untempered student
        logits is added.
    ignore_index : int, default -100
    soft_weight, hard_weight : float >= 0, default 1.0 and 0.0
        The per-token loss is ``soft_weight * divergence + hard_weight * cross_entropy``.

    Returns
    -------
    Tensor
        In ``student``'s dtype: 0-d, or ``student.shape[:-1]`` for "none"
        (0 at ignored tokens).

    Raises
    ------
    TypeError, ValueError
        Bad tensors, shapes, devices or options (the message names the argument).

    Examples
    --------
    >>> import torch, torch.nn.functional as F, fastloss.torch as flt
    >>> s = torch.randn(4, 10, requires_grad=True)
    >>> t = torch.randn(4, 10)
    >>> loss = flt.distill(s, t, temperature=2.0)
    >>> loss.backward()
    >>> ref = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True,
    ...                reduction="batchmean")
    >>> bool(torch.allclose(loss, ref, atol=1e-6)), s.grad.shape
    (True, torch.Size([4, 10]))
    """
    _float("student", student)
    if student.dim() == 0:
        raise ValueError("student: expected at least one dimension (the classes), found a 0-d tensor")
    rows = tuple(student.shape[:-1])
    if isinstance(teacher, (tuple, list)):
        if len(teacher) != 2:
            raise ValueError(f"teacher: expected logits or an (indices, logprobs) pair, found a sequence of "
                             f"{len(teacher)}")
        indices, logprobs = teacher
        _tensor("teacher indices", indices)
        if indices.dtype not in _INT_DTYPES:
            raise TypeError(f"teacher indices: expected an integer tensor, found {indices.dtype}")
        _float("teacher logprobs", logprobs)
        for name, t in (("teacher indices", indices), ("teacher logprobs", logprobs)):
            if t.dim() != student.dim() or tuple(t.shape[:-1]) != rows:
                raise ValueError(f"{name}: expected shape {rows + ('k',)} (student's rows, then k), found "
                                 f"{tuple(t.shape)}")
        if tuple(indices.shape) != tuple(logprobs.shape):
            raise ValueError(f"teacher logprobs: expected the indices' shape {tuple(indices.shape)}, found "
                             f"{tuple(logprobs.shape)}")
        _same_device("teacher indices", indices, student)
        dense = logprobs
    else:
        _float("teacher", teacher)
        if tuple(teacher.shape) != tuple(student.shape):
            raise ValueError(f"teacher: expected student's shape {tuple(student.shape)}, found "
                             f"{tuple(teacher.shape)}")
        indices, dense = None, teacher
    _same_device("teacher", dense, student)
    if dense.requires_grad and torch.is_grad_enabled():
        raise ValueError("teacher: gradients with respect to the teacher are not computed; pass teacher.detach()")
    if target is not None:
        _classes("target", target)
        _same_device("target", target, student)
        if tuple(target.shape) != rows:
            raise ValueError(f"target: expected shape {rows} (student's without its last dimension), found "
                             f"{tuple(target.shape)}")
    spec = _distill_spec(kind, temperature, beta, scale_by_t2, reduction, ignore_index, soft_weight, hard_weight)
    v = student.shape[-1]
    s = student.reshape(-1, v)
    k = dense.shape[-1]
    t = dense.reshape(-1, k)
    idx = None if indices is None else indices.reshape(-1, k)
    tg = None if target is None else target.reshape(-1)
    if _compiling():
        loss, _ = L.distill(s, t, idx, tg, *spec, _wants_grad(s))
    else:
        loss = A.Distill.apply(s, t, idx, tg, spec)
    return loss.reshape(rows) if spec.reduction == "none" else loss


def _distill_spec(kind, temperature, beta, scale_by_t2, reduction, ignore_index, soft_weight, hard_weight):
    for name, value in (("kind", kind), ("reduction", reduction)):
        if not isinstance(value, str):
            raise TypeError(f"{name}: expected a string, found {type(value).__name__}")
    if not isinstance(scale_by_t2, bool):
        raise TypeError(f"scale_by_t2: expected a bool, found {type(scale_by_t2).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, found {type(ignore_index).__name__}")
    return DistillSpec(kind, _number("temperature", temperature), _number("beta", beta), scale_by_t2, reduction,
                       int(ignore_index), _number("soft_weight", soft_weight), _number("hard_weight", hard_weight))
