"""Where evaluation tasks run: in this process, or on a Dask cluster.

``fastloss.evaluate`` splits a dump into tasks (whole shards, or row ranges of
them), each of which reads its own rows from the files and returns a small
mergeable partial (``fastloss.evaluation.metrics.Totals``). A *runner* executes
those tasks:

* ``LocalRunner`` runs them one after the other in this process (the default,
  ``client=None``);
* ``DaskRunner`` submits them to a ``dask.distributed.Client``: the job
  description (shard headers, options, an in-memory LM head) is one recomputable
  task whose result the workers share, each task is one small message naming its row range, the workers
  read the files themselves (never through the scheduler) and only the partials
  come back. A worker that dies has its tasks rerun elsewhere by Dask.

Threads: a Dask worker runs ``nthreads`` tasks at once; each task runs the numba
kernels (and, with an LM head, the BLAS product) on
``max(1, cpus_of_its_host // threads_of_all_workers_on_that_host)`` threads, so that
the workers of one machine share its cores instead of each taking all of them.
``worker_threads=`` overrides it.

Kernel compilation: numba's on-disk cache (``cache=True``) in the package's
``__pycache__`` on each machine (or ``NUMBA_CACHE_DIR``): the first worker process of
a machine compiles a kernel once and writes it, the others (and later runs) load it.
A local directory rather than a shared one because the cached machine code is
specific to the CPU it was compiled for (numba keys its index by CPU name and
features, so a shared directory is safe, but it gains nothing once every machine
has its copy and puts each load on the network file system).

Dask (``distributed``) is imported only when a client is given:
``pip install "fastloss[dask]"``.
"""

import dataclasses
import logging
import math
import operator
import os
import pickle
from urllib.parse import urlsplit

INSTALL_HINT = 'needs Dask: pip install "fastloss[dask]"'


class LocalRunner:
    """Run tasks in this process, in order."""

    workers = 1

    def open(self, fn, items):
        """``[fn(item) for item in items]``."""
        return [fn(item) for item in items]

    def run(self, fn, job, tasks):
        """Yield ``(task, result)`` for each task, in order; ``fn(job, task)`` runs here."""
        for task in tasks:
            yield task, fn(job, task)

    def run_keep(self, fn, job, tasks):
        """Like :meth:`run` for an ``fn`` returning ``(small, kept)``: yields
        ``(task, small, handle)``; here the handle is ``kept`` itself."""
        for task in tasks:
            small, kept = fn(job, task)
            yield task, small, kept

    def scan(self, fn, handles, combine):
        """``combine(fn(h) for h in handles)``."""
        return combine(fn(h) for h in handles)

    def release(self, handles):
        pass

    def close(self):
        pass


def _cpus():
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _host(address):
    """The host part of a Dask address such as ``tcp://10.0.0.5:40123``."""
    return urlsplit(address).hostname or address


