"""Inputs of fastloss.evaluate / ``fastloss eval``: safetensors and raw files, glob patterns,
shifted token ids with per-position results, progress bars, hidden states through an LM
head, and bad input of every kind (one-line errors naming the file, never a partial report)."""

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from scipy.special import logsumexp

import fastloss
from fastloss.cli import main
from fastloss.evaluation import EvalInputError, Layout
from fastloss.evaluation.readers import expand_paths, natural_key

IGNORE = -100
BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_KEYS = ("mean_loss", "perplexity", "bits_per_token", "accuracy", "top5_accuracy",
              "mean_entropy", "ece", "uniform_baseline", "unigram_baseline", "loss_max")


def _dump(rng, n=90, v=17, dtype=np.float32):
    x = (rng.standard_normal((n, v)) * 2.0 + rng.standard_normal(v)).astype(dtype)
    t = rng.integers(0, v, n)
    t[rng.random(n) < 0.15] = IGNORE
    return x, t


def _same_report(a, b, rtol=1e-12):
    """Two reports agree on every number (files aside)."""
    for key in FLOAT_KEYS:
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=rtol, abs=rtol), key
    assert (a.tokens, a.ignored, a.skipped) == (b.tokens, b.ignored, b.skipped)
    assert a.loss_histogram == b.loss_histogram
    assert a.per_position_count == b.per_position_count


ST_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", BF16: "BF16",
            np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
            np.dtype(np.uint16): "U16"}


def write_safetensors(path, tensors, metadata=None, pad=True, header=None):
    """A .safetensors file written by hand from the documented layout (8-byte LE header
    length, JSON header, data); ``header`` replaces the JSON bytes (for corrupt files)."""
    entries, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        entries[name] = {"dtype": ST_CODES[arr.dtype], "shape": list(arr.shape),
                         "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    if metadata is not None:
        entries["__metadata__"] = metadata
    h = json.dumps(entries).encode() if header is None else header
    if pad:
        h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    return str(path)


# ---- safetensors ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tdtype", [(np.float32, np.int64), (np.float16, np.int32),
                                           (np.float64, np.uint16)])
