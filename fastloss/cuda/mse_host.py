"""Host side of the CUDA mean squared error: the GPU twin of the plan in
``fastloss.cpu.mse_host``, called by ``fastloss.ops.mse`` for GPU ``pred`` with the options it
validated (``fastloss.options.MSEOptions``); the kernels are in
``fastloss.cuda.mse``.

Inputs and outputs follow ``fastloss.cuda.cross_entropy_host``: GPU arrays in
(``target``, ``weight`` and ``grad_output`` may be host arrays, copied to the
GPU), GPU arrays out, in the framework of ``pred``. No call waits for the GPU.
Weights given as GPU arrays are not checked (that would cost a
synchronisation; host weights are) and, unless they are PyTorch tensors
(broadcast on the device), must have ``pred``'s shape.
"""

import numpy as np

from .. import _validate as V
from .. import codes
from . import arrays as A
from . import is_device_array, is_torch_tensor
from .launch import Gpu, on_input_device

__all__ = ["mse", "mse_with_grad"]


class MSEPlan:
    """Checked GPU inputs of one MSE call (twin of ``fastloss.cpu.mse_host.MSEPlan``)."""

    def __init__(self, gpu, pred, target, weight, opts):
        self.gpu = gpu
        pshape, pdtype = A.meta(pred)
        tshape, tdtype = A.side_meta(target)
        V.check_pred_target_meta(pshape, pdtype, tshape, tdtype)
        self.reduction = opts.reduction
        self.red = opts.reduction_code
        self.shape, self.dtype = tuple(pshape), pdtype
        self.acc = V.acc_dtype(np.result_type(V.acc_dtype(pdtype), V.acc_dtype(tdtype)))
        self.size = int(np.prod(pshape, dtype=np.int64))
        self.pred, self.target = pred, target
        self.weight = weight
        if weight is None:
            self.wmode, self.inner, self.den_val, self.w_host, self.w_dev = (
                codes.W_NONE, 1, float(self.size), None, None)
        elif is_device_array(weight):
            wshape, wdtype = A.meta(weight)
            V.check_weight_broadcast(wdtype, wshape, self.shape)
            if tuple(wshape) != self.shape and not is_torch_tensor(weight):
                raise ValueError(f"weight: a GPU weight that is not a PyTorch tensor must have "
                                 f"pred's shape {self.shape}, found {tuple(wshape)}")
            self.wmode, self.inner, self.den_val, self.w_host, self.w_dev = codes.W_FULL, 1, 0.0, None, weight
        else:
            self.wmode, self.w_host, self.inner, self.den_val = V.weight_layout(weight, self.shape, self.acc)
            self.w_dev = None

    def kernels(self):
        """``(mse, weight_sum, finalize)`` for this call."""
        from .mse import mse_kernels
        return mse_kernels(self.acc.name, self.p.kind, self.t.kind, self.gpu.tpb)

    def device_inputs(self):
        """Put the inputs on the device (flat), and the weight (sum it on the
        device for the mean of a GPU weight)."""
        gpu = self.gpu
        n = self.size
        self.p = A.view(gpu, self.pred, "pred")
        self.p1 = A.flat(self.p, (n,), "pred")
        self.t = A.side_array(gpu, self.target, "target")
        self.t1 = A.flat(self.t, (n,), "target")
        self.use_den = False
        self.den = gpu.dummy((1,), np.float64)
        if self.w_dev is not None:
            w = self.w_dev
            if is_torch_tensor(w) and tuple(w.shape) != self.shape:
                w = gpu.torch.broadcast_to(w, self.shape)
            self.w = A.as_vector(gpu, A.view(gpu, w, "weight"), self.acc, n, "weight")
            if self.reduction == "mean":
                weight_sum = self.kernels()[1]
                self.den, _ = A.empty(gpu, (1,), np.float64)
                gpu.launch(weight_sum, 1, self.w, 1.0, self.den)
                self.use_den = True
        elif self.w_host is None:
            self.w = gpu.dummy((1,), self.acc)
        else:
            self.w = A.to_device(gpu, self.w_host)[0]

    def run(self, up, gvec, grad):
        """Launch the MSE kernel (and finalize); returns the loss as handed back."""
        from .mse import FinalizeArgs, MSEArgs, MSEScalars
        gpu = self.gpu
        n = self.size
        kernel, _, finalize = self.kernels()
        grid = gpu.grid(-(-n // gpu.tpb))
        none = self.reduction == "none"
        if none:
            loss, loss_obj = A.empty(gpu, (n,), self.acc)
        else:
            loss, loss_obj = gpu.dummy((1,), self.acc), None
        partial = gpu.scratch("mse_partial", grid, 0, np.float64)
        sc = MSEScalars(wmode=self.wmode, inner=np.int64(self.inner), red=self.red,
                        den_val=float(self.den_val), use_den=self.use_den, do_grad=grad is not None)
        if grad is None:
            grad = gpu.dummy((1,), self.dtype)
        args = MSEArgs(p=self.p1, t=self.t1, w=self.w, sc=sc, den=self.den, up=up, gvec=gvec,
                       grad=grad, loss=loss, partial=partial)
        gpu.launch(kernel, grid, *args)
        if none:
            return A.reshape(gpu, loss_obj, self.shape)
        out, out_obj = A.empty(gpu, (1,), self.acc)
        gpu.launch(finalize, 1, *FinalizeArgs(partial=partial, sc=sc, den=self.den, out=out))
        return A.reduced(gpu, out_obj)

    def empty_loss(self):
        if self.reduction == "none":
            return A.reshape(self.gpu, A.empty(self.gpu, (0,), self.acc)[1], self.shape)
        return A.zero_scalar(self.gpu, self.acc)


@on_input_device
def mse(pred, target, weight, opts):
    """:func:`fastloss.mse` for GPU ``pred`` (``opts``: an ``MSEOptions``);
    returns GPU arrays (see the module doc)."""
    from ._math import GradScalars
    gpu = Gpu(pred)
    plan = MSEPlan(gpu, pred, target, weight, opts)
    if plan.size == 0:
        return plan.empty_loss()
    plan.device_inputs()
    return plan.run(GradScalars(codes.G_SCALAR, 1.0), gpu.dummy((1,), np.float64), None)


@on_input_device
def mse_with_grad(pred, target, weight, opts, grad_output, out):
    """:func:`fastloss.mse_with_grad` for GPU ``pred``: ``(loss, grad_pred)``, the
    gradient in a new GPU array or ``out``, in one kernel."""
    gpu = Gpu(pred)
    plan = MSEPlan(gpu, pred, target, weight, opts)
    up, gvec = A.grad_output(gpu, grad_output, plan.reduction, plan.shape, "pred.shape")
    out_arr = A.out_array(gpu, out, plan.shape, plan.dtype) if out is not None else None
    if plan.size == 0:
        grad = out if out is not None else A.empty(gpu, plan.shape, plan.dtype)[1]
        return plan.empty_loss(), grad
    plan.device_inputs()
    if out_arr is not None:
        dest = A.flat(out_arr, (plan.size,), "out")
        if A.overlaps(gpu, dest, plan.t1) or (
                A.overlaps(gpu, dest, plan.p1) and not A.same(gpu, dest, plan.p1)):
            raise V.overlap_error("mse")
        grad = out
    else:
        dest, grad = A.empty(gpu, (plan.size,), plan.dtype)
        grad = A.reshape(gpu, grad, plan.shape)
    return plan.run(up, gvec, dest), grad
