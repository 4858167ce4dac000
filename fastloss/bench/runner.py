"""Timing, derived columns, the table and the JSON of a benchmark run.

:func:`run` times every (case, provider) pair with warm-up and medians and
returns a result dict (its keys are listed in :data:`RESULT_KEYS` and
:data:`ROW_KEYS` and explained in ``benchmarks/README.md``);
:func:`format_table` prints it (:data:`LEGEND` explains its columns),
:func:`write_json` / :func:`save` store it, and :mod:`fastloss.bench.runs`
lists and compares saved results.
The derived columns, per row, with the ceilings measured in the same run
(:func:`fastloss.bench.machine.calibrate`):

* ``gbps``: bytes moved (inputs read once, plus the gradient written once for
  fwd+bwd) / median time;
* ``bw_fraction``: ``gbps`` / the bandwidth that applies (read bandwidth for a
  forward pass, which only reads; copy bandwidth, read plus write, for fwd+bwd);
* ``floor_ms``: ``max(bytes moved / that bandwidth, exp evaluations / exp rate)``,
  the least time the case can take here, plus, for a provider returning a fresh
  gradient (``cases.FRESH_GRADIENT``), ``floor_touch_ms``: the first touch of
  its pages at the measured first-touch rate; ``floor_fraction`` = floor / median.
  The ceilings are the best of calibration rounds repeated until they settle,
  measured again at the end of the run (``calibration_end``): a ceiling that
  moved by more than 10% is flagged;
* ``ratio_to_fastest``: median / the fastest median of the case;
* ``ratio_to_fastest_peer``: median / the fastest median among the other
  providers' families (``fastloss-out`` is not a peer of ``fastloss-inplace``);
* ``speedup_vs_torch``: torch eager's median of the case / median (higher is
  better; 1.00 on the torch row).
"""

import datetime
import gc
import json
import os
import statistics
import time
import traceback

from . import cases as C
from . import machine as M
from .legend import LEGEND  # noqa: F401 - re-exported: the table's legend

SCHEMA = "fastloss-bench/3"  # 3: ceilings are the best of stable rounds; first-touch floors
#: Top-level keys of a result.
RESULT_KEYS = ("schema", "machine", "conditions", "calibration", "calibration_end", "settings",
               "warnings", "results")
#: Keys of every row of ``results``.
ROW_KEYS = (
    "case", "op", "shape", "dtype", "mode", "provider", "family", "status", "note",
    "rounds", "times_ms", "warmup_ms", "median_ms", "min_ms", "loss",
    "bytes_moved", "exp_evals", "gbps", "bandwidth_gbps", "bw_fraction",
    "floor_ms", "floor_bound", "floor_touch_ms", "floor_fraction", "ratio_to_fastest",
    "ratio_to_fastest_peer", "speedup_vs_torch",
)
DEFAULT_THREADS = int(os.environ.get("FASTLOSS_BENCH_THREADS", "2"))
DEFAULT_REPEAT = 5
DEFAULT_WARMUP = 1


def time_bench(bench, repeat=DEFAULT_REPEAT, warmup=DEFAULT_WARMUP, max_time=None, inspect=None):
    """Time ``bench.fn`` (``bench.setup`` untimed before every call).

    ``warmup`` untimed calls first, then ``repeat`` timed ones; with
    ``max_time`` (seconds) the timed calls stop once that much time has passed
    and at least ``min(3, repeat)`` were made. ``inspect`` is applied to the
    first call's result. Returns ``(times_s, warmup_s, inspected)``.
    """
    warm, times, seen = [], [], None
    start = None
    for i in range(max(0, warmup) + max(1, repeat)):
        timed = i >= warmup
        if timed and start is None:
            start = time.perf_counter()
        if bench.setup is not None:
            bench.setup()
        t0 = time.perf_counter()
        ret = bench.fn()
        dt = time.perf_counter() - t0
        if i == 0 and inspect is not None:
            seen = inspect(ret)
        del ret
        (times if timed else warm).append(dt)
        if timed and max_time is not None and len(times) >= min(3, repeat) \
                and time.perf_counter() - start > max_time:
            break
    return times, warm, seen


def floor(case, calibration):
    """``(floor_s, bandwidth_gbps, bound)`` of ``case`` under measured ceilings."""
    bw = calibration["read_gbps"] if case.bytes_written == 0 else calibration["copy_gbps"]
    mem = case.bytes_moved / (bw * 1e9)
    exp = case.exp_evals / (calibration["exp_gps"] * 1e9)
    return max(mem, exp), bw, ("memory" if mem >= exp else "exp")


