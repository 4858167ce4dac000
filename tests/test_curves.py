"""Training-curve diagnosis (fastloss.evaluation.curves), its plots and ``fastloss curves``."""

import json
import math
import os
import sys

import numpy as np
import pytest
from scipy import stats

from fastloss.cli import main
from fastloss.evaluation.curves import CurveLogError, CurveReport, TrainingLog, as_log, diagnose, read_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_csv(path, steps, train, val=None, extra=True):
    """A CSV log with an extra column before the losses; NaN in ``val`` is an empty cell."""
    with open(path, "w") as f:
        f.write("step,lr,train_loss" + (",val_loss" if val is not None else "") + "\n")
        for i, (s, t) in enumerate(zip(steps, train)):
            row = [f"{s:g}", "0.001", repr(float(t))]
            if val is not None:
                row.append("" if math.isnan(val[i]) else repr(float(val[i])))
            f.write(",".join(row) + "\n")
    return str(path)


def decaying(rng, n=200, every=50, noise=0.02, tau=3000.0):
    s = np.arange(n) * float(every)
    return s, 1.0 + 3.0 * np.exp(-s / tau) + rng.normal(0, noise, n)


def u_shaped(rng, n=200, every=50, val_every=4, minimum=4000.0, noise=0.01):
    """Train falls throughout; validation (every ``val_every`` steps) is a U with its minimum at
    ``minimum``. Returns steps, train, val (NaN where not logged) and the true val curve."""
    s = np.arange(n) * float(every)
    train = 1.0 + 3.0 * np.exp(-s / 2000) + rng.normal(0, noise, n)
    true_val = 1.5 + 0.3 * ((s - minimum) / minimum) ** 2
    val = np.full(n, np.nan)
    val[::val_every] = true_val[::val_every] + rng.normal(0, noise, len(s[::val_every]))
    return s, train, val, true_val


# --------------------------------------------------------------------------- trend


def test_still_improving_slope_matches_linregress(rng):
    s, y = decaying(rng)
    r = diagnose({"step": s, "train_loss": y})
    assert isinstance(r, CurveReport)
    assert r.trend == "still improving"
    assert r.window == 40 and r.window_start_step == 8000 and r.window_end_step == 9950
    ref = stats.linregress(s[-40:], y[-40:])
    assert r.train_slope == pytest.approx(1000 * ref.slope, rel=1e-9)
    assert r.train_slope_se == pytest.approx(1000 * ref.stderr, rel=1e-9)
    assert r.train_slope < -2 * r.train_slope_se
    assert r.final_train_loss == y[-1]
    assert "Still improving" in r.format() and "per 1000 steps" in r.format()


def test_flat_quiet_curve_is_converged(rng):
    s = np.arange(300) * 10.0
    y = 2.0 + rng.normal(0, 0.005, 300)
    r = diagnose({"step": s, "train_loss": y})
    assert r.trend == "converged"
    assert abs(r.train_slope) < 2 * r.train_slope_se
    # the slope's +-2 se interval allows at most 1% of the loss across the window
    span = r.window_end_step - r.window_start_step
    assert r.train_change_limit == pytest.approx((abs(r.train_slope) + 2 * r.train_slope_se)
                                                 * span / 1000)
    assert r.train_change_limit <= 0.01 * 2.0 and r.converged_tolerance == 0.01
    assert r.findings[0].startswith("Converged:") and "within the 1% tolerance" in r.findings[0]


def test_flat_noisy_curve_is_undetermined(rng):
    # Noise 0.05 on a loss of 2 over 60 points: the slope is not significant, but its
    # interval allows a change of ~7 sigma / sqrt(60) = 2.2% of the loss across the window.
    s = np.arange(300) * 10.0
    y = 2.0 + rng.normal(0, 0.05, 300)
    r = diagnose({"step": s, "train_loss": y})
    assert abs(r.train_slope) < 2 * r.train_slope_se
    assert r.trend == "undetermined" and r.train_change_limit > 0.01 * 2.0
    assert r.findings[0].startswith("Undetermined:") and "Converged" not in r.format()
    assert "more than the 1% tolerance for 'converged'" in r.findings[0]
    # the same noise over 5x as many points narrows the interval enough
    long = diagnose({"step": np.arange(6000) * 10.0,
                     "train_loss": 2.0 + rng.normal(0, 0.05, 6000)})
    assert long.trend == "converged"


