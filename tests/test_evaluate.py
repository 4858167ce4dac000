"""Offline evaluation: fastloss.evaluate, EvalReport and ``fastloss eval``."""

import json
import math
import os
import re

import numpy as np
import pytest
from scipy.special import logsumexp

import fastloss
from fastloss import config
from fastloss.cli import main
from fastloss.evaluation import EvalInputError
from fastloss.evaluation import stream as S

IGNORE = -100
NBINS = 15


def _dump(rng, n=203, v=37, dtype=np.float64, scale=2.5):
    """Random logits (not zeros) and targets with some ignored."""
    x = (rng.standard_normal((n, v)) * scale + rng.standard_normal(v)).astype(dtype)
    t = rng.integers(0, v, n)
    t[rng.random(n) < 0.15] = IGNORE
    return x, t


def _reference(x, t, hist_edges):
    """Every report number in float64 numpy, directly from the definitions."""
    z = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    t = t.reshape(-1)
    keep = t != IGNORE
    z, tc = z[keep], t[keep]
    n, v = z.shape
    lse = logsumexp(z, axis=1)
    loss = lse - z[np.arange(n), tc]
    logp = z - lse[:, None]
    p = np.exp(logp)
    ent = -(p * logp).sum(axis=1)
    order = np.argsort(-z, axis=1, kind="stable")
    rank = np.argmax(order == tc[:, None], axis=1)
    correct = rank == 0
    conf = p.max(axis=1)
    counts = np.bincount(tc, minlength=v)
    q = counts[counts > 0] / n
    unigram = float(-(q * np.log(q)).sum())
    mean_loss = loss.mean()
    loss_se = loss.std(ddof=1) / math.sqrt(n)
    acc = correct.mean()
    hist, _ = np.histogram(np.clip(loss, hist_edges[0], hist_edges[-1]), bins=hist_edges)
    return dict(tokens=n, ignored=int((~keep).sum()), mean_loss=mean_loss,
                perplexity=math.exp(mean_loss), bits_per_token=mean_loss / math.log(2),
                accuracy=correct.mean(), top5_accuracy=(rank < 5).mean(),
                mean_entropy=ent.mean(), ece=_ece(conf, correct),
                uniform_baseline=math.log(v), unigram_baseline=unigram,
                gap_closed=(math.log(v) - mean_loss) / (math.log(v) - unigram),
                hist=hist.tolist(), loss_max=loss.max(),
                loss_stderr=loss_se, perplexity_stderr=math.exp(mean_loss) * loss_se,
                accuracy_stderr=math.sqrt(acc * (1 - acc) / n))


def _ece(conf, correct):
    """Expected calibration error, 15 equal-width bins (lo, hi], written as a loop."""
    total = 0.0
    for b in range(NBINS):
        lo, hi = b / NBINS, (b + 1) / NBINS
        sel = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if sel.any():
            total += sel.sum() / conf.size * abs(correct[sel].mean() - conf[sel].mean())
    return total


def _check(report, ref, rtol):
    for key in ("mean_loss", "perplexity", "bits_per_token", "accuracy", "top5_accuracy",
                "mean_entropy", "ece", "uniform_baseline", "unigram_baseline", "gap_closed",
                "loss_max", "loss_stderr", "perplexity_stderr", "accuracy_stderr"):
        assert getattr(report, key) == pytest.approx(ref[key], rel=rtol, abs=rtol), key
    assert report.tokens == ref["tokens"] and report.ignored == ref["ignored"]
    assert report.loss_histogram["counts"] == ref["hist"]


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-9), (np.float32, 2e-6)])
@pytest.mark.parametrize("chunk", [None, 1, 17, 64, 1000])
def test_matches_float64_reference(rng, dtype, rtol, chunk):
    x, t = _dump(rng, dtype=dtype)
    r = fastloss.evaluate(x, t, chunk_tokens=chunk)
    _check(r, _reference(x, t, np.asarray(r.loss_histogram["edges"])), rtol)
    assert r.skipped == 0 and r.warnings == []


