"""Tests of the benchmark layer (``fastloss.bench``) and ``fastloss bench``.

Tiny shapes, 1-2 repeats and a small bandwidth array keep these fast. Nothing
here asserts on time: only on what is computed, reported and saved.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numba
import numpy as np
import pytest
from reference import ce_reference, mse_reference, soft_ce_reference, to_float64
from reference_distill import distill_reference

from fastloss.bench import cases as C
from fastloss.bench import machine as M
from fastloss.bench import runner as R
from fastloss.bench import runs as S
from fastloss.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_README = os.path.join(ROOT, "benchmarks", "README.md")

MACHINE_KEYS = ("cpu_model", "cores", "numba_threads", "python", "numpy", "numba", "torch",
                "fastloss")
CALIBRATION_KEYS = ("copy_gbps", "read_gbps", "exp_gps", "first_touch_gbps", "exp_source",
                    "exp_fastloss_gps", "exp_numpy_gps", "copy_gbps_spread", "read_gbps_spread",
                    "exp_gps_spread", "first_touch_gbps_spread", "copy_gbps_rounds", "rounds",
                    "stable", "bytes", "threads")
CONDITION_KEYS = ("date", "load_start", "load_end", "load1", "own", "own_share")


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
    assert "date" not in result["machine"]  # what changes between runs is kept apart
    assert result["conditions"]["date"].startswith("20")
    for when in ("load_start", "load_end"):
        assert {"load1", "own", "own_share"} <= set(result["conditions"][when])
    assert isinstance(result["warnings"], list)
    assert result["calibration"]["exp_source"] in ("fastloss exp_f32", "numpy np.exp")
    assert result["calibration"]["exp_gps"] == max(result["calibration"]["exp_fastloss_gps"],
                                                   result["calibration"]["exp_numpy_gps"])
    threads = min(R.DEFAULT_THREADS, numba.config.NUMBA_NUM_THREADS)
    assert result["machine"]["numba_threads"] == threads
    assert result["settings"]["threads"] == threads
    assert set(CALIBRATION_KEYS) <= set(result["calibration"])
    assert set(CALIBRATION_KEYS) <= set(result["calibration_end"])
    cal = result["calibration"]
    assert M.CALIBRATION_MIN_ROUNDS <= cal["rounds"] <= M.CALIBRATION_MAX_ROUNDS
    assert cal["copy_gbps"] == max(cal["copy_gbps_rounds"]) and cal["first_touch_gbps"] > 0
    assert "ceilings: copy" in captured.out and "at the end: copy" in captured.out
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
        fresh = r["mode"] == "fwd+bwd" and r["provider"] in C.FRESH_GRADIENT
        assert (r["floor_touch_ms"] > 0) == fresh and r["floor_bound"].endswith("+first-touch") == fresh
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
    for key in R.RESULT_KEYS + R.ROW_KEYS + MACHINE_KEYS + CALIBRATION_KEYS + CONDITION_KEYS:
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


def test_cli_bench_soft_ce_and_distill(bench_env, capsys):
    """--op soft-ce and --op distill (--kind kl jsd): one case per kind, dtype and
    mode, the floors' bytes and exps of the pair ops, every provider's loss that
    of the reference."""
    pytest.importorskip("torch")
    out = bench_env / "soft.json"
    rc = main(["bench", "--op", "soft-ce", "--shape", "16", "300", "--providers", "fastloss,torch",
               "--repeat", "1", "--no-save", "--quiet", "--json", str(out)])
    assert rc == 0
    assert "soft-ce-fwd+bwd-16x300-float32: moves 0.1 MB, 0.0 M exp" in capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert [(r["case"], r["provider"]) for r in rows] == [
        ("soft-ce-forward-16x300-float32", "fastloss"), ("soft-ce-forward-16x300-float32", "torch"),
        ("soft-ce-fwd+bwd-16x300-float32", "fastloss-out"), ("soft-ce-fwd+bwd-16x300-float32", "torch")]
    out2 = bench_env / "distill.json"
    rc = main(["bench", "--op", "distill", "--kind", "kl", "jsd", "kl", "--dtype", "bfloat16",
               "--mode", "fwd+bwd", "--shape", "16", "300", "--providers", "fastloss,torch",
               "--repeat", "1", "--no-save", "--quiet", "--json", str(out2)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "distill-jsd-fwd+bwd-16x300-bfloat16: moves 0.0 MB, 0.0 M exp" in text
    rows += json.loads(out2.read_text())["results"]
    assert [(r["op"], r["provider"]) for r in rows[4:]] == [
        ("distill-kl", "fastloss-out"), ("distill-kl", "torch"),
        ("distill-jsd", "fastloss-out"), ("distill-jsd", "torch")]
    for r in rows:
        assert r["status"] == "ok", (r["case"], r["provider"], r["note"])
        case = C.Case(r["op"], tuple(r["shape"]), r["dtype"], r["mode"])
        elements, itemsize = 16 * 300, 2 if r["dtype"] == "bfloat16" else 4
        assert r["bytes_moved"] == elements * itemsize * (3 if r["mode"] == "fwd+bwd" else 2)
        assert r["exp_evals"] == elements * (1 if r["op"] == "soft-ce" else 2)
        want, _ = _reference(case, C.make_inputs(case))
        assert r["loss"] == pytest.approx(want, rel=1e-5 if r["dtype"] == "float32" else 1e-3), \
            (r["case"], r["provider"])


@pytest.mark.parametrize("argv, message", [
    (["--op", "mse", "--shape", "4", "5"], "--shape is for --op ce"),
    (["--size", "2^10"], "--size is for --op mse"),
    (["--providers", "fastloss,bogus"], "unknown provider 'bogus'"),
    (["--shape", "0", "5"], "sizes must be positive"),
    (["--op", "mse", "--size", "two"], "expected a number such as"),
    (["--op", "lce", "--shape", "4", "5"], "--op lce takes 3 numbers (N D V)"),
    (["--shape", "4", "5", "6"], "--op ce takes 2 numbers (N V)"),
    (["--op", "lce", "--mode", "forward"], "fwd+bwd only"),
    (["--op", "distill", "--shape", "4", "5", "6"], "--op distill takes 2 numbers (N V)"),
    (["--op", "soft-ce", "--size", "2^10"], "--size is for --op mse"),
    (["--op", "mse", "--shape", "4", "5"], "--shape is for --op ce, soft-ce, distill and lce"),
    (["--kind", "jsd"], "--kind is for --op distill, found --op ce"),
    (["--op", "soft-ce", "--kind", "kl"], "--kind is for --op distill, found --op soft-ce"),
    (["--op", "distill", "--kind", "reverse_kl"], "invalid choice: 'reverse_kl'"),
    (["--small", "--kind", "kl"], "--kind: --small runs its own set"),
    (["--op", "torch-step", "--kind", "kl"], "--kind does not apply to --op torch-step"),
    (["--small", "--shape", "4", "5"], "--shape: --small runs its own set"),
    (["--small", "--op", "mse"], "--op: --small runs its own set"),
    (["--save", "a/b"], "--save takes a name (give the folder with --dir)"),
    (["--save", "x", "--no-save"], "--save and --no-save"),
    (["--list", "--compare"], "--list and --compare: give one of them"),
    (["--compare", "only-one"], "--compare: give two runs or more"),
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


def _reference(case, inputs):
    """(loss, grad) of ``case`` on ``inputs`` by the float64 references of the test suite."""
    if case.op == "ce":
        return ce_reference(inputs["logits"], inputs["targets"])
    if case.op == "soft-ce":
        return soft_ce_reference(inputs["logits"], inputs["probs"])
    if case.distill_kind is not None:
        return distill_reference(inputs["student"], inputs["teacher"], kind=case.distill_kind,
                                 temperature=C.DISTILL_TEMPERATURE, beta=C.DISTILL_BETA)
    return mse_reference(inputs["pred"], inputs["target"])


@pytest.mark.parametrize("dtype, rtol, gtol", [("float32", 1e-5, 1e-6), ("bfloat16", 1e-2, 1e-2)])
# gloose: the gradient tolerance's factor for the op; torch's float32 JSD takes the
# mixture's log-probabilities by logsumexp of rounded log-probabilities (~1e-6 of the max).
@pytest.mark.parametrize("op, shape, gloose", [
    ("ce", (7, 1001), 1), ("mse", (4099,), 1), ("soft-ce", (7, 1001), 1),
    ("distill-kl", (7, 1001), 1), ("distill-jsd", (7, 1001), 4)])
@pytest.mark.parametrize("mode", C.MODES)
def test_providers_agree(op, shape, gloose, dtype, rtol, gtol, mode):
    """Each provider's callable computes the loss (and gradient) of the float64
    reference on the same inputs; the inputs are never modified."""
    gtol = max(gtol, gloose * gtol) if dtype == "float32" else gtol
    case = C.Case(op, shape, dtype, mode)
    inputs = C.make_inputs(case, seed=3)
    before = {k: v.copy() for k, v in inputs.items()}
    want, want_grad = _reference(case, inputs)
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
    assert ("numpy" in ran) == (dtype == "float32" and op in ("ce", "mse"))
    if _has("torch"):
        assert "torch" in ran


_SLOW_COMPILE = pytest.mark.slow  # torch.compile: seconds per function on the project's machine


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("op", [pytest.param("soft-ce", marks=_SLOW_COMPILE),
                                pytest.param("distill-kl", marks=_SLOW_COMPILE), "distill-jsd"])
def test_torch_compile_pair_ops_agree(op):
    """torch.compile of the probability-target and distillation functions gives
    the reference's loss and gradient (skipped where it does not compile)."""
    pytest.importorskip("torch")
    case = C.Case(op, (5, 333), "float32", "fwd+bwd")
    inputs = C.make_inputs(case, seed=4)
    want, want_grad = _reference(case, inputs)
    try:
        bench = C.build(case, inputs, "torch-compile")
    except C.Unavailable as e:
        pytest.skip(str(e))
    ret = _run(bench)
    assert C.loss_value(ret, case.mode) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(C.grad_array(ret), want_grad, rtol=0,
                               atol=1e-6 * np.abs(want_grad).max())


