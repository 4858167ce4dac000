"""Integer codes shared by the CPU and CUDA kernels and their host code.

Kernels branch on small integers (numba compiles them as constants or cheap
compares), never on strings. Each code is defined here, once; kernel modules
and the host code of both backends import it from here.
"""

#: Logit transform modes, chosen once per call so each inner loop stays
#: branch-free: raw logits, ``logit_scale * x``, then softcapping
#: ``cap * tanh(scale * x / cap)`` (``-inf`` stays ``-inf`` in every mode).
PLAIN, SCALED, SOFTCAP = 0, 1, 2

#: Reductions as kernels see them (``"none"``, ``"sum"``, ``"mean"``).
NONE, SUM, MEAN = 0, 1, 2
REDUCTION_CODES = {"none": NONE, "sum": SUM, "mean": MEAN}

#: How a half-precision array is stored for a kernel: native float32/float64
#: (or an integer array read as is), float16 bits, bfloat16 bits.
NATIVE, F16, BF16 = 0, 1, 2

#: Where the upstream gradient of a row (CUDA kernels) comes from: a scalar
#: argument, a one-element device array, or one value per row/element.
G_SCALAR, G_DEVICE_SCALAR, G_ROWS = 0, 1, 2

#: How an MSE weight broadcast to the data is described without
#: materialising it (element ``k`` of the flat data; ``inner`` = a row length):
#:
#:     W_NONE   no weight                                   w_k = 1
#:     W_FULL   one weight per element                      w_k = w[k]
#:     W_INNER  varies along the last ``inner`` elements    w_k = w[k % inner]
#:     W_OUTER  constant along the last ``inner`` elements  w_k = w[k // inner]
W_NONE, W_FULL, W_INNER, W_OUTER = 0, 1, 2, 3

#: Divergences of ``fastloss.distill`` as kernels see them: forward KL(p_t || p_s),
#: reverse KL(p_s || p_t), generalised JSD (``0 < beta < 1``).
KL, REVERSE_KL, JSD = 0, 1, 2
