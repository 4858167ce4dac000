"""``evaluate``: stream a logits dump in chunks through the CPU kernels and total the metrics."""

import math

import numpy as np

from .. import _validate as V
from ..ops.cross_entropy import _forward_rows, _Plan
from . import metrics as M
from .readers import Concat, EvalInputError, open_logits, open_targets
from .report import LN2, EvalReport

#: Bytes of logits per chunk when ``chunk_tokens=None`` (read at call time; tests patch it).
CHUNK_BYTES = 64 * 2**20

#: Targets per chunk of the up-front target check.
TARGET_CHECK_TOKENS = 1 << 20

ON_INVALID = ("nan", "raise", "skip")


def _check_targets(tsrc, nclass, ignore_index):
    """Every target in [0, V) or ignore_index, checked per shard in bounded chunks
    before any logits are read; EvalInputError names the file, count and first bad token."""
    for shard in tsrc.shards:
        bad_count, first = 0, None
        for lo in range(0, shard.rows, TARGET_CHECK_TOKENS):
            t = np.asarray(shard.read(lo, min(lo + TARGET_CHECK_TOKENS, shard.rows)))
            t64 = t.astype(np.int64)
            huge = t > np.iinfo(np.int64).max if t.dtype == np.uint64 else False
            bad = (t != ignore_index) & ((t64 < 0) | (t64 >= nclass) | huge)
            nbad = int(np.count_nonzero(bad))
            if nbad and first is None:
                k = int(np.flatnonzero(bad)[0])
                first = (lo + k, t[k])
            bad_count += nbad
        if bad_count:
            raise EvalInputError(shard.name, f"{bad_count} target(s) outside [0, {nclass}) that are "
                                             f"not ignore_index={ignore_index}; first at token "
                                             f"{first[0]} of this file: {first[1]}")


def evaluate(logits, targets, *, ignore_index=-100, chunk_tokens=None, on_invalid="nan",
             train_loss=None, hist_bins=40, hist_max=None):
    """Evaluate next-token logits against targets, streaming dumps larger than memory.

    Parameters
    ----------
    logits : array_like (..., V), or path or list of paths to ``.npy`` files
        float16, bfloat16, float32 or float64. Several files are shards concatenated
        along tokens (same V). Files are read one chunk of rows at a time.
    targets : array_like of int, or path or list of paths to ``.npy`` files
        Class indices in ``[0, V)`` or ``ignore_index``; the same number of tokens as
        the logits in total (the shard boundaries need not match).
    ignore_index : int, default -100
        Target value of tokens that are not counted.
    chunk_tokens : int, optional
        Rows per chunk; default: as many as fit in ``CHUNK_BYTES`` (64 MiB) of logits.
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

    Returns
    -------
    EvalReport

    Raises
    ------
    EvalInputError (a ValueError)
        Unreadable, corrupt or truncated file, vocabulary or token-count mismatch,
        targets out of range, or (``on_invalid="raise"``) a NaN loss; the message
        starts with the file name.
    TypeError, ValueError
        Bad dtypes or options.

    Notes
    -----
    Per chunk the fused cross-entropy kernel gives ``loss_i = lse_i - z_{i,t}`` and
    ``lse_i`` in float32 (float64 for float64 logits), on the chunk as stored (no
    float32 copy); one more sweep of the same rows (``metrics.token_metrics``)
    gives the entropy ``-sum_j p_ij log p_ij``, the top-1 confidence
    ``exp(max_j z_ij - lse_i)`` and the target's rank. All totals are float64.
    ECE = ``sum_b n_b / N |acc_b - conf_b|`` over 15 equal-width bins ``(k/15, (k+1)/15]``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastloss import evaluate
    >>> logits = np.log(np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]))
    >>> r = evaluate(logits, np.array([0, 2]))
    >>> round(r.mean_loss, 6), r.accuracy, r.tokens
    (1.039721, 0.5, 2)
    """
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid: expected one of 'nan', 'raise', 'skip', found {on_invalid!r}")
    if train_loss is not None:
        train_loss = V.check_finite(train_loss, "train_loss")
    shards = open_logits(logits)
    tsrc = Concat(open_targets(targets))
    nclass = shards[0].width
    ntok = sum(s.rows for s in shards)
    if tsrc.rows != ntok:
        names = ", ".join(s.name for s in shards)
        raise EvalInputError(", ".join(s.name for s in tsrc.shards),
                             f"{tsrc.rows} target tokens, but the logits ({names}) hold {ntok} tokens")
    V.targets_for_kernel(np.zeros(0, np.int64), (0, nclass), ignore_index)  # type-check ignore_index
    _check_targets(tsrc, nclass, ignore_index)
    if chunk_tokens is None:
        itemsize = max(s.dtype.itemsize for s in shards)
        chunk_tokens = max(1, CHUNK_BYTES // (nclass * itemsize))
    elif isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, (int, np.integer)) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: expected a positive integer, found {chunk_tokens!r}")
    if isinstance(hist_bins, bool) or not isinstance(hist_bins, (int, np.integer)) or hist_bins < 1:
        raise ValueError(f"hist_bins: expected a positive integer, found {hist_bins!r}")
    top = max(2 * math.log(nclass), 1.0) if hist_max is None else \
        V.check_range(hist_max, "hist_max", low=0.0, low_open=True)
    totals = M.Totals(nclass, np.linspace(0.0, top, int(hist_bins) + 1))

    start = 0
    for shard in shards:
        for lo in range(0, shard.rows, int(chunk_tokens)):
            hi = min(lo + int(chunk_tokens), shard.rows)
            _chunk(totals, shard, lo, hi, tsrc.read(start + lo, start + hi), ignore_index, on_invalid)
        start += shard.rows
    return _report(totals, nclass, on_invalid, train_loss, shards, tsrc)


