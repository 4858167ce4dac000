"""Streaming readers for evaluation dumps: arrays, ``.npy``, ``.safetensors`` and raw files.

A *source* is a list of shards concatenated along tokens. Every shard has
``name``, ``dtype``, ``shape``, ``rows``, ``width`` (values per row; 0 for 1-D
integer targets) and ``read(lo, hi)``, which returns rows ``[lo, hi)``.

A file shard is opened by reading and checking its header only (and that the
file holds as many bytes as the header promises); each ``read(lo, hi)`` then maps
just the byte range of those rows (``np.memmap`` with an offset) and the mapping
is dropped with the chunk, so the pages a chunk touched leave the process with it
and resident memory stays bounded by one chunk whatever the dump size.

Mapping beat copying (benchmarks/NOTES.md, "Evaluation streaming"): on a cached
4.3 GB dump the kernel over mapped chunks ran within ~15% of the same kernel over
chunks already in memory, while ``readinto`` a reused buffer, in the loop or in a
reader thread overlapping the kernel, took 2.7-3.1x as long: the copy costs CPU
time that the kernel's threads need. Populating the next chunk's mapping in a
thread (``MADV_POPULATE_READ``) was ~10% slower, and ``posix_fadvise(WILLNEED)``
hints for the next chunk cost ~7% on a cached file without speeding up an
uncached one (the kernel's own read-ahead on the mapping already keeps up).

* ``.npy``: numpy's header (magic, dtype, shape, order).
* ``.safetensors``: an 8-byte little-endian header length ``N``, ``N`` bytes of
  JSON mapping tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
  (offsets relative to the first byte after the header; an optional
  ``"__metadata__"`` entry is skipped), then the little-endian data. Parsed here,
  without the ``safetensors`` package.
* anything else: raw little-endian rows whose dtype and row width come from the
  caller's ``Layout`` (``raw_dtype``/``vocab``/``hidden_dim``, ``targets_dtype``).

Paths may be glob patterns (``"dump/logits-*.npy"``), expanded in natural order.

Paths may also be URLs (``PROTOCOL://...``, e.g. ``s3://bucket/dump/logits-*.npy``,
``memory://``, chained ``simplecache::s3://...``), read through fsspec, an optional
dependency imported only when a URL is seen. ``file://`` and ``local://`` URLs are
local paths (the same mapped reads); for any other protocol the header is read through
``fs.open`` and each ``read(lo, hi)`` fetches exactly the bytes of those rows
(``fs.cat_file`` with a byte range) into a fresh array. Glob patterns in URLs expand
through ``fs.glob`` and keep the URL form the user wrote (``memory://dump/logits-2.npy``),
which is the name errors and reports give.

Shards hold no open files or mappings between reads (a local read opens, maps and
closes; a URL read asks its fsspec filesystem, which pickles), so they pickle cheaply
and read in another process. A file that changed after it was opened (truncated,
deleted, no longer readable) makes ``read`` raise EvalInputError naming it.
"""

import dataclasses
import glob
import json
import math
import os
import re
import struct

import ml_dtypes
import numpy as np

from .. import _validate as V


class EvalInputError(ValueError):
    """A bad evaluation input; ``source`` names the file (or array) and ``problem`` what is wrong."""

    def __init__(self, source, problem):
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")

    def __reduce__(self):  # pickled from Dask workers to the client
        return type(self), (self.source, self.problem)


#: What each kind of input holds: (dtype family, allowed ndim or None, description).
#:   logits (..., V), hidden (..., D): floats with a last axis of at least 1;
#:   lm_head (V, D), bias (V,): floats, loaded whole; targets: integers, any shape.
KINDS = {
    "logits": ("float", None, "(..., V)"),
    "hidden": ("float", None, "(..., D)"),
    "lm_head": ("float", 2, "(V, D)"),
    "bias": ("float", 1, "(V,)"),
    "targets": ("int", None, "any shape"),
}