@pytest.mark.parametrize("dtype", C.DTYPES)
def test_pair_op_inputs(dtype):
    """soft-ce targets are distributions in the case's dtype (within the
    library's tolerance); the teacher is the student plus noise, both in the
    case's dtype; the two modes share one set of inputs."""
    from fastloss import config
    soft = C.make_inputs(C.Case("soft-ce", (9, 4097), dtype), seed=5)
    assert soft["logits"].dtype == soft["probs"].dtype == C._dtype(dtype)
    q = to_float64(soft["probs"])
    assert (q >= 0).all() and q.max() > 4.0 / 4097  # peaked: uniform**4 peaks at ~5x the mean
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=config.SOFT_TARGET_SUM_TOL / 10)
    dist = C.make_inputs(C.Case("distill-jsd", (9, 4097), dtype, "fwd+bwd"), seed=5)
    s, t = to_float64(dist["student"]), to_float64(dist["teacher"])
    assert dist["student"].dtype == dist["teacher"].dtype == C._dtype(dtype)
    assert 0.5 < np.std(t - s) < 1.5 and 1.5 < np.std(s) < 2.5
    again = C.make_inputs(C.Case("distill-jsd", (9, 4097), dtype, "forward"), seed=5)
    np.testing.assert_array_equal(to_float64(again["teacher"]), t)


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
    for op in ("soft-ce", "distill-kl", "distill-jsd"):
        got = {(c.dtype, c.mode) for c in suite if c.op == op and c.shape == (4096, 32000)}
        assert got == {(d, m) for d in C.DTYPES for m in C.MODES}, op
        assert any(c.op == op for c in C.quick_cases()), op
        assert C.providers_for(C.Case(op, (2, 3), mode="forward")) == [
            "fastloss", "torch", "torch-compile"]
        assert C.providers_for(C.Case(op, (2, 3), mode="fwd+bwd")) == [
            "fastloss-out", "torch", "torch-compile"]


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
    soft = C.Case("soft-ce", (4096, 32000), "float32", "fwd+bwd")
    assert soft.name == "soft-ce-fwd+bwd-4096x32000-float32"
    assert soft.bytes_read == 2 * 4 * 4096 * 32000  # logits and probabilities
    assert soft.bytes_written == 4 * 4096 * 32000 and soft.exp_evals == 4096 * 32000
    kl = C.Case("distill-kl", (4096, 32000), "bfloat16", "forward")
    assert kl.name == "distill-kl-forward-4096x32000-bfloat16" and kl.distill_kind == "kl"
    assert (kl.bytes_read, kl.bytes_written) == (2 * 2 * 4096 * 32000, 0)  # student and teacher
    assert kl.exp_evals == 2 * 4096 * 32000  # both softmaxes
    jsd = C.Case("distill-jsd", (3, 7), "float32", "fwd+bwd")
    assert (jsd.distill_kind, jsd.bytes_moved, jsd.exp_evals) == ("jsd", 3 * 4 * 21, 42)
    assert soft.distill_kind is None
    with pytest.raises(ValueError, match="op: expected one of ce, soft-ce, distill-kl"):
        C.Case("distill", (4, 5))
    with pytest.raises(ValueError, match="shape: expected 2 positive sizes for op 'soft-ce'"):
        C.Case("soft-ce", (4, 5, 6))


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
    assert all(r["floor_touch_ms"] == 0 for r in rows)  # no first-touch rate measured


