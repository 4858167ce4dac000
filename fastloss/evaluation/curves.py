"""Training-curve diagnosis: read a loss log and say what its curves show.

A log is a CSV file (a header row naming ``step``, ``train_loss`` and optionally
``val_loss``; other columns are ignored and an empty cell is a missing value) or
JSON lines (one object per line with those keys; ``loss`` is accepted for
``train_loss`` and ``eval_loss`` / ``valid_loss`` for ``val_loss``; ``null`` is
missing). A JSON document holding a list of such objects, or an object with a
``log_history`` list (Hugging Face's ``trainer_state.json``), is read too.

:func:`diagnose` answers four questions, each with the numbers behind the answer:

* **still improving, converged or undetermined**: the least-squares slope of the
  training loss over the last ``window`` points, with its standard error; converged
  only when the slope's ~95% interval rules out a change of more than 1% of the loss
  across the window;
* **overfitting**: has the validation loss risen since its minimum by more than
  its own noise, while the training loss kept falling;
* **underfitting**: is the training loss still near a baseline (``ln V``, the
  loss of uniform guessing over ``V`` classes, or one you give);
* the final training and validation losses and the gap between them (validation
  minus training at the last validation step).
"""

import array
import codecs
import csv
import dataclasses
import json
import math
import os

import numpy as np

from .._io import json_safe

#: Column / key names read as the training loss, in order of preference.
TRAIN_KEYS = ("train_loss", "loss")
#: Column / key names read as the validation loss, in order of preference.
VAL_KEYS = ("val_loss", "eval_loss", "valid_loss")

#: A slope is significant beyond this many standard errors.
SLOPE_SIGMAS = 2.0
#: A validation rise is significant beyond this many standard errors of the noise.
RISE_SIGMAS = 3.0
#: Changes smaller than this fraction of the loss level count as none at all
#: (guards noise-free logs, whose standard errors are zero).
REL_TOL = 1e-3
#: "Converged" needs the slope's ~95% interval (``SLOPE_SIGMAS`` standard errors) to
#: allow no change across the window larger than this fraction of the loss level;
#: a wider interval leaves the trend "undetermined".
CONVERGED_TOL = 1e-2
#: Underfitting: the training loss is still within this fraction of the way from
#: the baseline down to zero loss.
UNDERFIT_FRAC = 0.10
#: Fewest validation points for the overfitting check.
MIN_VAL_POINTS = 5


class CurveLogError(ValueError):
    """A bad training log; ``source`` names the file (or object) and ``problem`` what is wrong."""

    def __init__(self, source, problem):
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


@dataclasses.dataclass(frozen=True)
class TrainingLog:
    """Loss curves read from a log: training points and (possibly sparser) validation points.

    Steps are float64 and strictly increasing within each curve.
    """

    steps: np.ndarray
    train_loss: np.ndarray
    val_steps: np.ndarray
    val_loss: np.ndarray
    source: str = "<log>"


# --------------------------------------------------------------------------- reading