def test_flat_false_alarm_rate_is_small():
    # A 2-standard-error test on pure noise flags about 2.5% per side; never "converged"
    # here (20 points of noise 2.5% of the loss cannot rule out a 1% change).
    flagged = 0
    for seed in range(40):
        y = 2.0 + np.random.default_rng(seed).normal(0, 0.05, 100)
        trend = diagnose({"step": np.arange(100), "train_loss": y}).trend
        flagged += trend in ("still improving", "rising")
        assert trend != "converged"
    assert flagged <= 6


def test_noise_free_logs():
    s = np.arange(100) * 100.0
    assert diagnose({"step": s, "train_loss": np.full(100, 2.0)}).trend == "converged"
    # exactly exponential: tiny but real slope; the relative floor decides
    assert diagnose({"step": s, "train_loss": 1 + np.exp(-s / 3000)}).trend == "still improving"
    assert diagnose({"step": s, "train_loss": 1 + np.exp(-s / 300)}).trend == "converged"


def test_rising_training_loss(rng):
    s = np.arange(100) * 10.0
    y = 1.0 + s / 2000 + rng.normal(0, 0.01, 100)
    r = diagnose({"step": s, "train_loss": y})
    assert r.trend == "rising" and "Rising" in r.findings[0]


def test_window_option_and_short_logs(rng):
    s, y = decaying(rng, n=30)
    assert diagnose({"step": s, "train_loss": y}).window == 6
    assert diagnose({"step": s, "train_loss": y}, window=12).window == 12
    assert diagnose({"step": s, "train_loss": y}, window=500).window == 30
    r = diagnose({"step": [0, 1], "train_loss": [3.0, 2.0]})
    assert r.trend == "undetermined" and r.window == 2
    short = diagnose({"step": [0, 10, 20, 30], "train_loss": [4.0, 3.0, 2.0, 1.0]})
    assert short.window == 4 and short.trend == "still improving"


# --------------------------------------------------------------------------- overfitting


def test_overfitting_from_the_right_step(rng):
    s, train, val, true_val = u_shaped(rng)
    r = diagnose({"step": s, "train_loss": train, "val_loss": val})
    assert r.overfitting is True
    assert abs(r.val_min_step - 4000) <= 400
    assert r.val_min_loss == pytest.approx(1.5, abs=0.02)
    true_rise = true_val[::4][-5:].mean() - 1.5  # rise to the mean of the last 5 val points
    assert r.val_rise == pytest.approx(true_rise, abs=0.03)
    assert r.val_noise == pytest.approx(0.01, rel=0.5)
    assert r.final_val_loss == val[~np.isnan(val)][-1]
    last_val_step = s[~np.isnan(val)][-1]
    assert r.generalization_gap == pytest.approx(r.final_val_loss - np.interp(last_val_step, s, train))
    text = r.format()
    assert "Overfitting" in text and f"near step {r.val_min_step:,} should generalise best" in text


