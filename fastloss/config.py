"""Tunables read at call time, so tests and benchmarks can patch them.

Every kernel module imports this module (not the names in it) and reads the
attributes when it is called.
"""

#: LLVM fast-math flags for the CPU kernels. Deliberately not ``fastmath=True``:
#: the no-NaN / no-inf assumptions it adds would break ``-inf`` masking and NaN
#: propagation. ``reassoc`` lets reductions vectorise, ``contract`` allows FMA.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: Rows handed to one parallel task are never fewer than this many elements
#: (rows * classes), so tiny batches do not pay thread start-up per row.
MIN_ELEMENTS_PER_TASK = 1 << 16

CUDA_THREADS_PER_BLOCK = 256  # threads per block of the CUDA kernels (any of 1..1024; read at call time)
