"""The one-line notice fastloss gives before it compiles a kernel.

numba compiles each kernel the first time it meets a new combination of
argument types (dtype, layout) and keeps the machine code in its on-disk cache
(``cache=True``): later processes load it in a fraction of a second. A cold
compile takes seconds, during which a call seems to hang, so before each one
fastloss logs, once per kernel and dtype in a process::

    fastloss: compiling kernel ce_serial for float32 (once; cached in /path/__pycache__)

through the logger ``fastloss.compile`` at level WARNING, which Python prints
on stderr when the application configured no logging. Silence it with
``logging.getLogger("fastloss.compile").setLevel(logging.ERROR)``; the end of
each compile is logged at INFO with its duration.

The notice comes from numba's ``numba:compile`` event, which numba fires only
on a real compile (not when it loads a kernel from its cache), for the
kernels that have an on-disk cache (the CPU kernels; the CUDA kernels are
compiled by numba-cuda and say nothing).
"""

import logging
import threading
import time

logger = logging.getLogger("fastloss.compile")

_LOCK = threading.Lock()
_INSTALLED = False
_SEEN = set()

#: How the kernels see each logits dtype: half precision arrives as an integer view.
_VIEW_NAMES = {"int16": "float16", "uint16": "bfloat16"}


def install():
    """Register the listener with numba (once per process; each kernel module
    calls this when it is imported, so it costs nothing before numba loads)."""
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return
        from numba.core import event

        class _Notice(event.Listener):
            def on_start(self, ev):
                _started(ev.data)

            def on_end(self, ev):
                _ended(ev.data)

        event.register("numba:compile", _Notice())
        _INSTALLED = True


def _kernel(data):
    """(name, dtype label, cache dir) of a fastloss kernel with an on-disk cache, else None."""
    disp = data.get("dispatcher")
    py = getattr(disp, "py_func", None)
    if py is None or not getattr(py, "__module__", "").startswith("fastloss."):
        return None
    cache = getattr(disp, "_cache", None)
    path = getattr(cache, "_cache_path", None)
    if path is None:  # an inner function without its own cache, compiled into a kernel
        return None
    return py.__name__, _dtype_label(data.get("args", ())), path


def _dtype_label(args):
    """The data dtype of a kernel call: that of its first array argument."""
    for a in args:
        dtype = getattr(a, "dtype", None)
        if dtype is not None and getattr(a, "ndim", 0) > 0:
            name = str(dtype)
            return _VIEW_NAMES.get(name, name)
    return "its arguments"


def _started(data):
    k = _kernel(data)
    if k is None:
        return
    data["_fastloss_t0"] = time.perf_counter()
    name, dtype, path = k
    with _LOCK:
        if (name, dtype) in _SEEN:
            return
        _SEEN.add((name, dtype))
    logger.warning("fastloss: compiling kernel %s for %s (once; cached in %s)", name, dtype, path)


def _ended(data):
    t0 = data.get("_fastloss_t0")
    if t0 is not None:
        logger.info("fastloss: compiled %s in %.1f s", data["dispatcher"].py_func.__name__,
                    time.perf_counter() - t0)
