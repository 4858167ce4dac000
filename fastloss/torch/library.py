"""The ops as ``torch.library`` custom ops, for ``torch.compile`` and export.

Registered under the ``fastloss`` namespace on first import of
``fastloss.torch``:

* ``fastloss::cross_entropy(input, target, weight?, ignore_index, reduction,
  label_smoothing, z_loss, softcap?, logit_scale, normalizer?, with_grad)
  -> (loss, grad)``; ``normalizer`` is a one-element tensor (so that a
  value that changes every step, as in gradient accumulation, does not
  recompile the graph), read once on the host by the op.
* ``fastloss::distill(student, teacher, teacher_indices?, target?, kind,
  temperature, beta, scale_by_t2, reduction, ignore_index, soft_weight,
  hard_weight, with_grad) -> (loss, grad)``; ``teacher`` holds logits, or
  top-k log-probabilities when ``teacher_indices`` is given.
* ``fastloss::mse(input, target, weight?, reduction, with_grad) -> (loss, grad)``
* ``fastloss::linear_cross_entropy(input, linear_weight, target, bias?, weight?,
  ignore_index, reduction, label_smoothing, z_loss, softcap?, logit_scale,
  normalizer?, chunk_size?, with_grad) -> (loss, grad_input, grad_weight, grad_bias)``
* ``fastloss::linear_cross_entropy_backward(...)``: the gradients of
  reduction "none" for a per-token upstream gradient.

Each is functional (no input is mutated; ``inplace_backward`` has no custom
op: under ``torch.compile`` the compiler owns the buffers). A ``with_grad``
op returns the gradient its forward computed; ``register_autograd`` scales it
by the upstream gradient in backward (one multiply the compiler fuses).
Without ``with_grad`` the gradient outputs are empty tensors, and a backward
through such a call computes the gradient again from the saved inputs. Fake
implementations give the output shapes and dtypes, so the ops trace with
``fullgraph=True``; ``torch.library.opcheck`` passes on all of them.
"""

import torch
from torch import Tensor

from . import backend
from .backend import CESpec, DistillSpec

_EMPTY = (0,)


def _spec(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, normalizer):
    norm = None if normalizer is None else float(normalizer.item())
    return CESpec(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, norm)


def _or_empty(t, like):
    return like.new_empty(_EMPTY) if t is None else t


# --- cross-entropy ---------------------------------------------------------------------------

@torch.library.custom_op("fastloss::cross_entropy", mutates_args=())
def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
                  label_smoothing: float, z_loss: float, softcap: float | None, logit_scale: float,
                  normalizer: Tensor | None, with_grad: bool) -> tuple[Tensor, Tensor]:
    """Cross-entropy of (N, V) logits against (N,) class indices or (N, V)
    probabilities; the gradient (upstream 1) with ``with_grad``."""
    spec = _spec(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, normalizer)
    loss, grad = backend.cross_entropy(input, target, weight, spec, with_grad)
    return loss, _or_empty(grad, input)


def _fake_row_loss(input, reduction, with_grad):
    """The fake (loss, grad) of a loss over the rows of (N, V) ``input``."""
    shape = input.shape[:-1] if reduction == "none" else ()
    grad = torch.empty_like(input, memory_format=torch.contiguous_format) if with_grad \
        else input.new_empty(_EMPTY)
    return input.new_empty(shape), grad


def _scaled(grad, grad_loss, per_row):
    """The kept gradient times the upstream gradient (one per row for "none")."""
    up = grad_loss.unsqueeze(-1) if per_row else grad_loss
    return grad * up.to(grad.dtype)


@cross_entropy.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
      normalizer, with_grad):
    return _fake_row_loss(input, reduction, with_grad)


def _ce_setup(ctx, inputs, output):
    ctx.per_row = inputs[4] == "none"
    ctx.kept = inputs[-1]
    if ctx.kept:
        ctx.save_for_backward(output[1])
    else:  # no gradient was made: backward computes it again
        ctx.args = inputs[3:10]
        ctx.save_for_backward(inputs[0], inputs[1], inputs[2], inputs[9])