#: Tensor names tried, in order, when a ``.safetensors`` file holds several tensors and
#: no key is given.
DEFAULT_KEYS = {
    "logits": ("logits",),
    "hidden": ("hidden", "hidden_states"),
    "lm_head": ("lm_head.weight", "lm_head", "weight"),
    "bias": ("lm_head.bias", "bias"),
    "targets": ("targets", "labels", "input_ids"),
}

#: safetensors dtype codes (all little-endian).
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}

#: Longest JSON header read (the safetensors package refuses longer ones too).
SAFETENSORS_MAX_HEADER = 100_000_000

#: Widest row (vocabulary) accepted from a file with no rows, whose size bounds nothing.
MAX_EMPTY_WIDTH = 1 << 24

_DTYPE_ALIASES = {"bf16": V.BFLOAT16, "bfloat16": V.BFLOAT16, "fp16": np.dtype(np.float16),
                  "half": np.dtype(np.float16), "fp32": np.dtype(np.float32),
                  "fp64": np.dtype(np.float64)}


def parse_dtype(value, name):
    """A numpy dtype from a dtype or a name ("float32", "f4", "bf16", "int32", ...)."""
    if isinstance(value, str) and value.lower() in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[value.lower()]
    try:
        return np.dtype(value)
    except TypeError:
        raise ValueError(f"{name}: unknown dtype {value!r}; expected e.g. float32, float16, "
                         f"bfloat16, float64, int32 or int64") from None


def _check_contents(name, dtype, shape, kind):
    """EvalInputError unless a ``kind`` input may have this dtype and shape; returns the row width."""
    family, ndim, layout = KINDS[kind]
    if family == "float":
        if dtype.kind == "f" and not dtype.isnative:
            raise EvalInputError(name, f"byte-swapped dtype {dtype.str}; expected native byte order")
        if dtype not in V.FLOAT_DTYPES:
            raise EvalInputError(name, f"{kind} dtype {dtype}; expected float16, bfloat16, "
                                       f"float32 or float64")
        if (ndim is not None and len(shape) != ndim) or len(shape) == 0 or shape[-1] == 0:
            raise EvalInputError(name, f"{kind} shape {tuple(shape)}; expected {layout}"
                                       + ("" if ndim == 1 else f" with {layout[-2]} >= 1"))
        if ndim == 2 and shape[0] == 0:
            raise EvalInputError(name, f"{kind} shape {tuple(shape)}; expected {layout} with "
                                       f"{layout[1]} >= 1")
        return int(shape[-1]) if ndim != 1 else 0
    if dtype.kind not in "iu":
        raise EvalInputError(name, f"{kind} dtype {dtype}; expected integers")
    return 0


class ArrayShard:
    """An in-memory array seen as ``rows`` rows of ``width`` values (width 0: 1-D)."""

    def __init__(self, arr, name, width):
        self.name = name
        self.dtype = arr.dtype
        self.shape = arr.shape
        self.rows = int(np.prod(arr.shape[:-1] if width else arr.shape, dtype=np.int64))
        self.width = width
        self._flat = arr.reshape(self.rows, width) if width else arr.reshape(self.rows)

    def read(self, lo, hi):
        return self._flat[lo:hi]


