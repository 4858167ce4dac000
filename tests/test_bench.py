"""Tests of the benchmark layer (``fastloss.bench``) and ``fastloss bench``.

Tiny shapes, 1-2 repeats and a small bandwidth array keep these fast. Nothing
here asserts on time: only on what is computed, reported and saved.
"""

import json
import math
import os
import re
import subprocess
import sys

import numba
import numpy as np
import pytest
from reference import ce_reference, mse_reference, to_float64

from fastloss.bench import cases as C
from fastloss.bench import runner as R
from fastloss.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_README = os.path.join(ROOT, "benchmarks", "README.md")

MACHINE_KEYS = ("cpu_model", "cores", "numba_threads", "python", "numpy", "numba", "torch",
                "fastloss", "date")
CALIBRATION_KEYS = ("copy_gbps", "read_gbps", "exp_gps", "copy_gbps_best", "read_gbps_best",
                    "exp_gps_best", "bytes", "threads")


@pytest.fixture
def bench_env(monkeypatch, tmp_path):
    """A small bandwidth array and a private default save folder; the thread
    counts that ``fastloss bench`` sets are restored afterwards."""
    monkeypatch.setenv("FASTLOSS_BENCH_CALIBRATION_MIB", "32")
    monkeypatch.setenv("FASTLOSS_BENCH_DIR", str(tmp_path / "saved"))
    numba_threads = numba.get_num_threads()
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    yield tmp_path
    numba.set_num_threads(numba_threads)
    torch = sys.modules.get("torch")
    if torch is not None and torch_threads is not None:
        torch.set_num_threads(torch_threads)


