"""The scalar options of a call, validated once, in one frozen object per op.

``fastloss.ops`` spells out the public keywords and builds these objects; the
CPU plans (``fastloss.ops``) and the CUDA plans (``fastloss.cuda``) take
``(arrays, options)`` and never re-check or re-word what was checked here.
Array checks that need only ``(shape, dtype)`` live in ``fastloss._validate``,
so host and device arrays share them too.

Kernel scalars travel as named tuples (``Transform`` here, the per-op
constants beside each op's kernels), never as long positional lists.
"""

from typing import NamedTuple

import numpy as np

from . import _validate as V
from . import codes
from .codes import JSD, KL, REVERSE_KL


class Transform(NamedTuple):
    """The logit transform as kernels take it: ``mode`` (``codes.PLAIN``,
    ``SCALED``, ``SOFTCAP``), ``scale`` and ``cap`` (1 without softcap), in the
    accumulation type. ``z = scale * x``, then ``z = cap * tanh(z / cap)``
    under softcap; ``-inf`` stays ``-inf``."""

    mode: int
    scale: float
    cap: float


class CrossEntropyOptions(NamedTuple):
    """Validated options of a cross-entropy call (class-index targets); frozen
    (a named tuple: cheap to build on every call).

    Build with :meth:`check`, which raises the contract's ``TypeError`` /
    ``ValueError`` naming the argument. ``softcap`` is None without a cap.
    """

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0
    normalizer: float | None = None

    @classmethod
    def check(cls, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
              softcap=None, logit_scale=1.0, normalizer=None):
        """The options of one call, checked (same keywords as ``fastloss.cross_entropy``)."""
        reduction = V.check_reduction(reduction)
        eps = V.check_range(label_smoothing, "label_smoothing", low=0.0, high=1.0)
        zl = V.check_range(z_loss, "z_loss", low=0.0)
        norm = V.check_range(normalizer, "normalizer", low=0.0, low_open=True, allow_none=True)
        if norm is not None and reduction != "mean":
            raise ValueError(f"normalizer: only used with reduction='mean', found reduction={reduction!r}")
        scale, cap = check_transform(softcap, logit_scale)
        return cls(reduction, V.check_ignore_index(ignore_index), eps, zl, cap, scale, norm)

    @classmethod
    def cached(cls, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
               normalizer):
        """:meth:`check` of positional options, remembered for plain Python values
        (int, float, str, None): the per-call cost of a training loop's
        repeated options is one dict lookup. The key holds each value's type,
        so ``True`` never meets the entry of ``1`` nor ``-100.0`` that of ``-100``."""
        key = (ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, normalizer,
               type(ignore_index), type(reduction), type(label_smoothing), type(z_loss),
               type(softcap), type(logit_scale), type(normalizer))
        try:
            return _CE_CACHE[key]
        except (KeyError, TypeError):  # TypeError: an unhashable value (checked below)
            pass
        opts = cls.check(ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                         logit_scale=logit_scale, normalizer=normalizer)
        _remember(_CE_CACHE, key, opts)
        return opts

    @property
    def mode(self):
        """The transform mode (``codes.PLAIN``, ``SCALED`` or ``SOFTCAP``)."""
        return transform_mode(self.softcap, self.logit_scale)

    def scale_cap(self, acc):
        """(scale, cap) of the logit transform as Python floats (cap 1 without softcap),
        checked to fit accumulation dtype ``acc``: what every backend builds its
        kernel scalars from."""
        return scale_cap(self.softcap, self.logit_scale, acc)

    @property
    def reduction_code(self):
        """``codes.NONE``, ``SUM`` or ``MEAN``."""
        return codes.REDUCTION_CODES[self.reduction]

    def transform(self, acc):
        """The :class:`Transform` in accumulation dtype ``acc``."""
        return make_transform(self.softcap, self.logit_scale, acc)

    def denominators(self, count, target_wsum):
        """(D_ce, D_z) of the mean: cross-entropy is divided by the counted target
        weight (``target_wsum``; the count without class weights), z-loss by
        the ``count`` of counted tokens; ``normalizer`` replaces both."""
        if self.normalizer is not None:
            return self.normalizer, self.normalizer
        return target_wsum, float(count)


class LogsumexpOptions(NamedTuple):
    """Validated options of ``logsumexp``: the logit transform."""

    softcap: float | None = None
    logit_scale: float = 1.0

    @classmethod
    def check(cls, *, softcap=None, logit_scale=1.0):
        scale, cap = check_transform(softcap, logit_scale)
        return cls(cap, scale)

    @property
    def mode(self):
        return transform_mode(self.softcap, self.logit_scale)

    def scale_cap(self, acc):
        return scale_cap(self.softcap, self.logit_scale, acc)

    def transform(self, acc):
        return make_transform(self.softcap, self.logit_scale, acc)


class MSEOptions(NamedTuple):
    """Validated options of an MSE call."""

    reduction: str = "mean"

    @classmethod
    def check(cls, *, reduction="mean"):
        return cls(V.check_reduction(reduction))

    @property
    def reduction_code(self):
        return codes.REDUCTION_CODES[self.reduction]


