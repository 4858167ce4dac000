"""Distributed evaluation: ``fastloss.evaluate(..., client=)`` on a Dask cluster against
the in-process run, a worker killed mid-run, shards that fail to read under
``on_invalid="skip"``, vocabulary-sharded dumps (``vocab_shards=``), the ``fastloss
eval --scheduler / --workers / --vocab-shards`` command line, bad arguments, and the
partials (``metrics.Totals``) that travel back from the workers.

The distributed report equals the in-process one exactly (``==`` on every entry of
``to_dict()``): both run the same tasks and merge the partials in task order, except
where a float32 LM-head product runs on other BLAS thread counts (its rounding depends
on them). A vocabulary-sharded dump is compared with the unsharded one at a tolerance
(other arithmetic); each test states its own.

One module-scoped cluster of two worker processes (one thread each) serves most
tests; the worker-kill tests start their own, and the skip tests a threads-only one
(so that a patched reader reaches the workers).

The kill, BLAS-limit and vocabulary-skip tests pinned down bugs of the first version
of the runners (scattered job data lost with a worker, a process-wide BLAS limit reset
by concurrent tasks, a failed file dropped per task); they pass since the fixes.
"""

import errno
import json
import math
import os
import pickle
import signal
import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest
from scipy.special import logsumexp
from test_eval_inputs import write_safetensors  # the hand-written .safetensors layout

import fastloss
from fastloss.cli import main
from fastloss.evaluation import EvalInputError
from fastloss.evaluation import readers as R
from fastloss.evaluation.metrics import Totals

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

IGNORE = -100
BF16 = np.dtype(ml_dtypes.bfloat16)

#: Entries of ``to_dict()`` that name inputs (they differ between a vocabulary-sharded
#: and an unsharded dump, or a dump with and without a skipped shard).
FILE_KEYS = ("logits_files", "targets_files", "hidden_files", "lm_head_file", "bias_file",
             "vocab_shards", "skipped_files", "warnings")


#: The worker-kill tests send SIGKILL and read /proc.
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL and /proc: Linux only")


# ---- helpers ------------------------------------------------------------------------

def _assert_same(a, b, skip=()):
    """Two reports agree exactly on every entry of ``to_dict()`` except ``skip``."""
    da, db = a.to_dict(), b.to_dict()
    assert da.keys() == db.keys()
    for key in da:
        if key not in skip:
            assert da[key] == db[key], key


