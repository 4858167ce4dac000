"""Float64 totals of the per-token evaluation metrics, merged chunk by chunk.

The per-token loss, entropy, top-1 confidence and target rank come from the
numba kernel ``fastloss.cpu.eval_metrics.eval_rows`` (its docstring gives the
formulas); ``Totals`` adds each chunk's results serially in float64 / int64, so
the sums are race-free and chunk-size independent up to float64 rounding.
"""

import math

import numpy as np

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
