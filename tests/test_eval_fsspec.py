"""Evaluation dumps behind URLs (fsspec ``memory://``, ``file://``), shards that pickle and
read in another process, and files that change after they were opened (errors naming them).

The ``memory://`` tests skip without fsspec; ``file://`` URLs and local files need none.
"""

import concurrent.futures
import io
import multiprocessing
import os
import pickle
import sys
from operator import methodcaller

import ml_dtypes
import numpy as np
import pytest
from scipy.special import logsumexp
from test_eval_inputs import write_safetensors  # the hand-written .safetensors layout

import fastloss
from fastloss.evaluation import EvalInputError, Layout
from fastloss.evaluation.readers import (
    ArrayShard,
    Concat,
    NpyShard,
    RawShard,
    SafetensorsShard,
    expand_paths,
    load_whole,
    open_source,
)

IGNORE = -100
BF16 = np.dtype(ml_dtypes.bfloat16)


def _dump(rng, n, v, dtype=np.float32):
    """Logits away from zero (a scale and a per-class offset) and targets, some ignored."""
    x = (rng.standard_normal((n, v)) * 2.0 + rng.standard_normal(v)).astype(dtype)
    t = rng.integers(0, v, n)
    t[rng.random(n) < 0.15] = IGNORE
    return x, t


def _numbers(report):
    """``report.to_dict()`` without the file names, which are all that may differ."""
    return {k: v for k, v in report.to_dict().items() if not k.endswith(("_file", "_files"))}


def _mean_loss64(x, t):
    """float64 reference of the mean cross-entropy over the counted tokens."""
    x = np.asarray(x, np.float64)
    keep = t != IGNORE
    lse = logsumexp(x[keep], axis=1)
    return float(np.mean(lse - x[keep, t[keep]]))