def touch_floor(case, calibration, provider):
    """Seconds a call of ``provider`` pays to first-touch the fresh gradient it returns
    (page faults and zeroing, ``calibration["first_touch_gbps"]``); 0 for forward
    passes and for providers that write into a reused or the input's buffer."""
    rate = calibration.get("first_touch_gbps")
    if case.mode != "fwd+bwd" or provider not in C.FRESH_GRADIENT or not rate:
        return 0.0
    return case.bytes_written / (rate * 1e9)


def new_row(case, provider):
    """A result row of (case, provider) with every key of :data:`ROW_KEYS`; timing fields None."""
    row = dict.fromkeys(ROW_KEYS)
    row.update(case=case.name, op=case.op, shape=list(case.shape), dtype=case.dtype,
               mode=case.mode, provider=provider, family=C.family(provider), note="",
               bytes_moved=case.bytes_moved, exp_evals=case.exp_evals)
    return row


def fill_row(row, case, times_s, calibration):
    """Set the timing and derived columns of ``row`` from ``times_s`` (seconds)."""
    med = statistics.median(times_s)
    fl, bw, bound = floor(case, calibration)
    touch = touch_floor(case, calibration, row["provider"])
    row.update(status="ok", rounds=len(times_s), times_ms=[t * 1e3 for t in times_s],
               median_ms=med * 1e3, min_ms=min(times_s) * 1e3,
               gbps=case.bytes_moved / med / 1e9, bandwidth_gbps=bw,
               floor_ms=(fl + touch) * 1e3, floor_bound=bound + ("+first-touch" if touch else ""),
               floor_touch_ms=touch * 1e3, floor_fraction=(fl + touch) / med)
    row["bw_fraction"] = row["gbps"] / bw
    return row


def add_ratios(rows):
    """Fill ``ratio_to_fastest``, ``ratio_to_fastest_peer`` and
    ``speedup_vs_torch`` within each case."""
    by_case = {}
    for r in rows:
        if r["status"] == "ok":
            by_case.setdefault(r["case"], []).append(r)
    for group in by_case.values():
        best = min(r["median_ms"] for r in group)
        for r in group:
            r["ratio_to_fastest"] = r["median_ms"] / best
            peers = [p["median_ms"] for p in group if p["family"] != r["family"]]
            r["ratio_to_fastest_peer"] = r["median_ms"] / min(peers) if peers else None
        torch = [p["median_ms"] for p in group if p["provider"] == "torch"]
        for r in group:
            r["speedup_vs_torch"] = torch[0] / r["median_ms"] if torch else None
    return rows