def _ce_backward(ctx, grad_loss, _grad_grad):
    if ctx.kept:
        (grad,) = ctx.saved_tensors
    else:
        x, target, weight, normalizer = ctx.saved_tensors
        grad = cross_entropy(x, target, weight, *ctx.args[:6], normalizer, True)[1]
    return (_scaled(grad, grad_loss, ctx.per_row),) + (None,) * 10


cross_entropy.register_autograd(_ce_backward, setup_context=_ce_setup)


# --- distillation --------------------------------------------------------------------------------

@torch.library.custom_op("fastloss::distill", mutates_args=())
def distill(student: Tensor, teacher: Tensor, teacher_indices: Tensor | None, target: Tensor | None, kind: str,
            temperature: float, beta: float, scale_by_t2: bool, reduction: str, ignore_index: int,
            soft_weight: float, hard_weight: float, with_grad: bool) -> tuple[Tensor, Tensor]:
    """Distillation loss of (N, V) student logits against (N, V) teacher logits,
    or (N, k) teacher log-probabilities at ``teacher_indices``; the gradient
    for the student (upstream 1) with ``with_grad``."""
    spec = DistillSpec(kind, temperature, beta, scale_by_t2, reduction, ignore_index, soft_weight, hard_weight)
    loss, grad = backend.distill(student, teacher, teacher_indices, target, spec, with_grad)
    return loss, _or_empty(grad, student)


@distill.register_fake
def _(student, teacher, teacher_indices, target, kind, temperature, beta, scale_by_t2, reduction, ignore_index,
      soft_weight, hard_weight, with_grad):
    return _fake_row_loss(student, reduction, with_grad)


def _distill_setup(ctx, inputs, output):
    ctx.per_row = inputs[8] == "none"
    ctx.kept = inputs[-1]
    if ctx.kept:
        ctx.save_for_backward(output[1])
    else:  # no gradient was made: backward computes it again
        ctx.args = inputs[4:12]
        ctx.save_for_backward(*inputs[0:4])


def _distill_backward(ctx, grad_loss, _grad_grad):
    if ctx.kept:
        (grad,) = ctx.saved_tensors
    else:
        s, teacher, indices, target = ctx.saved_tensors
        grad = distill(s, teacher, indices, target, *ctx.args, True)[1]
    return (_scaled(grad, grad_loss, ctx.per_row),) + (None,) * 12


distill.register_autograd(_distill_backward, setup_context=_distill_setup)


# --- mean squared error --------------------------------------------------------------------------

@torch.library.custom_op("fastloss::mse", mutates_args=())
def mse(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str,
        with_grad: bool) -> tuple[Tensor, Tensor]:
    """Mean squared error; the gradient for ``input`` (upstream 1) with ``with_grad``."""
    loss, grad = backend.mse(input, target, weight, reduction, with_grad)
    return loss, _or_empty(grad, input)


@mse.register_fake
def _(input, target, weight, reduction, with_grad):
    shape = input.shape if reduction == "none" else ()
    grad = torch.empty_like(input, memory_format=torch.contiguous_format) if with_grad \
        else input.new_empty(_EMPTY)
    return input.new_empty(shape), grad


def _mse_setup(ctx, inputs, output):
    ctx.kept = inputs[-1]
    ctx.reduction = inputs[3]
    ctx.save_for_backward(output[1]) if ctx.kept else ctx.save_for_backward(inputs[0], inputs[1], inputs[2])


def _mse_backward(ctx, grad_loss, _grad_grad):
    if ctx.kept:
        (grad,) = ctx.saved_tensors
    else:
        x, target, weight = ctx.saved_tensors
        grad = mse(x, target, weight, ctx.reduction, True)[1]
    g = grad * grad_loss.to(grad.dtype)
    return g, -g, None, None, None


