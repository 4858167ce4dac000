"""Vocabulary-sharded statistics (fastloss.vocab_row_stats and friends) against an
unsharded float64 numpy reference, fastloss.cross_entropy and the evaluation
kernel fastloss.cpu.eval_metrics.eval_rows.

Tolerances (relative, on s, a, the loss, entropy and confidence):
* float64 logits, and any dtype with exact=True: 1e-12 against the float64
  reference of the same stored values (the statistics are float64 to a few ulp);
* float32/float16/bfloat16 with the default exact=False: 1e-5 (float32 exps
  and float32 sums within 2048-column blocks: ~1e-7 per exp, ~1e-6 per block);
* max, target logit, top-K pairs and rank: exact in every case;
* against eval_rows and fastloss.cross_entropy (float32 accumulation for
  float32/half logits): 1e-5, 1e-12 for float64 logits;
* merge associativity and order: 1e-14.
"""

import pickle

import ml_dtypes
import numpy as np
import pytest
from reference import to_float64

import fastloss
from fastloss import _validate as V
from fastloss.cpu.eval_metrics import eval_rows

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BF16]
IGN = -100


def _tol(dtype, exact):
    return 1e-12 if exact or dtype == np.float64 else 1e-5


# --- the float64 reference, on the stored values -----------------------------------------

def ref_stats(x, targets, k):
    """Per-row (m, s, a, zt, top values, top indices, rank capped at k) of the full
    float64 logits x (N, V) with flat targets (-1: ignored), by plain numpy."""
    n, nv = x.shape
    m = np.full(n, np.nan)
    s = np.full(n, np.nan)
    a = np.full(n, np.nan)
    zt = np.full(n, np.nan)
    topv = np.full((n, k), -np.inf)
    topi = np.full((n, k), -1, np.int64)
    rank = np.full(n, -1, np.int64)
    idx = np.arange(nv)
    for i in range(n):
        z = x[i]
        t = targets[i]
        ok = ~np.isnan(z)
        order = np.lexsort((idx, -z))
        order = order[ok[order]][:k]
        topv[i, :order.size] = z[order]
        topi[i, :order.size] = order
        if t >= 0:
            zt[i] = z[t]
            rank[i] = min(k, int(np.sum(z > z[t]) + np.sum(z[:t] == z[t])))
        if np.isnan(z).any():
            continue
        m[i] = z.max()
        if m[i] == np.inf:
            continue
        if m[i] == -np.inf:
            s[i] = a[i] = 0.0
            continue
        fin = np.isfinite(z)
        d = z[fin] - m[i]
        e = np.exp(d)
        s[i] = e.sum()
        a[i] = (e * d).sum()
    return m, s, a, zt, topv, topi, rank


def ref_metrics(x, targets):
    """Per-row (loss, entropy, confidence) in float64 from the softmax itself;
    NaN where eval_rows gives NaN, 0 at ignored rows."""
    n = x.shape[0]
    out = np.zeros((3, n))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for i in range(n):
            z = x[i]
            if targets[i] < 0:
                continue
            m = z.max()
            if not np.isfinite(m):
                out[:, i] = np.nan
                continue
            e = np.exp(z - m)
            lse = m + np.log(e.sum())
            p = np.exp(z - lse)
            lp = np.where(p > 0, z - lse, 0.0)
            out[0, i] = lse - z[targets[i]]
            out[1, i] = -np.sum(p * lp)
            out[2, i] = p.max()
    return out


def run_eval_rows(x, targets):
    """(loss, entropy, confidence, rank) of fastloss's evaluation kernel on the full logits."""
    n = x.shape[0]
    xk = V.kernel_view(x)
    loss, ent, conf = np.empty(n), np.empty(n), np.empty(n)
    rank = np.empty(n, np.int64)
    ntask = V.num_tasks(n, x.size)
    with V.kernel_launch(ntask):
        eval_rows(xk, targets, V.acc_dtype(x.dtype).type(0), ntask, loss, ent, conf, rank)
    return loss, ent, conf, rank


def sharded(x, targets, bounds, k=5, exact=False, order=None):
    """The slices' statistics of x cut at ``bounds`` and their merge (in ``order``)."""
    edges = [0, *bounds, x.shape[-1]]
    parts = [fastloss.vocab_row_stats(x[..., lo:hi], targets, lo, top_k=k, exact=exact)
             for lo, hi in zip(edges, edges[1:])]
    merged = fastloss.merge_vocab_row_stats(parts if order is None else [parts[i] for i in order])
    return parts, merged


