"""``fastloss demo``: train a small character-level language model, then evaluate it.

Everything it needs ships with Python: the text is ``pydoc_data.topics.topics``
(the documentation strings behind ``help()``; about 465,000 characters). The run

1. splits the entries about 90/10 (by characters) into training and validation,
   interleaved, and builds a character vocabulary (the most frequent characters of
   the training split plus ``<unk>``);
2. trains, in plain float32 numpy, a model that embeds the previous ``context``
   characters, concatenates the embeddings, applies a tanh hidden layer and
   predicts the next character's logits; every gradient step takes its loss and
   ``d loss / d logits`` from :func:`fastloss.cross_entropy_with_grad` (written
   over the logits, ``inplace=True``), backpropagates by hand and applies Adam;
3. logs the training and validation loss every ``log_every`` steps to
   ``train_log.csv``;
4. writes the validation logits and targets as a dump (``val_logits.npy``,
   ``val_targets.npy``), evaluates it with :func:`fastloss.evaluate` and
   diagnoses the log with :func:`fastloss.evaluation.curves.diagnose`.
"""

import contextlib
import ctypes
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

import numpy as np

from ._threads import get_num_threads, set_num_threads
from .evaluation import evaluate
from .evaluation.curves import diagnose, read_log
from .ops.cross_entropy import cross_entropy, cross_entropy_with_grad

UNK = "<unk>"

#: Model and run sizes: the default run, and ``quick=True`` (a few seconds, for tests).
SIZES = {
    False: dict(steps=3000, chars=96, context=8, embed=16, hidden=256, batch=256, lr=3e-3,
                log_every=50, val_tokens=4096, dump_all=True),
    True: dict(steps=300, chars=64, context=6, embed=8, hidden=64, batch=128, lr=6e-3,
               log_every=20, val_tokens=2048, dump_all=False),
}


def load_text(val_fraction=0.1):
    """The demo's corpus: ``(train_text, val_text)`` from the ``pydoc_data.topics`` entries.

    The entries are taken in key order, and one goes to validation whenever that
    keeps the validation split within ``val_fraction`` of the characters seen so
    far, so both splits mix all kinds of entries; each split's entries are joined by
    blank lines.
    """
    from pydoc_data.topics import topics

    train, val, n_train, n_val = [], [], 0, 0
    for key in sorted(topics):
        entry = topics[key]
        if n_val + len(entry) <= val_fraction * (n_train + n_val + len(entry)):
            val.append(entry)
            n_val += len(entry)
        else:
            train.append(entry)
            n_train += len(entry)
    return "\n\n".join(train), "\n\n".join(val)


def build_vocab(text, size):
    """The ``size`` most frequent characters of ``text`` (ties by code point), then ``<unk>``."""
    counts = Counter(text)
    chars = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]
    return chars + [UNK]


def encode(text, vocab):
    """Character ids of ``text``; a character outside ``vocab`` becomes ``<unk>`` (the last id)."""
    index = {c: i for i, c in enumerate(vocab[:-1])}
    unk = len(vocab) - 1
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.full(int(codes.max()) + 1, unk, dtype=np.int64)
    for c, i in index.items():
        if ord(c) < len(table):
            table[ord(c)] = i
    return table[codes]


@contextlib.contextmanager
def _single_threaded():
    """Run the enclosed small-matrix work on one thread (numba kernels and OpenBLAS).

    The demo's matrices are small (a few hundred rows). Their cost is then the
    wake-up of worker threads, not arithmetic, and OpenBLAS's workers spin for a
    while after each matmul, so a second thread for the fastloss kernel, or for the
    next matmul, waits on a core that is busy spinning: on a 2-core machine that
    made each step ten times slower. OpenBLAS's thread count is set through its C
    API when the library is found among the loaded ones (Linux); otherwise it is
    left as it is.
    """
    setters = []
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        libs = set()
    for path in sorted(libs):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    setters.append((put, get()))
                    put(1)
                    break
            else:
                continue
            break
    threads = get_num_threads()
    set_num_threads(1)
    try:
        yield
    finally:
        set_num_threads(threads)
        for put, n in setters:
            put(n)


