"""``fastloss.compare`` on two dumps from the page cache, against just reading both files.

The target (issue 16): comparing two logits dumps runs at >= 70% of the speed of
reading both files. This suite writes two float32 dumps of
``FASTLOSS_COMPARE_DUMP_GB`` GB each (default 2; ``--bench-quick``: 0.25) with
32768 classes, in blocks (never held in memory; ``tests/test_eval_large.write_dump``,
the base with seed 0 and the model with seed 1) to a temporary folder
(``FASTLOSS_LARGE_DUMP_DIR``, default the system temporary folder; skipped
without room for both plus 1 GB), reads them once into the page cache, then
measures, alternating round by round so both see the same machine:

* ``read``: each file read through a memory map in 64 MiB slices, each slice
  summed by numpy (one thread; the "memmap sum over both" of the issue), and
  ``readinto`` a reused 64 MiB buffer (one thread; plain copying reads), both
  files one after the other; the faster of the two is the reference;
* ``compare``: ``fastloss.compare(base.npy, model.npy, targets.npy)``.

The ratio reported is min(read time) / min(compare time) over the rounds.
Nothing is asserted. Run::

    python -m pytest benchmarks/test_compare.py --benchmark-only
    FASTLOSS_COMPARE_DUMP_GB=1 python -m pytest benchmarks/test_compare.py --benchmark-only
"""

import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from test_eval_large import VOCAB, write_dump

#: Size of each dump (GB) unless FASTLOSS_COMPARE_DUMP_GB says otherwise.
DEFAULT_GB = 2.0
QUICK_GB = 0.25
SLICE = 64 * 2**20


def memmap_sum(path):
    """Sum the float32 payload of a .npy file through a memory map, 64 MiB at a time."""
    m = np.load(path, mmap_mode="r")
    flat = m.reshape(-1)
    step = SLICE // flat.itemsize
    total = 0.0
    for lo in range(0, flat.size, step):
        total += float(flat[lo:lo + step].sum())
    return total


def readinto_all(path, buf):
    """Read the whole file into a reused buffer; returns the bytes read."""
    total = 0
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            total += k
    return total


@pytest.fixture(scope="module")
def dumps(request):
    gb = QUICK_GB if request.config.getoption("--bench-quick") else \
        float(os.environ.get("FASTLOSS_COMPARE_DUMP_GB", DEFAULT_GB))
    tokens = max(256, int(gb * 1e9 / (VOCAB * 4)) // 256 * 256)
    parent = os.environ.get("FASTLOSS_LARGE_DUMP_DIR") or tempfile.gettempdir()
    need = 2 * tokens * VOCAB * 4 + 10**9
    free = shutil.disk_usage(parent).free
    if free < need:
        pytest.skip(f"{parent}: {free / 1e9:.1f} GB free, the compare benchmark wants {need / 1e9:.1f}")
    folder = tempfile.mkdtemp(prefix="fastloss-bench-compare-", dir=parent)
    try:
        os.mkdir(os.path.join(folder, "base"))
        os.mkdir(os.path.join(folder, "model"))
        base, targets, _, _ = write_dump(os.path.join(folder, "base"), tokens=tokens, seed=0)
        model, _, _, _ = write_dump(os.path.join(folder, "model"), tokens=tokens, seed=1)
        buf = bytearray(SLICE)
        for p in (base, model):
            readinto_all(p, buf)  # into the page cache
        yield {"base": base, "model": model, "targets": targets,
               "bytes": os.path.getsize(base) + os.path.getsize(model), "tokens": tokens}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_compare_stream(benchmark, dumps, say, request):
    import fastloss

    size = dumps["bytes"]
    buf = bytearray(SLICE)
    sums, copies = [], []

    def timed_reads():
        t0 = time.perf_counter()
        for p in (dumps["base"], dumps["model"]):
            memmap_sum(p)
        t1 = time.perf_counter()
        for p in (dumps["base"], dumps["model"]):
            readinto_all(p, buf)
        t2 = time.perf_counter()
        sums.append(t1 - t0)
        copies.append(t2 - t1)

    args = (dumps["base"], dumps["model"], dumps["targets"])
    fastloss.compare(*args)  # kernels compiled or loaded
    benchmark.group = "compare-stream"
    rounds = request.config.getoption("--bench-rounds")
    report = benchmark.pedantic(fastloss.compare, args=args, setup=timed_reads, rounds=rounds,
                                iterations=1, warmup_rounds=0)
    assert report.tokens > 0
    if benchmark.disabled or benchmark.stats is None:
        return
    runs = list(benchmark.stats.stats.data)
    read = min(min(sums), min(copies))
    info = {"bytes": size, "tokens": dumps["tokens"], "memmap_sum_gbps": size / min(sums) / 1e9,
            "readinto_gbps": size / min(copies) / 1e9, "compare_gbps": size / min(runs) / 1e9,
            "ratio": read / min(runs), "memmap_sum_s": sums, "readinto_s": copies,
            "compare_s": runs, "loadavg": os.getloadavg()}
    benchmark.extra_info.update(info)
    say(f"\ncompare-stream: 2 x {size / 2e9:.2f} GB dumps: memmap sum "
                  f"{info['memmap_sum_gbps']:.2f} GB/s, readinto {info['readinto_gbps']:.2f} GB/s, "
                  f"compare {info['compare_gbps']:.2f} GB/s, ratio to the faster read "
                  f"{info['ratio']:.2f} (target >= 0.70); min of {len(runs)} alternating rounds; "
                  f"load average {' '.join(f'{x:.2f}' for x in info['loadavg'])}")
