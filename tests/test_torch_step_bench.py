"""Quick tests of the training-step benchmark (``fastloss bench --op torch-step``,
``fastloss.bench.torch_step``) on tiny shapes: what is computed and printed,
not how fast. ``torch.compile`` runs with its ``eager`` backend here (dynamo
traces the step, no C++ is compiled), so the whole file takes seconds.
"""

import functools
import json
import re
import sys

import numba
import numpy as np
import pytest
from reference import ce_reference, to_float64

torch = pytest.importorskip("torch")

from fastloss.bench import torch_step as T  # noqa: E402
from fastloss.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

TINY = T.StepCase(64, 1000, 32, "float32")


@pytest.fixture
def quick(monkeypatch):
    """torch.compile with the eager backend (seconds, not a C++ build); thread
    counts restored afterwards."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    numba_threads, torch_threads = numba.get_num_threads(), torch.get_num_threads()
    yield
    numba.set_num_threads(numba_threads)
    torch.set_num_threads(torch_threads)


def _reference_loss(case):
    """The step's loss in float64 from the same inputs (numpy)."""
    inputs = T.make_inputs(case)
    h = to_float64(inputs["hidden"].float().numpy())
    w = to_float64(inputs["weight"].float().numpy())
    loss, _ = ce_reference(h @ w.T, inputs["targets"].numpy())
    return loss