def test_safetensors_package_files_match_arrays(rng, tmp_path, dtype, tdtype):
    from safetensors.numpy import save_file

    x, t = _dump(rng, dtype=dtype)
    t = np.where(t < 0, 0, t).astype(tdtype)
    save_file({"logits": x[:40], "extra": t[:3]}, str(tmp_path / "a.safetensors"))
    save_file({"scores": x[40:].reshape(5, 10, -1)}, str(tmp_path / "b.safetensors"))
    save_file({"labels": t, "input_ids": t[::-1].copy()}, str(tmp_path / "t.safetensors"))
    base = fastloss.evaluate(x, t)
    for chunk in (None, 7, 40):
        r = fastloss.evaluate([tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
                              tmp_path / "t.safetensors", chunk_tokens=chunk)
        _same_report(r, base)
    r = fastloss.evaluate(x, tmp_path / "t.safetensors", layout=Layout(targets_key="input_ids"))
    _same_report(r, fastloss.evaluate(x, t[::-1]))


def test_hand_written_safetensors_bf16_metadata_and_unaligned(rng, tmp_path):
    from safetensors.numpy import load_file

    x, t = _dump(rng, n=50, v=13)
    path = write_safetensors(tmp_path / "f.safetensors", {"logits": x, "targets": t},
                             metadata={"format": "np"})
    got = load_file(path)  # the hand-written layout is what the package reads
    np.testing.assert_array_equal(got["logits"], x)
    np.testing.assert_array_equal(got["targets"], t)
    xb = x.astype(BF16)
    p = write_safetensors(tmp_path / "b.safetensors", {"logits": xb}, metadata={"a": "b"})
    _same_report(fastloss.evaluate(p, t, chunk_tokens=9), fastloss.evaluate(xb, t))
    # Header of odd length: the float32 data sits at an offset that is not a multiple of 4.
    p = write_safetensors(tmp_path / "u.safetensors", {"logits": x}, pad=False,
                          metadata={"pad": "x" * 3})
    assert (8 + struct.unpack("<Q", Path(p).read_bytes()[:8])[0]) % 4 != 0
    _same_report(fastloss.evaluate(p, path, chunk_tokens=6), fastloss.evaluate(x, t))


def test_safetensors_tensor_choice(rng, tmp_path):
    x, t = _dump(rng, n=20, v=5)
    two = write_safetensors(tmp_path / "two.safetensors", {"a": x, "b": x})
    with pytest.raises(EvalInputError, match=r"two\.safetensors: holds 2 tensors \('a', 'b'\) and "
                                             r"none is named 'logits'; choose one with logits_key="):
        fastloss.evaluate(two, t)
    _same_report(fastloss.evaluate(two, t, layout=Layout(logits_key="b")), fastloss.evaluate(x, t))
    with pytest.raises(EvalInputError, match=r"two\.safetensors: no tensor named 'c'; the file "
                                             r"holds 'a', 'b'"):
        fastloss.evaluate(two, t, layout=Layout(logits_key="c"))
    tt = write_safetensors(tmp_path / "t.safetensors", {"x": t, "y": t})
    with pytest.raises(EvalInputError, match="'targets' or 'labels' or 'input_ids'.*targets_key="):
        fastloss.evaluate(x, tt)
    empty = write_safetensors(tmp_path / "e.safetensors", {}, metadata={"k": "v"})
    with pytest.raises(EvalInputError, match="e.safetensors: holds no tensors"):
        fastloss.evaluate(empty, t)


def _corrupt_cases(x):
    good = {"logits": {"dtype": "F32", "shape": list(x.shape), "data_offsets": [0, x.nbytes]}}

    def hdr(**change):
        return json.dumps({"logits": {**good["logits"], **change}}).encode()

    return [
        ("short", lambda p: p.write_bytes(b"\x01\x02"), "shorter than the 8-byte header length"),
        ("beyond", lambda p: p.write_bytes(struct.pack("<Q", 10**6) + b"{}"),
         "header length 1000000 runs beyond the file"),
        ("notjson", lambda p: write_safetensors(p, {"logits": x}, header=b"{not json"),
         "corrupt header: not JSON"),
        ("list", lambda p: write_safetensors(p, {"logits": x}, header=b"[1, 2]"),
         "a JSON list, expected an object"),
        ("lies", lambda p: write_safetensors(p, {"logits": x}, header=hdr(data_offsets=[0, 40])),
         rf"data_offsets \[0, 40\] hold 40 bytes, but shape \(6, 7\) of F32 needs {x.nbytes}"),
        ("dtype", lambda p: write_safetensors(p, {"logits": x}, header=hdr(dtype="F33")),
         "unknown dtype 'F33'"),
        ("shape", lambda p: write_safetensors(p, {"logits": x}, header=hdr(shape=[6, -7])),
         "shape \\[6, -7\\]; expected a list of non-negative integers"),
        ("keys", lambda p: write_safetensors(p, {"logits": x}, header=b'{"logits": {"dtype": "F32"}}'),
         "expected an object with dtype, shape and data_offsets"),
        ("truncated", lambda p: p.write_bytes(Path(write_safetensors(p, {"logits": x})).read_bytes()[:-5]),
         "truncated: tensor 'logits' ends at byte \\d+, the file has \\d+ bytes"),
        ("int logits", lambda p: write_safetensors(p, {"logits": np.zeros((6, 7), np.int32)}),
         "logits dtype int32; expected float16"),
    ]


CORRUPT = ("short", "beyond", "notjson", "list", "lies", "dtype", "shape", "keys", "truncated",
           "int logits")


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_safetensors(rng, tmp_path, case):
    x = rng.standard_normal((6, 7)).astype(np.float32)
    cases = {name: (make, pattern) for name, make, pattern in _corrupt_cases(x)}
    assert tuple(cases) == CORRUPT
    make, pattern = cases[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(EvalInputError, match=f"^{path}: .*{pattern}"):
        fastloss.evaluate(path, np.zeros(6, np.int64))


def test_safetensors_header_size_cap(rng, tmp_path, monkeypatch):
    from fastloss.evaluation import readers

    x = rng.standard_normal((6, 7)).astype(np.float32)
    p = write_safetensors(tmp_path / "h.safetensors", {"logits": x}, metadata={"m": "x" * 100})
    monkeypatch.setattr(readers, "SAFETENSORS_MAX_HEADER", 64)
    with pytest.raises(EvalInputError, match=r"h\.safetensors: .*a header of \d+ bytes \(more than 64\)"):
        fastloss.evaluate(p, np.zeros(6, np.int64))


# ---- raw files -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype, name", [(np.float32, "float32"), (BF16, "bfloat16"),
                                         (np.float16, "f2"), (np.float64, "fp64")])
