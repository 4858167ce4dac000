"""``evaluate``: stream a logits dump (or hidden states through an LM head) in chunks
through the CPU kernels and total the metrics."""

import math
import sys

import numpy as np

from .. import _validate as V
from .. import config
from ..cpu.eval_metrics import eval_rows
from . import metrics as M
from .readers import (
    Concat,
    EvalInputError,
    Layout,
    load_whole,
    open_source,
    positive_int,
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
    per chunk into a reused ``(chunk, D)`` buffer)."""

    def __init__(self, shards, lm_head, bias, layout):
        w, self.name = load_whole(lm_head, "lm_head", layout)
        dim = shards[0].width
        if w.shape[1] != dim:
            raise EvalInputError(shards[0].name, f"hidden size {dim} (shape {shards[0].shape}) "
                                                 f"differs from the LM head's {w.shape[1]} in "
                                                 f"{self.name} (shape {w.shape}, expected (V, D))")
        self.nclass = w.shape[0]
        dtypes = [s.dtype for s in shards] + [w.dtype]
        self.acc = np.dtype(np.float64) if np.dtype(np.float64) in dtypes else np.dtype(np.float32)
        self.upcast = any(d != self.acc for d in dtypes[:-1])
        self.w = w.astype(self.acc, copy=False)
        self.b, self.bias_name = None, None
        if bias is not None:
            b, self.bias_name = load_whole(bias, "bias", layout)
            if b.shape != (self.nclass,):
                raise EvalInputError(self.bias_name, f"bias shape {b.shape} does not match the "
                                                     f"LM head {self.name}: expected ({self.nclass},)")
            self.b = b.astype(self.acc)
        self.buf = self.hbuf = None

    def allocate(self, rows):
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


def evaluate(logits=None, targets=None, *, hidden=None, lm_head=None, bias=None,
             ignore_index=-100, seq_len=None, shift=False, chunk_tokens=None, on_invalid="nan",
             train_loss=None, hist_bins=40, hist_max=None, layout=None, progress=False):
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
    if hidden is not None:
        if logits is not None:
            raise ValueError("logits: pass either logits or hidden (with lm_head), not both")
        if lm_head is None:
            raise ValueError("lm_head: required with hidden")
        shards = open_source(hidden, "hidden", layout)
        head = LMHead(shards, lm_head, bias, layout)
        nclass, itemsize = head.nclass, head.acc.itemsize
    else:
        if logits is None:
            raise TypeError("logits: required (or hidden with lm_head)")
        if lm_head is not None or bias is not None:
            raise ValueError("lm_head, bias: only used with hidden, not with logits")
        shards = open_source(logits, "logits", layout)
        head = None
        nclass, itemsize = shards[0].width, max(s.dtype.itemsize for s in shards)
    tsrc = Concat(open_source(targets, "targets", layout))
    ntok = sum(s.rows for s in shards)
    if tsrc.rows != ntok:
        names = ", ".join(s.name for s in shards)
        raise EvalInputError(", ".join(s.name for s in tsrc.shards),
                             f"{tsrc.rows} target tokens, but the {'hidden states' if head else 'logits'} "
                             f"({names}) hold {ntok} tokens")
    if seq_len is not None and seq_len > max(ntok, 1):
        # checked before the per-position arrays of seq_len entries are allocated
        raise EvalInputError(", ".join(s.name for s in tsrc.shards),
                             f"seq_len={seq_len} (--seq-len) is longer than the {ntok} tokens")
    if seq_len is not None and ntok % seq_len:
        raise EvalInputError(", ".join(s.name for s in tsrc.shards),
                             f"{ntok} tokens are not a whole number of sequences of "
                             f"seq_len={seq_len} (--seq-len)")
    ignore_index = V.check_ignore_index(ignore_index)
    check_targets(tsrc, nclass, ignore_index, seq_len, shift)
    if chunk_tokens is None:
        chunk_tokens = max(1, config.EVAL_CHUNK_BYTES // (nclass * itemsize))
    top = max(2 * math.log(nclass), 1.0) if hist_max is None else \
        V.check_range(hist_max, "hist_max", low=0.0, low_open=True)
    totals = M.Totals(nclass, np.linspace(0.0, top, hist_bins + 1), seq_len)
    if head is not None:
        head.allocate(max(1, min(chunk_tokens, max(s.rows for s in shards))))

    bar = progress_bar(progress, ntok)
    try:
        start = 0
        for shard in shards:
            for lo in range(0, shard.rows, chunk_tokens):
                hi = min(lo + chunk_tokens, shard.rows)
                tgt, pos = chunk_targets(tsrc, start + lo, hi - lo, ntok, ignore_index, seq_len, shift)
                x = shard.read(lo, hi)
                if head is not None:
                    x = head.logits(x)
                _chunk(totals, x, lo, hi, tgt, pos, shard.name, ignore_index, on_invalid)
                del x  # drop the chunk's mapping before the next is made
                if bar is not None:
                    bar.update(hi - lo)
            start += shard.rows
    finally:
        if bar is not None:
            bar.close()
    return _report(totals, nclass, on_invalid, train_loss, shards, tsrc, head, shift)


def _chunk(totals, x, lo, hi, tgt, pos, name, ignore_index, on_invalid):
    """Run the kernel over the logits ``x`` of rows [lo, hi) of the file ``name`` and add
    them to ``totals``; ``tgt``: their targets (checked in range up front), ``pos``:
    positions in the sequence or None."""
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
    counted = ~ignored
    totals.ignored += int(n - np.count_nonzero(counted))
    bad = counted & np.isnan(loss)
    nbad = int(np.count_nonzero(bad))
    if nbad:
        first = lo + int(np.flatnonzero(bad)[0])
        if totals.first_invalid is None:
            totals.first_invalid = (name, first)
        if on_invalid == "raise":
            raise EvalInputError(name, f"NaN loss at token {first} of this file (NaN or +inf "
                                       f"logits); pass --skip-invalid / on_invalid='skip' to "
                                       f"leave such tokens out")
        totals.invalid += nbad
        if on_invalid == "skip":
            totals.skipped += nbad
            counted = counted & ~bad
    totals.add(kt, loss, ent, conf, rank, counted, pos)


def _report(t, nclass, on_invalid, train_loss, shards, tsrc, head, shift):
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
        logits_files=[] if head else [s.name for s in shards],
        targets_files=[s.name for s in tsrc.shards],
        hidden_files=[s.name for s in shards] if head else [],
        lm_head_file=head.name if head else None, bias_file=head.bias_name if head else None,
        warnings=warnings)


def _ppl(mean_loss):
    """exp(mean loss): inf past float64's range, NaN for NaN."""
    return math.exp(mean_loss) if mean_loss < 709 else (math.nan if math.isnan(mean_loss) else math.inf)
