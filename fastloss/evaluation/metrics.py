"""Float64 totals of per-token evaluation metrics, merged chunk by chunk.

The per-token loss, entropy, top-1 confidence and target rank come from the
numba kernel ``fastloss.cpu.eval_metrics.eval_rows`` (its docstring gives the
formulas); ``Totals`` adds each chunk's results serially in float64 / int64, so
the sums are race-free and chunk-size independent up to float64 rounding.

Shared with ``fastloss.compare``: ``Moments`` / ``CoMoments`` (means, standard
errors and correlations without cancellation), ``SpillColumns`` (per-token values
kept in memory, or past a budget in temporary files) and ``percentiles`` (numpy's
percentiles of such a stream, exact, by a radix select in bounded memory).
"""

import math
import os
import tempfile

import numpy as np

from .. import config

#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15


def ece_bin(conf):
    """Bin of each confidence: (k/B, (k+1)/B] is bin k (0 in bin 0, 1 in the last)."""
    b = np.ceil(np.nan_to_num(np.asarray(conf, np.float64)) * ECE_BINS).astype(np.int64) - 1
    return np.clip(b, 0, ECE_BINS - 1)


class Totals:
    """Float64/int64 running sums over chunks."""

    def __init__(self, nclass, hist_edges, seq_len=None):
        self.nclass = nclass
        self.edges = np.asarray(hist_edges, np.float64)
        self.tokens = 0
        self.ignored = 0
        self.skipped = 0
        self.invalid = 0
        self.first_invalid = None
        self.loss_sum = 0.0
        self.loss_moments = Moments()  # for the standard error of the mean loss
        self.ent_sum = 0.0
        self.top1 = 0
        self.top5 = 0
        self.loss_max = -math.inf
        self.bin_count = np.zeros(ECE_BINS, np.int64)
        self.bin_conf = np.zeros(ECE_BINS, np.float64)
        self.bin_correct = np.zeros(ECE_BINS, np.int64)
        self.unigram = np.zeros(nclass, np.int64)
        self.hist = np.zeros(len(self.edges) - 1, np.int64)
        # Per position within a sequence (seq_len given): loss sum and count.
        self.pos_loss = None if seq_len is None else np.zeros(seq_len, np.float64)
        self.pos_count = None if seq_len is None else np.zeros(seq_len, np.int64)

    def add(self, tgt, loss, ent, conf, rank, keep, pos=None):
        """Add the tokens selected by ``keep`` (counted and, unless propagating, valid);
        ``pos``: each token's position within its sequence (with ``seq_len``)."""
        loss = loss[keep]
        if self.pos_loss is not None:
            p = pos[keep]
            self.pos_count += np.bincount(p, minlength=self.pos_count.size)
            self.pos_loss += np.bincount(p, weights=loss.astype(np.float64), minlength=self.pos_loss.size)
        correct = rank[keep] == 0
        c = conf[keep].astype(np.float64)
        self.tokens += int(loss.size)
        self.loss_sum += float(loss.sum(dtype=np.float64))
        self.loss_moments.add(loss)
        self.ent_sum += float(ent[keep].sum(dtype=np.float64))
        self.top1 += int(np.count_nonzero(correct))
        self.top5 += int(np.count_nonzero(rank[keep] < 5))
        b = ece_bin(c)
        self.bin_count += np.bincount(b, minlength=ECE_BINS)
        self.bin_conf += np.bincount(b, weights=c, minlength=ECE_BINS)
        self.bin_correct += np.bincount(b[correct], minlength=ECE_BINS)
        self.unigram += np.bincount(tgt[keep], minlength=self.nclass)
        finite = loss[~np.isnan(loss)].astype(np.float64)
        if finite.size:
            self.loss_max = max(self.loss_max, float(finite.max()))
            idx = np.searchsorted(self.edges, finite, side="right") - 1
            self.hist += np.bincount(np.clip(idx, 0, len(self.hist) - 1), minlength=len(self.hist))

    def merge(self, other):
        """Add the totals ``other`` (of other tokens, with the same classes, histogram
        edges and sequence length) to these. Associative and order-independent up to
        float64 rounding; the first invalid token kept is the one at the smaller
        global row (``first_invalid = (file, token in file, global row)``)."""
        if other.nclass != self.nclass or other.edges.shape != self.edges.shape \
                or (other.pos_count is None) != (self.pos_count is None):
            raise ValueError("Totals.merge: totals of different vocabularies, histograms or "
                             "sequence lengths")
        for name in ("tokens", "ignored", "skipped", "invalid", "loss_sum", "ent_sum", "top1", "top5"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.first_invalid is not None and (self.first_invalid is None
                                                or other.first_invalid[2] < self.first_invalid[2]):
            self.first_invalid = other.first_invalid
        self.loss_moments.merge(other.loss_moments)
        self.loss_max = max(self.loss_max, other.loss_max)
        for name in ("bin_count", "bin_conf", "bin_correct", "hist", "unigram"):
            getattr(self, name).__iadd__(getattr(other, name))
        if self.pos_count is not None:
            self.pos_count += other.pos_count
            self.pos_loss += other.pos_loss
        return self

    def __getstate__(self):
        # A partial of a few thousand tokens counts few distinct targets: its unigram
        # counts travel as (class, count) pairs when that is smaller than the dense
        # (V,) int64 array (1 MB at V = 128k).
        state = self.__dict__.copy()
        nz = np.flatnonzero(self.unigram)
        if nz.size * 12 < self.unigram.nbytes:
            state["unigram"] = (nz.astype(np.int32 if self.nclass < 2**31 else np.int64),
                                self.unigram[nz])
        return state

    def __setstate__(self, state):
        uni = state["unigram"]
        if isinstance(uni, tuple):
            dense = np.zeros(state["nclass"], np.int64)
            dense[uni[0]] = uni[1]
            state["unigram"] = dense
        self.__dict__.update(state)

    def ece(self):
        """sum_b (n_b / N) |acc_b - conf_b| = (1/N) sum_b |correct_b - sum conf_b|."""
        if self.tokens == 0:
            return math.nan
        return float(np.abs(self.bin_correct - self.bin_conf).sum() / self.tokens)

    def unigram_entropy(self):
        """Entropy (nats) of the counted targets' empirical distribution."""
        if self.tokens == 0:
            return math.nan
        c = self.unigram[self.unigram > 0].astype(np.float64)
        p = c / c.sum()
        return float(-(p * np.log(p)).sum())


def centered_sums(x):
    """(count, mean, sum of squared deviations from the mean) of ``x`` in float64."""
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return 0, 0.0, 0.0
    # an infinite value: mean inf, squares NaN; huge ones (a corrupt dump's logits):
    # squares overflow to inf, as the true sum would
    with np.errstate(invalid="ignore", over="ignore"):
        mean = float(x.mean())
        d = x - mean
        return int(x.size), mean, float(np.dot(d, d))


class Moments:
    """Count, mean and sum of squared deviations of a stream of float64 values, merged
    chunk by chunk (Chan et al.'s pairwise update: no cancellation of sum x^2 - n mean^2).
    The mean is the float64 sum over the count (an infinite value makes it inf, and the
    deviations NaN)."""

    def __init__(self):
        self.n = 0
        self.sum = 0.0
        self.m2 = 0.0

    @property
    def mean(self):
        """The mean (0.0 before any value)."""
        return self.sum / self.n if self.n else 0.0

    def add(self, x):
        """Add the values ``x``."""
        n, mean, m2 = centered_sums(x)
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean  # Python floats: inf - inf is NaN, without a warning
        self.m2 += m2 + delta * delta * self.n * n / total
        self.sum += mean * n
        self.n = total

    def merge(self, other):
        """Add the values summarised by the Moments ``other`` (Chan et al.'s update)."""
        if other.n == 0:
            return
        total = self.n + other.n
        delta = other.mean - self.mean
        self.m2 += other.m2 + delta * delta * self.n * other.n / total
        self.sum += other.sum
        self.n = total

    def std(self):
        """Sample standard deviation (n - 1 in the denominator); NaN below 2 values."""
        if self.n < 2:
            return math.nan
        return math.sqrt(max(self.m2, 0.0) / (self.n - 1))

    def stderr(self):
        """Standard error of the mean, ``std / sqrt(n)``."""
        return self.std() / math.sqrt(self.n) if self.n >= 2 else math.nan


class CoMoments:
    """Means, sums of squared deviations and the co-moment of paired values (x, y),
    merged chunk by chunk like :class:`Moments`; gives the Pearson correlation."""

    def __init__(self):
        self.n = 0
        self.mx = self.my = 0.0
        self.sxx = self.syy = self.sxy = 0.0

    def add(self, x, y):
        """Add the pairs (x[i], y[i])."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        n = int(x.size)
        if n == 0:
            return
        with np.errstate(invalid="ignore", over="ignore"):  # infinite values: NaN moments; huge: inf
            mx, my = float(x.mean()), float(y.mean())
            dx, dy = x - mx, y - my
            sxx, syy, sxy = float(np.dot(dx, dx)), float(np.dot(dy, dy)), float(np.dot(dx, dy))
        total = self.n + n
        ex, ey = mx - self.mx, my - self.my
        f = self.n * n / total
        self.sxx += sxx + ex * ex * f
        self.syy += syy + ey * ey * f
        self.sxy += sxy + ex * ey * f
        self.mx += ex * n / total
        self.my += ey * n / total
        self.n = total

    def merge(self, other):
        """Add the pairs summarised by the CoMoments ``other``."""
        if other.n == 0:
            return
        total = self.n + other.n
        ex, ey = other.mx - self.mx, other.my - self.my
        f = self.n * other.n / total
        self.sxx += other.sxx + ex * ex * f
        self.syy += other.syy + ey * ey * f
        self.sxy += other.sxy + ex * ey * f
        self.mx += ex * other.n / total
        self.my += ey * other.n / total
        self.n = total

    def correlation(self):
        """Pearson's r; NaN when either variable is constant or there are < 2 pairs."""
        den = math.sqrt(self.sxx * self.syy)
        return self.sxy / den if self.n >= 2 and den > 0 else math.nan


# Exact percentiles of a stream larger than memory -------------------------------------
#
# The values are float64. ``order_keys`` maps them to uint64 keys whose unsigned order
# is their numeric order (-0 is made +0 first, so equal values get equal keys). The
# order statistics a percentile needs are found by a radix select over the keys: each
# pass over the values (bounded chunks) histograms the next 16 bits of the keys that
# share the bits found so far; once a bucket holds at most ``config.COMPARE_SELECT_GATHER`` values,
# the next pass gathers those and sorts them. At most 4 histogram passes for 64-bit keys,
# usually 2-3 passes in all, each reading the values once.

#: Bits of the key resolved per histogram pass (2**16 int64 counters per active bucket).
SELECT_BITS = 16

_SIGN = np.uint64(1 << 63)


def order_keys(x):
    """uint64 keys of float64 values whose unsigned order is the values' order (-0 as +0)."""
    b = (np.asarray(x, np.float64) + 0.0).view(np.uint64)  # + 0.0 turns -0 into +0
    neg = (b & _SIGN) != 0
    return np.where(neg, ~b, b | _SIGN)


def key_values(k):
    """The float64 values of keys from :func:`order_keys`."""
    k = np.asarray(k, np.uint64)
    neg = (k & _SIGN) == 0
    return np.where(neg, ~k, k & ~_SIGN).view(np.float64)


def scan_chunk(chunk, buckets, gather):
    """One chunk's part of a radix-select pass: for each bucket ``(bits, prefix)`` (the
    keys whose top ``bits`` bits are ``prefix``), the histogram of the next
    ``SELECT_BITS`` bits of its keys, or (buckets in ``gather``) the keys themselves.
    Returns ``(hists, keys)``, dicts by bucket; :func:`combine_scans` merges such parts."""
    keys = order_keys(chunk)
    hists, got = {}, {}
    for bits, prefix in buckets:
        sel = keys if bits == 0 else keys[(keys >> np.uint64(64 - bits)) == np.uint64(prefix)]
        if (bits, prefix) in gather:
            got[(bits, prefix)] = sel
        else:
            digit = (sel >> np.uint64(64 - bits - SELECT_BITS)) & np.uint64((1 << SELECT_BITS) - 1)
            hists[(bits, prefix)] = np.bincount(digit.astype(np.int64), minlength=1 << SELECT_BITS)
    return hists, got


def combine_scans(parts):
    """The sum of the histograms and the concatenation of the keys of :func:`scan_chunk`
    results (an iterable; each is consumed as it comes)."""
    hists, got = {}, {}
    for h, g in parts:
        for b, v in h.items():
            if b in hists:
                hists[b] += v
            else:
                hists[b] = v.copy()
        for b, v in g.items():
            got.setdefault(b, []).append(v)
    return hists, {b: np.concatenate(v) for b, v in got.items()}


def local_scan(chunks):
    """A ``scan(buckets, gather)`` for :func:`select_ranks` over the chunks of
    ``chunks()`` (a callable returning a fresh iterator of float64 chunks each time)."""
    def scan(buckets, gather):
        return combine_scans(scan_chunk(c, buckets, gather) for c in chunks())
    return scan


def select_ranks(chunks, n, ranks, scan=None):
    """The values of 0-based ranks ``ranks`` (in ``[0, n)``) of the ``n`` values yielded
    by ``chunks()`` (a callable returning a fresh iterator of float64 chunks each time
    it is called), as a dict rank -> float; exact, with memory bounded by the chunk
    size, ``config.COMPARE_SELECT_GATHER`` and one histogram per bucket in play.

    ``scan(buckets, gather)``, if given, replaces ``chunks``: it returns the
    :func:`combine_scans` of :func:`scan_chunk` over all the values, wherever they
    are (the per-token values of a distributed ``compare`` stay on the Dask workers
    that computed them, and only the histograms travel)."""
    if scan is None:
        scan = local_scan(chunks)
    # state per rank: (bits known, key prefix, values with a smaller prefix)
    state = {int(r): (0, 0, 0) for r in ranks}
    counts = {(0, 0): n}
    done = {}
    while len(done) < len(state):
        buckets = sorted({state[r][:2] for r in state if r not in done})
        gather = {b for b in buckets if counts[b] <= config.COMPARE_SELECT_GATHER or b[0] >= 64}
        hists, got = scan(buckets, gather)
        for bucket in gather:
            keys = np.sort(got.get(bucket, np.empty(0, np.uint64)))
            for r, (rb, rp, below) in state.items():
                if r not in done and (rb, rp) == bucket:
                    done[r] = float(key_values(keys[r - below]))
        for bucket in buckets:
            if bucket in gather:
                continue
            cum = np.cumsum(hists[bucket])
            for r, (rb, rp, below) in list(state.items()):
                if r in done or (rb, rp) != bucket:
                    continue
                d = int(np.searchsorted(cum, r - below, side="right"))
                nb = (rb + SELECT_BITS, (rp << SELECT_BITS) | d)
                state[r] = (*nb, below + (int(cum[d - 1]) if d else 0))
                counts[nb] = int(hists[bucket][d])
    return done


def percentiles(chunks, n, qs, scan=None):
    """numpy's default ('linear') percentiles ``qs`` (0-100) of the ``n`` float64 values
    of ``chunks`` (or ``scan``; see :func:`select_ranks`), computed exactly: the same order
    statistics and the same interpolation as ``np.percentile``, except where an
    infinite order statistic would make numpy's result NaN (``inf - inf`` with a zero
    weight, or between two equal infinities): that order statistic is returned.
    NaN for n == 0."""
    q = np.asarray(qs, np.float64) / 100
    if n == 0:
        return [math.nan] * len(q)
    vi = (n - 1) * q
    prev = np.floor(vi)
    gamma = vi - prev
    lo = np.clip(prev.astype(np.int64), 0, n - 1)
    hi = np.clip(lo + 1, 0, n - 1)
    top = vi >= n - 1
    lo[top] = hi[top] = n - 1
    vals = select_ranks(chunks, n, sorted(set(lo.tolist()) | set(hi.tolist())), scan)
    a = np.array([vals[int(i)] for i in lo])
    b = np.array([vals[int(i)] for i in hi])
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: replaced below; huge - -huge: inf
        diff = b - a
        out = a + diff * gamma
        late = gamma >= 0.5
        out[late] = (b - diff * (1 - gamma))[late]
    # numpy returns NaN where an infinite order statistic meets a zero weight or its
    # equal (inf - inf); here the order statistic itself
    exact = (gamma == 0) | (a == b)
    out[exact] = a[exact]
    return out.tolist()


class SpillColumns:
    """Named float64 columns of per-token values appended chunk by chunk: in memory up
    to ``config.COMPARE_SPILL_MEMORY_BYTES``, then in one temporary file per column (in ``tmpdir``,
    default the system's temporary folder), read back through short-lived memory maps.
    A context manager: the files are deleted on exit, error or not."""

    def __init__(self, names, tmpdir=None):
        self.names = tuple(names)
        self.tmpdir = tmpdir
        self.parts = {k: [] for k in self.names}
        self.files = {}
        self.paths = {}
        self.n = 0
        self.spilled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def append(self, **cols):
        """Append one chunk of each column (equal lengths)."""
        k = None
        for name in self.names:
            a = np.ascontiguousarray(cols[name], np.float64)
            k = a.size
            if self.spilled:
                a.tofile(self.files[name])
            else:
                self.parts[name].append(a)
        self.n += k
        if not self.spilled and self.n * 8 * len(self.names) > config.COMPARE_SPILL_MEMORY_BYTES:
            self._spill()

    def _spill(self):
        for name in self.names:
            fd, path = tempfile.mkstemp(prefix=f"fastloss-{name}-", suffix=".f64", dir=self.tmpdir)
            self.paths[name] = path
            self.files[name] = os.fdopen(fd, "wb")
            for a in self.parts[name]:
                a.tofile(self.files[name])
            self.parts[name] = []
        self.spilled = True

    def chunks(self, name):
        """A callable returning a fresh iterator over the column's values in chunks."""
        if not self.spilled:
            return lambda: iter(self.parts[name])
        self.files[name].flush()
        path, n = self.paths[name], self.n

        def read():
            for lo in range(0, n, config.COMPARE_SPILL_READ_VALUES):
                hi = min(n, lo + config.COMPARE_SPILL_READ_VALUES)
                m = np.memmap(path, np.float64, "r", offset=lo * 8, shape=(hi - lo,))
                yield np.array(m)  # a copy, so the mapping goes with ``m``
                del m
        return read

    def close(self):
        """Delete the temporary files (if any) and drop the values."""
        for name, f in self.files.items():
            f.close()
            try:
                os.unlink(self.paths[name])
            except FileNotFoundError:
                pass
        self.files = {}
        self.parts = {k: [] for k in self.names}
