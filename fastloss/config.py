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

#: Cross-entropy calls on at most this many logits run serially in one kernel
#: call (``fastloss.cpu.cross_entropy.ce_serial_forward`` / ``ce_serial_fused``:
#: targets checked and the reduction done in the kernel, no plan, no parallel
#: launch). Measured crossover against the 2-thread parallel path (2-core AMD
#: EPYC, 2026-12-03; docs/performance.md, "Small calls"): the serial path is
#: 2-5x faster up to 2**17 logits, 1.0-1.5x at 2**18, and the parallel one
#: 1.0-1.2x faster from 2**19 (forward 1.0-1.3x slower still, fused 0.8-0.9x).
SERIAL_MAX_ELEMENTS = 1 << 18

#: The fused cross-entropy kernels write a gradient of at least this many
#: bytes into a buffer given as ``out=`` (float32 or float64) with
#: streaming (non-temporal) stores on x86-64: its cache lines are written
#: without being read first (an ordinary store to memory that is not in the
#: cache reads each line before writing it: 3 transfers per element of a
#: fused pass instead of 2). A smaller gradient is left in the caches, where
#: its reader will find it. See docs/performance.md, "Streaming stores".
STREAM_STORE_MIN_BYTES = 32 << 20

#: The same for MSE (``fastloss.cpu.mse.mse_serial``): memory-bound, and each
#: element is cheap, so the second thread pays off sooner (serial 1.1-1.7x
#: faster up to 2**17 elements, 0.55x at 2**18).
MSE_SERIAL_MAX_ELEMENTS = 1 << 17

#: Cap on the number of blocks of the CUDA row and element kernels; None: about
#: one full wave of resident blocks (SMs x 2048 / threads per block; 3 blocks
#: in the simulator). Tests lower it so the grid-stride loops run several rounds.
CUDA_GRID_LIMIT = None

#: Read and write CUDA rows as uint64 words where possible (see
#: ``fastloss.cuda.cross_entropy``); tests switch it off to cover both paths.
CUDA_WIDE_ACCESS = True

CUDA_THREADS_PER_BLOCK = 256  # threads per block of the CUDA kernels (any of 1..1024; read at call time)

#: Threads per block of the fused cross-entropy kernel (loss + gradient); None:
#: ``CUDA_THREADS_PER_BLOCK``. Above 256 the kernels cap registers per thread
#: so that a block fits the register file.
CUDA_FUSED_THREADS_PER_BLOCK = None

#: Threads per block of the resident fused kernel (see ``CUDA_FUSED_STRATEGY``);
#: None: 1024 on a GPU (a block holding a 128-200 KB row is alone on its SM,
#: and needs many threads to keep enough loads in flight), the fused kernel's
#: block size in the simulator (so tests can shrink it).
CUDA_RESIDENT_THREADS_PER_BLOCK = None

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

#: Which fused cross-entropy kernel runs: ``"resident"`` keeps each row (or
#: the longest prefix of it that fits) in shared memory between the statistics
#: and gradient passes, so the kept part is read from global memory once;
#: ``"stream"`` reads the whole row twice; ``"auto"`` takes resident when at
#: least ``CUDA_RESIDENT_MIN_FRACTION`` of a row fits in the shared memory a
#: block may have (about 227 KB on an H100/H200: all of a float32 row up to
#: ~56k classes or a half-precision one up to ~113k; 90% of a bfloat16 row of
#: 128256, 45% of a float32 one) and stream otherwise. Not yet timed on a GPU:
#: the default follows the memory traffic; ``benchmarks/gpu_check.py`` times
#: both.
CUDA_FUSED_STRATEGY = "auto"

#: See ``CUDA_FUSED_STRATEGY``. A quarter: with one 1024-thread block per SM,
#: the unkept tails of the rows in flight (132 x 282 KB for float32 x 128256)
#: fit in L2, and the gradient pass re-reads them first (it walks backwards),
#: so even a partly kept row should be read from HBM about once.
CUDA_RESIDENT_MIN_FRACTION = 0.25

