"""The machine side of a benchmark run: threads, measured ceilings, versions.

The ceilings are measured in the same process and run as the cases they
judge, because on a shared machine figures from another day are not
comparable (see PERF.md):

* copy bandwidth: ``np.copyto`` of a large float32 array into an already
  touched buffer, counted as bytes read plus bytes written;
* read bandwidth: a parallel (numba ``prange``) sum of the same array;
* exp rate: evaluations per second of ``fastloss.cpu._math.exp_f32``, the
  library's own vectorised exp, in a parallel numba loop over a large array
  whose blocks are reused from L1, so memory traffic does not bound it; and,
  as an independent reference, of numpy's float32 ``np.exp`` (its SIMD
  implementation) on the same number of threads, over blocks reused from L2.
  The floors use the faster of the two (``exp_source`` names it), so a floor
  never charges the exps more than the best implementation at hand needs;
* first-touch rate: what writing into a fresh array costs beyond writing into
  a touched one (page faults and page zeroing), in bytes per second; the floor
  of a call that returns a new gradient counts it.

A ceiling is the best the machine did, and one measurement on a shared machine
is not it: :func:`calibrate` repeats rounds of every measurement until the best
figures stop growing and reports the best, with each ceiling's spread over the
rounds; a benchmark run calibrates again at its end and flags a ceiling that
moved (:func:`calibration_moves`).

:func:`machine_info` holds only what stays the same between runs on one
machine (CPU, cores, threads, versions): pytest-benchmark compares it between
saved runs. What changes from run to run (the date, the load average, the
measured ceilings) is kept apart: :func:`run_conditions`, :func:`calibrate`.
:func:`noise_warnings` turns those into the warnings a run prints.
"""

import datetime
import json
import math
import os
import platform
import statistics
import sys
import threading
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
    n = _capped(threads)
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


@njit(parallel=True, cache=True, fastmath=_FM)
def _parallel_copy(dst, src, ntask):
    """dst[:] = src, split over ``ntask`` tasks (as the kernels write a gradient)."""
    n = src.shape[0]
    for k in prange(ntask):
        lo = n * k // ntask
        hi = n * (k + 1) // ntask
        for j in range(lo, hi):
            dst[j] = src[j]


def _ntask():
    return max(1, numba.get_num_threads())


def measure_first_touch(src, repeat=3):
    """What writing into fresh memory costs beyond writing into touched memory: the
    page faults and the kernel's zeroing of each new page, paid by every call that
    returns a new gradient (``np.empty`` of a large array maps fresh pages each time).
    Both writes are a parallel copy of ``src`` on the threads currently set.

    Returns ``(first_touch_gbps, best)``: bytes per second of that extra cost (median
    and best, in GB/s); the floor of a call writing ``b`` fresh bytes gains
    ``b / first_touch_gbps``."""
    ntask = _ntask()
    dst = np.empty_like(src)
    _parallel_copy(dst, src, ntask)  # compile, and touch dst

    def fresh():
        d = np.empty_like(src)
        _parallel_copy(d, src, ntask)

    touched, cold = [], []
    for _ in range(repeat):  # interleaved, so both see the same machine
        touched += _times(lambda: _parallel_copy(dst, src, ntask), 1)
        cold += _times(fresh, 1)
    extra = [max(c - t, 1e-9) for c, t in zip(cold, touched, strict=True)]
    return src.nbytes / statistics.median(extra) / 1e9, src.nbytes / min(extra) / 1e9


def measure_bandwidth(nbytes=CALIBRATION_BYTES, repeat=5, src=None):
    """Measured memory bandwidth in GB/s (1e9 bytes/s), medians of ``repeat``.

    Returns ``{"copy_gbps", "read_gbps", "bytes"}`` (plus ``*_best``, from the
    fastest call): copy counts the bytes read plus the bytes written by
    ``np.copyto`` into an already-touched buffer; read is a parallel sum with
    the threads currently set. ``src``: the float32 array to use (default: one
    of ``nbytes`` made here).
    """
    if src is None:
        src = _calibration_array(nbytes)
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


