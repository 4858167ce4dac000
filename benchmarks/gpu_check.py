"""One-command check of the fastloss CUDA backend on a GPU machine.

    python benchmarks/gpu_check.py [--json results.json] [--quick] [--budget 200]

Needs PyTorch with CUDA and numba-cuda; no network. Two parts:

1. Correctness against PyTorch on the GPU (float32 and bfloat16 logits):
   cross-entropy loss and fused gradient for every option PyTorch has
   (class weights, ignore_index, reduction, label_smoothing, grad_output),
   the fastloss-only options against a PyTorch expression of the contract
   (z_loss, softcap, logit_scale, normalizer), ``out=``/``inplace=``,
   logsumexp and MSE. Each fused check runs both fused kernels (the
   default, resident where a row fits in shared memory, and the streaming
   one). A bad target must give a NaN loss without waiting and a
   ``ValueError`` from ``fastloss.cuda.synchronize()`` (and from the call
   itself with ``CUDA_SYNC_CHECKS``). The reference runs in float64 on the
   same (rounded) inputs; a bfloat16 gradient may differ by its rounding.
2. Timings with CUDA events (warm-up, then the median of several runs) of
   forward and forward+backward at (8192, 32000), (4096, 128256) and
   (16384, 50257), float32 and bfloat16, for fastloss (default and a few
   launch shapes), torch eager, torch.compile (if it compiles) and
   Liger-Kernel (if importable), with the device-to-device copy bandwidth
   measured in the same run. The table gives the median ms, GB/s of logits
   moved (forward: logits read; forward+backward: logits read + gradient
   written, the minimum any implementation must move), the fraction of the
   copy bandwidth and the speed-up over torch eager. Calls are timed back
   to back as a training loop makes them (an event pair around each; no
   call waits for the GPU), so host time shows only where it exceeds the GPU
   time; the host time per call is measured on its own on a tiny case, and
   the fused kernel the defaults pick is logged per case.

Every check and case is guarded, so one failure does not lose the rest; the
JSON (``--json``) holds everything printed. A time budget (``--budget``
seconds, default 200) stops starting torch.compile cases 60 s before it ends
and skips the remaining cases once it is spent, so the whole run stays under
four minutes on an H100 (numba-cuda compiles each fastloss kernel variant
once, about a second each, inside the first calls).
"""

import argparse
import json
import os
import statistics
import sys
import time
import traceback

# fastloss launches one-block helper kernels (validate, finalize) on purpose;
# numba-cuda would warn about their grid size.
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

import numpy as np  # noqa: E402

# numba-cuda 0.30 registers an overload for np.row_stack, which numpy 2.5 removed;
# without this alias its CUDA target fails to initialise on such images.
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

T0 = time.perf_counter()


def log(*args):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *args, flush=True)


def elapsed():
    return time.perf_counter() - T0


# --- references ------------------------------------------------------------------------

def torch_ce_reference(torch, x, t, *, weight=None, ignore_index=-100, reduction="mean",
                       label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                       normalizer=None, grad_output=None):
    """The contract's loss and d(grad_output * loss)/dx in float64 with autograd."""
    F = torch.nn.functional
    xr = x.detach().double().requires_grad_(True)
    z = xr * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    w = weight.double() if weight is not None else None
    per = F.cross_entropy(z, t, weight=w, ignore_index=ignore_index, reduction="none",
                          label_smoothing=label_smoothing)
    counted = t != ignore_index
    zterm = z_loss * torch.logsumexp(z, -1) ** 2 * counted if z_loss else torch.zeros_like(per)
    if reduction == "none":
        loss = per + zterm
    elif reduction == "sum":
        loss = per.sum() + zterm.sum()
    else:
        if normalizer is not None:
            d_ce = d_z = torch.tensor(float(normalizer), dtype=torch.float64, device=x.device)
        else:
            d_z = counted.sum().double()
            d_ce = w[t[counted]].sum() if w is not None else d_z
        loss = per.sum() / d_ce + zterm.sum() / d_z
    g = torch.ones_like(loss) if grad_output is None else torch.as_tensor(
        grad_output, dtype=torch.float64, device=x.device).expand_as(loss)
    loss.backward(g)
    return loss.detach(), xr.grad