def test_half_precision_and_nd_shapes(rng):
    import ml_dtypes
    x, t = _dump(rng, n=60, v=129)
    for dt in (np.float16, ml_dtypes.bfloat16):
        xh = x.astype(dt).reshape(3, 20, 129)
        r = fastloss.evaluate(xh, t.reshape(3, 20), chunk_tokens=7)
        _check(r, _reference(xh.astype(np.float64), t, np.asarray(r.loss_histogram["edges"])), 5e-5)


def test_array_path_and_shards_agree(rng, tmp_path):
    x, t = _dump(rng, n=150, v=23)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    np.save(tmp_path / "x0.npy", x[:61])
    np.save(tmp_path / "x1.npy", x[61:])
    np.save(tmp_path / "t0.npy", t[:100].astype(np.int32))
    np.save(tmp_path / "t1.npy", t[100:])
    base = fastloss.evaluate(x, t).to_dict()
    for logits, targets in [(str(tmp_path / "x.npy"), tmp_path / "t.npy"),
                            ([tmp_path / "x0.npy", tmp_path / "x1.npy"],
                             [tmp_path / "t0.npy", tmp_path / "t1.npy"])]:
        for chunk in (1, 13, 61, 500):
            d = fastloss.evaluate(logits, targets, chunk_tokens=chunk).to_dict()
            for key in ("logits_files", "targets_files"):
                d.pop(key), base.pop(key, None)
            for key, value in base.items():
                _same(d[key], value, key)


def _same(a, b, key):
    """Equal, floats to 1e-12 relative (summation order differs with the chunking)."""
    if isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-12), key
    elif isinstance(b, dict):
        assert a.keys() == b.keys(), key
        for k in b:
            _same(a[k], b[k], f"{key}.{k}")
    elif isinstance(b, list):
        assert len(a) == len(b), key
        for i, (u, w) in enumerate(zip(a, b)):
            _same(u, w, f"{key}[{i}]")
    else:
        assert a == b, key


def test_default_chunk_from_byte_budget(rng, monkeypatch):
    x, t = _dump(rng, n=100, v=16)
    seen = []
    real = S._chunk
    monkeypatch.setattr(config, "EVAL_CHUNK_BYTES", 16 * 8 * 30)  # 30 float64 rows per chunk
    monkeypatch.setattr(S, "_chunk", lambda tot, sh, lo, hi, *a: (seen.append(hi - lo), real(tot, sh, lo, hi, *a)))
    fastloss.evaluate(x, t)
    assert seen == [30, 30, 30, 10]


def test_memory_bounded_by_chunk(rng, tmp_path):
    import tracemalloc
    v = 1000
    x = rng.standard_normal((4000, v)).astype(np.float32)  # 16 MB dump
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", rng.integers(0, v, 4000))
    del x
    fastloss.evaluate(tmp_path / "x.npy", tmp_path / "t.npy", chunk_tokens=8)  # compile first
    tracemalloc.start()
    fastloss.evaluate(tmp_path / "x.npy", tmp_path / "t.npy", chunk_tokens=100)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2_000_000  # a chunk is 400 kB of logits; the dump is 16 MB


def test_train_loss_gap_and_report_text(rng):
    x, t = _dump(rng, n=80, v=11, scale=1.0)
    r = fastloss.evaluate(x, t, train_loss=1.25)
    assert r.generalization_gap == pytest.approx(r.mean_loss - 1.25, rel=1e-12)
    text = str(r)
    for word in ("mean loss", "perplexity", "ln V", "unigram", "ECE", "train"):
        assert word in text
    assert "val - train gap" in text and "(the mean loss above minus the train loss)" in text


