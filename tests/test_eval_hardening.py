"""``fastloss eval`` against hostile dumps: sizes that overflow int64, deep JSON, empty
heads and vocabularies, bad output paths, the report file's mode, the top-level handler of
unexpected errors, and a hypothesis fuzz of the .npy, .safetensors and raw readers (every
outcome is exit 2 with one line, or the report of the same bytes read by numpy)."""

import contextlib
import io
import json
import os
import struct
import warnings

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings

import fastloss
from fastloss import _io
from fastloss.cli import main

FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZ_EXAMPLES = 1000
FUZZ_EXAMPLES_SLOW = 5000
NUMBER_KEYS = ("tokens", "ignored", "mean_loss", "accuracy", "top5_accuracy", "mean_entropy",
               "ece", "unigram_baseline", "loss_max")


def run_cli(argv):
    """(exit status, stdout, stderr) of ``fastloss`` run in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc, out, err, *needles):
    assert rc == 2, (rc, err)
    assert out == ""
    assert err.startswith("fastloss eval: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def npy_bytes(shape, descr="<f4", data=b"", fortran=False, header=None):
    """A .npy file written by hand (so that the header may lie about the data)."""
    h = header if header is not None else (
        f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {tuple(shape)!r}, }}")
    h = h.encode("latin1") if isinstance(h, str) else h
    h += b" " * (-(10 + len(h) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + data


def st_bytes(header, data=b""):
    """A .safetensors file: 8-byte LE header length, the header (dict or bytes), data."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.fixture
def targets(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.array([1, 3, 0, 2]))
    return str(path)


# ---- item 1 and 2: sizes from headers, in Python ints ---------------------------------

@pytest.mark.parametrize("rows", [2**62 + 1, 2**63, 2**64 + 5])
def test_npy_header_rows_overflowing_int64_are_truncated_files(tmp_path, targets, rows):
    p = tmp_path / "x.npy"
    p.write_bytes(npy_bytes((rows, 4), data=bytes(16)))
    assert_one_line_error(*run_cli(["eval", str(p), "--targets", targets]),
                          str(p), "truncated", str(rows))


@pytest.mark.parametrize("rows", [2**62 + 1, 2**63])
def test_safetensors_shape_overflowing_int64_is_corrupt(tmp_path, targets, rows):
    p = tmp_path / "x.safetensors"
    p.write_bytes(st_bytes({"logits": {"dtype": "F32", "shape": [rows, 4],
                                       "data_offsets": [0, 16]}}, bytes(16)))
    assert_one_line_error(*run_cli(["eval", str(p), "--targets", targets]),
                          str(p), "hold 16 bytes", str(rows))


def test_safetensors_header_nested_deeply(tmp_path, targets):
    p = tmp_path / "x.safetensors"
    p.write_bytes(st_bytes(b"[" * 100_000 + b"]" * 100_000))
    assert_one_line_error(*run_cli(["eval", str(p), "--targets", targets]),
                          str(p), "nested too deeply")


def test_lm_head_with_no_rows(tmp_path, targets):
    h, w = tmp_path / "h.npy", tmp_path / "w.npy"
    np.save(h, np.ones((4, 3), np.float32))
    np.save(w, np.ones((0, 3), np.float32))
    assert_one_line_error(*run_cli(["eval", "--hidden", str(h), "--lm-head", str(w),
                                    "--targets", targets]), str(w), "(0, 3)", "V >= 1")


def test_empty_raw_dump_with_a_huge_vocab(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"")
    assert_one_line_error(*run_cli(["eval", str(p), "--dtype", "float32", "--vocab",
                                    "1000000000000", "--targets", str(p)]),
                          str(p), "no rows", "1000000000000")


def test_empty_npy_with_a_huge_vocab(tmp_path, targets):
    p = tmp_path / "x.npy"
    p.write_bytes(npy_bytes((0, 2**40)))
    assert_one_line_error(*run_cli(["eval", str(p), "--targets", targets]), str(p), "no rows")


def test_empty_raw_hidden_states_with_a_huge_hidden_dim(tmp_path, targets):
    h, w = tmp_path / "h.bin", tmp_path / "w.npy"
    h.write_bytes(b"")
    np.save(w, np.ones((3, 2), np.float32))
    assert_one_line_error(*run_cli(["eval", "--hidden", str(h), "--lm-head", str(w),
                                    "--dtype", "float32", "--hidden-dim", str(2**50),
                                    "--targets", str(h)]), str(h), "no rows")


