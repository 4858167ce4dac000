"""The computations behind ``fastloss.torch``: one fastloss call on tensors.

Each function takes tensors already checked by ``fastloss.torch.functional``
(canonical shapes, matching devices) and returns tensors:

* CPU tensors reach the numpy API as views of their memory (no copy;
  bfloat16 through a 16-bit view read as ``ml_dtypes.bfloat16``), and the
  gradients are written into tensors that PyTorch allocated (``out=``), or
  into the logits themselves (``inplace``).
* GPU tensors go to the same public functions unchanged: the CUDA layer
  (``fastloss.cuda``) launches on the tensor's current stream and allocates
  its outputs with PyTorch. :func:`to_device` / :func:`from_device` are the
  two places a GPU tensor crosses over; the simulator tests replace them.
* Losses come back in the input's dtype, as PyTorch's losses do: a 0-d
  tensor for "mean"/"sum", the targets' shape for "none".

Both the eager ``autograd.Function`` classes (``fastloss.torch.autograd``)
and the registered custom ops (``fastloss.torch.library``) call these, so the
two paths compute the same bits.
"""

import collections
import math
import sys
import threading
from typing import NamedTuple

import numpy as np
import torch

from .. import _validate as V
from .. import config
from ..options import DistillOptions
from ..ops import cross_entropy as _ce
from ..ops import linear_cross_entropy as _lce
from ..ops import mse as _mse

#: The float dtypes every op accepts (the order is the one error messages print).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CESpec(NamedTuple):
    """The non-tensor options of a cross-entropy call, as the numpy API takes them."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0
    normalizer: float | None = None

    def keywords(self):
        """The numpy API's keywords (memoised per spec: a training loop passes
        the same options every step)."""
        return keywords(self)


#: The non-tensor options of a distillation call, as the numpy API takes them
#: (unchecked here: the numpy API checks them); ``keywords(spec)`` gives its keywords.
DistillSpec = DistillOptions


def keywords(spec):
    """The numpy API's keywords of option tuple ``spec`` (memoised per spec)."""
    key = (type(spec), spec)
    kw = _KEYWORDS.get(key)
    if kw is None:
        kw = spec._asdict()
        if len(_KEYWORDS) < 256:
            _KEYWORDS[key] = kw
    return kw


_KEYWORDS = {}


# --- crossing between tensors and the numpy / CUDA APIs ------------------------------------

def as_numpy(t):
    """A numpy view of CPU tensor ``t``'s memory (no copy); bfloat16 as
    ``ml_dtypes.bfloat16``. Strided tensors give strided views."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
        return _numpy(t).view(V.bfloat16())
    return _numpy(t)


def _numpy(t):
    try:
        return t.numpy()
    except RuntimeError:  # a lazily negated view (neg bit): materialise it
        return t.resolve_neg().numpy()


def as_numpy_or_none(t):
    return None if t is None else as_numpy(t)


def from_numpy(a):
    """A tensor sharing numpy array ``a``'s memory (bfloat16 included)."""
    if V.is_bfloat16(a.dtype):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def empty_like(x):
    """A new C-contiguous CPU tensor of ``x``'s shape and dtype for a
    gradient: a kept buffer that nothing else holds any more, when there is
    one (see ``fastloss.config.TORCH_GRAD_CACHE_BYTES``), else a new one."""
    shape = tuple(x.shape)
    nbytes = math.prod(shape) * x.element_size()
    if config.TORCH_GRAD_CACHE_MIN_BYTES <= nbytes <= config.TORCH_GRAD_CACHE_BYTES:
        t = torch.from_numpy(_kept_buffer(shape, x.dtype))
        return t.view(torch.bfloat16) if x.dtype == torch.bfloat16 else t
    return torch.empty_like(x, memory_format=torch.contiguous_format)


#: (shape, dtype) -> kept arrays (numpy views of tensors PyTorch allocated;
#: int16 for bfloat16), least recently used key first
_KEPT = collections.OrderedDict()
_KEPT_LOCK = threading.Lock()
KEPT_PER_SHAPE = 2  # a training loop holds last step's gradient while it makes the next


