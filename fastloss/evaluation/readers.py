"""Streaming readers for evaluation dumps: in-memory arrays or ``.npy`` files.

A *source* is a list of shards concatenated along tokens. A ``.npy`` shard is
opened by reading and checking its header only (magic, dtype, shape, and that the
file holds as many bytes as the header promises); each ``read(lo, hi)`` then maps
just the byte range of rows ``[lo, hi)`` (``np.memmap`` with an offset) and the
mapping is dropped with the chunk, so the pages a chunk touched leave the process
with it and resident memory stays bounded by one chunk whatever the dump size.
"""

import os

import numpy as np

from .. import _validate as V


class EvalInputError(ValueError):
    """A bad evaluation input; ``source`` names the file (or array) and ``problem`` what is wrong."""

    def __init__(self, source, problem):
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class ArrayShard:
    """An in-memory array seen as ``rows`` rows of ``width`` values (width 0: 1-D targets)."""

    def __init__(self, arr, name, width):
        self.name = name
        self.dtype = arr.dtype
        self.shape = arr.shape
        self.rows = int(np.prod(arr.shape[:-1] if width else arr.shape, dtype=np.int64))
        self.width = width
        self._flat = arr.reshape(self.rows, width) if width else arr.reshape(self.rows)

    def read(self, lo, hi):
        return self._flat[lo:hi]


class NpyShard:
    """A ``.npy`` file whose rows are mapped per read (header checked on open)."""

    def __init__(self, path, kind):
        self.name = os.fspath(path)
        self.path = self.name
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                self.offset = f.tell()
        except FileNotFoundError:
            raise EvalInputError(self.name, "no such file") from None
        except IsADirectoryError:
            raise EvalInputError(self.name, "is a directory, expected a .npy file") from None
        except PermissionError:
            raise EvalInputError(self.name, "permission denied") from None
        except (ValueError, OSError, SyntaxError, TypeError) as e:
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EvalInputError(self.name, f"not a valid .npy file (corrupt header: {problem})") from None
        if dtype.hasobject:
            raise EvalInputError(self.name, f"holds Python objects (dtype {dtype}); expected numbers")
        if fortran and len(shape) > 1:
            raise EvalInputError(self.name, "Fortran-ordered array; save it C-ordered "
                                            "(np.save(path, np.ascontiguousarray(a)))")
        if kind == "logits":
            if dtype.kind == "f" and not dtype.isnative:
                raise EvalInputError(self.name, f"byte-swapped dtype {dtype.str}; expected native byte order")
            if dtype not in V.FLOAT_DTYPES:
                raise EvalInputError(self.name, f"logits dtype {dtype}; expected float16, "
                                                f"bfloat16, float32 or float64")
            if len(shape) == 0 or shape[-1] == 0:
                raise EvalInputError(self.name, f"logits shape {shape}; expected (..., V) with V >= 1")
            self.width = int(shape[-1])
        else:
            if dtype.kind not in "iu":
                raise EvalInputError(self.name, f"targets dtype {dtype}; expected integers")
            self.width = 0
        self.dtype = dtype
        self.shape = tuple(shape)
        count = int(np.prod(shape, dtype=np.int64))
        self.rows = count // self.width if self.width else count
        need = self.offset + count * dtype.itemsize
        if size < need:
            raise EvalInputError(
                self.name, f"truncated: the header promises shape {self.shape} of {dtype} "
                           f"({need} bytes with the header), the file has {size} bytes")

    def read(self, lo, hi):
        row_bytes = self.dtype.itemsize * max(self.width, 1)
        shape = (hi - lo, self.width) if self.width else (hi - lo,)
        if hi <= lo:
            return np.empty(shape, self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r",
                         offset=self.offset + lo * row_bytes, shape=shape)


def _paths(value):
    """A list of paths if ``value`` is a path or a list/tuple of paths, else None."""
    if isinstance(value, (str, os.PathLike)):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
        return list(value)
    return None


def open_logits(logits):
    """Shards of the logits, all with the same vocabulary size (else EvalInputError)."""
    paths = _paths(logits)
    if paths is None:
        arr = V.logits_array(logits)
        shards = [ArrayShard(arr, "<logits array>", arr.shape[-1])]
    else:
        shards = [NpyShard(p, "logits") for p in paths]
    first = shards[0]
    for s in shards[1:]:
        if s.width != first.width:
            raise EvalInputError(s.name, f"vocabulary size {s.width} (shape {s.shape}) differs "
                                         f"from {first.width} in {first.name}")
    return shards


def open_targets(targets):
    paths = _paths(targets)
    if paths is None:
        t = np.asarray(targets)
        if t.dtype.kind not in "iu":
            raise TypeError(f"targets: expected an integer dtype, found {t.dtype}")
        return [ArrayShard(t, "<targets array>", 0)]
    return [NpyShard(p, "targets") for p in paths]


class Concat:
    """Shards read as one sequence of rows: ``read(lo, hi)`` spans shard boundaries."""

    def __init__(self, shards):
        self.shards = shards
        self.starts = np.cumsum([0] + [s.rows for s in shards]).tolist()
        self.rows = self.starts[-1]

    def locate(self, i):
        """(shard, row within it) of global row ``i``."""
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        k = min(k, len(self.shards) - 1)
        return self.shards[k], i - self.starts[k]

    def read(self, lo, hi):
        parts = []
        for s, start in zip(self.shards, self.starts):
            a, b = max(lo, start), min(hi, start + s.rows)
            if a < b:
                parts.append(s.read(a - start, b - start))
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty(0, np.int64)
        return np.concatenate(parts)