@pytest.mark.parametrize("raw", [False, True])
def test_seq_len_longer_than_the_dump(tmp_path, targets, raw):
    x = tmp_path / "x.bin"
    x.write_bytes(b"")
    argv = (["eval", str(x), "--dtype", "float32", "--vocab", "3", "--targets", str(x)] if raw
            else ["eval", str(x.with_suffix(".npy")), "--targets", targets])
    np.save(x.with_suffix(".npy"), np.ones((4, 3), np.float32))
    assert_one_line_error(*run_cli([*argv, "--seq-len", str(10**12)]),
                          f"seq_len={10**12} (--seq-len) is longer than the {0 if raw else 4} tokens")


# ---- item 2: the top-level handler -----------------------------------------------------

def test_unexpected_error_exits_1_with_one_line(tmp_path, targets, monkeypatch):
    from fastloss.cli import evaluate as cli_eval

    def boom(args, argv):
        raise KeyError("boom\nsecond line")

    monkeypatch.setattr(cli_eval, "run", boom)
    monkeypatch.delenv("FASTLOSS_DEBUG", raising=False)
    rc, out, err = run_cli(["eval", "x.npy", "--targets", targets])
    assert rc == 1 and out == ""
    assert err.startswith("fastloss eval: internal error: KeyError") and err.count("\n") == 1
    assert err.rstrip().endswith("FASTLOSS_DEBUG=1 shows the traceback)")
    assert "please report" in err
    monkeypatch.setenv("FASTLOSS_DEBUG", "1")
    with pytest.raises(KeyError, match="boom"):
        run_cli(["eval", "x.npy", "--targets", targets])


def test_keyboard_interrupt_is_not_swallowed(targets, monkeypatch):
    from fastloss.cli import evaluate as cli_eval

    def interrupted(args, argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_eval, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(["eval", "x.npy", "--targets", targets])


# ---- items 3 and 4: output paths and the report's mode --------------------------------

@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_output_path_in_a_missing_folder_fails_before_the_report(tmp_path, targets, flag):
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32))
    bad = tmp_path / "nodir" / "r.out"
    rc, out, err = run_cli(["eval", str(x), "--targets", targets, flag, str(bad)])
    assert_one_line_error(rc, out, err, f"{bad}: cannot write ({flag})", "no such folder")
    assert ".fastloss-eval-" not in err


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_output_path_that_is_a_directory_or_empty(tmp_path, targets, flag):
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32))
    assert_one_line_error(*run_cli(["eval", str(x), "--targets", targets, flag, str(tmp_path)]),
                          f"{tmp_path}: cannot write ({flag}): is a directory")
    assert_one_line_error(*run_cli(["eval", str(x), "--targets", targets, flag, ""]),
                          f"{flag}: expected a file path, found an empty string")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_write_json_atomic_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        _io.write_json_atomic({"a": 1}, tmp_path / "r.json")
        with open(tmp_path / "plain.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    mode = os.stat(tmp_path / "r.json").st_mode & 0o777
    assert mode == 0o666 & ~umask == os.stat(tmp_path / "plain.json").st_mode & 0o777
    assert sorted(os.listdir(tmp_path)) == ["plain.json", "r.json"]


# ---- item 5: fuzz the readers -----------------------------------------------------------

N, V = 6, 5
DTYPES = {"<f4": "F32", "<f2": "F16", "<f8": "F64"}
BIG = st.sampled_from([0, 1, 2, 3, 5, 6, 30, 2**31, 2**32 + 6, 2**62 + 1, 2**63, 2**64 + 5])
DIM = st.one_of(st.integers(0, 40), BIG)


def reference_array(kind, blob, path_args):
    """The logits numpy reads from ``blob`` (raises when numpy cannot make sense of it)."""
    if kind == "npy":
        arr = np.load(io.BytesIO(blob), allow_pickle=False)
        assert arr.ndim >= 1 and arr.flags.c_contiguous
        return arr.reshape(-1, arr.shape[-1])
    if kind == "safetensors":
        (hlen,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + hlen])
        header.pop("__metadata__", None)
        entry = header["logits"] if "logits" in header else next(iter(header.values()))
        assert "logits" in header or len(header) == 1
        begin, end = entry["data_offsets"]
        dtype = {v: k for k, v in DTYPES.items()}[entry["dtype"]]
        assert 8 + hlen + end <= len(blob)
        arr = np.frombuffer(blob[8 + hlen + begin:8 + hlen + end], dtype).reshape(entry["shape"])
        return arr.reshape(-1, arr.shape[-1])
    dtype, vocab = path_args
    return np.frombuffer(blob, dtype).reshape(-1, vocab)


