"""``EvalReport``: the numbers of one offline evaluation, as a table or a dict."""

import dataclasses
import math

from .._io import json_safe

LN2 = math.log(2.0)


@dataclasses.dataclass
class EvalReport:
    """Token-level evaluation of a model's logits against targets.

    Every mean is over the ``tokens`` counted tokens (targets not equal to
    ``ignore_index``, and not skipped as invalid); sums are accumulated in float64.
    Losses are in nats. With ``seq_len``, ``per_position_loss[p]`` is the mean loss of
    the counted tokens at position ``p`` of their sequence (None where none is counted)
    and ``per_position_count[p]`` their number. ``gap_closed`` is ``(uniform - loss) / (uniform - unigram)``:
    0 for a model no better than uniform guessing, 1 for one as good as predicting
    target frequencies, above 1 for one that beats that.
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

    def to_dict(self):
        """A JSON-ready dict whose keys are the field names (non-finite floats become None)."""
        return json_safe(dataclasses.asdict(self))

    def format(self):
        """A readable table that also says what the loss means."""
        def num(v, fmt="{:.4f}"):
            return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

        lines = [f"fastloss eval: {self.tokens:,} tokens counted, {self.ignored:,} ignored"
                 + (f", {self.skipped:,} skipped as invalid" if self.skipped else "")
                 + f"; vocabulary {self.vocab:,}"]
        rows = [
            ("mean loss", f"{num(self.mean_loss)} nats/token"),
            ("perplexity", num(self.perplexity, "{:.4g}")),
            ("bits per token", num(self.bits_per_token)),
            ("top-1 accuracy", num(self.accuracy, "{:.2%}")),
            ("top-5 accuracy", num(self.top5_accuracy, "{:.2%}")),
            ("mean entropy", f"{num(self.mean_entropy)} nats (the model's own uncertainty)"),
            ("ECE (15 bins)", f"{num(self.ece)} (top-1 confidence vs accuracy; 0 = calibrated)"),
            ("uniform baseline", f"{num(self.uniform_baseline)} nats = ln V (guessing uniformly)"),
            ("unigram baseline", f"{num(self.unigram_baseline)} nats (predicting target frequencies)"),
        ]
        if self.train_loss is not None:
            rows.append(("train loss", f"{num(self.train_loss)} nats"))
            rows.append(("val - train gap", f"{num(self.generalization_gap, '{:+.4f}')} nats"))
        width = max(len(k) for k, _ in rows)
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        if self.gap_closed is not None and math.isfinite(self.gap_closed):
            verdict = ("better than predicting target frequencies" if self.gap_closed > 1
                       else "between uniform guessing and target frequencies" if self.gap_closed >= 0
                       else "worse than uniform guessing")
            lines.append(f"  The loss closes {self.gap_closed:.1%} of the gap from the uniform to the "
                         f"unigram baseline: {verdict}.")
        h = self.loss_histogram
        if h and sum(h["counts"]):
            lines.append(f"  loss histogram ({len(h['counts'])} bins on [{h['edges'][0]:g}, "
                         f"{h['edges'][-1]:g}] nats; the last also holds larger losses, max {num(self.loss_max)}):")
            peak = max(h["counts"])
            for lo, hi, c in zip(h["edges"][:-1], h["edges"][1:], h["counts"], strict=True):
                if c:
                    bar = "#" * max(1, round(30 * c / peak))
                    lines.append(f"    [{lo:6.2f}, {hi:6.2f})  {c:>10,}  {bar}")
        if self.per_position_count is not None:
            lines += _position_lines(self.per_position_loss, self.per_position_count, self.shift)
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines) + "\n"

    __str__ = format


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
    return lines