def test_raw_logits_and_targets(rng, tmp_path, dtype, name):
    x, t = _dump(rng, n=70, v=11, dtype=dtype)
    x[:30].tofile(tmp_path / "x0.bin")
    x[30:].tofile(tmp_path / "x1.raw")
    t.astype(np.int32).tofile(tmp_path / "t32.bin")
    t.tofile(tmp_path / "t64")
    base = fastloss.evaluate(x, t)
    logits = [tmp_path / "x0.bin", tmp_path / "x1.raw"]
    _same_report(fastloss.evaluate(logits, tmp_path / "t64", layout=Layout(raw_dtype=name, vocab=11),
                                   chunk_tokens=8), base)
    _same_report(fastloss.evaluate(logits, tmp_path / "t32.bin",
                                   layout=Layout(raw_dtype=dtype, vocab=11, targets_dtype="int32")), base)


def test_raw_errors(rng, tmp_path):
    x, t = _dump(rng, n=10, v=4)
    x.tofile(tmp_path / "x.bin")
    (tmp_path / "odd.bin").write_bytes(x.tobytes()[:-4])
    t.tofile(tmp_path / "t.bin")
    (tmp_path / "todd.bin").write_bytes(t.tobytes()[:-3])
    xb = str(tmp_path / "x.bin")
    with pytest.raises(EvalInputError, match=r"x\.bin: not \.npy or \.safetensors, so read as raw "
                                             r"logits values: pass raw_dtype= \(--dtype\) and vocab="):
        fastloss.evaluate(xb, t)
    with pytest.raises(EvalInputError, match=r"pass vocab= \(--vocab\)$"):
        fastloss.evaluate(xb, t, layout=Layout(raw_dtype="float32"))
    with pytest.raises(EvalInputError, match=r"odd\.bin: raw file of 156 bytes is not a whole number "
                                             r"of rows \(4 x float32 = 16 bytes per row\)"):
        fastloss.evaluate(tmp_path / "odd.bin", t, layout=Layout(raw_dtype="float32", vocab=4))
    with pytest.raises(EvalInputError, match=r"todd\.bin: raw file of 77 bytes .*\(int64, 8 bytes per row\)"):
        fastloss.evaluate(x, tmp_path / "todd.bin")
    with pytest.raises(ValueError, match=r"raw_dtype \(--dtype\): unknown dtype 'float33'"):
        fastloss.evaluate(xb, t, layout=Layout(raw_dtype="float33", vocab=4))
    with pytest.raises(ValueError, match=r"vocab \(--vocab\): expected a positive integer, found 0"):
        fastloss.evaluate(xb, t, layout=Layout(raw_dtype="float32", vocab=0))
    with pytest.raises(EvalInputError, match="logits dtype int32; expected float16"):
        fastloss.evaluate(xb, t, layout=Layout(raw_dtype="int32", vocab=4))
    with pytest.raises(EvalInputError, match="targets dtype float32; expected integers"):
        fastloss.evaluate(x, tmp_path / "t.bin", layout=Layout(targets_dtype="float32"))


def test_layout_checked_once_and_keyword_only(rng):
    """``Layout`` holds the file-format knobs that used to be evaluate's keywords."""
    import dataclasses

    lay = Layout(raw_dtype="bf16", vocab=np.int64(11), hidden_dim=8, targets_dtype="i4",
                 targets_key="input_ids")
    assert (lay.raw_dtype, lay.vocab, lay.hidden_dim, lay.targets_dtype) == (BF16, 11, 8, np.dtype(np.int32))
    assert type(lay.vocab) is int and lay.targets_key == "input_ids" and lay.logits_key is None
    assert Layout() == Layout(raw_dtype=None) and fastloss.evaluation.Layout is Layout
    with pytest.raises(dataclasses.FrozenInstanceError):
        lay.vocab = 3
    with pytest.raises(TypeError):
        Layout("float32")  # keyword-only: no argument-order mistakes
    with pytest.raises(TypeError, match=r"^lm_head_key \(--lm-head-key\): expected a tensor name "
                                        r"\(str\) or None, found int$"):
        Layout(lm_head_key=3)
    with pytest.raises(ValueError, match=r"hidden_dim \(--hidden-dim\): expected a positive integer, found -1"):
        Layout(hidden_dim=-1)
    with pytest.raises(ValueError, match=r"targets_dtype \(--targets-dtype\): unknown dtype 'int33'"):
        Layout(targets_dtype="int33")
    x, t = _dump(rng, n=10, v=4)
    with pytest.raises(TypeError, match=r"^layout: expected a fastloss\.evaluation\.Layout or None, found dict$"):
        fastloss.evaluate(x, t, layout={"vocab": 4})
    with pytest.raises(TypeError, match="unexpected keyword argument 'raw_dtype'"):
        fastloss.evaluate(x, t, raw_dtype="float32")  # the keywords before Layout


