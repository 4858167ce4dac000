"""What the host sides of the row-wise CUDA ops share (cross-entropy with
class-index or probability targets, distillation): :class:`RowsPlan`, the
base of their plans, which stages the row input (logits, or the student) as
the kernels take it, makes the loss of an empty batch, and chooses and fills
the gradient's destination (a new array, ``out=``, or the input itself in
place, copied back when the kernels computed in a staged copy).
"""

from .. import _validate as V
from . import arrays as A
from . import is_torch_tensor

__all__ = ["RowsPlan"]


class RowsPlan:
    """Base of a row-wise op's GPU plan. Subclasses set ``gpu``, ``shape``,
    ``dtype``, ``n`` (rows), ``nclass`` (V), ``acc`` (accumulation dtype),
    ``reduction`` and ``rows_shape`` (``shape[:-1]``); :meth:`stage_rows` sets
    ``x`` (the input as a kernel array), ``x2`` (its contiguous (n, V) form)
    and ``strided`` (the caller's strided 2-D view, None when contiguous)."""

    def stage_rows(self, obj, name):
        """Stage the row input ``obj``: the kernels take flat views, so a
        strided 2-D view is copied into a contiguous buffer (and, in place, the
        gradient copied back by :meth:`copy_back`)."""
        gpu = self.gpu
        self.x = A.view(gpu, obj, name, cache=True)
        x2 = A.flat(self.x, (self.n, self.nclass), name)
        self.strided = None if x2.is_c_contiguous() else x2
        self.x2 = A.contiguous2d(gpu, x2, self.dtype)

    def grad_args(self, grad_output, out, rows_name):
        """``(up, gvec, out_arr)``: ``grad_output`` as the gradient kernels take
        it (``rows_name`` names the shape a per-row one must have) and ``out``
        as a checked kernel array (None without)."""
        up, gvec = A.grad_output(self.gpu, grad_output, self.reduction, self.rows_shape, rows_name)
        out_arr = A.out_array(self.gpu, out, self.shape, self.dtype) if out is not None else None
        return up, gvec, out_arr

    def empty_loss(self):
        """The loss of an empty batch (mean/sum 0, none an empty array)."""
        if self.reduction == "none":
            return A.reshape(self.gpu, A.empty(self.gpu, (0,), self.acc)[1], self.rows_shape)
        return A.zero_scalar(self.gpu, self.acc)

    def empty_with_grad(self, obj, out, inplace):
        """``(loss, grad)`` of an empty batch: the gradient is the input ``obj``
        itself (``inplace``), ``out``, or a new empty array."""
        if inplace:
            return self.empty_loss(), obj
        if out is not None:
            return self.empty_loss(), out
        return self.empty_loss(), A.empty(self.gpu, self.shape, self.dtype)[1]

    def destination(self, obj, out, out_arr, inplace, name="logits", keep=None):
        """``(dest, grad, copy_back)``: the contiguous (n, V) kernel array the
        gradient is written into, the object handed back as ``grad``, and where
        the gradient must be copied afterwards (None: nowhere; see
        :meth:`copy_back`). ``obj``: the caller's row input, called ``name`` in
        messages; ``out_arr``: ``out`` as a checked kernel array. ``keep``,
        ``(label, arrays)``: inputs that neither ``out`` nor, in place, the
        input may share memory with (distillation's teacher)."""
        gpu = self.gpu
        src = self.strided if self.strided is not None else self.x2  # the caller's rows
        if inplace:
            if keep is not None and any(A.overlaps(gpu, a, src) for a in keep[1]):
                raise ValueError(f"{keep[0]}: shares memory with {name}; inplace=True would overwrite it")
            copy_back = None
            if self.x.obj is not obj:  # a non-contiguous tensor: computed in a contiguous copy
                copy_back = self.x.obj
            elif self.strided is not None:  # a strided 2-D GPU array: computed in a staged copy
                copy_back = self.strided
            return self.x2, obj, copy_back
        if out_arr is not None:
            dest = A.flat(out_arr, (self.n, self.nclass), "out")
            if not A.same(gpu, dest, src) and A.overlaps(gpu, dest, src):
                raise V.overlap_error("ce", name)
            if keep is not None and any(A.overlaps(gpu, dest, a) for a in keep[1]):
                raise ValueError(f"out: overlaps {keep[0]} (the {keep[0]} is never modified)")
            return dest, out, None
        dest, grad = A.empty(gpu, (self.n, self.nclass), self.dtype)
        return dest, A.reshape(gpu, grad, self.shape), None

    def copy_back(self, obj, copy_back):
        """Copy the gradient computed in the staged contiguous rows into the
        caller's input ``obj`` (``copy_back`` from :meth:`destination`; None:
        nothing to do)."""
        if copy_back is None:
            return
        if is_torch_tensor(obj):
            obj.copy_(copy_back)
        else:
            A.copy2d(self.gpu, self.x2, copy_back)
