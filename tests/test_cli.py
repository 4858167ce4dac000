"""The ``fastloss`` command: --version, --help, and the demo (a character-level language model)."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import fastloss
from fastloss.cli import main
from fastloss.demo import CharMLP, build_vocab, encode, load_text, run_demo
from fastloss.evaluation.curves import read_log


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastloss {fastloss.__version__}"
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "curves" in out and "usage: fastloss" in out
    assert "compare" in out


def test_eval_and_compare_share_the_stream_options(capsys):
    """The shared options (cli.evaluate.add_stream_options) appear in both commands' help."""
    helps = {}
    for cmd in ("eval", "compare"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        helps[cmd] = capsys.readouterr().out
    for flag in ("--ignore-index", "--seq-len", "--shift", "--dtype", "--vocab", "--hidden-dim",
                 "--targets-dtype", "--logits-key", "--lm-head-key", "--chunk-tokens",
                 "--progress", "--no-progress", "--debug", "--json", "--plot"):
        assert flag in helps["eval"] and flag in helps["compare"], flag
    for flag in ("--base-hidden", "--model-lm-head", "--top", "--tmpdir"):
        assert flag in helps["compare"], flag


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick demo run with its files kept (shared by the tests that only read it)."""
    out = tmp_path_factory.mktemp("demo")
    return run_demo(quick=True, seed=1, out=out), out


def test_corpus_split_and_vocabulary():
    train, val = load_text()
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.101  # (plus the joining blank lines)
    vocab = build_vocab(train, 20)
    assert len(vocab) == 21 and vocab[-1] == "<unk>" and vocab[0] == " "
    ids = encode("a \u2603" + vocab[1], vocab)
    assert ids.dtype == np.int64
    assert ids[1] == 0 and ids[2] == 20 and ids[3] == 1  # the snowman is <unk>
    assert ids[0] == (vocab.index("a") if "a" in vocab else 20)


def test_model_gradients_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    model = CharMLP(vocab=13, context=3, embed=4, hidden=7, rng=rng)
    for k in ("b1", "b2"):
        model.params[k] += rng.standard_normal(model.params[k].shape).astype(np.float32)
    ids = rng.integers(0, 13, 50)
    pos = np.arange(3, 50)
    logits, cache = model.forward(ids, pos)
    loss, grad = fastloss.cross_entropy_with_grad(logits, ids[pos])
    grads = model.backward(grad, cache)

    p = {k: torch.tensor(v.astype(np.float64), requires_grad=True) for k, v in model.params.items()}
    ctx = torch.tensor(ids[pos[:, None] + np.arange(-3, 0)])
    h = torch.tanh(p["emb"][ctx].reshape(len(pos), -1) @ p["w1"] + p["b1"])
    ref = torch.nn.functional.cross_entropy(h @ p["w2"] + p["b2"], torch.tensor(ids[pos]))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    for k, g in grads.items():
        assert g.dtype == np.float32 and g.shape == model.params[k].shape
        np.testing.assert_allclose(g, p[k].grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


def test_quick_demo_learns_and_beats_the_unigram_baseline(quick_run):
    res, _ = quick_run
    steps, train, val = (np.array(c) for c in zip(*res["history"]))
    V = len(res["vocab"])
    assert res["uniform"] == pytest.approx(math.log(V))
    assert train[0] == pytest.approx(math.log(V), abs=0.02)  # untrained: about uniform
    assert val[0] == pytest.approx(math.log(V), abs=0.02)
    assert steps[-1] == 300 and np.all(np.diff(steps) > 0)
    assert train[-1] < res["unigram"] - 0.4 and val[-1] < res["unigram"] - 0.4
    assert res["unigram"] < res["uniform"] - 0.5
    report = res["report"]
    assert report.mean_loss == pytest.approx(val[-1], rel=1e-5)  # quick: the dump is the logged sample
    assert report.mean_loss < report.unigram_baseline and report.train_loss == train[-1]
    curves = res["curves"]
    assert curves.points == len(steps) and curves.underfitting is False
    assert curves.final_train_loss == pytest.approx(train[-1], abs=1e-6)
    assert res["kernel_seconds"] > 0


def test_demo_files_are_real(quick_run):
    res, out = quick_run
    files = res["files"]
    assert all(os.path.dirname(p) == str(out) and os.path.exists(p) for p in files.values())
    logits = np.load(files["val_logits.npy"])
    targets = np.load(files["val_targets.npy"])
    V = len(res["vocab"])
    assert logits.dtype == np.float32 and logits.shape == (2048, V) and targets.shape == (2048,)
    # the evaluation report is the dump's cross-entropy, checked in float64 numpy
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    assert res["report"].mean_loss == pytest.approx(np.mean(lse - z[np.arange(len(z)), targets]), rel=1e-5)
    log = read_log(files["train_log.csv"])
    steps, train, val = zip(*res["history"])
    np.testing.assert_array_equal(log.steps, steps)
    np.testing.assert_allclose(log.train_loss, train, atol=1e-6)
    np.testing.assert_allclose(log.val_loss, val, atol=1e-6)


def test_demo_is_deterministic_and_cleans_up(quick_run):
    res, _ = quick_run
    again = run_demo(quick=True, seed=1, steps=60)
    assert again["history"] == res["history"][:4]  # same seed: the same numbers (steps 0-60)
    assert not os.path.exists(again["folder"])  # the temporary folder is removed
    other = run_demo(quick=True, seed=2, steps=60)
    assert other["history"][1] != again["history"][1]


def test_demo_cli_prints_the_reports(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--steps", "100", "--seed", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pydoc_data.topics" in text and "uniform ln V = 4.1744" in text
    assert "fastloss eval:" in text and "fastloss curves:" in text
    assert "Result: validation loss" in text
    assert "Beyond the unigram baseline (counts from the training characters): the loss is" in text
    assert sorted(os.listdir(out)) == ["curves.json", "eval_report.json", "train_log.csv",
                                       "val_logits.npy", "val_targets.npy", "vocab.json"]
    assert read_log(out / "train_log.csv").steps[-1] == 100


def test_demo_prints_no_path_of_its_temporary_folder(capsys):
    import tempfile

    assert main(["demo", "--quick", "--steps", "60", "--seed", "4"]) == 0
    text = capsys.readouterr().out
    assert "fastloss-demo-" not in text and tempfile.gettempdir() not in text
    assert "fastloss curves: train_log.csv: 4 training points" in text


def test_demo_has_one_unigram_baseline(quick_run, capsys):
    res, _ = quick_run
    report, curves = res["report"], res["curves"]
    u = res["unigram"]
    assert report.unigram_baseline == u and report.unigram_source == "training characters"
    assert curves.baselines == {"uniform baseline ln V": res["uniform"],
                                "unigram baseline (counts from the training characters)": u}
    # the frequencies of the training split, on the dumped validation characters
    targets = np.load(res["files"]["val_targets.npy"])
    ids = encode(load_text()[0], res["vocab"])
    freq = np.bincount(ids, minlength=len(res["vocab"])) / len(ids)
    assert u == pytest.approx(-np.mean(np.log(freq[targets])), rel=1e-12)
    assert report.to_dict()["unigram_source"] == "training characters"
    # every printed unigram number is that one
    again = run_demo(quick=True, seed=1, steps=60, stream=sys.stdout)
    text = capsys.readouterr().out
    # (the "Beyond the unigram baseline" sentences give distances, not the baseline)
    values = re.findall(r"unigram[^\n]*?(\d+\.\d{4})", re.sub(r"Beyond[^\n]*", "", text))
    assert len(values) >= 4 and set(values) == {f"{again['unigram']:.4f}"}, values
    assert "counts from the training characters" in text and "evaluated tokens" not in text
    assert f"train loss        {again['history'][-1][1]:.4f} nats (mean minibatch loss of steps " \
           f"41-60, logged at step 60)" in text


def test_demo_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    res = run_demo(quick=True, steps=40, plot=tmp_path / "plots")
    for path in res["plots"].values():
        with open(path, "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps: expected a positive integer, found 0"),
    (["--steps", "x"], "argument --steps: invalid int value"),
    (["--seed", "1.5"], "argument --seed: invalid int value"),
    (["--vocab", "64"], "unrecognized arguments: --vocab"),
])
def test_demo_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo"] + argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_demo_rejects_a_file_as_out(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for opt in ("--out", "--plot"):
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--quick", opt, str(f)])
        assert exc.value.code == 2 and f"{opt}: {f} exists and is not a folder" in capsys.readouterr().err


def test_demo_module_entry_point_exit_status():
    proc = subprocess.run([sys.executable, "-m", "fastloss.cli", "demo", "--steps", "0"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "--steps" in proc.stderr


@pytest.mark.slow
def test_full_demo_beats_the_unigram_baseline_by_a_wide_margin(capsys):
    res = run_demo(stream=sys.stdout)
    assert res["final_val"] < res["unigram"] - 1.0
    assert res["curves"].underfitting is False
    assert res["report"].tokens == len(load_text()[1]) - 8
    assert "Result: validation loss" in capsys.readouterr().out