class _FileShard:
    """Rows of one array stored contiguously (C order) at byte ``offset`` of a file,
    read per call through its ``store`` (a mapped local file or an fsspec object).
    Subclasses parse the header and call ``_setup``."""

    @property
    def path(self):
        """The local path, or the path within the fsspec filesystem, of the file."""
        return self.store.path

    def _setup(self, kind, dtype, shape, offset, size):
        # Every size from the header in Python ints (no int64 wrap-around), checked
        # against the file size before numpy sees any of it.
        self.shape = tuple(int(s) for s in shape)
        self.width = _check_contents(self.name, dtype, self.shape, kind)
        self.dtype = dtype
        self.offset = offset
        count = math.prod(self.shape)
        self.rows = count // self.width if self.width else count
        self.end = offset + count * dtype.itemsize
        if size < self.end:
            raise EvalInputError(
                self.name, f"truncated: the header promises shape {self.shape} of {dtype} "
                           f"({self.end} bytes with the header), the file has {size} bytes")
        if not self.rows and self.width > MAX_EMPTY_WIDTH:
            # No rows, so the size check does not bound the width (the vocabulary),
            # whose per-class arrays could not be allocated.
            raise EvalInputError(self.name, f"shape {self.shape}: no rows, and a row width of "
                                            f"{self.width} (more than {MAX_EMPTY_WIDTH})")

    def read(self, lo, hi):
        row_bytes = self.dtype.itemsize * max(self.width, 1)
        shape = (hi - lo, self.width) if self.width else (hi - lo,)
        if hi <= lo:
            return np.empty(shape, self.dtype)
        return self.store.rows(self.offset + lo * row_bytes, self.dtype, shape, self.end)


#: ``PROTOCOL://`` at the start of a path read through fsspec, chains such as
#: ``simplecache::s3://`` included. Two characters at least, so that a Windows drive
#: (``C:/...``) is never a protocol.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]+(?:::[A-Za-z][A-Za-z0-9+.\-]+)*://")

#: Protocols naming local files, read as plain paths (fsspec's names for them).
_LOCAL_PROTOCOLS = ("file", "local")

#: Readahead block of the file object through which a URL's header is parsed: one
#: request holds any .npy header and most safetensors headers (fsspec's default block,
#: 5 MiB for s3fs, would fetch far more than a header).
URL_HEADER_BLOCK = 1 << 20


def _opened_problem(e, expect):
    """The open-time message of an OS failure (None: not one of the usual ones)."""
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError):
        return f"is a directory, expected {expect}"
    if isinstance(e, PermissionError):
        return "permission denied"
    return None


def _read_problem(e):
    """The read-time message of a failure to reach a file that was opened earlier."""
    if isinstance(e, FileNotFoundError):
        return "no such file (deleted since it was opened)"
    if isinstance(e, IsADirectoryError):
        return "is a directory (replaced since it was opened)"
    if isinstance(e, PermissionError):
        return "permission denied (since it was opened)"
    detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    return f"cannot be read since it was opened ({type(e).__name__}: {detail})"


class _LocalFile:
    """A local file: the header read through ``open``, rows mapped per read."""

    def __init__(self, name, path):
        self.name, self.path = name, path

    def open(self, expect):
        """(size, open binary file); EvalInputError for the usual OS failures."""
        try:
            size = os.path.getsize(self.path)
            return size, open(self.path, "rb")
        except OSError as e:
            problem = _opened_problem(e, expect)
            if problem is None:
                raise
            raise EvalInputError(self.name, problem) from None

    def size(self, expect):
        """The size in bytes, after checking the file opens."""
        size, f = self.open(expect)
        f.close()
        return size

    def rows(self, offset, dtype, shape, end):
        """``shape`` values of ``dtype`` at byte ``offset``, mapped read-only; the file
        must still hold ``end`` bytes (what the header promised when it was opened)."""
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise EvalInputError(self.name, _read_problem(e)) from None
        with f:
            # One fstat on the descriptor about to be mapped: mapping beyond the end
            # of a file that shrank would fault (SIGBUS) on access, not raise.
            size = os.fstat(f.fileno()).st_size
            if size < end:
                raise EvalInputError(self.name, f"truncated since it was opened: {size} bytes, "
                                                f"expected {end}")
            try:
                arr = np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape)
            except ValueError as e:  # "mmap length is greater than file size": truncated just now
                raise EvalInputError(self.name, f"truncated since it was opened ({e})") from None
        # Data at an offset that is not a multiple of the item size (possible in
        # safetensors files with an unpadded header): one aligned copy of the chunk.
        return arr if arr.flags.aligned else np.array(arr)


