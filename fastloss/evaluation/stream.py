"""``evaluate``: stream a logits dump (or hidden states through an LM head, or the
vocabulary slices of a tensor-parallel dump) in chunks through the CPU kernels and
total the metrics.

The dump is planned as tasks (``_plan``: row ranges that never cross a file of any
input), each run by ``run_task`` (in this process, or on a Dask worker through
``fastloss.evaluation.distributed``) into a ``metrics.Totals`` partial; ``_merge``
adds the partials in task order, leaving out the files that failed under
``on_invalid="skip"``."""

import bisect
import contextlib
import dataclasses
import functools
import math
import sys
import threading

import numpy as np

from .. import _validate as V
from .. import config
from ..cpu.eval_metrics import eval_rows
from . import metrics as M
from .distributed import Job, LocalRunner, runner_for, split_rows
from .readers import (
    ArrayShard,
    Concat,
    EvalInputError,
    Layout,
    check_widths,
    expand_paths,
    one_shard,
    open_file,
    open_source,
    positive_int,
    read_all,
)
from .report import LN2, EvalReport

#: Targets per chunk of the up-front target check.
TARGET_CHECK_TOKENS = 1 << 20

ON_INVALID = ("nan", "raise", "skip")


def check_targets(tsrc, nclass, ignore_index, seq_len, shift):
    """Every target in [0, V) or ignore_index, checked per shard in bounded chunks
    before any logits are read; EvalInputError names the file, count and first bad token.
    With ``shift`` the source holds token ids, and the first token of each sequence
    (never a target) is not checked."""
    for shard, start in zip(tsrc.shards, tsrc.starts, strict=False):
        check_target_shard(shard, start, nclass, ignore_index, seq_len, shift)


def check_all_targets(runner, tsrc, nclass, ignore_index, seq_len, shift):
    """:func:`check_targets` with one task per shard on the runner (on the workers of a
    distributed run, which read the files themselves)."""
    runner.open(lambda k: check_target_shard(tsrc.shards[k], tsrc.starts[k], nclass, ignore_index,
                                             seq_len, shift), range(len(tsrc.shards)))


def check_target_shard(shard, start, nclass, ignore_index, seq_len, shift):
    """:func:`check_targets` for one shard of targets whose first token is global token
    ``start``."""
    bad_count, first = 0, None
    for lo in range(0, shard.rows, TARGET_CHECK_TOKENS):
        hi = min(lo + TARGET_CHECK_TOKENS, shard.rows)
        t = np.asarray(shard.read(lo, hi))
        t64 = t.astype(np.int64)
        huge = t > np.iinfo(np.int64).max if t.dtype == np.uint64 else False
        bad = (t != ignore_index) & ((t64 < 0) | (t64 >= nclass) | huge)
        if shift:
            bad &= np.arange(start + lo, start + hi) % seq_len != 0
        nbad = int(np.count_nonzero(bad))
        if nbad and first is None:
            k = int(np.flatnonzero(bad)[0])
            first = (lo + k, t[k])
        bad_count += nbad
    if bad_count:
        noun = "token id(s) used as targets" if shift else "target(s)"
        raise EvalInputError(shard.name, V.outside_message(bad_count, nclass, ignore_index,
                                                           f"token {first[0]} of this file",
                                                           first[1], noun=noun))


