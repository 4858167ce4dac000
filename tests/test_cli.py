"""The ``fastloss`` command: --version, --help, and the demo training run."""

import math
import subprocess
import sys

import pytest

import fastloss
from fastloss.cli import main
from fastloss.demo import run_demo


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastloss {fastloss.__version__}"
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "usage: fastloss" in out


def test_demo_trains_and_reports(capsys):
    assert main(["demo", "--steps", "12", "--vocab", "64", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "uniform baseline ln V = 4.1589" in out
    assert "closed" in out


def test_demo_loss_decreases_towards_teacher():
    res = run_demo(steps=40, vocab=64, dim=16, n_train=4096, n_val=1024, log_every=10)
    steps, train, val = zip(*res["history"])
    assert train[0] == pytest.approx(math.log(64), rel=1e-6)  # zero weights: uniform
    assert train[-1] < train[0] - 0.5 and val[-1] < val[0] - 0.5
    assert val[-1] > res["teacher_loss"] - 0.2  # cannot beat the teacher by much


def test_demo_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "fastloss.cli", "demo", "--steps", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--steps" in proc.stderr