def _kept_buffer(shape, dtype):
    """A kept array for (shape, dtype) that only the cache holds, else a new
    one, kept in its turn. A tensor made from an array by
    ``torch.from_numpy`` holds a reference to it until the tensor's storage
    (views, a ``.grad``, a saved tensor included) is freed, so the array's
    reference count says whether anything still uses it. The memory is
    allocated by ``torch.empty`` (4 KiB pages: no wait for the kernel to
    assemble huge pages, which here took up to 1.5 s for a first 524 MB
    buffer); once it is resident, reusing it costs no page faults."""
    key = (shape, dtype)
    with _KEPT_LOCK:
        kept = _KEPT.pop(key, [])
        free = [i for i in range(len(kept)) if not _in_use(kept[i])]
        if free:
            a = kept.pop(free[0])
        else:
            a = torch.empty(shape, dtype=torch.int16 if dtype == torch.bfloat16 else dtype).numpy()
        kept = [*kept, a][-KEPT_PER_SHAPE:]  # most recently handed out last
        _KEPT[key] = kept
        limit = config.TORCH_GRAD_CACHE_BYTES
        while len(_KEPT) > 1 and _kept_bytes() > limit:
            _KEPT.popitem(last=False)
        if _kept_bytes() > limit:
            del kept[:-1]
        return a


def _in_use(a):
    """Whether anything but the cache's list holds array ``a`` (references:
    the list, this argument, getrefcount's argument)."""
    return sys.getrefcount(a) > 3


def _kept_bytes():
    return sum(a.nbytes for arrays in _KEPT.values() for a in arrays)


def release_buffers():
    """Free the gradient buffers ``fastloss.torch`` keeps for reuse (memory
    still held by tensors in use is freed when they are)."""
    with _KEPT_LOCK:
        _KEPT.clear()


def on_gpu(t):
    """Whether ``t`` runs on the CUDA layer (the simulator tests patch this)."""
    return t.device.type != "cpu"


def to_device(t):
    """The object the CUDA layer gets for tensor ``t`` (``t`` itself, detached)."""
    return None if t is None else t.detach()


def from_device(a, like):
    """A tensor on ``like``'s device from what the CUDA layer returned (a tensor
    already: PyTorch allocated it)."""
    return a


def loss_tensor(loss, like, shape, dtype=None):
    """The loss as PyTorch returns it: in ``dtype`` (default: ``like``'s) on
    ``like``'s device; 0-d for a Python float or a one-element GPU array,
    ``shape`` for "none"."""
    dtype = like.dtype if dtype is None else dtype
    if isinstance(loss, float):
        return torch.scalar_tensor(loss, dtype=dtype)
    if isinstance(loss, np.ndarray):
        return from_numpy(loss).reshape(shape).to(dtype)
    return from_device(loss, like).reshape(shape).to(dtype)


# --- the ops -----------------------------------------------------------------------------

def cross_entropy(x, target, weight, spec, with_grad, inplace=False, loss_dtype=None):
    """``(loss, grad)`` of the cross-entropy of 2-D logits ``x`` (N, V) against
    ``target`` (N,) class indices or (N, V) probabilities: the loss as :func:`loss_tensor` makes it (in
    ``loss_dtype`` if given, else ``x``'s dtype); ``grad`` is
    d(loss)/dx (upstream gradient 1) in ``x``'s dtype, None without
    ``with_grad``. ``inplace``: the gradient is written into ``x``'s memory
    (which the caller made contiguous) and ``grad`` shares it."""
    shape = x.shape[:-1] if spec.reduction == "none" else ()
    kw = spec.keywords()
    if on_gpu(x):
        xd, td, wd = to_device(x), to_device(target), to_device(weight)
        if not with_grad:
            return loss_tensor(_ce.cross_entropy(xd, td, weight=wd, **kw), x, shape, loss_dtype), None
        loss, grad = _ce.cross_entropy_with_grad(xd, td, weight=wd, inplace=inplace, **kw)
        return loss_tensor(loss, x, shape, loss_dtype), from_device(xd if inplace else grad, x)
    xn, tn, wn = as_numpy(x), as_numpy(target), as_numpy_or_none(weight)
    if not with_grad:
        return loss_tensor(_ce.cross_entropy(xn, tn, weight=wn, **kw), x, shape, loss_dtype), None
    if inplace:
        loss, _ = _ce.cross_entropy_with_grad(xn, tn, weight=wn, inplace=True, **kw)
        return loss_tensor(loss, x, shape, loss_dtype), x.detach()
    grad = empty_like(x)
    loss, _ = _ce.cross_entropy_with_grad(xn, tn, weight=wn, out=as_numpy(grad), **kw)
    return loss_tensor(loss, x, shape, loss_dtype), grad


