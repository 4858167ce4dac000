"""A PyTorch training step of an LM head and its loss, timed per provider.

The step: ``hidden`` (N, D) requires grad, the head ``W`` (V, D) is a
parameter, ``logits = hidden @ W.T`` (N, V), the mean cross-entropy against
class-index targets (N,), ``loss.backward()``: the gradients of ``hidden``
and ``W``. Every provider computes that step (the same loss, checked by the
tests) on the same inputs, with fresh leaf tensors sharing the inputs'
memory every call (so gradients are assigned, never accumulated):

=================  ==========================================================
torch              eager ``F.linear`` + ``F.cross_entropy``
torch-compile      ``torch.compile`` of the same loss function (skipped, with
                   the reason, when it does not compile here; the first call,
                   which compiles, is untimed)
fastloss           ``F.linear`` + ``fastloss.torch.cross_entropy``
fastloss-inplace   the same with ``inplace_backward=True`` (the gradient
                   overwrites the logits)
torch-lce          ``F.linear_cross_entropy`` (skipped where torch lacks it)
fastloss-lce       ``fastloss.torch.linear_cross_entropy`` (chunked, never
                   holds the (N, V) logits)
head-only          the baseline: the same matrix products without a loss,
                   ``F.linear(hidden, W).backward(G)`` with a fixed upstream
                   gradient ``G`` (N, V) made once with the inputs
=================  ==========================================================

The loss's share of a provider's step is ``(step - head_only) / step``
(medians). For the fused providers (``*-lce``), which do the products
differently (chunk by chunk), it is the time beyond the unfused products.

:func:`run` times every provider interleaved, round by round (one call of
each provider per round, in table order), so that all of them see the same
load on a shared machine; then, unless ``memory=False``, measures each
provider's peak memory in a fresh child process (:func:`measure_memory`), and
times the adapter's overhead at 64 x 1000 (:func:`adapter_overhead`).
:func:`format_table` prints the result; ``fastloss bench --op torch-step`` is
the command.
"""

import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from . import cases as C
from . import machine as M

__all__ = [
    "PROVIDERS", "SHAPES", "DEFAULT_SHAPE", "DEFAULT_HIDDEN", "DTYPES", "SCHEMA", "StepCase",
    "make_inputs", "providers_for", "build", "time_interleaved", "measure_memory",
    "adapter_overhead", "new_row", "add_shares", "loss_value", "run", "format_table",
]

#: Every provider, in table order; ``head-only`` is the baseline of the loss shares.
PROVIDERS = ("torch", "torch-compile", "fastloss", "fastloss-inplace", "torch-lce", "fastloss-lce",
             "head-only")
#: The shapes (N, V) of the issue; D is :data:`DEFAULT_HIDDEN` unless given.
SHAPES = ((4096, 32000), (2048, 128256))
DEFAULT_SHAPE = SHAPES[0]
#: Hidden size: small enough that a step at the issue's shapes takes seconds on
#: 2 cores, large enough that the products are a realistic share of it.
DEFAULT_HIDDEN = 256
DTYPES = ("float32", "bfloat16")
SCHEMA = "fastloss-bench/torch-step-1"
DEFAULT_REPEAT = 5
DEFAULT_WARMUP = 1
#: Seconds of (untimed) sleep after every timed or warm-up call. The worker
#: threads of a BLAS or OpenMP pool spin for a while after their last task
#: (OpenBLAS: about 0.1 s): the call right after fastloss-lce (scipy's OpenBLAS)
#: ran up to 2x slower on 2 cores (1024 x 8000 x 256 bfloat16 head-only: 17.7 ->
#: 34.8 ms; 18.6 ms after 0.25 s of sleep), so without a pause the provider that
#: follows another in a round pays for its pools.
SETTLE_S = 0.25
#: Timed calls per variant of the adapter-overhead section.
OVERHEAD_REPEAT = 1001
OVERHEAD_SHAPE = (64, 1000)
#: ... stopping once this many seconds have passed (a busy machine makes small calls slow).
OVERHEAD_MAX_TIME = 10.0
#: The adapter's overhead target per call (microseconds).
OVERHEAD_TARGET_US = 50.0