def test_all_ignored_and_bad_options(rng):
    x, _ = _dump(rng, n=5, v=4)
    r = fastloss.evaluate(x, np.full(5, IGNORE))
    assert r.tokens == 0 and r.ignored == 5 and math.isnan(r.mean_loss) and r.warnings
    assert r.to_dict()["mean_loss"] is None
    with pytest.raises(ValueError, match="chunk_tokens: expected a positive integer"):
        fastloss.evaluate(x, np.zeros(5, int), chunk_tokens=0)
    with pytest.raises(ValueError, match="on_invalid: expected one of"):
        fastloss.evaluate(x, np.zeros(5, int), on_invalid="drop")
    with pytest.raises(EvalInputError,
                       match=r"<targets array>: 1 target\(s\) outside \[0, 4\).*token 2 of this file: 4"):
        fastloss.evaluate(x, np.array([0, 1, 4, -100, 3]))
    with pytest.raises(TypeError, match="targets: expected an integer dtype"):
        fastloss.evaluate(x, np.zeros(5))


def test_nan_logits_propagate_raise_skip(rng):
    x, t = _dump(rng, n=40, v=9)
    t[3] = 2
    x[3, 5] = np.nan
    r = fastloss.evaluate(x, t)
    assert math.isnan(r.mean_loss) and math.isnan(r.accuracy) and "NaN" in r.warnings[0]
    with pytest.raises(EvalInputError, match="NaN loss at token 3"):
        fastloss.evaluate(x, t, on_invalid="raise", chunk_tokens=2)
    s = fastloss.evaluate(x, t, on_invalid="skip", chunk_tokens=6)
    keep = np.ones(40, bool)
    keep[3] = False
    _check(s, _reference(x[keep], t[keep], np.asarray(s.loss_histogram["edges"])), 1e-9)
    assert s.skipped == 1 and "skipped" in s.warnings[0]


# ---- what the report text says -----------------------------------------------------

def _percents(text):
    """Every percentage printed in ``text``, as numbers."""
    return [float(p) for p in re.findall(r"(-?\d+(?:\.\d+)?)%", text)]


def _boosted(rng, boost, n=3000, v=40):
    """Skewed targets (frequency ~ 1/rank, so the unigram baseline is well below ln V) and
    logits that half know those frequencies, the target's raised by ``boost`` (negative:
    lowered)."""
    freq = 1.0 / np.arange(1, v + 1)
    freq /= freq.sum()
    t = rng.choice(v, n, p=freq)
    x = 0.5 * np.log(freq) + 0.3 * rng.standard_normal((n, v))
    x[np.arange(n), t] += boost
    return x, t


def test_baseline_sentence_between_beyond_and_below(rng):
    from fastloss.evaluation.report import baseline_comparison

    # between the baselines: a percentage in [0, 100]
    line = baseline_comparison(3.0, 4.0, 2.0)
    assert line == ("The loss closes 50.0% of the gap from the uniform baseline to the unigram "
                    "baseline (counts from the evaluated tokens): between guessing uniformly and "
                    "predicting target frequencies.")
    assert "100.0%" in baseline_comparison(2.0, 4.0, 2.0)
    assert "0.0%" in baseline_comparison(4.0, 4.0, 2.0)
    # beyond the unigram baseline: nats below it and the ratio of losses, never a percentage
    line = baseline_comparison(1.5, 4.0, 2.0, "training tokens")
    assert line.startswith("Beyond the unigram baseline (counts from the training tokens): the "
                           "loss is 0.5000 nats below it (0.750 times it; perplexity 1.65x lower)")
    assert "%" not in line
    # worse than uniform: said plainly, no negative percentage
    line = baseline_comparison(4.5, 4.0, 2.0)
    assert line == ("Worse than uniform guessing: the loss is 0.5000 nats above the uniform "
                    "baseline ln V (1.125 times it).")
    assert baseline_comparison(math.nan, 4.0, 2.0) is None


