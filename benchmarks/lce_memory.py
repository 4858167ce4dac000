"""Peak memory of fused linear cross-entropy (loss + all gradients), beyond inputs and outputs.

Each provider runs in a fresh process: inputs are made, one warm-up call is done
(JIT load, torch's allocator warm), the kernel's high-water mark is reset
(``/proc/self/clear_refs``, Linux) and one timed call is measured:

* RSS: ``VmHWM - VmRSS`` around the call (resident high-water mark), minus the
  outputs the call returns;
* tracemalloc (fastloss only: numpy allocations; torch's allocator is invisible to it).

Usage::

    python benchmarks/lce_memory.py [N D V] [--threads 2] [--providers fastloss torch torch-lce]

Prints one line per provider with the peak in MB and as a fraction of the
``N x V`` float32 logits. Nothing is asserted here; ``tests/test_linear_cross_entropy.py``
asserts the fastloss budget.
"""

import argparse
import json
import subprocess
import sys

PROVIDERS = ("fastloss", "torch", "torch-lce")

_CHILD = r"""
import json, os, sys, time, tracemalloc
import numpy as np
provider, n, d, v, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0

def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

rng = np.random.default_rng(0)
h = rng.standard_normal((n, d), dtype=np.float32)
w = rng.standard_normal((v, d), dtype=np.float32) * np.float32(0.03)
t = rng.integers(0, v, n)
if provider == "fastloss":
    import fastloss
    fastloss.set_num_threads(threads)
    def call():
        r = fastloss.linear_cross_entropy_with_grad(h, w, t)
        return r, r.grad_hidden.nbytes + r.grad_weight.nbytes
else:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    th, tw, tt = torch.from_numpy(h), torch.from_numpy(w), torch.from_numpy(t)
    if provider == "torch-lce" and not hasattr(F, "linear_cross_entropy"):
        print(json.dumps({"provider": provider, "status": "unavailable"})); sys.exit(0)
    def call():
        x = th.detach().requires_grad_(); W = tw.detach().requires_grad_()
        loss = F.linear_cross_entropy(x, W, tt) if provider == "torch-lce" else F.cross_entropy(F.linear(x, W), tt)
        loss.backward()
        return (loss, x.grad, W.grad), x.grad.numel() * 4 + W.grad.numel() * 4
out = call()
del out
ok = reset_hwm()
base = status("VmRSS")
t0 = time.perf_counter()
if provider == "fastloss":
    tracemalloc.start(); tracemalloc.reset_peak(); tb = tracemalloc.get_traced_memory()[0]
res, out_bytes = call()
elapsed = time.perf_counter() - t0
traced = None
if provider == "fastloss":
    traced = tracemalloc.get_traced_memory()[1] - tb - out_bytes
    tracemalloc.stop()
peak = status("VmHWM") - base - out_bytes
print(json.dumps({"provider": provider, "status": "ok" if ok else "no-hwm-reset",
                  "rss_extra": peak, "traced_extra": traced, "seconds": elapsed}))
"""


def measure(provider, n, d, v, threads):
    proc = subprocess.run([sys.executable, "-c", _CHILD, provider, str(n), str(d), str(v), str(threads)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"provider": provider, "status": "error", "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", nargs="*", type=int, default=[4096, 1024, 128256], metavar="N D V")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    n, d, v = args.shape
    logits = n * v * 4
    rows = []
    print(f"linear cross-entropy fwd+bwd, N={n} D={d} V={v} float32; logits would be {logits / 1e6:.0f} MB")
    for p in args.providers:
        r = measure(p, n, d, v, args.threads)
        rows.append(r)
        if r.get("status") in ("ok", "no-hwm-reset"):
            traced = "" if r["traced_extra"] is None else \
                f"  tracemalloc {r['traced_extra'] / 1e6:7.1f} MB ({r['traced_extra'] / logits:.1%})"
            print(f"{p:10s} RSS peak beyond inputs/outputs {r['rss_extra'] / 1e6:8.1f} MB "
                  f"({r['rss_extra'] / logits:6.1%} of logits){traced}  [{r['seconds']:.1f} s]")
        else:
            print(f"{p:10s} {r.get('status')} {r.get('error', '')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": [n, d, v], "logits_bytes": logits, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
