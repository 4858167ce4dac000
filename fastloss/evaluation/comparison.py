"""``compare``: how far a model's next-token distributions moved from a base model's.

The streaming Python counterpart of ``llama-perplexity --kl-divergence``: two
logits dumps of the same tokens (or hidden states through each model's LM head)
are read in lockstep, chunk by chunk, through one fused kernel per row pair
(``fastloss.cpu.compare_metrics``); per-token KL divergences (and target
probability changes) go to ``metrics.SpillColumns`` so that their percentiles
are exact however many tokens there are.
"""

import bisect
import dataclasses
import functools
import math

import numpy as np

from .. import _validate as V
from .. import config
from .._io import json_safe
from ..cpu.compare_metrics import NO_TARGET, SKIP, compare_rows
from . import metrics as M
from .distributed import Job, LocalRunner, runner_for, split_rows
from .readers import Concat, EvalInputError, Layout, positive_int
from .report import pm
from .stream import LMHead, check_all_targets, chunk_targets, limited_threads, open_shards, progress_bar

#: Percentiles of the per-token KL reported in ``CompareReport.kl_percentiles``.
KL_PERCENTILES = (0.0, 0.1, 1.0, 5.0, 10.0, 50.0, 90.0, 95.0, 99.0, 99.9, 100.0)

#: Percentiles of the change in the target's probability (those llama.cpp prints).
DELTA_P_PERCENTILES = (0.0, 0.1, 1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 100.0)


#: Edges of ``CompareReport.kl_histogram``: 6 log-spaced bins per decade from 1e-8 to
#: 100 nats (smaller KL, 0 included, is counted in ``below``; larger in the last bin).
KL_HIST_EDGES = np.logspace(-8, 2, 61)


def _qkey(q):
    """A percentile's JSON key: "0", "0.1", "99.9", "100"."""
    return f"{q:g}"