@pytest.mark.parametrize("dtype, rel", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_run_tiny_every_provider(quick, dtype, rel):
    case = T.StepCase(64, 1000, 32, dtype)
    with_overhead = dtype == "float32"  # float32 only: once is enough
    result = T.run([case], threads=2, repeat=1, warmup=0, memory=False, overhead=with_overhead, overhead_repeat=5,
                   settle=0)
    rows = result["results"]
    assert [r["provider"] for r in rows] == list(T.PROVIDERS)
    assert [r["status"] for r in rows] == ["ok"] * len(T.PROVIDERS), [r["note"] for r in rows]
    for r in rows:
        assert set(T.ROW_KEYS) <= set(r)
        assert r["case"] == case.name and r["rounds"] == 1 and r["median_ms"] > 0
        assert r["speedup_vs_torch"] > 0
    # every provider computed the same loss, the one of the float64 reference
    want = _reference_loss(case)
    losses = {r["provider"]: r["loss"] for r in rows if r["provider"] != "head-only"}
    assert rows[-1]["loss"] is None
    for p, got in losses.items():
        assert got == pytest.approx(want, rel=rel), p
    by = {r["provider"]: r for r in rows}
    assert by["torch"]["speedup_vs_torch"] == 1.0
    for p in losses:
        assert by[p]["loss_ms"] == pytest.approx(by[p]["median_ms"] - by["head-only"]["median_ms"])
        assert by[p]["loss_share"] == pytest.approx(by[p]["loss_ms"] / by[p]["median_ms"])

    text = T.format_table(result)
    assert re.search(r"^provider\s+median ms\s+min ms\s+rounds\s+vs torch\s+loss ms\s+loss share", text, re.M)
    for p in T.PROVIDERS:
        assert re.search(rf"^{re.escape(p)}\s+\d", text, re.M), p
    assert f"{case.name}: N=64 V=1000 D=32 {dtype}" in text
    assert "losses agree within" in text
    if not with_overhead:
        assert result["overhead"] is None and "adapter overhead" not in text
        return
    over = result["overhead"]
    assert set(over["median_us"]) == {"raw forward", "adapter forward", "torch forward", "raw fwd+bwd",
                                      "adapter fwd+bwd", "adapter fwd+grad", "torch fwd+bwd"}
    assert over["overhead_us"]["forward"] == pytest.approx(
        over["median_us"]["adapter forward"] - over["median_us"]["raw forward"])
    assert "adapter adds" in text and "per fwd+bwd call" in text


def test_gradients_agree(quick):
    """Like with like: every provider's step gives torch eager's gradients."""
    inputs = T.make_inputs(TINY)
    _, gh0, gw0 = T.build(TINY, inputs, "torch").fn()
    for p in T.PROVIDERS:
        if p in ("torch", "head-only"):
            continue
        loss, gh, gw = T.build(TINY, inputs, p).fn()
        torch.testing.assert_close(gh, gh0, rtol=1e-4, atol=1e-6, msg=p)
        torch.testing.assert_close(gw, gw0, rtol=1e-4, atol=1e-6, msg=p)
    # the inputs are untouched (in-place backward overwrites the logits, not the inputs)
    again = T.make_inputs(TINY)
    for k in ("hidden", "weight", "targets"):
        assert torch.equal(inputs[k], again[k])


def test_compile_failure_skips_cleanly(monkeypatch):
    def broken(fn, **kw):
        def call(*a):
            raise RuntimeError("no compiler here\nmore")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(T.C.Unavailable, match="torch.compile failed: RuntimeError: no compiler here$"):
        T.build(TINY, T.make_inputs(TINY), "torch-compile")
    result = T.run([TINY], ["torch-compile", "torch"], repeat=1, warmup=0, memory=False, overhead=False, settle=0)
    rows = {r["provider"]: r for r in result["results"]}
    assert list(rows) == ["torch", "torch-compile", "head-only"]
    assert rows["torch-compile"]["status"] == "skipped"
    assert rows["torch"]["status"] == rows["head-only"]["status"] == "ok"
    assert re.search(r"^  note: torch-compile: torch.compile failed", T.format_table(result), re.M)


def test_providers_for():
    assert T.providers_for(["fastloss"]) == ["fastloss", "fastloss-inplace", "fastloss-lce", "head-only"]
    assert T.providers_for(["torch-lce"]) == ["torch-lce", "head-only"]
    with pytest.raises(ValueError, match="unknown provider 'numpy'"):
        T.providers_for(["numpy"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_memory_in_a_child():
    case = T.StepCase(256, 4000, 16, "float32")
    got = T.measure_memory(case, "fastloss", threads=1)
    assert got["status"] == "ok", got
    assert got["method"] in ("VmHWM", "sampled")
    # at least the logits and their gradient (fastloss writes it into a new tensor)
    assert got["peak_bytes"] >= 1.5 * case.logits_bytes


def test_cli_torch_step(quick, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(T, "OVERHEAD_REPEAT", 5)
    monkeypatch.setattr(T, "SETTLE_S", 0.0)
    out = tmp_path / "step.json"
    rc = main(["bench", "--op", "torch-step", "--shape", "64", "1000", "--hidden", "32", "--repeat", "1",
               "--warmup", "0", "--providers", "fastloss,torch", "--no-memory", "--no-save", "--quiet",
               "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "torch-step-64x1000-d32-float32" in text and "adapter overhead" in text
    result = json.loads(out.read_text())
    assert result["schema"] == T.SCHEMA
    assert result["settings"]["command"][:3] == ["fastloss", "bench", "--op"]
    assert [r["provider"] for r in result["results"]] == ["torch", "fastloss", "fastloss-inplace",
                                                           "fastloss-lce", "head-only"]
    assert all(r["status"] == "ok" and r["peak_bytes"] is None for r in result["results"])
    assert np.isfinite(result["overhead"]["overhead_us"]["fwd+bwd"])


@pytest.mark.parametrize("argv, message", [
    (["--shape", "64", "1000", "32"], "takes N V (or pairs"),
    (["--mode", "forward"], "--mode does not apply to --op torch-step"),
    (["--small"], "--small does not apply"),
    (["--providers", "numpy"], "unknown provider 'numpy'"),
    (["--hidden", "0"], "sizes must be positive"),
])
def test_cli_torch_step_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--op", "torch-step", "--no-save", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_parses_torch_step_options(capsys):
    from fastloss.cli import _build_parser
    args = _build_parser().parse_args(["bench", "--op", "torch-step", "--shape", "4096", "32000", "2048", "128256",
                                       "--hidden", "128", "--dtype", "float32", "bfloat16", "--no-memory"])
    assert args.op == "torch-step" and args.hidden == 128 and args.no_memory
    from fastloss.cli.bench import torch_step_cases
    cases = torch_step_cases(args, args.bench_parser)
    assert [c.name for c in cases] == [
        "torch-step-4096x32000-d128-float32", "torch-step-4096x32000-d128-bfloat16",
        "torch-step-2048x128256-d128-float32", "torch-step-2048x128256-d128-bfloat16"]
    with pytest.raises(SystemExit):
        main(["bench", "--hidden", "32"])  # not for the other ops
    assert "--hidden and --no-memory are for --op torch-step" in capsys.readouterr().err


def test_a_failing_provider_does_not_end_the_run(monkeypatch):
    build = T.build

    def failing(case, inputs, provider):
        bench = build(case, inputs, provider)
        if provider == "fastloss":
            def boom():
                raise RuntimeError("kernel exploded")
            bench.fn = boom
        return bench

    monkeypatch.setattr(T, "build", failing)
    result = T.run([TINY], ["torch", "fastloss"], repeat=2, warmup=1, memory=False, overhead=False, settle=0)
    rows = {r["provider"]: r for r in result["results"]}
    assert rows["fastloss"]["status"] == "error" and "kernel exploded" in rows["fastloss"]["note"]
    assert rows["torch"]["status"] == rows["fastloss-lce"]["status"] == rows["head-only"]["status"] == "ok"
    assert rows["torch"]["rounds"] == 2
    assert re.search(r"^fastloss\s+error$", T.format_table(result), re.M)
