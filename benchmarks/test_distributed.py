"""Distributed evaluation on Dask: scaling on this machine and the cost of a task.

* ``test_dist_throughput``: the 4.3 GB float32 dump of ``test_eval_stream.py``
  (32768 tokens x 32768 classes; ``--bench-quick``: 4096 tokens) evaluated
  in-process (numba on the session's threads), on a ``LocalCluster`` of 1 worker
  process (one task thread, numba on all the threads) and of 2 worker processes
  (one task thread and one numba thread each). Rounds of the three alternate;
  tokens/s from the minimum. Each worker's peak RSS (VmHWM, reset after warm-up)
  is read through ``client.run`` after the timed rounds.
* ``test_dist_task_overhead``: the Dask round trip of a task (a tiny dump split
  into 1-row tasks, per-task time against one task), the pickled size of a
  partial (``Totals`` of a 1 GiB task: 8192 tokens of a 32768-class float32 dump,
  4096 of a 128256-class bfloat16 one; and 50000 tokens, a task of a 1B-token dump
  split into ``EVAL_MAX_TASKS``; with 2048 positions) and the time to merge one
  into the running totals.

Nothing is asserted. Run::

    python -m pytest benchmarks/test_distributed.py --benchmark-only -s
"""

import os
import pickle
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
    from test_eval_large import FREE_NEEDED, write_dump

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def dump(request):
    parent = os.environ.get("FASTLOSS_LARGE_DUMP_DIR") or tempfile.gettempdir()
    if shutil.disk_usage(parent).free < FREE_NEEDED:
        pytest.skip(f"{parent}: less than 10 GB free")
    tokens = 4096 if request.config.getoption("--bench-quick") else 32768
    folder = tempfile.mkdtemp(prefix="fastloss-bench-dist-", dir=parent)
    try:
        logits, targets, _, _ = write_dump(folder, tokens=tokens)
        yield {"logits": logits, "targets": targets, "bytes": os.path.getsize(logits), "tokens": tokens}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _status():
    with open("/proc/self/status") as f:
        d = dict(line.split(":", 1) for line in f)
    return {k: int(d[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _cluster(n):
    cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                       dashboard_address=":0")
    return cluster, distributed.Client(cluster)


def test_dist_throughput(benchmark, dump, say, request):
    import fastloss

    args = (dump["logits"], dump["targets"])
    ref = fastloss.evaluate(*args)
    setups = {"in-process": (None, None)}
    for n in (1, 2):
        setups[f"{n} worker(s)"] = _cluster(n)
    times = {k: [] for k in setups}
    try:
        for _name, (_, client) in setups.items():  # warm-up: kernels loaded in every worker
            r = fastloss.evaluate(*args, client=client)
            assert r.to_dict() == ref.to_dict()
        for _, client in setups.values():
            if client is not None:
                client.run(_reset_peak)
        rounds = request.config.getoption("--bench-rounds")

        def one_round():
            for name, (_, client) in setups.items():
                t0 = time.perf_counter()
                fastloss.evaluate(*args, client=client)
                times[name].append(time.perf_counter() - t0)

        benchmark.group = "dist-throughput"
        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
        rss = {name: client.run(_status) for name, (_, client) in setups.items() if client is not None}
    finally:
        for cluster, client in setups.values():
            if client is not None:
                client.close()
                cluster.close()
    base = min(times["in-process"])
    lines = [f"\ndist-throughput: {dump['bytes'] / 1e9:.2f} GB float32 dump, {dump['tokens']} tokens; "
             f"min of {len(times['in-process'])} alternating rounds; load {os.getloadavg()[0]:.1f}"]
    for name, ts in times.items():
        t = min(ts)
        line = (f"  {name:<12} {t:6.2f} s  {dump['tokens'] / t:9.0f} tok/s  {dump['bytes'] / t / 1e9:5.2f} GB/s"
                f"  {base / t:4.2f}x in-process")
        if name in rss:
            line += "  worker RSS now/peak MB: " + ", ".join(
                f"{v['VmRSS'] / 1e6:.0f}/{v['VmHWM'] / 1e6:.0f}" for v in rss[name].values())
        lines.append(line)
    benchmark.extra_info.update(times=times, rss=rss)
    say("\n".join(lines))


def _partial(nclass, tokens, seq_len):
    """The Totals of one task of ``tokens`` rows: per-token values drawn at random (the
    size and merge time depend on the counts, not on the values), targets uniform over
    the vocabulary (the most distinct classes, the largest sparse unigram part)."""
    from fastloss.evaluation import metrics as M

    rng = np.random.default_rng(tokens)
    tot = M.Totals(nclass, np.linspace(0, 2 * np.log(nclass), 41), seq_len)
    loss = rng.gamma(2.0, 1.5, tokens)
    tot.add(rng.integers(0, nclass, tokens), loss, rng.uniform(0, 5, tokens), rng.uniform(0, 1, tokens),
            rng.integers(0, 10, tokens), np.ones(tokens, bool), np.arange(tokens) % seq_len)
    return tot


def test_dist_task_overhead(benchmark, dump, say):
    import fastloss

    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 64), dtype=np.float32)
    t = rng.integers(0, 64, 400)
    cluster, client = _cluster(2)
    try:
        fastloss.evaluate(x, t, client=client, task_tokens=400)  # warm-up
        one, many = [], []

        def run():
            t0 = time.perf_counter()
            fastloss.evaluate(x, t, client=client, task_tokens=400)
            one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fastloss.evaluate(x, t, client=client, task_tokens=1, chunk_tokens=1)
            many.append(time.perf_counter() - t0)

        benchmark.group = "dist-overhead"
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    finally:
        client.close()
        cluster.close()
    per_task = (min(many) - min(one)) / (x.shape[0] - 1)
    lines = [f"\ndist-overhead: {per_task * 1e3:.2f} ms per task on 2 local workers "
             f"(400 one-row tasks {min(many):.2f} s against one task {min(one):.3f} s)"]
    info = {"per_task_s": per_task}
    # 1 GiB tasks of float32 V 32768 / bfloat16 V 128256 logits, and the largest tasks of
    # a 1B-token dump capped at EVAL_MAX_TASKS (50000 tokens)
    for nclass, tokens in ((32768, 8192), (128256, 4096), (128256, 50000)):
        part = _partial(nclass, tokens, 2048)
        size = len(pickle.dumps(part))
        total = _partial(nclass, tokens, 2048)
        reps = 50
        t0 = time.perf_counter()
        for _ in range(reps):
            total.merge(pickle.loads(pickle.dumps(part)))
        merge = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            total.merge(part)
        merge_only = (time.perf_counter() - t0) / reps
        lines.append(f"  partial of {tokens} tokens, V {nclass}, seq_len 2048: {size / 1e3:.1f} kB pickled; "
                     f"pickle round trip + merge {merge * 1e3:.2f} ms (merge alone {merge_only * 1e3:.2f} ms)")
        info[f"partial_bytes_{nclass}_{tokens}"] = size
        info[f"merge_s_{nclass}_{tokens}"] = merge
    benchmark.extra_info.update(info)
    say("\n".join(lines))
