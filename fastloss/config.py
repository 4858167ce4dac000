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

#: Threads per block of the fused cross-entropy kernel (loss + gradient); None:
#: ``CUDA_THREADS_PER_BLOCK``. Above 256 the kernels cap registers per thread
#: so that a block fits the register file.
CUDA_FUSED_THREADS_PER_BLOCK = None

#: Blocks per SM in the grid of the row kernels (cross-entropy forward,
#: logsumexp, the fused kernel before the L2 cap below); None: as many as fit
#: by threads (2048 // threads per block), one full wave of rows in flight.
CUDA_BLOCKS_PER_SM = None

#: The fused kernel reads each row twice; capping its grid at
#: ``CUDA_FUSED_L2_BYTES // (row bytes)`` blocks (never below one per SM) keeps
#: the rows in flight within L2 so the second read hits it. None or 0: no cap.
#: Measured on an H200 (benchmarks/gpu_check.py, 2026-11-26): no cap was faster
#: in 5 of 6 cases (e.g. float32 16384x50257: 5.86 ms against 7.79 ms with a
#: 32 MiB cap), so the default is no cap.
CUDA_FUSED_L2_BYTES = None

#: Bytes allowed for the per-chunk logits buffer of ``linear_cross_entropy`` when
#: ``chunk_size=None``: the chunk is the most rows whose (rows, V) float32 (float64
#: for float64 input) logits fit in this budget (at least 1 row), then evened out
#: over the chunks. Read at call time. 90 MiB keeps the extra memory of the
#: (4096 tokens, 128256 classes) case under 5% of its 2.1 GB of logits, with
#: chunks of 176 rows, where the three BLAS products still run near their
#: full-size speed (128 rows: 40-60% slower; 512 rows: ~10% faster).
LINEAR_CE_LOGITS_BUDGET_BYTES = 90 * 2**20

#: Without scipy, ``grad_weight += G.T @ hidden`` goes through a temporary of
#: this many bytes per block of classes (scipy's ``?gemm`` with ``beta=1`` needs
#: none). Read at call time.
LINEAR_CE_GRAD_WEIGHT_BLOCK_BYTES = 8 * 2**20