def distill(s, teacher, teacher_indices, target, spec, with_grad):
    """``(loss, grad)`` of the distillation loss of student logits ``s`` (N, V)
    against ``teacher``: (N, V) logits, or (N, k) log-probabilities at
    ``teacher_indices`` (N, k) (a top-k teacher); ``target`` (N,) or None.
    ``grad`` is d(loss)/ds (upstream gradient 1) in ``s``'s dtype, None
    without ``with_grad``."""
    from ..ops import distill as _distill

    shape = s.shape[:-1] if spec.reduction == "none" else ()
    kw = keywords(spec)
    if on_gpu(s):
        sd, td, tgt = to_device(s), to_device(teacher), to_device(target)
        t = td if teacher_indices is None else _distill.TopKTeacher(to_device(teacher_indices), td)
        if not with_grad:
            return loss_tensor(_distill.distill(sd, t, targets=tgt, **kw), s, shape), None
        loss, grad = _distill.distill_with_grad(sd, t, targets=tgt, **kw)
        return loss_tensor(loss, s, shape), from_device(grad, s)
    sn, tn, tgt = as_numpy(s), as_numpy(teacher), as_numpy_or_none(target)
    t = tn if teacher_indices is None else _distill.TopKTeacher(as_numpy(teacher_indices), tn)
    if not with_grad:
        return loss_tensor(_distill.distill(sn, t, targets=tgt, **kw), s, shape), None
    grad = empty_like(s)
    loss, _ = _distill.distill_with_grad(sn, t, targets=tgt, out=as_numpy(grad), **kw)
    return loss_tensor(loss, s, shape), grad


def mse(x, target, weight, reduction, with_grad):
    """``(loss, grad)`` of the mean squared error of ``x`` against ``target``
    (same shape); ``grad`` is d(loss)/dx (upstream gradient 1), None without
    ``with_grad``."""
    shape = x.shape if reduction == "none" else ()
    if on_gpu(x):
        xd, td, wd = to_device(x), to_device(target), to_device(weight)
        if not with_grad:
            return loss_tensor(_mse.mse(xd, td, reduction=reduction, weight=wd), x, shape), None
        loss, grad = _mse.mse_with_grad(xd, td, reduction=reduction, weight=wd)
        return loss_tensor(loss, x, shape), from_device(grad, x)
    xn, tn, wn = as_numpy(x), as_numpy(target), as_numpy_or_none(weight)
    if not with_grad:
        return loss_tensor(_mse.mse(xn, tn, reduction=reduction, weight=wn), x, shape), None
    grad = empty_like(x)
    loss, _ = _mse.mse_with_grad(xn, tn, reduction=reduction, weight=wn, out=as_numpy(grad))
    return loss_tensor(loss, x, shape), grad


def linear_cross_entropy(h, w, target, bias, weight, spec, chunk_size, with_grad, grad_output=None):
    """``(loss, grad_h, grad_w, grad_bias)`` of the cross-entropy of
    ``h @ w.T + bias`` (h: (N, D), w: (V, D)) against ``target`` (N,), never
    holding the (N, V) logits. Gradients are None without ``with_grad``
    (``grad_bias`` also without a bias); ``grad_output`` (None: 1) is the
    upstream gradient they include (per token for "none")."""
    shape = target.shape if spec.reduction == "none" else ()
    if on_gpu(h):
        return chunked_linear_cross_entropy(h, w, target, bias, weight, spec, chunk_size, with_grad,
                                            grad_output)
    hn, wn, tn = as_numpy(h), as_numpy(w), as_numpy(target)
    bn, cwn = as_numpy_or_none(bias), as_numpy_or_none(weight)
    kw = dict(bias=bn, weight=cwn, chunk_size=chunk_size, **spec.keywords())
    if not with_grad:
        return loss_tensor(_lce.linear_cross_entropy(hn, wn, tn, **kw), h, shape), None, None, None
    if grad_output is not None and grad_output.dtype in (torch.float16, torch.bfloat16):
        grad_output = grad_output.float()  # the numpy API takes 16-bit upstream scalars as float32
    go = None if grad_output is None else as_numpy(grad_output)
    r = _lce.linear_cross_entropy_with_grad(hn, wn, tn, grad_output=go, **kw)
    gb = None if r.grad_bias is None else from_numpy(r.grad_bias)
    return loss_tensor(r.loss, h, shape), from_numpy(r.grad_hidden), from_numpy(r.grad_weight), gb