def _number(value, key, where, source):
    """A finite float from a CSV cell or JSON value; None for a missing value."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            x = float(text)
        except ValueError:
            raise CurveLogError(source, f"{where}: {key} is {value!r}, expected a number") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise CurveLogError(source, f"{where}: {key} is {value!r}, expected a number")
    else:
        x = float(value)
    if not math.isfinite(x):
        raise CurveLogError(source, f"{where}: {key} is {x}, expected a finite number"
                                    + (" (did training diverge?)" if key != "step" else ""))
    return x


def _pick(record, keys):
    """(key, value) of the first of ``keys`` present with a non-missing value, else (keys[0], None)."""
    for k in keys:
        v = record.get(k)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            return k, v
    return keys[0], None


def _build(records, source):
    """A TrainingLog from ``(where, mapping)`` records, with every check of the log format."""
    steps, train, vsteps, val = (array.array("d") for _ in range(4))
    last_step, last_where = None, None
    for where, rec in records:
        tkey, tval = _pick(rec, TRAIN_KEYS)
        vkey, vval = _pick(rec, VAL_KEYS)
        t = _number(tval, tkey, where, source)
        v = _number(vval, vkey, where, source)
        s = _number(rec.get("step"), "step", where, source)
        if t is None and v is None:
            continue  # a row of other metrics (or a summary line)
        if s is None:
            raise CurveLogError(source, f"{where}: has a {tkey if t is not None else vkey} value "
                                        f"but no step")
        if last_step is not None and s < last_step:
            raise CurveLogError(source, f"{where}: step {s:g} is less than step {last_step:g} "
                                        f"({last_where}); steps must increase (a restarted or "
                                        f"concatenated run?)")
        for value, xs, ys, name in ((t, steps, train, tkey), (v, vsteps, val, vkey)):
            if value is None:
                continue
            if xs and s <= xs[-1]:
                raise CurveLogError(source, f"{where}: step {s:g} repeats a step that already has "
                                            f"a {name}; steps must increase")
            xs.append(s)
            ys.append(value)
        last_step, last_where = s, where
    if len(steps) < 2:
        raise CurveLogError(source, f"{len(steps)} train_loss point(s); need at least 2")
    f64 = np.float64
    return TrainingLog(*(np.frombuffer(a, f64) for a in (steps, train, vsteps, val)),
                       source)  # views of the arrays' buffers: no copy


def _csv_records(lines, source):
    """``(where, record)`` pairs from CSV ``lines`` (an iterable of lines), read lazily.

    Each record holds just the step and loss columns.
    """
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        raise CurveLogError(source, "empty file") from None
    except csv.Error as e:
        raise CurveLogError(source, f"line 1: not valid CSV ({e})") from None
    names = [h.strip() for h in header]
    missing = [n for n, alts in (("step", ("step",)), ("train_loss", TRAIN_KEYS))
               if not any(a in names for a in alts)]
    if missing:
        shown = ", ".join(repr(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")
        raise CurveLogError(source, f"no {' or '.join(repr(m) for m in missing)} column in the "
                                    f"CSV header (found {shown}); expected step, train_loss "
                                    f"and optionally val_loss")
    # A repeated column name keeps its last cell (as dict(zip(names, row)) would).
    wanted = {k: i for i, k in enumerate(names) if k in ("step", *TRAIN_KEYS, *VAL_KEYS)}
    wanted = list(wanted.items())
    ncols = len(names)

    try:
        for row in reader:
            if len(row) > ncols:
                if not any(cell.strip() for cell in row):
                    continue
                raise CurveLogError(source, f"line {reader.line_num}: {len(row)} cells but the "
                                            f"header names {ncols} columns")
            nrow = len(row)
            yield f"line {reader.line_num}", {k: row[i] for k, i in wanted if i < nrow}
    except csv.Error as e:
        raise CurveLogError(source, f"line {reader.line_num}: not valid CSV ({e})") from None


def _json_records(text, source):
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise CurveLogError(source, "empty file")
    try:
        whole = json.loads(text)  # one document: a list of records, or trainer_state.json
    except ValueError:
        whole = None
    except RecursionError:
        raise CurveLogError(source, "JSON nested too deeply to read") from None
    if isinstance(whole, list) or (isinstance(whole, dict) and "log_history" in whole):
        items = whole.get("log_history") if isinstance(whole, dict) else whole
        if not isinstance(items, list):
            raise CurveLogError(source, "a JSON document that is neither a list of objects nor "
                                        "an object with a 'log_history' list")
        records = [(f"record {i + 1}", item) for i, item in enumerate(items)]
    else:  # JSON lines
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append((f"line {i + 1}", json.loads(line)))
            except RecursionError:
                raise CurveLogError(source, f"line {i + 1}: JSON nested too deeply to "
                                            f"read") from None
            except ValueError as e:
                raise CurveLogError(source, f"line {i + 1}: not valid JSON ({e.args[0]})") from None
    for where, item in records:
        if not isinstance(item, dict):
            raise CurveLogError(source, f"{where}: expected a JSON object, found "
                                        f"{type(item).__name__}")
    keys = set().union(*(item.keys() for _, item in records)) if records else set()
    missing = [n for n, alts in (("step", ("step",)), ("train_loss", TRAIN_KEYS))
               if not keys.intersection(alts)]
    if missing:
        shown = ", ".join(repr(k) for k in sorted(keys)[:12]) + (", ..." if len(keys) > 12 else "")
        raise CurveLogError(source, f"no {' or '.join(repr(m) for m in missing)} key in any "
                                    f"record (found {shown or 'none'}); expected step, "
                                    f"train_loss (or loss) and optionally val_loss")
    return records


def read_log(path):
    """Read a training log file (CSV or JSON lines).

    Parameters
    ----------
    path : str or os.PathLike
        A ``.csv`` file, or a ``.jsonl`` / ``.ndjson`` / ``.json`` file; any other
        name is read as JSON when its first non-blank character is ``{`` or ``[``,
        else as CSV.

    Returns
    -------
    TrainingLog

    Raises
    ------
    CurveLogError (a ValueError)
        Missing or unreadable file, no ``step`` or ``train_loss`` column, a
        non-numeric or non-finite value, fewer than 2 training points, or steps
        that do not increase; the message starts with the file name.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "log.csv")
    >>> with open(path, "w") as f:
    ...     _ = f.write("step,train_loss,val_loss\\n0,4.6,\\n100,3.1,3.2\\n200,2.5,2.7\\n")
    >>> log = read_log(path)
    >>> log.steps.tolist(), log.val_loss.tolist()
    ([0.0, 100.0, 200.0], [3.2, 2.7])
    """
    source = os.fspath(path)
    ext = os.path.splitext(source)[1].lower()
    try:
        _check_utf8(source)
        with open(source, encoding="utf-8", newline="") as f:
            if ext in (".jsonl", ".ndjson", ".json"):
                as_json = True
            elif ext == ".csv":
                as_json = False
            else:
                as_json = _first_char(f) in ("{", "[")
                f.seek(0)
            if as_json:
                return _build(_json_records(f.read().removeprefix("\ufeff"), source), source)
            return _build(_csv_records(_skip_bom(f), source), source)
    except FileNotFoundError:
        raise CurveLogError(source, "no such file") from None
    except IsADirectoryError:
        raise CurveLogError(source, "is a directory, expected a CSV or JSON-lines log") from None
    except PermissionError:
        raise CurveLogError(source, "permission denied") from None
    except OSError as e:
        raise CurveLogError(source, f"cannot read: {e.strerror or e}") from None


def _check_utf8(source, chunk=1 << 20):
    """Raise CurveLogError unless the file is UTF-8 text (read in chunks, nothing kept)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    with open(source, "rb") as f:
        while True:
            data = f.read(chunk)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                # e.start counts from the start of the bytes the decoder held: any
                # bytes of an incomplete character left over from the last chunk, then data.
                held = len(e.object) - len(data)
                raise CurveLogError(source, f"not a UTF-8 text file "
                                            f"(byte {done - held + e.start})") from None
            if not data:
                return
            done += len(data)


def _first_char(f, chunk=1 << 16):
    """The first non-whitespace character of text file ``f`` ("" if none), skipping a BOM."""
    first = True
    while True:
        text = f.read(chunk)
        if not text:
            return ""
        if first:
            text, first = text.removeprefix("\ufeff"), False
        text = text.lstrip()
        if text:
            return text[0]


def _skip_bom(f):
    """The lines of text file ``f``, a leading byte-order mark removed."""
    line = f.readline().removeprefix("\ufeff")
    if line:
        yield line
        yield from f


def as_log(log):
    """A :class:`TrainingLog` from a path, a TrainingLog, a dict of columns or a list of records.

    Parameters
    ----------
    log : str, os.PathLike, TrainingLog, dict or list
        A path is read with :func:`read_log`. A dict of columns maps ``step``,
        ``train_loss`` and optionally ``val_loss`` to equal-length sequences
        (``None`` or NaN for a missing validation value); a list of records holds
        one dict per logged step, as in a JSON-lines file.

    Returns
    -------
    TrainingLog

    Raises
    ------
    CurveLogError (a ValueError)
        As :func:`read_log` (the source is named ``<log>`` for in-memory logs).
    TypeError
        ``log`` of another type.

    Examples
    --------
    >>> log = as_log({"step": [0, 10, 20], "train_loss": [3.0, 2.0, 1.5],
    ...               "val_loss": [3.1, None, 1.9]})
    >>> log.val_steps.tolist()
    [0.0, 20.0]
    """
    if isinstance(log, TrainingLog):
        return log
    if isinstance(log, (str, os.PathLike)):
        return read_log(log)
    source = "<log>"
    if isinstance(log, dict):
        cols = {k: list(np.asarray(v, dtype=object).ravel()) for k, v in log.items()}
        lengths = {k: len(v) for k, v in cols.items()}
        if len(set(lengths.values())) > 1:
            raise CurveLogError(source, f"columns of different lengths: {lengths}")
        n = next(iter(lengths.values()), 0)
        records = []
        for i in range(n):
            rec = {}
            for k, v in cols.items():
                x = v[i]
                if isinstance(x, (float, np.floating)) and math.isnan(x) and k in VAL_KEYS:
                    x = None  # NaN marks a step without a validation value
                rec[k] = x
            records.append((f"row {i}", rec))
    elif isinstance(log, (list, tuple)):
        records = [(f"record {i + 1}", r) for i, r in enumerate(log)]
        for where, r in records:
            if not isinstance(r, dict):
                raise CurveLogError(source, f"{where}: expected a dict, found {type(r).__name__}")
    else:
        raise TypeError(f"log: expected a path, a TrainingLog, a dict of columns or a list of "
                        f"records, found {type(log).__name__}")
    keys = set().union(*(r.keys() for _, r in records)) if records else set()
    if "step" not in keys or not keys.intersection(TRAIN_KEYS):
        raise CurveLogError(source, f"no 'step' and 'train_loss' (or 'loss') values (found keys "
                                    f"{sorted(keys)})")
    return _build(records, source)


# --------------------------------------------------------------------------- statistics


def _fit_line(x, y):
    """Least-squares line: (slope, its standard error, fitted value at x[-1]).

    slope = sum (x - xm)(y - ym) / Sxx, se = sqrt(RSS / (n - 2) / Sxx).
    """
    xm, ym = x.mean(), y.mean()
    dx = x - xm
    sxx = float(dx @ dx)
    slope = float(dx @ (y - ym)) / sxx
    resid = y - (ym + slope * dx)
    se = math.sqrt(float(resid @ resid) / (len(x) - 2) / sxx) if len(x) > 2 else math.nan
    return slope, se, float(ym + slope * dx[-1])


def _trend(x, y, window):
    """Trend of the last ``window`` points: a dict with the verdict and its numbers.

    ``limit`` is the largest change of the loss across the window that a slope within
    ``SLOPE_SIGMAS`` standard errors of the fit allows, ``(|b| + 2 se) * span``;
    ``level`` the window's mean loss.
    """
    k = min(window, len(x))
    xs, ys = x[-k:], y[-k:]
    slope, se, _ = _fit_line(xs, ys)
    span = float(xs[-1] - xs[0])
    change = slope * span  # fitted change of the loss across the window
    level = max(abs(float(ys.mean())), 1e-12)
    limit = (abs(slope) + SLOPE_SIGMAS * se) * span
    if k < 3:
        verdict = "undetermined"
    elif slope < -SLOPE_SIGMAS * se and -change > REL_TOL * level:
        verdict = "still improving"
    elif slope > SLOPE_SIGMAS * se and change > REL_TOL * level:
        verdict = "rising"
    elif limit <= CONVERGED_TOL * level:
        verdict = "converged"
    else:
        verdict = "undetermined"
    return {"verdict": verdict, "points": k, "start": float(xs[0]), "end": float(xs[-1]),
            "slope": 1000.0 * slope, "se": 1000.0 * se, "change": change,
            "limit": limit if k >= 3 else math.nan, "level": float(ys.mean())}


def _noise(y):
    """Robust noise level of a curve from its second differences (blind to a linear trend).

    For white noise of standard deviation sigma, ``d2 = y[i+1] - 2 y[i] + y[i-1]`` has
    variance ``6 sigma^2``; sigma = 1.4826 MAD(d2) / sqrt 6.
    """
    d = np.diff(y, 2)
    if len(d) == 0:
        return 0.0
    sigma = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(6.0)
    if sigma == 0.0:  # too few or too regular differences: fall back to their spread
        sigma = float(np.std(d)) / math.sqrt(6.0)
    return sigma


def _smooth(y, half):
    """Centred moving average of half-width ``half`` (fewer points at the ends) and the counts."""
    n = len(y)
    c = np.concatenate(([0.0], np.cumsum(y)))
    lo = np.maximum(np.arange(n) - half, 0)
    hi = np.minimum(np.arange(n) + half + 1, n)
    return (c[hi] - c[lo]) / (hi - lo), hi - lo


def _overfitting(log):
    """The validation-minimum analysis: a dict, or None with too few validation points."""
    vx, vy = log.val_steps, log.val_loss
    n = len(vy)
    if n < MIN_VAL_POINTS:
        return None
    half = max(1, n // 20)
    smooth, counts = _smooth(vy, half)
    i = int(np.argmin(smooth))
    j = int(np.argmin(vy))
    sigma = _noise(vy)
    out = {"min_step": float(vx[i]), "min_loss": float(smooth[i]), "noise": sigma,
           "raw_min_step": float(vx[j]), "raw_min_loss": float(vy[j]), "smoothing": 2 * half + 1,
           "rise": 0.0, "sigmas": 0.0, "significant": False, "train_change": None,
           "rise_points": 0, "rise_start": None}
    after = n - 1 - i
    if after == 0:
        return out
    m = min(2 * half + 1, after)
    out.update(rise_points=m, rise_start=float(vx[-m]))
    rise = float(vy[-m:].mean() - smooth[i])
    se = sigma * math.sqrt(1.0 / m + 1.0 / counts[i])
    sigmas = rise / se if se > 0 else (math.inf if rise > 0 else 0.0)
    # The training loss over the same steps: its fitted change from the minimum to the end.
    tx, ty = log.steps, log.train_loss
    sel = tx >= vx[i]
    if np.count_nonzero(sel) >= 3:
        slope, _, _ = _fit_line(tx[sel], ty[sel])
        train_change = slope * float(tx[sel][-1] - vx[i])
    else:
        train_change = float(ty[-1] - np.interp(vx[i], tx, ty))
    out.update(rise=rise, sigmas=float(sigmas), train_change=train_change,
               significant=bool(sigmas > RISE_SIGMAS and rise > REL_TOL * abs(smooth[i])))
    return out


# --------------------------------------------------------------------------- report


def _step(x):
    """An integral step as int (for printing and JSON), else the float."""
    if x is None:
        return None
    return int(x) if float(x).is_integer() else float(x)


def _gap_how(a, b, step):
    """How the training loss at validation ``step`` was read from training steps ``a``, ``b``
    around it (None when logged at ``step`` itself)."""
    if a == b == step:
        return None
    if a == b:
        return f"training taken from step {a:,}, the nearest logged"
    return f"training interpolated between its logged steps {a:,} and {b:,}"


def _last_points(m, start, end):
    """What a mean over the last ``m`` validation points (steps ``start``-``end``) is."""
    if m == 1:
        return f"the last validation point (step {_step(end):,})"
    return f"the mean of the last {m} validation points (steps {_step(start):,}-{_step(end):,})"


@dataclasses.dataclass
class CurveReport:
    """What a training log's loss curves show.

    Slopes are in loss units per 1000 steps; ``*_se`` their standard errors.
    ``trend`` is ``"still improving"`` (slope below ``-2 se``), ``"rising"`` (above
    ``+2 se``), ``"converged"`` (neither, and ``train_change_limit``, the largest
    change across the window that a slope within ``2 se`` allows, is at most
    ``converged_tolerance`` (1%) of the loss) or ``"undetermined"`` (neither, with a
    wider interval; or fewer than 3 points). ``overfitting`` and ``underfitting`` are
    None when they cannot be judged (too few validation points; no baseline).

    ``generalization_gap`` is the validation loss minus the training loss at the same
    step, ``gap_step`` (the last validation step); ``gap_train_loss`` is the training
    loss there, interpolated linearly between the logged training steps
    ``gap_train_steps`` around it when ``gap_train_interpolated`` (the nearest logged
    value beyond the training steps). ``val_min_loss`` / ``val_min_step`` are the minimum of
    the smoothed validation curve (a centred moving average of ``val_smoothing``
    points), ``val_min_raw_loss`` / ``val_min_raw_step`` the minimum of the logged
    values; ``val_rise`` is the mean of the last ``val_rise_points`` validation points
    (from step ``val_rise_start_step``) minus the smoothed minimum.
    """

    source: str
    points: int
    val_points: int
    first_step: float
    last_step: float
    final_train_loss: float
    final_val_loss: float | None
    generalization_gap: float | None
    window: int
    window_start_step: float
    window_end_step: float
    trend: str
    train_slope: float
    train_slope_se: float
    val_trend: str | None = None
    val_slope: float | None = None
    val_slope_se: float | None = None
    overfitting: bool | None = None
    val_min_step: float | None = None
    val_min_loss: float | None = None
    val_rise: float | None = None
    val_noise: float | None = None
    underfitting: bool | None = None
    baselines: dict = dataclasses.field(default_factory=dict)
    findings: list = dataclasses.field(default_factory=list)
    train_change_limit: float | None = None
    converged_tolerance: float = CONVERGED_TOL
    gap_step: float | None = None
    gap_train_loss: float | None = None
    gap_train_interpolated: bool | None = None
    gap_train_steps: list | None = None
    val_min_raw_step: float | None = None
    val_min_raw_loss: float | None = None
    val_smoothing: int | None = None
    val_rise_points: int | None = None
    val_rise_start_step: float | None = None

    def to_dict(self):
        """A JSON-ready dict whose keys are the field names (non-finite floats become None)."""
        return json_safe(dataclasses.asdict(self))

    def format(self):
        """The findings as readable text, numbers first."""
        def num(v, fmt="{:.4f}"):
            return "n/a" if v is None else fmt.format(v)

        lines = [f"fastloss curves: {self.source}: {self.points} training points (steps "
                 f"{self.first_step:,}-{self.last_step:,}), {self.val_points} validation points"]
        rows = [("final train loss", f"{num(self.final_train_loss)} (step {self.last_step:,})")]
        if self.final_val_loss is not None:
            rows.append(("final val loss", f"{num(self.final_val_loss)} (step {self.gap_step:,})"))
            how = _gap_how(*self.gap_train_steps, self.gap_step) or "both logged there"
            rows.append(("val - train gap", f"{num(self.generalization_gap, '{:+.4f}')}: validation "
                                            f"minus training loss ({num(self.gap_train_loss)}) at "
                                            f"step {self.gap_step:,}, {how}"))
        limit = ""
        if self.train_change_limit is not None:
            limit = (f"; ±{SLOPE_SIGMAS:g} se allow a change of up to "
                     f"{self.train_change_limit:.3g} across them")
        rows.append(("train trend", f"{self.trend}: slope {self.train_slope:+.4g} ± "
                                    f"{num(self.train_slope_se, '{:.2g}')} per 1000 steps "
                                    f"(last {self.window} points, steps {self.window_start_step:,}-"
                                    f"{self.window_end_step:,}{limit})"))
        if self.val_trend is not None:
            rows.append(("val trend", f"{self.val_trend}: slope {self.val_slope:+.4g} ± "
                                      f"{num(self.val_slope_se, '{:.2g}')} per 1000 steps"))
        if self.val_min_step is not None:
            rows.append(("val minimum", f"{self.val_min_raw_loss:.4f} at step "
                                        f"{self.val_min_raw_step:,} (logged value); smoothed "
                                        f"(moving average of {self.val_smoothing} points) "
                                        f"{self.val_min_loss:.4f} at step {self.val_min_step:,}"))
            if self.val_rise_points:
                last = _last_points(self.val_rise_points, self.val_rise_start_step, self.gap_step)
                rows.append(("val rise", f"{self.val_rise:+.4f}: {last} minus the smoothed "
                                         f"minimum; noise {self.val_noise:.2g}"))
            else:
                rows.append(("val rise", f"none: the smoothed minimum is at the last point; "
                                         f"noise {self.val_noise:.2g}"))
        for name, value in self.baselines.items():
            key, paren, note = name.partition(" (")  # "unigram baseline (counts from ...)"
            rows.append((key, f"{value:.4f}" + (f" ({note}" if paren else "")))
        width = max(len(k) for k, _ in rows)
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        lines += [f"  - {f}" for f in self.findings]
        return "\n".join(lines) + "\n"

    __str__ = format


def diagnose(log_or_path, *, window=None, baseline=None, vocab=None, baseline_name="baseline"):
    """Diagnose a training run from its loss curves.

    Parameters
    ----------
    log_or_path : str, os.PathLike, TrainingLog, dict or list
        A log file (CSV or JSON lines, see :func:`read_log`), or the curves
        themselves (see :func:`as_log`).
    window : int, optional
        Training points at the end of the run whose trend decides "still
        improving", "converged" or "undetermined"; default the last 20% of the points, at
        least 5 (all of them in a shorter log). At least 3.
    baseline : float, optional
        A reference loss to compare against, e.g. the unigram entropy of the data.
    vocab : int, optional
        Number of classes ``V``; adds the uniform baseline ``ln V``.
    baseline_name : str, default "baseline"
        What to call ``baseline`` in the report.

    Returns
    -------
    CurveReport

    Raises
    ------
    CurveLogError (a ValueError)
        A bad log (the message starts with the file name).
    ValueError, TypeError
        Bad ``window``, ``baseline`` or ``vocab``.

    Notes
    -----
    *Trend*: over the window's ``n`` points ``(s_i, y_i)`` the least-squares slope
    is ``b = sum (s_i - s̄)(y_i - ȳ) / S``, ``S = sum (s_i - s̄)^2``, with standard
    error ``se = sqrt(sum r_i^2 / (n - 2) / S)``, ``r`` the residuals. The run is
    still improving when ``b < -2 se`` and the fitted fall across the window
    exceeds 0.1% of the loss (a floor for noise-free logs); rising when
    ``b > +2 se`` likewise. Otherwise it is converged when every slope within
    ``2 se`` of ``b`` changes the loss across the window (``span``, its first to
    last step) by at most 1% of the window's mean loss ``L``:
    ``(|b| + 2 se) span <= 0.01 L``; else undetermined (the data cannot tell a
    plateau from a slow fall). Noise that is correlated from step to step
    (smoothed logs) makes ``se`` an underestimate.

    *Overfitting*: the validation curve is smoothed with a centred moving average
    (half-width ``h = max(1, n_val // 20)``); at its minimum the smoothed value is
    compared with the mean of the last ``2 h + 1`` points; the rise is significant beyond
    ``3 sigma sqrt(1/m + 1/c)`` (``m``, ``c`` the points in the two means).
    The validation noise ``sigma`` is ``1.4826 MAD(d2) / sqrt 6`` over the second
    differences ``d2`` of the validation curve (blind to a linear trend).
    Overfitting is a significant rise while the training loss fell over the same
    steps. Needs at least 5 validation points.

    *Underfitting*: the mean training loss over the window is above
    ``(1 - 0.1) b`` for a baseline ``b``: the run has covered less than 10% of the
    way from the baseline to zero loss.

    Examples
    --------
    >>> import numpy as np
    >>> steps = np.arange(0, 5000, 50)
    >>> train = 1.0 + 3.0 * np.exp(-steps / 800)
    >>> r = diagnose({"step": steps, "train_loss": train}, vocab=100)
    >>> r.trend, r.underfitting, round(r.final_train_loss, 3)
    ('still improving', False, 1.006)
    """
    log = as_log(log_or_path)
    n = len(log.steps)
    if window is None:
        window = max(5, math.ceil(0.2 * n))
    elif isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 3:
        raise ValueError(f"window: expected an integer >= 3, found {window!r}")
    window = min(int(window), n)
    baselines = {}
    if vocab is not None:
        if isinstance(vocab, bool) or not isinstance(vocab, (int, np.integer)) or vocab < 2:
            raise ValueError(f"vocab: expected an integer >= 2, found {vocab!r}")
        baselines["uniform baseline ln V"] = math.log(int(vocab))
    if baseline is not None:
        if isinstance(baseline, bool) or not isinstance(baseline, (int, float, np.integer, np.floating)):
            raise TypeError(f"baseline: expected a number, found {type(baseline).__name__}")
        if not math.isfinite(baseline) or baseline <= 0:
            raise ValueError(f"baseline: expected a positive finite loss, found {baseline!r}")
        baselines[str(baseline_name)] = float(baseline)

    tr = _trend(log.steps, log.train_loss, window)
    findings = []
    span = f"the last {tr['points']} points (steps {_step(tr['start']):,}-{_step(tr['end']):,})"
    pm = f"{tr['slope']:+.4g} ± {tr['se']:.2g} per 1000 steps"
    by = f"{abs(tr['slope']):.4g} ± {tr['se']:.2g} per 1000 steps"
    if tr["verdict"] == "still improving":
        findings.append(f"Still improving: the training loss falls by {by} over {span}; "
                        f"more steps should lower it further.")
    elif tr["verdict"] == "rising":
        findings.append(f"Rising: the training loss grows by {by} over {span} (divergence, or "
                        f"a learning rate too high?).")
    elif tr["points"] < 3:
        findings.append("Too few points to tell whether the training loss still falls.")
    else:
        limit = (f"{tr['limit']:.3g} ({tr['limit'] / max(abs(tr['level']), 1e-12):.2%} of the "
                 f"loss)")
        if tr["verdict"] == "converged":
            findings.append(f"Converged: the training-loss slope {pm} over {span} allows, within "
                            f"{SLOPE_SIGMAS:g} standard errors, a change of at most {limit} "
                            f"across those steps: within the {CONVERGED_TOL:.0%} tolerance "
                            f"(a plateau).")
        else:
            findings.append(f"Undetermined: the training-loss slope {pm} over {span} is not "
                            f"clearly falling, but within {SLOPE_SIGMAS:g} standard errors it "
                            f"allows a change of up to {limit} across those steps, more than "
                            f"the {CONVERGED_TOL:.0%} tolerance for 'converged'; more points "
                            f"(a longer --window) or less noise would tell.")

    rep = dict(source=log.source, points=n, val_points=len(log.val_steps),
               first_step=_step(log.steps[0]), last_step=_step(log.steps[-1]),
               final_train_loss=float(log.train_loss[-1]), final_val_loss=None,
               generalization_gap=None, window=tr["points"],
               window_start_step=_step(tr["start"]), window_end_step=_step(tr["end"]),
               trend=tr["verdict"], train_slope=tr["slope"], train_slope_se=tr["se"],
               train_change_limit=None if math.isnan(tr["limit"]) else tr["limit"],
               baselines=baselines, findings=findings)

    if len(log.val_steps):
        final_val = float(log.val_loss[-1])
        gap_step = float(log.val_steps[-1])
        train_there = float(np.interp(gap_step, log.steps, log.train_loss))
        gap = final_val - train_there
        k = int(np.searchsorted(log.steps, gap_step))  # log.steps[k - 1] < gap_step <= log.steps[k]
        if k < len(log.steps) and log.steps[k] == gap_step:
            around = (gap_step, gap_step)
        else:
            around = (log.steps[max(k - 1, 0)], log.steps[min(k, len(log.steps) - 1)])
        rep.update(final_val_loss=final_val, generalization_gap=gap, gap_step=_step(gap_step),
                   gap_train_loss=train_there, gap_train_interpolated=around[0] != around[1],
                   gap_train_steps=[_step(around[0]), _step(around[1])])
        if len(log.val_steps) >= 3:
            vt = _trend(log.val_steps, log.val_loss, max(5, math.ceil(0.2 * len(log.val_steps))))
            rep.update(val_trend=vt["verdict"], val_slope=vt["slope"], val_slope_se=vt["se"])
        of = _overfitting(log)
        if of is None:
            findings.append(f"Overfitting not judged: {len(log.val_steps)} validation point(s), "
                            f"need at least {MIN_VAL_POINTS}.")
        else:
            rep.update(val_min_step=_step(of["min_step"]), val_min_loss=of["min_loss"],
                       val_rise=of["rise"], val_noise=of["noise"],
                       val_min_raw_step=_step(of["raw_min_step"]), val_min_raw_loss=of["raw_min_loss"],
                       val_smoothing=of["smoothing"], val_rise_points=of["rise_points"],
                       val_rise_start_step=_step(of["rise_start"]))
            where = (f"the smoothed validation minimum {of['min_loss']:.4f} at step "
                     f"{_step(of['min_step']):,}")
            how = (f"moving average of {of['smoothing']} points; lowest logged value "
                   f"{of['raw_min_loss']:.4f} at step {_step(of['raw_min_step']):,}")
            last = (_last_points(of["rise_points"], of["rise_start"], gap_step)
                    if of["rise_points"] else None)
            if of["significant"] and of["train_change"] < 0:
                rep["overfitting"] = True
                findings.append(f"Overfitting: {last} is {of['rise']:.4f} above {where} ({how}), "
                                f"{of['sigmas']:.1f} standard errors of its noise "
                                f"{of['noise']:.2g}, while the training loss fell by "
                                f"{-of['train_change']:.4f}; the checkpoint near step "
                                f"{_step(of['min_step']):,} should generalise best.")
            elif of["significant"]:
                rep["overfitting"] = False
                findings.append(f"Instability: {last} is {of['rise']:.4f} above {where} ({how}), "
                                f"{of['sigmas']:.1f} standard errors, but the training loss did "
                                f"not fall over those steps either: instability rather than "
                                f"overfitting.")
            else:
                rep["overfitting"] = False
                if of["rise"] > 0:
                    findings.append(f"No overfitting: {last} is {of['rise']:.4f} above {where} "
                                    f"({how}), within its noise ({of['sigmas']:.1f} standard "
                                    f"errors).")
                else:
                    findings.append(f"No overfitting: the validation loss is at {where} ({how}).")
        how = _gap_how(*rep["gap_train_steps"], rep["gap_step"])
        at = (f"the training loss {train_there:.4f} at step {_step(gap_step):,}"
              + (f" ({how})" if how else ""))
        if gap > 0:
            findings.append(f"Final validation loss {final_val:.4f} is {gap:.4f} above {at}.")
        else:
            findings.append(f"Final validation loss {final_val:.4f} is {-gap:.4f} below {at} "
                            f"(regularisation such as dropout, or an easier validation set?).")

    if baselines:
        level = float(log.train_loss[-tr["points"]:].mean())
        mean_of = (f"mean of the last {tr['points']} points, steps {_step(tr['start']):,}-"
                   f"{_step(tr['end']):,}")
        under = []
        for name, b in baselines.items():
            closed = (b - level) / b
            if level >= b:
                under.append(True)
                findings.append(f"Underfitting: the training loss ({level:.4f}, {mean_of}) is "
                                f"not below the {name} {b:.4f}.")
            elif closed < UNDERFIT_FRAC:
                under.append(True)
                findings.append(f"Underfitting: the training loss ({level:.4f}, {mean_of}) is "
                                f"still near the {name} {b:.4f}: it "
                                f"has covered only {closed:.1%} of the way to zero loss.")
            else:
                under.append(False)
                findings.append(f"The training loss ({level:.4f}, {mean_of}) is {b - level:.4f} "
                                f"below the {name} {b:.4f}.")
        rep["underfitting"] = any(under)
    return CurveReport(**rep)
