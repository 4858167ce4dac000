"""Exact cross-entropy and evaluation metrics from vocabulary-sharded logits.

With vocab-parallel (tensor-parallel) logits, each rank holds the columns
``[v0, v0 + w)`` of the ``(N, V)`` logits. ``vocab_row_stats`` reduces one
such slice to a few float64 numbers per row (``fastloss.cpu.vocab_stats``),
``merge_vocab_row_stats`` merges slices in float64 (exactly: associative and
order-independent up to float64 rounding), and the merged
``VocabRowStats`` gives the per-row loss, entropy, confidence and rank of
``fastloss.cpu.eval_metrics.eval_rows``; ``vocab_parallel_cross_entropy``
reduces the loss as ``fastloss.cross_entropy`` does. The logits are never
gathered: a slice's statistics are ``4 + 2 K`` numbers per row (``K =
top_k``), cheap to send between ranks or Dask workers.

Merging slices ``k`` (disjoint columns) into one, with ``m = max_k m_k``:

    s = sum_k s_k exp(m_k - m),   a = sum_k exp(m_k - m) (a_k + (m_k - m) s_k)

(slices with ``s_k = 0``, all ``-inf``, drop out; NaN propagates), the target
logit from the slice holding the target, and the top-K pairs re-selected in
the same order (value descending, index ascending).
"""

import dataclasses
import numbers

import numpy as np

from .. import _validate as V

__all__ = ["VocabRowStats", "merge_vocab_row_stats", "vocab_parallel_cross_entropy", "vocab_row_stats"]