def _assert_close(a, b, rel, where=""):
    """Nested report entries equal: floats to ``rel`` relative (and absolute, near 0),
    everything else (counts, None, strings) exactly."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], rel, f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, rel, f"{where}[{k}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, float) and isinstance(b, float), (where, a, b)
        assert a == pytest.approx(b, rel=rel, abs=rel), where
    else:
        assert a == b, where


def _report_close(a, b, rel):
    """Every number of two reports agrees (``rel`` on floats, exact on counts); file lists aside."""
    da = {k: v for k, v in a.to_dict().items() if k not in FILE_KEYS}
    db = {k: v for k, v in b.to_dict().items() if k not in FILE_KEYS}
    _assert_close(da, db, rel)


def _ref_mean_loss(x64, tgt):
    """float64 mean cross-entropy over the counted tokens (scipy)."""
    keep = tgt != IGNORE
    xs, ts = x64[keep], tgt[keep]
    return float(np.mean(logsumexp(xs, axis=1) - xs[np.arange(ts.size), ts]))


def _shifted(ids, seq_len):
    """Targets of ``shift=True``: the next token id within each sequence, else ignored."""
    t = np.full(ids.size, IGNORE, np.int64)
    t[:-1] = ids[1:]
    t[np.arange(ids.size) % seq_len == seq_len - 1] = IGNORE
    return t


def _logits(rng, n, v, dtype=np.float32):
    """Peaked random logits (a per-class offset, so the unigram and top-k are not flat)."""
    return (rng.standard_normal((n, v)) * 2.0 + rng.standard_normal(v) * 1.5).astype(dtype)


def _targets(rng, n, v, frac_ignored=0.15):
    t = rng.integers(0, v, n)
    t[rng.random(n) < frac_ignored] = IGNORE
    return t


def _save_split(d, stem, arr, sizes, fmt="npy"):
    """``arr`` split along rows into files ``stem-1``, ``stem-2``, ... of ``sizes`` rows."""
    assert sum(sizes) == arr.shape[0]
    paths, lo = [], 0
    for k, n in enumerate(sizes, 1):
        part = np.ascontiguousarray(arr[lo:lo + n])
        p = d / f"{stem}-{k}.{fmt}"
        if fmt == "npy":
            np.save(p, part)
        else:
            write_safetensors(p, {stem.split("-")[0]: part})
        paths.append(str(p))
        lo += n
    return paths


def _run_tasks(stream, name="run_task"):
    """(count of the tasks of function ``name``, workers that ran them) in a
    ``get_task_stream`` record."""
    rows = [r for r in stream.data if str(r["key"]).startswith(name)]
    return len(rows), {r["worker"] for r in rows}


# ---- fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    """A cluster of two worker processes of one thread each (closed at teardown)."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0")
    try:
        c = distributed.Client(cluster)
        try:
            yield c
        finally:
            c.close()
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """Dumps on disk (made once): the arrays and the files of each case of
    :func:`test_distributed_equals_in_process`."""
    rng = np.random.default_rng(20261203)
    d = tmp_path_factory.mktemp("dumps")
    out = {}

    # float32 .npy logits in shards of uneven sizes (one of a single row), targets in
    # shards of other boundaries, ~15% ignored
    n, v = 2100, 1000
    x, t = _logits(rng, n, v), _targets(rng, n, v)
    out["f32"] = dict(x64=x.astype(np.float64), tgt=t, kw=dict(
        logits=_save_split(d, "logits-f32", x, [700, 1, 523, 876]),
        targets=_save_split(d, "targets-f32", t, [1000, 1100])))

    # bfloat16 .safetensors logits; the targets are token ids (shift=True, seq_len=30),
    # some of them ignore_index
    n, v, seq = 2100, 700, 30
    x = _logits(rng, n, v, BF16)
    ids = rng.integers(0, v, n)
    ids[rng.random(n) < 0.1] = IGNORE
    out["bf16-shift"] = dict(x64=x.astype(np.float64), tgt=_shifted(ids, seq), kw=dict(
        logits=_save_split(d, "logits-bf16", x, [1, 999, 600, 500], fmt="safetensors"),
        targets=_save_split(d, "targets-ids", ids, [2100]), seq_len=seq, shift=True))

    # in-memory float16 logits and targets (the arrays travel to the workers with the job)
    n, v = 1200, 400
    x, t = _logits(rng, n, v, np.float16), _targets(rng, n, v)
    out["f16-arrays"] = dict(x64=x.astype(np.float64), tgt=t, kw=dict(logits=x, targets=t))

    # hidden states through an LM head and bias, all from .npy files; histogram range
    # and a training loss given
    n, dim, v = 1500, 48, 600
    h = rng.standard_normal((n, dim)).astype(np.float32)
    w = (rng.standard_normal((v, dim)) * 0.4).astype(np.float32)
    b = rng.standard_normal(v).astype(np.float32)
    t = _targets(rng, n, v)
    np.save(d / "head.npy", w)
    np.save(d / "bias.npy", b)
    x64 = h.astype(np.float64) @ w.astype(np.float64).T + b.astype(np.float64)
    out["hidden-files"] = dict(x64=x64, tgt=t, kw=dict(
        hidden=_save_split(d, "hidden", h, [900, 1, 599]), targets=_save_split(d, "targets-h", t, [1500]),
        lm_head=str(d / "head.npy"), bias=str(d / "bias.npy"), hist_max=9.0, train_loss=2.5))

    # hidden states from files, an in-memory float64 LM head (it travels to the workers)
    w64 = rng.standard_normal((v, dim)) * 0.4
    out["hidden-array-head"] = dict(x64=h.astype(np.float64) @ w64.T, tgt=t, kw=dict(
        hidden=out["hidden-files"]["kw"]["hidden"], targets=out["hidden-files"]["kw"]["targets"],
        lm_head=w64, train_loss=3.0))
    return out


#: Tolerance of the mean loss against the float64 scipy reference, per case: float32,
#: bfloat16 and float16 logits accumulate per-block sums in float32 (1e-5); float32 hidden
#: states and head multiply in float32 (1e-4); a float64 head makes it all float64.
REF_RTOL = {"f32": 1e-5, "bf16-shift": 1e-5, "f16-arrays": 1e-5, "hidden-files": 1e-4,
            "hidden-array-head": 1e-10}


# ---- 1. distributed == in-process -----------------------------------------------------

@pytest.mark.parametrize("case", list(REF_RTOL))
def test_distributed_equals_in_process(client, dumps, case):
    c = dumps[case]
    kw = dict(c["kw"], task_tokens=97, chunk_tokens=31)
    if "hidden" in kw:
        # the LM-head product's rounding depends on the BLAS thread count (see
        # test_lm_head_default_threads_equal_in_process): one thread on both sides
        kw["worker_threads"] = 1
    local = fastloss.evaluate(**kw)
    with distributed.get_task_stream(client=client) as stream:
        dist = fastloss.evaluate(**kw, client=client)
    ntask, workers = _run_tasks(stream)
    assert ntask >= 10 and len(workers) == 2, (ntask, workers)
    _assert_same(dist, local)  # exact, every entry (files included)
    # and the numbers are right: counts, and the mean loss against float64
    counted = int(np.count_nonzero(c["tgt"] != IGNORE))
    assert (local.tokens, local.ignored) == (counted, c["tgt"].size - counted)
    assert local.mean_loss == pytest.approx(_ref_mean_loss(c["x64"], c["tgt"]), rel=REF_RTOL[case])
    if "train_loss" in kw:
        assert dist.generalization_gap == dist.mean_loss - kw["train_loss"]
    if "hist_max" in kw:
        assert dist.loss_histogram["edges"][-1] == kw["hist_max"]
    if "seq_len" in kw:
        assert sum(dist.per_position_count) == dist.tokens and dist.per_position_count[-1] == 0