@dataclasses.dataclass
class CompareReport:
    """How a model's next-token distributions differ from a base model's, token by token.

    Every figure is over the ``tokens`` counted tokens: all of them without targets,
    else those whose target is not ``ignore_index`` (``ignored`` are left out of
    every figure). KL is ``KL(base || model)`` in nats. Standard errors are the
    sample standard deviation over sqrt(tokens) (binomial for the agreement; the
    delta method for the perplexities); ``kl_percentiles`` are numpy's default
    ('linear') percentiles of all per-token KL values, computed exactly.
    ``log_ppl_ratio`` is ``mean(nll_model - nll_base) = ln(PPL(model) / PPL(base))``,
    its standard error that of the paired per-token differences. ``delta_p`` figures
    are of ``p_model(target) - p_base(target)``; ``logprob_correlation`` is Pearson's
    r between the two models' per-token target log-probabilities.
    ``top_disagreements`` are the tokens of largest KL (``position`` counts tokens
    from 0 over the whole dump). ``kl_histogram``: counts of the per-token KL in
    log-spaced bins (``edges``; the last bin also holds larger values), ``below``
    the count under the first edge (1e-8 nats, exact zeros included).
    """

    tokens: int
    ignored: int
    vocab: int
    mean_kl: float
    kl_stderr: float
    kl_percentiles: dict = dataclasses.field(repr=False)
    top1_agreement: float
    top1_agreement_stderr: float
    top_disagreements: list = dataclasses.field(repr=False)
    kl_histogram: dict | None = dataclasses.field(default=None, repr=False)
    ppl_base: float | None = None
    ppl_base_stderr: float | None = None
    ppl_model: float | None = None
    ppl_model_stderr: float | None = None
    mean_nll_base: float | None = None
    mean_nll_model: float | None = None
    log_ppl_ratio: float | None = None
    log_ppl_ratio_stderr: float | None = None
    ppl_ratio: float | None = None
    delta_p_mean: float | None = None
    delta_p_stderr: float | None = None
    delta_p_rms: float | None = None
    delta_p_percentiles: dict | None = dataclasses.field(default=None, repr=False)
    logprob_correlation: float | None = None
    seq_len: int | None = None
    shift: bool = False
    per_position_kl: list | None = dataclasses.field(default=None, repr=False)
    per_position_count: list | None = dataclasses.field(default=None, repr=False)
    base_files: list = dataclasses.field(default_factory=list)
    model_files: list = dataclasses.field(default_factory=list)
    targets_files: list = dataclasses.field(default_factory=list)
    base_lm_head_file: str | None = None
    model_lm_head_file: str | None = None
    spilled: bool = False
    warnings: list = dataclasses.field(default_factory=list)

    def to_dict(self):
        """A JSON-ready dict of the fields (non-finite floats become None; percentile
        keys are strings such as ``"99.9"``)."""
        d = dataclasses.asdict(self)
        for name in ("kl_percentiles", "delta_p_percentiles"):
            if d[name] is not None:
                d[name] = {_qkey(q): v for q, v in d[name].items()}
        return json_safe(d)

    def format(self):
        """A readable table of the comparison."""
        def num(v, fmt="{:.6f}"):
            return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

        lines = [f"fastloss compare: {self.tokens:,} tokens counted"
                 + (f", {self.ignored:,} ignored" if self.ignored else "")
                 + f"; vocabulary {self.vocab:,}; KL(base || model) in nats"]
        rows = [("mean KL", num(self.mean_kl) + pm(self.kl_stderr, "{:.6f}")),
                ("top-1 agreement", num(self.top1_agreement, "{:.3%}")
                 + pm(self.top1_agreement_stderr, "{:.3%}"))]
        if self.ppl_base is not None:
            rows += [
                ("PPL(base)", num(self.ppl_base, "{:.4f}") + pm(self.ppl_base_stderr, "{:.4f}")),
                ("PPL(model)", num(self.ppl_model, "{:.4f}") + pm(self.ppl_model_stderr, "{:.4f}")),
                ("ln(PPL(model)/PPL(base))", num(self.log_ppl_ratio)
                 + pm(self.log_ppl_ratio_stderr, "{:.6f}")),
                ("PPL(model)/PPL(base)", num(self.ppl_ratio)),
                ("Cor(ln p_base, ln p_model)", num(self.logprob_correlation, "{:.4%}")),
                ("mean Δp", num(self.delta_p_mean, "{:+.4%}") + pm(self.delta_p_stderr, "{:.4%}")),
                ("RMS Δp", num(self.delta_p_rms, "{:.4%}")),
            ]
        width = max(len(k) for k, _ in rows)
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        lines.append("  KL percentiles: " + "  ".join(
            f"{_qkey(q)}%: {num(v, '{:.3g}')}" for q, v in self.kl_percentiles.items()))
        if self.delta_p_percentiles is not None:
            lines.append("  Δp percentiles: " + "  ".join(
                f"{_qkey(q)}%: {num(v, '{:+.3%}')}" for q, v in self.delta_p_percentiles.items()))
        if self.top_disagreements:
            lines.append(f"  largest KL ({len(self.top_disagreements)} tokens): position  KL  "
                         f"base argmax -> model argmax" + ("  [target]" if self.ppl_base is not None else ""))
            for t in self.top_disagreements:
                tgt = "" if t["target"] is None else f"  [{t['target']}]"
                lines.append(f"    {t['position']:>12,}  {num(t['kl'], '{:.4g}')}  "
                             f"{t['base_argmax']} -> {t['model_argmax']}{tgt}")
        if self.per_position_count is not None:
            lines += _position_lines(self.per_position_kl)
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines) + "\n"

    __str__ = format