def test_first_touch_floor_of_fresh_gradients():
    """A provider returning a new gradient pays the first touch of its pages: its floor
    adds ``bytes written / first_touch_gbps``; reused and in-place buffers do not."""
    cal = {"copy_gbps": 30.0, "read_gbps": 20.0, "exp_gps": 4.0, "first_touch_gbps": 8.0}
    bwd = C.Case("ce", (4096, 32000), "float32", "fwd+bwd")
    fl, _, _ = R.floor(bwd, cal)
    touch = bwd.bytes_written / 8e9
    rows = {p: R.fill_row(R.new_row(bwd, p), bwd, [0.2], cal)
            for p in ("fastloss-out", "fastloss-inplace", "fastloss-alloc", "torch")}
    for p in ("fastloss-alloc", "torch"):
        assert rows[p]["floor_ms"] == pytest.approx((fl + touch) * 1e3)
        assert rows[p]["floor_touch_ms"] == pytest.approx(touch * 1e3)
        assert rows[p]["floor_bound"] == "memory+first-touch"
    for p in ("fastloss-out", "fastloss-inplace"):
        assert rows[p]["floor_ms"] == pytest.approx(fl * 1e3) and rows[p]["floor_touch_ms"] == 0
    fwd = C.Case("ce", (4096, 32000), "float32", "forward")
    assert R.touch_floor(fwd, cal, "torch") == 0.0


