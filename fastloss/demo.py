"""``fastloss demo``: a short, self-contained training run on synthetic data.

A teacher linear model over random features defines a class distribution per
example; a student softmax-regression model learns it with Adam, taking every
gradient from :func:`fastloss.cross_entropy_with_grad` (in place, into the
logits buffer). The run prints train/validation loss against the uniform
baseline ``ln V`` and the teacher's own loss (the best achievable).
"""

import math
import time

import numpy as np

from .ops.cross_entropy import cross_entropy, cross_entropy_with_grad


def _make_data(rng, n, dim, teacher):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    logits = x @ teacher.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    # Sample one class per example from the teacher's distribution.
    u = rng.random((n, 1))
    y = (p.cumsum(axis=1) < u).sum(axis=1)
    return x, np.minimum(y, teacher.shape[0] - 1).astype(np.int64)


def run_demo(steps=150, vocab=512, seed=0, stream=None, dim=32, n_train=32768, n_val=8192,
             lr=0.02, log_every=15):
    """Train the student and print a loss log to ``stream``; returns a dict of results."""
    write = (lambda s: print(s, file=stream)) if stream is not None else (lambda s: None)
    rng = np.random.default_rng(seed)
    teacher = (rng.standard_normal((vocab, dim)) * (3.0 / math.sqrt(dim))).astype(np.float32)
    x_tr, y_tr = _make_data(rng, n_train, dim, teacher)
    x_va, y_va = _make_data(rng, n_val, dim, teacher)
    w = np.zeros((vocab, dim), np.float32)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    logits = np.empty((n_train, vocab), np.float32)
    best = cross_entropy(x_va @ teacher.T, y_va)
    write(f"fastloss demo: softmax regression, {n_train} train / {n_val} validation examples, "
          f"{dim} features, {vocab} classes")
    write(f"uniform baseline ln V = {math.log(vocab):.4f} nats; teacher (best achievable) "
          f"= {best:.4f} nats on validation")
    t0 = time.perf_counter()
    cross_entropy_with_grad(np.ones((2, vocab), np.float32), y_tr[:2])  # JIT-compile (or load) once
    write(f"kernel compile/load: {time.perf_counter() - t0:.2f} s (cached on disk for later runs)")
    write(f"{'step':>6} {'train loss':>11} {'val loss':>9} {'loss ms/step':>13}")
    loss_time = 0.0
    history = []
    for step in range(1, steps + 1):
        np.matmul(x_tr, w.T, out=logits)
        t0 = time.perf_counter()
        train_loss, grad = cross_entropy_with_grad(logits, y_tr, inplace=True)
        loss_time += time.perf_counter() - t0
        gw = grad.T @ x_tr
        # Adam
        m *= 0.9
        m += 0.1 * gw
        v *= 0.999
        v += 0.001 * gw * gw
        mh = m / (1 - 0.9 ** step)
        vh = v / (1 - 0.999 ** step)
        w -= lr * mh / (np.sqrt(vh) + 1e-8)
        if step == 1 or step % log_every == 0 or step == steps:
            val_loss = cross_entropy(x_va @ w.T, y_va)
            history.append((step, train_loss, val_loss))
            write(f"{step:>6} {train_loss:>11.4f} {val_loss:>9.4f} {1e3 * loss_time / step:>13.2f}")
    closed = (math.log(vocab) - history[-1][2]) / (math.log(vocab) - best)
    write(f"validation loss closed {100 * closed:.1f}% of the gap between the uniform baseline "
          f"and the teacher")
    return {"history": history, "teacher_loss": best, "uniform": math.log(vocab)}