# ---- glob patterns -------------------------------------------------------------------

def test_globs_natural_order(rng, tmp_path):
    x, t = _dump(rng, n=60, v=9)
    bounds = {1: (0, 10), 2: (10, 25), 10: (25, 60)}
    for k, (a, b) in bounds.items():
        np.save(tmp_path / f"logits-{k}.npy", x[a:b])
        np.save(tmp_path / f"targets-{k}.npy", t[a:b])
    r = fastloss.evaluate(str(tmp_path / "logits-*.npy"), str(tmp_path / "targets-*.npy"))
    assert [os.path.basename(f) for f in r.logits_files] == ["logits-1.npy", "logits-2.npy",
                                                             "logits-10.npy"]
    _same_report(r, fastloss.evaluate(x, t))
    r = fastloss.evaluate([tmp_path / "logits-1[0]*.npy", tmp_path / "logits-[12].npy"],
                          [str(tmp_path / "targets-10.npy"), tmp_path / "targets-[12].npy"])
    # a list keeps its order; each pattern in it is expanded in natural order
    assert os.path.basename(r.logits_files[0]) == "logits-10.npy"
    assert [os.path.basename(f) for f in r.targets_files] == ["targets-10.npy", "targets-1.npy",
                                                              "targets-2.npy"]
    _same_report(r, fastloss.evaluate(np.concatenate([x[25:], x[:25]]),
                                      np.concatenate([t[25:], t[:25]])))
    with pytest.raises(EvalInputError, match=r"nothing-\*\.npy: no file matches this pattern"):
        fastloss.evaluate(str(tmp_path / "nothing-*.npy"), t)
    assert sorted(["a-10", "a-2", "a-1b", "a-1"], key=natural_key) == ["a-1", "a-1b", "a-2", "a-10"]
    weird = tmp_path / "x[1].npy"  # an existing file is taken literally, magic characters or not
    np.save(weird, x)
    assert expand_paths(str(weird)) == [str(weird)]


# ---- sequences: --seq-len and --shift ------------------------------------------------

def _losses(x, t):
    """Per-token float64 losses of the counted tokens and their indices."""
    z = np.asarray(x, np.float64)
    keep = np.flatnonzero(t != IGNORE)
    return logsumexp(z[keep], axis=1) - z[keep, t[keep]], keep


@pytest.mark.parametrize("chunk", [None, 1, 5, 13])
def test_shift_matches_explicit_targets(rng, tmp_path, chunk):
    L, nseq, v = 7, 9, 12
    x, _ = _dump(rng, n=L * nseq, v=v, dtype=np.float64)
    tok = rng.integers(0, v, L * nseq)
    tok[[5, 30]] = IGNORE  # padding inside the token stream stays ignored
    tok[np.arange(0, L * nseq, L)[1:4]] = v + 3  # first tokens of sequences are never targets
    tgt = np.full(L * nseq, IGNORE)
    i = np.arange(L * nseq - 1)
    tgt[i] = np.where(i % L != L - 1, tok[i + 1], IGNORE)
    # shards that split sequences at odd places, for the logits and the token ids
    np.save(tmp_path / "x0.npy", x[:20])
    np.save(tmp_path / "x1.npy", x[20:])
    for k, (a, b) in enumerate([(0, 8), (8, 9), (9, 41), (41, L * nseq)]):
        np.save(tmp_path / f"tok{k}.npy", tok[a:b])
    r = fastloss.evaluate([tmp_path / "x0.npy", tmp_path / "x1.npy"],
                          sorted(map(str, tmp_path.glob("tok*.npy"))), seq_len=L, shift=True,
                          chunk_tokens=chunk)
    _same_report(r, fastloss.evaluate(x, tgt, seq_len=L), rtol=1e-9)
    loss, keep = _losses(x, tgt)
    pos = keep % L
    assert r.per_position_count == np.bincount(pos, minlength=L).tolist()
    assert r.per_position_count[-1] == 0 and r.per_position_loss[-1] is None
    want = np.bincount(pos, weights=loss, minlength=L)[:-1] / np.bincount(pos, minlength=L)[:-1]
    np.testing.assert_allclose(r.per_position_loss[:-1], want, rtol=1e-12)
    assert r.ignored == L * nseq - keep.size and r.seq_len == L and r.shift