def test_val_minimum_raw_and_smoothed_and_the_rise_window(rng):
    s, train, val, _ = u_shaped(rng)
    r = diagnose({"step": s, "train_loss": train, "val_loss": val})
    vs, vy = s[~np.isnan(val)], val[~np.isnan(val)]
    assert r.val_min_raw_loss == vy.min() and r.val_min_raw_step == vs[np.argmin(vy)]
    assert r.val_smoothing == 2 * max(1, len(vy) // 20) + 1
    assert r.val_min_loss >= r.val_min_raw_loss  # a mean of points around the raw minimum or so
    m = r.val_rise_points
    assert r.val_rise == pytest.approx(vy[-m:].mean() - r.val_min_loss)
    assert r.val_rise_start_step == vs[-m]
    text = " ".join(r.format().split())  # table widths aside
    assert (f"val minimum {r.val_min_raw_loss:.4f} at step {r.val_min_raw_step:,} "
            f"(logged value); smoothed (moving average of {r.val_smoothing} points) "
            f"{r.val_min_loss:.4f} at step {r.val_min_step:,}") in text
    last = f"the mean of the last {m} validation points (steps {r.val_rise_start_step:,}-{vs[-1]:,.0f})"
    assert f"val rise {r.val_rise:+.4f}: {last} minus the smoothed minimum" in text
    assert (f"Overfitting: {last} is {r.val_rise:.4f} above the smoothed validation minimum "
            f"{r.val_min_loss:.4f} at step {r.val_min_step:,} (moving average of "
            f"{r.val_smoothing} points; lowest logged value {r.val_min_raw_loss:.4f} at step "
            f"{r.val_min_raw_step:,})") in text
    d = r.to_dict()
    for key in ("val_min_step", "val_min_loss", "val_rise", "val_min_raw_step", "val_min_raw_loss",
                "val_smoothing", "val_rise_points", "val_rise_start_step"):
        assert key in d, key


def test_gap_is_one_definition_stated_with_its_step():
    s = [0, 10, 20, 30, 40, 50]
    train = [3.0, 2.5, 2.2, 2.0, 1.9, 1.85]
    logged = diagnose({"step": s, "train_loss": train, "val_loss": [None, 2.6, None, 2.3, None, None]})
    assert logged.gap_step == 30 and logged.gap_train_loss == 2.0 and not logged.gap_train_interpolated
    assert logged.generalization_gap == pytest.approx(0.3)
    assert "val - train gap   +0.3000: validation minus training loss (2.0000) at step 30, both " \
           "logged there" in logged.format()
    assert "is 0.3000 above the training loss 2.0000 at step 30." in logged.format()
    between = diagnose({"step": [0, 10, 20, 25, 30], "train_loss": [3.0, 2.5, 2.2, None, 2.0],
                        "val_loss": [None, None, None, 2.4, None]})
    assert between.gap_step == 25 and between.gap_train_loss == pytest.approx(2.1)
    assert between.gap_train_interpolated and between.gap_train_steps == [20, 30]
    assert "at step 25, training interpolated between its logged steps 20 and 30" in between.format()
    after = diagnose({"step": [0, 10, 20, 30], "train_loss": [3.0, 2.5, 2.2, None],
                      "val_loss": [None, None, None, 2.4]})
    assert after.gap_train_steps == [20, 20] and after.gap_train_loss == 2.2
    assert "training taken from step 20, the nearest logged" in after.format()


def test_window_means_are_labelled(rng):
    s = np.arange(50) * 10.0
    r = diagnose({"step": s, "train_loss": np.full(50, 3.5)}, baseline=3.2,
                 baseline_name="unigram baseline (counts from the training tokens)")
    assert ("the training loss (3.5000, mean of the last 10 points, steps 400-490) is not below "
            "the unigram baseline (counts from the training tokens) 3.2000") in r.format()
    assert "  unigram baseline  3.2000 (counts from the training tokens)" in r.format()


def test_val_noise_is_not_overfitting():
    # Validation flat with noise while training falls: its minimum is a noise dip.
    flagged = 0
    for seed in range(20):
        g = np.random.default_rng(seed)
        s = np.arange(60) * 100.0
        train = 1.0 + np.exp(-s / 2000)
        val = 1.6 + g.normal(0, 0.02, 60)
        r = diagnose({"step": s, "train_loss": train, "val_loss": val})
        assert r.val_rise is not None
        flagged += bool(r.overfitting)
    assert flagged <= 1


def test_small_real_rise_is_detected_and_scaled_by_noise(rng):
    s = np.arange(100) * 100.0
    train = 1.0 + np.exp(-s / 3000)
    base = 1.6 + np.where(s > 5000, (s - 5000) / 5000 * 0.05, 0.0)  # rises by 0.05 after step 5000
    quiet = diagnose({"step": s, "train_loss": train, "val_loss": base + rng.normal(0, 0.003, 100)})
    loud = diagnose({"step": s, "train_loss": train, "val_loss": base + rng.normal(0, 0.1, 100)})
    assert quiet.overfitting is True and quiet.val_min_step <= 5500  # anywhere on the plateau
    assert loud.overfitting is False and "within its noise" in loud.format()


def test_val_rising_with_train_rising_is_not_overfitting(rng):
    s = np.arange(80) * 100.0
    train = 1.0 + np.maximum(s - 4000, 0) / 4000 + rng.normal(0, 0.005, 80)
    val = 1.2 + np.maximum(s - 4000, 0) / 4000 + rng.normal(0, 0.005, 80)
    r = diagnose({"step": s, "train_loss": train, "val_loss": val})
    assert r.overfitting is False and "instability rather than overfitting" in r.format()


def test_too_few_val_points():
    r = diagnose({"step": [0, 100, 200, 300], "train_loss": [3, 2.5, 2.2, 2.0],
                  "val_loss": [3.1, None, 2.4, None]})
    assert r.val_points == 2 and r.overfitting is None and r.final_val_loss == 2.4
    assert r.generalization_gap == pytest.approx(0.2)
    assert "need at least 5" in r.format()
    assert diagnose({"step": [0, 1, 2], "train_loss": [3, 2, 1]}).final_val_loss is None


# --------------------------------------------------------------------------- underfitting


def test_underfitting_near_ln_v(rng):
    s = np.arange(100) * 10.0
    stuck = math.log(1000) - 0.05 + rng.normal(0, 0.02, 100)
    r = diagnose({"step": s, "train_loss": stuck}, vocab=1000)
    assert r.underfitting is True
    assert r.baselines == {"uniform baseline ln V": pytest.approx(math.log(1000))}
    assert "Underfitting" in r.format() and "of the way to zero loss" in r.format()
    learned = diagnose({"step": s, "train_loss": 2.0 + rng.normal(0, 0.02, 100)}, vocab=1000)
    assert learned.underfitting is False
    assert diagnose({"step": s, "train_loss": stuck}).underfitting is None


def test_underfitting_against_a_given_baseline(rng):
    s = np.arange(50) * 10.0
    above = diagnose({"step": s, "train_loss": np.full(50, 3.5)}, baseline=3.2,
                     baseline_name="unigram baseline")
    assert above.underfitting is True and "not below the unigram baseline 3.2000" in above.format()
    near = diagnose({"step": s, "train_loss": np.full(50, 0.95 * 3.2)}, baseline=3.2)
    assert near.underfitting is True
    far = diagnose({"step": s, "train_loss": np.full(50, 0.5 * 3.2)}, baseline=3.2, vocab=50)
    assert far.underfitting is False and set(far.baselines) == {"uniform baseline ln V", "baseline"}


# --------------------------------------------------------------------------- reading


def test_csv_and_jsonl_give_the_same_report(tmp_path, rng):
    s, train, val, _ = u_shaped(rng, n=80)
    csv_path = write_csv(tmp_path / "log.csv", s, train, val)
    jl = tmp_path / "log.jsonl"
    with open(jl, "w") as f:
        for i in range(len(s)):  # HF-style: train and eval records apart, eval at the same step
            f.write(json.dumps({"step": int(s[i]), "loss": float(train[i]), "lr": 1e-3}) + "\n")
            if not math.isnan(val[i]):
                f.write(json.dumps({"step": int(s[i]), "eval_loss": float(val[i])}) + "\n")
        f.write("\n" + json.dumps({"step": int(s[-1]), "train_runtime": 12.5}) + "\n")
    a, b = diagnose(csv_path), diagnose(str(jl))
    da, db = a.to_dict(), b.to_dict()
    assert da.pop("source") == csv_path and db.pop("source") == str(jl)
    assert da == db
    log = read_log(csv_path)
    assert isinstance(log, TrainingLog)
    np.testing.assert_array_equal(log.steps, s)
    np.testing.assert_array_equal(log.train_loss, train)
    np.testing.assert_array_equal(log.val_loss, val[~np.isnan(val)])


def test_other_json_layouts_and_in_memory_logs(tmp_path):
    records = [{"step": 0, "train_loss": 3.0, "valid_loss": 3.1}, {"step": 10, "train_loss": 2.0},
               {"step": 20, "train_loss": 1.5, "val_loss": 1.9}]
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"best_metric": None, "log_history": records}, indent=2))
    array = tmp_path / "history"  # no extension: sniffed
    array.write_text(json.dumps(records))
    logs = [read_log(state), read_log(array), as_log(records),
            as_log({"step": [0, 10, 20], "train_loss": [3.0, 2.0, 1.5],
                    "val_loss": [3.1, np.nan, 1.9]})]
    for log in logs:
        assert log.steps.tolist() == [0, 10, 20] and log.val_steps.tolist() == [0, 20]
        assert log.val_loss.tolist() == [3.1, 1.9]
    assert as_log(logs[0]) is logs[0]
    with pytest.raises(TypeError, match="log: expected a path"):
        as_log(42)