def check_against_reference(x, targets, bounds, k, exact=False):
    """Merged statistics and every derived metric against the reference, eval_rows and cross_entropy."""
    flat_t = np.where(targets == IGN, -1, targets).reshape(-1)
    parts, st = sharded(x, targets, bounds, k, exact)
    x64 = to_float64(x).reshape(-1, x.shape[-1])
    tol = _tol(x.dtype, exact)
    for part in parts:  # each slice on its own (the merge re-sorts the top lists)
        (lo, hi), = part.vocab_ranges
        inside = (flat_t >= lo) & (flat_t < hi)
        m, s, a, zt, topv, topi, _ = ref_stats(x64[:, lo:hi], np.where(inside, flat_t - lo, -1), k)
        np.testing.assert_array_equal(part.max, m)
        np.testing.assert_allclose(part.sumexp, s, rtol=tol, atol=0)
        np.testing.assert_allclose(part.sumexp_dev, a, rtol=tol, atol=tol)
        np.testing.assert_array_equal(part.target_logit, zt)
        np.testing.assert_array_equal(part.has_target, inside)
        np.testing.assert_array_equal(part.top_values, topv)
        np.testing.assert_array_equal(part.top_index, np.where(topi < 0, -1, topi + lo))
    m, s, a, zt, topv, topi, rank = ref_stats(x64, flat_t, k)
    np.testing.assert_array_equal(st.max, m)
    np.testing.assert_allclose(st.sumexp, s, rtol=tol, atol=0)
    np.testing.assert_allclose(st.sumexp_dev, a, rtol=tol, atol=tol)
    np.testing.assert_array_equal(st.target_logit, zt)
    np.testing.assert_array_equal(st.has_target, flat_t >= 0)
    np.testing.assert_array_equal(st.top_values, topv)
    np.testing.assert_array_equal(st.top_index, topi)
    np.testing.assert_array_equal(st.rank().reshape(-1), rank)
    loss, ent, conf = ref_metrics(x64, flat_t)
    np.testing.assert_allclose(st.loss().reshape(-1), loss, rtol=tol, atol=tol)
    np.testing.assert_allclose(st.entropy().reshape(-1), ent, rtol=tol, atol=tol)
    np.testing.assert_allclose(st.confidence().reshape(-1), conf, rtol=tol, atol=tol)
    assert st.loss().shape == targets.shape
    # fastloss's own kernels on the gathered logits (float32 accumulation below float64)
    ktol = 1e-12 if x.dtype == np.float64 else 1e-5
    el, ee, ec, er = run_eval_rows(x.reshape(-1, x.shape[-1]), flat_t)
    np.testing.assert_allclose(st.loss().reshape(-1), el, rtol=ktol, atol=ktol)
    # eval_rows documents NaN for an all -inf row but, for float64 logits, clamps
    # the exponent at -88 (exp = 6e-39, not 0) and reports entropy log V and
    # confidence 1/V there: such rows are compared with the reference only.
    live = ~np.all(x64 == -np.inf, axis=1)
    np.testing.assert_allclose(st.entropy().reshape(-1)[live], ee[live], rtol=ktol, atol=ktol)
    np.testing.assert_allclose(st.confidence().reshape(-1)[live], ec[live], rtol=ktol, atol=ktol)
    np.testing.assert_array_equal(st.rank().reshape(-1), np.where(flat_t < 0, -1, np.minimum(er, k)))
    with np.errstate(invalid="ignore"):
        ce = fastloss.cross_entropy(x, targets, reduction="none")
    np.testing.assert_allclose(fastloss.vocab_parallel_cross_entropy(st, reduction="none"), ce,
                               rtol=ktol, atol=ktol)
    return st