def _npy_bytes(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture
def mem():
    """fsspec's in-memory filesystem, empty before and after the test."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]
    yield fs
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]


@pytest.fixture
def dumps(rng, tmp_path):
    """Local dumps of every format (``tmp_path``) and the float64-able arrays they hold."""
    x, t = _dump(rng, n=75, v=13)
    for k, (a, b) in {2: (0, 30), 10: (30, 75)}.items():  # natural order: -2 before -10
        np.save(tmp_path / f"logits-{k}.npy", x[a:b])
        np.save(tmp_path / f"targets-{k}.npy", t[a:b])
    write_safetensors(tmp_path / "dump.safetensors", {"logits": x.astype(BF16), "targets": t},
                      pad=False)  # unpadded header: the logits start at an odd byte
    x.astype(BF16).tofile(tmp_path / "logits-bf16.bin")
    x.tofile(tmp_path / "logits-f32.bin")
    t.astype(np.int32).tofile(tmp_path / "targets.bin")
    h = rng.standard_normal((75, 6)).astype(np.float32)
    w = rng.standard_normal((13, 6)).astype(np.float32)
    bias = rng.standard_normal(13).astype(np.float32)
    np.save(tmp_path / "hidden.npy", h)
    write_safetensors(tmp_path / "head.safetensors", {"lm_head.weight": w})
    np.save(tmp_path / "bias.npy", bias)
    return {"x": x, "t": t, "h": h, "w": w, "bias": bias, "dir": tmp_path}


def _mirror(mem, folder):
    """Copy every file of ``folder`` to ``memory://dump/<name>``."""
    for name in os.listdir(folder):
        with open(folder / name, "rb") as f:
            mem.pipe(f"/dump/{name}", f.read())


#: (name, evaluate keywords with ``{}`` for the folder or URL prefix).
CASES = [
    ("npy-glob", dict(logits="{}/logits-*.npy", targets="{}/targets-*.npy")),
    ("safetensors", dict(logits="{}/dump.safetensors", targets="{}/dump.safetensors")),
    ("raw-bf16", dict(logits="{}/logits-bf16.bin", targets="{}/targets.bin",
                      layout=Layout(raw_dtype="bf16", vocab=13, targets_dtype="int32"))),
    ("raw-f32", dict(logits="{}/logits-f32.bin", targets="{}/targets.bin",
                     layout=Layout(raw_dtype="float32", vocab=13, targets_dtype="int32"))),
    ("hidden", dict(hidden="{}/hidden.npy", lm_head="{}/head.safetensors", bias="{}/bias.npy",
                    targets="{}/targets-*.npy")),
]


def _kwargs(case, where):
    return {k: v.format(where) if isinstance(v, str) else v for k, v in case.items()}


@pytest.mark.parametrize("name, case", CASES, ids=[c[0] for c in CASES])
def test_memory_urls_give_the_local_report(mem, dumps, name, case):
    _mirror(mem, dumps["dir"])
    local = fastloss.evaluate(**_kwargs(case, dumps["dir"]), chunk_tokens=16)
    url = fastloss.evaluate(**_kwargs(case, "memory://dump"), chunk_tokens=16)
    assert _numbers(url) == _numbers(local)  # the same bytes through the same kernels: exact
    files = url.logits_files or url.hidden_files
    if name == "npy-glob":
        assert files == ["memory://dump/logits-2.npy", "memory://dump/logits-10.npy"]
        assert url.targets_files == ["memory://dump/targets-2.npy", "memory://dump/targets-10.npy"]
        # float32 logits, float32-or-wider accumulation: rtol 1e-5 against float64
        assert url.mean_loss == pytest.approx(_mean_loss64(dumps["x"], dumps["t"]), rel=1e-5)
    else:
        assert all(f.startswith("memory://dump/") for f in files)
    if name == "hidden":  # LM head and bias read whole through the URL
        assert (url.lm_head_file, url.bias_file) == ("memory://dump/head.safetensors", "memory://dump/bias.npy")


def test_compare_with_one_side_a_url(mem, dumps, rng):
    d = dumps["dir"]
    model = (dumps["x"] + rng.standard_normal(dumps["x"].shape).astype(np.float32)).astype(np.float16)
    np.save(d / "model.npy", model)
    _mirror(mem, d)
    local = fastloss.compare(str(d / "logits-*.npy"), str(d / "model.npy"), str(d / "targets-*.npy"),
                             chunk_tokens=16)
    url = fastloss.compare(str(d / "logits-*.npy"), "memory://dump/model.npy", "memory://dump/targets-*.npy",
                           chunk_tokens=16)
    assert _numbers(url) == _numbers(local)
    assert url.model_files == ["memory://dump/model.npy"]
    assert local.to_dict()["mean_kl"] > 0.01  # the two models differ


def test_file_urls_are_local_paths(dumps, monkeypatch):
    d = dumps["dir"]
    plain = fastloss.evaluate(str(d / "logits-*.npy"), str(d / "targets-*.npy"))
    for prefix in ("file://", "file://localhost", "FILE://"):
        r = fastloss.evaluate(f"{prefix}{d}/logits-*.npy", f"{prefix}{d}/targets-*.npy")
        assert _numbers(r) == _numbers(plain)
        assert r.logits_files == [f"{prefix}{d}/logits-2.npy", f"{prefix}{d}/logits-10.npy"]
    monkeypatch.chdir(d)  # file://relative/path is relative to the working directory, as in fsspec
    assert expand_paths("file://targets-*.npy") == ["file://targets-2.npy", "file://targets-10.npy"]
    shard = open_source(f"file://{d}/dump.safetensors", "logits", Layout())[0]
    assert type(shard) is SafetensorsShard and shard.path == f"{d}/dump.safetensors"
    assert np.array_equal(shard.read(5, 40), dumps["x"][5:40].astype(BF16))
    with pytest.raises(EvalInputError, match=r"^file://nothing-\*\.npy: no file matches this pattern$"):
        expand_paths("file://nothing-*.npy")


def test_url_errors_name_the_url(mem, dumps):
    x, t = dumps["x"], dumps["t"]
    good = _npy_bytes(x)
    mem.pipe("/dump/corrupt.npy", good[:6] + b"\x07\x00" + good[8:])  # a version numpy does not know
    mem.pipe("/dump/short.npy", good[:-5])
    mem.pipe("/dump/x.npy", good)
    mem.pipe("/dump/sub/inner.npy", good)
    with pytest.raises(EvalInputError, match=r"^memory://dump/nope\.npy: no such file$"):
        fastloss.evaluate("memory://dump/nope.npy", t)
    with pytest.raises(EvalInputError, match=r"^memory://dump/corrupt\.npy: not a valid \.npy file "
                                             r"\(corrupt header: "):
        fastloss.evaluate("memory://dump/corrupt.npy", t)
    with pytest.raises(EvalInputError, match=r"^memory://dump/short\.npy: truncated: the header promises "
                                             rf"shape \(75, 13\) of float32 \({len(good)} bytes with the "
                                             rf"header\), the file has {len(good) - 5} bytes$"):
        fastloss.evaluate("memory://dump/short.npy", t)
    with pytest.raises(EvalInputError, match=r"^memory://dump/sub: is a directory, expected a file$"):
        fastloss.evaluate("memory://dump/sub", t, layout=Layout(raw_dtype="float32", vocab=13))
    with pytest.raises(EvalInputError, match=r"^memory://dump/nothing-\*\.npy: no file matches this pattern$"):
        fastloss.evaluate("memory://dump/nothing-*.npy", t)
    with pytest.raises(EvalInputError, match=r"^nosuchprotocol://a\.npy: cannot be opened through fsspec "
                                             r"\(ValueError: .*nosuchprotocol"):
        fastloss.evaluate("nosuchprotocol://a.npy", t)
    with pytest.raises(EvalInputError, match=r"^memory://dump/head\.npy: expected one lm_head file, found 2$"):
        mem.pipe("/dump/head.npy", good)
        load_whole(["memory://dump/x.npy", "memory://dump/head.npy"], "lm_head", Layout())
    # changed after it was opened: the read names the URL
    shard = open_source("memory://dump/x.npy", "logits", Layout())[0]
    mem.pipe("/dump/x.npy", good[:-13 * 4 * 10])
    with pytest.raises(EvalInputError, match=r"^memory://dump/x\.npy: truncated since it was opened: "
                                             r"bytes \[\d+, \d+\) gave \d+ bytes"):
        shard.read(60, 75)
    assert np.array_equal(shard.read(0, 10), x[:10])  # rows still there read as before
    mem.rm("/dump/x.npy")
    with pytest.raises(EvalInputError, match=r"^memory://dump/x\.npy: no such file \(deleted since it was "
                                             r"opened\)$"):
        shard.read(0, 10)


def test_urls_without_fsspec(monkeypatch, rng):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec raises ImportError
    x, t = _dump(rng, n=8, v=5)
    with pytest.raises(EvalInputError, match=r"^s3://bucket/logits-\*\.npy: a URL, and reading URLs needs "
                                             r"fsspec: pip install fsspec$"):
        fastloss.evaluate("s3://bucket/logits-*.npy", t)
    with pytest.raises(EvalInputError, match=r"^gs://b/head\.npy: a URL, and reading URLs needs fsspec"):
        fastloss.evaluate(hidden=x, lm_head="gs://b/head.npy", targets=t)


def test_local_file_changed_after_opening(rng, tmp_path):
    x, t = _dump(rng, n=50, v=11)
    path = tmp_path / "logits.npy"
    np.save(path, x)
    size = os.path.getsize(path)
    shard = open_source(str(path), "logits", Layout())[0]
    src = Concat([shard])
    os.truncate(path, size - 11 * 4 * 3)  # the last three rows gone
    with pytest.raises(EvalInputError, match=rf"^{path}: truncated since it was opened: {size - 132} "
                                             rf"bytes, expected {size}$"):
        shard.read(0, 5)  # even rows that are still there: the file is not what was opened
    os.remove(path)
    with pytest.raises(EvalInputError, match=rf"^{path}: no such file \(deleted since it was opened\)$"):
        src.read(10, 20)
    np.save(path, x)
    assert np.array_equal(src.read(10, 20), x[10:20])  # back again: reads again
    if os.name == "posix" and os.geteuid() != 0:  # root reads whatever the mode
        os.chmod(path, 0)
        try:
            with pytest.raises(EvalInputError, match=rf"^{path}: permission denied \(since it was opened\)$"):
                shard.read(0, 5)
        finally:
            os.chmod(path, 0o644)
    os.remove(path)
    os.mkdir(path)
    with pytest.raises(EvalInputError, match=rf"^{path}: is a directory \(replaced since it was opened\)$"):
        shard.read(0, 5)


def _shards(dumps, mem=None):
    """(shard, array it holds) of every kind, local, file:// and (with ``mem``) memory://."""
    d, x, t = dumps["dir"], dumps["x"], dumps["t"]
    raw = Layout(raw_dtype="bf16", vocab=13, targets_dtype="int32")
    out = [(ArrayShard(x, "<logits array>", 13), x),
           (NpyShard(d / "logits-10.npy", "logits"), x[30:]),
           (SafetensorsShard(d / "dump.safetensors", "logits"), x.astype(BF16)),
           (SafetensorsShard(d / "dump.safetensors", "targets"), t),
           (RawShard(d / "logits-bf16.bin", "logits", BF16, 13), x.astype(BF16)),
           (open_source(f"file://{d}/targets.bin", "targets", raw)[0], t.astype(np.int32))]
    if mem is not None:
        out += [(NpyShard("memory://dump/logits-10.npy", "logits"), x[30:]),
                (SafetensorsShard("memory://dump/dump.safetensors", "logits"), x.astype(BF16)),
                (open_source("memory://dump/logits-bf16.bin", "logits", raw)[0], x.astype(BF16))]
    return out


def test_shards_pickle_cheaply_and_read_after(mem, dumps):
    _mirror(mem, dumps["dir"])
    for shard, arr in _shards(dumps, mem):
        blob = pickle.dumps(shard)
        if not isinstance(shard, ArrayShard):
            assert len(blob) < 2000, (shard.name, len(blob))  # names and numbers, no data or handles
        back = pickle.loads(blob)
        assert (back.name, back.dtype, back.shape, back.rows, back.width) == \
               (shard.name, shard.dtype, shard.shape, shard.rows, shard.width)
        for lo, hi in [(0, back.rows), (3, 17), (back.rows - 1, back.rows), (4, 4)]:
            got = back.read(lo, hi)
            assert got.dtype == arr.dtype and got.flags.aligned, shard.name
            assert np.array_equal(np.asarray(got), arr[lo:hi]), (shard.name, lo, hi)


def test_shards_read_in_a_spawned_process(dumps):
    shards = _shards(dumps)
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        futures = [pool.submit(methodcaller("read", 2, 29), s) for s, _ in shards]
        for (shard, arr), fut in zip(shards, futures):
            assert np.array_equal(np.asarray(fut.result(timeout=120)), arr[2:29]), shard.name