class _FsspecFile:
    """An object read through an fsspec filesystem (which pickles): the header through
    ``fs.open``, each read one ranged ``fs.cat_file`` of exactly the rows' bytes."""

    def __init__(self, name, fs, path):
        self.name, self.fs, self.path = name, fs, path

    def _info(self, expect):
        try:
            info = self.fs.info(self.path)
        except Exception as e:  # noqa: BLE001 - backends raise their own errors (botocore, aiohttp, ...)
            raise _url_error(self.name, e, expect) from None
        if info.get("type") == "directory":
            raise EvalInputError(self.name, f"is a directory, expected {expect}")
        if info.get("size") is None:
            raise EvalInputError(self.name, "its size is unknown (the store gives no length), so "
                                            "its rows cannot be located")
        return int(info["size"])

    def open(self, expect):
        """(size, open binary file); EvalInputError naming the URL on any failure."""
        size = self._info(expect)
        try:
            return size, self.fs.open(self.path, "rb", block_size=URL_HEADER_BLOCK)
        except Exception as e:  # noqa: BLE001 - as in _info
            raise _url_error(self.name, e, expect) from None

    def size(self, expect):
        """The size in bytes (one metadata request; nothing is read)."""
        return self._info(expect)

    def rows(self, offset, dtype, shape, end):
        """``shape`` values of ``dtype`` at byte ``offset``, fetched into a fresh array."""
        stop = offset + math.prod(shape) * dtype.itemsize
        try:
            data = self.fs.cat_file(self.path, start=offset, end=stop)
        except Exception as e:  # noqa: BLE001 - as in _info
            raise EvalInputError(self.name, _read_problem(e)) from None
        if len(data) != stop - offset:
            raise EvalInputError(self.name, f"truncated since it was opened: bytes [{offset}, {stop}) "
                                            f"gave {len(data)} bytes (the header promised a file of {end})")
        arr = np.frombuffer(data, dtype).reshape(shape)
        return arr if arr.flags.aligned else arr.copy()


def _url_error(name, e, expect):
    """EvalInputError for a failure of an fsspec call on ``name`` at open time."""
    problem = _opened_problem(e, expect) if isinstance(e, OSError) else None
    if problem is None:
        problem = f"cannot be opened through fsspec ({type(e).__name__}: {e})"
    return EvalInputError(name, problem)


def _import_fsspec(url):
    """The fsspec module; EvalInputError naming ``url`` when it is not installed."""
    try:
        import fsspec
    except ImportError:
        raise EvalInputError(url, "a URL, and reading URLs needs fsspec: pip install fsspec") from None
    return fsspec


def _url_to_fs(url):
    """(fsspec filesystem, path within it) of ``url``; EvalInputError when fsspec, or the
    backend of the protocol, is missing, or the protocol is unknown."""
    fsspec = _import_fsspec(url)
    try:
        return fsspec.core.url_to_fs(url)
    except Exception as e:  # noqa: BLE001 - ImportError of a backend (s3fs, ...), ValueError, ...
        raise EvalInputError(url, f"cannot be opened through fsspec ({type(e).__name__}: {e})") from None


def _local_path(url, start):
    """The local path of a ``file://`` URL, ``start`` being the length of ``file://``.

    ``file:///abs/path`` and ``file://localhost/abs/path`` are absolute (RFC 8089);
    ``file://rel/path`` is relative to the working directory, as fsspec reads it. No
    percent-decoding (fsspec does none for local files: ``%`` may be in a file name).
    """
    path = url[start:]
    if path.startswith("localhost/"):
        path = path[len("localhost"):]
    if os.name == "nt" and re.match(r"/[A-Za-z]:", path):
        path = path[1:]  # file:///C:/dump -> C:/dump
    return path


def _store(name):
    """Where the bytes of file ``name`` (a path or URL) come from."""
    m = _URL.match(name)
    if m is None:
        return _LocalFile(name, name)
    if m.group(0)[:-3].lower() in _LOCAL_PROTOCOLS:
        return _LocalFile(name, _local_path(name, m.end()))
    return _FsspecFile(name, *_url_to_fs(name))