@pytest.mark.parametrize("boost, first_word", [(6.0, "Beyond"), (0.0, "The loss closes"),
                                               (-3.0, "Worse than uniform")])
def test_report_never_prints_a_gap_percentage_outside_0_100(rng, boost, first_word):
    x, t = _boosted(rng, boost)
    r = fastloss.evaluate(x, t)
    text = r.format()
    verdict = [line for line in text.splitlines() if first_word in line]
    assert len(verdict) == 1, text
    assert all(0 <= p <= 100 for p in _percents(text)), text
    if boost > 0:
        assert r.gap_closed > 1 and "nats below it" in verdict[0] and "%" not in verdict[0]
        assert r.to_dict()["nats_below_unigram"] == pytest.approx(r.unigram_baseline - r.mean_loss)
        assert r.to_dict()["loss_over_unigram"] == pytest.approx(r.mean_loss / r.unigram_baseline)
    elif boost < 0:
        assert r.gap_closed < 0 and "nats above the uniform baseline" in verdict[0]
    else:
        assert 0 <= r.gap_closed <= 1 and f"{r.gap_closed:.1%}" in verdict[0]


def test_one_unigram_baseline_named_by_its_counts(rng):
    x, t = _boosted(rng, 1.5)
    r = fastloss.evaluate(x, t)
    assert r.unigram_source == "evaluated tokens" and r.to_dict()["unigram_source"] == "evaluated tokens"
    assert "counted over the evaluated tokens" in r.format()
    trained = r.with_unigram(3.5, "training tokens")
    assert trained.unigram_baseline == 3.5 and r.unigram_baseline != 3.5  # a copy
    assert trained.gap_closed == pytest.approx((r.uniform_baseline - r.mean_loss)
                                               / (r.uniform_baseline - 3.5))
    text = trained.format()
    rows = [line for line in text.splitlines() if line.strip().startswith("unigram baseline")]
    assert rows == ["  unigram baseline  3.5000 nats (predicting each target by its frequency, "
                    "counted over the training tokens)"]
    assert f"{r.unigram_baseline:.4f}" not in text  # the evaluated tokens' entropy is gone
    assert "unigram baseline (counts from the training tokens)" in text
    assert trained.to_dict()["unigram_source"] == "training tokens"
    # a baseline at or above ln V has no gap to close
    assert r.with_unigram(r.uniform_baseline + 0.1, "training tokens").gap_closed is None


def test_histogram_folded_by_default_and_open_ended_last_bin(rng):
    x, t = _boosted(rng, -4.0, n=500, v=10)  # many losses above 2 ln V
    r = fastloss.evaluate(x, t)
    top, last_lo = r.loss_histogram["edges"][-1], r.loss_histogram["edges"][-2]
    assert r.loss_max > top and r.loss_histogram["counts"][-1] > 0
    folded = r.format()
    assert f"the last open-ended (≥ {last_lo:.2f}, max {r.loss_max:.4f}); folded" in folded
    assert "[  " not in folded and "#" not in folded  # no bin lines, no bars
    shown = r.format(histogram=True)
    bins = [line for line in shown.splitlines() if line.startswith("    [") or "≥" in line]
    assert bins[-1].startswith(f"    ≥ {last_lo:.2f}") and bins[-1].endswith("#" * 30)
    assert sum(int(b.split()[-2].replace(",", "")) for b in bins[1:]) == r.tokens
    # no overflow: the last bin is closed, [lo, hi]
    y, u = _boosted(rng, 3.0, n=500, v=10)
    quiet = fastloss.evaluate(y, u, hist_max=50.0)
    assert quiet.loss_max < 50.0
    shown = quiet.format(histogram=True)
    assert "≥" not in shown and "open-ended" not in shown
    assert "bins of 1.25 nats on [0, 50.00]:" in shown