def test_csv_sniffed_without_extension_and_bom(tmp_path):
    p = tmp_path / "train.log"
    p.write_text("\ufeffstep, train_loss ,val_loss\n1,2.0,\n2,1.5,1.7\n\n3,1.2,\n", encoding="utf-8")
    log = read_log(p)
    assert log.steps.tolist() == [1, 2, 3] and log.val_steps.tolist() == [2]


BAD_LOGS = [
    ("missing.csv", None, "no such file"),
    ("empty.csv", "", "empty file"),
    ("noloss.csv", "step,val_loss\n1,2\n",
     r"no 'train_loss' column in the CSV header \(found 'step', 'val_loss'\)"),
    ("nostep.csv", "iter,train_loss\n1,2\n", r"no 'step' column"),
    ("text.csv", "step,train_loss\n1,2.0\n2,abc\n",
     r"line 3: train_loss is 'abc', expected a number"),
    ("nan.csv", "step,train_loss\n1,2.0\n2,nan\n",
     r"line 3: train_loss is nan, expected a finite number \(did training diverge\?\)"),
    ("badstep.csv", "step,train_loss\n1,2.0\nx,1.0\n", r"line 3: step is 'x', expected a number"),
    ("one.csv", "step,train_loss\n1,2.0\n", r"1 train_loss point\(s\); need at least 2"),
    ("header.csv", "step,train_loss\n", r"0 train_loss point\(s\)"),
    ("back.csv", "step,train_loss\n1,2.0\n5,1.0\n3,0.9\n",
     r"line 4: step 3 is less than step 5 \(line 3\); steps must increase"),
    ("repeat.csv", "step,train_loss\n1,2.0\n1,1.0\n",
     r"line 3: step 1 repeats a step that already has a train_loss"),
    ("wide.csv", "step,train_loss\n1,2.0,7\n", r"line 2: 3 cells but the header names 2 columns"),
    ("nostepval.csv", "step,train_loss\n1,2.0\n,1.0\n",
     r"line 3: has a train_loss value but no step"),
    ("bad.jsonl", '{"step": 1, "loss": 2}\n{"step": 2, "loss": \n', r"line 2: not valid JSON"),
    ("list.jsonl", '{"step": 1, "loss": 2}\n[1, 2]\n',
     r"line 2: expected a JSON object, found list"),
    ("keys.jsonl", '{"epoch": 1, "acc": 0.5}\n',
     r"no 'step' or 'train_loss' key in any record \(found 'acc', 'epoch'\)"),
    ("bool.jsonl", '{"step": 1, "loss": true}\n{"step": 2, "loss": 1}\n',
     r"line 1: loss is True, expected a number"),
    ("doc.json", '{"log_history": 3}',
     r"neither a list of objects nor an object with a 'log_history' list"),
    ("blank.jsonl", "\n\n", "empty file"),
]