def _position_lines(kl):
    """A few positions' mean KL (the plot and the JSON hold them all)."""
    seq_len = len(kl)
    picks = sorted({0, 1, seq_len // 4, seq_len // 2, 3 * seq_len // 4, seq_len - 1} & set(range(seq_len)))
    shown = "   ".join(f"pos {p}: {kl[p]:.4g}" for p in picks if kl[p] is not None)
    return [f"  mean KL by position in the sequence (seq_len {seq_len:,}):", f"    {shown or '(none)'}"]


class _Side:
    """One model's dump: its shards (logits, or hidden states with an LM head)."""

    def __init__(self, role, logits, hidden, lm_head, bias, layout, runner):
        self.role = role
        if hidden is not None:
            if logits is not None:
                raise ValueError(f"{role}, {role}_hidden: give either {role} logits or "
                                 f"{role}_hidden (with {role}_lm_head), not both")
            if lm_head is None:
                raise TypeError(f"{role}_lm_head: required with {role}_hidden")
            self.shards = open_shards(runner, hidden, "hidden", layout)
            self.head = LMHead(self.shards, lm_head, bias, layout)
            self.nclass, self.itemsize = self.head.nclass, self.head.acc.itemsize
            self.acc = self.head.acc
        else:
            if logits is None:
                raise TypeError(f"{role}: required (or {role}_hidden with {role}_lm_head)")
            if lm_head is not None or bias is not None:
                raise ValueError(f"{role}_lm_head, {role}_bias: only used with {role}_hidden")
            self.shards = open_shards(runner, logits, "logits", layout)
            self.head = None
            self.nclass = self.shards[0].width
            self.itemsize = max(s.dtype.itemsize for s in self.shards)
            wide = any(s.dtype == np.float64 for s in self.shards)
            self.acc = np.dtype(np.float64 if wide else np.float32)
        self.starts = np.cumsum([0] + [s.rows for s in self.shards]).tolist()
        self.rows = self.starts[-1]
        self.names = ", ".join(s.name for s in self.shards)

    def locate(self, g):
        """(shard, its first global row) holding global row ``g``."""
        k = bisect.bisect_right(self.starts, g) - 1
        k = min(k, len(self.shards) - 1)
        return self.shards[k], self.starts[k]

    def read(self, g, h):
        """Logits of global rows [g, h), which lie in one shard."""
        shard, start = self.locate(g)
        x = shard.read(g - start, h - start)
        return self.head.logits(x) if self.head is not None else x

    def what(self):
        return "hidden states" if self.head is not None else "logits"


def _top_merge(cur, kl, pos, aa, ab, tg, top):
    """The ``top`` largest-KL tokens of ``cur`` and the new ones (ties: earlier first)."""
    if top == 0:
        return cur
    if kl.size > top:
        keep = np.argpartition(-kl, top - 1)[:top]
        kl, pos, aa, ab, tg = kl[keep], pos[keep], aa[keep], ab[keep], tg[keep]
    cols = [np.concatenate([c, n]) for c, n in zip(cur, (kl, pos, aa, ab, tg), strict=True)]
    order = np.lexsort((cols[1], -cols[0]))[:top]
    return [c[order] for c in cols]


class _Totals:
    """Float64 running figures of a comparison, merged chunk by chunk."""

    def __init__(self, seq_len, has_targets):
        self.ignored = 0
        self.agree = 0
        self.kl = M.Moments()
        self.has_targets = has_targets
        self.nll_base = M.Moments()
        self.nll_model = M.Moments()
        self.diff = M.Moments()
        self.dp = M.Moments()
        self.dp_sq = 0.0
        self.corr = M.CoMoments()
        self.hist = np.zeros(len(KL_HIST_EDGES) - 1, np.int64)
        self.below = 0
        self.top = [np.empty(0, np.float64)] + [np.empty(0, np.int64)] * 4
        self.pos_kl = None if seq_len is None else np.zeros(seq_len, np.float64)
        self.pos_count = None if seq_len is None else np.zeros(seq_len, np.int64)

    def merge(self, other, top):
        """Add the figures of other tokens (associative, up to float64 rounding)."""
        self.ignored += other.ignored
        self.agree += other.agree
        for name in ("kl", "nll_base", "nll_model", "diff", "dp", "corr"):
            getattr(self, name).merge(getattr(other, name))
        self.dp_sq += other.dp_sq
        self.hist += other.hist
        self.below += other.below
        self.top = _top_merge(self.top, *other.top, top)
        if self.pos_kl is not None:
            self.pos_kl += other.pos_kl
            self.pos_count += other.pos_count
        return self


def compare(base=None, model=None, targets=None, *, base_hidden=None, base_lm_head=None,
            base_bias=None, model_hidden=None, model_lm_head=None, model_bias=None,
            ignore_index=-100, seq_len=None, shift=False, chunk_tokens=None, top=20,
            layout=None, tmpdir=None, progress=False, client=None, worker_threads=None,
            task_tokens=None):
    """Compare a model's next-token distributions with a base model's on the same tokens.

    The Python counterpart of ``llama-perplexity --kl-divergence``: per token, the
    KL divergence ``KL(base || model) = sum_j p_base,j (log p_base,j - log p_model,j)``
    (``0 log 0 = 0``), whether the two argmaxes agree, and, with targets, both models'
    negative log-likelihoods and the change of the target's probability. Dumps larger
    than memory are streamed in chunks.

    Parameters
    ----------
    base, model : array_like (..., V), or path, glob pattern or list of them
        The two models' logits for the same tokens, in any format ``evaluate`` reads
        (``.npy``, ``.safetensors``, raw files with ``layout``), each any of float16,
        bfloat16, float32, float64. The shards of the two may differ in size; they are
        read in lockstep by token.
    targets : array_like of int, or path(s), optional
        The tokens' targets (as for ``evaluate``). Without them every token counts and
        the perplexity and Δp figures are None.
    base_hidden, model_hidden : array_like (..., D) or path(s), optional
        Instead of ``base`` / ``model``: final hidden states, whose logits are
        ``hidden @ lm_head.T + bias`` per chunk (as ``evaluate``'s ``hidden``).
    base_lm_head, model_lm_head : array_like (V, D) or one file
        Required with the matching ``*_hidden``.
    base_bias, model_bias : array_like (V,) or one file, optional
        LM-head biases.
    ignore_index : int, default -100
        Target value of tokens left out of every figure.
    seq_len : int, optional
        Sequence length L: the report gets the mean KL at each position ``i % L``.
    shift : bool, default False
        ``targets`` holds token ids; the target of token i is token i + 1 within each
        sequence (requires ``seq_len``), as in ``evaluate``.
    chunk_tokens : int, optional
        Tokens per chunk; default: as many as fit in twice
        ``fastloss.config.EVAL_CHUNK_BYTES`` (128 MiB) of the wider side's logits (each
        side maps one such chunk at a time).
    top : int, default 20
        How many largest-KL tokens to list in ``top_disagreements``.
    layout : Layout, optional
        How to read raw and ``.safetensors`` files (shared by both sides).
    tmpdir : str, optional
        Folder for the temporary files holding the per-token values when they pass
        ``fastloss.config.COMPARE_SPILL_MEMORY_BYTES`` (default the system's
        temporary folder); they are deleted before ``compare`` returns or raises.
    progress : bool or None, default False
        A progress bar on stderr (None: only when stderr is a terminal).
    client, worker_threads, task_tokens
        Run on a Dask cluster, as ``evaluate`` does. The per-token KL (and Δp) values
        stay in the memory of the workers that computed them; the exact percentiles
        come from radix-select passes whose histograms are summed on the workers, so
        only a few 512 KB histograms reach the client per pass.

    Returns
    -------
    CompareReport

    Raises
    ------
    EvalInputError (a ValueError)
        A file that cannot be read, different token counts or vocabularies of the two
        sides, a bad target, or a token whose logits hold NaN or +inf (or only -inf);
        the message names the file (and the token).
    TypeError, ValueError
        Bad arguments.

    Notes
    -----
    Per token (log-probabilities in nats, float64 statistics)::

        KL_i   = sum_j p_base,j (log p_base,j - log p_model,j)
        nll_i  = -log p(target_i)          (base and model)
        dp_i   = p_model(target_i) - p_base(target_i)

    ``log_ppl_ratio = mean(nll_model - nll_base) = ln(PPL(model) / PPL(base))``.
    A dump compared with itself gives KL exactly 0, agreement 1 and ratio 0.

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> rng = np.random.default_rng(0)
    >>> base = rng.normal(size=(1000, 50)).astype(np.float32)
    >>> model = base + 0.1 * rng.normal(size=base.shape).astype(np.float32)
    >>> t = rng.integers(0, 50, 1000)
    >>> r = fastloss.compare(base, model, t)
    >>> r.tokens, round(r.mean_kl, 3), r.top1_agreement > 0.8
    (1000, 0.005, True)
    >>> same = fastloss.compare(base, base, t)
    >>> same.mean_kl, same.kl_percentiles[99.9], same.top1_agreement, same.log_ppl_ratio
    (0.0, 0.0, 1.0, 0.0)
    """
    if layout is None:
        layout = Layout()
    elif not isinstance(layout, Layout):
        raise TypeError(f"layout: expected a fastloss.evaluation.Layout, found {type(layout).__name__}")
    if isinstance(top, (bool, np.bool_)) or not isinstance(top, (int, np.integer)) or top < 0:
        raise ValueError(f"top: expected a non-negative integer, found {top!r}")
    top = int(top)
    if chunk_tokens is not None:
        chunk_tokens = positive_int(chunk_tokens, "chunk_tokens (--chunk-tokens)")
    if seq_len is not None:
        seq_len = positive_int(seq_len, "seq_len (--seq-len)")
    if shift and seq_len is None:
        raise ValueError("shift: needs seq_len, the length of each sequence")
    if shift and targets is None:
        raise ValueError("shift: needs targets (the token ids)")
    ignore_index = V.check_ignore_index(ignore_index)
    if worker_threads is not None:
        worker_threads = positive_int(worker_threads, "worker_threads")
    if task_tokens is not None:
        task_tokens = positive_int(task_tokens, "task_tokens")
    runner = runner_for(client)
    a = _Side("base", base, base_hidden, base_lm_head, base_bias, layout, runner)
    b = _Side("model", model, model_hidden, model_lm_head, model_bias, layout, runner)
    if b.nclass != a.nclass:
        raise EvalInputError(b.shards[0].name, f"vocabulary size {b.nclass} of the model differs "
                                               f"from the base's {a.nclass} ({a.names})")
    if b.rows != a.rows:
        raise EvalInputError(b.names, f"the model's {b.what()} hold {b.rows} tokens, but the "
                                      f"base's ({a.names}) hold {a.rows}")
    ntok, nclass = a.rows, a.nclass
    tsrc = None
    if targets is not None:
        tsrc = Concat(open_shards(runner, targets, "targets", layout))
        tnames = ", ".join(s.name for s in tsrc.shards)
        if tsrc.rows != ntok:
            raise EvalInputError(tnames, f"{tsrc.rows} target tokens, but the base and model "
                                         f"({a.names}) hold {ntok} tokens")
    where = tnames if tsrc is not None else a.names
    if seq_len is not None and seq_len > max(ntok, 1):
        raise EvalInputError(where, f"seq_len={seq_len} (--seq-len) is longer than the {ntok} tokens")
    if seq_len is not None and ntok % seq_len:
        raise EvalInputError(where, f"{ntok} tokens are not a whole number of sequences of "
                                    f"seq_len={seq_len} (--seq-len)")
    if tsrc is not None:
        check_all_targets(runner, tsrc, nclass, ignore_index, seq_len, shift)
    if chunk_tokens is None:
        budget = config.COMPARE_CHUNK_FACTOR * config.EVAL_CHUNK_BYTES
        chunk_tokens = max(1, budget // (nclass * max(a.itemsize, b.itemsize)))
    if task_tokens is None:
        width = max(s.head.wshard.shape[1] if s.head else nclass for s in (a, b))
        task_tokens = max(chunk_tokens, config.EVAL_TASK_BYTES // (width * max(a.itemsize, b.itemsize)),
                          -(-ntok // config.EVAL_MAX_TASKS))
    job = _Job(a=a, b=b, tsrc=tsrc, ntok=ntok, ignore_index=ignore_index, seq_len=seq_len,
               shift=shift, chunk_tokens=chunk_tokens, top=top, threads=worker_threads,
               threads_by_host=getattr(runner, "threads_by_host", {}),
               zero=np.float64(0) if np.dtype(np.float64) in (a.acc, b.acc) else np.float32(0))
    tasks = []
    bounds = sorted(set(a.starts) | set(b.starts))
    for s0, s1 in zip(bounds[:-1], bounds[1:], strict=True):
        for lo, hi in split_rows(s1 - s0, task_tokens):
            tasks.append(_Task(len(tasks), s0 + lo, s0 + hi))
    names = ("kl", "dp") if tsrc is not None else ("kl",)
    bar = progress_bar(progress, ntok, "fastloss compare")
    local = isinstance(runner, LocalRunner)
    if bar is not None and local:
        job.on_chunk = bar.update
    handles = []
    try:
        with M.SpillColumns(names, tmpdir) as store:
            tot = _Totals(seq_len, tsrc is not None)
            pending, nxt = {}, 0
            for task, part, cols in runner.run_keep(_compare_task, job, tasks):
                if bar is not None and not local:
                    bar.update(task.h - task.g)
                if local:
                    store.append(**cols)
                else:
                    handles.append(cols)
                pending[task.index] = part
                while nxt in pending:  # merged in task order: the same sums however they ran
                    tot.merge(pending.pop(nxt), top)
                    nxt += 1
            scan = None if local else functools.partial(_remote_scan, runner, handles)
            return _report(tot, store, a, b, tsrc, nclass, seq_len, shift, scan)
    finally:
        runner.release(handles)
        if bar is not None:
            bar.close()
        job.on_chunk = None


@dataclasses.dataclass(eq=False)
class _Job(Job):
    """What every task of one comparison needs (sent once to each Dask worker)."""

    a: _Side
    b: _Side
    tsrc: Concat | None
    ntok: int
    ignore_index: int
    seq_len: int | None
    shift: bool
    chunk_tokens: int
    top: int
    zero: object


@dataclasses.dataclass
class _Task:
    """Tokens [g, h), within one shard of each side."""

    index: int
    g: int
    h: int


def _compare_task(job, task):
    """Compare the tokens of one task (here or on a Dask worker): ``(totals, columns)``,
    the columns being the counted tokens' KL (and Δp) values for the percentiles."""
    tot = _Totals(job.seq_len, job.tsrc is not None)
    cols = {"kl": []} if job.tsrc is None else {"kl": [], "dp": []}
    for side in (job.a, job.b):
        if side.head is not None:
            side.head.allocate(max(1, min(job.chunk_tokens, task.h - task.g)))
    with limited_threads(job.task_threads(),
                         blas=job.a.head is not None or job.b.head is not None):
        for g in range(task.g, task.h, job.chunk_tokens):
            h = min(g + job.chunk_tokens, task.h)
            for name, v in _chunk(tot, job, g, h).items():
                cols[name].append(v)
            if job.on_chunk is not None:
                job.on_chunk(h - g)
    return tot, {k: np.concatenate(v) if v else np.empty(0) for k, v in cols.items()}


def _scan_column(cols, name, buckets, gather):
    return M.scan_chunk(cols[name], buckets, gather)


def _remote_scan(runner, handles, name, buckets, gather):
    """A radix-select pass over the ``name`` values kept on the Dask workers."""
    return runner.scan(functools.partial(_scan_column, name=name, buckets=buckets, gather=gather),
                       handles, M.combine_scans)


def _chunk(tot, job, g, h):
    """Run the kernel over global tokens [g, h) (within one shard of each side), add the
    counted tokens to ``tot`` and return their per-token columns."""
    a, b, tsrc = job.a, job.b, job.tsrc
    n = h - g
    if tsrc is not None:
        tgt, pos = chunk_targets(tsrc, g, n, job.ntok, job.ignore_index, job.seq_len, job.shift)
        codes = np.where(tgt == job.ignore_index, np.int64(SKIP), tgt.astype(np.int64, copy=False))
    else:
        tgt, codes = None, np.full(n, NO_TARGET, np.int64)
        pos = None if job.seq_len is None else np.arange(g, h) % job.seq_len
    kl = np.empty(n, np.float64)
    arg_a = np.empty(n, np.int64)
    arg_b = np.empty(n, np.int64)
    lp_a = np.empty(n, np.float64)
    lp_b = np.empty(n, np.float64)
    status = np.empty(n, np.int64)
    xa = V.kernel_view(a.read(g, h)).reshape(n, a.nclass)
    xb = V.kernel_view(b.read(g, h)).reshape(n, b.nclass)
    ntask = V.num_tasks(n, 2 * xa.size)
    with V.kernel_launch(ntask):
        compare_rows(xa, xb, codes, job.zero, ntask, kl, arg_a, arg_b, lp_a, lp_b, status)
    del xa, xb  # drop the chunks' mappings before the next are made
    bad = np.flatnonzero(status)
    if bad.size:
        k = int(bad[0])
        side = a if status[k] & 1 else b
        shard, start = side.locate(g)
        what = ("logits computed from the hidden states" if side.head is not None
                else "logits")
        raise EvalInputError(shard.name, f"NaN or +inf (or only -inf) in the {side.role}'s {what} "
                                         f"at token {g - start + k} of this file")
    counted = codes != SKIP
    tot.ignored += int(n - np.count_nonzero(counted))
    if not counted.all():
        kl, arg_a, arg_b, lp_a, lp_b = (v[counted] for v in (kl, arg_a, arg_b, lp_a, lp_b))
        positions = np.flatnonzero(counted) + g
        pos = None if pos is None else pos[counted]
        tgt = tgt[counted]
    else:
        positions = np.arange(g, h, dtype=np.int64)
    tot.kl.add(kl)
    tot.agree += int(np.count_nonzero(arg_a == arg_b))
    idx = np.searchsorted(KL_HIST_EDGES, kl, side="right") - 1
    low = idx < 0
    tot.below += int(np.count_nonzero(low))
    tot.hist += np.bincount(np.minimum(idx[~low], tot.hist.size - 1), minlength=tot.hist.size)
    if pos is not None:
        tot.pos_kl += np.bincount(pos, weights=kl, minlength=tot.pos_kl.size)
        tot.pos_count += np.bincount(pos, minlength=tot.pos_count.size)
    tg = np.full(kl.size, -1, np.int64) if tgt is None else tgt.astype(np.int64)
    tot.top = _top_merge(tot.top, kl, positions, arg_a, arg_b, tg, job.top)
    if tsrc is None:
        return {"kl": kl}
    tot.nll_base.add(-lp_a)
    tot.nll_model.add(-lp_b)
    tot.diff.add(lp_a - lp_b)  # nll_model - nll_base
    tot.corr.add(lp_a, lp_b)
    dp = np.exp(lp_b) - np.exp(lp_a)
    tot.dp.add(dp)
    tot.dp_sq += float(np.dot(dp, dp))
    return {"kl": kl, "dp": dp}


def _ppl(nll):
    return math.exp(nll) if nll < 709 else math.inf


def _report(tot, store, a, b, tsrc, nclass, seq_len, shift, scan=None):
    def pct(name, qs):
        sc = None if scan is None else functools.partial(scan, name)
        return dict(zip(qs, M.percentiles(store.chunks(name), n, qs, sc), strict=True))

    n = tot.kl.n
    nan = math.nan
    warnings = []
    if n == 0:
        warnings.append("no counted tokens: every target equals ignore_index")
    kl_pct = pct("kl", KL_PERCENTILES)
    agree = tot.agree / n if n else nan
    top = [{"position": int(p), "kl": float(k), "base_argmax": int(x), "model_argmax": int(y),
            "target": None if t < 0 else int(t)}
           for k, p, x, y, t in zip(*(c.tolist() for c in tot.top), strict=True)]
    r = CompareReport(
        tokens=n, ignored=tot.ignored, vocab=nclass,
        mean_kl=tot.kl.mean if n else nan, kl_stderr=tot.kl.stderr(), kl_percentiles=kl_pct,
        top1_agreement=agree,
        top1_agreement_stderr=math.sqrt(agree * (1 - agree) / n) if n else nan,
        top_disagreements=top,
        kl_histogram={"edges": KL_HIST_EDGES.tolist(), "counts": tot.hist.tolist(),
                      "below": tot.below},
        seq_len=seq_len, shift=shift,
        base_files=[s.name for s in a.shards], model_files=[s.name for s in b.shards],
        targets_files=[] if tsrc is None else [s.name for s in tsrc.shards],
        base_lm_head_file=a.head.name if a.head is not None else None,
        model_lm_head_file=b.head.name if b.head is not None else None,
        spilled=store.spilled, warnings=warnings)
    if tsrc is not None:
        nb, nm = tot.nll_base, tot.nll_model
        r.mean_nll_base = nb.mean if n else nan
        r.mean_nll_model = nm.mean if n else nan
        r.ppl_base = _ppl(r.mean_nll_base) if n else nan
        r.ppl_model = _ppl(r.mean_nll_model) if n else nan
        r.ppl_base_stderr = r.ppl_base * nb.stderr()
        r.ppl_model_stderr = r.ppl_model * nm.stderr()
        r.log_ppl_ratio = tot.diff.mean if n else nan
        r.log_ppl_ratio_stderr = tot.diff.stderr()
        r.ppl_ratio = _ppl(r.log_ppl_ratio) if n else nan
        r.delta_p_mean = tot.dp.mean if n else nan
        r.delta_p_stderr = tot.dp.stderr()
        r.delta_p_rms = math.sqrt(tot.dp_sq / n) if n else nan
        r.delta_p_percentiles = pct("dp", DELTA_P_PERCENTILES)
        r.logprob_correlation = tot.corr.correlation()
    if tot.pos_count is not None:
        r.per_position_count = tot.pos_count.tolist()
        r.per_position_kl = [float(s / c) if c else None
                             for s, c in zip(tot.pos_kl.tolist(), r.per_position_count, strict=True)]
    return r