def test_calibration_rounds_until_the_best_settles(monkeypatch):
    """Rounds go on until no ceiling's best grew by more than CALIBRATION_TOL over the
    last two rounds; every ceiling is its best round's figure, with its spread."""
    seq = [40, 44, 52, 53, 53.5, 53, 20, 20]  # copy GB/s per round; the rest stays put
    calls = []

    def fake_round(src, repeat):
        k = len(calls)
        calls.append(k)
        return {"copy_gbps": float(seq[k]), "read_gbps": 45.0, "exp_gps": 20.0, "first_touch_gbps": 8.0,
                "exp_fastloss_gps": 20.0, "exp_numpy_gps": 10.0, "bytes": 4096}

    monkeypatch.setattr(M, "_round", fake_round)
    cal = M.calibrate(1 << 12, cached=False)
    # after round 5 (53.5): best 53.5 vs 52 two rounds earlier, +2.9% <= 3%: settled
    assert cal["rounds"] == 5 and cal["stable"] is True
    assert cal["copy_gbps"] == 53.5 and cal["copy_gbps_rounds"] == [40.0, 44.0, 52.0, 53.0, 53.5]
    assert cal["copy_gbps_spread"] == pytest.approx((53.5 - 40) / 53.5)
    assert cal["read_gbps_spread"] == 0 and cal["exp_source"] == "fastloss exp_f32"
    warnings = M.noise_warnings(cal, {}, 2, 2)
    assert any(w.startswith("noisy ceilings: copy bandwidth varied by 25% over 5") for w in warnings)

    growing = iter(range(100))
    monkeypatch.setattr(M, "_round", lambda src, repeat: dict(fake_round(src, repeat),
                                                             copy_gbps=10.0 * 1.1 ** next(growing)))
    calls.clear()
    cal = M.calibrate(1 << 12, cached=False)
    assert cal["rounds"] == M.CALIBRATION_MAX_ROUNDS and cal["stable"] is False
    assert any(w.startswith("unsettled ceilings") for w in M.noise_warnings(cal, {}, 2, 2))