#: ``fastloss.distill``'s ``kind`` -> the kernels' divergence code (``fastloss.codes``).
DISTILL_KINDS = {"kl": KL, "reverse_kl": REVERSE_KL, "jsd": JSD}
DISTILL_REDUCTIONS = ("batchmean", "mean", "sum", "none")


class DistillOptions(NamedTuple):
    """Validated scalar options of a ``fastloss.distill`` call; frozen.

    Build with :meth:`check`. ``kind_code`` is the divergence the kernels run:
    TRL's special cases ``jsd`` with ``beta = 0`` (forward KL) and ``beta = 1``
    (reverse KL) are mapped to those kinds.
    """

    kind: str = "kl"
    temperature: float = 1.0
    beta: float = 0.5
    scale_by_t2: bool = False
    reduction: str = "batchmean"
    ignore_index: int = -100
    soft_weight: float = 1.0
    hard_weight: float = 0.0

    @classmethod
    def check(cls, *, kind="kl", temperature=1.0, beta=0.5, scale_by_t2=False, reduction="batchmean",
              ignore_index=-100, soft_weight=1.0, hard_weight=0.0):
        """The options of one call, checked (same keywords as ``fastloss.distill``)."""
        if not isinstance(kind, str) or kind not in DISTILL_KINDS:
            raise ValueError(f"kind: expected one of 'kl', 'reverse_kl', 'jsd', found {kind!r}")
        if not isinstance(reduction, str) or reduction not in DISTILL_REDUCTIONS:
            raise ValueError("reduction: expected one of 'batchmean', 'mean', 'sum', 'none', "
                             f"found {reduction!r}")
        t = V.check_range(temperature, "temperature", low=0.0, low_open=True)
        b = V.check_range(beta, "beta", low=0.0, high=1.0)
        if not isinstance(scale_by_t2, (bool, np.bool_)):
            raise TypeError(f"scale_by_t2: expected True or False, found {scale_by_t2!r}")
        sw = V.check_range(soft_weight, "soft_weight", low=0.0)
        hw = V.check_range(hard_weight, "hard_weight", low=0.0)
        return cls(kind, t, b, bool(scale_by_t2), reduction, V.check_ignore_index(ignore_index), sw, hw)

    @property
    def kind_code(self):
        """``KL``, ``REVERSE_KL`` or ``JSD`` (jsd at beta 0 / 1 is forward / reverse KL, as in TRL)."""
        if self.kind == "jsd":
            if self.beta == 0.0:
                return KL
            if self.beta == 1.0:
                return REVERSE_KL
        return DISTILL_KINDS[self.kind]

    @property
    def soft_scale(self):
        """The factor of the divergence in the per-token loss: ``soft_weight`` (times T^2 with ``scale_by_t2``)."""
        return self.soft_weight * (self.temperature ** 2 if self.scale_by_t2 else 1.0)


_CE_CACHE = {}
_PLAIN = frozenset((int, float, str, type(None)))


def _remember(cache, key, opts, size=256):
    """Keep ``opts`` under ``key`` when every value in it is a plain Python value
    (the key's first half; the second half holds their types)."""
    if all(t in _PLAIN for t in key[len(key) // 2:]):
        if len(cache) >= size:
            cache.clear()
        cache[key] = opts


def check_transform(softcap, logit_scale):
    """(logit_scale, softcap or None) as Python floats, checked > 0 and finite."""
    scale = V.check_range(logit_scale, "logit_scale", low=0.0, low_open=True)
    cap = V.check_range(softcap, "softcap", low=0.0, low_open=True, allow_none=True)
    return scale, cap


def transform_mode(softcap, logit_scale):
    if softcap is not None:
        return codes.SOFTCAP
    return codes.PLAIN if logit_scale == 1.0 else codes.SCALED


def scale_cap(softcap, logit_scale, acc):
    """(scale, cap), 1 for no cap. ValueError when the kernels' constants
    (``scale``, ``cap`` and ``scale / cap``) would overflow the accumulation
    dtype ``acc`` (float32 for float32/float16/bfloat16 logits): a cap of 1e39
    would be inf in float32, and the transform NaN."""
    cap = 1.0 if softcap is None else softcap
    big = float(np.finfo(acc).max)
    for name, v in (("logit_scale", logit_scale), ("softcap", cap), ("logit_scale / softcap", logit_scale / cap)):
        if v > big:
            raise ValueError(f"{name}: {v!r} overflows the {np.dtype(acc)} accumulation of these logits "
                             f"(at most {big!r})")
    return logit_scale, cap


def make_transform(softcap, logit_scale, acc):
    a = np.dtype(acc).type
    scale, cap = scale_cap(softcap, logit_scale, acc)
    return Transform(transform_mode(softcap, logit_scale), a(scale), a(cap))


def safe_div(num, den):
    """num / den, with a zero denominator (nothing counted) giving 0."""
    return num / den if den != 0 else 0.0