class NpyShard(_FileShard):
    """A ``.npy`` file whose rows are mapped per read (header checked on open)."""

    def __init__(self, path, kind):
        self.name = os.fspath(path)
        self.store = _store(self.name)
        size, f = self.store.open("a .npy file")
        try:
            with f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                offset = f.tell()
        except OSError as e:  # the file, not its bytes: an I/O error, a store refusing
            raise EvalInputError(self.name, f"cannot be read ({type(e).__name__}: {e})") from None
        except Exception as e:  # noqa: BLE001 - numpy parses untrusted bytes; it raises
            # ValueError, SyntaxError, tokenize.TokenError, OverflowError, RecursionError, ...
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EvalInputError(self.name, f"not a valid .npy file (corrupt header: {problem})") from None
        if dtype.hasobject:
            raise EvalInputError(self.name, f"holds Python objects (dtype {dtype}); expected numbers")
        if fortran and len(shape) > 1:
            raise EvalInputError(self.name, "Fortran-ordered array; save it C-ordered "
                                            "(np.save(path, np.ascontiguousarray(a)))")
        self._setup(kind, dtype, shape, offset, size)


def _safetensors_header(name, f, size):
    """(header dict without ``__metadata__``, byte where the data starts), checked."""
    if size < 8:
        raise EvalInputError(name, f"not a valid .safetensors file: {size} bytes, shorter than "
                                   f"the 8-byte header length")
    (hlen,) = struct.unpack("<Q", f.read(8))
    if hlen > size - 8:
        raise EvalInputError(name, f"not a valid .safetensors file: the header length {hlen} "
                                   f"runs beyond the file ({size} bytes)")
    if hlen > SAFETENSORS_MAX_HEADER:
        raise EvalInputError(name, f"not a valid .safetensors file: a header of {hlen} bytes "
                                   f"(more than {SAFETENSORS_MAX_HEADER})")
    try:
        header = json.loads(f.read(hlen).decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, too many digits
        raise EvalInputError(name, f"not a valid .safetensors file (corrupt header: not JSON: "
                                   f"{e})") from None
    except RecursionError:
        raise EvalInputError(name, "not a valid .safetensors file (corrupt header: JSON nested "
                                   "too deeply)") from None
    if not isinstance(header, dict):
        raise EvalInputError(name, f"not a valid .safetensors file (corrupt header: a JSON "
                                   f"{type(header).__name__}, expected an object)")
    header.pop("__metadata__", None)
    return header, 8 + hlen


def _tensor_entry(name, key, entry):
    """(dtype, shape, begin, end) of one safetensors header entry, checked for consistency."""
    def bad(problem):
        return EvalInputError(name, f"corrupt .safetensors header: tensor {key!r}: {problem}")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise bad("expected an object with dtype, shape and data_offsets")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in SAFETENSORS_DTYPES:
        raise bad(f"unknown dtype {code!r}; known: {', '.join(SAFETENSORS_DTYPES)}")
    dtype = SAFETENSORS_DTYPES[code]

    def ints(v):
        return isinstance(v, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                           for s in v)

    if not ints(shape):
        raise bad(f"shape {shape!r}; expected a list of non-negative integers")
    if not ints(offsets) or len(offsets) != 2 or offsets[1] < offsets[0]:
        raise bad(f"data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    need = math.prod(shape) * dtype.itemsize  # Python ints: no wrap-around
    if end - begin != need:
        raise bad(f"data_offsets [{begin}, {end}] hold {end - begin} bytes, but shape "
                  f"{tuple(shape)} of {code} needs {need}")
    return dtype, shape, begin, end


def _pick_tensor(name, header, kind, key):
    """The tensor name to read: ``key``, the only tensor, or the first default name present."""
    names = list(header)
    listing = ", ".join(repr(n) for n in names) or "none"
    if key is not None:
        if key not in header:
            raise EvalInputError(name, f"no tensor named {key!r}; the file holds {listing}")
        return key
    if len(names) == 1:
        return names[0]
    for k in DEFAULT_KEYS[kind]:
        if k in header:
            return k
    if not names:
        raise EvalInputError(name, "holds no tensors")
    raise EvalInputError(name, f"holds {len(names)} tensors ({listing}) and none is named "
                               f"{' or '.join(repr(k) for k in DEFAULT_KEYS[kind])}; "
                               f"choose one with {kind}_key= (--{kind.replace('_', '-')}-key)")


class SafetensorsShard(_FileShard):
    """One tensor of a ``.safetensors`` file, its rows mapped per read."""

    def __init__(self, path, kind, key=None):
        self.name = os.fspath(path)
        self.store = _store(self.name)
        size, f = self.store.open("a .safetensors file")
        with f:
            header, data_start = _safetensors_header(self.name, f, size)
        self.key = _pick_tensor(self.name, header, kind, key)
        dtype, shape, begin, end = _tensor_entry(self.name, self.key, header[self.key])
        if data_start + end > size:
            raise EvalInputError(self.name, f"truncated: tensor {self.key!r} ends at byte "
                                            f"{data_start + end}, the file has {size} bytes")
        self._setup(kind, dtype, shape, data_start + begin, size)


class RawShard(_FileShard):
    """A headerless file of rows of ``width`` values of ``dtype`` (width 0: 1-D)."""

    def __init__(self, path, kind, dtype, width):
        self.name = os.fspath(path)
        self.store = _store(self.name)
        size = self.store.size("a file")
        row = dtype.itemsize * max(width, 1)
        if size % row:
            per = f"{width} x {dtype} = {row} bytes" if width else f"{dtype}, {row} bytes"
            raise EvalInputError(self.name, f"raw file of {size} bytes is not a whole number of "
                                            f"rows ({per} per row)")
        rows = size // row
        self._setup(kind, dtype, (rows, width) if width else (rows,), 0, size)


def natural_key(s):
    """Sort key putting ``logits-2`` before ``logits-10``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s)]


def _matches(pattern):
    """Names of the files a glob pattern matches, in the form the pattern was written
    (a URL keeps its protocol and spelling up to the first wildcard's folder)."""
    store = _store(pattern)
    if isinstance(store, _LocalFile):
        if os.path.exists(store.path):
            return None
        prefix = pattern[:len(pattern) - len(store.path)]  # "file://" and the like; "" for a path
        return [prefix + f for f in glob.glob(store.path)]
    fs = store.fs
    try:
        if fs.exists(store.path):
            return None
        found = fs.glob(store.path)
    except Exception as e:  # noqa: BLE001 - backends raise their own errors
        raise _url_error(pattern, e, "files") from None
    # The filesystem answers stripped paths ("/dump/logits-2.npy" for memory://,
    # "bucket/dump/..." for s3://): put back what the pattern had before its
    # last "/" ahead of the first wildcard, where the two spellings agree.
    start = _URL.match(pattern).end()
    magic = min(i for i in (pattern.find(c, start) for c in "*?[") if i >= 0)
    cut = pattern.rfind("/", start, magic)
    if cut < 0:  # a wildcard in the first component: fsspec's own spelling
        return [fs.unstrip_protocol(f) for f in found]
    head = pattern[:cut]
    base = _url_to_fs(head)[1].rstrip("/")
    return [head + f[len(base):] if f.startswith(base + "/") else fs.unstrip_protocol(f) for f in found]


def expand_paths(value):
    """A list of paths if ``value`` is a path, URL, glob pattern or list of them, else None.

    A pattern (with ``*``, ``?`` or ``[``) that is not itself an existing file is
    expanded and sorted in natural order; one that matches nothing raises EvalInputError.
    A URL pattern expands through its fsspec filesystem's ``glob``, and the names keep
    the URL form (``memory://dump/logits-*.npy`` gives ``memory://dump/logits-2.npy``).
    """
    if isinstance(value, (str, os.PathLike)):
        items = [value]
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
        items = list(value)
    else:
        return None
    paths = []
    for item in items:
        p = os.fspath(item)
        found = _matches(p) if glob.has_magic(p) else None
        if found is None:
            paths.append(p)
        elif not found:
            raise EvalInputError(p, "no file matches this pattern")
        else:
            paths += sorted(found, key=natural_key)
    return paths


def positive_int(value, name):
    """``int(value)``; ValueError unless it is a positive integer (not a bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, found {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """How to read dump files whose format does not say it all: the dtype and row
    width of raw (headerless) files, and which tensor of a ``.safetensors`` file.

    Pass one to ``fastloss.evaluate(..., layout=Layout(...))``; ``fastloss eval``
    builds one from its ``--dtype``, ``--vocab``, ``--hidden-dim``,
    ``--targets-dtype`` and ``--*-key`` flags. Every field is keyword-only and
    optional, and is checked (and dtypes parsed) when the Layout is made. Fields a
    dump does not need are ignored (``vocab`` for ``.npy`` logits, for example).

    Parameters
    ----------
    raw_dtype : dtype or str, optional
        dtype of raw logits, hidden-state, LM-head and bias files: a numpy dtype or a
        name ("float32", "float16", "bfloat16"/"bf16", "float64", "fp32", ...).
    vocab : int, optional
        Row width (V) of raw logits files.
    hidden_dim : int, optional
        Row width (D) of raw hidden-state and LM-head files.
    targets_dtype : dtype or str, optional
        dtype of raw targets files; None reads them as int64.
    logits_key, targets_key, hidden_key, lm_head_key, bias_key : str, optional
        Tensor to read from a ``.safetensors`` file of that input. None: the file's
        only tensor, else the first present of "logits"; "targets", "labels",
        "input_ids"; "hidden", "hidden_states"; "lm_head.weight", "lm_head",
        "weight"; "lm_head.bias", "bias".

    Raises
    ------
    ValueError
        An unknown dtype name, or a ``vocab`` / ``hidden_dim`` that is not a
        positive integer.
    TypeError
        A key that is not a string.

    Examples
    --------
    >>> from fastloss.evaluation import Layout
    >>> lay = Layout(raw_dtype="bf16", vocab=32000, targets_key="input_ids")
    >>> lay.raw_dtype, lay.vocab, lay.targets_dtype
    (dtype(bfloat16), 32000, None)
    >>> Layout(vocab=0)
    Traceback (most recent call last):
    ...
    ValueError: vocab (--vocab): expected a positive integer, found 0
    """

    raw_dtype: str | np.dtype | None = None
    vocab: int | None = None
    hidden_dim: int | None = None
    targets_dtype: str | np.dtype | None = None
    logits_key: str | None = None
    targets_key: str | None = None
    hidden_key: str | None = None
    lm_head_key: str | None = None
    bias_key: str | None = None

    def __post_init__(self):
        checked = {
            "raw_dtype": None if self.raw_dtype is None else parse_dtype(self.raw_dtype, "raw_dtype (--dtype)"),
            "vocab": None if self.vocab is None else positive_int(self.vocab, "vocab (--vocab)"),
            "hidden_dim": None if self.hidden_dim is None else
            positive_int(self.hidden_dim, "hidden_dim (--hidden-dim)"),
            "targets_dtype": None if self.targets_dtype is None else
            parse_dtype(self.targets_dtype, "targets_dtype (--targets-dtype)"),
        }
        for kind in KINDS:
            name = f"{kind}_key"
            key = getattr(self, name)
            if key is not None and not isinstance(key, str):
                raise TypeError(f"{name} (--{kind.replace('_', '-')}-key): expected a tensor name "
                                f"(str) or None, found {type(key).__name__}")
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: the checked values, set once

    def key(self, kind):
        """The ``.safetensors`` tensor name given for a ``kind`` input, or None."""
        return getattr(self, f"{kind}_key")

    def raw_format(self, path, kind):
        """(dtype, width) of a raw ``kind`` file; EvalInputError when the caller gave none."""
        if kind == "targets":
            return (np.dtype(np.int64) if self.targets_dtype is None else self.targets_dtype), 0
        need = [("raw_dtype= (--dtype)", self.raw_dtype)]
        width = 0  # bias: 1-D
        if kind == "logits":
            width = self.vocab
            need.append(("vocab= (--vocab)", width))
        elif kind in ("hidden", "lm_head"):
            width = self.hidden_dim
            need.append(("hidden_dim= (--hidden-dim)", width))
        missing = [option for option, value in need if value is None]
        if missing:
            raise EvalInputError(path, f"not .npy or .safetensors, so read as raw {kind} "
                                       f"values: pass {' and '.join(missing)}")
        return self.raw_dtype, width


def open_file(path, kind, layout):
    """The shard of one file, its format chosen by the extension."""
    p = os.fspath(path)
    ext = os.path.splitext(p)[1].lower()
    if ext == ".npy":
        return NpyShard(p, kind)
    if ext == ".safetensors":
        return SafetensorsShard(p, kind, layout.key(kind))
    return RawShard(p, kind, *layout.raw_format(p, kind))


def open_source(value, kind, layout):
    """Shards of a ``kind`` input (an array, or paths/patterns); float sources must
    agree on the row width (vocabulary or hidden size), else EvalInputError."""
    paths = expand_paths(value)
    if paths is None:
        if KINDS[kind][0] == "float":
            arr = V.float_array(value, kind)
            width = _check_contents(f"<{kind} array>", arr.dtype, arr.shape, kind)
        else:
            arr = np.asarray(value)
            if arr.dtype.kind not in "iu":
                raise TypeError(f"{kind}: expected an integer dtype, found {arr.dtype}")
            width = 0
        shards = [ArrayShard(arr, f"<{kind} array>", width)]
    else:
        shards = [open_file(p, kind, layout) for p in paths]
    check_widths(shards, kind)
    return shards


def check_widths(shards, kind):
    """EvalInputError unless the shards of one ``kind`` input agree on the row width."""
    first = shards[0]
    what = "vocabulary size" if kind == "logits" else "row size"
    for s in shards[1:]:
        if s.width != first.width:
            raise EvalInputError(s.name, f"{what} {s.width} (shape {s.shape}) differs "
                                         f"from {first.width} in {first.name}")


def one_shard(value, kind, layout):
    """The shard of a small input read whole (LM head, bias): one file or array."""
    shards = open_source(value, kind, layout)
    if len(shards) != 1:
        raise EvalInputError(shards[1].name, f"expected one {kind} file, found {len(shards)}")
    return shards[0]


def read_all(shard):
    """All rows of a shard in memory (a private copy of a mapped file, which is not
    kept mapped)."""
    arr = shard.read(0, shard.rows)
    if isinstance(arr, np.memmap):
        arr = np.array(arr)
    return np.asarray(arr)


def load_whole(value, kind, layout):
    """A small input (LM head, bias) read whole into memory: (array, name)."""
    s = one_shard(value, kind, layout)
    return read_all(s), s.name


class Concat:
    """Shards read as one sequence of rows: ``read(lo, hi)`` spans shard boundaries."""

    def __init__(self, shards):
        self.shards = shards
        self.starts = np.cumsum([0] + [s.rows for s in shards]).tolist()
        self.rows = self.starts[-1]

    def read(self, lo, hi):
        parts = []
        for s, start in zip(self.shards, self.starts, strict=False):
            a, b = max(lo, start), min(hi, start + s.rows)
            if a < b:
                parts.append(s.read(a - start, b - start))
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty(0, np.int64)
        return np.concatenate(parts)
