"""The parts of ``benchmarks/gpu_check.py`` that run without a GPU.

The GPU check compares the CUDA kernels with ``torch_ce_reference`` (a float64
autograd expression of the contract) for the options PyTorch lacks (z_loss,
softcap, logit_scale, normalizer). A wrong reference there would fail good
kernels or pass bad ones on the one GPU run, so it is checked here on the CPU
against ``tests/reference.py``, option by option. Also checked: its
tolerance function and its clean exit on a machine without a GPU.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from reference import ce_reference

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"weight": True},
    {"weight": True, "reduction": "sum"},
    {"ignore": True},
    {"ignore": True, "weight": True},
    {"label_smoothing": 0.1},
    {"label_smoothing": 0.2, "weight": True, "ignore": True},
    {"z_loss": 1e-3},
    {"z_loss": 1e-2, "ignore": True},
    {"z_loss": 1e-2, "ignore": True, "weight": True},
    {"softcap": 5.0},
    {"logit_scale": 0.7},
    {"softcap": 3.0, "logit_scale": 1.9, "z_loss": 1e-3},
    {"normalizer": 37.0, "ignore": True},
    {"normalizer": 11.0, "z_loss": 1e-2, "weight": True},
    {"grad_output": "scalar"},
    {"grad_output": "scalar", "reduction": "sum"},
    {"grad_output": "rows", "reduction": "none", "ignore": True, "z_loss": 1e-3},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(sorted(o)) or "plain")
def test_torch_reference_matches_the_numpy_reference(gpu_check, opts):
    rng = np.random.default_rng(len(str(opts)))
    n, v = 13, 29
    x = rng.standard_normal((n, v)) * 3
    t = rng.integers(0, v, n)
    kw = {}
    if opts.get("ignore"):
        t[[1, 4, 5]] = -100
    if opts.get("weight"):
        kw["weight"] = rng.random(v) + 0.25
    for key in ("reduction", "label_smoothing", "z_loss", "softcap", "logit_scale",
                "normalizer"):
        if key in opts:
            kw[key] = opts[key]
    if opts.get("grad_output") == "scalar":
        kw["grad_output"] = 0.6
    elif opts.get("grad_output") == "rows":
        kw["grad_output"] = rng.random(n) + 0.5

    ref_loss, ref_grad = ce_reference(x, t, **kw)
    tkw = dict(kw)
    if "weight" in tkw:
        tkw["weight"] = torch.from_numpy(tkw["weight"])
    if isinstance(tkw.get("grad_output"), np.ndarray):
        tkw["grad_output"] = torch.from_numpy(tkw["grad_output"])
    loss, grad = gpu_check.torch_ce_reference(torch, torch.from_numpy(x), torch.from_numpy(t),
                                              **tkw)
    np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-10, atol=1e-13)


def test_close_accepts_rounding_and_rejects_errors(gpu_check):
    ref = torch.linspace(-2.0, 3.0, 101, dtype=torch.float64)
    f32 = ref.float()
    ok, _ = gpu_check.close(torch, f32, ref, torch.float32, "loss")
    assert ok
    bf = ref.to(torch.bfloat16)
    assert gpu_check.close(torch, bf, ref, torch.bfloat16, "grad")[0]
    # float32 tolerance does not accept bfloat16 rounding
    assert not gpu_check.close(torch, bf, ref, torch.float32, "grad")[0]
    wrong = f32.clone()
    wrong[57] += 1e-3
    ok, msg = gpu_check.close(torch, wrong, ref, torch.float32, "loss")
    assert not ok and "max|err|" in msg
    nan = f32.clone()
    nan[3] = float("nan")
    assert not gpu_check.close(torch, nan, ref, torch.float32, "loss")[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_exits_cleanly_without_a_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, SCRIPT, "--json", str(out)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no CUDA device" in r.stdout
    assert json.loads(out.read_text())["errors"] == ["no CUDA device"]
