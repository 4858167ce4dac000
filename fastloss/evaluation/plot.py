"""PNG plots of loss curves, of an evaluation report and of a model comparison (matplotlib, an optional extra).

matplotlib is imported inside the functions, with the non-interactive "Agg"
backend, so ``import fastloss`` never needs it; without it the functions raise a
RuntimeError that says how to install it.
"""

import math
import os

import numpy as np

from .curves import as_log

INSTALL_HINT = "plotting needs matplotlib: pip install fastloss[plot]"


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or RuntimeError with the install hint."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(f"{INSTALL_HINT} ({e})") from None
    return plt


def _save(fig, plt, path):
    path = os.fspath(path)
    try:
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def plot_curves(log, path, *, vocab=None, baseline=None, baseline_name="baseline", report=None):
    """Draw training and validation loss against step to a PNG file.

    Parameters
    ----------
    log : str, os.PathLike, TrainingLog, dict or list
        A training log, as accepted by :func:`fastloss.evaluation.curves.diagnose`.
    path : str or os.PathLike
        The PNG file to write.
    vocab : int, optional
        Number of classes; draws the uniform baseline ``ln V``.
    baseline : float, optional
        Another reference loss to draw (e.g. the unigram entropy).
    baseline_name : str, default "baseline"
        Its label.
    report : CurveReport, optional
        A diagnosis of the same log; marks its validation minimum when it found
        overfitting.

    Returns
    -------
    str
        ``path``.

    Raises
    ------
    RuntimeError
        matplotlib is not installed (``pip install fastloss[plot]``).
    CurveLogError (a ValueError)
        A bad log.
    """
    log = as_log(log)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    marker = "." if len(log.steps) <= 200 else None
    ax.plot(log.steps, log.train_loss, marker=marker, lw=1.2, label="train loss")
    if len(log.val_steps):
        ax.plot(log.val_steps, log.val_loss, marker="o", ms=3, lw=1.5, label="validation loss")
    if vocab is not None:
        ax.axhline(math.log(vocab), color="grey", ls="--", lw=1,
                   label=f"uniform baseline ln V = {math.log(vocab):.3f}")
    if baseline is not None:
        ax.axhline(baseline, color="tab:red", ls=":", lw=1, label=f"{baseline_name} = {baseline:.3f}")
    if report is not None and report.overfitting:
        ax.axvline(report.val_min_step, color="tab:green", ls="-.", lw=1,
                   label=f"smoothed validation minimum (step {report.val_min_step:,})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"Loss curves: {os.path.basename(log.source)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def _histogram(d, key, name, what):
    """(edges, counts) of the histogram ``d[key]`` (a dict with 'edges' and 'counts'),
    checked; ValueError naming ``name`` otherwise."""
    hist = d.get(key) if isinstance(d, dict) else None
    if not isinstance(hist, dict) or "edges" not in hist or "counts" not in hist:
        raise ValueError(f"{name}: expected {what} with a '{key}' holding 'edges' and 'counts'")
    edges = np.asarray(hist["edges"], dtype=np.float64)
    counts = np.asarray(hist["counts"], dtype=np.float64)
    if edges.ndim != 1 or counts.ndim != 1 or len(edges) != len(counts) + 1 or len(counts) == 0:
        raise ValueError(f"{name}: {key} needs len(edges) == len(counts) + 1 >= 2, "
                         f"found {edges.size} edges and {counts.size} counts")
    return edges, counts


def _figure(edges, counts, ncols):
    """(pyplot, figure, axes): a row of ``ncols`` panels, the histogram drawn in the first."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    axes[0, 0].stairs(counts, edges, fill=True, alpha=0.6, label="tokens")
    return plt, fig, axes


def plot_report(report_dict, path):
    """Draw an evaluation report's loss histogram (and loss per position) to a PNG file.

    Parameters
    ----------
    report_dict : dict
        ``EvalReport.to_dict()``: uses ``loss_histogram`` (``edges``, ``counts``),
        ``mean_loss``, ``uniform_baseline``, ``unigram_baseline`` (named by
        ``unigram_source``) and ``loss_max``, and, when
        present and not None, ``per_position_loss`` (mean loss at each position of
        the sequence; None entries are positions without counted tokens).
    path : str or os.PathLike
        The PNG file to write.

    Returns
    -------
    str
        ``path``.

    Raises
    ------
    RuntimeError
        matplotlib is not installed (``pip install fastloss[plot]``).
    ValueError
        ``report_dict`` has no usable ``loss_histogram``.
    """
    edges, counts = _histogram(report_dict, "loss_histogram", "report_dict",
                               "EvalReport.to_dict()")
    per_pos = report_dict.get("per_position_loss")
    plt, fig, axes = _figure(edges, counts, 2 if per_pos else 1)
    ax = axes[0, 0]
    unigram = f"unigram baseline ({report_dict.get('unigram_source') or 'evaluated tokens'})"
    for key, style, name in (("mean_loss", "-", "mean loss"),
                             ("unigram_baseline", ":", unigram),
                             ("uniform_baseline", "--", "uniform baseline ln V")):
        v = report_dict.get(key)
        if v is not None and math.isfinite(v):
            ax.axvline(v, ls=style, lw=1.2, color="k" if key == "mean_loss" else "grey",
                       label=f"{name} = {v:.3f}")
    loss_max = report_dict.get("loss_max")
    overflow = loss_max is not None and math.isfinite(loss_max) and loss_max > edges[-1]
    ax.set_xlabel("per-token loss (nats)" + (f"; the last bin holds every loss ≥ {edges[-2]:.2f} "
                                              f"(max {loss_max:.2f})" if overflow else ""))
    ax.set_ylabel("tokens")
    ax.set_title("Loss histogram")
    ax.legend(fontsize=8)
    if per_pos:
        y = np.array([np.nan if v is None else float(v) for v in per_pos])
        ax2 = axes[0, 1]
        ax2.plot(np.arange(len(y)), y, lw=1.2)
        ax2.set_xlabel("position in sequence")
        ax2.set_ylabel("mean loss (nats)")
        ax2.set_title("Mean loss per position")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_compare(report, path):
    """Draw a comparison's KL histogram (and mean KL per position) to a PNG file.

    Parameters
    ----------
    report : CompareReport or dict
        ``fastloss.compare``'s report or its ``to_dict()``: uses ``kl_histogram``
        (``edges``, ``counts``, ``below``), ``mean_kl``, ``kl_percentiles`` and, when
        present and not None, ``per_position_kl``.
    path : str or os.PathLike
        The PNG file to write.

    Returns
    -------
    str
        ``path``.

    Raises
    ------
    RuntimeError
        matplotlib is not installed (``pip install fastloss[plot]``).
    ValueError
        ``report`` has no usable ``kl_histogram``.
    """
    d = report.to_dict() if hasattr(report, "to_dict") else report
    edges, counts = _histogram(d, "kl_histogram", "report", "a CompareReport (or its to_dict())")
    per_pos = d.get("per_position_kl")
    plt, fig, axes = _figure(edges, counts, 2 if per_pos else 1)
    ax = axes[0, 0]
    ax.set_xscale("log")
    mean = d.get("mean_kl")
    if mean is not None and mean > 0:
        ax.axvline(mean, color="k", lw=1.2, label=f"mean KL = {mean:.3g}")
    pct = d.get("kl_percentiles") or {}
    for key, style in (("50", ":"), ("99", "--")):
        v = pct.get(key)
        if v is not None and v > 0:
            ax.axvline(v, color="grey", ls=style, lw=1, label=f"{key}th percentile = {v:.3g}")
    below = int(d["kl_histogram"].get("below") or 0)
    ax.set_xlabel("per-token KL(base || model), nats"
                  + (f"; {below:,} tokens below {edges[0]:g} not shown" if below else ""))
    ax.set_ylabel("tokens")
    ax.set_title("KL divergence histogram")
    ax.legend(fontsize=8)
    if per_pos:
        y = np.array([np.nan if v is None else float(v) for v in per_pos])
        ax2 = axes[0, 1]
        ax2.plot(np.arange(len(y)), y, lw=1.2)
        ax2.set_xlabel("position in sequence")
        ax2.set_ylabel("mean KL (nats)")
        ax2.set_title("Mean KL per position")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, path)
