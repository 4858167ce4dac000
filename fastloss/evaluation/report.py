"""``EvalReport``: the numbers of one offline evaluation, as a table or a dict."""

import dataclasses
import math

from .._io import json_safe

LN2 = math.log(2.0)

#: ``EvalReport.unigram_source`` of ``evaluate``: the targets it evaluated.
EVALUATED_TOKENS = "evaluated tokens"


def baseline_comparison(loss, uniform, unigram, unigram_source=EVALUATED_TOKENS):
    """One sentence placing ``loss`` against the uniform and unigram baselines (nats),
    or None when ``loss`` is not finite.

    A percentage of the gap from uniform to unigram only between the two (0-100%);
    beyond the unigram baseline, how far below it in nats and as a ratio of losses;
    worse than uniform, how far above that in nats.
    """
    if loss is None or not math.isfinite(loss):
        return None
    name = f"the unigram baseline (counts from the {unigram_source})"
    if loss > uniform:
        ratio = f" ({loss / uniform:.3f} times it)" if uniform > 0 else ""
        return (f"Worse than uniform guessing: the loss is {loss - uniform:.4f} nats above the "
                f"uniform baseline ln V{ratio}.")
    if math.isfinite(unigram) and loss < unigram:
        ratio = f"{loss / unigram:.3f} times it" if unigram > 0 else "its ratio undefined"
        return (f"Beyond {name}: the loss is {unigram - loss:.4f} nats below it ({ratio}; "
                f"perplexity {math.exp(min(unigram - loss, 709.0)):.3g}x lower).")
    if math.isfinite(unigram) and uniform > unigram:
        closed = (uniform - loss) / (uniform - unigram)  # in [0, 1] here
        return (f"The loss closes {closed:.1%} of the gap from the uniform baseline to {name}: "
                f"between guessing uniformly and predicting target frequencies.")
    return None


