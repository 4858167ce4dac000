"""Per-token evaluation metrics (numba, parallel over rows) and their float64 totals.

``token_metrics`` sweeps each row once, given the row's logsumexp from the
cross-entropy kernel, and writes per token

    ent_i  = -sum_j p_j log p_j = -sum_j p_j (z_j - lse_i),   p_j = exp(z_j - lse_i)
    conf_i = exp(max_j z_j - lse_i)                          (top-1 confidence)
    rank_i = #{j : z_j > z_t} + #{j < t : z_j == z_t}        (0: top-1 correct, < 5: top-5)

(ties are broken by index, as ``np.argmax``/a stable sort do). Statistics are in
float32 (float64 for float64 logits). ``Totals`` merges the per-chunk results
serially in float64 / int64, so the sums are race-free and chunk-size independent
up to float64 rounding.
"""

import math

import numpy as np
from numba import njit, prange

from .. import config
from ..cpu._math import _exp, load
from ..cpu.cross_entropy import _task_rows

_FM = config.FASTMATH

#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15


@njit(fastmath=_FM)
def _row_metrics(xr, t, l, zero):
    """(entropy, max logit, rank of the target) of one row in one sweep."""
    s = zero
    m = -np.inf
    zt = load(xr[t])
    r = 0
    for j in range(xr.shape[0]):
        v = load(xr[j])
        d = v - l
        p = _exp(d)
        s += p * d if p > zero else zero  # a -inf logit contributes 0, not 0 * -inf
        m = v if v > m else m
        r += 1 if (v > zt or (v == zt and j < t)) else 0
    return -s, m, r


@njit(parallel=True, cache=True, fastmath=_FM)
def token_metrics(x, tgt, lse, zero, ntask, ent, conf, rank):
    """Per-row entropy, top-1 confidence and target rank; rows with ``tgt < 0`` are
    skipped. ``zero`` is 0 in the accumulation type (lse's dtype); ``ntask`` tasks."""
    n = x.shape[0]
    for task in prange(ntask):
        lo, hi = _task_rows(ntask, n, task)
        for i in range(lo, hi):
            t = tgt[i]
            if t < 0:
                ent[i] = 0
                conf[i] = 0
                rank[i] = -1
                continue
            l = lse[i]
            h, m, r = _row_metrics(x[i], t, l, zero)
            ent[i] = h
            conf[i] = math.exp(m - l)
            rank[i] = r


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