@dataclasses.dataclass(frozen=True, eq=False)
class VocabRowStats:
    """Per-row softmax statistics of some vocabulary columns of logits ``(..., V)``.

    Made by :func:`vocab_row_stats` (one slice) and
    :func:`merge_vocab_row_stats` (several); the arrays are flat over the
    ``N`` rows (``rows_shape`` flattened), float64 unless stated. It holds
    plain numpy arrays and tuples only, so it pickles cheaply.

    Attributes
    ----------
    rows_shape : tuple of int
        ``logits.shape[:-1]``; the per-row results have this shape.
    targets : numpy.ndarray of int64, shape (N,)
        Global class index of each row's target; -1 where it is ignored.
    max : numpy.ndarray, shape (N,)
        ``m = max_j z_j`` over the columns held: NaN if one is NaN, +inf if
        one is +inf (and none is NaN), -inf if all are -inf.
    sumexp : numpy.ndarray, shape (N,)
        ``s = sum_j exp(z_j - m)``: >= 1; 0 for an all -inf row; NaN where
        ``m`` is NaN or +inf.
    sumexp_dev : numpy.ndarray, shape (N,)
        ``a = sum_j exp(z_j - m) (z_j - m)`` (<= 0; 0 for an all -inf row;
        NaN where ``s`` is).
    target_logit : numpy.ndarray, shape (N,)
        ``z_t`` where the columns held include the target, else NaN.
    has_target : numpy.ndarray of bool, shape (N,)
        Whether they do.
    top_values, top_index : numpy.ndarray, shape (N, K), float64 and int64
        The K largest ``(z_j, j)`` (global ``j``), value descending then
        index ascending; NaN never enters; padded with ``(-inf, -1)`` where
        fewer than K non-NaN values are held.
    vocab_ranges : tuple of (int, int)
        The ``[start, stop)`` column ranges held, sorted and disjoint.
    """

    rows_shape: tuple
    targets: np.ndarray
    max: np.ndarray
    sumexp: np.ndarray
    sumexp_dev: np.ndarray
    target_logit: np.ndarray
    has_target: np.ndarray
    top_values: np.ndarray
    top_index: np.ndarray
    vocab_ranges: tuple

    @property
    def top_k(self):
        """K, the number of top pairs kept per row."""
        return self.top_values.shape[1]

    @property
    def ignored(self):
        """Mask (N,) of the rows whose target is ignored."""
        return self.targets < 0

    def logsumexp(self):
        """``lse = m + log s`` per row, of ``rows_shape``: -inf for an all -inf
        row, NaN where a logit is NaN or +inf (as :func:`fastloss.logsumexp`).
        Exact for every row only once every slice is merged in."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return (self.max + np.log(self.sumexp)).reshape(self.rows_shape)

    def loss(self):
        """Cross-entropy ``lse - z_t`` per row (float64, ``rows_shape``); 0.0 at
        ignored rows. NaN where the row has a NaN or +inf logit (or all are
        -inf), +inf where ``z_t = -inf`` and another logit is finite: exactly
        where :func:`fastloss.cpu.eval_metrics.eval_rows` gives those.

        Raises
        ------
        ValueError
            A counted row's target is in none of ``vocab_ranges`` (a slice
            is missing from the merge); the message names ``targets``.
        """
        self._check_targets_held("the loss")
        with np.errstate(divide="ignore", invalid="ignore"):
            lse = self.max + np.log(self.sumexp)
            loss = lse - self.target_logit
        return np.where(self.ignored, 0.0, loss).reshape(self.rows_shape)

    def entropy(self):
        """Entropy of the softmax, ``log s - a / s`` per row (``rows_shape``):
        NaN where the loss is NaN, 0.0 at ignored rows (as ``eval_rows``)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = np.log(self.sumexp) - self.sumexp_dev / self.sumexp
        return self._rows_result(ent)

    def confidence(self):
        """Top-1 confidence ``max_j p_j = 1 / s`` per row (``rows_shape``): NaN
        where the loss is NaN, 0.0 at ignored rows (as ``eval_rows``)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            conf = 1.0 / self.sumexp
        return self._rows_result(conf)

    def rank(self):
        """Rank of the target, ``#{j : z_j > z_t} + #{j < t : z_j == z_t}`` (0:
        top-1 correct), int64 of ``rows_shape``; -1 at ignored rows. Exact
        when below K = ``top_k``; K means "K or more". NaN logits are not
        counted (and a NaN target logit has rank 0), as in ``eval_rows``.

        Raises
        ------
        ValueError
            As :meth:`loss`.
        """
        self._check_targets_held("the rank")
        t = self.targets[:, None]
        zt = self.target_logit[:, None]
        v, j = self.top_values, self.top_index
        beats = (j >= 0) & ((v > zt) | ((v == zt) & (j < t)))
        rank = np.count_nonzero(beats, axis=1).astype(np.int64)
        return np.where(self.ignored, np.int64(-1), rank).reshape(self.rows_shape)

    def _rows_result(self, values):
        """``values`` with NaN where s is not > 0 and 0.0 at ignored rows, of ``rows_shape``."""
        values = np.where(self.sumexp > 0, values, np.nan)
        return np.where(self.ignored, 0.0, values).reshape(self.rows_shape)

    def _check_targets_held(self, what):
        missing = ~self.ignored & ~self.has_target
        if missing.any():
            first = int(np.flatnonzero(missing)[0])
            pos = tuple(int(p) for p in np.unravel_index(first, self.rows_shape)) if self.rows_shape else ()
            raise ValueError(f"targets: {int(missing.sum())} counted target(s) lie in none of the vocabulary "
                             f"ranges {list(self.vocab_ranges)}, so {what} needs the statistics of more "
                             f"slices (merge_vocab_row_stats); first at position {pos}: "
                             f"{int(self.targets[first])}")


def _nonnegative_int(value, name, low):
    """``value`` as a Python int >= ``low``: TypeError for a non-integer, ValueError below."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}: expected an integer, found {type(value).__name__}")
    v = int(value)
    if v < low:
        raise ValueError(f"{name}: expected an integer >= {low}, found {v}")
    return v


