"""``nn.Module`` twins of the functions in ``fastloss.torch.functional``,
taking the constructor arguments of PyTorch's modules (legacy
``size_average``/``reduce`` included) plus fastloss's options."""

from torch import nn

from . import functional as F

__all__ = ["CrossEntropyLoss", "MSELoss", "LinearCrossEntropyLoss", "DistillLoss"]


def _reduction(size_average, reduce, reduction):
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction
        return _reduction.legacy_get_string(size_average, reduce)
    return reduction


class CrossEntropyLoss(nn.Module):
    """:func:`fastloss.torch.cross_entropy` as a module (``torch.nn.CrossEntropyLoss``'s
    arguments, then fastloss's options as keywords).

    Examples
    --------
    >>> import torch, fastloss.torch as flt
    >>> loss_fn = flt.CrossEntropyLoss(ignore_index=0, z_loss=1e-4)
    >>> x, t = torch.randn(8, 32, requires_grad=True), torch.randint(0, 32, (8,))
    >>> loss_fn(x, t).backward()
    >>> x.grad.shape
    torch.Size([8, 32])
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, z_loss=0.0, softcap=None, logit_scale=1.0, normalizer=None,
                 inplace_backward=False):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.normalizer = normalizer
        self.inplace_backward = inplace_backward

    def forward(self, input, target):
        return F.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                               self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                               logit_scale=self.logit_scale, normalizer=self.normalizer,
                               inplace_backward=self.inplace_backward)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"logit_scale={self.logit_scale}, normalizer={self.normalizer}, "
                f"inplace_backward={self.inplace_backward}")


class MSELoss(nn.Module):
    """:func:`fastloss.torch.mse_loss` as a module (``torch.nn.MSELoss``'s
    arguments, plus ``weight``)."""

    def __init__(self, size_average=None, reduce=None, reduction="mean", *, weight=None):
        super().__init__()
        self.reduction = _reduction(size_average, reduce, reduction)
        self.register_buffer("weight", weight)

    def forward(self, input, target):
        return F.mse_loss(input, target, self.reduction, weight=self.weight)

    def extra_repr(self):
        return f"reduction={self.reduction!r}"


class LinearCrossEntropyLoss(nn.Module):
    """An LM head and its cross-entropy, never holding the logits
    (``torch.nn.LinearCrossEntropyLoss``'s arguments and parameter names:
    ``self.linear`` is the ``nn.Linear(in_features, num_classes)`` head, so
    state dicts load from one into the other).

    ``options`` (PyTorch's chunking options) is accepted for compatibility and
    ignored: ``chunk_size`` sets the chunk. ``out_features`` other than ``()``
    (multi-dimensional outputs) raises ``ValueError``.

    Examples
    --------
    >>> import torch, fastloss.torch as flt
    >>> head = flt.LinearCrossEntropyLoss(16, 100, bias=True)
    >>> h, t = torch.randn(5, 16), torch.randint(0, 100, (5,))
    >>> head(h, t).backward()
    >>> head.linear.weight.grad.shape
    torch.Size([100, 16])
    """

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None, dtype=None,
                 reduction="mean", weight=None, ignore_index=None, label_smoothing=0.0, options=None,
                 z_loss=0.0, softcap=None, logit_scale=1.0, normalizer=None, chunk_size=None):
        super().__init__()
        if tuple(out_features) != ():
            raise ValueError(f"out_features: only () (one class dimension) is supported, found {out_features}")
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight: expected shape {(num_classes,)}, found {tuple(weight.shape)}")
        self.num_classes = num_classes
        self.out_features = ()
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device,
                                dtype=dtype)
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = -100 if ignore_index is None else ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.normalizer = normalizer
        self.chunk_size = chunk_size

    def forward(self, input, target):
        return F.linear_cross_entropy(input, self.linear.weight, target, self.linear.bias, weight=self.weight,
                                      ignore_index=self.ignore_index, reduction=self.reduction,
                                      label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                                      softcap=self.softcap, logit_scale=self.logit_scale,
                                      normalizer=self.normalizer, chunk_size=self.chunk_size)

    def extra_repr(self):
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"bias={self.linear.bias is not None}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, chunk_size={self.chunk_size}")


class DistillLoss(nn.Module):
    """:func:`fastloss.torch.distill` as a module: the options in the
    constructor, ``forward(student, teacher, target=None)``.

    Examples
    --------
    >>> import torch, fastloss.torch as flt
    >>> loss_fn = flt.DistillLoss(kind="jsd", beta=0.5, temperature=2.0)
    >>> s, t = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32)
    >>> loss_fn(s, t).backward()
    >>> s.grad.shape
    torch.Size([8, 32])
    """

    def __init__(self, *, kind="kl", temperature=1.0, beta=0.5, scale_by_t2=False, reduction="batchmean",
                 ignore_index=-100, soft_weight=1.0, hard_weight=0.0):
        super().__init__()
        self.kind = kind
        self.temperature = temperature
        self.beta = beta
        self.scale_by_t2 = scale_by_t2
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.soft_weight = soft_weight
        self.hard_weight = hard_weight

    def forward(self, student, teacher, target=None):
        return F.distill(student, teacher, kind=self.kind, temperature=self.temperature, beta=self.beta,
                         scale_by_t2=self.scale_by_t2, reduction=self.reduction, target=target,
                         ignore_index=self.ignore_index, soft_weight=self.soft_weight,
                         hard_weight=self.hard_weight)

    def extra_repr(self):
        return (f"kind={self.kind!r}, temperature={self.temperature}, beta={self.beta}, "
                f"scale_by_t2={self.scale_by_t2}, reduction={self.reduction!r}, "
                f"soft_weight={self.soft_weight}, hard_weight={self.hard_weight}")