def test_seq_len_without_shift_and_report(rng):
    L = 200
    x, t = _dump(rng, n=3 * L, v=8, dtype=np.float64)
    t[::L] = IGNORE
    r = fastloss.evaluate(x, t, seq_len=L, chunk_tokens=77)
    loss, keep = _losses(x, t)
    pos = keep % L
    counts = np.bincount(pos, minlength=L)
    assert r.per_position_count == counts.tolist() and counts[0] == 0
    sums = np.bincount(pos, weights=loss, minlength=L)
    got = np.array([np.nan if v is None else v for v in r.per_position_loss])
    np.testing.assert_allclose(got[1:], sums[1:] / counts[1:], rtol=1e-12)
    assert math.isnan(got[0])
    d = r.to_dict()
    assert d["per_position_loss"][0] is None and len(d["per_position_count"]) == L
    assert d["seq_len"] == L and d["shift"] is False
    text = r.format()
    assert "loss by position in the sequence (seq_len 200)" in text
    assert "pos 1: " in text and "pos 199: " in text and "pos 0:" not in text
    profile = next(line for line in text.splitlines() if "profile [" in line)
    assert len(profile.split("[")[1].split("]")[0]) == 64 and "positions per character" in profile


def test_sequence_errors(rng):
    x, t = _dump(rng, n=10, v=4)
    with pytest.raises(EvalInputError, match=r"<targets array>: 10 tokens are not a whole number "
                                             r"of sequences of seq_len=4"):
        fastloss.evaluate(x, t, seq_len=4, shift=True)
    with pytest.raises(ValueError, match=r"shift: needs seq_len"):
        fastloss.evaluate(x, t, shift=True)
    with pytest.raises(ValueError, match="seq_len: expected a positive integer, found 0"):
        fastloss.evaluate(x, t, seq_len=0)
    tok = np.array([9, 1, 2, 3, 1, 9, 0, 0, 1, 2])  # 9 only at first positions: fine
    assert fastloss.evaluate(x, tok, seq_len=5, shift=True).tokens == 8
    tok[7] = 4
    with pytest.raises(EvalInputError, match=r"1 token id\(s\) used as targets outside \[0, 4\).*"
                                             r"first at token 7 of this file: 4"):
        fastloss.evaluate(x, tok, seq_len=5, shift=True)


# ---- progress ------------------------------------------------------------------------

def test_progress_bar(rng, tmp_path, capsys):
    x, t = _dump(rng, n=40, v=5)
    fastloss.evaluate(x, t, progress=True, chunk_tokens=10)
    assert "tok" in capsys.readouterr().err
    fastloss.evaluate(x, t, chunk_tokens=10)
    fastloss.evaluate(x, t, progress=None)  # stderr is not a terminal here
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="progress: expected True, False or None"):
        fastloss.evaluate(x, t, progress="yes")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    args = ["eval", str(tmp_path / "x.npy"), "--targets", str(tmp_path / "t.npy")]
    assert main(args + ["--progress"]) == 0
    assert "tok/s" in capsys.readouterr().err
    assert main(args) == 0 and main(args + ["--no-progress"]) == 0
    assert capsys.readouterr().err == ""


# ---- hidden states through an LM head ------------------------------------------------