def _slice_targets(targets, logits_shape, ignore_index):
    """Flat int64 targets, -1 where ignored; a counted target must be >= 0 (its
    upper bound, V, is unknown to one slice)."""
    t = V.as_array(targets, "targets")
    V.check_targets_meta(t.shape, t.dtype, logits_shape)
    flat = t.reshape(-1)
    ignored = flat == ignore_index
    t64 = flat.astype(np.int64)
    huge = flat > np.iinfo(np.int64).max if t.dtype == np.uint64 else False
    bad = ~ignored & ((t64 < 0) | huge)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        pos = tuple(int(p) for p in np.unravel_index(first, t.shape)) if t.ndim else ()
        raise ValueError(f"targets: {int(bad.sum())} value(s) are negative (or too large) and not "
                         f"ignore_index={ignore_index}; first at position {pos}: {flat[first]}")
    return np.where(ignored, np.int64(-1), t64)


def vocab_row_stats(logits, targets, vocab_start, *, ignore_index=-100, top_k=5, exact=False):
    """Per-row softmax statistics of one vocabulary slice of the logits.

    Parameters
    ----------
    logits : array_like, shape (..., w)
        The columns ``[vocab_start, vocab_start + w)`` of the full ``(..., V)``
        logits (one tensor-parallel rank's slice); float16, bfloat16
        (``ml_dtypes.bfloat16``), float32 or float64, read as stored. Not
        modified.
    targets : array_like of int, shape ``logits.shape[:-1]``
        Global class indices (in ``[0, V)``, not necessarily in this slice),
        or ``ignore_index``. The same on every slice.
    vocab_start : int >= 0
        Global index of the slice's first column.
    ignore_index : int, default -100
        Target value of rows that are not counted.
    top_k : int >= 1, default 5
        How many of the largest logits (value, global index) to keep per row:
        :meth:`VocabRowStats.rank` is exact below ``top_k``.
    exact : bool, default False
        Take the exponentials in float64 for float16, bfloat16 and float32
        logits too (they always are for float64 ones): see Notes. About 2x
        slower for those dtypes.

    Returns
    -------
    VocabRowStats
        The statistics of this slice (``vocab_ranges == ((vocab_start,
        vocab_start + w),)``); merge those of every slice with
        :func:`merge_vocab_row_stats`.

    Raises
    ------
    TypeError
        Unsupported dtype of ``logits`` or ``targets``, non-integer
        ``vocab_start``, ``top_k`` or ``ignore_index``, non-bool ``exact``.
    ValueError
        ``targets`` of another shape than ``logits.shape[:-1]``, negative
        targets that are not ``ignore_index``, a 0-d ``logits`` or one with no
        column, ``vocab_start < 0``, ``top_k < 1``.

    Notes
    -----
    With ``m`` the row max of the slice, ``s = sum_j exp(z_j - m)`` and
    ``a = sum_j exp(z_j - m) (z_j - m)`` (``VocabRowStats`` gives the special
    values). Sums over blocks of 2048 columns and across blocks are float64.
    For float64 logits, and with ``exact=True``, each exponential is float64
    too (within ~2 ulp), so the statistics are float64 functions of the
    stored values, to ~1e-15 relative. Otherwise, as in
    :func:`fastloss.cross_entropy`, the exponentials and the sums within a
    block are float32 (relative error ~1e-7, up to ~1e-6 for a full block),
    which costs about 1.4x the evaluation kernel against 3x. The merge and
    everything derived from the statistics are float64 either way.

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> logits = np.array([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    >>> st = fastloss.vocab_row_stats(logits[:, 1:3], np.array([1, 0]), 1, top_k=2)
    >>> st.max, st.has_target, st.vocab_ranges
    (array([0.5, 0.3]), array([ True, False]), ((1, 3),))
    >>> st.top_index
    array([[1, 2],
           [2, 1]])
    """
    x = V.logits_array(logits)
    v0 = _nonnegative_int(vocab_start, "vocab_start", 0)
    k = _nonnegative_int(top_k, "top_k", 1)
    ignore_index = V.check_ignore_index(ignore_index)
    if not isinstance(exact, (bool, np.bool_)):
        raise TypeError(f"exact: expected True or False, found {exact!r}")
    tgt = _slice_targets(targets, x.shape, ignore_index)
    from ..cpu.vocab_stats import row_stats  # numba loads here, not at import

    w = x.shape[-1]
    n = tgt.shape[0]
    xk = V.kernel_view(x).reshape(n, w)
    zero = np.float64(0) if exact or x.dtype == np.float64 else np.float32(0)
    mx, s, a, zt, has, topv, topi = row_stats(xk, tgt, v0, k, zero, V.num_tasks(n, n * w), V.kernel_launch)
    return VocabRowStats(tuple(x.shape[:-1]), tgt, mx, s, a, zt, has, topv, topi, ((v0, v0 + w),))