ROW_KEYS = ("case", "op", "shape", "dtype", "mode", "provider", "family", "status", "note", "rounds",
            "times_ms", "warmup_ms", "median_ms", "min_ms", "loss", "loss_ms", "loss_ms_paired", "loss_share",
            "share_vs_torch", "speedup_vs_torch", "peak_bytes", "memory_method", "memory_note")


@dataclass(frozen=True)
class StepCase:
    """One training-step case: ``n`` tokens, ``v`` classes, hidden size ``d``, dtype."""

    n: int
    v: int
    d: int = DEFAULT_HIDDEN
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("n", "v", "d"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, found {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, found {self.dtype!r}")

    @property
    def name(self):
        """e.g. ``torch-step-4096x32000-d256-float32``."""
        return f"torch-step-{self.n}x{self.v}-d{self.d}-{self.dtype}"

    @property
    def itemsize(self):
        return 4 if self.dtype == "float32" else 2

    @property
    def logits_bytes(self):
        return self.n * self.v * self.itemsize

    @property
    def grad_bytes(self):
        """The step's outputs: the gradients of hidden and W."""
        return (self.n + self.v) * self.d * self.itemsize

    @property
    def flops(self):
        """The three (N, D) x (D, V)-sized products: 6 N D V."""
        return 6 * self.n * self.d * self.v


def make_inputs(case, seed=0):
    """``{"hidden", "weight", "targets", "upstream"}`` as torch tensors (fixed seed).

    hidden (N, D) standard normals, weight (V, D) normals / sqrt(D), targets
    (N,) int64 in [0, V) (those of ``fastloss bench --op lce``), upstream (N, V)
    normals / N: the fixed gradient the head-only baseline back-propagates.
    """
    import torch
    arrays = C.make_inputs(C.Case("lce", (case.n, case.d, case.v), case.dtype), seed)
    out = {"hidden": C._to_torch(torch, arrays["hidden"]), "weight": C._to_torch(torch, arrays["weight"]),
           "targets": torch.from_numpy(arrays["targets"])}
    g = torch.Generator().manual_seed(seed + 1)
    up = torch.randn((case.n, case.v), generator=g, dtype=torch.float32)
    up.mul_(1.0 / case.n)
    out["upstream"] = up if case.dtype == "float32" else up.to(torch.bfloat16)
    return out


def providers_for(names=None):
    """Providers to run, in table order: all by default; ``names`` (providers
    or families: ``fastloss`` selects every fastloss variant) filters them.
    ``head-only`` is always added (the loss shares need it). Unknown names
    raise ValueError."""
    if names is None:
        return list(PROVIDERS)
    names = list(names)
    for nm in names:
        if nm not in PROVIDERS:
            raise ValueError(f"providers: unknown provider {nm!r} for --op torch-step; expected some of "
                             f"{', '.join(PROVIDERS)}")
    return [p for p in PROVIDERS if p in names or C.family(p) in names or p == "head-only"]


def build(case, inputs, provider):
    """The :class:`~fastloss.bench.cases.Bench` of ``provider``: ``fn()`` runs
    one step and returns ``(loss, grad_hidden, grad_W)`` (loss None for
    head-only). Raises :class:`~fastloss.bench.cases.Unavailable`."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider: unknown provider {provider!r}")
    import torch
    F = torch.nn.functional
    h, w, t = inputs["hidden"], inputs["weight"], inputs["targets"]

    if provider == "head-only":
        up = inputs["upstream"]

        def head_only():
            x = h.detach().requires_grad_()
            W = w.detach().requires_grad_()
            F.linear(x, W).backward(up)
            return None, x.grad, W.grad

        return C.Bench(head_only, note="products only: logits.backward(fixed upstream grad), no loss")

    note = ""
    if provider in ("torch", "torch-compile"):
        def loss_of(x, W):
            return F.cross_entropy(F.linear(x, W), t)
    elif provider in ("fastloss", "fastloss-inplace"):
        import fastloss.torch as flt
        inplace = provider == "fastloss-inplace"

        def loss_of(x, W):
            return flt.cross_entropy(F.linear(x, W), t, inplace_backward=inplace)
    elif provider == "torch-lce":
        if not hasattr(F, "linear_cross_entropy"):
            raise C.Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")

        def loss_of(x, W):
            return F.linear_cross_entropy(x, W, t)
    else:  # fastloss-lce
        import fastloss.torch as flt

        def loss_of(x, W):
            return flt.linear_cross_entropy(x, W, t)

    if provider == "torch-compile":
        # One compiled function at a time (as fastloss bench's torch-compile).
        torch._dynamo.reset()
        loss_of = torch.compile(loss_of, dynamic=False)

    def step():
        # detach() of a from_numpy tensor shares its memory: no copy.
        x = h.detach().requires_grad_()
        W = w.detach().requires_grad_()
        loss = loss_of(x, W)
        loss.backward()
        return loss.detach(), x.grad, W.grad

    if provider == "torch-compile":
        t0 = time.perf_counter()
        try:
            step()  # compiles; any failure (no C++ compiler, unsupported op) skips the provider
        except Exception as e:  # noqa: BLE001 - a compile failure means "not available here"
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise C.Unavailable(f"torch.compile failed: {type(e).__name__}: {first}") from None
        note = f"compiled in {time.perf_counter() - t0:.1f} s (untimed)"
    return C.Bench(step, note=note)


def loss_value(ret):
    """The loss of a step's return as a Python float (None for head-only)."""
    loss = ret[0]
    return None if loss is None else float(loss.float())


# --- timing -----------------------------------------------------------------

def time_interleaved(benches, repeat=DEFAULT_REPEAT, warmup=DEFAULT_WARMUP, max_time=None, progress=None,
                     settle=None):
    """Time ``benches`` (``{provider: Bench}``) round by round: ``warmup``
    untimed calls of each, then ``repeat`` rounds of one timed call each, in
    order; with ``max_time`` (seconds) the rounds stop once that much time has
    passed and at least ``min(3, repeat)`` were made. ``settle`` seconds of
    sleep (untimed) follow every call, so that no call starts while the thread
    pools of the previous provider still spin (default :data:`SETTLE_S`).

    Returns ``{provider: {"times", "warmup", "loss", "error"}}`` (seconds; the
    loss of the first call; ``error``: None, or the exception a call raised,
    after which the provider is left out of the later rounds).
    """
    say = progress or (lambda text, end="\n": None)
    settle = SETTLE_S if settle is None else settle
    out = {p: {"times": [], "warmup": [], "loss": None, "error": None, "seen": False} for p in benches}
    active = list(benches)

    def call(p, timed):
        b = benches[p]
        try:
            if b.setup is not None:
                b.setup()
            t0 = time.perf_counter()
            ret = b.fn()
            dt = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - one failing provider must not end the run
            out[p]["error"] = f"{type(e).__name__}: {e}"
            active.remove(p)
            say(f" [{p} error: {out[p]['error']}]", "")
            return
        if not out[p]["seen"]:
            out[p]["loss"], out[p]["seen"] = loss_value(ret), True
        del ret
        out[p]["times" if timed else "warmup"].append(dt)
        if settle:
            time.sleep(settle)

    for i in range(max(0, warmup)):
        say(f"warm-up {i + 1}/{warmup} ...", "")
        for p in list(active):
            call(p, False)
        gc.collect()
        say(" done")
    start = time.perf_counter()
    rounds = max(1, repeat)
    for r in range(rounds):
        say(f"round {r + 1}/{rounds} ...", "")
        for p in list(active):
            call(p, True)
        gc.collect()
        say(" " + ", ".join(f"{p} {out[p]['times'][-1] * 1e3:.0f}" for p in active) + " ms")
        if max_time is not None and r + 1 >= min(3, rounds) and time.perf_counter() - start > max_time:
            break
    for v in out.values():
        del v["seen"]
    return out


# --- peak memory (a child process per provider) -------------------------------

def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _reset_hwm():
    """Reset this process's resident high-water mark (Linux: ``5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _RssSampler:
    """The largest RSS seen by a thread reading ``/proc/self/statm`` every ``interval`` s."""

    def __init__(self, interval=0.0005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _memory_child(spec):
    """In the child: inputs, one warm-up step (compiles, warms the allocators),
    then one step measured. Prints one JSON line."""
    case = StepCase(spec["n"], spec["v"], spec["d"], spec["dtype"])
    M.set_threads(spec["threads"])
    inputs = make_inputs(case, spec["seed"])
    try:
        bench = build(case, inputs, spec["provider"])
    except C.Unavailable as e:
        print(json.dumps({"status": "skipped", "note": str(e)}))
        return
    ret = bench.fn()
    del ret
    gc.collect()
    # gradient buffers fastloss.torch keeps for the next step: resident before
    # the measured step, so its growth misses them; they count as its memory
    kept = sys.modules["fastloss.torch.backend"]._kept_bytes() if "fastloss.torch.backend" in sys.modules else 0
    if _reset_hwm():
        method = "VmHWM"
        base = _status("VmRSS")
        ret = bench.fn()
        peak = _status("VmHWM") - base
    else:  # no clear_refs (not Linux, or not allowed): sample the RSS
        method = "sampled"
        with _RssSampler() as s:
            base = s.peak
            ret = bench.fn()
        peak = s.peak - base
    del ret  # held until the peak was read: the gradients it holds count
    print(json.dumps({"status": "ok", "peak_bytes": peak + kept, "method": method}))


def measure_memory(case, provider, threads=2, seed=0, timeout=900):
    """Peak memory of one step of ``provider``, in a fresh child process.

    The child makes the inputs, runs one warm-up step (torch.compile compiles
    there), resets the kernel's resident high-water mark
    (``/proc/self/clear_refs``) and reads ``VmHWM - VmRSS`` around one more
    step: every byte the step made resident at its peak, the gradients it
    returns included, plus the gradient buffers ``fastloss.torch`` kept from
    the warm-up step for reuse (already resident, so not in the growth);
    torch's CPU allocations, which tracemalloc does not see, are counted.
    Where the mark cannot be reset, a thread samples the RSS every 0.5 ms
    instead (``method`` says which). Returns
    ``{"status", "peak_bytes", "method", "note"}``.
    """
    spec = {"n": case.n, "v": case.v, "d": case.d, "dtype": case.dtype, "provider": provider,
            "threads": threads, "seed": seed}
    cmd = [sys.executable, "-m", "fastloss.bench.torch_step", "--memory-child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "peak_bytes": None, "method": None, "note": f"timed out after {timeout} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"status": "error", "peak_bytes": None, "method": None,
                "note": f"child exited {proc.returncode}: {last}"}
    got = json.loads(lines[-1])
    return {"status": got["status"], "peak_bytes": got.get("peak_bytes"), "method": got.get("method"),
            "note": got.get("note", "")}


# --- the adapter's per-call overhead ------------------------------------------

def adapter_overhead(repeat=OVERHEAD_REPEAT, shape=OVERHEAD_SHAPE, seed=0, max_time=OVERHEAD_MAX_TIME):
    """Medians (microseconds) of small calls, interleaved call by call, float32
    (``repeat`` rounds of one call each; with ``max_time`` seconds, the rounds
    stop once that much time has passed and at least 21 were made):

    * ``raw forward``: ``fastloss.cross_entropy(x, t)`` (numpy arrays);
    * ``adapter forward``: ``fastloss.torch.cross_entropy`` on tensors sharing
      that memory, no gradient wanted;
    * ``torch forward``: ``F.cross_entropy`` on the same tensors;
    * ``raw fwd+bwd``: ``fastloss.cross_entropy_with_grad(x, t)`` (allocates the gradient);
    * ``adapter fwd+bwd``: a leaf ``x`` that requires grad (``detach().requires_grad_()``),
      ``fastloss.torch.cross_entropy(x, t)``, ``backward()``;
    * ``adapter fwd+grad``: the same without ``backward()``: the kernel has
      computed the gradient and kept it; what ``adapter fwd+bwd`` adds to it
      is autograd's backward pass (the engine, ``x.grad``);
    * ``torch fwd+bwd``: the same with ``F.cross_entropy``.

    Returns ``{"shape", "repeat", "median_us": {...}, "min_us": {...},
    "overhead_us": {"forward", "fwd+bwd"}}`` (adapter median - raw median).
    """
    import torch

    import fastloss
    import fastloss.torch as flt
    F = torch.nn.functional
    arrays = C.make_inputs(C.Case("ce", tuple(shape)), seed)
    xn, tn = arrays["logits"], arrays["targets"]
    xt, tt = torch.from_numpy(xn), torch.from_numpy(tn)

    def fwd_bwd(loss_fn):
        def call():
            x = xt.detach().requires_grad_()
            loss = loss_fn(x, tt)
            loss.backward()
            return loss, x.grad
        return call

    def no_grad(loss_fn):
        def call():
            with torch.no_grad():
                return loss_fn(xt, tt)
        return call

    def grad_kept():
        x = xt.detach().requires_grad_()
        return flt.cross_entropy(x, tt)

    calls = {
        "raw forward": lambda: fastloss.cross_entropy(xn, tn),
        "adapter forward": lambda: flt.cross_entropy(xt, tt),
        "torch forward": no_grad(F.cross_entropy),
        "raw fwd+bwd": lambda: fastloss.cross_entropy_with_grad(xn, tn),
        "adapter fwd+bwd": fwd_bwd(flt.cross_entropy),
        "adapter fwd+grad": grad_kept,
        "torch fwd+bwd": fwd_bwd(F.cross_entropy),
    }
    times = {k: [] for k in calls}
    for _ in range(3):  # warm: JIT loads, first-call paths
        for fn in calls.values():
            fn()
    perf = time.perf_counter
    start = perf()
    for r in range(max(1, repeat)):
        for k, fn in calls.items():
            t0 = perf()
            fn()
            times[k].append(perf() - t0)
        if max_time is not None and r + 1 >= 21 and perf() - start > max_time:
            break
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    return {"shape": list(shape), "dtype": "float32", "repeat": len(times["raw forward"]), "median_us": med,
            "min_us": {k: min(v) * 1e6 for k, v in times.items()},
            "overhead_us": {"forward": med["adapter forward"] - med["raw forward"],
                            "fwd+bwd": med["adapter fwd+bwd"] - med["raw fwd+bwd"],
                            "fwd+grad": med["adapter fwd+grad"] - med["raw fwd+bwd"],
                            "backward": med["adapter fwd+bwd"] - med["adapter fwd+grad"]},
            "target_us": OVERHEAD_TARGET_US}


# --- the run ------------------------------------------------------------------

def new_row(case, provider):
    """A result row of (case, provider) with every key of :data:`ROW_KEYS`; timing fields None."""
    row = dict.fromkeys(ROW_KEYS)
    row.update(case=case.name, op="torch-step", shape=[case.n, case.v, case.d], dtype=case.dtype,
               mode="fwd+bwd", provider=provider, family=C.family(provider), note="", memory_note="")
    return row


def add_shares(rows, paired=True):
    """Fill ``loss_ms``, ``loss_share``, ``speedup_vs_torch`` and ``share_vs_torch`` per case;
    also ``loss_ms_paired``: the median over rounds of (this step - the head-only step of
    the same round), which a load that drifts between rounds moves less (interleaved runs
    only: ``paired=False`` for providers timed one after another)."""
    by_case = {}
    for r in rows:
        if r["status"] == "ok":
            by_case.setdefault(r["case"], {})[r["provider"]] = r
    for group in by_case.values():
        head = group.get("head-only")
        torch_row = group.get("torch")
        for p, r in group.items():
            if head is not None and p != "head-only":
                r["loss_ms"] = r["median_ms"] - head["median_ms"]
                r["loss_share"] = r["loss_ms"] / r["median_ms"]
                if paired and r["times_ms"] and head["times_ms"] and len(r["times_ms"]) == len(head["times_ms"]):
                    r["loss_ms_paired"] = statistics.median(
                        [a - b for a, b in zip(r["times_ms"], head["times_ms"])])
            if torch_row is not None:
                r["speedup_vs_torch"] = torch_row["median_ms"] / r["median_ms"]
        ref = torch_row["loss_share"] if torch_row is not None else None
        for r in group.values():
            if ref is not None and r["loss_share"] is not None and r["loss_share"] > 0 and ref > 0:
                r["share_vs_torch"] = ref / r["loss_share"]
    return rows


def run(cases, providers=None, *, threads=None, repeat=DEFAULT_REPEAT, warmup=DEFAULT_WARMUP,
        max_time=None, memory=True, overhead=True, overhead_repeat=None, progress=None, seed=0,
        settle=None):
    """Benchmark the training step for each :class:`StepCase` in ``cases``.

    ``providers``: names or families (default all; head-only is always run).
    ``threads``: set for numba and torch first (default: leave as is).
    ``settle``: seconds of sleep after every call (default :data:`SETTLE_S`).
    ``memory``: measure each provider's peak memory in a child process
    (:func:`measure_memory`). ``overhead``: time the adapter at 64 x 1000
    (:func:`adapter_overhead`, ``overhead_repeat`` calls per variant, default
    :data:`OVERHEAD_REPEAT`).
    Returns the result dict (``schema``, ``machine``, ``conditions``,
    ``settings``, ``warnings``, ``results``: one row per (case, provider),
    ``overhead``).
    """
    names = providers_for(providers)
    settle = SETTLE_S if settle is None else settle
    if threads is not None:
        threads = M.set_threads(threads)
    say = progress or (lambda text, end="\n": None)
    info = M.machine_info()
    conditions = M.run_conditions()
    rows = []
    for case in cases:
        say(f"{case.name}: making inputs ...", "")
        gc.collect()
        inputs = make_inputs(case, seed)
        say(" done")
        benches, case_rows = {}, {}
        for p in names:
            row = case_rows[p] = new_row(case, p)
            rows.append(row)
            try:
                if p == "torch-compile":
                    say(f"{case.name}: compiling ...", "")
                benches[p] = build(case, inputs, p)
                row["note"] = benches[p].note
                if p == "torch-compile":
                    say(" " + row["note"])
            except C.Unavailable as e:
                row.update(status="skipped", note=str(e))
                say(f"{case.name} {p}: skipped: {e}")
            except Exception as e:  # noqa: BLE001 - one failing provider must not end the run
                row.update(status="error", note=f"{type(e).__name__}: {e}")
                say(f"{case.name} {p}: error: {row['note']}")
        timed = time_interleaved(benches, repeat, warmup, max_time, progress=say, settle=settle)
        for p, got in timed.items():
            if got["error"] is not None or not got["times"]:
                case_rows[p].update(status="error", note=got["error"] or "no timed call")
                continue
            t = got["times"]
            case_rows[p].update(status="ok", rounds=len(t), times_ms=[x * 1e3 for x in t],
                                warmup_ms=[x * 1e3 for x in got["warmup"]],
                                median_ms=statistics.median(t) * 1e3, min_ms=min(t) * 1e3, loss=got["loss"])
        benches = timed = None
        del inputs
        gc.collect()
        if memory:
            for p in names:
                if case_rows[p]["status"] != "ok":
                    continue
                say(f"{case.name} {p}: peak memory (child process) ...", "")
                got = measure_memory(case, p, threads=M.numba_threads(), seed=seed)
                case_rows[p].update(peak_bytes=got["peak_bytes"], memory_method=got["method"],
                                    memory_note=got["note"] if got["status"] != "ok" else "")
                say(f" {got['peak_bytes'] / 1e6:,.1f} MB" if got["peak_bytes"] is not None
                    else f" {got['status']}: {got['note']}")
    add_shares(rows)
    over = None
    if overhead:
        overhead_repeat = OVERHEAD_REPEAT if overhead_repeat is None else overhead_repeat
        say(f"adapter overhead at {OVERHEAD_SHAPE[0]}x{OVERHEAD_SHAPE[1]} ({overhead_repeat} calls each) ...", "")
        over = adapter_overhead(overhead_repeat, seed=seed)
        say(" done")
    conditions["load_end"] = M.load_sample(since=conditions["load_start"]["mark"])
    settings = {"threads": M.numba_threads(), "repeat": repeat, "warmup": warmup, "max_time_s": max_time,
                "seed": seed, "memory": bool(memory), "interleaved": True, "settle_s": settle, "command": None}
    warnings = M.noise_warnings(None, conditions, info["cores"], settings["threads"])
    for w in warnings:
        say(f"warning: {w}")
    return {"schema": SCHEMA, "machine": info, "conditions": conditions, "settings": settings,
            "warnings": warnings, "results": rows, "overhead": over}


# --- output -------------------------------------------------------------------

_COLUMNS = (("provider", 16, "<"), ("median ms", 10, ">"), ("min ms", 9, ">"), ("rounds", 6, ">"),
            ("vs torch", 8, ">"), ("loss ms", 8, ">"), ("loss share", 10, ">"), ("share x", 7, ">"),
            ("peak MB", 9, ">"), ("loss", 9, ">"))


def _line(cells):
    return "  ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, _COLUMNS)).rstrip()


def _ms(v):
    return "-" if v is None else (f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}")


def _mb(b):
    return "-" if b is None else f"{b / 1e6:,.1f}"


def _overhead_lines(over):
    if not over:
        return []
    med, mins = over["median_us"], over["min_us"]
    n, v = over["shape"]
    out = ["", f"adapter overhead: fastloss.torch.cross_entropy vs the numpy call, {n}x{v} float32, "
               f"median of {over['repeat']} calls each (interleaved)",
           f"{'call':<18}{'median us':>10}{'min us':>9}"]
    for k in med:
        out.append(f"{k:<18}{med[k]:>10.1f}{mins[k]:>9.1f}")
    for mode, key in (("forward", "forward"), ("fwd+bwd", "fwd+bwd")):
        ov = over["overhead_us"][key]
        verdict = "within" if ov < over["target_us"] else "ABOVE"
        out.append(f"  adapter adds {ov:.1f} us per {mode} call ({verdict} the < {over['target_us']:.0f} us target)")
    if "fwd+grad" in over["overhead_us"]:
        out.append(f"  of which: forward with the gradient kept {over['overhead_us']['fwd+grad']:.1f} us over the "
                   f"numpy call, autograd's backward() {over['overhead_us']['backward']:.1f} us")
    return out


def format_table(result):
    """The result as text: machine and load, one block per case (columns:
    :data:`fastloss.bench.legend.TORCH_STEP_LEGEND`), then the adapter overhead."""
    from .runner import _load_line, run_date
    m = result["machine"]
    out = [f"fastloss bench --op torch-step  {run_date(result)}",
           f"machine: {m['cpu_model']}, {m['cores']} cores; threads: numba {m['numba_threads']}"
           + (f" ({m['numba_threading_layer']})" if m.get("numba_threading_layer") else "")
           + (f", torch {m['torch_threads']}" if m.get("torch_threads") is not None else ""),
           "versions: " + ", ".join(f"{k} {m[k]}" for k in ("fastloss", "python", "numpy", "numba", "torch")
                                    if m.get(k)),
           "step: logits = hidden (N, D) @ W.T, mean cross-entropy, backward to hidden and W; providers timed "
           + ("interleaved, round by round" if (result.get("settings") or {}).get("interleaved", True)
              else "one after another")]
    load = _load_line(result.get("conditions") or {})
    if load:
        out.append(load)
    out += [f"WARNING: {w}" for w in result.get("warnings") or ()]
    blocks = {}
    for r in result["results"]:
        blocks.setdefault(r["case"], []).append(r)
    for rows in blocks.values():
        n, v, d = rows[0]["shape"]
        case = StepCase(n, v, d, rows[0]["dtype"])
        out += ["", f"{case.name}: N={n} V={v} D={d} {case.dtype}; logits {case.logits_bytes / 1e6:,.1f} MB, "
                    f"gradients of hidden and W {case.grad_bytes / 1e6:,.1f} MB, products "
                    f"{case.flops / 1e9:,.1f} GFLOP",
                _line([c for c, _, _ in _COLUMNS])]
        notes = []
        for r in rows:
            if r["status"] != "ok":
                out.append(_line([r["provider"], r["status"]]))
                notes.append(f"{r['provider']}: {r['note']}")
                continue
            share = r["loss_share"]
            out.append(_line([
                r["provider"], _ms(r["median_ms"]), _ms(r["min_ms"]), str(r["rounds"]),
                "-" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}x",
                _ms(r["loss_ms"]), "-" if share is None else f"{share:.1%}",
                "-" if r["share_vs_torch"] is None else f"{r['share_vs_torch']:.1f}x",
                _mb(r["peak_bytes"]), "-" if r["loss"] is None else f"{r['loss']:.5g}"]))
            if r["note"]:
                notes.append(f"{r['provider']}: {r['note']}")
            if r["memory_note"]:
                notes.append(f"{r['provider']} memory: {r['memory_note']}")
            if share is not None and share <= 0:
                notes.append(f"{r['provider']}: faster than the head-only baseline (its products run "
                             "differently), so its loss share is not positive")
        paired = [f"{r['provider']} {_ms(r['loss_ms_paired'])}" for r in rows
                  if r["status"] == "ok" and r.get("loss_ms_paired") is not None]
        if paired:
            notes.append("loss ms, paired by round (median of step - head-only of the same round): "
                         + ", ".join(paired))
        losses = [r["loss"] for r in rows if r["status"] == "ok" and r["loss"] is not None]
        if len(losses) > 1:
            spread = (max(losses) - min(losses)) / max(abs(statistics.median(losses)), 1e-30)
            notes.append(f"losses agree within {spread:.1e} (relative)")
        methods = {r["memory_method"] for r in rows if r["memory_method"]}
        if methods:
            notes.append("peak MB: resident memory the step added at its peak, gradients (and the gradient buffer "
                         "fastloss.torch keeps between steps) included, one step "
                         f"per child process ({', '.join(sorted(methods))})")
        out += [f"  note: {x}" for x in notes]
    out += _overhead_lines(result.get("overhead"))
    return "\n".join(out) + "\n"


def _main(argv):
    if len(argv) == 2 and argv[0] == "--memory-child":
        _memory_child(json.loads(argv[1]))
        return 0
    sys.stderr.write("usage: fastloss bench --op torch-step (this module's own entry is for its child processes)\n")
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