def _chunk(totals, shard, lo, hi, tgt_raw, ignore_index, on_invalid):
    """Run the kernels over rows [lo, hi) of one logits shard and add them to ``totals``."""
    x = shard.read(lo, hi)
    plan = _Plan(x, np.asarray(tgt_raw).reshape(hi - lo), None, ignore_index, "none",
                 0.0, 0.0, None, 1.0, None)
    loss, lse = _forward_rows(plan)
    n = hi - lo
    ent = np.empty(n, plan.acc)
    conf = np.empty(n, plan.acc)
    rank = np.empty(n, np.int64)
    xk = V.kernel_view(plan.logits).reshape(n, plan.nclass)
    with V.kernel_launch():
        M.token_metrics(xk, plan.tgt, lse, plan.acc.type(0), V.num_tasks(n, xk.size), ent, conf, rank)
    del x, xk, plan.logits  # drop the chunk's mapping
    counted = ~plan.ignored
    totals.ignored += int(n - np.count_nonzero(counted))
    bad = counted & (np.isnan(loss) | np.isnan(lse))
    nbad = int(np.count_nonzero(bad))
    if nbad:
        first = lo + int(np.flatnonzero(bad)[0])
        if totals.first_invalid is None:
            totals.first_invalid = (shard.name, first)
        if on_invalid == "raise":
            raise EvalInputError(shard.name, f"NaN loss at token {first} of this file (NaN or +inf "
                                             f"logits); pass --skip-invalid / on_invalid='skip' to "
                                             f"leave such tokens out")
        totals.invalid += nbad
        if on_invalid == "skip":
            totals.skipped += nbad
            counted = counted & ~bad
    totals.add(plan.tgt, loss, ent, conf, rank, counted)


def _report(t, nclass, on_invalid, train_loss, shards, tsrc):
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

    calibration = [{"lower": k / M.ECE_BINS, "upper": (k + 1) / M.ECE_BINS,
                    "count": int(t.bin_count[k]),
                    "confidence": float(t.bin_conf[k] / t.bin_count[k]) if t.bin_count[k] else None,
                    "accuracy": float(t.bin_correct[k] / t.bin_count[k]) if t.bin_count[k] else None}
                   for k in range(M.ECE_BINS)]
    return EvalReport(
        tokens=n, ignored=t.ignored, skipped=t.skipped, vocab=nclass,
        mean_loss=mean_loss,
        perplexity=math.exp(mean_loss) if mean_loss < 709 else (nan if math.isnan(mean_loss) else math.inf),
        bits_per_token=mean_loss / LN2,
        accuracy=mean(t.top1), top5_accuracy=mean(t.top5), mean_entropy=mean(t.ent_sum),
        ece=nan if propagate else t.ece(),
        uniform_baseline=uniform, unigram_baseline=unigram, gap_closed=gap,
        loss_max=t.loss_max if n else nan,
        loss_histogram={"edges": t.edges.tolist(), "counts": t.hist.tolist()},
        calibration=calibration,
        train_loss=train_loss,
        generalization_gap=None if train_loss is None else mean_loss - train_loss,
        logits_files=[s.name for s in shards], targets_files=[s.name for s in tsrc.shards],
        warnings=warnings)