def realistic(rng, dtype, n=64, nv=32000, bounds=(10007, 21011)):
    """(n, nv) logits with -inf masks (row 3: all -inf in the slice [b0, b1)),
    rows of large logits, rows whose values climb block after block (the
    lazy-max redo), and targets in every slice of ``bounds`` = (b0, b1)."""
    b0, b1 = bounds
    x = rng.standard_normal((n, nv)) * 3
    x[1] = x[1] * 40 + 1e3
    x[2] += np.linspace(0, 400, nv)  # a new max every block
    x[4, rng.choice(nv, nv // 2, replace=False)] = -np.inf
    x[3, b0:b1] = -np.inf
    x = x.astype(dtype)
    t = rng.integers(0, nv, n)
    t[:6] = [5, b0 + 1, b1 + 3, b0 - 1, b1, nv - 1]  # in every slice, at its edges
    t[[7, 20]] = IGN
    t[3] = 0
    return x, t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_realistic_three_unequal_slices(rng, dtype):
    x, t = realistic(rng, dtype)
    st = check_against_reference(x, t, [10007, 21011], 5)
    assert st.vocab_ranges == ((0, 10007), (10007, 21011), (21011, 32000))


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float16), BF16], ids=str)
def test_exact_is_float64_for_every_dtype(rng, dtype):
    x, t = realistic(rng, dtype, n=24, nv=9001, bounds=(2048, 4999))
    check_against_reference(x, t, [2048, 4999], 5, exact=True)
    # the exact statistics of one slice are those of its float64 copy
    a = fastloss.vocab_row_stats(x, t, 0, exact=True)
    b = fastloss.vocab_row_stats(to_float64(x), t, 0)
    np.testing.assert_allclose(a.sumexp, b.sumexp, rtol=1e-14)
    np.testing.assert_allclose(a.sumexp_dev, b.sumexp_dev, rtol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, nv, bounds, k", [
    (5, 7, [1, 2, 5], 5),        # w=1 slices, all narrower than K
    (3, 7, [3], 10),             # K > V: padded even after the merge
    (1, 1, [], 5),               # one class
    (2, 3, [1, 2], 1),
    (4, 300, [1, 150], 200),     # many picks of chunks
    (6, 4100, [2049, 4099], 3),  # slices of a few blocks, one of width 1
], ids=lambda v: str(v).replace(" ", ""))
def test_odd_and_tiny_shapes(rng, dtype, n, nv, bounds, k):
    x = (rng.standard_normal((n, nv)) * 3).astype(dtype)
    t = rng.integers(0, nv, n)
    if n > 2:
        t[1] = IGN
    check_against_reference(x, t, bounds, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_across_slice_boundaries(rng, dtype):
    # integer logits: many ties, with the target's equals on both sides of slice edges
    x = rng.integers(-3, 3, (40, 300)).astype(dtype)
    x[:, 99:102] = 2
    t = rng.integers(0, 300, 40)
    t[:4] = [100, 101, 99, 250]
    st = check_against_reference(x, t, [100, 101, 200], 8)
    assert (st.top_values == 2).all() and (np.diff(st.top_index, axis=1) > 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_rows(rng, dtype):
    nv = 2500
    x = (rng.standard_normal((9, nv)) * 3).astype(np.float64)
    x[0, 5] = np.nan              # NaN in the first slice
    x[1, 2400] = np.inf           # +inf in the last
    x[2, 1000] = np.inf
    x[2, 10] = np.nan
    x[3, 2100] = -np.nan          # a NaN with the sign bit (hidden from ordered-bits maxima)
    x[4, :] = -np.inf             # all -inf: NaN loss as eval_rows
    x[5, 7] = -np.inf             # the target's logit masked: +inf loss
    x[6, :1200] = -np.inf
    x[6, 1300] = np.nan
    x[7, 600] = np.inf            # target is the +inf
    x = x.astype(dtype)
    t = np.array([1, 2, 3, 4, 5, 7, 0, 600, 8])
    st = check_against_reference(x, t, [1200, 2048], 5)
    loss = st.loss()
    el = run_eval_rows(x, t)[0]
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(el))
    assert np.isnan(loss[[0, 1, 2, 3, 4, 6, 7]]).all() and loss[5] == np.inf and np.isfinite(loss[8])
    assert np.isnan(st.max[[0, 2, 3, 6]]).all() and st.max[1] == np.inf and st.max[4] == -np.inf
    assert st.sumexp[4] == 0 and st.sumexp_dev[4] == 0 and np.isnan(st.sumexp[[0, 1, 2, 3]]).all()


@pytest.mark.parametrize("first, second", [(400, 10), (3000, 10), (3000, 2100)])
def test_top_ties_found_out_of_order(rng, first, second):
    # The max's chunk (or block) is read first and fills the list; a value equal
    # to the K-th kept one in an earlier chunk (block) must still displace it.
    x = rng.uniform(-1, 0, (2, 5000))
    x[:, first] = 5.0
    x[:, first + 1] = 4.0
    x[:, second] = 4.0
    t = np.array([second, first + 1])
    check_against_reference(x, t, [], 2)
    st = fastloss.vocab_row_stats(x, t, 0, top_k=2)
    np.testing.assert_array_equal(st.top_index, [[first, second]] * 2)
    np.testing.assert_array_equal(st.rank(), [1, 2])


def test_all_neginf_slice_drops_out(rng):
    x = rng.standard_normal((3, 20))
    x[:, 5:12] = -np.inf
    t = np.array([0, 15, 6])
    parts, st = sharded(x, t, [5, 12])
    assert (parts[1].max == -np.inf).all() and (parts[1].sumexp == 0).all() and (parts[1].sumexp_dev == 0).all()
    assert (parts[1].top_index >= 5).all()  # -inf values are kept with their index
    np.testing.assert_allclose(st.logsumexp(), fastloss.logsumexp(x), rtol=1e-14)
    assert st.loss()[2] == np.inf


@pytest.mark.parametrize("dtype", [np.dtype(np.float64), np.dtype(np.float32)], ids=str)
def test_merge_is_associative_and_order_independent(rng, dtype):
    x, t = realistic(rng, dtype, n=32, nv=5000, bounds=(1234, 4000))
    parts, flat = sharded(x, t, [1234, 1235, 4000])
    a, b, c, d = parts
    m = fastloss.merge_vocab_row_stats
    merges = [m([m([a, b]), m([c, d])]), m([a, m([b, m([c, d])])]), m([m([m([a, b]), c]), d]),
              m(parts[::-1]), m([c, a, d, b])]
    for other in merges:
        assert other.vocab_ranges == flat.vocab_ranges
        np.testing.assert_array_equal(other.max, flat.max)
        np.testing.assert_allclose(other.sumexp, flat.sumexp, rtol=1e-14)
        np.testing.assert_allclose(other.sumexp_dev, flat.sumexp_dev, rtol=1e-14)
        np.testing.assert_array_equal(other.target_logit, flat.target_logit)
        np.testing.assert_array_equal(other.top_values, flat.top_values)
        np.testing.assert_array_equal(other.top_index, flat.top_index)
        np.testing.assert_allclose(other.loss(), flat.loss(), rtol=1e-14)
        np.testing.assert_array_equal(other.rank(), flat.rank())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_reductions_and_leading_shape(rng, reduction):
    x = rng.standard_normal((2, 3, 50))
    t = rng.integers(0, 50, (2, 3))
    t[0, 1] = IGN
    _, st = sharded(x, t, [17, 30])
    assert st.rows_shape == (2, 3)
    got = fastloss.vocab_parallel_cross_entropy(st, reduction=reduction)
    want = fastloss.cross_entropy(x, t, reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-13)
    if reduction != "none":
        assert isinstance(got, float)
    # the slices' statistics, unmerged, give the same
    parts, _ = sharded(x, t, [17, 30])
    np.testing.assert_allclose(fastloss.vocab_parallel_cross_entropy(parts, reduction=reduction), want, rtol=1e-13)


def test_no_counted_rows_and_no_rows(rng):
    x = rng.standard_normal((3, 9))
    _, st = sharded(x, np.full(3, IGN), [4])
    assert fastloss.vocab_parallel_cross_entropy(st) == 0.0
    np.testing.assert_array_equal(st.rank(), [-1, -1, -1])
    np.testing.assert_array_equal(st.entropy(), [0.0, 0.0, 0.0])
    _, st = sharded(np.zeros((0, 9), np.float32), np.zeros(0, np.int64), [4])
    assert st.max.shape == (0,) and st.top_values.shape == (0, 5)
    assert fastloss.vocab_parallel_cross_entropy(st) == 0.0
    assert fastloss.vocab_parallel_cross_entropy(st, reduction="none").shape == (0,)


def test_ignore_index_and_single_slice(rng):
    x = rng.standard_normal((4, 11)).astype(np.float32)
    t = np.array([3, 0, 10, 0])
    st = fastloss.vocab_row_stats(x, t, 0, ignore_index=0)
    np.testing.assert_array_equal(st.targets, [3, -1, 10, -1])
    want = fastloss.cross_entropy(x, t, ignore_index=0, reduction="sum")
    np.testing.assert_allclose(fastloss.vocab_parallel_cross_entropy(st, reduction="sum"), want, rtol=1e-6)


def test_pickles_small_and_intact(rng):
    x = rng.standard_normal((100, 1000)).astype(np.float32)
    t = rng.integers(0, 1000, 100)
    st = fastloss.vocab_row_stats(x[:, 200:700], t, 200)
    blob = pickle.dumps(st)
    assert len(blob) < 100 * (5 * 8 + 1 + 2 * 5 * 8) + 2000
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back.top_index, st.top_index)
    np.testing.assert_array_equal(back.sumexp, st.sumexp)
    assert back.vocab_ranges == ((200, 700),) and back.rows_shape == (100,)