def close(torch, got, ref, dtype, what):
    """(ok, message) comparing a fastloss result with a float64 reference."""
    got = got.detach().double().reshape(ref.shape)
    err = (got - ref).abs()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if what == "grad":
        rel, absf = (2 ** -7, 1e-3) if dtype == torch.bfloat16 else (1e-5, 1e-6)
    else:
        rel, absf = (1e-4, 1e-6) if dtype == torch.bfloat16 else (1e-5, 1e-7)
    bound = rel * ref.abs() + absf * max(scale, 1.0)
    ok = bool(torch.all(err <= bound)) and not bool(torch.isnan(got).any() ^ torch.isnan(ref).any())
    return ok, f"max|err| {float(err.max()) if err.numel() else 0.0:.3g} (max|ref| {scale:.3g})"


# --- part 1: correctness ---------------------------------------------------------------

class patched:
    """``with patched(module, NAME=value, ...)``: set module attributes for the block."""

    def __init__(self, module, **settings):
        self.module, self.settings, self.old = module, settings, {}

    def __enter__(self):
        for k, v in self.settings.items():
            self.old[k] = getattr(self.module, k)
            setattr(self.module, k, v)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            setattr(self.module, k, v)


def correctness(torch, api, quick, device="cuda"):
    """Part 1; ``api``: the module whose functions are checked (``fastloss``)."""
    import fastloss.config as config
    import fastloss.cuda as fastloss_cuda
    F = torch.nn.functional
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(1234)
    records = []

    def record(name, ok, msg):
        records.append({"check": name, "ok": ok, "detail": msg})
        log(f"{'PASS' if ok else 'FAIL'}  {name}: {msg}")

    def guarded(name, fn):
        try:
            fn(name)
        except Exception as e:  # keep going: one failure must not hide the rest
            record(name, False, f"{type(e).__name__}: {e}")
            traceback.print_exc()
            sys.stdout.flush()

    shapes = [(67, 50257), (4, 128256), (130, 7)] if not quick else [(67, 50257), (130, 7)]
    options = [
        ("mean", {}),
        ("sum+weight+ignore_index=3", dict(reduction="sum", weight="w", ignore_index=3)),
        ("none+smoothing+grad_output", dict(reduction="none", label_smoothing=0.1, grad_output="rows")),
        ("mean+weight+smoothing", dict(weight="w", label_smoothing=0.05)),
        ("z_loss+softcap+logit_scale", dict(z_loss=1e-4, softcap=30.0, logit_scale=0.5)),
        ("normalizer+grad_output", dict(normalizer=1000.0, grad_output=0.5, z_loss=1e-3)),
    ]
    for tname in ("float32", "bfloat16"):
        dtype = getattr(torch, tname)
        for shape in shapes:
            n, v = shape
            x = (torch.randn(shape, device=dev, generator=gen) * 3).to(dtype)
            for oname, opts in options:
                def one(name, x=x, opts=opts, dtype=dtype, n=n, v=v):
                    kw = dict(opts)
                    ign = kw.get("ignore_index", -100)
                    t = torch.randint(0, v, (n,), device=dev, generator=gen)
                    t[::5] = ign
                    if kw.get("weight") == "w":
                        kw["weight"] = torch.rand(v, device=dev, generator=gen) + 0.25
                    if kw.get("grad_output") == "rows":
                        kw["grad_output"] = torch.rand(n, device=dev, generator=gen)
                    ref_loss, ref_grad = torch_ce_reference(torch, x, t, **kw)
                    fkw = {k: val for k, val in kw.items() if k != "grad_output"}
                    fwd = api.cross_entropy(x, t, **fkw)
                    ref_fwd, _ = torch_ce_reference(torch, x, t, **fkw)
                    ok, msgs = True, []
                    # both fused kernels: auto (resident where a row fits) and streaming
                    for strategy in ("auto", "stream"):
                        with patched(config, CUDA_FUSED_STRATEGY=strategy):
                            loss, grad = api.cross_entropy_with_grad(x, t, **kw)
                        ok1, m1 = close(torch, loss, ref_loss, dtype, "loss")
                        ok2, m2 = close(torch, grad, ref_grad, dtype, "grad")
                        ok = ok and ok1 and ok2 and grad.dtype == dtype and grad.shape == x.shape
                        msgs.append(f"{strategy}: loss {m1}; grad {m2}")
                    ok3, m3 = close(torch, fwd, ref_fwd, dtype, "loss")
                    record(name, ok and ok3, "; ".join(msgs) + f"; forward {m3}")
                guarded(f"ce {tname} {shape} {oname}", one)

            def torch_native(name, x=x, dtype=dtype, n=n, v=v):
                # the plain PyTorch call itself, as a user would compare
                t = torch.randint(0, v, (n,), device=dev, generator=gen)
                t[1::4] = -100
                xr = x.detach().float().requires_grad_(True)
                ref = F.cross_entropy(xr, t, label_smoothing=0.1)
                ref.backward()
                loss, grad = api.cross_entropy_with_grad(x, t, label_smoothing=0.1)
                ok1, m1 = close(torch, loss, ref.detach().double(), dtype, "loss")
                ok2, m2 = close(torch, grad, xr.grad.double(), dtype, "grad")
                record(name, ok1 and ok2, f"loss {m1}; grad {m2}")
            guarded(f"ce {tname} {shape} vs F.cross_entropy", torch_native)

        def out_inplace(name, dtype=dtype):
            x = (torch.randn(33, 50257, device=dev, generator=gen) * 2).to(dtype)
            t = torch.randint(0, 50257, (33,), device=dev, generator=gen)
            _, ref_grad = torch_ce_reference(torch, x, t)
            out = torch.full_like(x, float("nan"))
            _, g1 = api.cross_entropy_with_grad(x, t, out=out)
            y = x.clone()
            _, g2 = api.cross_entropy_with_grad(y, t, inplace=True)
            ok1, m1 = close(torch, out, ref_grad, dtype, "grad")
            ok2, m2 = close(torch, y, ref_grad, dtype, "grad")
            record(name, ok1 and ok2 and g1 is out and g2 is y, f"out {m1}; inplace {m2}")
        guarded(f"ce {tname} out= and inplace", out_inplace)

        def error_check(name, dtype=dtype):
            # a bad target: the call does not wait; NaN loss; raised by synchronize(),
            # or by the call itself with CUDA_SYNC_CHECKS
            x = (torch.randn(8, 1000, device=dev, generator=gen)).to(dtype)
            t = torch.randint(0, 1000, (8,), device=dev, generator=gen)
            t[3] = 1000
            loss, _ = api.cross_entropy_with_grad(x, t)
            msgs = [f"loss {loss.item()}"]
            ok = bool(torch.isnan(loss).item())
            try:
                fastloss_cuda.synchronize()
                ok = False
                msgs.append("synchronize raised nothing")
            except ValueError as e:
                ok = ok and "position (3,): 1000" in str(e)
                msgs.append(f"synchronize: {e}")
            with patched(config, CUDA_SYNC_CHECKS=True):
                try:
                    api.cross_entropy(x, t)
                    ok = False
                    msgs.append("sync call raised nothing")
                except ValueError as e:
                    ok = ok and "position (3,): 1000" in str(e) and "earlier" not in str(e)
            record(name, ok, "; ".join(msgs))
        guarded(f"ce {tname} bad target (asynchronous check)", error_check)

        def lse_check(name, dtype=dtype):
            x = (torch.randn(129, 50257, device=dev, generator=gen) * 3).to(dtype)
            x[0, :1000] = float("-inf")
            got = api.logsumexp(x, softcap=20.0)
            ref = torch.logsumexp(20.0 * torch.tanh(x.double() / 20.0), -1)
            ok, m = close(torch, got, ref, dtype, "loss")
            record(name, ok, m)
        guarded(f"logsumexp {tname}", lse_check)

        def mse_check(name, dtype=dtype):
            p = torch.randn(1023, 517, device=dev, generator=gen).to(dtype)
            q = torch.randn(1023, 517, device=dev, generator=gen).to(dtype)
            w = torch.rand(517, device=dev, generator=gen)
            msgs, ok = [], True
            for red in ("mean", "sum", "none"):
                pr = p.detach().double().requires_grad_(True)
                d = pr - q.double()
                e = w.double() * d * d
                if red == "mean":
                    ref = e.sum() / (w.double().sum() * 1023)
                else:
                    ref = e.sum() if red == "sum" else e
                ref.backward(torch.ones_like(ref))
                loss, grad = api.mse_with_grad(p, q, reduction=red, weight=w.cpu().numpy())
                ok1, m1 = close(torch, loss, ref.detach(), dtype, "loss")
                ok2, m2 = close(torch, grad, pr.grad, dtype, "grad")
                ok = ok and ok1 and ok2
                msgs.append(f"{red}: loss {m1}, grad {m2}")
            record(name, ok, "; ".join(msgs))
        guarded(f"mse {tname} (row weight)", mse_check)
    return records