class LMHead:
    """Logits of hidden-state chunks, ``hidden @ W.T + b``, computed by one BLAS product
    into one reused ``(chunk, V)`` buffer of the accumulation dtype (float64 when the
    hidden states or the head are float64, else float32; half precision is upcast
    per chunk into a reused ``(chunk, D)`` buffer).

    Made from the files' headers only; the weights are read whole by :meth:`allocate`,
    once per process. Pickled (to go to Dask workers), a head read from a file leaves
    its weights behind and each worker reads them itself; one given as an array
    travels with it."""

    def __init__(self, shards, lm_head, bias, layout):
        self.wshard = one_shard(lm_head, "lm_head", layout)
        self.name = self.wshard.name
        dim = shards[0].width
        wshape = self.wshard.shape
        if wshape[1] != dim:
            raise EvalInputError(shards[0].name, f"hidden size {dim} (shape {shards[0].shape}) "
                                                 f"differs from the LM head's {wshape[1]} in "
                                                 f"{self.name} (shape {wshape}, expected (V, D))")
        self.nclass = wshape[0]
        dtypes = [s.dtype for s in shards] + [self.wshard.dtype]
        self.acc = np.dtype(np.float64) if np.dtype(np.float64) in dtypes else np.dtype(np.float32)
        self.upcast = any(d != self.acc for d in dtypes[:-1])
        self.bshard, self.bias_name = None, None
        if bias is not None:
            self.bshard = one_shard(bias, "bias", layout)
            self.bias_name = self.bshard.name
            if self.bshard.shape != (self.nclass,):
                raise EvalInputError(self.bias_name, f"bias shape {self.bshard.shape} does not "
                                                     f"match the LM head {self.name}: expected "
                                                     f"({self.nclass},)")
        self.w = self.b = self.buf = self.hbuf = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["buf"] = state["hbuf"] = None
        if not isinstance(self.wshard, ArrayShard):
            state["w"] = state["b"] = None  # read again where it is used
        return state

    def allocate(self, rows):
        """Read the weights (first call in this process) and make the chunk buffers."""
        if self.w is None:
            self.w = read_all(self.wshard).astype(self.acc, copy=False)
            if self.bshard is not None:
                self.b = read_all(self.bshard).astype(self.acc)
        if self.buf is None or self.buf.shape[0] < rows:
            self.buf = np.empty((rows, self.nclass), self.acc)
            if self.upcast:
                self.hbuf = np.empty((rows, self.w.shape[1]), self.acc)

    def logits(self, h):
        n = h.shape[0]
        if h.dtype != self.acc:
            np.copyto(self.hbuf[:n], h, casting="unsafe")
            h = self.hbuf[:n]
        x = self.buf[:n]
        np.matmul(h, self.w.T, out=x)
        if self.b is not None:
            x += self.b
        return x


def progress_bar(progress, total, desc="fastloss eval"):
    """A tqdm bar on stderr (True: always, None: when stderr is a terminal) or None."""
    if progress is False:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc=desc, file=sys.stderr,
                disable=None if progress is None else False, leave=False, dynamic_ncols=True)


def chunk_targets(tsrc, g, n, ntok, ignore_index, seq_len, shift):
    """Targets and positions within the sequence (or None) of global rows [g, g + n)."""
    pos = None if seq_len is None else np.arange(g, g + n) % seq_len
    if not shift:
        return np.asarray(tsrc.read(g, g + n)).reshape(n), pos
    tgt = np.full(n, ignore_index, np.int64)
    nxt = np.asarray(tsrc.read(g + 1, min(g + n + 1, ntok)))
    tgt[:nxt.size] = nxt  # checked in range, so exact in int64
    tgt[pos == seq_len - 1] = ignore_index
    return tgt, pos