def run(cases, providers=None, *, threads=None, repeat=DEFAULT_REPEAT, warmup=DEFAULT_WARMUP,
        max_time=None, calibration=None, calibration_bytes=M.CALIBRATION_BYTES, progress=None,
        seed=0):
    """Benchmark ``cases`` (a list of :class:`~fastloss.bench.cases.Case`).

    ``providers``: names or families to run (default: all that apply).
    ``threads``: set for numba and torch first (default: leave as is).
    ``calibration``: ceilings to use (default: measured now, see
    :func:`fastloss.bench.machine.calibrate`). ``progress(text, end)`` is told
    what runs (``end`` is "" while a pair runs, "\\n" when it finishes).
    Returns the result dict (:data:`RESULT_KEYS`).
    """
    if threads is not None:
        threads = M.set_threads(threads)
    say = progress or (lambda text, end="\n": None)
    info = M.machine_info()
    conditions = M.run_conditions()  # the date and load when the run began
    plan = [(case, p) for case in cases for p in C.providers_for(case, providers)]
    measured = calibration is None
    if measured:
        say(f"measuring bandwidth ({calibration_bytes / 2**20:.0f} MiB), exp rate and first touch ...", "")
        calibration = M.calibrate(calibration_bytes, cached=False)
        say(" " + _ceilings_text(calibration))
    rows = []
    inputs, inputs_key = None, None
    for i, (case, provider) in enumerate(plan, 1):
        row = new_row(case, provider)
        rows.append(row)
        say(f"[{i}/{len(plan)}] {case.name} {provider} ...", "")
        key = (case.op, case.shape, case.dtype)
        try:
            if key != inputs_key:
                inputs = inputs_key = None
                gc.collect()
                inputs, inputs_key = C.make_inputs(case, seed), key
            bench = C.build(case, inputs, provider)
            row["note"] = bench.note
            times, warm, loss = time_bench(bench, repeat, warmup, max_time,
                                           inspect=lambda ret, mode=case.mode: C.loss_value(ret, mode))
            del bench
            fill_row(row, case, times, calibration)
            row.update(warmup_ms=[t * 1e3 for t in warm], loss=loss)
            say(f" median {row['median_ms']:.2f} ms ({row['rounds']} rounds)")
        except C.Unavailable as e:
            row.update(status="skipped", note=str(e))
            say(f" skipped: {e}")
        except Exception as e:  # noqa: BLE001 - one failing provider must not end the run
            row.update(status="error", note=f"{type(e).__name__}: {e}")
            say(f" error: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
        gc.collect()
    del inputs
    # This process's CPU use over the whole run is its share of the load now.
    conditions["load_end"] = M.load_sample(since=conditions["load_start"]["mark"])
    add_ratios(rows)
    settings = {"threads": M.numba_threads(), "repeat": repeat, "warmup": warmup,
                "max_time_s": max_time, "seed": seed, "command": None}
    warnings = M.noise_warnings(calibration, conditions, info["cores"], settings["threads"])
    calibration_end = None
    if measured:  # again at the end: a ceiling that moved during the run makes its floors suspect
        say("measuring the ceilings again ...", "")
        calibration_end = M.calibrate(calibration_bytes, cached=False)
        say(" " + _ceilings_text(calibration_end))
        warnings += M.calibration_moves(calibration, calibration_end)
    for w in warnings:
        say(f"warning: {w}")
    return {"schema": SCHEMA, "machine": info, "conditions": conditions,
            "calibration": calibration, "calibration_end": calibration_end, "settings": settings,
            "warnings": warnings, "results": rows}


def _ceilings_text(cal):
    """The ceilings of a calibration with their spread over its rounds, in one line."""
    def spread(key):
        v = cal.get(f"{key}_spread")
        return f" ±{v:.0%}" if v is not None else ""

    touch = cal.get("first_touch_gbps")
    return (f"copy {cal['copy_gbps']:.1f} GB/s{spread('copy_gbps')}, read {cal['read_gbps']:.1f} GB/s"
            f"{spread('read_gbps')}, exp {cal['exp_gps']:.2f} G/s{spread('exp_gps')}"
            + (f", first touch {touch:.1f} GB/s{spread('first_touch_gbps')}" if touch else "")
            + (f" (best of {cal['rounds']} rounds{'' if cal.get('stable', True) else ', unsettled'})"
               if cal.get("rounds") else ""))


# --- output -----------------------------------------------------------------

#: Cases moving at most this many bytes per call run from the CPU caches when
#: timed back to back (L2 + a share of L3 on current x86 servers), so being
#: "faster than the floor" says nothing about the calibration.
CACHE_RESIDENT_BYTES = 32 << 20


def _ms(v):
    """A time in ms with at least 3 significant digits (small calls take microseconds)."""
    return f"{v:.2f}" if v >= 10 else f"{v:.3g}"


def _fmt(v, spec, missing="-"):
    return missing if v is None else format(v, spec)


def _mb(b):
    return f"{b / 1e6:,.1f} MB" if b < 1e9 else f"{b / 1e9:,.2f} GB"


_COLUMNS = (("provider", 17, "<"), ("median ms", 10, ">"), ("min ms", 9, ">"),
            ("rounds", 6, ">"), ("GB/s", 7, ">"), ("% bw", 6, ">"), ("floor ms", 9, ">"),
            ("% floor", 8, ">"), ("x fastest", 9, ">"), ("x peer", 7, ">"), ("vs torch", 8, ">"))

def _line(cells):
    return "  ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, _COLUMNS)).rstrip()


def run_date(result):
    """When ``result`` began (``conditions.date``; ``machine.date`` in schema 1)."""
    return (result.get("conditions") or {}).get("date") or result["machine"].get("date") or "?"


def _exp_line(cal):
    line = f"exp {cal['exp_gps']:.2f} G/s ({cal.get('exp_source', M.EXP_SOURCES['fastloss'])}"
    if cal.get("exp_numpy_gps") and cal.get("exp_fastloss_gps"):
        other = "numpy" if cal.get("exp_source") == M.EXP_SOURCES["fastloss"] else "fastloss"
        line += f"; {M.EXP_SOURCES[other]} {cal[f'exp_{other}_gps']:.2f} G/s"
    return line + ")"


def _load_line(conditions):
    parts = []
    for when in ("start", "end"):
        sample = conditions.get(f"load_{when}")
        if sample and sample.get("load1") is not None:
            parts.append(f"{when} {sample['load1']:.2f} (this process ~{sample.get('own_share', 0):.2f})")
    return "load average: " + ", ".join(parts) if parts else None


def _target_line(m):
    """Which vector code the kernels run (``machine.kernel_target``)."""
    t = m.get("kernel_target") or {}
    if not t:
        return "kernels: target not recorded"
    bits = t.get("vector_bits")
    width = f"{bits}-bit vectors" if bits else "vector width unknown"
    return f"kernels: numba target {t.get('cpu')} ({t.get('isa')}; float32 loops compile to {width})"


def format_table(result):
    """The result as text: a header with the machine, its ceilings and any
    noise warnings, then one block per case (columns: :data:`LEGEND`)."""
    m, cal = result["machine"], result["calibration"]
    conditions = result.get("conditions") or {}
    out = [
        f"fastloss bench  {run_date(result)}",
        f"machine: {m['cpu_model']}, {m['cores']} cores; threads: numba {m['numba_threads']}"
        + (f", torch {m['torch_threads']}" if m.get("torch_threads") is not None else ""),
        _target_line(m),
        "versions: " + ", ".join(f"{k} {m[k]}" for k in
                                 ("fastloss", "python", "numpy", "numba", "torch", "jax")
                                 if m.get(k)),
        f"measured: copy {cal['copy_gbps']:.1f} GB/s (np.copyto, read+write), "
        f"read {cal['read_gbps']:.1f} GB/s (parallel sum), " + _exp_line(cal),
    ]
    if cal.get("rounds"):
        out.append("ceilings: " + _ceilings_text(cal) + "; ± is the spread over the rounds")
    if result.get("calibration_end"):
        out.append("at the end: " + _ceilings_text(result["calibration_end"]))
    load = _load_line(conditions)
    if load:
        out.append(load)
    out += [f"WARNING: {w}" for w in result.get("warnings") or ()]
    blocks = {}
    for r in result["results"]:
        blocks.setdefault(r["case"], []).append(r)
    for rows in blocks.values():
        r0 = rows[0]
        case = C.Case(r0["op"], tuple(r0["shape"]), r0["dtype"], r0["mode"])
        fl, bw, bound = floor(case, cal)
        exp = f", {case.exp_evals / 1e6:,.1f} M exp" if case.exp_evals else ""
        out += ["", f"{case.name}: moves {_mb(case.bytes_moved)}{exp}; "
                    f"floor {_ms(fl * 1e3)} ms ({bound}-bound)",
                _line([c for c, _, _ in _COLUMNS])]
        notes = []
        for r in rows:
            if r["status"] != "ok":
                out.append(_line([r["provider"], r["status"]]))
                notes.append(f"{r['provider']}: {r['note']}")
                continue
            out.append(_line([
                r["provider"], _ms(r["median_ms"]), _ms(r["min_ms"]), str(r["rounds"]),
                f"{r['gbps']:.1f}", f"{r['bw_fraction']:.0%}", _ms(r["floor_ms"]),
                f"{r['floor_fraction']:.0%}", _fmt(r["ratio_to_fastest"], ".2f"),
                _fmt(r["ratio_to_fastest_peer"], ".2f"),
                _fmt(r.get("speedup_vs_torch"), ".2f") + ("x" if r.get("speedup_vs_torch") else "")]))
            if r["note"]:
                notes.append(f"{r['provider']}: {r['note']}")
        if any(r["status"] == "ok" and r["floor_fraction"] > 1.05 for r in rows):
            if case.bytes_moved <= CACHE_RESIDENT_BYTES:
                notes.append(f"faster than the floor: the case moves {_mb(case.bytes_moved)}, which "
                             "stays in the CPU caches between calls, so the memory floor does not bind")
            else:
                notes.append("faster than the floor: the ceilings were measured while the machine "
                             "was busy (see their spread over the rounds and at the end); rerun")
        out += [f"  note: {n}" for n in notes]
    return "\n".join(out) + "\n"


def write_json(result, path):
    """Write ``result`` as JSON to ``path`` (parent folders are created)."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return path


def default_save_dir():
    """``$FASTLOSS_BENCH_DIR``, else ``$XDG_CACHE_HOME/fastloss/bench``, else
    ``~/.cache/fastloss/bench``."""
    if os.environ.get("FASTLOSS_BENCH_DIR"):
        return os.environ["FASTLOSS_BENCH_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fastloss", "bench")


def save(result, directory=None, name=None):
    """Save ``result`` as ``<directory>/<name>.json``, by default
    ``<directory>/<UTC time>-<first case>.json``; returns the path.
    A name that is taken raises FileExistsError."""
    directory = directory or default_save_dir()
    if name is not None:
        path = os.path.join(directory, f"{name}.json")
        if os.path.exists(path):
            raise FileExistsError(f"--save: a run named {name!r} already exists ({path})")
        return write_json(result, path)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    first = result["results"][0] if result["results"] else None
    tag = f"-{first['op']}-{'x'.join(map(str, first['shape']))}" if first else ""
    path = os.path.join(directory, f"{stamp}{tag}.json")
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(directory, f"{stamp}{tag}-{n}.json")
    return write_json(result, path)