def chunked_linear_cross_entropy(h, w, target, bias, weight, spec, chunk_size, with_grad, grad_output=None):
    """:func:`linear_cross_entropy` from PyTorch matrix products and the fused
    cross-entropy of :func:`cross_entropy` on one chunk of rows at a time:
    the path of GPU tensors (the numpy linear cross-entropy is CPU only),
    correct on any device.

    Each chunk's logits ``h_c @ w.T + bias`` are formed, the fused kernel
    turns them into their gradient in place, then ``grad_h_c = g @ w``,
    ``grad_w += g.T @ h_c``, ``grad_bias += g.sum(0)``. For "mean" the
    denominator (count, or class-weight sum, of counted tokens; or
    ``normalizer``) is computed first and passed to every chunk as its
    ``normalizer``, so each chunk's gradient is final when it is made.
    """
    n, v = h.shape[0], w.shape[0]
    reduction = spec.reduction
    if reduction == "mean" and spec.normalizer is None:
        if weight is not None and spec.z_loss:
            raise NotImplementedError("linear_cross_entropy on GPU tensors: class weights together with "
                                      "z_loss and reduction='mean' need normalizer= (or reduction='sum')")
        counted = target != spec.ignore_index
        if weight is None:
            denom = counted.sum().to(torch.float64)
        else:
            denom = (weight.to(torch.float64)[target.clamp(0, v - 1)] * counted).sum()
        # a host number: the per-chunk normalizer (one synchronisation per call)
        denom = float(denom)
        chunk_spec = spec._replace(normalizer=denom if denom > 0 else 1.0)
    else:
        chunk_spec = spec
    if chunk_size is None:
        chunk_size = max(1, (64 << 20) // max(1, v * h.element_size()))
    losses = []
    gh = torch.empty_like(h) if with_grad else None
    gw = torch.zeros(w.shape, dtype=torch.float32 if w.dtype != torch.float64 else w.dtype, device=w.device) \
        if with_grad else None
    gb = torch.zeros(v, dtype=gw.dtype, device=h.device) if with_grad and bias is not None else None
    total = None
    for lo in range(0, n, chunk_size):
        hi = min(n, lo + chunk_size)
        hc, tc = h[lo:hi].detach(), target[lo:hi]
        logits = hc @ w.detach().T
        if bias is not None:
            logits += bias.detach().to(logits.dtype)
        if not with_grad:
            loss_c, _ = cross_entropy(logits, tc, weight, chunk_spec, False, loss_dtype=torch.float64)
        else:
            loss_c, g = cross_entropy(logits, tc, weight, chunk_spec, True, inplace=True, loss_dtype=torch.float64)
            if grad_output is not None:
                go = grad_output[lo:hi] if reduction == "none" else grad_output
                g.mul_(go.to(g.dtype).reshape(-1, 1) if reduction == "none" else go.to(g.dtype))
            gh[lo:hi] = g @ w.detach()
            gw += (g.T @ hc).to(gw.dtype)
            if gb is not None:
                gb += g.sum(0, dtype=gb.dtype)
        if reduction == "none":
            losses.append(loss_c)
        else:
            total = loss_c if total is None else total + loss_c
    if reduction == "none":
        loss = (torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64, device=h.device)).to(h.dtype)
    else:
        loss = (total if total is not None else torch.zeros((), dtype=torch.float64, device=h.device)).to(h.dtype)
    if not with_grad:
        return loss, None, None, None
    return loss, gh, gw.to(w.dtype), (None if gb is None else gb.to(bias.dtype))