def test_distributed_worker_threads_and_one_task_per_shard(client, dumps):
    """``worker_threads`` and the default task size (a whole shard per task here) give the
    same report as in process; so do 3-row tasks of 2-row chunks (175 tasks)."""
    kw = dumps["f32"]["kw"]
    local = fastloss.evaluate(**kw)
    _assert_same(fastloss.evaluate(**kw, client=client, worker_threads=2), local)
    # shards 2-3 (1 and 523 rows), in-memory targets
    small = dict(logits=kw["logits"][1:3], targets=dumps["f32"]["tgt"][700:1224], task_tokens=3,
                 chunk_tokens=2)
    _assert_same(fastloss.evaluate(**small, client=client), fastloss.evaluate(**small))


def test_lm_head_default_threads_equal_in_process(client, dumps):
    """Hidden states through a float32 LM head with the default thread counts: the
    in-process run's BLAS product uses all the cores, a worker's task one (its share),
    and OpenBLAS's sgemm rounds differently with 1 and 2 threads (~1e-9 relative in the
    mean loss here), so the reports agree to float32 product rounding, not to the bit
    (docs/distributed.md); with equal BLAS threads they are identical (the tests above
    pass worker_threads). A float64 head agrees to 1e-12 whatever the threads."""
    kw = dict(dumps["hidden-files"]["kw"], task_tokens=97, chunk_tokens=31)
    # per-token values move by the product's rounding (~1e-7 relative for float32)
    _assert_close(fastloss.evaluate(**kw, client=client).to_dict(), fastloss.evaluate(**kw).to_dict(), 1e-5)
    kw = dict(kw, lm_head=np.load(kw["lm_head"]).astype(np.float64))
    _assert_close(fastloss.evaluate(**kw, client=client).to_dict(), fastloss.evaluate(**kw).to_dict(), 1e-12)


def test_lm_head_tasks_leave_blas_threads_as_they_were(dumps):
    """Tasks with an LM head limit BLAS threads through threadpoolctl, whose limit is
    process-wide: on a worker running two such tasks at once, one task's exit restores
    the count while the other still runs, and the last exit can leave the process on
    one BLAS thread for good (here: the client's own process, the workers being
    threads of it); the limit is now counted, set by the first task and restored by the
    last. (It failed within 2-3 runs before that.)"""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    if not before or max(before) < 2:
        pytest.skip("needs a multi-threaded BLAS")
    kw = dict(dumps["hidden-files"]["kw"], task_tokens=10, chunk_tokens=10, worker_threads=1)
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                       dashboard_address=":0")
    try:
        with distributed.Client(cluster) as c:
            for run in range(5):
                fastloss.evaluate(**kw, client=c)
                assert blas_threads() == before, f"after run {run}"
    finally:
        cluster.close()
        threadpoolctl.threadpool_limits(limits=max(before), user_api="blas")  # as before, for later tests


# ---- 2. a worker killed during a run ----------------------------------------------------

@linux_only
def test_worker_killed_mid_run_same_report(tmp_path, rng):
    """SIGKILL of a worker process while its tasks run: Dask reruns them elsewhere (the
    nanny restarts the worker) and the report is the in-process one, exactly.
    (It failed about 1 run in 3 while the job description was scattered data, see
    test_worker_killed_during_last_task.)"""
    n, v = 6000, 1500
    x, t = _logits(rng, n, v), _targets(rng, n, v)
    kw = dict(logits=_save_split(tmp_path, "logits", x, [2000, 1, 1999, 2000]),
              targets=_save_split(tmp_path, "targets", t, [6000]), task_tokens=30, chunk_tokens=4)
    # 202 tasks; the first on each fresh worker also loads the kernels (seconds)
    local = fastloss.evaluate(**kw)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0")
    try:
        with distributed.Client(cluster) as c:
            pids = c.run(os.getpid)
            assert len(pids) == 2
            result = {}
            th = threading.Thread(target=_evaluate_into, args=(result, kw, c))
            th.start()
            victim, deadline = None, time.monotonic() + 60
            while victim is None and time.monotonic() < deadline:
                busy = [w for w, keys in c.processing().items()
                        if any(str(k).startswith("run_task") for k in keys)]
                victim = busy[0] if busy else None
                if victim is None:
                    time.sleep(0.005)
            assert victim is not None, "no task was seen processing"
            running_at_kill = th.is_alive()
            os.kill(pids[victim], signal.SIGKILL)
            still_running = th.is_alive()  # the run had not finished when the worker died
            th.join(180)
            assert not th.is_alive()
            if "error" in result:
                raise result["error"]
            assert running_at_kill and still_running
            _assert_same(result["report"], local)
            # the kill happened: the process is gone and the scheduler lost that worker
            deadline = time.monotonic() + 30
            while _alive(pids[victim]) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(pids[victim])
            assert victim not in c.scheduler_info()["workers"]
            # ... unexpectedly, with tasks of this run in flight there
            removed = [e for _, e in c.get_events(victim) if e.get("action") == "remove-worker"]
            assert removed and not removed[0]["expected"], removed
            assert any(str(k).startswith("run_task") for k in removed[0]["processing-tasks"]), removed
    finally:
        cluster.close()