@dataclasses.dataclass
class EvalReport:
    """Token-level evaluation of a model's logits against targets.

    Every mean is over the ``tokens`` counted tokens (targets not equal to
    ``ignore_index``, and not skipped as invalid); sums are accumulated in float64.
    Losses are in nats. With ``seq_len``, ``per_position_loss[p]`` is the mean loss of
    the counted tokens at position ``p`` of their sequence (None where none is counted)
    and ``per_position_count[p]`` their number.

    There is one unigram baseline, ``unigram_baseline``: the loss of predicting each
    target by its frequency, counted over ``unigram_source`` (``evaluate`` counts the
    evaluated targets themselves, so the baseline is their entropy; see
    :meth:`with_unigram` for counts from training data). ``gap_closed`` is
    ``(uniform - loss) / (uniform - unigram)``: 0 for a model no better than uniform
    guessing, 1 for one as good as the unigram baseline; above 1 (beyond the unigram
    baseline) and below 0 (worse than uniform) the text report states the distance
    in nats instead of a percentage (:func:`baseline_comparison`).
    ``loss_stderr`` is the standard error of ``mean_loss`` (sample standard deviation
    of the per-token losses over sqrt(tokens)), ``perplexity_stderr`` its delta-method
    image ``perplexity * loss_stderr``, ``accuracy_stderr`` the binomial
    ``sqrt(a (1 - a) / tokens)``: the sampling error of the figures as estimates over
    the population the tokens were drawn from (NaN below 2 tokens for the loss).
    ``generalization_gap`` is ``mean_loss - train_loss``, the training loss taken at
    the evaluated checkpoint; ``train_loss_source`` says where it came from.
    ``vocab_shards`` lists the files of each vocabulary slice of a vocabulary-sharded
    dump (None otherwise); ``skipped_files`` the files left out under
    ``on_invalid="skip"`` because they failed to read, each a dict of ``file``,
    ``tokens`` (its rows, left out of every number) and ``problem``.
    """

    tokens: int
    ignored: int
    skipped: int
    vocab: int
    mean_loss: float
    perplexity: float
    bits_per_token: float
    accuracy: float
    top5_accuracy: float
    mean_entropy: float
    ece: float
    uniform_baseline: float
    unigram_baseline: float
    gap_closed: float | None
    loss_max: float
    loss_histogram: dict
    calibration: list
    train_loss: float | None = None
    generalization_gap: float | None = None
    seq_len: int | None = None
    shift: bool = False
    per_position_loss: list | None = None
    per_position_count: list | None = None
    logits_files: list = dataclasses.field(default_factory=list)
    targets_files: list = dataclasses.field(default_factory=list)
    hidden_files: list = dataclasses.field(default_factory=list)
    lm_head_file: str | None = None
    bias_file: str | None = None
    warnings: list = dataclasses.field(default_factory=list)
    vocab_shards: list | None = None
    skipped_files: list = dataclasses.field(default_factory=list)
    unigram_source: str = EVALUATED_TOKENS
    train_loss_source: str | None = None
    loss_stderr: float = math.nan
    perplexity_stderr: float = math.nan
    accuracy_stderr: float = math.nan

    def to_dict(self):
        """A JSON-ready dict whose keys are the field names (non-finite floats become None),
        plus ``nats_below_unigram`` (``unigram_baseline - mean_loss``) and
        ``loss_over_unigram`` (``mean_loss / unigram_baseline``)."""
        d = dataclasses.asdict(self)
        below = self.unigram_baseline - self.mean_loss
        d["nats_below_unigram"] = below
        d["loss_over_unigram"] = (self.mean_loss / self.unigram_baseline
                                  if self.unigram_baseline > 0 else math.nan)
        return json_safe(d)

    def with_unigram(self, baseline, source):
        """A copy whose unigram baseline is ``baseline`` (nats), counted over ``source``
        (e.g. ``"training tokens"``), with ``gap_closed`` recomputed.

        ``evaluate`` counts the evaluated targets; a baseline whose frequencies come from
        the training data (its cross-entropy on the evaluated targets) is the fairer
        reference for held-out data, and replaces it rather than standing beside it.
        """
        baseline = float(baseline)
        gap = None
        if (self.tokens and self.uniform_baseline - baseline > 0
                and not math.isnan(self.mean_loss)):
            gap = (self.uniform_baseline - self.mean_loss) / (self.uniform_baseline - baseline)
        return dataclasses.replace(self, unigram_baseline=baseline, unigram_source=str(source),
                                   gap_closed=gap)

    def format(self, histogram=False):
        """A readable table that also says what the loss means.

        The 40-line loss histogram is folded to one line unless ``histogram`` is true
        (``fastloss eval --histogram``); its bins are in ``to_dict()["loss_histogram"]``.
        """
        def num(v, fmt="{:.4f}"):
            return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

        lines = [f"fastloss eval: {self.tokens:,} tokens counted, {self.ignored:,} ignored"
                 + (f", {self.skipped:,} skipped as invalid" if self.skipped else "")
                 + f"; vocabulary {self.vocab:,}"]
        rows = [
            ("mean loss", f"{num(self.mean_loss)}{pm(self.loss_stderr, '{:.4f}')} nats/token"),
            ("perplexity", num(self.perplexity, "{:.4g}") + pm(self.perplexity_stderr, "{:.2g}")),
            ("bits per token", num(self.bits_per_token)),
            ("top-1 accuracy", num(self.accuracy, "{:.2%}") + pm(self.accuracy_stderr, "{:.2%}")),
            ("top-5 accuracy", num(self.top5_accuracy, "{:.2%}")),
            ("mean entropy", f"{num(self.mean_entropy)} nats (the model's own uncertainty)"),
            ("ECE (15 bins)", f"{num(self.ece)} (top-1 confidence vs accuracy; 0 = calibrated)"),
            ("uniform baseline", f"{num(self.uniform_baseline)} nats = ln V (guessing uniformly)"),
            ("unigram baseline", f"{num(self.unigram_baseline)} nats (predicting each target by "
                                 f"its frequency, counted over the {self.unigram_source})"),
        ]
        if self.train_loss is not None:
            source = f" ({self.train_loss_source})" if self.train_loss_source else ""
            rows.append(("train loss", f"{num(self.train_loss)} nats{source}"))
            rows.append(("val - train gap", f"{num(self.generalization_gap, '{:+.4f}')} nats (the "
                                            f"mean loss above minus the train loss)"))
        width = max(len(k) for k, _ in rows)
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        verdict = baseline_comparison(self.mean_loss, self.uniform_baseline,
                                      self.unigram_baseline, self.unigram_source)
        if verdict:
            lines.append(f"  {verdict}")
        lines += _histogram_lines(self.loss_histogram, self.loss_max, histogram)
        if self.per_position_count is not None:
            lines += _position_lines(self.per_position_loss, self.per_position_count, self.shift)
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines) + "\n"

    __str__ = format


def pm(stderr, fmt):
    """`` ± stderr`` for a finite standard error, else nothing."""
    return f" ± {fmt.format(stderr)}" if stderr is not None and math.isfinite(stderr) else ""




