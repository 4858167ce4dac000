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

:func:`run_demo` runs these as named steps: :func:`build_corpus` (1), ``_warm_up``
and ``_train`` (2, 3), ``_dump``, ``_evaluate`` and ``_print_result`` (4).
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

import numpy as np

from ._io import write_json_atomic
from ._threads import get_num_threads, set_num_threads
from .evaluation import evaluate
from .evaluation.curves import diagnose, read_log
from .evaluation.report import baseline_comparison
from .ops.cross_entropy import cross_entropy, cross_entropy_with_grad

UNK = "<unk>"

#: Where the demo's one unigram baseline counts its frequencies.
UNIGRAM_SOURCE = "training characters"
#: Its name in the curve diagnosis (and the curves plot).
UNIGRAM_NAME = f"unigram baseline (counts from the {UNIGRAM_SOURCE})"

#: Model and run sizes: the default run, and ``quick=True`` (a few seconds, for tests).
SIZES = {
    False: dict(steps=3000, chars=96, context=8, embed=16, hidden=256, batch=256, lr=3e-3,
                log_every=50, val_tokens=4096, dump_all=True),
    True: dict(steps=300, chars=64, context=6, embed=8, hidden=64, batch=128, lr=6e-3,
               log_every=20, val_tokens=2048, dump_all=False),
}


#: What a run writes into its folder (``out``, or a temporary one).
FILES = ("train_log.csv", "val_logits.npy", "val_targets.npy", "vocab.json", "eval_report.json",
         "curves.json")


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
    """Run the enclosed small-matrix work on one thread (numba kernels and BLAS).

    The demo's matrices are small (a few hundred rows). Their cost is then the
    wake-up of worker threads, not arithmetic, and OpenBLAS's workers spin for a
    while after each matmul, so a second thread for the fastloss kernel, or for the
    next matmul, waits on a core that is busy spinning: on a 2-core machine that
    made each step ten times slower. The BLAS thread pools that ``threadpoolctl``
    finds loaded (OpenBLAS, including numpy's ``scipy_openblas``, MKL, BLIS) are
    limited to one thread for the duration; one it does not know is left as it is.
    """
    from threadpoolctl import threadpool_limits  # here: ``import fastloss`` stays fast

    with threadpool_limits(limits=1, user_api="blas"):
        threads = get_num_threads()
        set_num_threads(1)
        try:
            yield
        finally:
            set_num_threads(threads)


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
        ``uniform`` (``ln V``), ``unigram`` (cross-entropy of the training split's
        character frequencies on the dumped validation characters: the one unigram
        baseline of every report), ``final_train``, ``final_val``,
        ``report`` (EvalReport), ``curves`` (CurveReport), ``files`` (name ->
        path; the paths exist only when ``out`` was given), ``plots``,
        ``seconds``.
    """
    cfg = _settings(quick, steps, sizes)
    write = _printer(stream)
    t_start = time.perf_counter()
    data = build_corpus(cfg["chars"], cfg["context"])
    rng = np.random.default_rng(seed)
    model = CharMLP(data.nclass, cfg["context"], cfg["embed"], cfg["hidden"], rng)
    # The characters of the logged validation loss (sampled once, after the model's init).
    val_pos = np.sort(rng.choice(np.arange(cfg["context"], len(data.val_ids)),
                                 min(cfg["val_tokens"], len(data.val_ids) - cfg["context"]),
                                 replace=False))
    dump_pos = np.arange(cfg["context"], len(data.val_ids)) if cfg["dump_all"] else val_pos
    unigram = data.unigram_loss(data.val_ids[dump_pos])
    _print_setup(write, data, model, cfg, val_pos, unigram, len(dump_pos))
    folder, tmp = _run_folder(out)
    files = {name: os.path.join(folder, name) for name in FILES}
    try:
        _warm_up(data.nclass, write)
        with _single_threaded():
            history, kernel_s = _train(model, data, val_pos, rng, cfg, write)
            _dump(model, data, dump_pos, history, files)
        report, curves = _evaluate(files, history, data, unigram, len(dump_pos),
                                   write, temporary=tmp is not None)
        plots = {}
        if plot is not None:
            plots = _plots(plot, files["train_log.csv"], report, curves, data.nclass, unigram, write)
        _print_result(write, report, data)
        if out is not None:
            write(f"Files in {folder}: " + ", ".join(files))
        seconds = time.perf_counter() - t_start
        write(f"Total {seconds:.1f} s.")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"history": history, "vocab": data.vocab, "uniform": data.uniform, "unigram": unigram,
            "final_train": history[-1][1], "final_val": report.mean_loss, "report": report,
            "curves": curves, "files": files, "plots": plots, "seconds": seconds,
            "kernel_seconds": kernel_s, "folder": folder}


def _settings(quick, steps, sizes):
    """The run's sizes: ``SIZES[quick]`` with the overrides, checked."""
    cfg = dict(SIZES[bool(quick)])
    unknown = set(sizes) - set(cfg)
    if unknown:
        raise TypeError(f"run_demo: unknown size(s) {sorted(unknown)}; expected some of {sorted(cfg)}")
    cfg.update(sizes)
    if steps is not None:
        cfg["steps"] = steps
    if isinstance(cfg["steps"], bool) or not isinstance(cfg["steps"], int) or cfg["steps"] < 1:
        raise ValueError(f"steps: expected a positive integer, found {cfg['steps']!r}")
    return cfg