@linux_only
def test_worker_killed_during_last_task(tmp_path, rng):
    """The worker running the last task is killed. By then the scheduler's active memory
    manager has dropped the other replica of the job description (``ReduceReplicas``:
    one waiter left), so the kill loses the only copy of scattered data that Dask
    cannot recompute: the scheduler logs "Removing worker ... caused the cluster to
    lose scattered data, which can't be recovered: {'_Job-...'}" and the run raised
    FutureCancelledError instead of rerunning the task, until the job became a
    recomputable task. The manager's interval is shortened to 0.1 s (default 2 s) so
    that the window opens within the last task's ~1 s."""
    x, t = _logits(rng, 4200, 50), _targets(rng, 4200, 50)
    kw = dict(logits=_save_split(tmp_path, "logits", x, [200, 4000]), targets=t, task_tokens=4000,
              chunk_tokens=1)  # 2 tasks: 200 rows, then 4000 one-row chunks (~1 s)
    local = fastloss.evaluate(**kw)
    with dask.config.set({"distributed.scheduler.active-memory-manager.interval": "100ms"}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=":0")
    try:
        with distributed.Client(cluster) as c:
            fastloss.evaluate(**dict(kw, chunk_tokens=1000), client=c)  # kernels loaded on both workers
            pids = c.run(os.getpid)
            result = {}
            th = threading.Thread(target=_evaluate_into, args=(result, kw, c))
            th.start()
            victim, deadline = None, time.monotonic() + 60
            while victim is None and th.is_alive() and time.monotonic() < deadline:
                running = [(w, k) for w, keys in c.processing().items() for k in keys
                           if str(k).startswith("run_task")]
                held = [ws for k, ws in c.who_has().items() if not str(k).startswith("run_task")]
                if len(running) == 1 and all(set(ws) <= {running[0][0]} for ws in held):
                    victim = running[0][0]  # the last task's worker holds all there is
                else:
                    time.sleep(0.01)
            assert victim is not None and th.is_alive(), "the run ended before its last task was alone"
            os.kill(pids[victim], signal.SIGKILL)
            assert th.is_alive()
            th.join(180)
            if "error" in result:
                raise result["error"]
            _assert_same(result["report"], local)
    finally:
        cluster.close()


def _evaluate_into(result, kw, client):
    """``result["report"]`` = evaluate(**kw, client=client), or ``result["error"]``."""
    try:
        result["report"] = fastloss.evaluate(**kw, client=client)
    except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
        result["error"] = e


def _alive(pid):
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---- 3. the command line on a cluster -----------------------------------------------