def merge_vocab_row_stats(stats):
    """Merge the statistics of disjoint vocabulary slices of the same rows.

    Parameters
    ----------
    stats : sequence of VocabRowStats
        From :func:`vocab_row_stats` or earlier merges, in any order: of the
        same rows (``rows_shape`` and ``targets``) and ``top_k``, holding
        disjoint column ranges.

    Returns
    -------
    VocabRowStats
        The statistics of the union of the slices. The merge is exact in
        float64: associative and order-independent up to rounding (~1e-16
        relative per merge), so slices may be merged in any tree (as a
        reduction over ranks or Dask workers does).

    Raises
    ------
    TypeError
        ``stats`` is not a non-empty sequence of ``VocabRowStats``.
    ValueError
        Slices of other rows, targets or ``top_k``, or overlapping column
        ranges.

    Notes
    -----
    With ``m = max_k m_k``: ``s = sum_k s_k exp(m_k - m)``, ``a = sum_k
    exp(m_k - m) (a_k + (m_k - m) s_k)``; slices with ``s_k = 0`` (all
    ``-inf``) drop out and NaN propagates.

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> rng = np.random.default_rng(0)
    >>> logits = rng.standard_normal((3, 10))
    >>> targets = np.array([1, 9, -100])
    >>> parts = [fastloss.vocab_row_stats(logits[:, a:b], targets, a) for a, b in [(0, 4), (4, 9), (9, 10)]]
    >>> st = fastloss.merge_vocab_row_stats(parts)
    >>> st.vocab_ranges
    ((0, 4), (4, 9), (9, 10))
    >>> bool(np.allclose(st.logsumexp(), fastloss.logsumexp(logits), rtol=1e-14))
    True
    >>> st.rank()  # 5 = top_k: rank 5 or more (it is 6)
    array([ 5,  0, -1])
    """
    if isinstance(stats, VocabRowStats) or not hasattr(stats, "__len__"):
        raise TypeError(f"stats: expected a sequence of VocabRowStats, found {type(stats).__name__}")
    stats = list(stats)
    if not stats:
        raise TypeError("stats: expected a non-empty sequence of VocabRowStats, found an empty one")
    for i, st in enumerate(stats):
        if not isinstance(st, VocabRowStats):
            raise TypeError(f"stats: item {i} is a {type(st).__name__}, expected a VocabRowStats")
    first = stats[0]
    for i, st in enumerate(stats[1:], 1):
        if st.rows_shape != first.rows_shape:
            raise ValueError(f"stats: item {i} has rows of shape {st.rows_shape}, item 0 {first.rows_shape}")
        if st.top_k != first.top_k:
            raise ValueError(f"stats: item {i} has top_k={st.top_k}, item 0 top_k={first.top_k}")
        if not np.array_equal(st.targets, first.targets):
            raise ValueError(f"stats: item {i} has other targets than item 0 (not the same rows?)")
    ranges = sorted(r for st in stats for r in st.vocab_ranges)
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        if b0 < a1:
            raise ValueError(f"stats: the vocabulary ranges [{a0}, {a1}) and [{b0}, {b1}) overlap")
    if len(stats) == 1:
        return first
    return VocabRowStats(first.rows_shape, first.targets, *_merge_sums(stats), *_merge_target(stats),
                         *_merge_top(stats, first.top_k), tuple(ranges))