def worker_threads(threads_by_host, default):
    """The numba/BLAS thread count of a task on this Dask worker: ``default`` if given,
    else its host's entry of ``threads_by_host`` (a host not listed, e.g. a worker that
    joined after the run started: its CPUs over its own threads)."""
    if default is not None:
        return default
    try:
        from distributed import get_worker
        w = get_worker()
        host, nthreads = _host(w.address), w.state.nthreads
    except (ImportError, ValueError, AttributeError):
        return None
    return threads_by_host.get(host, max(1, _cpus() // max(1, nthreads)))


@dataclasses.dataclass(eq=False, kw_only=True)
class Job:
    """The base of the job descriptions that every task of one run receives: the thread
    settings of its tasks and the progress callback of an in-process run (dropped when
    the job is pickled for Dask workers)."""

    threads: int | None = None  # numba/BLAS threads per task on a worker (None: its share)
    threads_by_host: dict = dataclasses.field(default_factory=dict)
    on_chunk: object = None  # progress callback (rows done), in this process only

    def task_threads(self):
        """This task's thread count (see :func:`worker_threads`)."""
        return worker_threads(self.threads_by_host, self.threads)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["on_chunk"] = None
        return state


class DaskRunner:
    """Run tasks on the workers of a ``distributed.Client``."""

    def __init__(self, client):
        try:
            import distributed
        except ImportError:  # pragma: no cover - the client itself needs it
            raise ImportError(f"client: {INSTALL_HINT}") from None
        if not isinstance(client, distributed.Client):
            raise TypeError(f"client: expected a dask.distributed.Client or None, found "
                            f"{type(client).__name__}")
        self.client = client
        self._as_completed = distributed.as_completed
        info = client.scheduler_info()
        workers = info.get("workers", {})
        if not workers:
            client.wait_for_workers(1)
            workers = client.scheduler_info()["workers"]
        self.workers = len(workers)
        # cores of each host over the task threads of all its workers
        cpus = client.run(_cpus)
        per_host_threads, per_host_cpus = {}, {}
        for addr, w in workers.items():
            host = _host(addr)
            per_host_threads[host] = per_host_threads.get(host, 0) + int(w.get("nthreads", 1))
            per_host_cpus[host] = max(per_host_cpus.get(host, 1), int(cpus.get(addr, 1)))
        self.threads_by_host = {h: max(1, per_host_cpus[h] // per_host_threads[h])
                                for h in per_host_threads}

    def open(self, fn, items):
        """``[fn(item) for item in items]``, on the workers (shard headers are read where
        the data will be read); the first error is raised."""
        futures = self.client.map(fn, items, pure=False)
        try:
            return self.client.gather(futures)
        finally:
            for f in futures:
                f.release()

    def _job(self, job):
        """A future of ``job`` that Dask can recompute: a task (its pickle in the task
        spec), not scattered data, which the scheduler's memory manager may leave on one
        worker only and which is lost for good if that worker dies. Workers copy it
        from each other as their tasks need it."""
        return self.client.submit(pickle.loads, pickle.dumps(job, protocol=5), pure=False,
                                  priority=1)

    def run(self, fn, job, tasks):
        """Yield ``(task, result)`` as tasks finish (any order). ``job`` goes to every
        worker once; an exception of a task cancels the others and is raised."""
        remote = self._job(job)
        futures = {}
        try:
            for task in tasks:
                futures[self.client.submit(fn, remote, task, pure=False, priority=-task.index)] = task
            for future in self._as_completed(list(futures)):
                result = future.result()  # raises the task's exception
                task = futures.pop(future)
                future.release()
                yield task, result
        finally:
            if futures:
                self.client.cancel(list(futures))
            remote.release()

    def run_keep(self, fn, job, tasks):
        """Like :meth:`run` for an ``fn`` returning ``(small, kept)``: yields
        ``(task, small, handle)`` where ``handle`` is a future of ``kept``, which stays in
        the memory of the worker that computed it (Dask recomputes it if that worker
        dies); :meth:`scan` reads it there, :meth:`release` frees it."""
        remote = self._job(job)
        smalls, kept = {}, []
        try:
            for task in tasks:
                both = self.client.submit(fn, remote, task, pure=False, priority=-task.index)
                small = self.client.submit(operator.itemgetter(0), both, pure=False, priority=1)
                kept.append(self.client.submit(operator.itemgetter(1), both, pure=False))
                both.release()
                smalls[small] = (task, kept[-1])
            for future in self._as_completed(list(smalls)):
                result = future.result()
                task, handle = smalls.pop(future)
                future.release()
                yield task, result, handle
        except BaseException:
            self.client.cancel(list(smalls) + kept)
            raise
        finally:
            remote.release()

    def scan(self, fn, handles, combine):
        """``combine`` of ``fn(h)`` over the kept values ``handles``, computed on the
        workers that hold them and combined there in a tree of fan-in
        ``SCAN_FANIN``; only the final result comes back."""
        if not handles:
            return combine([])
        parts = [self.client.submit(fn, h, pure=False) for h in handles]
        try:
            while len(parts) > 1:
                parts = [self.client.submit(_combine_all, combine, *parts[i:i + SCAN_FANIN], pure=False)
                         for i in range(0, len(parts), SCAN_FANIN)]
            return combine([parts[0].result()])
        finally:
            for f in parts:
                f.release()

    def release(self, handles):
        """Free the kept values."""
        for f in handles:
            f.release()

    def close(self):
        pass


#: Partial results combined per task of :meth:`DaskRunner.scan`'s reduction tree.
SCAN_FANIN = 8


def _combine_all(combine, *parts):
    return combine(parts)


class LocalClusterRunner(DaskRunner):
    """A ``DaskRunner`` on a ``distributed.LocalCluster`` of ``n`` worker processes of
    one thread each, started here and closed with ``close()``."""

    def __init__(self, n):
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise ImportError(f"--workers: {INSTALL_HINT}") from None
        # ":0": the scheduler's HTTP server (dashboard, metrics) on a free port, so that
        # a busy 8787 costs no warning; the workers' logs silenced: a task's error (a
        # bad file) reaches the user once, as the command's one-line error
        self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                    dashboard_address=":0", silence_logs=logging.CRITICAL)
        try:
            super().__init__(Client(self.cluster))
        except BaseException:
            self.cluster.close()
            raise

    def close(self):
        self.client.close()
        self.cluster.close()


def connect(address):
    """A runner on the Dask scheduler at ``address`` (``tcp://host:8786``)."""
    try:
        from distributed import Client
    except ImportError:
        raise ImportError(f"--scheduler: {INSTALL_HINT}") from None
    runner = DaskRunner(Client(address))
    runner.close = runner.client.close
    return runner


def runner_for(client):
    """``LocalRunner()`` for None, else a ``DaskRunner`` on the client."""
    return LocalRunner() if client is None else DaskRunner(client)


def split_rows(rows, per_task):
    """Row ranges ``[lo, hi)`` of at most ``per_task`` rows covering ``rows`` rows in
    nearly equal parts (one empty range for ``rows == 0``)."""
    parts = max(1, math.ceil(rows / max(1, per_task)))
    bounds = [rows * k // parts for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))