def test_calibration_moves_flags_a_ceiling_that_moved():
    start = {"copy_gbps": 45.0, "read_gbps": 60.0, "exp_gps": 20.0, "first_touch_gbps": 8.0}
    assert M.calibration_moves(start, dict(start, copy_gbps=48.0)) == []  # +7%
    [w] = M.calibration_moves(start, dict(start, copy_gbps=71.0))
    assert w.startswith("calibration moved: copy bandwidth 45 at the start of the run, 71 at the end (+58%")


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


# --- runs that compare: machine_info, noise warnings, speedup, saved runs -----

def _load_conftest():
    path = os.path.join(ROOT, "benchmarks", "conftest.py")
    spec = importlib.util.spec_from_file_location("fastloss_bench_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _generated_machine_info():
    """What pytest-benchmark generates before the hooks, clock included."""
    plugin = pytest.importorskip("pytest_benchmark.plugin")
    return plugin.pytest_benchmark_generate_machine_info()


def test_benchmark_machine_info_is_stable(monkeypatch):
    """Two runs on one machine give pytest-benchmark equal machine_info, so
    --benchmark-compare does not warn: no date, no ceilings, no current clock,
    and the threads the suite sets rather than those in force."""
    conftest = _load_conftest()
    first = _generated_machine_info()
    conftest.pytest_benchmark_update_machine_info(None, first)
    saved = json.loads(json.dumps(first))  # as pytest-benchmark saves and reloads it
    # A second run: a session that has measured its ceilings, other threads in
    # force, another clock reading.
    monkeypatch.setitem(conftest._STATE, "calibration", {"copy_gbps": 1.0})
    monkeypatch.setitem(conftest._STATE, "conditions", M.run_conditions())
    numba_threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        second = _generated_machine_info()
        if isinstance(second.get("cpu"), dict):
            second["cpu"]["hz_actual"] = [123, 0]
            second["cpu"]["hz_actual_friendly"] = "0.0001 GHz"
        conftest.pytest_benchmark_update_machine_info(None, second)
    finally:
        numba.set_num_threads(numba_threads)
    assert json.loads(json.dumps(second)) == saved
    info = saved["fastloss"]["machine"]
    assert "date" not in info and "calibration" not in saved["fastloss"]
    assert set(MACHINE_KEYS) <= set(info)
    assert info["numba_threads"] == min(R.DEFAULT_THREADS, numba.config.NUMBA_NUM_THREADS)
    assert M.machine_info_for_json(2) == M.machine_info_for_json(2)


_CAL = {"copy_gbps": 40.0, "read_gbps": 45.0, "exp_gps": 20.0, "copy_gbps_spread": 0.02,
        "read_gbps_spread": 0.03, "exp_gps_spread": 0.01, "rounds": 3, "stable": True}


def _load(load1, own_share):
    return {"load1": load1, "own": own_share, "own_share": own_share, "mark": [0.0, 0.0]}


@pytest.mark.parametrize("cores, threads, start, end, busy", [
    (2, 2, _load(0.2, 0.0), _load(2.3, 2.0), False),   # only this run's own load
    (2, 2, _load(1.2, 0.0), _load(2.1, 2.0), True),    # someone else on a core at the start
    (2, 2, _load(0.1, 0.0), _load(3.0, 1.2), True),    # ... at the end
    (8, 2, _load(5.9, 0.0), _load(7.5, 2.0), False),   # 6 cores free: 5.9 is fine
    (8, 2, _load(6.6, 0.0), _load(6.0, 1.0), True),
    (2, 2, _load(None, 0.0), _load(None, 0.0), False),  # no load average here
])
def test_noise_warning_busy(cores, threads, start, end, busy):
    conditions = {"date": "d", "load_start": start, "load_end": end}
    warnings = M.noise_warnings(_CAL, conditions, cores, threads)
    assert bool(warnings) == busy, warnings
    assert all(w.startswith("busy machine") for w in warnings)


@pytest.mark.parametrize("change, want", [
    ({}, None),
    ({"read_gbps": 30.0}, "inconsistent ceilings: read bandwidth 30.0 GB/s below copy"),
    ({"copy_gbps_spread": 0.15}, "noisy ceilings: copy bandwidth varied by 15% over 3 calibration rounds"),
    ({"exp_gps_spread": 0.12}, "noisy ceilings: exp rate varied by 12% over 3 calibration rounds (> 10%)"),
    ({"stable": False}, "unsettled ceilings: the best figures still grew after 3 calibration rounds"),
])
def test_noise_warning_ceilings(change, want):
    quiet = {"load_start": _load(0.0, 0.0), "load_end": _load(2.0, 2.0)}
    warnings = M.noise_warnings(dict(_CAL, **change), quiet, 2, 2)
    if want is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and want in warnings[0], warnings


def test_load_sample_counts_own_share():
    s = M.load_sample()
    assert s["own"] >= 0 and 0 <= s["own_share"] <= s["own"] + 1e-9
    later = M.load_sample(since=s["mark"])
    assert later["own_share"] <= later["own"] + 1e-9
    assert M.other_load({"load1": 1.5, "own_share": 0.5}) == 1.0
    assert M.other_load({"load1": 0.2, "own_share": 0.5}) == 0.0
    assert M.other_load({"load1": None}) is None


def _fake_result(medians, date, cpu="cpu", warnings=()):
    """A saved-run-shaped result with the given (case, provider) -> median ms."""
    cal = dict(_CAL, exp_source="fastloss exp_f32")
    rows = []
    for (case, provider), ms in medians.items():
        c = C.Case("ce", (64, 1000), "float32", case)
        rows.append(R.fill_row(R.new_row(c, provider), c, [ms / 1e3], cal))
    R.add_ratios(rows)
    machine = {"cpu_model": cpu, "cores": 2, "numba_threads": 2, "torch_threads": 2,
               "fastloss": "x", "python": "3", "numpy": "2", "numba": "0", "torch": "2"}
    return {"schema": R.SCHEMA, "machine": machine, "conditions": {"date": date},
            "calibration": cal, "settings": {}, "warnings": list(warnings), "results": rows}


def test_speedup_vs_torch_column():
    r = _fake_result({("forward", "fastloss"): 2.0, ("forward", "torch"): 10.0,
                      ("forward", "numpy"): 20.0}, "2026-01-01")
    by = {row["provider"]: row for row in r["results"]}
    assert by["fastloss"]["speedup_vs_torch"] == pytest.approx(5.0)
    assert by["torch"]["speedup_vs_torch"] == pytest.approx(1.0)
    assert by["numpy"]["speedup_vs_torch"] == pytest.approx(0.5)
    text = R.format_table(r)
    assert re.search(r"^provider .* vs torch$", text, re.M)
    assert re.search(r"^fastloss .* 5\.00x$", text, re.M)
    assert "exp 20.00 G/s (fastloss exp_f32)" in text
    no_torch = _fake_result({("forward", "fastloss"): 2.0}, "2026-01-01")
    assert no_torch["results"][0]["speedup_vs_torch"] is None
    assert re.search(r"^fastloss .* -$", R.format_table(no_torch), re.M)


def test_warnings_printed_in_table():
    r = _fake_result({("forward", "fastloss"): 2.0}, "2026-01-01", warnings=["busy machine: x"])
    assert "WARNING: busy machine: x" in R.format_table(r)


def test_cli_help_has_the_legend(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    for column in ("median ms", "% bw", "floor ms", "% floor", "x fastest", "x peer", "vs torch"):
        assert column in out
    assert "fastloss exp_f32" in out and "np.exp" in out
    assert "--compare" in out and "--list" in out and "benchmarks/README.md" not in out


def test_cli_list_and_compare(tmp_path, capsys):
    runs = tmp_path / "runs"
    a = _fake_result({("forward", "fastloss"): 2.0, ("forward", "torch"): 10.0,
                      ("fwd+bwd", "fastloss-out"): 4.0}, "2026-01-01T00:00:00+00:00")
    b = _fake_result({("forward", "fastloss"): 1.0, ("forward", "torch"): 12.0},
                     "2026-01-02T00:00:00+00:00", cpu="other cpu", warnings=["busy machine: y"])
    R.save(a, str(runs), "before")
    R.save(b, str(runs), "after")
    with pytest.raises(FileExistsError, match="a run named 'after' already exists"):
        R.save(b, str(runs), "after")
    (runs / "unrelated.json").write_text("{}")  # not a run: not listed

    assert main(["bench", "--list", "--dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert out.index("before") < out.index("after")  # oldest first
    assert "unrelated" not in out and "ce-forward-64x1000-float32" in out
    assert "[1 warning(s)]" in out

    assert main(["bench", "--compare", "bef", "after", "--dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  A  before .*\n  B  after ", out, re.M)
    assert "warning: busy machine: y" in out
    assert "B differs from A in cpu_model" in out
    block = out[out.index("ce-forward-64x1000-float32"):]
    assert re.search(r"^provider\s+A ms\s+B ms\s+B/A$", block, re.M)
    assert re.search(r"^fastloss\s+2\.000\s+1\.000\s+0\.50$", block, re.M)
    assert re.search(r"^torch\s+10\.000\s+12\.000\s+1\.20$", block, re.M)
    assert "only in A: ce-fwd+bwd-64x1000-float32" in out

    assert main(["bench", "--compare", "--dir", str(runs)]) == 0  # the two most recent
    assert "A  before" in capsys.readouterr().out
    assert main(["bench", "--compare", "before", str(runs / "after.json"), "--dir", str(runs)]) == 0
    capsys.readouterr()
    assert main(["bench", "--compare", "before", "nope", "--dir", str(runs)]) == 2
    assert "no saved run named 'nope'" in capsys.readouterr().err
    assert main(["bench", "--compare", "--dir", str(tmp_path / "empty")]) == 2
    assert "2 saved runs needed, found 0" in capsys.readouterr().err
    assert main(["bench", "--list", "--dir", str(tmp_path / "empty")]) == 0
    assert "no saved runs" in capsys.readouterr().out
    assert S.find("before", str(runs))["name"] == "before"


def test_small_cases():
    small = C.small_cases()
    names = [c.name for c in small]
    for shape in ("8x100", "64x1000", "256x4096"):
        for mode in C.MODES:
            assert f"ce-{mode}-{shape}-float32" in names
    for n in (800, 64000, 256 * 4096):
        for mode in C.MODES:
            assert C.Case("mse", (n,), "float32", mode) in small
    for op in ("soft-ce", "distill-kl", "distill-jsd"):
        for shape in ("8x100", "64x1000", "256x4096"):
            for mode in C.MODES:
                assert f"{op}-{mode}-{shape}-float32" in names
    assert "lce-forward-64x32x500-float32" in names and "lce-fwd+bwd-64x32x500-float32" in names
    for case in small:
        provs = C.providers_for(case, C.SMALL_PROVIDERS)
        assert "torch" in provs and provs[0].startswith("fastloss")


def test_linear_ce_forward_providers_agree():
    torch = pytest.importorskip("torch")
    case = C.Case("lce", (16, 8, 50), "float32", "forward")
    assert case.bytes_written == 0 and case.flops == 2 * 16 * 8 * 50
    inputs = C.make_inputs(case, seed=1)
    logits = inputs["hidden"].astype(np.float64) @ inputs["weight"].astype(np.float64).T
    want, _ = ce_reference(logits, inputs["targets"])
    for provider in ("fastloss", "torch"):
        loss = C.loss_value(_run(C.build(case, inputs, provider)), case.mode)
        assert loss == pytest.approx(want, rel=1e-5), provider
    assert torch.is_grad_enabled()


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_cli_small_saves_a_named_run(bench_env, capsys):
    pytest.importorskip("torch")
    rc = main(["bench", "--small", "--repeat", "1", "--warmup", "0", "--quiet", "--save", "mine"])
    assert rc == 0
    out = capsys.readouterr().out
    for name in ("ce-fwd+bwd-256x4096-float32", "mse-forward-800-float32",
                 "lce-forward-64x32x500-float32", "soft-ce-fwd+bwd-256x4096-float32",
                 "distill-kl-forward-8x100-float32", "distill-jsd-fwd+bwd-64x1000-float32"):
        assert name in out
    saved = json.loads((bench_env / "saved" / "mine.json").read_text())
    assert {r["provider"] for r in saved["results"]} == {
        "fastloss", "fastloss-out", "fastloss-inplace", "fastloss-alloc", "torch"}
    assert all(r["status"] == "ok" for r in saved["results"])
    assert all(r["speedup_vs_torch"] > 0 for r in saved["results"])
    with pytest.raises(SystemExit):
        main(["bench", "--small", "--save", "mine"])  # taken: refused before running
    assert "already exists" in capsys.readouterr().err


def test_machine_info_threading_layer_before_any_parallel_loop():
    """pytest-benchmark asks for machine_info before the first benchmark and
    when it saves: the threading layer must read the same both times."""
    code = ("from fastloss.bench import machine as M; a = M.machine_info(2); "
            "b = M.machine_info(2); print(a['numba_threading_layer'], a == b)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    layer, same = proc.stdout.split()
    assert layer != "None" and same == "True"


def test_kernel_target_reads_the_vector_width_numba_emits():
    """The bench header says what vector code the kernels run: on this host, and
    for AVX2 code forced by NUMBA_CPU_NAME + NUMBA_CPU_FEATURES (NUMBA_CPU_NAME
    alone keeps the host's features, so it is not enough)."""
    import json
    import os
    import subprocess
    import sys

    from fastloss.bench import machine as M
    from fastloss.bench import runner as R

    here = M.kernel_target()
    assert here["isa"] in ("AVX-512", "AVX2", "SSE") and here["vector_bits"] in (512, 256, 128, None)
    line = R._target_line({"kernel_target": here})
    assert line.startswith(f"kernels: numba target {here['cpu']} ({here['isa']};")
    assert R._target_line({}) == "kernels: target not recorded"
    env = dict(os.environ, NUMBA_CPU_NAME="haswell",
               NUMBA_CPU_FEATURES="+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+sse4.2,+lzcnt,+movbe,"
                                  "-avx512f,-avx512bw,-avx512vl,-avx512dq",
               NUMBA_DISABLE_CACHE="1")
    code = "import json; from fastloss.bench import machine as M; print(json.dumps(M.kernel_target()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    forced = json.loads(out.stdout.strip().splitlines()[-1])
    assert forced == {"cpu": "haswell", "isa": "AVX2", "vector_bits": 256}