def test_missing_slice_is_an_error_for_the_loss(rng):
    x = rng.standard_normal((3, 10))
    t = np.array([1, 8, IGN])
    parts, _ = sharded(x, t, [5])
    with pytest.raises(ValueError, match=r"targets: 1 counted target\(s\) lie in none of the vocabulary ranges "
                                         r"\[\(0, 5\)\].*first at position \(1,\): 8"):
        parts[0].loss()
    with pytest.raises(ValueError, match="targets: .*the rank"):
        parts[0].rank()
    with pytest.raises(ValueError, match="targets: "):
        fastloss.vocab_parallel_cross_entropy(parts[1])
    assert np.isfinite(parts[0].entropy()[:2]).all()  # metrics without the target need no other slice


def test_bad_inputs_name_the_argument(rng):
    x = rng.standard_normal((3, 10))
    t = np.array([1, 8, 2])
    f = fastloss.vocab_row_stats
    with pytest.raises(TypeError, match="logits: expected dtype"):
        f(x.astype(np.int32), t, 0)
    with pytest.raises(TypeError, match="targets: expected an integer dtype"):
        f(x, t.astype(np.float64), 0)
    with pytest.raises(ValueError, match=r"targets: expected shape \(3,\)"):
        f(x, t[:2], 0)
    with pytest.raises(ValueError, match=r"targets: 1 value\(s\) are negative .*first at position \(1,\): -5"):
        f(x, np.array([1, -5, 2]), 0)
    with pytest.raises(ValueError, match="vocab_start: expected an integer >= 0, found -1"):
        f(x, t, -1)
    with pytest.raises(TypeError, match="vocab_start: expected an integer, found float"):
        f(x, t, 2.0)
    with pytest.raises(ValueError, match="top_k: expected an integer >= 1, found 0"):
        f(x, t, 0, top_k=0)
    with pytest.raises(TypeError, match="top_k: expected an integer, found bool"):
        f(x, t, 0, top_k=True)
    with pytest.raises(TypeError, match="ignore_index: expected an integer"):
        f(x, t, 0, ignore_index=1.5)
    with pytest.raises(TypeError, match="exact: expected True or False"):
        f(x, t, 0, exact=1)
    with pytest.raises(ValueError, match="logits: the class dimension"):
        f(x[:, :0], t, 0)

    a = f(x[:, :5], t, 0)
    b = f(x[:, 5:], t, 5)
    m = fastloss.merge_vocab_row_stats
    with pytest.raises(ValueError, match=r"stats: item 1 has rows of shape \(2,\), item 0 \(3,\)"):
        m([a, f(x[:2, 5:], t[:2], 5)])
    with pytest.raises(ValueError, match="stats: item 1 has other targets than item 0"):
        m([a, f(x[:, 5:], np.array([1, 8, 3]), 5)])
    with pytest.raises(ValueError, match="stats: item 1 has top_k=3, item 0 top_k=5"):
        m([a, f(x[:, 5:], t, 5, top_k=3)])
    with pytest.raises(ValueError, match=r"stats: the vocabulary ranges \[0, 5\) and \[4, 9\) overlap"):
        m([a, f(x[:, 4:9], t, 4)])
    with pytest.raises(ValueError, match="overlap"):
        m([m([a, b]), a])
    with pytest.raises(TypeError, match="stats: expected a sequence of VocabRowStats, found VocabRowStats"):
        m(a)
    with pytest.raises(TypeError, match="stats: expected a non-empty sequence"):
        m([])
    with pytest.raises(TypeError, match="stats: item 1 is a ndarray"):
        m([a, x])
    with pytest.raises(ValueError, match="reduction: expected one of"):
        fastloss.vocab_parallel_cross_entropy([a, b], reduction="avg")


def test_lazy_import():
    import fastloss as fl
    assert "vocab_row_stats" in fl.__all__ and "VocabRowStats" in dir(fl)
    assert fl.VocabRowStats.__module__ == "fastloss.ops.vocab_parallel"