def _ok_rows(result):
    return [r for r in result["results"] if r["status"] == "ok"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_cli_bench_json(bench_env, capsys):
    out = bench_env / "out.json"
    rc = main(["bench", "--shape", "64", "1000", "--repeat", "2", "--json", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "ce-forward-64x1000-float32" in captured.out
    assert "ce-fwd+bwd-64x1000-float32" in captured.out
    assert re.search(r"^provider\s+median ms", captured.out, re.M)
    assert "[1/" in captured.err  # progress on stderr

    result = json.loads(out.read_text())
    assert set(R.RESULT_KEYS) <= set(result)
    assert result["schema"] == R.SCHEMA
    assert set(MACHINE_KEYS) <= set(result["machine"])
    threads = min(R.DEFAULT_THREADS, numba.config.NUMBA_NUM_THREADS)
    assert result["machine"]["numba_threads"] == threads
    assert result["settings"]["threads"] == threads
    assert set(CALIBRATION_KEYS) <= set(result["calibration"])
    rows = result["results"]
    for r in rows:
        assert set(R.ROW_KEYS) <= set(r), set(R.ROW_KEYS) - set(r)
        assert r["status"] in ("ok", "skipped", "error")
    assert not [r for r in rows if r["status"] == "error"]
    providers = {(r["mode"], r["provider"]) for r in _ok_rows(result)}
    for want in [("forward", "fastloss"), ("forward", "torch"), ("forward", "numpy"),
                 ("fwd+bwd", "fastloss-out"), ("fwd+bwd", "fastloss-inplace"),
                 ("fwd+bwd", "fastloss-alloc"), ("fwd+bwd", "torch"), ("fwd+bwd", "numpy")]:
        assert want in providers
    for r in _ok_rows(result):
        assert r["rounds"] == 2 and len(r["times_ms"]) == 2
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["floor_ms"] > 0
        assert r["ratio_to_fastest"] >= 1.0
        assert math.isclose(r["floor_fraction"], r["floor_ms"] / r["median_ms"], rel_tol=1e-9)
    # Every provider that ran (torch.compile included, where it compiles) computed the same loss.
    x = C.make_inputs(C.Case("ce", (64, 1000)))
    want, _ = ce_reference(x["logits"], x["targets"])
    for r in _ok_rows(result):
        assert r["loss"] == pytest.approx(want, rel=1e-5), r["provider"]

    saved = list((bench_env / "saved").glob("*.json"))
    assert len(saved) == 1
    assert json.loads(saved[0].read_text())["results"] == rows


def test_json_keys_documented():
    text = open(BENCH_README).read()
    for key in R.RESULT_KEYS + R.ROW_KEYS + MACHINE_KEYS + CALIBRATION_KEYS:
        assert f"`{key}`" in text, f"benchmarks/README.md does not document {key!r}"


def test_cli_mse_bfloat16(bench_env, capsys):
    out = bench_env / "mse.json"
    rc = main(["bench", "--op", "mse", "--size", "2^12", "--dtype", "bfloat16", "--mode", "fwd+bwd",
               "--providers", "fastloss,numpy", "--repeat", "1", "--no-save", "--quiet",
               "--json", str(out)])
    assert rc == 0
    assert capsys.readouterr().err == ""
    rows = json.loads(out.read_text())["results"]
    assert [(r["provider"], r["status"]) for r in rows] == [
        ("fastloss-out", "ok"), ("fastloss-alloc", "ok"), ("numpy", "skipped")]
    assert rows[0]["case"] == "mse-fwd+bwd-2^12-bfloat16"
    assert rows[0]["bytes_moved"] == 3 * 4096 * 2
    assert "float32 only" in rows[2]["note"]
    assert not (bench_env / "saved").exists()


def test_cli_bench_linear_ce(bench_env, capsys):
    out = bench_env / "lce.json"
    rc = main(["bench", "--op", "lce", "--shape", "64", "32", "500", "--providers",
               "fastloss,blas-floor", "--repeat", "1", "--no-save", "--quiet", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["provider"], r["status"]) for r in rows] == [("fastloss", "ok"), ("blas-floor", "ok")]
    assert rows[0]["case"].startswith("lce-fwd+bwd-64x32x500")


@pytest.mark.parametrize("argv, message", [
    (["--op", "mse", "--shape", "4", "5"], "--shape is for --op ce"),
    (["--size", "2^10"], "--size is for --op mse"),
    (["--providers", "fastloss,bogus"], "unknown provider 'bogus'"),
    (["--shape", "0", "5"], "sizes must be positive"),
    (["--op", "mse", "--size", "two"], "expected a number such as"),
    (["--op", "lce", "--shape", "4", "5"], "--op lce takes 3 numbers (N D V)"),
    (["--shape", "4", "5", "6"], "--op ce takes 2 numbers (N V)"),
    (["--op", "lce", "--mode", "forward"], "fwd+bwd only"),
])
def test_cli_bench_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench"] + argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _run(bench):
    if bench.setup is not None:
        bench.setup()
    return bench.fn()


@pytest.mark.parametrize("dtype, rtol, gtol", [("float32", 1e-5, 1e-6), ("bfloat16", 1e-2, 1e-2)])
@pytest.mark.parametrize("op, shape", [("ce", (7, 1001)), ("mse", (4099,))])
@pytest.mark.parametrize("mode", C.MODES)
def test_providers_agree(op, shape, dtype, rtol, gtol, mode):
    """Each provider's callable computes the loss (and gradient) of the float64
    reference on the same inputs; the inputs are never modified."""
    case = C.Case(op, shape, dtype, mode)
    inputs = C.make_inputs(case, seed=3)
    before = {k: v.copy() for k, v in inputs.items()}
    if op == "ce":
        want, want_grad = ce_reference(inputs["logits"], inputs["targets"])
    else:
        want, want_grad = mse_reference(inputs["pred"], inputs["target"])
    ran = []
    for provider in C.providers_for(case):
        if provider == "torch-compile":
            continue  # compiles for seconds; its loss is checked by test_cli_bench_json
        try:
            bench = C.build(case, inputs, provider)
        except C.Unavailable as e:
            assert provider in ("torch", "numpy", "jax"), (provider, e)
            continue
        ret = _run(bench)
        assert C.loss_value(ret, mode) == pytest.approx(want, rel=rtol, abs=1e-7), provider
        if mode == "fwd+bwd":
            g = C.grad_array(ret)
            assert g.shape == tuple(shape)
            scale = np.abs(want_grad).max()
            np.testing.assert_allclose(g, want_grad, rtol=0, atol=gtol * scale, err_msg=provider)
        ran.append(provider)
        del ret, bench
    for k, v in inputs.items():
        np.testing.assert_array_equal(to_float64(v), to_float64(before[k]), err_msg=k)
    assert ran[0].startswith("fastloss")
    assert ("numpy" in ran) == (dtype == "float32")
    if _has("torch"):
        assert "torch" in ran


def _has(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_inplace_setup_restores_logits():
    case = C.Case("ce", (4, 300), "float32", "fwd+bwd")
    inputs = C.make_inputs(case)
    bench = C.build(case, inputs, "fastloss-inplace")
    first = _run(bench)
    loss1, grad1 = C.loss_value(first, case.mode), C.grad_array(first)
    second = _run(bench)  # the setup restored the logits the first call overwrote
    assert C.loss_value(second, case.mode) == loss1
    np.testing.assert_array_equal(C.grad_array(second), grad1)


def test_cases_cover_the_sweep():
    suite = C.suite_cases()
    ce_shapes = {c.shape for c in suite if c.op == "ce"}
    assert {(4096, 32000), (2048, 128256), (8192, 50257), (512, 262144)} <= ce_shapes
    assert {c.shape for c in suite if c.op == "mse"} == {(1 << 26,), (1 << 28,)}
    assert {c.dtype for c in suite} == {"float32", "bfloat16"}
    assert {c.mode for c in suite} == {"forward", "fwd+bwd"}
    assert len({c.name for c in suite}) == len(suite)
    assert set(C.core_cases()) <= set(suite)
    bwd = C.providers_for(C.Case("ce", (4096, 32000), mode="fwd+bwd"))
    assert {"fastloss-out", "fastloss-inplace", "fastloss-alloc", "torch", "torch-compile",
            "numpy", "jax"} == set(bwd)
    assert C.providers_for(C.Case("ce", (2, 3), mode="fwd+bwd"), ["fastloss"]) == [
        "fastloss-out", "fastloss-inplace", "fastloss-alloc"]


def test_case_work_counts():
    ce = C.Case("ce", (4096, 32000), "bfloat16", "fwd+bwd")
    assert ce.name == "ce-fwd+bwd-4096x32000-bfloat16"
    assert ce.bytes_read == 4096 * 32000 * 2 and ce.bytes_moved == 2 * ce.bytes_read
    assert ce.exp_evals == 4096 * 32000
    m = C.Case("mse", (1 << 26,), "float32", "forward")
    assert m.name == "mse-forward-2^26-float32"
    assert (m.bytes_moved, m.exp_evals) == (2 * 4 << 26, 0)
    with pytest.raises(ValueError, match="shape: expected 2 positive sizes"):
        C.Case("ce", (5,))
    with pytest.raises(ValueError, match="mode: expected one of"):
        C.Case("mse", (5,), mode="backward")


def test_floor_and_ratios_from_given_ceilings():
    cal = {"copy_gbps": 30.0, "read_gbps": 20.0, "exp_gps": 4.0}
    fwd = C.Case("ce", (4096, 32000), "float32", "forward")
    fl, bw, bound = R.floor(fwd, cal)
    assert bw == 20.0 and bound == "exp"
    assert fl == pytest.approx(4096 * 32000 / 4e9)
    bwd = C.Case("ce", (4096, 32000), "float32", "fwd+bwd")
    fl2, bw2, bound2 = R.floor(bwd, cal)
    assert (bw2, bound2) == (30.0, "memory")
    assert fl2 == pytest.approx(2 * 4 * 4096 * 32000 / 30e9)
    rows = []
    for provider, t in [("fastloss-out", 0.1), ("fastloss-inplace", 0.08), ("torch", 0.4),
                        ("numpy", 1.6)]:
        rows.append(R.fill_row(R.new_row(bwd, provider), bwd, [t, t * 2, t / 2], cal))
    R.add_ratios(rows)
    by = {r["provider"]: r for r in rows}
    assert by["fastloss-out"]["gbps"] == pytest.approx(bwd.bytes_moved / 0.1 / 1e9)
    assert by["fastloss-out"]["bw_fraction"] == pytest.approx(by["fastloss-out"]["gbps"] / 30.0)
    assert by["fastloss-out"]["floor_fraction"] == pytest.approx(fl2 / 0.1)
    assert by["fastloss-inplace"]["ratio_to_fastest"] == 1.0
    assert by["fastloss-out"]["ratio_to_fastest_peer"] == pytest.approx(0.25)  # peer: torch
    assert by["torch"]["ratio_to_fastest_peer"] == pytest.approx(5.0)  # peer: fastloss-inplace
    text = R.format_table({"machine": {"date": "d", "cpu_model": "cpu", "cores": 2,
                                       "numba_threads": 2, "torch_threads": 2},
                           "calibration": cal, "results": rows})
    assert "ce-fwd+bwd-4096x32000-float32" in text and "memory-bound" in text


_NO_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch blocked for this test")
sys.meta_path.insert(0, _Block())
from fastloss.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_without_torch(bench_env):
    out = bench_env / "nt.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, "bench", "--shape", "16", "300", "--repeat", "1",
         "--mode", "forward", "--no-save", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    status = {r["provider"]: (r["status"], r["note"]) for r in result["results"]}
    assert status["fastloss"][0] == "ok" and status["numpy"][0] == "ok"
    for p in ("torch", "torch-compile"):
        assert status[p][0] == "skipped" and "torch is not installed" in status[p][1]
    assert result["machine"]["torch"] is None
    assert "torch is not installed" in proc.stdout


def test_import_does_not_import_torch():
    code = ("import sys, fastloss, fastloss.cli, fastloss.bench.cases, fastloss.bench.machine, "
            "fastloss.bench.runner; print('torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_torch_compile_failure_skips(monkeypatch):
    torch = pytest.importorskip("torch")

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    case = C.Case("ce", (4, 50), "float32", "forward")
    with pytest.raises(C.Unavailable, match="torch.compile failed: RuntimeError: no C"):
        C.build(case, C.make_inputs(case), "torch-compile")
