"""The machine side of a benchmark run: threads, measured ceilings, versions.

The ceilings are measured in the same process and run as the cases they
judge, because on a shared machine figures from another day are not
comparable (see PERF.md):

* copy bandwidth: ``np.copyto`` of a large float32 array into an already
  touched buffer, counted as bytes read plus bytes written;
* read bandwidth: a parallel (numba ``prange``) sum of the same array;
* exp rate: evaluations per second of ``fastloss.cpu._math.exp_f32``, the
  library's own vectorised exp, in a parallel numba loop over a large array
  whose blocks are reused from L1, so memory traffic does not bound it.
"""

import datetime
import os
import platform
import statistics
import sys
import time

import numba
import numpy as np
from numba import njit, prange

from .. import config
from .._version import __version__
from ..cpu._math import exp_f32

_FM = config.FASTMATH

#: Default size of the bandwidth arrays: 1 GiB of float32, or
#: ``$FASTLOSS_BENCH_CALIBRATION_MIB`` MiB (tests use a small one).
CALIBRATION_BYTES = int(os.environ.get("FASTLOSS_BENCH_CALIBRATION_MIB", "1024")) << 20
#: Elements of the exp-rate array, and how many exp passes each L1-sized block gets.
EXP_ELEMENTS = 1 << 24
EXP_PASSES = 8
_EXP_BLOCK = 2048


def set_threads(threads):
    """Give numba and (if installed) torch the same number of threads.

    numba is capped at ``numba.config.NUMBA_NUM_THREADS`` (the pool size fixed
    at start-up). Returns the numba thread count in force.
    """
    n = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.set_num_threads(n)
    return n


def _times(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


@njit(fastmath=_FM)
def _sum_f32(a):
    """sum(a) accumulated in float32 (vectorised under ``reassoc``)."""
    s = np.float32(0.0)
    for j in range(a.shape[0]):
        s += a[j]
    return s


@njit(fastmath=_FM)
def _sum_exp_f32(a, shift):
    """sum_j exp_f32(a[j] - shift), accumulated in float32."""
    s = np.float32(0.0)
    for j in range(a.shape[0]):
        s += exp_f32(a[j] - shift)
    return s


@njit(parallel=True, cache=True, fastmath=_FM)
def _parallel_sum(a, ntask):
    """sum(a) in float32 per task (vectorised), merged in float64 serially."""
    n = a.shape[0]
    part = np.zeros(ntask, np.float64)
    for k in prange(ntask):
        lo = n * k // ntask
        hi = n * (k + 1) // ntask
        part[k] = _sum_f32(a[lo:hi])
    return part.sum()


@njit(parallel=True, cache=True, fastmath=_FM)
def _parallel_exp(a, ntask, passes, block):
    """sum over passes p and elements j of exp_f32(a[j] - p/8), block by block:
    ``passes * a.size`` exp evaluations, each block re-read from L1."""
    n = a.shape[0]
    part = np.zeros(ntask, np.float64)
    for k in prange(ntask):
        lo = n * k // ntask
        hi = n * (k + 1) // ntask
        acc = np.float64(0.0)
        for b0 in range(lo, hi, block):
            blk = a[b0:min(b0 + block, hi)]
            for p in range(passes):
                acc += _sum_exp_f32(blk, np.float32(p) * np.float32(0.125))
        part[k] = acc
    return part.sum()


def _ntask():
    return max(1, numba.get_num_threads())


def measure_bandwidth(nbytes=CALIBRATION_BYTES, repeat=5):
    """Measured memory bandwidth in GB/s (1e9 bytes/s), medians of ``repeat``.

    Returns ``{"copy_gbps", "read_gbps", "bytes"}`` (plus ``*_best``, from the
    fastest call): copy counts the bytes read plus the bytes written by
    ``np.copyto`` into an already-touched buffer; read is a parallel sum with
    the threads currently set.
    """
    n = max(1024, int(nbytes) // 4)
    # Distinct values on every page, as real data has (a host may deduplicate
    # pages that hold one repeated value).
    src = np.arange(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch: the page faults of a fresh buffer are not bandwidth
    copy_s = _times(lambda: np.copyto(dst, src), repeat)
    dst = None  # free it before the read measurement
    ntask = _ntask()
    _parallel_sum(src, ntask)  # compile and warm
    read_s = _times(lambda: _parallel_sum(src, ntask), repeat)
    b = src.nbytes
    return {"copy_gbps": 2 * b / statistics.median(copy_s) / 1e9,
            "read_gbps": b / statistics.median(read_s) / 1e9,
            "copy_gbps_best": 2 * b / min(copy_s) / 1e9, "read_gbps_best": b / min(read_s) / 1e9,
            "bytes": b}


def measure_exp_rate(elements=EXP_ELEMENTS, passes=EXP_PASSES, repeat=5):
    """Measured evaluations per second of ``fastloss.cpu._math.exp_f32`` in a
    parallel numba loop (the threads currently set), in G evaluations/s:
    ``(median, best)``."""
    a = np.random.default_rng(0).uniform(-20.0, 0.0, int(elements)).astype(np.float32)
    ntask = _ntask()
    _parallel_exp(a, ntask, passes, _EXP_BLOCK)  # compile and warm
    t = _times(lambda: _parallel_exp(a, ntask, passes, _EXP_BLOCK), repeat)
    return a.size * passes / statistics.median(t) / 1e9, a.size * passes / min(t) / 1e9


_CACHE = {}


def calibrate(nbytes=CALIBRATION_BYTES, repeat=5, *, cached=True):
    """Bandwidths and exp rate for the threads currently set (see module doc).

    Returns ``{"copy_gbps", "read_gbps", "exp_gps", "bytes", "threads"}`` (medians,
    used for the floors) plus ``copy_gbps_best``, ``read_gbps_best`` and
    ``exp_gps_best`` (fastest call; a large gap to the median means the machine
    was busy while it was measured).
    Results are kept per (threads, nbytes) for the life of the process unless
    ``cached=False``.
    """
    key = (numba.get_num_threads(), int(nbytes))
    if cached and key in _CACHE:
        return dict(_CACHE[key])
    out = measure_bandwidth(nbytes, repeat)
    out["exp_gps"], out["exp_gps_best"] = measure_exp_rate(repeat=repeat)
    out["threads"] = key[0]
    _CACHE[key] = out
    return dict(out)


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo on Linux), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module):
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return getattr(mod, "__version__", "unknown")


def machine_info():
    """CPU, cores, threads and library versions (None for what is not installed).

    Importing torch here is deliberate (it is only called by benchmark runs).
    """
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = None
    info = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": layer,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "numba": numba.__version__,
        "fastloss": __version__,
    }
    for name in ("torch", "scipy", "ml_dtypes", "jax"):
        info[name] = _version(name)
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch_threads"] = None
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return info


def numba_threads():
    """The numba threads currently in force."""
    return numba.get_num_threads()
