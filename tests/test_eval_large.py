"""Streaming a dump far larger than the memory it may use (slow: ~15 s, 4.3 GB on disk).

A float32 logits file of 32768 tokens x 32768 classes (4.3 GB) is written in
chunks to a temporary folder (``FASTLOSS_LARGE_DUMP_DIR``, default the system
temporary folder; skipped with less than 10 GB free there) and evaluated in a
fresh process. Its peak resident memory beyond a process that only imported
fastloss and ran the kernels on a tiny dump must stay under 600 MB. The speed of
the same evaluation (against a plain read of the file) is measured, not asserted,
by benchmarks/test_eval_stream.py, which imports ``write_dump`` and
``measure_in_child`` from here.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status"),
]

TOKENS = VOCAB = 32768
POOL_ROWS = 256
RSS_LIMIT = 600 * 10**6
FREE_NEEDED = 10 * 10**9
IGNORE = -100

#: Run in a fresh interpreter: warm up on a tiny dump of the same dtype (so the
#: cached kernel for read-only float32 rows is loaded), reset the peak RSS
#: (``5 > /proc/self/clear_refs``), evaluate the large dump, print the numbers.
CHILD = r"""
import json, sys, time
import fastloss

def status():
    with open("/proc/self/status") as f:
        d = dict(line.split(":", 1) for line in f)
    return {k: int(d[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

small, small_t, big, big_t = sys.argv[1:5]
fastloss.evaluate(small, small_t)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
base = status()
t0 = time.perf_counter()
r = fastloss.evaluate(big, big_t)
seconds = time.perf_counter() - t0
end = status()
print(json.dumps({"baseline_rss": base["VmRSS"], "baseline_hwm": base["VmHWM"],
                  "peak_rss": end["VmHWM"], "peak_reset": reset, "seconds": seconds,
                  "tokens": r.tokens, "ignored": r.ignored, "mean_loss": r.mean_loss}))
"""


def write_dump(folder, tokens=TOKENS, vocab=VOCAB, seed=0, pool_rows=POOL_ROWS):
    """Write ``logits.npy`` (tokens, vocab) float32 and ``targets.npy`` into ``folder``
    in blocks of ``pool_rows`` rows, never holding the logits in memory. Block ``k``
    is a random pool of rows plus ``k``: no two pages of the file are alike (so no
    memory layer can share them and serve the whole file from a few cached
    pages), yet each row's loss is that of its pool row, since the pool holds
    multiples of 2^-10 below 2^13 in magnitude, so pool + k is exact in float32.
    Returns (logits path, targets path, pool, targets)."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((pool_rows, vocab), dtype=np.float32) * np.float32(2.5)
    pool += rng.standard_normal(vocab, dtype=np.float32)  # shared per-class offsets
    pool = np.round(pool * np.float32(1024)) / np.float32(1024)
    targets = rng.integers(0, vocab, tokens)
    targets[rng.random(tokens) < 0.05] = IGNORE
    logits_path = os.path.join(folder, "logits.npy")
    targets_path = os.path.join(folder, "targets.npy")
    np.save(targets_path, targets)
    header = {"descr": np.lib.format.dtype_to_descr(pool.dtype), "fortran_order": False,
              "shape": (tokens, vocab)}
    block = np.empty_like(pool)
    with open(logits_path, "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
        for k, lo in enumerate(range(0, tokens, pool_rows)):
            np.add(pool, np.float32(k), out=block)
            f.write(memoryview(block[:min(pool_rows, tokens - lo)]).cast("B"))
    return logits_path, targets_path, pool, targets


def measure_in_child(folder, logits_path, targets_path):
    """The CHILD's numbers (dict) for one evaluation of the dump."""
    small = np.random.default_rng(1).standard_normal((8, 64), dtype=np.float32)
    np.save(os.path.join(folder, "small.npy"), small)
    np.save(os.path.join(folder, "small_t.npy"), np.arange(8))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, os.path.join(folder, "small.npy"),
         os.path.join(folder, "small_t.npy"), logits_path, targets_path],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def dump_dir():
    parent = os.environ.get("FASTLOSS_LARGE_DUMP_DIR") or tempfile.gettempdir()
    free = shutil.disk_usage(parent).free
    if free < FREE_NEEDED:
        pytest.skip(f"{parent}: {free / 1e9:.1f} GB free, the 4.3 GB dump test wants 10 GB")
    folder = tempfile.mkdtemp(prefix="fastloss-large-dump-", dir=parent)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_large_dump_peak_rss_and_result(dump_dir):
    from scipy.special import logsumexp

    logits_path, targets_path, pool, targets = write_dump(dump_dir)
    assert os.path.getsize(logits_path) > 4 * 10**9
    got = measure_in_child(dump_dir, logits_path, targets_path)
    extra = got["peak_rss"] - got["baseline_rss"]
    print(f"\npeak RSS {got['peak_rss'] / 1e6:.0f} MB, baseline {got['baseline_rss'] / 1e6:.0f} MB, "
          f"extra {extra / 1e6:.0f} MB; {os.path.getsize(logits_path) / got['seconds'] / 1e9:.2f} GB/s")
    assert extra < RSS_LIMIT, got
    # The result, against float64 numpy: row i is pool row i % POOL_ROWS plus a constant.
    lse = logsumexp(pool.astype(np.float64), axis=1)
    keep = targets != IGNORE
    rows = np.arange(TOKENS)[keep] % POOL_ROWS
    loss = lse[rows] - pool[rows, targets[keep]].astype(np.float64)
    assert got["tokens"] == int(keep.sum()) and got["ignored"] == int((~keep).sum())
    assert got["mean_loss"] == pytest.approx(loss.mean(), rel=1e-9)