def _calibration_array(nbytes):
    # Distinct values on every page, as real data has (a host may deduplicate
    # pages that hold one repeated value).
    return np.arange(max(1024, int(nbytes) // 4), dtype=np.float32)


def measure_exp_rate(elements=EXP_ELEMENTS, passes=EXP_PASSES, repeat=5):
    """Measured evaluations per second of ``fastloss.cpu._math.exp_f32`` in a
    parallel numba loop (the threads currently set), in G evaluations/s:
    ``(median, best)``."""
    a = np.random.default_rng(0).uniform(-20.0, 0.0, int(elements)).astype(np.float32)
    ntask = _ntask()
    _parallel_exp(a, ntask, passes, _EXP_BLOCK)  # compile and warm
    t = _times(lambda: _parallel_exp(a, ntask, passes, _EXP_BLOCK), repeat)
    return a.size * passes / statistics.median(t) / 1e9, a.size * passes / min(t) / 1e9


#: np.exp block: 32768 float32 in and out (256 KiB) stay in L2 between passes.
_NUMPY_EXP_BLOCK = 32768


def _numpy_exp_pass(a, out, passes, block):
    for b0 in range(0, a.shape[0], block):
        src, dst = a[b0:b0 + block], out[b0:b0 + block]
        for _ in range(passes):
            np.exp(src, out=dst)


def measure_numpy_exp_rate(elements=EXP_ELEMENTS, passes=EXP_PASSES, repeat=5):
    """Measured evaluations per second of numpy's float32 ``np.exp``, one
    Python thread per numba thread set (ufuncs release the GIL), each on its
    own slice, in G evaluations/s: ``(median, best)``."""
    a = np.random.default_rng(0).uniform(-20.0, 0.0, int(elements)).astype(np.float32)
    out = np.empty_like(a)
    ntask = _ntask()
    parts = [(a[a.size * k // ntask:a.size * (k + 1) // ntask],
              out[a.size * k // ntask:a.size * (k + 1) // ntask]) for k in range(ntask)]

    def once():
        workers = [threading.Thread(target=_numpy_exp_pass, args=(x, y, passes, _NUMPY_EXP_BLOCK))
                   for x, y in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    once()  # warm
    t = _times(once, repeat)
    return a.size * passes / statistics.median(t) / 1e9, a.size * passes / min(t) / 1e9


#: How the table names each exp-rate source.
EXP_SOURCES = {"fastloss": "fastloss exp_f32", "numpy": "numpy np.exp"}

_CACHE = {}


#: Calibration rounds: at least ``CALIBRATION_MIN_ROUNDS``; then stop once no ceiling's best
#: has grown by more than ``CALIBRATION_TOL`` over the last two rounds, or after
#: ``CALIBRATION_MAX_ROUNDS``.
CALIBRATION_MIN_ROUNDS = 3
CALIBRATION_MAX_ROUNDS = 8
CALIBRATION_TOL = 0.03
#: The ceilings a calibration reports (the higher the better), and their labels.
CEILINGS = {"copy_gbps": "copy bandwidth", "read_gbps": "read bandwidth", "exp_gps": "exp rate",
            "first_touch_gbps": "first-touch rate"}


def _round(src, repeat):
    """One calibration round: every ceiling once (medians of ``repeat`` calls)."""
    out = measure_bandwidth(src=src, repeat=repeat)
    out["exp_fastloss_gps"], _ = measure_exp_rate(repeat=repeat)
    out["exp_numpy_gps"], _ = measure_numpy_exp_rate(repeat=repeat)
    out["exp_gps"] = max(out["exp_fastloss_gps"], out["exp_numpy_gps"])
    out["first_touch_gbps"], _ = measure_first_touch(src, repeat)
    return out


def calibrate(nbytes=CALIBRATION_BYTES, repeat=3, *, cached=True):
    """The machine's ceilings for the threads currently set (see module doc).

    A ceiling is the best the machine did: rounds of every measurement (each the
    median of ``repeat`` calls) are repeated until the best of each ceiling has
    stopped growing (by more than ``CALIBRATION_TOL`` over the last two rounds; at
    least ``CALIBRATION_MIN_ROUNDS``, at most ``CALIBRATION_MAX_ROUNDS``), and each
    ceiling is the best round's figure.

    Returns ``{"copy_gbps", "read_gbps", "exp_gps", "first_touch_gbps", "bytes",
    "threads", "rounds", "stable"}`` plus, per ceiling, ``*_spread``: (best - worst) /
    best over the rounds (a large spread: the machine was busy while it was
    measured) and ``*_rounds``, every round's figure. ``exp_gps`` is the faster of
    ``exp_fastloss_gps`` (``exp_f32``) and ``exp_numpy_gps`` (``np.exp``);
    ``exp_source`` names it. ``stable`` is False when the rounds ran out first.
    Results are kept per (threads, nbytes) for the life of the process unless
    ``cached=False``.
    """
    key = (numba.get_num_threads(), int(nbytes))
    if cached and key in _CACHE:
        return dict(_CACHE[key])
    src = _calibration_array(nbytes)
    rounds, stable = [], False
    while len(rounds) < CALIBRATION_MAX_ROUNDS:
        rounds.append(_round(src, repeat))
        if len(rounds) >= CALIBRATION_MIN_ROUNDS:
            stable = all(max(r[c] for r in rounds) <= max(r[c] for r in rounds[:-2]) * (1 + CALIBRATION_TOL)
                         for c in CEILINGS)
            if stable:
                break
    out = {"bytes": src.nbytes, "threads": key[0], "rounds": len(rounds), "stable": stable}
    for c in (*CEILINGS, "exp_fastloss_gps", "exp_numpy_gps"):
        values = [r[c] for r in rounds]
        out[c] = max(values)
        out[f"{c}_rounds"] = values
        out[f"{c}_spread"] = (max(values) - min(values)) / max(values)
    src_name = "fastloss" if out["exp_fastloss_gps"] >= out["exp_numpy_gps"] else "numpy"
    out["exp_source"] = EXP_SOURCES[src_name]
    _CACHE[key] = out
    return dict(out)


def calibration_moves(start, end):
    """Warning lines for each ceiling that moved by more than ``SPREAD_LIMIT`` between
    two calibrations (the start and the end of a run)."""
    out = []
    for c, label in CEILINGS.items():
        a, b = start.get(c), end.get(c)
        if a and b and abs(b - a) > SPREAD_LIMIT * max(a, b):
            out.append(f"calibration moved: {label} {a:.3g} at the start of the run, {b:.3g} at "
                       f"the end ({b / a - 1:+.0%}, more than {SPREAD_LIMIT:.0%}); the floors are "
                       f"uncertain, rerun")
    return out


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


def machine_info(threads=None):
    """CPU, cores, threads and library versions (None for what is not installed).

    Nothing in it changes between two runs on one machine with the same
    installation (no date, no measured figure): see :func:`run_conditions`.
    ``threads``: report the threads a run will set (as :func:`set_threads`
    caps them) instead of those in force now.
    Importing torch here is deliberate (it is only called by benchmark runs).
    """
    info = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "numba_threads": numba.get_num_threads() if threads is None else _capped(threads),
        "numba_threading_layer": threading_layer(),
        "kernel_target": kernel_target(),
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
        info["torch_threads"] = torch.get_num_threads() if threads is None else _capped(threads)
    except ImportError:
        info["torch_threads"] = None
    return info


def kernel_target():
    """What the CPU kernels are compiled for: numba's target CPU (``NUMBA_CPU_NAME``,
    else the host's), the vector instruction sets it enables, and the widest
    vector register a vectorisable float32 loop actually compiles to here
    (read from the assembly of a small probe with the kernels' fast-math
    flags: LLVM may keep 256-bit vectors on an AVX-512 CPU).

    Returns a dict: ``cpu``, ``isa`` (e.g. "AVX-512", "AVX2", "SSE"),
    ``vector_bits`` (512, 256, 128 or None when it could not be read)."""
    import llvmlite.binding as llb
    from numba import njit

    from .. import config

    name = numba.config.CPU_NAME or llb.get_host_cpu_name()
    if numba.config.CPU_NAME:  # features follow the named CPU, not the host
        features = str(numba.config.CPU_FEATURES or "")
        has = {f: f"+{f}" in features for f in ("avx512f", "avx2")}
        if not features:  # numba derives them from the name: read them from the probe below
            has = None
    else:
        host = llb.get_host_cpu_features()
        has = {f: bool(host.get(f)) for f in ("avx512f", "avx2")}

    @njit(fastmath=config.FASTMATH)
    def _probe(a, b):
        for i in range(a.shape[0]):
            b[i] = a[i] * np.float32(1.5) + b[i]

    a = np.ones(64, np.float32)
    _probe(a, a.copy())
    bits = None
    try:
        asm = "".join(_probe.inspect_asm().values())
        bits = 512 if "%zmm" in asm else 256 if "%ymm" in asm else 128 if "%xmm" in asm else None
    except Exception:  # inspection unavailable (e.g. another numba version): unknown
        pass
    if has is None:
        has = {"avx512f": bits == 512, "avx2": bits in (256, 512)}
    isa = "AVX-512" if has["avx512f"] else "AVX2" if has["avx2"] else "SSE"
    return {"cpu": name, "isa": isa, "vector_bits": bits}


def threading_layer():
    """numba's threading layer, started if no parallel loop has run yet (it is
    chosen at the first one), so that every call reports the same."""
    try:
        return numba.threading_layer()
    except ValueError:
        pass
    _parallel_sum(np.zeros(64, np.float32), 1)
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def _capped(threads):
    return max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))


#: Keys of py-cpuinfo's record that change from run to run (the current clock).
_VOLATILE_CPU_KEYS = ("hz_actual", "hz_actual_friendly")


def benchmark_machine_info(machine_info, threads):
    """Make pytest-benchmark's ``machine_info`` stable between runs, in place.

    Drops the current clock from py-cpuinfo's ``cpu`` record and adds
    ``machine_info["fastloss"]`` = :func:`machine_info` for ``threads``, so that
    ``--benchmark-compare`` sees the same dict for two runs on one machine.
    The run's date, load and ceilings go to each benchmark's ``extra_info``.
    """
    cpu = machine_info.get("cpu")
    if isinstance(cpu, dict):
        for key in _VOLATILE_CPU_KEYS:
            cpu.pop(key, None)
    machine_info["fastloss"] = {"machine": machine_info_for_json(threads)}
    return machine_info


def machine_info_for_json(threads=None):
    """:func:`machine_info` as JSON would give it back (tuples as lists)."""
    return json.loads(json.dumps(machine_info(threads)))


# --- what changes between runs: date, load, noise ----------------------------

def _process_age():
    """Seconds since this process started (Linux), else None."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def load_sample(since=None):
    """The 1-minute load average and this process's own share of it.

    ``since``: ``(wall, cpu)`` from an earlier sample (its ``"mark"``); by
    default the start of the process. Returns ``{"load1", "own", "own_share",
    "mark"}``: ``own`` is this process's CPU seconds per wall second since
    then (all its threads); ``own_share`` what that adds to the load average,
    which is an exponential average over 60 s: ``own * (1 - exp(-t / 60))``
    after ``t`` seconds. ``load1`` is None where ``os.getloadavg`` is not
    available.
    """
    wall, cpu = time.time(), time.process_time()
    if since is None:
        window = _process_age() or 0.0
        own = cpu / window if window else 0.0
    else:
        window = max(wall - since[0], 1e-3)
        own = (cpu - since[1]) / window
    try:
        load1 = os.getloadavg()[0]
    except (OSError, AttributeError):
        load1 = None
    share = own * (1.0 - math.exp(-window / 60.0))
    return {"load1": load1, "own": round(own, 3), "own_share": round(share, 3), "mark": [wall, cpu]}


def run_conditions():
    """The date (UTC, ISO 8601) and a :func:`load_sample` at the start of a run."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_start": load_sample(), "load_end": None}


#: A ceiling whose calibration rounds spread by more than this, or that moved by more
#: than this between the start and the end of a run, is flagged.
SPREAD_LIMIT = 0.10
#: Tolerance on the load of other processes before the machine counts as busy
#: (the 1-minute load average is a decayed average, not an exact count).
LOAD_MARGIN = 0.5


def other_load(sample):
    """Load of other processes: ``load1 - own_share`` (0 at least); None if unknown."""
    if not sample or sample.get("load1") is None:
        return None
    return max(0.0, sample["load1"] - sample.get("own_share", 0.0))


def noise_warnings(calibration, conditions, cores, threads):
    """Warning lines (possibly none) saying why this run's figures may be noisy.

    * busy: the load of other processes (1-minute load average minus this
      process's share of it, :func:`load_sample`, at the start or at the end
      of the run) is above
      the cores the benchmark leaves free, ``cores - threads``, by more than
      :data:`LOAD_MARGIN`;
    * inconsistent ceilings: read bandwidth below copy bandwidth (a copy
      reads and writes the same bytes, so reading alone cannot be slower
      unless something else ran), a ceiling whose calibration rounds spread by
      more than :data:`SPREAD_LIMIT`, or rounds that ran out before the best
      figures settled. (:func:`calibration_moves` compares two calibrations.)
    """
    out = []
    free = max(0, (cores or 1) - threads)
    for when in ("start", "end"):
        sample = (conditions or {}).get(f"load_{when}")
        others = other_load(sample)
        if others is not None and others > free + LOAD_MARGIN:
            out.append(f"busy machine: load average {sample['load1']:.2f} at the {when} of the run, "
                       f"{others:.2f} of it from other processes, above the {free} core(s) "
                       f"this run leaves free (+{LOAD_MARGIN}); timings are noisy, rerun")
    if not calibration:
        return out
    if calibration.get("read_gbps") and calibration.get("copy_gbps") \
            and calibration["read_gbps"] < calibration["copy_gbps"]:
        out.append(f"inconsistent ceilings: read bandwidth {calibration['read_gbps']:.1f} GB/s "
                   f"below copy bandwidth {calibration['copy_gbps']:.1f} GB/s; rerun")
    for key, label in CEILINGS.items():
        spread = calibration.get(key + "_spread")
        if spread is not None and spread > SPREAD_LIMIT:
            out.append(f"noisy ceilings: {label} varied by {spread:.0%} over "
                       f"{calibration.get('rounds', '?')} calibration rounds (> {SPREAD_LIMIT:.0%}); "
                       f"the best round is used, the floors are uncertain")
    if calibration.get("stable") is False:
        out.append(f"unsettled ceilings: the best figures still grew after "
                   f"{calibration.get('rounds')} calibration rounds; the floors may be low")
    return out


def numba_threads():
    """The numba threads currently in force."""
    return numba.get_num_threads()