@st.composite
def dumps(draw):
    """(kind, file bytes, extra CLI flags): a valid dump of (N, V) logits, then mangled."""
    descr = draw(st.sampled_from(sorted(DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    data = (rng.standard_normal((N, V)) * 3).astype(descr).tobytes()
    kind = draw(st.sampled_from(["npy", "safetensors", "raw"]))

    def maybe(valid, mangled):  # each field mangled one time in four
        return draw(mangled) if draw(st.integers(0, 3)) == 0 else valid

    extra = []
    path_args = None
    if kind == "npy":
        shape = maybe((N, V), st.lists(DIM, min_size=0, max_size=3).map(tuple))
        d = maybe(descr, st.sampled_from(["<f4", ">f4", "<i4", "|u1", "<V8", "|O", "<f16",
                                          "bogus"]))
        fortran = maybe(False, st.booleans())
        header = None
        if draw(st.integers(0, 9)) == 0:  # a header that is not a dict literal at all
            header = draw(st.sampled_from(["{'descr': '<f4', 'shape': (1e400,)}",
                                           "(" * 5000 + ")" * 5000, "{'shape': ((((", "\x00"]))
        blob = npy_bytes(shape, d, data, fortran, header)
    elif kind == "safetensors":
        code = DTYPES[descr]
        shape = maybe([N, V], st.lists(DIM, min_size=0, max_size=3))
        begin = maybe(0, DIM)
        end = maybe(begin + len(data), DIM)
        code = maybe(code, st.sampled_from(["F32", "I32", "BOOL", "X9", 7]))
        entry = {"dtype": code, "shape": shape, "data_offsets": [begin, end]}
        header = {"logits": entry}
        if draw(st.booleans()):
            header["__metadata__"] = {"a": "b"}
        hbytes = json.dumps(header).encode()
        if draw(st.integers(0, 4)) == 0:  # corrupt the JSON bytes
            i = draw(st.integers(0, len(hbytes) - 1))
            hbytes = hbytes[:i] + bytes([draw(st.integers(0, 255))]) + hbytes[i + 1:]
        blob = st_bytes(hbytes, data)
        if draw(st.integers(0, 9)) == 0:  # a lying header length
            blob = struct.pack("<Q", draw(DIM.filter(lambda n: n < 2**64))) + blob[8:]
    else:
        dtype = maybe(descr, st.sampled_from(["<f4", "<f2", "<f8"]))
        vocab = maybe(V, st.one_of(st.integers(1, 40), st.sampled_from([2**31, 10**12])))
        extra = ["--dtype", {"<f4": "float32", "<f2": "float16", "<f8": "float64"}[dtype],
                 "--vocab", str(vocab)]
        path_args = (np.dtype(dtype), vocab)
        blob = data
    cut = maybe(None, st.integers(0, len(blob)))
    if cut is not None:  # truncate, or pad with a few bytes
        blob = blob[:cut] if draw(st.booleans()) else blob + bytes(cut % 9)
    return kind, blob, extra, path_args


def check_dump(tmp_path, case):
    kind, blob, extra, path_args = case
    path = tmp_path / ("x.npy" if kind == "npy" else "x.safetensors" if kind == "safetensors"
                       else "x.bin")
    path.write_bytes(blob)
    tpath = tmp_path / "t.npy"
    # as many targets as numpy sees rows (if it can read the file), else N
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # np.load's own int64 wrap of a lying header
            ref = reference_array(kind, blob, path_args)
    except Exception:
        ref = None
    rows = N if ref is None else ref.shape[0]
    width = V if ref is None or ref.shape[-1] == 0 else ref.shape[-1]
    t = (np.arange(rows) * 7 + 3) % width
    np.save(tpath, t)
    jpath = tmp_path / "r.json"
    if jpath.exists():
        jpath.unlink()
    rc, out, err = run_cli(["eval", str(path), "--targets", str(tpath), "--no-progress",
                            "--json", str(jpath), *extra])
    event(f"{kind}: exit {rc}")
    if rc != 0:
        assert_one_line_error(rc, out, err)
        assert str(path) in err or str(tpath) in err, err  # names the file
        return
    assert ref is not None, "fastloss accepted a file numpy cannot read"
    got = json.loads(jpath.read_text())
    want = fastloss.evaluate(np.ascontiguousarray(ref), t).to_dict()
    assert got["vocab"] == want["vocab"] == ref.shape[-1]
    for key in NUMBER_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


@settings(max_examples=FUZZ_EXAMPLES, **FUZZ)
@given(case=dumps())
def test_fuzz_readers(tmp_path, case):
    check_dump(tmp_path, case)


@pytest.mark.slow
@settings(max_examples=FUZZ_EXAMPLES_SLOW, **FUZZ)
@given(case=dumps())
def test_fuzz_readers_many(tmp_path, case):
    check_dump(tmp_path, case)