@pytest.mark.parametrize("name, content, message", BAD_LOGS, ids=[b[0] for b in BAD_LOGS])
def test_bad_logs_name_the_file_and_problem(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(CurveLogError, match=message) as exc:
        diagnose(path)
    assert isinstance(exc.value, ValueError)
    assert str(exc.value).startswith(f"{path}: ")
    assert exc.value.source == str(path) and exc.value.problem in str(exc.value)


def test_unreadable_logs(tmp_path):
    with pytest.raises(CurveLogError, match="is a directory"):
        read_log(tmp_path)
    binary = tmp_path / "log.csv"
    binary.write_bytes(b"step,train_loss\n1,\xff\xfe\n")
    with pytest.raises(CurveLogError, match=r"not a UTF-8 text file \(byte 18\)"):
        read_log(binary)


def test_bad_options():
    log = {"step": [0, 1, 2], "train_loss": [3.0, 2.0, 1.0]}
    for window in (2, 0, True, 3.5):
        with pytest.raises(ValueError, match="window: expected an integer >= 3"):
            diagnose(log, window=window)
    with pytest.raises(ValueError, match="vocab: expected an integer >= 2, found 1"):
        diagnose(log, vocab=1)
    with pytest.raises(ValueError, match="baseline: expected a positive finite loss"):
        diagnose(log, baseline=-1.0)
    with pytest.raises(TypeError, match="baseline: expected a number, found str"):
        diagnose(log, baseline="3")
    with pytest.raises(CurveLogError, match="columns of different lengths"):
        diagnose({"step": [0, 1, 2], "train_loss": [3.0, 2.0]})


def test_to_dict_is_json_ready(rng):
    s, train, val, _ = u_shaped(rng, n=60)
    d = diagnose({"step": s, "train_loss": train, "val_loss": val}, vocab=64).to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert d["first_step"] == 0 and isinstance(d["last_step"], int)
    two = diagnose({"step": [0, 1], "train_loss": [3.0, 2.0]}).to_dict()
    assert two["train_slope_se"] is None  # undefined with 2 points: NaN -> None


# --------------------------------------------------------------------------- command line


def test_cli_prints_and_writes_json(tmp_path, rng, capsys):
    s, train, val, _ = u_shaped(rng)
    log = write_csv(tmp_path / "run.csv", s, train, val)
    out = tmp_path / "diag.json"
    assert main(["curves", log, "--vocab", "100", "--baseline", "3.0", "--window", "30",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"fastloss curves: {log}: 200 training points")
    assert "Overfitting" in printed and "uniform baseline ln V" in printed
    got = json.loads(out.read_text())
    want = diagnose(log, window=30, vocab=100, baseline=3.0).to_dict()
    assert got == want and got["window"] == 30 and got["overfitting"] is True
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fastloss")] == []


def test_cli_bad_log_exits_2_with_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nope.csv")
    assert main(["curves", missing]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"fastloss curves: error: {missing}: no such file\n"
    bad = tmp_path / "bad.csv"
    bad.write_text("step,train_loss\n1,2\n2,x\n")
    assert main(["curves", str(bad), "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: line 3: train_loss is 'x'" in err
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(CurveLogError):
        main(["curves", missing, "--debug"])


def test_cli_bad_options_exit_2(tmp_path, capsys):
    log = write_csv(tmp_path / "l.csv", [0, 1, 2], [3.0, 2.0, 1.0])
    for argv in (["--window", "2"], ["--window", "x"], ["--vocab", "1"], ["--baseline", "-2"],
                 ["--baseline", "nan"]):
        with pytest.raises(SystemExit) as exc:
            main(["curves", log] + argv)
        assert exc.value.code == 2
        assert f"argument {argv[0]}" in capsys.readouterr().err
    assert main(["curves", log, "--json", str(tmp_path / "no" / "such" / "dir.json")]) == 2
    assert "dir.json: cannot write" in capsys.readouterr().err


def test_cli_help_lists_curves(capsys):
    assert main([]) == 0
    assert "curves" in capsys.readouterr().out


# --------------------------------------------------------------------------- plots


def assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_plot_curves_and_cli_plot(tmp_path, rng, capsys):
    pytest.importorskip("matplotlib")
    from fastloss.evaluation.plot import plot_curves

    s, train, val, _ = u_shaped(rng)
    log = {"step": s, "train_loss": train, "val_loss": val}
    r = diagnose(log)
    assert plot_curves(log, tmp_path / "c.png", vocab=100, baseline=3.0, report=r) == str(tmp_path / "c.png")
    assert_png(tmp_path / "c.png")
    csv_path = write_csv(tmp_path / "l.csv", s, train)
    assert main(["curves", csv_path, "--plot", str(tmp_path / "cli.png")]) == 0
    assert_png(tmp_path / "cli.png")


def test_plot_report(tmp_path):
    pytest.importorskip("matplotlib")
    import fastloss
    from fastloss.evaluation.plot import plot_report

    g = np.random.default_rng(3)
    logits = g.standard_normal((500, 40)).astype(np.float32)
    d = fastloss.evaluate(logits, g.integers(0, 40, 500)).to_dict()
    assert_png(plot_report(d, tmp_path / "h.png"))
    d["per_position_loss"] = [2.5, 2.1, None, 1.9, 1.8]
    assert_png(plot_report(d, tmp_path / "hp.png"))
    d["per_position_loss"] = None
    assert_png(plot_report(d, tmp_path / "hn.png"))
    with pytest.raises(ValueError, match="'loss_histogram' holding 'edges' and 'counts'"):
        plot_report({"mean_loss": 1.0}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="len\\(edges\\) == len\\(counts\\) \\+ 1"):
        plot_report({"loss_histogram": {"edges": [0, 1], "counts": [1, 2]}}, tmp_path / "x.png")


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    from fastloss.evaluation.plot import plot_curves, plot_report

    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    log = {"step": [0, 1, 2], "train_loss": [3.0, 2.0, 1.0]}
    with pytest.raises(RuntimeError, match=r"plotting needs matplotlib: pip install fastloss\[plot\]"):
        plot_curves(log, tmp_path / "c.png")
    hist = {"loss_histogram": {"edges": [0, 1, 2], "counts": [1, 2]}}
    with pytest.raises(RuntimeError, match=r"pip install fastloss\[plot\]"):
        plot_report(hist, tmp_path / "h.png")
    path = write_csv(tmp_path / "l.csv", [0, 1, 2], [3.0, 2.0, 1.0])
    assert main(["curves", path, "--plot", str(tmp_path / "c.png")]) == 1
    captured = capsys.readouterr()
    assert "Converged" in captured.out or "Still improving" in captured.out
    assert captured.err.startswith("fastloss curves: error: plotting needs matplotlib: "
                                   "pip install fastloss[plot]")
    assert not os.path.exists(tmp_path / "c.png")


def _reference_csv(path):
    """A small, obviously-correct reader of a generated step,train_loss,val_loss log."""
    steps, train, vsteps, val = [], [], [], []
    with open(path, encoding="utf-8") as f:
        next(f)
        for line in f:
            if not line.strip():
                continue
            s, t, v = line.rstrip("\n").split(",")
            if t:
                steps.append(float(s))
                train.append(float(t))
            if v:
                vsteps.append(float(s))
                val.append(float(v))
    return steps, train, vsteps, val


def _write_big_csv(path, n):
    with open(path, "w", encoding="utf-8") as f:
        f.write("step,train_loss,val_loss\n")
        for i in range(n):
            t = "" if i % 997 == 5 else f"{1.0 + 3.0 / (1 + i / 2000):.6f}"
            v = f"{1.1 + 3.0 / (1 + i / 2000):.6f}" if i % 50 == 0 else ""
            f.write(f"{i},{t},{v}\n" + ("\n" if i % 1000 == 3 else ""))


def test_large_csv_matches_a_reference_reader(tmp_path):
    path = tmp_path / "big.csv"
    _write_big_csv(path, 200_000)
    log = read_log(path)
    ref = _reference_csv(path)
    for got, want in zip((log.steps, log.train_loss, log.val_steps, log.val_loss), ref, strict=True):
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, np.array(want))


@pytest.mark.slow
def test_large_csv_is_read_in_bounded_memory(tmp_path):
    import subprocess

    path = tmp_path / "big.csv"
    _write_big_csv(path, 2_000_000)
    code = ("import resource, sys\n"
            "from fastloss.evaluation.curves import read_log\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "log = read_log(sys.argv[1])\n"
            "print(len(log.steps), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert int(out[0]) == 2_000_000 - len(range(5, 2_000_000, 997))
    assert int(out[1]) < 120  # MiB over the imports; the file is ~70 MB, the arrays 48 MB


def test_deeply_nested_json_is_a_curve_log_error(tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    for name, text in (("deep.json", deep), ("deep.jsonl", '{"step": 1}\n' + deep + "\n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(CurveLogError, match=rf"{name}: .*nested too deeply") as exc:
            read_log(path)
        assert not isinstance(exc.value.__context__, RecursionError) or exc.value.__suppress_context__
        assert main(["curves", str(path)]) == 2
        err = capsys.readouterr().err
        assert "nested too deeply" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_bad_output_path_fails_before_the_report(tmp_path, capsys, flag):
    """An output path that cannot be written (empty, or in a missing folder) exits 2
    with one line before any work, so no report is printed."""
    log = tmp_path / "log.csv"
    log.write_text("step,train_loss\n" + "".join(f"{i},{3 - i * 0.01}\n" for i in range(50)))
    for bad in ("", str(tmp_path / "nodir" / "out")):
        assert main(["curves", str(log), flag, bad]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and flag in err, (out, err)