class CharMLP:
    """Next-character model: embeddings of the previous ``context`` characters,
    concatenated, -> tanh hidden layer -> logits over the vocabulary (float32)."""

    def __init__(self, vocab, context, embed, hidden, rng):
        f32 = np.float32
        d = context * embed
        self.context = context
        self.params = {
            "emb": (0.1 * rng.standard_normal((vocab, embed))).astype(f32),
            "w1": (rng.standard_normal((d, hidden)) / math.sqrt(d)).astype(f32),
            "b1": np.zeros(hidden, f32),
            "w2": (0.01 * rng.standard_normal((hidden, vocab))).astype(f32),
            "b2": np.zeros(vocab, f32),
        }
        self._m = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._v = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._t = 0

    def forward(self, ids, pos):
        """Logits for the characters at ``pos`` of ``ids`` given the ``context`` before each;
        returns ``(logits, cache)``."""
        p = self.params
        ctx = ids[pos[:, None] + np.arange(-self.context, 0)]
        x = p["emb"][ctx].reshape(len(pos), -1)
        h = np.tanh(x @ p["w1"] + p["b1"])
        return h @ p["w2"] + p["b2"], (ctx, x, h)

    def backward(self, grad_logits, cache):
        """Gradients of every parameter from ``d loss / d logits``."""
        p = self.params
        ctx, x, h = cache
        g = grad_logits
        grads = {"w2": h.T @ g, "b2": g.sum(axis=0)}
        gh = (g @ p["w2"].T) * (1.0 - h * h)
        grads["w1"] = x.T @ gh
        grads["b1"] = gh.sum(axis=0)
        gx = (gh @ p["w1"].T).reshape(-1, p["emb"].shape[1])
        gemb = np.zeros_like(p["emb"])
        np.add.at(gemb, ctx.ravel(), gx)
        grads["emb"] = gemb
        return grads

    def adam(self, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
        """One Adam update (bias-corrected) of every parameter, in place."""
        self._t += 1
        step = lr * math.sqrt(1.0 - b2 ** self._t) / (1.0 - b1 ** self._t)
        for k, w in self.params.items():
            m, v, g = self._m[k], self._v[k], grads[k]
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * g * g
            w -= (step * m / (np.sqrt(v) + eps)).astype(np.float32)


def _logits_in_chunks(model, ids, pos, chunk=8192):
    out = None
    for lo in range(0, len(pos), chunk):
        z, _ = model.forward(ids, pos[lo:lo + chunk])
        if out is None:
            out = np.empty((len(pos), z.shape[1]), np.float32)
        out[lo:lo + len(z)] = z
    return out


def run_demo(steps=None, seed=0, out=None, plot=None, quick=False, stream=None, **sizes):
    """Train the character model, dump and evaluate its validation logits, diagnose its curves.

    Parameters
    ----------
    steps : int, optional
        Gradient steps (default 3000; 300 with ``quick``).
    seed : int, default 0
        Seed of the initialisation and of the minibatch and validation sampling;
        the same seed gives the same numbers.
    out : str or os.PathLike, optional
        Folder for ``train_log.csv``, ``val_logits.npy``, ``val_targets.npy``,
        ``vocab.json``, ``eval_report.json`` and ``curves.json`` (created if
        needed, kept). Default: a temporary folder, removed at the end.
    plot : str or os.PathLike, optional
        Folder for ``curves.png`` and ``eval.png`` (needs matplotlib; skipped with
        a note when it is missing).
    quick : bool, default False
        A smaller model and run (a few seconds), for tests.
    stream : file, optional
        Where to print the progress and the reports (default: print nothing).
    **sizes
        Overrides of the model and run sizes in ``SIZES`` (``chars``, ``context``,
        ``embed``, ``hidden``, ``batch``, ``lr``, ``log_every``, ``val_tokens``:
        characters sampled for the logged validation loss, ``dump_all``: dump every
        validation character, not just that sample).

    Returns
    -------
    dict
        ``history`` (list of ``(step, train_loss, val_loss)``), ``vocab``,
        ``uniform`` (``ln V``), ``unigram`` (validation cross-entropy of the
        training split's character frequencies), ``final_train``, ``final_val``,
        ``report`` (EvalReport), ``curves`` (CurveReport), ``files`` (name ->
        path; the paths exist only when ``out`` was given), ``plots``,
        ``seconds``.
    """
    cfg = dict(SIZES[bool(quick)])
    unknown = set(sizes) - set(cfg)
    if unknown:
        raise TypeError(f"run_demo: unknown size(s) {sorted(unknown)}; expected some of {sorted(cfg)}")
    cfg.update(sizes)
    if steps is not None:
        cfg["steps"] = steps
    if isinstance(cfg["steps"], bool) or not isinstance(cfg["steps"], int) or cfg["steps"] < 1:
        raise ValueError(f"steps: expected a positive integer, found {cfg['steps']!r}")
    write = (lambda s="": print(s, file=stream, flush=True)) if stream is not None else (lambda s="": None)
    t_start = time.perf_counter()

    train_text, val_text = load_text()
    vocab = build_vocab(train_text, cfg["chars"])
    train_ids, val_ids = encode(train_text, vocab), encode(val_text, vocab)
    V = len(vocab)
    k = cfg["context"]
    freq = np.bincount(train_ids, minlength=V) / len(train_ids)
    unigram = float(-np.mean(np.log(np.maximum(freq[val_ids[k:]], 1e-12))))
    uniform = math.log(V)

    rng = np.random.default_rng(seed)
    model = CharMLP(V, k, cfg["embed"], cfg["hidden"], rng)
    val_pos = np.sort(rng.choice(np.arange(k, len(val_ids)), min(cfg["val_tokens"], len(val_ids) - k),
                                 replace=False))
    n_params = sum(w.size for w in model.params.values())
    write(f"fastloss demo: a character-level language model on Python's own documentation "
          f"(pydoc_data.topics, "
          f"{len(train_text) + len(val_text):,} characters)")
    write(f"  {len(train_ids):,} training / {len(val_ids):,} validation characters; vocabulary "
          f"{V} ({V - 1} characters + {UNK}); model: {k} previous characters x {cfg['embed']}-d "
          f"embedding -> {cfg['hidden']} tanh -> {V} logits ({n_params:,} parameters)")
    write(f"  baselines on validation: uniform ln V = {uniform:.4f} nats/char, unigram "
          f"(training character frequencies) = {unigram:.4f}; the logged validation loss is "
          f"on a sample of {len(val_pos):,} characters")

    tmp = None
    if out is None:
        tmp = tempfile.mkdtemp(prefix="fastloss-demo-")
        folder = tmp
    else:
        folder = os.fspath(out)
        os.makedirs(folder, exist_ok=True)
    files = {name: os.path.join(folder, name) for name in
             ("train_log.csv", "val_logits.npy", "val_targets.npy", "vocab.json",
              "eval_report.json", "curves.json")}
    try:
        t0 = time.perf_counter()
        cross_entropy_with_grad(np.zeros((2, V), np.float32), np.zeros(2, np.int64), inplace=True)
        cross_entropy(np.zeros((2, V), np.float32), np.zeros(2, np.int64))
        write(f"  kernel compile/load: {time.perf_counter() - t0:.2f} s (cached on disk afterwards)")
        write(f"  {'step':>6} {'train loss':>11} {'val loss':>9}")

        history, kernel_s = [], 0.0
        t_train = time.perf_counter()
        with _single_threaded():
            def val_loss():
                return float(cross_entropy(_logits_in_chunks(model, val_ids, val_pos), val_ids[val_pos]))

            # Step 0: the untrained model (about ln V: the output weights start near 0).
            pos = rng.integers(k, len(train_ids), cfg["batch"])
            history.append((0, float(cross_entropy(model.forward(train_ids, pos)[0], train_ids[pos])),
                            val_loss()))
            write(f"  {0:>6} {history[0][1]:>11.4f} {history[0][2]:>9.4f}")
            print_every = cfg["log_every"] * max(1, cfg["steps"] // 10 // cfg["log_every"])
            running, count = 0.0, 0
            for step in range(1, cfg["steps"] + 1):
                pos = rng.integers(k, len(train_ids), cfg["batch"])
                logits, cache = model.forward(train_ids, pos)
                t1 = time.perf_counter()
                loss, grad = cross_entropy_with_grad(logits, train_ids[pos], inplace=True)
                kernel_s += time.perf_counter() - t1
                model.adam(model.backward(grad, cache), cfg["lr"])
                running += float(loss)
                count += 1
                if step % cfg["log_every"] == 0 or step == cfg["steps"]:
                    # train loss: the mean minibatch loss since the previous log line
                    history.append((step, running / count, val_loss()))
                    running, count = 0.0, 0
                    if step % print_every == 0 or step == cfg["steps"]:
                        write(f"  {step:>6} {history[-1][1]:>11.4f} {history[-1][2]:>9.4f}")
            train_s = time.perf_counter() - t_train

            with open(files["train_log.csv"], "w") as f:
                f.write("step,train_loss,val_loss\n")
                f.writelines(f"{s},{tr:.6f},{va:.6f}\n" for s, tr, va in history)
            # The dump: every validation character (or, for a quick run, the logged sample).
            dump_pos = np.arange(k, len(val_ids)) if cfg["dump_all"] else val_pos
            np.save(files["val_logits.npy"], _logits_in_chunks(model, val_ids, dump_pos))
            np.save(files["val_targets.npy"], val_ids[dump_pos])
        with open(files["vocab.json"], "w") as f:
            json.dump(vocab, f)
        write(f"  {cfg['steps']} steps in {train_s:.1f} s, of which {kernel_s:.2f} s in "
              f"fastloss.cross_entropy_with_grad ({1e3 * kernel_s / cfg['steps']:.3f} ms per "
              f"{cfg['batch']} x {V} minibatch)")
        write()

        final_train = history[-1][1]
        report = evaluate(files["val_logits.npy"], files["val_targets.npy"], train_loss=final_train)
        write(f"fastloss.evaluate on the validation dump ({len(dump_pos):,} characters):")
        write(report.format())
        curves = diagnose(read_log(files["train_log.csv"]), vocab=V, baseline=unigram,
                          baseline_name="unigram baseline")
        write(curves.format())
        from .cli.evaluate import write_json_atomic
        write_json_atomic(report.to_dict(), files["eval_report.json"])
        write_json_atomic(curves.to_dict(), files["curves.json"])

        plots = {}
        if plot is not None:
            plots = _plots(plot, files["train_log.csv"], report, curves, V, unigram, write)
        final_val = report.mean_loss
        write(f"Result: validation loss {final_val:.4f} nats/char ({final_val / math.log(2):.3f} "
              f"bits/char) against {unigram:.4f} for the unigram baseline and {uniform:.4f} for "
              f"uniform guessing: {unigram - final_val:.4f} nats/char below the unigram baseline "
              f"({np.exp(unigram - final_val):.1f}x lower perplexity).")
        if out is not None:
            write(f"Files in {folder}: " + ", ".join(files))
        seconds = time.perf_counter() - t_start
        write(f"Total {seconds:.1f} s.")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"history": history, "vocab": vocab, "uniform": uniform, "unigram": unigram,
            "final_train": final_train, "final_val": final_val, "report": report,
            "curves": curves, "files": files, "plots": plots, "seconds": seconds,
            "kernel_seconds": kernel_s, "folder": folder}


def _plots(folder, log_path, report, curves, vocab, unigram, write):
    """Draw curves.png and eval.png into ``folder``; a note instead when matplotlib is missing."""
    from .evaluation.plot import plot_curves, plot_report

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    paths = {"curves.png": os.path.join(folder, "curves.png"),
             "eval.png": os.path.join(folder, "eval.png")}
    try:
        plot_curves(log_path, paths["curves.png"], vocab=vocab, baseline=unigram,
                    baseline_name="unigram baseline", report=curves)
        plot_report(report.to_dict(), paths["eval.png"])
    except RuntimeError as e:
        write(f"No plots: {e}")
        return {}
    write(f"Plots: {paths['curves.png']}, {paths['eval.png']}")
    return paths


if __name__ == "__main__":  # pragma: no cover
    run_demo(stream=sys.stdout)