def _histogram_lines(h, loss_max, shown):
    """The loss-histogram block of ``format()``: one folded line, or a line per non-empty
    bin (``shown``). The last bin also holds every larger loss; when it does hold some
    (``loss_max`` above its upper edge) it is printed open-ended, ``≥ lo``."""
    if not h or not sum(h["counts"]):
        return []
    edges, counts = h["edges"], h["counts"]
    overflow = loss_max is not None and loss_max > edges[-1]
    top = f"≥ {edges[-2]:.2f}, max {loss_max:.4f}" if overflow else f"{edges[-1]:g}]"
    head = (f"  loss histogram: {len(counts)} bins of {edges[1] - edges[0]:.3g} nats on "
            f"[{edges[0]:g}, {edges[-1]:.2f}]" if not overflow else
            f"  loss histogram: {len(counts)} bins of {edges[1] - edges[0]:.3g} nats from "
            f"{edges[0]:g}, the last open-ended ({top})")
    if not shown:
        return [f"{head}; folded (--histogram shows it; JSON: loss_histogram)"]
    lines = [f"{head}:"]
    peak = max(counts)
    last = len(counts) - 1
    for k, (lo, hi, c) in enumerate(zip(edges[:-1], edges[1:], counts, strict=True)):
        if c:
            bar = "#" * max(1, round(30 * c / peak))
            label = (f"≥ {lo:.2f}" if k == last and overflow
                     else f"[{lo:6.2f}, {hi:6.2f}{']' if k == last else ')'}")
            lines.append(f"    {label:<16}  {c:>10,}  {bar}")
    return lines


#: Levels of the per-position profile, low loss to high (ASCII, so any terminal shows it).
PROFILE_LEVELS = ".:-=+*#%@"
PROFILE_WIDTH = 64


def _position_lines(loss, count, shift):
    """The per-position block of ``format()``: a few positions' mean loss and an ASCII
    profile of the loss along the sequence (at most ``PROFILE_WIDTH`` buckets)."""
    seq_len = len(count)
    note = "; targets shifted, the last position has no target" if shift else ""
    lines = [f"  loss by position in the sequence (seq_len {seq_len:,}{note}):"]
    counted = [p for p in range(seq_len) if count[p] and loss[p] is not None]
    if not counted:
        return lines + ["    (no counted tokens)"]
    if seq_len <= 8:
        shown = counted
    else:
        picks = {0, 1, seq_len // 4, seq_len // 2, 3 * seq_len // 4, counted[-1]}
        shown = [p for p in sorted(picks) if count[p] and loss[p] is not None]
    lines.append("    " + "   ".join(f"pos {p}: {loss[p]:.4f}" for p in shown))
    nb = min(seq_len, PROFILE_WIDTH)
    means = []
    for b in range(nb):
        lo, hi = b * seq_len // nb, (b + 1) * seq_len // nb
        n = sum(count[lo:hi])
        means.append(sum(loss[p] * count[p] for p in range(lo, hi) if count[p]) / n if n else None)
    finite = [m for m in means if m is not None and math.isfinite(m)]
    if finite:
        low, high = min(finite), max(finite)
        top = len(PROFILE_LEVELS) - 1

        def level(m):
            if m is None:
                return " "
            if not math.isfinite(m):
                return "?"
            return PROFILE_LEVELS[round(top * (m - low) / (high - low)) if high > low else 0]

        per = "" if nb == seq_len else f", {seq_len / nb:g} positions per character"
        lines.append(f"    profile [{''.join(level(m) for m in means)}] "
                     f"('{PROFILE_LEVELS[0]}' {low:.3f} to '{PROFILE_LEVELS[-1]}' {high:.3f} nats{per})")
        lines += _legend(low, high, top, seq_len / nb)
    return lines


def _legend(low, high, top, per):
    """The profile's key: the mean loss each level stands for, and what a column is."""
    if high > low:
        scale = "  ".join(f"'{c}' {low + k * (high - low) / top:.3f}"
                          for k, c in enumerate(PROFILE_LEVELS)) + " nats (the nearest level)"
    else:
        scale = f"'{PROFILE_LEVELS[0]}' {low:.3f} nats (every column alike)"
    column = ("a column is one position" if per == 1
              else f"a column is the mean loss of {per:g} positions' counted tokens")
    return [f"    legend: {scale}",
            f"            {column}, position 0 on the left; ' ' no counted token, "
            f"'?' a non-finite mean"]