# --- part 2: timings -----------------------------------------------------------------------

def cuda_median_ms(torch, fn, reps, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth(torch):
    """Device-to-device copy bandwidth in GB/s (bytes read + written per second)."""
    n = 1 << 28  # 1 GiB of float32
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = cuda_median_ms(torch, lambda: dst.copy_(src), reps=20, warmup=3)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def providers(torch, api, config, tname, budget, sm_count):
    """{name: (forward fn factory, forward+backward fn factory)}; a factory takes
    (x, t) and returns a no-argument callable (or None when not applicable)."""
    F = torch.nn.functional

    def fastloss_variant(**settings):
        """Timing closures with fastloss.config tunables (``CUDA_*``) patched
        for the duration of each call."""
        def setup():
            old = {}
            for k, v in settings.items():
                old[k] = getattr(config, k)
                setattr(config, k, v)
            return old

        def restore(old):
            for k, v in old.items():
                setattr(config, k, v)

        def fwd(x, t):
            def run():
                old = setup()
                try:
                    api.cross_entropy(x, t)
                finally:
                    restore(old)
            return run

        def fb(x, t, inplace=False):
            def run():
                old = setup()
                try:
                    api.cross_entropy_with_grad(x, t, inplace=inplace)
                finally:
                    restore(old)
            return run
        return fwd, fb

    out = {}
    f_def = fastloss_variant()
    out["fastloss"] = (f_def[0], f_def[1])
    out["fastloss inplace"] = (None, lambda x, t: f_def[1](x, t, inplace=True))
    # Variants of the fused kernel only (the forward kernel is the default's):
    # the streaming kernel (reads each row twice; the default where less than
    # a quarter of a row fits in shared memory) at 256 and 512 threads per block, and
    # the resident kernel (the row, or its longest prefix that fits, kept in
    # shared memory; the default otherwise) forced, and at 512 threads
    # instead of 1024.
    for label, settings in (
            ("stream", dict(CUDA_FUSED_STRATEGY="stream")),
            ("stream tpb=512", dict(CUDA_FUSED_STRATEGY="stream", CUDA_FUSED_THREADS_PER_BLOCK=512)),
            ("resident", dict(CUDA_FUSED_STRATEGY="resident")),
            ("resident tpb=512", dict(CUDA_FUSED_STRATEGY="resident",
                                      CUDA_RESIDENT_THREADS_PER_BLOCK=512))):
        v = fastloss_variant(**settings)
        out[f"fastloss {label}"] = (None, v[1])

    def eager_fwd(x, t):
        return lambda: F.cross_entropy(x, t)

    def eager_fb(x, t):
        xr = x.detach().clone().requires_grad_(True)

        def run():
            xr.grad = None
            F.cross_entropy(xr, t).backward()
        return run
    out["torch eager"] = (eager_fwd, eager_fb)

    compiled = {}

    def compiled_fn():
        if "fn" not in compiled:
            compiled["fn"] = torch.compile(lambda x, t: F.cross_entropy(x, t))
        return compiled["fn"]

    def compile_fwd(x, t):
        if elapsed() > budget - 60:
            raise RuntimeError("skipped: time budget (torch.compile is slow to compile)")
        fn = compiled_fn()
        return lambda: fn(x, t)

    def compile_fb(x, t):
        if elapsed() > budget - 60:
            raise RuntimeError("skipped: time budget (torch.compile is slow to compile)")
        fn = compiled_fn()
        xr = x.detach().clone().requires_grad_(True)

        def run():
            xr.grad = None
            fn(xr, t).backward()
        return run
    out["torch.compile"] = (compile_fwd, compile_fb)

    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
        liger = LigerCrossEntropyLoss()

        def liger_fwd(x, t):
            return lambda: liger(x, t)

        def liger_fb(x, t):
            xr = x.detach().clone().requires_grad_(True)

            def run():
                xr.grad = None
                liger(xr, t).backward()
            return run
        out["liger"] = (liger_fwd, liger_fb)
    except Exception as e:  # not installed, or an incompatible version
        log(f"Liger-Kernel not available: {type(e).__name__}: {e}")
    return out


SHAPES = [(8192, 32000), (4096, 128256), (16384, 50257)]


def host_overhead_us(torch, api, reps=200):
    """Host time per call (microseconds) on a tiny case, where the GPU work is
    negligible: what a call costs the training loop's Python thread (no call
    waits for the GPU, so this is also the GPU time below which a call is
    launch-bound)."""
    F = torch.nn.functional
    x = torch.randn(64, 1024, device="cuda")
    t = torch.randint(0, 1024, (64,), device="cuda")
    xr = x.clone().requires_grad_(True)

    def eager_fb():
        xr.grad = None
        F.cross_entropy(xr, t).backward()
    out = {}
    # Where fastloss's host time goes: a profile of 100 tiny fwd+bwd calls
    # (logged: the 25 functions with the most own time).
    import cProfile
    import io
    import pstats
    for _ in range(5):
        api.cross_entropy_with_grad(x, t)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(100):
        api.cross_entropy_with_grad(x, t)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    out["profile"] = buf.getvalue()
    log("host profile of 100 fastloss fwd+bwd calls (64x1024):\n" + out["profile"])
    for name, fn in (("fastloss fwd", lambda: api.cross_entropy(x, t)),
                     ("fastloss fwd+bwd", lambda: api.cross_entropy_with_grad(x, t)),
                     ("torch eager fwd", lambda: F.cross_entropy(x, t)),
                     ("torch eager fwd+bwd", eager_fb)):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        out[name] = (t1 - t0) / reps * 1e6
        log(f"host time per call, {name}: {out[name]:.1f} us")
    torch.cuda.synchronize()
    return out


def fused_choice(api, x, t):
    """Which fused kernel the default settings launch for (x, t)."""
    from fastloss.cuda import launch
    seen = []
    orig = launch.Gpu.launch

    def spy(self, kernel, grid, *args, tpb=None, smem=0):
        if getattr(getattr(kernel, "py_func", None), "__name__", "") == "fused":  # both fused kernels
            seen.append((smem, tpb, grid))
        return orig(self, kernel, grid, *args, tpb=tpb, smem=smem)
    launch.Gpu.launch = spy
    try:
        api.cross_entropy_with_grad(x, t)
    finally:
        launch.Gpu.launch = orig
    if not seen:
        return "none"
    smem, tpb, grid = seen[-1]
    kind = f"resident ({smem / 1024:.0f} KiB shared)" if smem else "stream"
    note = launch.RESIDENT_NOTE
    return f"{kind}, {tpb} threads, {grid} blocks" + (f"; {note}" if note else "")


def timings(torch, api, config, quick, budget, copy_gbps, shapes=None, device="cuda"):
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 1
    shapes = shapes or (SHAPES[:1] if quick else SHAPES)
    rows = []
    for tname in ("bfloat16", "float32"):
        dtype = getattr(torch, tname)
        provs = providers(torch, api, config, tname, budget, sm_count)
        for shape in shapes:
            if elapsed() > budget:
                log(f"time budget spent: skipping {shape} {tname}")
                rows.append({"shape": list(shape), "dtype": tname, "skipped": "time budget"})
                continue
            n, v = shape
            try:
                x = (torch.randn(shape, device=device) * 2).to(dtype)
                t = torch.randint(0, v, (n,), device=device)
                t[::10] = -100
            except Exception as e:
                rows.append({"shape": list(shape), "dtype": tname, "error": repr(e)})
                continue
            nbytes = x.numel() * x.element_size()
            try:
                choice = fused_choice(api, x, t)
            except Exception as e:
                choice = f"error: {e!r}"
            log(f"{tname:8s} {str(shape):15s} default fused kernel: {choice}")
            rows.append({"shape": list(shape), "dtype": tname, "fused_kernel": choice})
            eager = {}
            for pas, idx, moved in (("fwd", 0, nbytes), ("fwd+bwd", 1, 2 * nbytes)):
                for name, fns in provs.items():
                    factory = fns[idx]
                    if factory is None:
                        continue
                    row = {"shape": list(shape), "dtype": tname, "pass": pas, "provider": name}
                    try:
                        xi = x.clone() if "inplace" in name else x
                        fn = factory(xi, t)
                        ms = cuda_median_ms(torch, fn, reps=5 if quick else 10, warmup=3)
                        gbps = moved / (ms * 1e-3) / 1e9
                        row.update(median_ms=ms, gbps=gbps, frac_copy=gbps / copy_gbps)
                        if name == "torch eager":
                            eager[pas] = ms
                        del fn, xi
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    rows.append(row)
                    if "median_ms" in row:
                        log(f"{tname:8s} {str(shape):15s} {pas:7s} {name:26s} {row['median_ms']:8.3f} ms "
                            f"{row['gbps']:7.0f} GB/s {100 * row['frac_copy']:5.1f}% of copy")
                    else:
                        log(f"{tname:8s} {str(shape):15s} {pas:7s} {name:26s} {row['error']}")
                    torch.cuda.empty_cache()
            for row in rows:
                if row.get("shape") == list(shape) and row.get("dtype") == tname and "median_ms" in row:
                    e = eager.get(row["pass"])
                    if e:
                        row["speedup_vs_eager"] = e / row["median_ms"]
            del x, t
            torch.cuda.empty_cache()
    return rows


def print_table(rows, copy_gbps):
    log(f"device-to-device copy bandwidth: {copy_gbps:.0f} GB/s")
    head = (f"{'dtype':8s} {'shape':15s} {'pass':7s} {'provider':26s} {'ms':>8s} {'GB/s':>7s} "
            f"{'%copy':>6s} {'x eager':>8s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "median_ms" not in r:
            continue
        sp = r.get("speedup_vs_eager")
        print(f"{r['dtype']:8s} {str(tuple(r['shape'])):15s} {r['pass']:7s} {r['provider']:26s} "
              f"{r['median_ms']:8.3f} {r['gbps']:7.0f} {100 * r['frac_copy']:5.1f}% "
              f"{(f'{sp:.2f}x' if sp else '-'):>8s}")
    sys.stdout.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write all results to this JSON file")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--budget", type=float, default=200.0,
                    help="seconds after which slow parts are skipped (default 200)")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-timings", action="store_true")
    args = ap.parse_args(argv)

    result = {"argv": sys.argv[1:], "correctness": [], "timings": [], "errors": []}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=str)

    try:
        import torch

        import fastloss as api
        import fastloss.config as config
        from fastloss.cuda import cuda_available, simulator_enabled
        if not torch.cuda.is_available():
            log("PyTorch sees no CUDA device")
            result["errors"].append("no CUDA device")
            return 2
        if not cuda_available() or simulator_enabled():
            log("numba-cuda cannot use the GPU (or the simulator is on)")
            result["errors"].append("numba-cuda unusable")
            return 2
        props = torch.cuda.get_device_properties(0)
        result["device"] = {"name": props.name, "sms": props.multi_processor_count,
                            "memory_gb": props.total_memory / 1e9, "torch": torch.__version__}
        try:
            import numba_cuda
            result["device"]["numba_cuda"] = numba_cuda.__version__
        except Exception:
            pass
        log(f"device: {result['device']}")
        if not args.skip_correctness:
            result["correctness"] = correctness(torch, api, args.quick)
            bad = [r["check"] for r in result["correctness"] if not r["ok"]]
            log(f"correctness: {len(result['correctness']) - len(bad)} passed, {len(bad)} failed")
            save()
        if not args.skip_timings:
            try:
                copy_gbps = copy_bandwidth(torch)
            except Exception as e:
                result["errors"].append(f"copy bandwidth: {e!r}")
                copy_gbps = float("nan")
            result["copy_gbps"] = copy_gbps
            log(f"device-to-device copy bandwidth: {copy_gbps:.0f} GB/s")
            try:
                result["host_us_per_call"] = host_overhead_us(torch, api)
            except Exception as e:
                result["errors"].append(f"host overhead: {e!r}")
            save()
            result["timings"] = timings(torch, api, config, args.quick, args.budget, copy_gbps)
            print_table(result["timings"], copy_gbps)
        result["elapsed_s"] = elapsed()
        log("done")
        failed = any(not r["ok"] for r in result["correctness"])
        return 1 if failed else 0
    except Exception as e:
        result["errors"].append(traceback.format_exc())
        log(f"fatal: {e!r}")
        traceback.print_exc()
        return 3
    finally:
        result["elapsed_s"] = elapsed()
        save()


if __name__ == "__main__":
    sys.exit(main())