def _printer(stream):
    """``write(line="")``: print a line to ``stream`` and flush, or do nothing without one."""
    if stream is None:
        return lambda s="": None
    return lambda s="": print(s, file=stream, flush=True)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The demo's data: both splits as text and as character ids over ``vocab``, and
    the validation baselines (nats per character)."""

    train_text: str
    val_text: str
    vocab: list
    train_ids: np.ndarray
    val_ids: np.ndarray
    #: ``ln V``: guessing uniformly.
    uniform: float
    #: Validation cross-entropy of the training split's character frequencies (the
    #: characters after the first ``context``, the ones a model predicts).
    unigram: float

    @property
    def nclass(self):
        """V: the number of classes (characters of the vocabulary, ``<unk>`` included)."""
        return len(self.vocab)

    def unigram_loss(self, ids):
        """Cross-entropy (nats per character) of ``ids`` under the training split's
        character frequencies: the unigram baseline, counted over the training characters."""
        freq = np.bincount(self.train_ids, minlength=self.nclass) / len(self.train_ids)
        return float(-np.mean(np.log(np.maximum(freq[ids], 1e-12))))


def build_corpus(chars, context):
    """Step 1: the text split (:func:`load_text`), its vocabulary of the ``chars`` most
    frequent training characters plus ``<unk>``, the ids, and the baselines."""
    train_text, val_text = load_text()
    vocab = build_vocab(train_text, chars)
    train_ids, val_ids = encode(train_text, vocab), encode(val_text, vocab)
    data = Corpus(train_text, val_text, vocab, train_ids, val_ids, math.log(len(vocab)), math.nan)
    return dataclasses.replace(data, unigram=data.unigram_loss(val_ids[context:]))


def _print_setup(write, data, model, cfg, val_pos, unigram, n_dump):
    """The header: corpus, vocabulary, model and baselines."""
    V = data.nclass
    n_params = sum(w.size for w in model.params.values())
    write(f"fastloss demo: a character-level language model on Python's own documentation "
          f"(pydoc_data.topics, "
          f"{len(data.train_text) + len(data.val_text):,} characters)")
    write(f"  {len(data.train_ids):,} training / {len(data.val_ids):,} validation characters; vocabulary "
          f"{V} ({V - 1} characters + {UNK}); model: {cfg['context']} previous characters x {cfg['embed']}-d "
          f"embedding -> {cfg['hidden']} tanh -> {V} logits ({n_params:,} parameters)")
    write(f"  baselines on the {n_dump:,} validation characters evaluated at the end: uniform "
          f"ln V = {data.uniform:.4f} nats/char, unigram (counts from the {UNIGRAM_SOURCE}) = "
          f"{unigram:.4f}; the logged validation loss is on a sample of {len(val_pos):,} characters")


def _run_folder(out):
    """``(folder, temporary)``: ``out`` (created if needed), or a new temporary folder
    that the caller removes (then ``temporary`` is that folder, else None)."""
    if out is None:
        tmp = tempfile.mkdtemp(prefix="fastloss-demo-")
        return tmp, tmp
    folder = os.fspath(out)
    os.makedirs(folder, exist_ok=True)
    return folder, None


def _warm_up(nclass, write):
    """Step 2: compile (or load from the disk cache) the kernels the training calls."""
    t0 = time.perf_counter()
    cross_entropy_with_grad(np.zeros((2, nclass), np.float32), np.zeros(2, np.int64), inplace=True)
    cross_entropy(np.zeros((2, nclass), np.float32), np.zeros(2, np.int64))
    write(f"  kernel compile/load: {time.perf_counter() - t0:.2f} s (cached on disk afterwards)")


def _train(model, data, val_pos, rng, cfg, write):
    """Step 3: ``cfg["steps"]`` Adam steps on random minibatches, each loss and
    ``d loss / d logits`` from ``cross_entropy_with_grad(..., inplace=True)``;
    returns ``(history, seconds in the kernel)``, ``history`` the
    ``(step, train_loss, val_loss)`` logged every ``log_every`` steps."""
    k, train_ids, val_ids = cfg["context"], data.train_ids, data.val_ids
    write(f"  {'step':>6} {'train loss':>11} {'val loss':>9}")
    history, kernel_s = [], 0.0
    t_train = time.perf_counter()

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
    write(f"  {cfg['steps']} steps in {train_s:.1f} s, of which {kernel_s:.2f} s in "
          f"fastloss.cross_entropy_with_grad ({1e3 * kernel_s / cfg['steps']:.3f} ms per "
          f"{cfg['batch']} x {data.nclass} minibatch)")
    write()
    return history, kernel_s


def _dump(model, data, dump_pos, history, files):
    """Step 4: write the loss log, the validation dump (the characters at ``dump_pos``:
    every validation character, or for a quick run the logged sample) and the vocabulary."""
    with open(files["train_log.csv"], "w") as f:
        f.write("step,train_loss,val_loss\n")
        f.writelines(f"{s},{tr:.6f},{va:.6f}\n" for s, tr, va in history)
    np.save(files["val_logits.npy"], _logits_in_chunks(model, data.val_ids, dump_pos))
    np.save(files["val_targets.npy"], data.val_ids[dump_pos])
    with open(files["vocab.json"], "w") as f:
        json.dump(data.vocab, f)


def _evaluate(files, history, data, unigram, n_dump, write, temporary):
    """Step 5: ``fastloss.evaluate`` on the dump and ``diagnose`` on the log, printed
    and written as JSON; returns ``(EvalReport, CurveReport)``.

    Both reports use the demo's one unigram baseline (training-split frequencies) in
    place of ``evaluate``'s (frequencies of the evaluated characters). With
    ``temporary`` files the log is named by its file name alone: its folder is removed.
    """
    step, train_loss = history[-1][0], history[-1][1]
    report = evaluate(files["val_logits.npy"], files["val_targets.npy"], train_loss=train_loss)
    report = report.with_unigram(unigram, UNIGRAM_SOURCE)
    first = max(history[-2][0] + 1, 1) if len(history) > 1 else step
    report.train_loss_source = (f"mean minibatch loss of steps {first:,}-{step:,}, logged at "
                                f"step {step:,}")
    write(f"fastloss.evaluate on the validation dump ({n_dump:,} characters, the model at step "
          f"{step:,}):")
    write(report.format())
    log = read_log(files["train_log.csv"])
    if temporary:
        log = dataclasses.replace(log, source=os.path.basename(log.source))
    curves = diagnose(log, vocab=data.nclass, baseline=unigram, baseline_name=UNIGRAM_NAME)
    write(curves.format())
    write_json_atomic(report.to_dict(), files["eval_report.json"])
    write_json_atomic(curves.to_dict(), files["curves.json"])
    return report, curves


def _print_result(write, report, data):
    """Step 6: the validation loss against the two baselines."""
    final_val, unigram = report.mean_loss, report.unigram_baseline
    write(f"Result: validation loss {final_val:.4f} nats/char ({final_val / math.log(2):.3f} "
          f"bits/char); unigram baseline {unigram:.4f}, uniform ln V {data.uniform:.4f}. "
          + (baseline_comparison(final_val, data.uniform, unigram, report.unigram_source) or ""))


def _plots(folder, log_path, report, curves, vocab, unigram, write):
    """Draw curves.png and eval.png into ``folder``; a note instead when matplotlib is missing."""
    from .evaluation.plot import plot_curves, plot_report

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    paths = {"curves.png": os.path.join(folder, "curves.png"),
             "eval.png": os.path.join(folder, "eval.png")}
    try:
        plot_curves(log_path, paths["curves.png"], vocab=vocab, baseline=unigram,
                    baseline_name=UNIGRAM_NAME, report=curves)
        plot_report(report.to_dict(), paths["eval.png"])
    except RuntimeError as e:
        write(f"No plots: {e}")
        return {}
    write(f"Plots: {paths['curves.png']}, {paths['eval.png']}")
    return paths


if __name__ == "__main__":  # pragma: no cover
    run_demo(stream=sys.stdout)