#: Cap (bytes) on the resident kernel's shared memory; None: what the GPU
#: allows a block. Tests lower it to cover partly resident rows.
CUDA_RESIDENT_MAX_BYTES = None

#: Raise the contract's errors for bad targets/class weights from the call that
#: saw them, by waiting for the GPU (True), or without waiting (False, the
#: default: a training step never waits on the host; an error is raised by the
#: first fastloss call, or ``fastloss.cuda.synchronize()``, after the GPU has
#: flagged it; the flagged call's loss is NaN meanwhile).
CUDA_SYNC_CHECKS = False

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

#: Bytes of logits per chunk of ``fastloss.evaluate`` when ``chunk_tokens=None``.
#: The mapped chunk is most of the evaluation's resident memory
#: (benchmarks/NOTES.md). Read at call time; tests patch it.
EVAL_CHUNK_BYTES = 64 * 2**20

#: Bytes of logits (or hidden states) per task of ``fastloss.evaluate``: a task is a
#: row range of one shard, run in this process or on a Dask worker, and returns one
#: partial of totals. 1 GiB is ~0.3-1 s of kernel time, against ~2 ms of Dask
#: round trip per task (docs/distributed.md). Read at call time; tests patch it.
EVAL_TASK_BYTES = 2**30

#: At most this many tasks per ``fastloss.evaluate`` / ``compare`` run: past it the
#: tasks grow. Each task costs the Dask scheduler ~1-4 ms and the client ~1 ms to
#: merge its partial (docs/distributed.md), so 20000 tasks cost well under a minute
#: of each, whatever the dump's size.
EVAL_MAX_TASKS = 20000

#: Probability targets: each row of the targets must sum to 1 within this
#: absolute tolerance (and hold finite, non-negative entries), else
#: ``ValueError``. 1e-2 accepts rows stored in bfloat16/float16 and rows from a
#: lossy softmax, and rejects logits, counts and scaled one-hot rows passed by
#: mistake. Read at call time.
SOFT_TARGET_SUM_TOL = 1e-2

#: ``fastloss.compare``: each side's chunk is at most this many times
#: ``EVAL_CHUNK_BYTES`` of logits (128 MiB by default). Fewer, larger kernel
#: launches: on the shared 2-core AMD EPYC (load ~5, 2026-12-03) two cached
#: 1 GB float32 dumps compared at 0.52x the speed of reading them with 64 MiB
#: chunks, 0.74x with 128 MiB, 0.79x with 256 MiB, 0.86x with 512 MiB; each
#: chunk's pages stay mapped while it is processed.
COMPARE_CHUNK_FACTOR = 2

#: ``fastloss.compare`` keeps per-token values (8 bytes per value and column) in
#: memory up to this many bytes, then spills them to temporary files (``tmpdir``).
COMPARE_SPILL_MEMORY_BYTES = 256 * 2**20

#: Values per chunk when spilled per-token values are read back.
COMPARE_SPILL_READ_VALUES = 1 << 22

#: The exact percentile selection (radix select over order-preserving keys) sorts
#: a bucket of at most this many values instead of refining it further.
COMPARE_SELECT_GATHER = 1 << 20

#: ``fastloss.torch`` on CPU tensors keeps the gradient buffers it allocates
#: (logits-sized, for cross-entropy and MSE) and reuses one for the next call
#: of the same shape and dtype once nothing else holds it, so a training
#: loop's steps write their gradient into memory that is already resident
#: instead of faulting in a fresh buffer every step (at 4096 x 32000 float32
#: the fresh 524 MB cost 120-150 ms of page faults on the 2-core AMD EPYC,
#: 2026-12-03: more than the fused kernel). At most this many bytes are kept,
#: least recently used first out; 0 turns the reuse off. Only buffers of at
#: least ``TORCH_GRAD_CACHE_MIN_BYTES`` are kept (small ones allocate fast).
#: ``fastloss.torch.release_buffers()`` frees them.
TORCH_GRAD_CACHE_BYTES = 4 * 2**30
TORCH_GRAD_CACHE_MIN_BYTES = 16 * 2**20