def test_cli_workers_corrupt_shard_exits_2(tmp_path, rng, capsys):
    """``--workers 2`` (its own cluster): a shard of garbage bytes among good ones exits 2
    with one line naming it, and writes no JSON."""
    x, t = _logits(rng, 300, 50), _targets(rng, 300, 50)
    _save_split(tmp_path, "logits", x, [100, 100, 100])
    np.save(tmp_path / "targets.npy", t)
    bad = tmp_path / "logits-2.npy"
    bad.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    out = tmp_path / "out.json"
    code = main(["eval", str(tmp_path / "logits-*.npy"), "--targets", str(tmp_path / "targets.npy"),
                 "--workers", "2", "--json", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("fastloss eval")]
    assert len(lines) == 1 and lines[0].startswith(f"fastloss eval: error: {bad}: "), err
    assert "Traceback" not in err
    assert not out.exists()


def test_cli_scheduler_json_equals_api(client, dumps, tmp_path, capsys):
    """``--scheduler ADDRESS --worker-threads 1``: the JSON equals the in-process API report."""
    kw = dumps["bf16-shift"]["kw"]
    out = tmp_path / "out.json"
    code = main(["eval", *kw["logits"], "--targets", *kw["targets"], "--seq-len", "30", "--shift",
                 "--chunk-tokens", "64", "--scheduler", client.scheduler.address,
                 "--worker-threads", "1", "--json", str(out), "--no-progress"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    local = fastloss.evaluate(**kw, chunk_tokens=64, on_invalid="raise")
    assert json.loads(out.read_text()) == json.loads(json.dumps(local.to_dict()))
    assert "perplexity" in cap.out


def test_cli_bad_cluster_options_exit_2(dumps, capsys):
    kw = dumps["f32"]["kw"]
    for flag, value in (("--workers", "0"), ("--worker-threads", "0")):
        assert main(["eval", *kw["logits"], "--targets", *kw["targets"], flag, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"fastloss eval: error: {flag}: expected a positive integer, found 0"]


# ---- 4. a shard whose read fails mid-run ----------------------------------------------

def _failing_read(monkeypatch, bad, from_row, kind):
    """Make ``read`` of the file ``bad`` fail for rows at or past ``from_row``."""
    orig = R._FileShard.read

    def read(self, lo, hi):
        if self.name == bad and hi > from_row:
            if kind == "eval":
                raise EvalInputError(self.name, "injected read failure")
            raise OSError(errno.EIO, "Input/output error", self.name)
        return orig(self, lo, hi)

    monkeypatch.setattr(R._FileShard, "read", read)


@pytest.fixture(scope="module")
def thread_client():
    """A cluster of two in-process workers (threads), which see this process's patches."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                       dashboard_address=":0")
    try:
        with distributed.Client(cluster) as c:
            yield c
    finally:
        cluster.close()


@pytest.mark.parametrize("where", ["in-process", "threads-cluster"])
@pytest.mark.parametrize("kind, from_row", [("eval", 0), ("eval", 150), ("os", 0)],
                         ids=["first-task", "later-task", "oserror"])
def test_skip_shard_whose_read_fails(request, tmp_path, rng, monkeypatch, where, kind, from_row):
    """on_invalid="skip": a shard that fails to read (at its first task, or at a later
    one after earlier tasks succeeded) is dropped whole; the report equals, exactly,
    the in-process report of the dump without it (and without its targets)."""
    client = None if where == "in-process" else request.getfixturevalue("thread_client")
    n, v, sizes = 1000, 300, [300, 250, 1, 449]
    x, t = _logits(rng, n, v), _targets(rng, n, v)
    logits = _save_split(tmp_path, "logits", x, sizes)
    targets = _save_split(tmp_path, "targets", t, sizes)
    bad = logits[1]
    good = [0, 2, 3]
    ref = fastloss.evaluate([logits[k] for k in good], [targets[k] for k in good],
                            task_tokens=40, chunk_tokens=16)
    _failing_read(monkeypatch, bad, from_row, kind)
    rep = fastloss.evaluate(logits, targets, task_tokens=40, chunk_tokens=16,
                            on_invalid="skip", client=client)
    problem = "injected read failure" if kind == "eval" else "Input/output error"
    assert len(rep.skipped_files) == 1
    sk = rep.skipped_files[0]
    assert (sk["file"], sk["tokens"]) == (bad, 250) and problem in sk["problem"], sk
    assert any(w.startswith(f"{bad}: skipped") and "250 token(s)" in w for w in rep.warnings), rep.warnings
    _assert_same(rep, ref, skip=("logits_files", "targets_files", "skipped_files", "warnings"))
    assert rep.logits_files == logits and ref.skipped_files == []
    # without skip: the run fails naming the file
    expect = EvalInputError if kind == "eval" else OSError
    with pytest.raises(expect, match=bad.replace("\\", "\\\\")):
        fastloss.evaluate(logits, targets, task_tokens=40, chunk_tokens=16, client=client)


def test_cli_skip_invalid_lists_the_skipped_shard(tmp_path, rng, monkeypatch, capsys):
    x, t = _logits(rng, 400, 60), _targets(rng, 400, 60)
    logits = _save_split(tmp_path, "logits", x, [150, 250])
    np.save(tmp_path / "targets.npy", t)
    _failing_read(monkeypatch, logits[0], 0, "eval")
    out = tmp_path / "out.json"
    argv = ["eval", *logits, "--targets", str(tmp_path / "targets.npy"), "--json", str(out), "--no-progress"]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"fastloss eval: error: {logits[0]}: injected read failure\n"
    assert not out.exists()
    assert main([*argv, "--skip-invalid"]) == 0
    capsys.readouterr()
    d = json.loads(out.read_text())
    assert d["skipped_files"] == [{"file": logits[0], "tokens": 150, "problem": "injected read failure"}]
    assert d["tokens"] == int(np.count_nonzero(t[150:] != IGNORE))


# ---- 5. vocabulary-sharded dumps --------------------------------------------------------

#: Column boundaries of the three vocabulary slices (widths 101, 77, the rest), and the
#: token-shard sizes of each slice's files (different per slice).
VOCAB_CUTS = (101, 178)
SLICE_ROWS = ([400, 1100], [1, 1499], [300, 300, 900])


def _vocab_dump(d, x, stem):
    """``x`` stored as vocabulary slices, each as token shards (slice 1, and every bfloat16
    file, in safetensors: .npy cannot hold bfloat16): one glob pattern per slice."""
    patterns = []
    for k, part in enumerate(np.split(x, VOCAB_CUTS, axis=1)):
        fmt = "safetensors" if k == 1 or x.dtype == BF16 else "npy"
        _save_split(d, f"logits-{stem}{k}", np.ascontiguousarray(part), SLICE_ROWS[k], fmt=fmt)
        patterns.append(str(d / f"logits-{stem}{k}-*.{fmt}"))
    return patterns


@pytest.fixture(scope="module")
def vocab_dumps(tmp_path_factory):
    pytest.importorskip("fastloss.ops.vocab_parallel")
    rng = np.random.default_rng(77)
    d = tmp_path_factory.mktemp("vocab")
    n, v = 1500, 500
    x = _logits(rng, n, v, np.float64)
    t = _targets(rng, n, v)
    np.save(d / "targets.npy", t)
    out = {"targets": str(d / "targets.npy"), "t": t}
    for name, dtype in (("f64", np.float64), ("f32", np.float32), ("bf16", BF16)):
        xd = x.astype(dtype)
        [whole] = _save_split(d, f"logits-whole{name}", xd, [n], fmt="safetensors" if dtype == BF16 else "npy")
        out[name] = dict(whole=whole, slices=_vocab_dump(d, xd, name), x64=xd.astype(np.float64))
    return out


#: Tolerance of vocabulary-sharded against unsharded reports (floats; counts exact), per
#: dtype. For float64 logits both paths are float64 throughout: 1e-12. For float32 and
#: bfloat16 both take the exponentials and the sums within a block of columns in
#: float32 (the unsharded kernel per row block, vocab_row_stats per slice block, over
#: other column blocks), float64 across blocks: a few float32 roundings of the sum of
#: exponentials over 500 classes, 2e-6.
VOCAB_RTOL = {"f64": 1e-12, "f32": 2e-6, "bf16": 2e-6}


@pytest.mark.parametrize("dtype", list(VOCAB_RTOL))
def test_vocab_sharded_equals_unsharded(client, vocab_dumps, dtype):
    c = vocab_dumps[dtype]
    kw = dict(targets=vocab_dumps["targets"], task_tokens=97, chunk_tokens=40)
    whole = fastloss.evaluate(c["whole"], **kw)
    sharded = fastloss.evaluate(vocab_shards=c["slices"], **kw)
    _report_close(sharded, whole, VOCAB_RTOL[dtype])
    # against float64 (scipy): 1e-12 for float64 logits, 1e-5 for float32 block sums
    assert sharded.mean_loss == pytest.approx(_ref_mean_loss(c["x64"], vocab_dumps["t"]),
                                              rel=1e-12 if dtype == "f64" else 1e-5)
    assert sharded.vocab == 500 and [len(s) for s in sharded.vocab_shards] == [len(r) for r in SLICE_ROWS]
    assert sharded.logits_files == []
    with distributed.get_task_stream(client=client) as stream:
        dist = fastloss.evaluate(vocab_shards=c["slices"], **kw, client=client)
    ntask, workers = _run_tasks(stream)
    # 97-row tasks, also cut where any slice's (or the targets') files change
    assert ntask >= 16 and len(workers) == 2, (ntask, workers)
    _assert_same(dist, sharded)  # the cluster reproduces the in-process run exactly


def test_vocab_shards_arrays_and_lists(vocab_dumps):
    """Slices given as in-memory arrays, or as lists of files, give the pattern's report."""
    c = vocab_dumps["f64"]
    t = vocab_dumps["t"]
    by_pattern = fastloss.evaluate(vocab_shards=c["slices"], targets=t, chunk_tokens=64)
    arrays = np.split(c["x64"], VOCAB_CUTS, axis=1)
    # one array per slice makes other tasks (tasks end where files do): float64 rounding
    _report_close(fastloss.evaluate(vocab_shards=arrays, targets=t, chunk_tokens=64), by_pattern, 1e-13)
    lists = [R.expand_paths(p) for p in c["slices"]]
    _assert_same(fastloss.evaluate(vocab_shards=lists, targets=t, chunk_tokens=64), by_pattern)


def test_cli_vocab_shards_on_scheduler(client, vocab_dumps, tmp_path, capsys):
    c = vocab_dumps["f64"]
    out = tmp_path / "out.json"
    code = main(["eval", "--vocab-shards", *c["slices"], "--targets", vocab_dumps["targets"],
                 "--chunk-tokens", "50", "--scheduler", client.scheduler.address, "--json", str(out),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    d = json.loads(out.read_text())
    ref = fastloss.evaluate(vocab_shards=c["slices"], targets=vocab_dumps["targets"], chunk_tokens=50,
                            on_invalid="raise")
    assert d == json.loads(json.dumps(ref.to_dict()))
    assert d["vocab_shards"] == [R.expand_paths(p) for p in c["slices"]]
    whole = fastloss.evaluate(c["whole"], vocab_dumps["targets"])
    assert d["mean_loss"] == pytest.approx(whole.mean_loss, rel=1e-12)


def test_vocab_sharded_skip_drops_exactly_the_failed_file(tmp_path, rng, monkeypatch):
    """A vocabulary-sharded dump whose slice 1 is two files (rows [0, 100) and [100, 300))
    and whose second file fails to read, under on_invalid="skip": that file is listed
    once with its 200 tokens, and the report is the one of rows [0, 100) (1e-12
    relative: other tasks, so other float64 sums; counts exact).
    (Tasks now end where any input's file does; before, a vocabulary-sharded task was
    dropped alone: the file was listed once per failed task and the task straddling
    row 100 dropped good rows of the other file.)"""
    pytest.importorskip("fastloss.ops.vocab_parallel")
    x, t = _logits(rng, 300, 50, np.float64), _targets(rng, 300, 50)
    np.save(tmp_path / "a-1.npy", np.ascontiguousarray(x[:, :20]))
    b = _save_split(tmp_path, "b", np.ascontiguousarray(x[:, 20:]), [100, 200])
    _failing_read(monkeypatch, b[1], 0, "eval")
    rep = fastloss.evaluate(vocab_shards=[str(tmp_path / "a-1.npy"), b], targets=t, task_tokens=40,
                            chunk_tokens=10, on_invalid="skip")
    ref = fastloss.evaluate(vocab_shards=[x[:100, :20], x[:100, 20:]], targets=t[:100], task_tokens=40,
                            chunk_tokens=10)
    assert [(sk["file"], sk["tokens"]) for sk in rep.skipped_files] == [(b[1], 200)]
    _report_close(rep, ref, 1e-12)


# ---- 6. bad arguments ---------------------------------------------------------------

def test_bad_distributed_arguments(dumps, tmp_path):
    kw = dumps["f32"]["kw"]
    with pytest.raises(TypeError, match=r"^client: expected a dask\.distributed\.Client or None, found str$"):
        fastloss.evaluate(**kw, client="tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match=r"^worker_threads: expected a positive integer, found 0$"):
        fastloss.evaluate(**kw, worker_threads=0)
    with pytest.raises(ValueError, match=r"^task_tokens: expected a positive integer, found 0$"):
        fastloss.evaluate(**kw, task_tokens=0)
    with pytest.raises(TypeError, match=r"^vocab_shards: expected a non-empty list"):
        fastloss.evaluate(vocab_shards=[], targets=kw["targets"])
    with pytest.raises(TypeError, match=r"^vocab_shards: expected a non-empty list"):
        fastloss.evaluate(vocab_shards=kw["logits"][0], targets=kw["targets"])
    with pytest.raises(ValueError, match=r"^logits: pass either logits or vocab_shards, not both$"):
        fastloss.evaluate(kw["logits"], vocab_shards=[kw["logits"]], targets=kw["targets"])
    # slices of different token counts: the slice that differs is named
    rng = np.random.default_rng(3)
    a, b = _logits(rng, 40, 10, np.float64), _logits(rng, 39, 7, np.float64)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    with pytest.raises(EvalInputError, match=rf"^{tmp_path / 'b.npy'}: 39 tokens in this vocabulary slice, "
                                             rf"40 in the first \({tmp_path / 'a.npy'}\)$"):
        fastloss.evaluate(vocab_shards=[str(tmp_path / "a.npy"), str(tmp_path / "b.npy")],
                          targets=np.zeros(40, np.int64))


# ---- 7. the partials ------------------------------------------------------------------

def _partial(rng, n, nclass, edges):
    """A Totals of ``n`` random tokens (some ignored) of ``nclass`` classes, and the
    losses it counted."""
    tot = Totals(nclass, edges)
    tgt = rng.integers(0, nclass, n)
    keep = rng.random(n) > 0.1
    loss = rng.exponential(3.0, n)
    conf = rng.random(n)
    rank = rng.integers(0, 20, n)
    tot.add(tgt, loss, rng.exponential(2.0, n), conf, rank, keep)
    tot.ignored += int(n - keep.sum())
    return tot, loss[keep]


def test_partial_pickles_small_and_round_trips(rng):
    nclass, edges = 128000, np.linspace(0.0, 2 * math.log(128000), 41)
    tot, _ = _partial(rng, 1000, nclass, edges)
    data = pickle.dumps(tot)
    dense = nclass * 8  # the (V,) int64 unigram counts alone: 1 MB
    assert len(data) < dense / 20, len(data)
    back = pickle.loads(data)
    assert back.unigram.shape == (nclass,) and back.unigram.dtype == np.int64
    np.testing.assert_array_equal(back.unigram, tot.unigram)
    assert back.unigram.sum() == tot.tokens > 800
    for name in ("tokens", "ignored", "loss_sum", "ent_sum", "top1", "top5", "loss_max"):
        assert getattr(back, name) == getattr(tot, name), name
    # a partial with most classes present keeps the dense array (and round-trips)
    small, _ = _partial(rng, 1000, 64, edges)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(small)).unigram, small.unigram)


def test_totals_merge_order_independent(rng):
    nclass, edges = 5000, np.linspace(0.0, 17.0, 41)
    made = [_partial(rng, n, nclass, edges) for n in (1000, 1, 2500)]
    parts = [p for p, _ in made]

    def merged(order):
        total = Totals(nclass, edges)
        for k in order:
            total.merge(pickle.loads(pickle.dumps(parts[k])))  # a copy: merge adds into total
        return total

    a, b = merged([0, 1, 2]), merged([2, 0, 1])
    for name in ("tokens", "ignored", "top1", "top5", "loss_max"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("unigram", "hist", "bin_count", "bin_correct"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.loss_moments.n == b.loss_moments.n == a.tokens
    # float sums: float64 rounding only (1e-15 relative)
    for name in ("loss_sum", "ent_sum"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-15), name
    np.testing.assert_allclose(a.bin_conf, b.bin_conf, rtol=1e-15)
    assert a.loss_moments.sum == pytest.approx(b.loss_moments.sum, rel=1e-15)
    assert a.loss_moments.m2 == pytest.approx(b.loss_moments.m2, rel=1e-15)
    # and the merge is the total of all the tokens at once (float64 reference)
    allx = np.concatenate([x for _, x in made])
    assert a.tokens == allx.size == sum(p.tokens for p in parts)
    assert a.loss_sum == pytest.approx(allx.sum(), rel=1e-14)
    assert a.loss_moments.m2 == pytest.approx(((allx - allx.mean()) ** 2).sum(), rel=1e-13)
    assert a.loss_max == allx.max()


# ---- 8. compare on the cluster; URLs on the workers --------------------------------------

@pytest.mark.parametrize("gather", [None, 64], ids=["default", "multi-pass"])
def test_compare_distributed_equals_in_process(client, tmp_path, rng, monkeypatch, gather):
    """``fastloss.compare(..., client=)``: the two sides sharded differently (tasks cut at
    both sides' file boundaries), with targets, seq_len and the top list; the exact
    percentiles come from radix-select passes over values kept on the workers. With
    ``COMPARE_SELECT_GATHER`` = 64 (read on the client, where the select runs) every
    percentile takes 2-4 histogram passes summed on the workers instead of one gather.
    The report equals the in-process one exactly, and the percentiles equal numpy's."""
    from fastloss import config

    if gather is not None:
        monkeypatch.setattr(config, "COMPARE_SELECT_GATHER", gather)
    n, v = 1500, 300
    base = _logits(rng, n, v)
    model = (base + 0.3 * rng.standard_normal(base.shape)).astype(np.float32)
    t = _targets(rng, n, v)
    kw = dict(base=_save_split(tmp_path, "base", base, [700, 1, 799]),
              model=_save_split(tmp_path, "model", model, [400, 1100]), targets=t, seq_len=30, top=7,
              task_tokens=97, chunk_tokens=40)
    with distributed.get_task_stream(client=client) as stream:
        dist = fastloss.compare(**kw, client=client)
    ntask, workers = _run_tasks(stream, "_compare_task")
    assert ntask >= 16 and len(workers) == 2, (ntask, workers)
    local = fastloss.compare(**kw)
    assert dist.to_dict() == local.to_dict()
    # the per-token KL against numpy's percentiles of the same values (float64 reference)
    b64, m64 = base.astype(np.float64), model.astype(np.float64)
    lb = b64 - np.logaddexp.reduce(b64, axis=1, keepdims=True)
    lm = m64 - np.logaddexp.reduce(m64, axis=1, keepdims=True)
    kl = (np.exp(lb) * (lb - lm)).sum(axis=1)[t != -100]
    qs = list(dist.kl_percentiles)
    # float32 logits: the kernel's KL is good to ~1e-7 absolute (a difference of sums)
    assert list(dist.kl_percentiles.values()) == pytest.approx(np.percentile(kl, qs).tolist(),
                                                               rel=1e-5, abs=1e-6)


def test_compare_cli_on_scheduler(client, tmp_path, rng, capsys):
    n, v = 400, 64
    base = _logits(rng, n, v)
    model = (base + 0.5 * rng.standard_normal(base.shape)).astype(np.float32)
    np.save(tmp_path / "b.npy", base)
    np.save(tmp_path / "m.npy", model)
    out = tmp_path / "kl.json"
    code = main(["compare", str(tmp_path / "b.npy"), str(tmp_path / "m.npy"), "--scheduler",
                 client.scheduler.address, "--json", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    ref = fastloss.compare(str(tmp_path / "b.npy"), str(tmp_path / "m.npy"))
    assert json.loads(out.read_text()) == json.loads(json.dumps(ref.to_dict()))


def test_file_urls_on_process_workers(client, dumps, tmp_path):
    """``file://`` URLs (and a URL glob) opened and read by worker processes."""
    pytest.importorskip("fsspec")
    kw = dumps["f32"]["kw"]
    urls = ["file://" + os.path.abspath(p) for p in kw["logits"]]
    got = fastloss.evaluate(urls, kw["targets"], task_tokens=97, client=client)
    _assert_same(got, fastloss.evaluate(kw["logits"], kw["targets"], task_tokens=97),
                 skip=FILE_KEYS)
    assert got.logits_files == urls


def test_memory_urls_on_thread_workers(thread_client, rng):
    """``memory://`` objects live in one process: read by the workers of a threads
    cluster (the file system object pickles to the same store)."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    x, t = _logits(rng, 500, 90), _targets(rng, 500, 90)
    try:
        for k, (lo, hi) in enumerate([(0, 123), (123, 500)]):
            with fs.open(f"/fastloss-dist/logits-{k}.npy", "wb") as f:
                np.save(f, x[lo:hi])
        url = "memory://fastloss-dist/logits-*.npy"
        got = fastloss.evaluate(url, t, task_tokens=50, client=thread_client)
        _assert_same(got, fastloss.evaluate(url, t, task_tokens=50))
        assert got.mean_loss == pytest.approx(_ref_mean_loss(x.astype(np.float64), t), rel=1e-5)
        assert got.logits_files == [f"memory://fastloss-dist/logits-{k}.npy" for k in range(2)]
    finally:
        fs.rm("/fastloss-dist", recursive=True)


def test_progress_bar_over_tasks(client, dumps, monkeypatch):
    """``progress=True`` on a cluster: the client's bar advances by each task's tokens as
    tasks finish, to the total."""
    from fastloss.evaluation import stream

    made = []

    class Bar:
        def __init__(self, total):
            self.total, self.updates, self.closed = total, [], False
            made.append(self)

        def update(self, n):
            self.updates.append(n)

        def close(self):
            self.closed = True

    monkeypatch.setattr(stream, "progress_bar", lambda progress, total, *a: Bar(total) if progress else None)
    kw = dumps["f32"]["kw"]
    r = fastloss.evaluate(**kw, task_tokens=200, client=client, progress=True)
    [bar] = made
    assert bar.total == r.tokens + r.ignored and sum(bar.updates) == bar.total and bar.closed
    assert len(bar.updates) >= 11  # one update per task (2100 tokens in tasks of <= 200)
