"""Small I/O helpers shared by the evaluation reports, the command line and the demo.

* :func:`json_safe`: a report's values as JSON-ready Python objects;
* :func:`write_json_atomic`: write such a dict to a file so that a reader never
  sees half of it; :func:`write_report_json`: the same for a command's ``--json``,
  with the error worded for its user.
"""

import math
import os


def json_safe(v):
    """JSON-safe value: NaN/inf floats become None, numpy scalars Python numbers,
    tuples lists (recursively through dicts and lists).

    Examples
    --------
    >>> import numpy as np
    >>> json_safe({"a": np.float32(0.5), "b": [float("nan"), np.int64(3)], "c": (1, "x")})
    {'a': 0.5, 'b': [None, 3], 'c': [1, 'x']}
    """
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json_atomic(obj, path):
    """Write ``obj`` as JSON to ``path`` via a temporary file in the same folder and os.replace.

    ``obj`` must be JSON-ready (see :func:`json_safe`): NaN or inf raise ValueError and
    the file is left as it was. The temporary file is removed on any failure.

    Examples
    --------
    >>> import json, os, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = os.path.join(d, "report.json")
    ...     write_json_atomic({"tokens": 2, "ece": None}, path)
    ...     json.load(open(path)), os.listdir(d)
    ({'tokens': 2, 'ece': None}, ['report.json'])
    """
    import json
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastloss-eval-", suffix=".json", dir=folder)
    try:
        umask = os.umask(0)  # read it (no other way), then restore it at once
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # what a plain open(path, "w") would give
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_output_path(path, flag):
    """ValueError unless ``path`` (the value of option ``flag``) could be written: not
    empty, not a directory, and in an existing, writable folder. Checked before any work."""
    if not path:
        raise ValueError(f"{flag}: expected a file path, found an empty string")
    if os.path.isdir(path):
        raise ValueError(f"{path}: cannot write ({flag}): is a directory, expected a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{path}: cannot write ({flag}): no such folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write ({flag}): permission denied in {folder}")


def write_report_json(obj, path):
    """:func:`write_json_atomic`, an ``OSError`` worded ``"<path>: cannot write: <why>"``
    (what the commands' ``--json`` reports)."""
    try:
        write_json_atomic(obj, path)
    except OSError as e:
        raise OSError(f"{path}: cannot write: {e.strerror or e}") from None