def _head(rng, n=37, d=29, v=1001, dtype=np.float32):
    h = rng.standard_normal((n, d)).astype(dtype)
    w = (rng.standard_normal((v, d)) / math.sqrt(d) * 3).astype(dtype)
    b = rng.standard_normal(v).astype(dtype)
    t = rng.integers(0, v, n)
    t[::6] = IGNORE
    return h, w, b, t


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-6), (np.float64, 1e-12)])
@pytest.mark.parametrize("chunk", [None, 5, 36, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_hidden_matches_logits(rng, dtype, rtol, chunk, with_bias):
    h, w, b, t = _head(rng, dtype=dtype)
    b = b if with_bias else None
    r = fastloss.evaluate(hidden=h, lm_head=w, bias=b, targets=t, chunk_tokens=chunk)
    logits = h @ w.T + (b if with_bias else 0)
    _same_report(r, fastloss.evaluate(logits, t), rtol=rtol)
    assert r.vocab == 1001 and r.hidden_files == ["<hidden array>"] and r.logits_files == []


def test_hidden_half_precision_and_nd(rng):
    h, w, _, t = _head(rng, n=36, d=16, v=300)
    for dt in (np.float16, BF16):
        hh, wh = h.astype(dt), w.astype(dt)
        r = fastloss.evaluate(hidden=hh.reshape(4, 9, 16), lm_head=wh, targets=t.reshape(4, 9),
                              chunk_tokens=7, seq_len=9)
        ref = fastloss.evaluate(hh.astype(np.float32) @ wh.astype(np.float32).T, t, seq_len=9)
        _same_report(r, ref, rtol=1e-5)


def test_hidden_memory_bounded_by_chunk(rng):
    import tracemalloc
    n, d, v = 3000, 16, 1000
    h = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((v, d)).astype(np.float32)
    t = rng.integers(0, v, n)
    fastloss.evaluate(hidden=h[:64], lm_head=w, targets=t[:64], chunk_tokens=8)  # compile first
    tracemalloc.start()
    fastloss.evaluate(hidden=h, lm_head=w, targets=t, chunk_tokens=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_500_000  # N x V float32 logits would be 12 MB; a chunk is 256 kB


def test_hidden_from_files_and_cli(rng, tmp_path, capsys):
    from safetensors.numpy import save_file

    h, w, b, t = _head(rng, n=40, d=8, v=50)
    np.save(tmp_path / "h-1.npy", h[:15])
    np.save(tmp_path / "h-2.npy", h[15:])
    save_file({"model.norm.weight": np.ones(8, np.float32), "lm_head.weight": w},
              str(tmp_path / "model.safetensors"))
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "t.npy", t)
    h.tofile(tmp_path / "h.raw")
    ref = fastloss.evaluate(h @ w.T + b, t)
    r = fastloss.evaluate(hidden=str(tmp_path / "h-*.npy"), lm_head=tmp_path / "model.safetensors",
                          bias=tmp_path / "b.npy", targets=tmp_path / "t.npy", chunk_tokens=6)
    _same_report(r, ref, rtol=1e-6)
    assert r.lm_head_file.endswith("model.safetensors") and r.bias_file.endswith("b.npy")
    r = fastloss.evaluate(hidden=tmp_path / "h.raw", lm_head=w, bias=b, targets=t,
                          layout=Layout(raw_dtype="float32", hidden_dim=8))
    _same_report(r, ref, rtol=1e-6)
    out = tmp_path / "r.json"
    assert main(["eval", "--hidden", str(tmp_path / "h-*.npy"), "--lm-head",
                 str(tmp_path / "model.safetensors"), "--bias", str(tmp_path / "b.npy"),
                 "--targets", str(tmp_path / "t.npy"), "--json", str(out)]) == 0
    assert "mean loss" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["mean_loss"] == pytest.approx(ref.mean_loss, rel=1e-6) and len(d["hidden_files"]) == 2


def test_hidden_errors(rng, tmp_path, capsys):
    h, w, b, t = _head(rng, n=10, d=6, v=20)
    np.save(tmp_path / "h.npy", h)
    np.save(tmp_path / "w.npy", w[:, :5])
    np.save(tmp_path / "b.npy", b[:19])
    with pytest.raises(EvalInputError, match=r"h\.npy: hidden size 6 \(shape \(10, 6\)\) differs "
                                             r"from the LM head's 5 in .*w\.npy \(shape \(20, 5\)"):
        fastloss.evaluate(hidden=tmp_path / "h.npy", lm_head=tmp_path / "w.npy", targets=t)
    with pytest.raises(EvalInputError, match=r"b\.npy: bias shape \(19,\) does not match the LM "
                                             r"head <lm_head array>: expected \(20,\)"):
        fastloss.evaluate(hidden=h, lm_head=w, bias=tmp_path / "b.npy", targets=t)
    with pytest.raises(ValueError, match="logits: pass either logits or hidden"):
        fastloss.evaluate(h @ w.T, t, hidden=h, lm_head=w)
    with pytest.raises(ValueError, match="lm_head: required with hidden"):
        fastloss.evaluate(hidden=h, targets=t)
    with pytest.raises(ValueError, match="lm_head, bias: only used with hidden"):
        fastloss.evaluate(h @ w.T, t, lm_head=w)
    with pytest.raises(EvalInputError, match=r"<lm_head array>: lm_head shape \(120,\); expected \(V, D\)"):
        fastloss.evaluate(hidden=h, lm_head=w.reshape(-1)[:120], targets=t)
    with pytest.raises(EvalInputError, match=r"hidden states \(<hidden array>\) hold 10 tokens"):
        fastloss.evaluate(hidden=h, lm_head=w, targets=t[:9])
    hp = str(tmp_path / "h.npy")
    _expect_error(capsys, ["eval", hp, "--hidden", hp, "--lm-head", hp, "--targets", hp],
                  "either LOGITS or --hidden")
    _expect_error(capsys, ["eval", "--hidden", hp, "--targets", hp], "--hidden: needs --lm-head")
    _expect_error(capsys, ["eval", "--targets", hp], "no LOGITS given")
    _expect_error(capsys, ["eval", hp, "--lm-head", hp, "--targets", hp], "only used with --hidden")
    (tmp_path / "h.bin").write_bytes(h.tobytes())
    _expect_error(capsys, ["eval", "--hidden", str(tmp_path / "h.bin"), "--lm-head", hp,
                           "--targets", hp, "--dtype", "float32"], "h.bin", "--hidden-dim")


# ---- bad input through the command line: exit 2, one line naming the file -------------

def _expect_error(capsys, argv, *needles):
    assert main(argv) == 2
    cap = capsys.readouterr()
    line = cap.err.strip()
    assert "\n" not in line and "Traceback" not in cap.err, cap.err
    assert line.startswith("fastloss eval: error: ") and cap.out == ""  # never a partial report
    for needle in needles:
        assert needle in line, line
    return line


def test_cli_bad_inputs_each_format(rng, tmp_path, capsys):
    x, t = _dump(rng, n=60, v=9)
    sa = write_safetensors(tmp_path / "a.safetensors", {"logits": x[:30]})
    sb = write_safetensors(tmp_path / "b.safetensors", {"logits": x[30:]})
    ts = write_safetensors(tmp_path / "t.safetensors", {"targets": t})
    x.tofile(tmp_path / "x.bin")
    rep = tmp_path / "r.json"
    ok = ["eval", sa, sb, "--targets", ts, "--json", str(rep)]
    assert main(ok) == 0 and rep.exists()
    capsys.readouterr()
    rep.unlink()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(Path(sb).read_bytes()[:-10])
    _expect_error(capsys, ["eval", sa, str(trunc), "--targets", ts, "--json", str(rep)],
                  str(trunc), "truncated")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{oops")
    _expect_error(capsys, ["eval", sa, str(bad), "--targets", ts], str(bad), "not JSON")
    (tmp_path / "odd.bin").write_bytes(x.tobytes()[:-1])
    _expect_error(capsys, ["eval", str(tmp_path / "odd.bin"), "--dtype", "float32", "--vocab", "9",
                           "--targets", ts], "odd.bin", "2159 bytes", "36 bytes per row")
    _expect_error(capsys, ["eval", str(tmp_path / "x.bin"), "--targets", ts], "x.bin", "--dtype",
                  "--vocab")
    _expect_error(capsys, ["eval", str(tmp_path / "x.bin"), "--dtype", "float32", "--vocab", "7",
                           "--targets", ts], "x.bin", "2160 bytes", "28 bytes per row")
    _expect_error(capsys, ["eval", sa, "--targets", ts], ts, "60 target tokens", "30 tokens")
    wide = write_safetensors(tmp_path / "w.safetensors", {"logits": np.ones((30, 10), np.float32)})
    _expect_error(capsys, ["eval", sa, wide, "--targets", ts], wide, "vocabulary size 10", "9")
    t_bad = t.copy()
    t_bad[44] = 9
    tb = write_safetensors(tmp_path / "tb.safetensors", {"labels": t_bad, "mask": t_bad})
    _expect_error(capsys, ["eval", sa, sb, "--targets", tb], tb, "outside [0, 9)", "token 44")
    xn = x[30:].copy()
    xn[4, 2] = np.nan
    t2 = np.where(t < 0, 1, t)
    nanf = write_safetensors(tmp_path / "n.safetensors", {"logits": xn})
    ts2 = write_safetensors(tmp_path / "t2.safetensors", {"targets": t2})
    _expect_error(capsys, ["eval", sa, nanf, "--targets", ts2, "--chunk-tokens", "3", "--json",
                           str(rep)], nanf, "NaN loss at token 4")
    assert not rep.exists()
    assert main(["eval", sa, nanf, "--targets", ts2, "--skip-invalid"]) == 0
    assert "1 skipped as invalid" in capsys.readouterr().out
    _expect_error(capsys, ["eval", str(tmp_path / "none-*.bin"), "--targets", ts],
                  "none-*.bin", "no file matches")
    _expect_error(capsys, ["eval", sa, sb, "--targets", ts, "--seq-len", "7"], "not a whole number",
                  "seq_len=7")
    _expect_error(capsys, ["eval", sa, sb, "--targets", ts, "--shift"], "--shift: needs --seq-len")
    _expect_error(capsys, ["eval", sa, sb, "--targets", ts, "--logits-key", "zz"], sa, "'zz'")


def test_cli_shift_and_seq_len(rng, tmp_path, capsys):
    L = 10
    x, _ = _dump(rng, n=5 * L, v=9)
    tok = rng.integers(0, 9, 5 * L).astype(np.int32)
    x.tofile(tmp_path / "x.f32")
    tok.tofile(tmp_path / "tok.i32")
    out = tmp_path / "r.json"
    assert main(["eval", str(tmp_path / "x.f32"), "--dtype", "float32", "--vocab", "9",
                 "--targets", str(tmp_path / "tok.i32"), "--targets-dtype", "int32",
                 "--seq-len", str(L), "--shift", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "loss by position in the sequence (seq_len 10; targets shifted" in text
    d = json.loads(out.read_text())
    ref = fastloss.evaluate(x, tok, seq_len=L, shift=True)
    assert d["per_position_count"] == [5] * (L - 1) + [0]
    assert d["per_position_loss"][-1] is None
    assert d["per_position_loss"][:-1] == pytest.approx(ref.per_position_loss[:-1], rel=1e-12)
    assert d["tokens"] == 45 and d["ignored"] == 5


# ---- fastloss.compare reads the same inputs -------------------------------------------

def test_compare_reads_safetensors_raw_and_globs_like_evaluate(rng, tmp_path):
    """compare's two sides go through the same readers: a bfloat16 .safetensors file with
    a tensor chosen by key, raw float16 shards by a glob, targets by key; the figures
    equal those of the same arrays in memory."""
    base, t = _dump(rng, n=120, v=19)
    model = (base + 0.3 * rng.standard_normal(base.shape)).astype(np.float16)
    base = base.astype(BF16)
    st = write_safetensors(tmp_path / "base.safetensors",
                           {"other": base[:2], "logits": base, "labels": t.astype(np.int32)})
    for k, (lo, hi) in enumerate([(0, 50), (50, 120)]):
        model[lo:hi].tofile(tmp_path / f"model-{k}.raw")
    lay = Layout(raw_dtype="float16", vocab=19, targets_key="labels")
    got = fastloss.compare(st, str(tmp_path / "model-*.raw"), st, layout=lay, seq_len=40)
    want = fastloss.compare(base, model, t, seq_len=40)
    d_got, d_want = got.to_dict(), want.to_dict()
    for files in ("base_files", "model_files", "targets_files"):
        d_got.pop(files), d_want.pop(files)
    assert d_got.keys() == d_want.keys()
    for key, value in d_want.items():  # sums merged over other chunks: float64 rounding
        if isinstance(value, float):
            assert d_got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
        elif key != "per_position_kl":
            assert d_got[key] == value, key  # per-token values: the same bits
    assert got.model_files == [str(tmp_path / "model-0.raw"), str(tmp_path / "model-1.raw")]
    with pytest.raises(EvalInputError, match=r"model-\*\.bin: no file matches this pattern"):
        fastloss.compare(st, str(tmp_path / "model-*.bin"), layout=lay)
    with pytest.raises(EvalInputError, match=r"model-0\.raw: not \.npy or \.safetensors, so read "
                                             r"as raw logits values: pass raw_dtype= \(--dtype\)"):
        fastloss.compare(st, str(tmp_path / "model-*.raw"))
