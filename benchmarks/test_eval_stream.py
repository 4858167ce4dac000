"""Streaming evaluation of a dump larger than memory, against a plain read of the file.

The target (issue): a float32 logits dump of at least 4 GB evaluates with a peak
RSS under 600 MB, at >= 70% of the speed of a plain sequential read of the same
file from the page cache. This suite writes such a dump (32768 tokens x 32768
classes, 4.3 GB; ``--bench-quick``: 4096 tokens, 0.5 GB) in chunks to a
temporary folder (``FASTLOSS_LARGE_DUMP_DIR``, default the system temporary
folder; skipped with less than 10 GB free there), reads it once to put it in
the page cache, then measures

* ``plain-read``: ``readinto`` a reused 64 MiB buffer from the start of the file
  to its end (one thread; what any reader of the file pays);
* ``evaluate``: ``fastloss.evaluate(logits.npy, targets.npy)``;
* ``peak-rss``: the same evaluation in a fresh process: its peak RSS (VmHWM,
  reset after warm-up) and that of a process that only imported fastloss and
  evaluated a tiny dump (the baseline).

Each timed round of ``evaluate`` is preceded (untimed, in pytest-benchmark's
``setup``) by one timed plain read, so the two alternate and see the same
machine; the ratio reported is min(read time) / min(evaluate time) over the
rounds. Nothing is asserted. Results go to ``extra_info`` and to one summary
line per test on the terminal. Run::

    python -m pytest benchmarks/test_eval_stream.py --benchmark-only
"""

import os
import shutil
import sys
import tempfile
import time
import warnings

import pytest

# The dump writer and the RSS measurement come from the test suite (its slow test
# asserts the RSS bound); its ``slow`` mark is not registered in this folder.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from test_eval_large import FREE_NEEDED, measure_in_child, write_dump

READ_BUFFER = 64 * 2**20


def plain_read(path, buf):
    """Read the whole file with ``readinto`` a reused buffer; returns the bytes read."""
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                return total
            total += k


@pytest.fixture(scope="module")
def dump(request):
    parent = os.environ.get("FASTLOSS_LARGE_DUMP_DIR") or tempfile.gettempdir()
    free = shutil.disk_usage(parent).free
    if free < FREE_NEEDED:
        pytest.skip(f"{parent}: {free / 1e9:.1f} GB free, the dump benchmark wants 10 GB")
    tokens = 4096 if request.config.getoption("--bench-quick") else 32768
    folder = tempfile.mkdtemp(prefix="fastloss-bench-dump-", dir=parent)
    try:
        t0 = time.perf_counter()
        logits, targets, _, _ = write_dump(folder, tokens=tokens)
        written = time.perf_counter() - t0
        size = os.path.getsize(logits)
        plain_read(logits, bytearray(READ_BUFFER))  # into the page cache
        yield {"folder": folder, "logits": logits, "targets": targets, "bytes": size,
               "write_s": written}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_eval_stream(benchmark, dump, say, request):
    import fastloss

    size = dump["bytes"]
    buf = bytearray(READ_BUFFER)
    reads = []

    def timed_read():
        t0 = time.perf_counter()
        assert plain_read(dump["logits"], buf) == size
        reads.append(time.perf_counter() - t0)

    fastloss.evaluate(dump["logits"], dump["targets"])  # kernels compiled or loaded
    benchmark.group = "eval-stream"
    rounds = request.config.getoption("--bench-rounds")
    report = benchmark.pedantic(fastloss.evaluate, args=(dump["logits"], dump["targets"]),
                                setup=timed_read, rounds=rounds, iterations=1, warmup_rounds=0)
    assert report.tokens > 0
    if benchmark.disabled or benchmark.stats is None:
        return
    evals = list(benchmark.stats.stats.data)
    read_gbps = size / min(reads) / 1e9
    eval_gbps = size / min(evals) / 1e9
    info = {"bytes": size, "read_gbps": read_gbps, "eval_gbps": eval_gbps,
            "ratio": eval_gbps / read_gbps, "read_s": reads, "eval_s": evals,
            "write_s": dump["write_s"], "loadavg": os.getloadavg()}
    benchmark.extra_info.update(info)
    say(f"\neval-stream: {size / 1e9:.2f} GB dump: plain read {read_gbps:.2f} GB/s, "
                  f"evaluate {eval_gbps:.2f} GB/s, ratio {info['ratio']:.2f} (target >= 0.70); "
                  f"min of {len(evals)} alternating rounds; load average "
                  f"{' '.join(f'{x:.2f}' for x in info['loadavg'])}")


def test_eval_stream_peak_rss(benchmark, dump, say):
    got = {}

    def run():
        got.update(measure_in_child(dump["folder"], dump["logits"], dump["targets"]))

    benchmark.group = "eval-stream-rss"
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    extra = got["peak_rss"] - got["baseline_rss"]
    benchmark.extra_info.update(got, extra_rss=extra)
    say(f"\neval-stream: peak RSS {got['peak_rss'] / 1e6:.0f} MB = baseline "
                  f"{got['baseline_rss'] / 1e6:.0f} MB (imported, kernels loaded) + "
                  f"{extra / 1e6:.0f} MB (target < 600 MB); in that process "
                  f"{dump['bytes'] / got['seconds'] / 1e9:.2f} GB/s")