def evaluate(logits=None, targets=None, *, hidden=None, lm_head=None, bias=None, vocab_shards=None,
             ignore_index=-100, seq_len=None, shift=False, chunk_tokens=None, on_invalid="nan",
             train_loss=None, hist_bins=40, hist_max=None, layout=None, progress=False,
             client=None, worker_threads=None, task_tokens=None):
    """Evaluate next-token logits against targets, streaming dumps larger than memory.

    Parameters
    ----------
    logits : array_like (..., V), or path, glob pattern or list of them
        float16, bfloat16, float32 or float64. Files (``.npy``, ``.safetensors``, or
        raw binary for any other extension) are shards concatenated along tokens
        (same V), read one chunk of rows at a time. A pattern such as
        ``"dump/logits-*.npy"`` is expanded in natural order (``-2`` before ``-10``).
    targets : array_like of int, or path, glob pattern or list of them
        Class indices in ``[0, V)`` or ``ignore_index``; the same number of tokens as
        the logits in total (the shard boundaries need not match). With ``shift``:
        the token ids themselves (see ``seq_len``).
    hidden : array_like (..., D), or path(s) as for logits; instead of ``logits``
        Final hidden states; the logits are ``hidden @ lm_head.T + bias``, computed
        per chunk and never held whole.
    lm_head : array_like (V, D) or one file (PyTorch ``nn.Linear`` layout)
        Loaded whole. Required with ``hidden``.
    bias : array_like (V,) or one file, optional
        LM-head bias.
    vocab_shards : list, instead of ``logits``
        A vocabulary-sharded dump (tensor-parallel ranks each writing their columns):
        one file set (path, pattern or list, or array) per vocabulary slice, in
        vocabulary order. Every slice holds all tokens (its files may split the tokens
        differently from the other slices') and its own columns; V is the sum of the
        widths. Per row, each slice gives its max, sum of exps, entropy part, target
        logit and top-5 (``fastloss.vocab_row_stats``), merged exactly in float64
        (``fastloss.merge_vocab_row_stats``): the logits are never assembled.
    ignore_index : int, default -100
        Target value of tokens that are not counted.
    seq_len : int, optional
        Sequence length L: token ``i`` sits at position ``i % L`` of its sequence, and
        the report gets the mean loss and count per position. The token count must be
        a multiple of L.
    shift : bool, default False
        ``targets`` holds the input token ids: the target of token ``i`` is token
        ``i + 1``, except at the last position of each sequence (``i % L == L - 1``),
        which is ignored. Requires ``seq_len``.
    chunk_tokens : int, optional
        Rows per chunk; default: as many as fit in ``fastloss.config.EVAL_CHUNK_BYTES``
        (64 MiB) of logits (of the float32/float64 logits buffer with ``hidden``).
    on_invalid : {"nan", "raise", "skip"}, default "nan"
        A counted token whose loss is NaN (NaN logits, or +inf ones): "nan" lets it
        make the report's means NaN (as cross_entropy does); "raise" raises
        EvalInputError naming the file and token; "skip" leaves it out of every
        number, counts it in ``skipped`` and adds a warning to the report.
    train_loss : float, optional
        Training loss (nats) to report beside, with ``mean_loss - train_loss``.
    hist_bins : int, default 40
        Bins of the loss histogram on ``[0, hist_max]``.
    hist_max : float, optional
        Upper edge of the histogram; default ``max(2 ln V, 1)``. Larger losses
        fall in the last bin.
    layout : Layout, optional
        How to read files that do not describe themselves: the dtype (``raw_dtype``,
        ``targets_dtype``) and row width (``vocab``, ``hidden_dim``) of raw files, and
        the tensor of each ``.safetensors`` input (``logits_key``, ``targets_key``,
        ``hidden_key``, ``lm_head_key``, ``bias_key``); see
        ``fastloss.evaluation.Layout``. Default: ``Layout()`` (raw files then cannot
        be read; raw targets are int64).
    progress : bool or None, default False
        A tqdm progress bar (tokens/s) on stderr: True always, None only when stderr
        is a terminal, False never.
    client : dask.distributed.Client, optional
        Run on this Dask cluster (``pip install "fastloss[dask]"``): the dump is split
        into tasks of ``task_tokens`` rows of one shard, the workers open and read the
        files themselves (paths must be valid there: a shared file system, or fsspec
        URLs such as ``s3://``), and each task returns a small partial of totals. The
        partials are merged in task order, so the report is the same, to the bit, as
        without a client. A worker lost mid-run has its tasks rerun by Dask. Arrays
        given instead of files are sent to every worker. See docs/distributed.md.
    worker_threads : int, optional
        numba and BLAS threads per task on a Dask worker; default: the cores of its
        machine over the task threads of all the workers there.
    task_tokens : int, optional
        Rows per task; default: as many as fit in ``fastloss.config.EVAL_TASK_BYTES``
        (1 GiB) of logits (of hidden states with ``hidden``), at least one chunk, and
        enough that there are at most ``config.EVAL_MAX_TASKS`` (20000) tasks.

    Returns
    -------
    EvalReport

    Raises
    ------
    EvalInputError (a ValueError)
        Unreadable, corrupt or truncated file, vocabulary, hidden-size or token-count
        mismatch, targets out of range, a raw file without its dtype/width, or
        (``on_invalid="raise"``) a NaN loss; the message starts with the file name.
    TypeError, ValueError
        Bad dtypes or options; ``layout`` not a Layout.

    Notes
    -----
    Per chunk one kernel (``fastloss.cpu.eval_metrics.eval_rows``) reads each row
    once, as stored (no float32 copy of half-precision logits), and gives the loss
    ``lse_i - z_{i,t}``, the entropy ``-sum_j p_ij log p_ij``, the top-1
    confidence ``max_j p_ij`` and the target's rank; row statistics accumulate in
    float32 blocks (float64 for float64 logits) summed in float64, and all totals
    are float64.
    ECE = ``sum_b n_b / N |acc_b - conf_b|`` over 15 equal-width bins ``(k/15, (k+1)/15]``.
    With ``on_invalid="skip"``, a shard whose rows fail to read during the run
    (unreadable, truncated or deleted since it was opened, an object-store error) is
    left out whole, with its targets, and listed in ``skipped_files``; a file whose
    header is bad still stops the run before any work, since its token count, and so
    the alignment of the targets, is unknown.
    With ``hidden``, a chunk's logits come from one matrix product into a reused
    buffer, then go through the same kernel.

    File chunks are memory-mapped one at a time, so resident memory stays about
    one chunk beyond the interpreter's. A cached 4.3 GB float32 dump evaluated at
    about twice the speed of a plain one-thread read of the file (docs/evaluation.md,
    "Performance of fastloss.evaluate").

    Examples
    --------
    >>> import numpy as np
    >>> from fastloss import evaluate
    >>> logits = np.log(np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]))
    >>> r = evaluate(logits, np.array([0, 2]))
    >>> round(r.mean_loss, 6), r.accuracy, r.tokens
    (1.039721, 0.5, 2)

    Token ids with ``shift``: two sequences of 3 tokens; each sequence's last
    position has no next token and is ignored.

    >>> z = np.log(np.full((6, 4), 0.25))
    >>> r = evaluate(z, np.array([0, 1, 2, 3, 2, 1]), seq_len=3, shift=True)
    >>> r.tokens, r.ignored, r.per_position_count
    (4, 2, [2, 2, 0])

    A raw (headerless) bfloat16 dump needs its dtype and vocabulary size:

    >>> import os, tempfile
    >>> import ml_dtypes
    >>> from fastloss.evaluation import Layout
    >>> with tempfile.TemporaryDirectory() as d:
    ...     z.astype(ml_dtypes.bfloat16).tofile(os.path.join(d, "logits.bin"))
    ...     r = evaluate(os.path.join(d, "logits.bin"), np.array([0, 1, 2, 3, 2, 1]),
    ...                  layout=Layout(raw_dtype="bfloat16", vocab=4))
    >>> r.tokens, round(r.mean_loss, 4)
    (6, 1.3863)
    """
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid: expected one of 'nan', 'raise', 'skip', found {on_invalid!r}")
    if train_loss is not None:
        train_loss = V.check_finite(train_loss, "train_loss")
    if chunk_tokens is not None:
        chunk_tokens = positive_int(chunk_tokens, "chunk_tokens")
    if task_tokens is not None:
        task_tokens = positive_int(task_tokens, "task_tokens")
    if worker_threads is not None:
        worker_threads = positive_int(worker_threads, "worker_threads")
    hist_bins = positive_int(hist_bins, "hist_bins")
    if seq_len is not None:
        seq_len = positive_int(seq_len, "seq_len")
    if not isinstance(shift, (bool, np.bool_)):
        raise TypeError(f"shift: expected a bool, found {type(shift).__name__}")
    if shift and seq_len is None:
        raise ValueError("shift: needs seq_len (--seq-len), the length of each sequence")
    if progress not in (True, False, None):
        raise TypeError(f"progress: expected True, False or None, found {progress!r}")
    if targets is None:
        raise TypeError("targets: required")
    if layout is None:
        layout = Layout()
    elif not isinstance(layout, Layout):
        raise TypeError(f"layout: expected a fastloss.evaluation.Layout or None, found "
                        f"{type(layout).__name__}")
    given = [k for k, v in (("logits", logits), ("hidden", hidden), ("vocab_shards", vocab_shards))
             if v is not None]
    if len(given) > 1:
        what = {"logits": "logits", "hidden": "hidden (with lm_head)", "vocab_shards": "vocab_shards"}
        raise ValueError(f"{given[0]}: pass either {' or '.join(what[k] for k in given)}, not both")
    if not given:
        raise TypeError("logits: required (or hidden with lm_head, or vocab_shards)")
    if hidden is None and (lm_head is not None or bias is not None):
        raise ValueError("lm_head, bias: only used with hidden, not with logits")
    if hidden is not None and lm_head is None:
        raise ValueError("lm_head: required with hidden")
    runner = runner_for(client)
    job = _Job(ignore_index=V.check_ignore_index(ignore_index), seq_len=seq_len, shift=shift,
               on_invalid=on_invalid, threads=worker_threads,
               threads_by_host=getattr(runner, "threads_by_host", {}))
    if hidden is not None:
        job.shards = open_shards(runner, hidden, "hidden", layout)
        job.head = LMHead(job.shards, lm_head, bias, layout)
        nclass, itemsize = job.head.nclass, job.head.acc.itemsize
    elif logits is not None:
        job.shards = open_shards(runner, logits, "logits", layout)
        nclass, itemsize = job.shards[0].width, max(sh.dtype.itemsize for sh in job.shards)
    else:
        job.slices = _open_slices(runner, vocab_shards, layout)
        job.shards = job.slices[0].shards
        nclass = sum(sl.shards[0].width for sl in job.slices)
        itemsize = max(sh.dtype.itemsize for sl in job.slices for sh in sl.shards)
    job.tsrc = Concat(open_shards(runner, targets, "targets", layout))
    ntok = job.ntok = sum(sh.rows for sh in job.shards)
    inputs = "hidden states" if job.head else "logits"
    if job.tsrc.rows != ntok:
        names = ", ".join(sh.name for sh in job.shards)
        raise EvalInputError(", ".join(sh.name for sh in job.tsrc.shards),
                             f"{job.tsrc.rows} target tokens, but the {inputs} "
                             f"({names}) hold {ntok} tokens")
    if seq_len is not None and seq_len > max(ntok, 1):
        # checked before the per-position arrays of seq_len entries are allocated
        raise EvalInputError(", ".join(sh.name for sh in job.tsrc.shards),
                             f"seq_len={seq_len} (--seq-len) is longer than the {ntok} tokens")
    if seq_len is not None and ntok % seq_len:
        raise EvalInputError(", ".join(sh.name for sh in job.tsrc.shards),
                             f"{ntok} tokens are not a whole number of sequences of "
                             f"seq_len={seq_len} (--seq-len)")
    job.nclass = nclass
    check_all_targets(runner, job.tsrc, nclass, job.ignore_index, seq_len, shift)
    job.chunk_tokens = chunk_tokens or max(1, config.EVAL_CHUNK_BYTES // (nclass * itemsize))
    top = max(2 * math.log(nclass), 1.0) if hist_max is None else \
        V.check_range(hist_max, "hist_max", low=0.0, low_open=True)
    job.edges = np.linspace(0.0, top, hist_bins + 1)
    if task_tokens is None:
        width = job.head.wshard.shape[1] if job.head else nclass
        task_tokens = max(job.chunk_tokens, config.EVAL_TASK_BYTES // (width * itemsize),
                          -(-ntok // config.EVAL_MAX_TASKS))
    tasks = _plan(job, task_tokens)

    bar = progress_bar(progress, ntok)
    if bar is not None and runner.workers == 1 and isinstance(runner, LocalRunner):
        job.on_chunk = bar.update
    try:
        totals, skipped = _merge(runner.run(run_task, job, tasks), job, tasks, bar)
    finally:
        if bar is not None:
            bar.close()
        job.on_chunk = None
    return _report(totals, nclass, on_invalid, train_loss, job, skipped)


@dataclasses.dataclass(eq=False)
class _Job(Job):
    """What every task of one evaluation needs (sent once to each Dask worker)."""

    ignore_index: int
    seq_len: int | None
    shift: bool
    on_invalid: str
    shards: list = None  # logits or hidden shards (of the first vocabulary slice)
    slices: list = None  # vocabulary-sharded: one Concat of shards per slice
    head: LMHead = None
    tsrc: Concat = None
    nclass: int = 0
    ntok: int = 0
    chunk_tokens: int = 0
    edges: np.ndarray = None
    files: list = None  # (name, first row, end row) of every file read, set by _plan


@dataclasses.dataclass
class _Task:
    """Rows [g, h) of the dump; ``shard``/``lo``: the logits (or hidden-state) shard
    holding them and the first row in it (None for a vocabulary-sharded dump);
    ``files``: the files the rows come from (indices into ``_Job.files``: one per
    vocabulary slice or the logits shard, and the targets shard), dropped together
    under on_invalid="skip" when one of them fails to read."""

    index: int
    g: int
    h: int
    shard: int | None
    lo: int
    files: tuple


def _plan(job, per_task):
    """Tasks of at most ``per_task`` rows, each within one file of every input (the
    logits or hidden-state shards, or those of each vocabulary slice, and the targets'),
    so that a file that fails to read can be left out exactly. Sets ``job.files``."""
    sources = [job.shards] if job.slices is None else [sl.shards for sl in job.slices]
    sources.append(job.tsrc.shards)
    job.files, starts = [], []
    for shards in sources:
        g, st = 0, []
        for sh in shards:
            job.files.append((sh.name, g, g + sh.rows))
            st.append((g, len(job.files) - 1))
            g += sh.rows
        starts.append(st)
    bounds = sorted({g for st in starts for g, _ in st} | {job.ntok})
    tasks = []
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        # the file of each input holding row b0: the last one starting at or before it
        cover = [st[bisect.bisect_right([g for g, _ in st], b0) - 1] for st in starts]
        shard = None if job.slices is not None else cover[0][1]
        first = cover[0][0]
        for lo, hi in split_rows(b1 - b0, per_task):
            tasks.append(_Task(len(tasks), b0 + lo, b0 + hi, shard, b0 + lo - first,
                               tuple(f for _, f in cover)))
    return tasks


@dataclasses.dataclass
class _Partial:
    """What a task returns: its totals, or (a shard skipped) the file and the problem."""

    totals: M.Totals = None
    failed: tuple = None  # (file, problem)


def run_task(job, task):
    """Evaluate the rows of one task (here or on a Dask worker): a ``_Partial``."""
    threads = job.task_threads()
    totals = M.Totals(job.nclass, job.edges, job.seq_len)
    try:
        with limited_threads(threads, blas=job.head is not None):
            _task_rows(job, task, totals)
    except (EvalInputError, OSError) as e:
        if job.on_invalid != "skip":
            raise
        name = e.source if isinstance(e, EvalInputError) else getattr(e, "filename", None) or "?"
        problem = e.problem if isinstance(e, EvalInputError) else str(e)
        return _Partial(failed=(name, problem))
    return _Partial(totals=totals)


@contextlib.contextmanager
def limited_threads(threads, blas=False):
    """numba threads of the calling thread (and with ``blas``, the BLAS threads of the
    process, see :func:`_blas_limited`) limited to ``threads`` (None: as they are)."""
    if threads is None:
        yield
        return
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        if blas:
            with _blas_limited(threads):
                yield
        else:
            yield
    finally:
        numba.set_num_threads(before)


_BLAS_LOCK = threading.Lock()
_BLAS = {"users": 0, "limiter": None}


@contextlib.contextmanager
def _blas_limited(threads):
    """BLAS threads limited to ``threads`` while any task with an LM head runs in this
    process. The limit is process-wide (threadpoolctl), so tasks running at once on the
    threads of one Dask worker share it: the first sets it, the last restores what was
    there before. (Only tasks with an LM head pay threadpoolctl's ~2 ms look-up.)"""
    with _BLAS_LOCK:
        if _BLAS["users"] == 0:
            from threadpoolctl import threadpool_limits

            _BLAS["limiter"] = threadpool_limits(limits=threads, user_api="blas")
        _BLAS["users"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS["users"] -= 1
            if _BLAS["users"] == 0:
                _BLAS["limiter"].restore_original_limits()
                _BLAS["limiter"] = None


def _task_rows(job, task, totals):
    if job.head is not None:
        job.head.allocate(max(1, min(job.chunk_tokens, task.h - task.g)))
    for g in range(task.g, task.h, job.chunk_tokens):
        h = min(g + job.chunk_tokens, task.h)
        tgt, pos = chunk_targets(job.tsrc, g, h - g, job.ntok, job.ignore_index, job.seq_len, job.shift)
        if job.slices is not None:
            _slices_chunk(job, totals, g, h, tgt, pos)
        else:
            shard = job.shards[task.shard]
            lo = task.lo + (g - task.g)
            x = shard.read(lo, lo + h - g)
            if job.head is not None:
                x = job.head.logits(x)
            _chunk(totals, x, lo, lo + h - g, g, tgt, pos, shard.name, job.ignore_index, job.on_invalid)
            del x  # drop the chunk's mapping before the next is made
        if job.on_chunk is not None:
            job.on_chunk(h - g)


def _merge(results, job, tasks, bar):
    """Merge the partials in task order (so the sums are the same, bit for bit, however
    the tasks ran). A task's partial is merged once every task of every file it reads
    has reported, and dropped if one of those files failed to read (on_invalid="skip"):
    a failed file is left out whole. Returns (totals, skipped files)."""
    total = M.Totals(job.nclass, job.edges, job.seq_len)
    last = {}  # file -> the last task reading it
    for t in tasks:
        for f in t.files:
            last[f] = t.index
    arrived, contig, nxt = {}, 0, 0  # every task below contig has reported
    failed = {}  # file -> problem, in the order seen
    for task, part in results:
        if bar is not None and job.on_chunk is None:
            bar.update(task.h - task.g)
        arrived[task.index] = part
        if part.failed is not None:
            name, problem = part.failed
            named = [f for f in task.files if job.files[f][0] == name] or list(task.files)
            for f in named:
                failed.setdefault(f, problem)
        while contig in arrived:
            contig += 1
        while nxt < contig and all(last[f] < contig for f in tasks[nxt].files):
            part = arrived.pop(nxt)
            if not any(f in failed for f in tasks[nxt].files):
                total.merge(part.totals)
            nxt += 1
    skipped = [{"file": job.files[f][0], "tokens": job.files[f][2] - job.files[f][1], "problem": p}
               for f, p in failed.items()]
    return total, skipped


def open_shards(runner, value, kind, layout):
    """The shards of a ``kind`` input: files opened (headers read and checked) by the
    runner, on the workers when distributed; arrays here."""
    paths = expand_paths(value)
    if paths is None:
        return open_source(value, kind, layout)
    shards = runner.open(functools.partial(open_file, kind=kind, layout=layout), paths)
    check_widths(shards, kind)
    return shards


def _open_slices(runner, vocab_shards, layout):
    """One ``Concat`` of logits shards per vocabulary slice, in vocabulary order."""
    if not isinstance(vocab_shards, (list, tuple)) or not vocab_shards:
        raise TypeError("vocab_shards: expected a non-empty list with one file set (path, pattern "
                        "or list of them) or array per vocabulary slice")
    slices = [Concat(open_shards(runner, v, "logits", layout)) for v in vocab_shards]
    first = slices[0]
    for sl in slices[1:]:
        if sl.rows != first.rows:
            raise EvalInputError(", ".join(sh.name for sh in sl.shards),
                                 f"{sl.rows} tokens in this vocabulary slice, {first.rows} in the "
                                 f"first ({', '.join(sh.name for sh in first.shards)})")
    return slices


def _slices_chunk(job, totals, g, h, tgt, pos):
    """Rows [g, h) of a vocabulary-sharded dump: per-slice row statistics merged
    exactly (``fastloss.vocab_parallel``), then added to ``totals``."""
    from ..ops.vocab_parallel import merge_vocab_row_stats, vocab_row_stats

    n = h - g
    kt = np.where(tgt == job.ignore_index, np.int64(-1), tgt.astype(np.int64, copy=False))
    parts, start = [], 0
    for sl in job.slices:
        x = sl.read(g, h)
        parts.append(vocab_row_stats(x, kt, start, ignore_index=-1))
        start += sl.shards[0].width
        del x
    st = merge_vocab_row_stats(parts)
    loss = np.where(kt < 0, 0.0, st.loss())
    first = job.slices[0]
    k = int(np.searchsorted(first.starts, g, side="right")) - 1
    name = first.shards[k].name
    _add(totals, kt, loss, st.entropy(), st.confidence(), st.rank(), pos, g - first.starts[k], n,
         g, name, job.on_invalid)


def _chunk(totals, x, lo, hi, g, tgt, pos, name, ignore_index, on_invalid):
    """Run the kernel over the logits ``x`` of rows [lo, hi) of the file ``name`` (global
    rows from ``g``) and add them to ``totals``; ``tgt``: their targets (checked in range
    up front), ``pos``: positions in the sequence or None."""
    n = hi - lo
    ignored = tgt == ignore_index
    kt = np.where(ignored, np.int64(-1), tgt.astype(np.int64, copy=False))
    loss = np.empty(n, np.float64)
    ent = np.empty(n, np.float64)
    conf = np.empty(n, np.float64)
    rank = np.empty(n, np.int64)
    if n:
        xk = V.kernel_view(x).reshape(n, x.shape[-1])
        ntask = V.num_tasks(n, xk.size)
        with V.kernel_launch(ntask):
            eval_rows(xk, kt, V.acc_dtype(x.dtype).type(0), ntask, loss, ent, conf, rank)
        del xk
    _add(totals, kt, loss, ent, conf, rank, pos, lo, n, g, name, on_invalid)


def _add(totals, kt, loss, ent, conf, rank, pos, lo, n, g, name, on_invalid):
    """Add the per-token results of rows [lo, lo + n) of file ``name`` (global rows from
    ``g``; ``kt``: targets, -1 where ignored) to ``totals``, per ``on_invalid``."""
    counted = kt >= 0
    totals.ignored += int(n - np.count_nonzero(counted))
    bad = counted & np.isnan(loss)
    nbad = int(np.count_nonzero(bad))
    if nbad:
        k = int(np.flatnonzero(bad)[0])
        if totals.first_invalid is None:
            totals.first_invalid = (name, lo + k, g + k)
        if on_invalid == "raise":
            raise EvalInputError(name, f"NaN loss at token {lo + k} of this file (NaN or +inf "
                                       f"logits); pass --skip-invalid / on_invalid='skip' to "
                                       f"leave such tokens out")
        totals.invalid += nbad
        if on_invalid == "skip":
            totals.skipped += nbad
            counted = counted & ~bad
    totals.add(kt, loss, ent, conf, rank, counted, pos)


def _report(t, nclass, on_invalid, train_loss, job, skipped):
    shards, tsrc, head, shift = job.shards, job.tsrc, job.head, job.shift
    n = t.tokens
    nan = math.nan
    propagate = on_invalid == "nan" and t.invalid > 0
    mean_loss = t.loss_sum / n if n else nan
    unigram = t.unigram_entropy()
    uniform = math.log(nclass)
    if propagate:
        mean_loss = nan
    gap = None
    if n and uniform - unigram > 0 and not math.isnan(mean_loss):
        gap = (uniform - mean_loss) / (uniform - unigram)
    warnings = []
    if t.skipped:
        warnings.append(f"{t.skipped} token(s) with a NaN loss skipped; first in {t.first_invalid[0]} "
                        f"at token {t.first_invalid[1]}")
    elif propagate:
        warnings.append(f"{t.invalid} token(s) with a NaN loss make the means NaN; first in "
                        f"{t.first_invalid[0]} at token {t.first_invalid[1]}")
    for sk in skipped:
        warnings.append(f"{sk['file']}: skipped ({sk['problem']}); its {sk['tokens']} token(s) are "
                        f"left out of every number")
    if n == 0:
        warnings.append("no counted tokens: every target equals ignore_index")

    def mean(v):
        return nan if (n == 0 or propagate) else v / n

    loss_se = nan if propagate else t.loss_moments.stderr()
    acc = mean(t.top1)

    calibration = [{"lower": k / M.ECE_BINS, "upper": (k + 1) / M.ECE_BINS,
                    "count": int(t.bin_count[k]),
                    "confidence": float(t.bin_conf[k] / t.bin_count[k]) if t.bin_count[k] else None,
                    "accuracy": float(t.bin_correct[k] / t.bin_count[k]) if t.bin_count[k] else None}
                   for k in range(M.ECE_BINS)]
    per_loss = per_count = None
    if t.pos_count is not None:
        per_count = t.pos_count.tolist()
        per_loss = [float(s / c) if c else None for s, c in zip(t.pos_loss.tolist(), per_count, strict=True)]
    return EvalReport(
        tokens=n, ignored=t.ignored, skipped=t.skipped, vocab=nclass,
        mean_loss=mean_loss,
        perplexity=_ppl(mean_loss),
        bits_per_token=mean_loss / LN2,
        loss_stderr=loss_se, perplexity_stderr=_ppl(mean_loss) * loss_se,
        accuracy_stderr=math.sqrt(acc * (1 - acc) / n) if n else nan,
        accuracy=acc, top5_accuracy=mean(t.top5), mean_entropy=mean(t.ent_sum),
        ece=nan if propagate else t.ece(),
        uniform_baseline=uniform, unigram_baseline=unigram, gap_closed=gap,
        loss_max=t.loss_max if n else nan,
        loss_histogram={"edges": t.edges.tolist(), "counts": t.hist.tolist()},
        calibration=calibration,
        train_loss=train_loss,
        generalization_gap=None if train_loss is None else mean_loss - train_loss,
        seq_len=None if t.pos_count is None else t.pos_count.size, shift=shift,
        per_position_loss=per_loss, per_position_count=per_count,
        logits_files=[] if head or job.slices else [s.name for s in shards],
        vocab_shards=None if job.slices is None else [[s.name for s in sl.shards] for sl in job.slices],
        skipped_files=skipped,
        targets_files=[s.name for s in tsrc.shards],
        hidden_files=[s.name for s in shards] if head else [],
        lm_head_file=head.name if head else None, bias_file=head.bias_name if head else None,
        warnings=warnings)


def _ppl(mean_loss):
    """exp(mean loss): inf past float64's range, NaN for NaN."""
    return math.exp(mean_loss) if mean_loss < 709 else (math.nan if math.isnan(mean_loss) else math.inf)
