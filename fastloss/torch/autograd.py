"""Eager autograd: one ``torch.autograd.Function`` per op.

Outside ``torch.compile`` the public functions call these rather than the
registered custom ops (``fastloss.torch.library``): a Python
``autograd.Function`` costs about 10 us a call less than the dispatcher
round trip of a ``torch.library.custom_op``, which is what small calls pay.
Both call the same ``fastloss.torch.backend`` functions.

Forward runs the fused kernel once and keeps the gradient on ``ctx``;
backward reads no logits. It returns the kept gradient itself when the
upstream gradient is a CPU scalar equal to 1 (no pass over it), else its
product with the upstream gradient. When autograd will free the graph after
this backward (no ``retain_graph=True``), ``ctx`` drops its reference
first: the product is taken in place (no second gradient-sized buffer) and
autograd can hand the tensor on, or make it a leaf's ``.grad``, without a
copy. A kept graph gets a new tensor (a copy when the upstream gradient is
1), so backward can run again (and ``gradcheck`` passes) and nothing handed
out aliases what ``ctx`` keeps.
"""

import torch
from torch.autograd.function import once_differentiable

from . import backend


def scale(grad, grad_output, per_row, inplace=False):
    """``grad`` times the upstream gradient. ``inplace`` (the graph is freed
    after this backward): ``grad`` itself, multiplied in place unless the
    upstream gradient is a CPU scalar equal to 1; else a new tensor.
    ``per_row``: ``grad_output`` has one value per row of ``grad``
    (reduction "none" of a cross-entropy)."""
    if grad_output.numel() == 1 and not per_row:
        if grad_output.device.type == "cpu":
            g = grad_output.item()
            if g == 1.0:  # a kept graph must not hand out the tensor it keeps
                return grad if inplace else grad.clone()
            return grad.mul_(g) if inplace else grad * g
        up = grad_output.to(grad.dtype)
    else:
        up = grad_output.to(grad.dtype)
        if per_row:
            up = up.unsqueeze(-1)
    return grad.mul_(up) if inplace else grad * up


def _keep_graph():
    """Whether the running backward keeps the graph (``retain_graph=True``);
    True when PyTorch cannot tell us (then nothing is modified in place)."""
    fn = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if fn is None else fn()


def take(ctx, name):
    """``ctx.<name>``, and whether it may be modified or handed out as it is:
    only in the backward after which autograd frees the graph (``ctx`` then
    lets go of it)."""
    value = getattr(ctx, name)
    if value is None:
        raise RuntimeError("Trying to backward through the graph a second time: the fastloss gradient kept for "
                           "backward was handed on by the first call. Specify retain_graph=True if you need to "
                           "backward through the graph a second time.")
    if _keep_graph():
        return value, False
    setattr(ctx, name, None)
    return value, True


class _RowLoss(torch.autograd.Function):
    """A loss over the rows of its first input, (N, V), whose forward keeps
    that input's gradient on ``ctx.grad`` (and ``ctx.per_row`` for reduction
    "none"); its four other inputs get no gradient."""

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad, mine = take(ctx, "grad")
        return scale(grad, grad_output, ctx.per_row, mine), None, None, None, None


class CrossEntropy(_RowLoss):
    """Cross-entropy of (N, V) logits against (N,) class indices or (N, V) probabilities."""

    @staticmethod
    def forward(ctx, x, target, weight, spec, inplace):
        need = ctx.needs_input_grad[0]
        loss, grad = backend.cross_entropy(x, target, weight, spec, need, inplace and need)
        if inplace and need:
            # the logits now hold the gradient: anything autograd saved them for
            # raises at backward instead of reading the gradient as logits
            torch.autograd.graph.increment_version(x)
        ctx.grad = grad
        ctx.per_row = spec.reduction == "none"
        return loss


class Distill(_RowLoss):
    """Distillation loss of (N, V) student logits against a dense or top-k
    teacher (no gradient to the teacher)."""

    @staticmethod
    def forward(ctx, s, teacher, teacher_indices, target, spec):
        need = ctx.needs_input_grad[0]
        loss, grad = backend.distill(s, teacher, teacher_indices, target, spec, need)
        ctx.grad = grad
        ctx.per_row = spec.reduction == "none"
        return loss


class MSE(torch.autograd.Function):
    """Mean squared error of ``x`` against ``target`` (same shape)."""

    @staticmethod
    def forward(ctx, x, target, weight, reduction):
        need_x, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad = backend.mse(x, target, weight, reduction, need_x or need_t)
        ctx.grad = grad
        ctx.need = (need_x, need_t)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad, mine = take(ctx, "grad")
        grad = scale(grad, grad_output, False, mine)
        need_x, need_t = ctx.need
        # d/dtarget = -d/dinput (the weight, if any, is in both)
        gt = -grad if need_t else None
        return (grad if need_x else None), gt, None, None


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``h @ w.T + bias`` (h: (N, D), w: (V, D)) against (N,)
    class indices. For "mean"/"sum" the forward computes every gradient in
    the same sweep; for "none" the gradients depend on the per-token upstream
    gradient, so backward runs the sweep again with it (the logits are never
    kept)."""

    @staticmethod
    def forward(ctx, h, w, target, bias, weight, spec, chunk_size):
        need = any(ctx.needs_input_grad[i] for i in (0, 1, 3))
        per_token = spec.reduction == "none"
        loss, gh, gw, gb = backend.linear_cross_entropy(h, w, target, bias, weight, spec, chunk_size,
                                                        need and not per_token)
        ctx.grads = (gh, gw, gb)
        ctx.per_token = per_token
        ctx.args = (spec, chunk_size)
        if need and per_token:
            ctx.save_for_backward(h, w, target, bias, weight)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.per_token:
            h, w, target, bias, weight = ctx.saved_tensors
            spec, chunk_size = ctx.args
            _, gh, gw, gb = backend.linear_cross_entropy(h, w, target, bias, weight, spec, chunk_size, True,
                                                         grad_output=grad_output)
        else:
            (gh, gw, gb), mine = take(ctx, "grads")
            gh, gw = scale(gh, grad_output, False, mine), scale(gw, grad_output, False, mine)
            gb = None if gb is None else scale(gb, grad_output, False, mine)
        need = ctx.needs_input_grad
        return (gh if need[0] else None, gw if need[1] else None, None, gb if need[3] else None,
                None, None, None)