mse.register_autograd(_mse_backward, setup_context=_mse_setup)


# --- linear cross-entropy ------------------------------------------------------------------------

@torch.library.custom_op("fastloss::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, bias: Tensor | None,
                         weight: Tensor | None, ignore_index: int, reduction: str, label_smoothing: float,
                         z_loss: float, softcap: float | None, logit_scale: float, normalizer: Tensor | None,
                         chunk_size: int | None, with_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cross-entropy of ``input @ linear_weight.T + bias``; the gradients for
    input, linear weight and bias (upstream 1) with ``with_grad``."""
    spec = _spec(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, normalizer)
    loss, gh, gw, gb = backend.linear_cross_entropy(input, linear_weight, target, bias, weight, spec,
                                                    chunk_size, with_grad)
    return loss, _or_empty(gh, input), _or_empty(gw, input), _or_empty(gb, input)


@linear_cross_entropy.register_fake
def _(input, linear_weight, target, bias, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      logit_scale, normalizer, chunk_size, with_grad):
    shape = target.shape if reduction == "none" else ()
    grads = _fake_linear_grads(input, linear_weight, bias, with_grad)
    return (input.new_empty(shape), *grads)


def _fake_linear_grads(input, linear_weight, bias, with_grad):
    if not with_grad:
        return input.new_empty(_EMPTY), input.new_empty(_EMPTY), input.new_empty(_EMPTY)
    gb = input.new_empty(_EMPTY) if bias is None else torch.empty_like(bias, memory_format=torch.contiguous_format)
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            torch.empty_like(linear_weight, memory_format=torch.contiguous_format), gb)


@torch.library.custom_op("fastloss::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(grad_output: Tensor, input: Tensor, linear_weight: Tensor, target: Tensor,
                                  bias: Tensor | None, weight: Tensor | None, ignore_index: int, reduction: str,
                                  label_smoothing: float, z_loss: float, softcap: float | None,
                                  logit_scale: float, normalizer: Tensor | None,
                                  chunk_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of :func:`linear_cross_entropy` for upstream ``grad_output``
    (a second sweep: used for reduction "none", whose per-token upstream
    gradient weights every product)."""
    spec = _spec(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, normalizer)
    _, gh, gw, gb = backend.linear_cross_entropy(input, linear_weight, target, bias, weight, spec, chunk_size,
                                                 True, grad_output=grad_output)
    return gh, gw, _or_empty(gb, input)


@linear_cross_entropy_backward.register_fake
def _(grad_output, input, linear_weight, target, bias, weight, ignore_index, reduction, label_smoothing, z_loss,
      softcap, logit_scale, normalizer, chunk_size):
    return _fake_linear_grads(input, linear_weight, bias, True)


def _lce_setup(ctx, inputs, output):
    # without the forward's gradients (reduction "none", or with_grad False)
    # backward runs the sweep again with the upstream gradient
    ctx.recompute = not inputs[-1] or inputs[6] == "none"
    ctx.has_bias = inputs[3] is not None
    if ctx.recompute:
        ctx.args = inputs[5:11] + inputs[12:13]
        ctx.save_for_backward(*inputs[0:5], inputs[11])
    else:
        ctx.save_for_backward(output[1], output[2], output[3])


def _lce_backward(ctx, grad_loss, _gh, _gw, _gb):
    if ctx.recompute:
        h, w, target, bias, weight, normalizer = ctx.saved_tensors
        a = ctx.args
        gh, gw, gb = linear_cross_entropy_backward(grad_loss, h, w, target, bias, weight, *a[:6], normalizer, a[6])
    else:
        gh, gw, gb = ctx.saved_tensors
        up = grad_loss.to(gh.dtype)
        gh, gw, gb = gh * up, gw * up, gb * up.to(gb.dtype)
    return (gh, gw, None, gb if ctx.has_bias else None) + (None,) * 10


linear_cross_entropy.register_autograd(_lce_backward, setup_context=_lce_setup)