def test_profile_has_a_legend(rng):
    x, t = _boosted(rng, 1.0, n=640, v=20)
    text = fastloss.evaluate(x, t, seq_len=128).format()
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if "profile [" in line)
    legend = lines[i + 1]
    assert legend.startswith("    legend: '.' ") and "'@' " in legend and "nats (the nearest level)" in legend
    for level in ".:-=+*#%@":
        assert f"'{level}' " in legend
    assert "a column is the mean loss of 2 positions' counted tokens, position 0 on the left" in lines[i + 2]
    one = fastloss.evaluate(x[:600], t[:600], seq_len=20).format()
    assert "a column is one position, position 0 on the left" in one


# ---- the command line -------------------------------------------------------------

def _files(rng, tmp_path, n=120, v=19):
    x, t = _dump(rng, n=n, v=v, dtype=np.float32)
    np.save(tmp_path / "a.npy", x[:50])
    np.save(tmp_path / "b.npy", x[50:])
    np.save(tmp_path / "t.npy", t)
    return x, t, [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")], str(tmp_path / "t.npy")


def test_cli_prints_table_and_writes_json(rng, tmp_path, capsys):
    x, t, logits, targets = _files(rng, tmp_path)
    out_json = tmp_path / "r.json"
    code = main(["eval", *logits, "--targets", targets, "--chunk-tokens", "7",
                 "--json", str(out_json), "--train-loss", "2.0"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "mean loss" in cap.out and "unigram baseline" in cap.out and "val - train gap" in cap.out
    assert "train loss        2.0000 nats (given with --train-loss)" in cap.out
    d = json.loads(out_json.read_text())
    for key in ("tokens", "ignored", "mean_loss", "perplexity", "bits_per_token", "accuracy",
                "top5_accuracy", "mean_entropy", "ece", "uniform_baseline", "unigram_baseline",
                "gap_closed", "loss_histogram", "train_loss", "generalization_gap"):
        assert key in d, key
    ref = _reference(x, t, np.asarray(d["loss_histogram"]["edges"]))
    assert d["mean_loss"] == pytest.approx(ref["mean_loss"], rel=2e-6)
    assert d["tokens"] == ref["tokens"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".fastloss")] == []


def test_cli_curves_log_gives_gap_and_diagnosis(rng, tmp_path, capsys):
    """--curves LOG: the log's final training loss is the train loss of the gap, and
    the curve diagnosis follows the report (and sits under "curves" in --json)."""
    x, t, logits, targets = _files(rng, tmp_path)
    steps = np.arange(0, 2000, 50)
    train = 2.0 + 3.0 * np.exp(-steps / 400.0) + rng.normal(0, 0.01, steps.size)
    log = tmp_path / "log.csv"
    log.write_text("step,train_loss\n" + "".join(f"{s},{v}\n" for s, v in zip(steps, train)))
    out_json = tmp_path / "r.json"
    code = main(["eval", *logits, "--targets", targets, "--curves", str(log), "--json", str(out_json)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    d = json.loads(out_json.read_text())
    assert d["train_loss"] == pytest.approx(train[-1])
    assert d["generalization_gap"] == pytest.approx(d["mean_loss"] - train[-1])
    assert d["curves"]["final_train_loss"] == pytest.approx(train[-1])
    assert "val - train gap" in cap.out and "fastloss curves" in cap.out
    assert f"(the last train_loss of {log}, at step 1,950)" in cap.out
    # the curves report's baseline is the report's one unigram baseline, named the same way
    assert "unigram baseline       " in cap.out and "(counts from the evaluated tokens)" in cap.out
    # --train-loss wins over the log; a bad log is a one-line error naming it
    assert main(["eval", *logits, "--targets", targets, "--curves", str(log), "--train-loss", "1.5",
                 "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["train_loss"] == 1.5
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    bad.write_text("step,loss_typo\n1,2\n")
    _expect_error(capsys, ["eval", *logits, "--targets", targets, "--curves", str(bad)], "bad.csv")


def test_cli_histogram_flag(rng, tmp_path, capsys):
    _, _, logits, targets = _files(rng, tmp_path)
    assert main(["eval", *logits, "--targets", targets]) == 0
    folded = capsys.readouterr().out
    assert "folded (--histogram shows it" in folded
    assert not [line for line in folded.splitlines() if line.startswith("    [")]
    assert main(["eval", *logits, "--targets", targets, "--histogram"]) == 0
    shown = capsys.readouterr().out
    bins = [line for line in shown.splitlines() if line.startswith("    [") or line.startswith("    ≥")]
    assert len(bins) >= 5 and "folded" not in shown
    # everything else is the same report
    def rest(text):
        return [line for line in text.splitlines()
                if line not in bins and not line.startswith("  loss histogram")]
    assert rest(shown) == rest(folded)


def _expect_error(capsys, argv, *needles):
    assert main(argv) == 2
    cap = capsys.readouterr()
    line = cap.err.strip()
    assert "\n" not in line and "Traceback" not in cap.err, cap.err
    for needle in needles:
        assert needle in line, line
    return line


def test_cli_bad_inputs_exit_2(rng, tmp_path, capsys):
    x, t, logits, targets = _files(rng, tmp_path)
    missing = str(tmp_path / "nope.npy")
    _expect_error(capsys, ["eval", missing, "--targets", targets], missing, "no such file")
    corrupt = tmp_path / "corrupt.npy"
    corrupt.write_bytes(b"\x93NUMPY\x01\x00garbage header that is not a dict" + b"\0" * 40)
    _expect_error(capsys, ["eval", str(corrupt), "--targets", targets], str(corrupt), "corrupt header")
    notnpy = tmp_path / "plain.npy"
    notnpy.write_bytes(b"hello world, not numpy at all")
    _expect_error(capsys, ["eval", str(notnpy), "--targets", targets], str(notnpy), "not a valid .npy")
    trunc = tmp_path / "trunc.npy"
    trunc.write_bytes((tmp_path / "a.npy").read_bytes()[:-100])
    _expect_error(capsys, ["eval", str(trunc), "--targets", targets], str(trunc), "truncated")
    _expect_error(capsys, ["eval", logits[0], "--targets", targets], targets, "120 target tokens", "50 tokens")
    np.save(tmp_path / "w.npy", np.ones((70, 20), np.float32) * 0.5)
    wide = str(tmp_path / "w.npy")
    _expect_error(capsys, ["eval", logits[0], wide, "--targets", targets], wide, "vocabulary size 20", "19")
    bad_t = t.copy()
    bad_t[77] = 19
    np.save(tmp_path / "bad_t.npy", bad_t)
    _expect_error(capsys, ["eval", *logits, "--targets", str(tmp_path / "bad_t.npy")],
                  "bad_t.npy", "outside [0, 19)", "token 77")
    np.save(tmp_path / "ft.npy", t.astype(np.float32))
    _expect_error(capsys, ["eval", *logits, "--targets", str(tmp_path / "ft.npy")], "ft.npy", "integers")
    with pytest.raises(ValueError):  # --debug shows the exception
        main(["eval", missing, "--targets", targets, "--debug"])


def test_cli_nan_logits_and_skip_invalid(rng, tmp_path, capsys):
    x, t, logits, targets = _files(rng, tmp_path)
    xb = x[50:].copy()
    xb[10, 3] = np.nan
    t2 = t.copy()
    t2[60] = 4
    np.save(tmp_path / "b.npy", xb)
    np.save(tmp_path / "t.npy", t2)
    _expect_error(capsys, ["eval", *logits, "--targets", targets], logits[1], "NaN loss at token 10")
    assert main(["eval", *logits, "--targets", targets, "--skip-invalid",
                 "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "1 skipped as invalid" in out and "warning: 1 token(s) with a NaN loss skipped" in out
    d = json.loads((tmp_path / "s.json").read_text())
    keep = np.ones(120, bool)
    keep[60] = False
    ref = _reference(x[keep], t2[keep], np.asarray(d["loss_histogram"]["edges"]))
    assert d["skipped"] == 1 and d["tokens"] == ref["tokens"]
    assert d["mean_loss"] == pytest.approx(ref["mean_loss"], rel=2e-6)


def test_report_dict_keys_without_sequences(rng):
    x, t = _dump(rng, n=30, v=7)
    d = fastloss.evaluate(x, t).to_dict()
    for key in ("tokens", "ignored", "mean_loss", "perplexity", "bits_per_token", "accuracy",
                "top5_accuracy", "mean_entropy", "ece", "uniform_baseline", "unigram_baseline"):
        assert isinstance(d[key], (int, float)), key
    assert d["seq_len"] is None and d["per_position_loss"] is None and d["per_position_count"] is None
    assert d["logits_files"] == ["<logits array>"] and d["hidden_files"] == [] and d["lm_head_file"] is None
    assert "loss by position" not in fastloss.evaluate(x, t).format()


def test_standard_errors_in_report_dict_and_text(rng):
    x, t = _dump(rng, n=500, v=11)
    r = fastloss.evaluate(x, t, chunk_tokens=13)
    ref = _reference(x, t, np.asarray(r.loss_histogram["edges"]))
    d = r.to_dict()
    for key in ("loss_stderr", "perplexity_stderr", "accuracy_stderr"):
        assert d[key] == pytest.approx(ref[key], rel=1e-9), key
    text = r.format()
    assert f"{r.mean_loss:.4f} ± {r.loss_stderr:.4f} nats/token" in text
    assert f"± {r.accuracy_stderr:.2%}" in text
    one = fastloss.evaluate(x[:1], np.array([3]))
    assert math.isnan(one.loss_stderr) and one.to_dict()["loss_stderr"] is None
    assert "±" not in one.format().split("perplexity")[0]


# ---- --plot -------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    """(width, height) of a PNG from its IHDR chunk."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_cli_plot_histogram_and_per_position(rng, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, _, logits, targets = _files(rng, tmp_path)
    one = tmp_path / "hist.png"
    assert main(["eval", *logits, "--targets", targets, "--plot", str(one)]) == 0
    assert "mean loss" in capsys.readouterr().out
    w1, h1 = _png_size(one)
    two = tmp_path / "pos.png"
    assert main(["eval", *logits, "--targets", targets, "--seq-len", "12", "--plot", str(two)]) == 0
    assert "loss by position" in capsys.readouterr().out
    w2, h2 = _png_size(two)
    assert h2 == h1 and w2 > 1.8 * w1  # a second panel: the loss per position
    bad = tmp_path / "no-such-dir" / "p.png"
    assert main(["eval", *logits, "--targets", targets, "--plot", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastloss eval: error: {bad}: cannot write") and err.count("\n") == 1


def test_cli_plot_without_matplotlib(rng, tmp_path, capsys, monkeypatch):
    import sys

    _, _, logits, targets = _files(rng, tmp_path)
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    png = tmp_path / "p.png"
    assert main(["eval", *logits, "--targets", targets, "--plot", str(png),
                 "--json", str(tmp_path / "r.json")]) == 1
    cap = capsys.readouterr()
    assert "mean loss" in cap.out and (tmp_path / "r.json").exists()  # the report comes first
    assert cap.err == "fastloss eval: error: --plot needs matplotlib: pip install fastloss[plot]\n"
    assert not png.exists()


# ---- the one-sweep metrics kernel on rows of several blocks ------------------------

def _row_reference(z, t):
    """(loss, entropy, confidence, rank) per row in float64, -inf logits allowed."""
    z = np.asarray(z, np.float64)
    lse = logsumexp(z, axis=1)
    logp = z - lse[:, None]
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):  # 0 * -inf where a logit is -inf
        ent = -np.where(p > 0, p * logp, 0.0).sum(axis=1)
    zt = z[np.arange(len(t)), t]
    before = np.arange(z.shape[1])[None, :] < t[:, None]
    rank = (z > zt[:, None]).sum(1) + ((z == zt[:, None]) & before).sum(1)
    return lse - zt, ent, p.max(axis=1), rank


@pytest.mark.parametrize("dtype, acc, rtol", [(np.float64, np.float64, 1e-10),
                                              (np.float32, np.float32, 2e-6)])
def test_metrics_kernel_multi_block_rows(rng, dtype, acc, rtol):
    from fastloss.cpu import eval_metrics as M

    v = 2 * M.ROW_BLOCK + 905  # three blocks, the last one partial
    n = 12
    x = rng.standard_normal((n, v)) * 3
    t = rng.integers(0, v, n)
    t[0], t[1], t[2] = 5, M.ROW_BLOCK, v - 1  # target at a block start and at the end
    x[3, :] = np.round(x[3, :])  # many ties, within and across blocks
    t[3] = M.ROW_BLOCK + 17
    x[4, M.ROW_BLOCK + 100] = 60.0  # the max jumps by far more than 21 in block 1: redone
    x[5, -1] = 45.0  # ... and in the partial last block
    x[6, rng.random(v) < 0.3] = -np.inf  # masked classes, the target among them
    x[6, 7], t[6] = -np.inf, 7
    x[7, : M.ROW_BLOCK] = -np.inf  # a first block that is all -inf
    x[8, :] = x[8, 0]  # a constant row: every logit ties the target
    t[8] = 2500
    x[9] -= 200.0  # large negative logits (exp underflows against 0)
    x[10] += 1e4  # large positive logits (entropy must not cancel)
    xd = x.astype(dtype)
    loss, ent, conf, rank = (np.empty(n), np.empty(n), np.empty(n), np.empty(n, np.int64))
    M.eval_rows(xd, t, acc(0), 2, loss, ent, conf, rank)
    rl, re, rc, rr = _row_reference(xd, t)
    assert rank.tolist() == rr.tolist()
    finite = np.isfinite(rl)
    assert loss[finite] == pytest.approx(rl[finite], rel=rtol, abs=rtol)
    assert loss[6] == np.inf and rl[6] == np.inf  # the target's logit is -inf
    assert ent == pytest.approx(re, rel=rtol * 10, abs=rtol * 10)
    assert conf == pytest.approx(rc, rel=rtol * 10, abs=rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_metrics_kernel_nan_inf_and_ignored_rows(rng, dtype):
    """(float64 too: its exp of the -88 clamp is not 0, and an all -inf row once got
    entropy log V and confidence 1/V.)"""
    from fastloss.cpu import eval_metrics as M

    v = M.ROW_BLOCK + 300
    x = rng.standard_normal((6, v)).astype(dtype)
    t = np.array([3, 3, 3, 3, 3, -1])
    x[0, v - 2] = np.nan  # NaN in a block summed against the running max
    x[1, 0] = np.nan  # ... in the first block
    x[2, M.ROW_BLOCK + 1] = np.inf
    x[3, :] = -np.inf  # all masked
    x[4, 1] = -np.nan  # a NaN with its sign bit set
    loss, ent, conf, rank = (np.full(6, 7.0), np.full(6, 7.0), np.full(6, 7.0), np.full(6, 7, np.int64))
    M.eval_rows(x, t, dtype(0), 2, loss, ent, conf, rank)
    assert np.isnan(loss[:5]).all() and np.isnan(ent[:5]).all() and np.isnan(conf[:5]).all()
    assert (loss[5], ent[5], conf[5], rank[5]) == (0.0, 0.0, 0.0, -1)  # ignored: written, zero