def _merge_sums(stats):
    """Merged (max, sumexp, sumexp_dev) (module docstring)."""
    mk = np.stack([st.max for st in stats])
    sk = np.stack([st.sumexp for st in stats])
    ak = np.stack([st.sumexp_dev for st in stats])
    with np.errstate(invalid="ignore", over="ignore"):
        m = mk.max(axis=0)
        out = sk == 0  # all -inf: drops out (and m_k - m may be -inf - -inf)
        dm = np.where(out, 0.0, mk - m)
        e = np.exp(dm)
        s = np.where(out, 0.0, sk * e).sum(axis=0)
        a = np.where(out, 0.0, e * (ak + dm * sk)).sum(axis=0)
    return m, s, a


def _merge_target(stats):
    """Merged (target_logit, has_target): from the slice holding the target."""
    zt = np.full(stats[0].target_logit.shape, np.nan)
    has = np.zeros(zt.shape, np.bool_)
    for st in stats:
        zt = np.where(st.has_target, st.target_logit, zt)
        has |= st.has_target
    return zt, has


def _merge_top(stats, k):
    """Merged (top_values, top_index): the K first of every slice's pairs in
    the order value descending, index ascending (padding last)."""
    v = np.concatenate([st.top_values for st in stats], axis=1)
    j = np.concatenate([st.top_index for st in stats], axis=1)
    key = np.where(j < 0, np.iinfo(np.int64).max, j)
    order = np.lexsort((key, -v), axis=-1)[:, :k]
    return np.take_along_axis(v, order, axis=1), np.take_along_axis(j, order, axis=1)


def vocab_parallel_cross_entropy(stats, reduction="mean"):
    """Cross-entropy from the statistics of every vocabulary slice of the logits.

    Parameters
    ----------
    stats : VocabRowStats or sequence of VocabRowStats
        Merged statistics (:func:`merge_vocab_row_stats`), or the slices'
        statistics to merge first.
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" over the counted (not ignored) rows, 0.0 when there are none;
        "sum"; "none": per row, 0.0 at ignored rows.

    Returns
    -------
    float or numpy.ndarray
        A Python float for "mean"/"sum"; for "none" a float64 array of
        ``rows_shape`` (the logits' ``shape[:-1]``).

    Raises
    ------
    ValueError
        A counted target lies in none of the merged slices (the message names
        ``targets``), a bad ``reduction``, or a bad merge
        (:func:`merge_vocab_row_stats`).

    Notes
    -----
    Per row ``lse - z_t`` with ``lse = m + log s`` of the merged statistics:
    ``fastloss.cross_entropy(logits, targets, reduction=...)`` of the gathered
    logits (no class weights, label smoothing or logit transforms), NaN where
    a row has a NaN or +inf logit. No gradient is computed: the gradient of
    rank k's slice is ``softmax_k - onehot`` (``exp(z_j - lse) - [j == t]``,
    divided by the count for "mean"), which each rank computes from its own
    logits and the merged ``stats.logsumexp()``.

    Examples
    --------
    >>> import numpy as np, fastloss
    >>> rng = np.random.default_rng(0)
    >>> logits = rng.standard_normal((4, 10)).astype(np.float32)
    >>> targets = np.array([1, 5, 9, -100])
    >>> parts = [fastloss.vocab_row_stats(logits[:, a:b], targets, a) for a, b in [(0, 3), (3, 10)]]
    >>> loss = fastloss.vocab_parallel_cross_entropy(parts)
    >>> abs(loss - fastloss.cross_entropy(logits, targets)) < 1e-6
    True
    >>> fastloss.vocab_parallel_cross_entropy(parts, reduction="none").round(4)
    array([2.7767, 2.9186, 2.349 , 0.    ])
    """
    reduction = V.check_reduction(reduction)
    if not isinstance(stats, VocabRowStats):
        stats = merge_vocab_row_stats(stats)
    loss = stats.loss()
    if reduction == "none":
        return loss
    total = float(loss.sum())
    if reduction == "sum":
        return total
    counted = int(np.count_nonzero(~stats.ignored))
    return total / counted if counted else 0.0
