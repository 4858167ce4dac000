"""``fastloss.compare`` / ``fastloss compare``: every figure against float64 numpy, the
exact percentile selector, the spill path, errors through the API and the CLI."""

import json
import math
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

import fastloss
from fastloss.cli import main
from fastloss.evaluation import EvalInputError, Layout
from fastloss.evaluation import comparison as C
from fastloss.evaluation import metrics as M

BF16 = np.dtype(ml_dtypes.bfloat16)
IGNORE = -100


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - logsumexp(x, axis=-1, keepdims=True)


def _reference(base, model, targets=None, ignore_index=IGNORE):
    """Float64 per-token figures of the counted tokens: dict of arrays."""
    la = _log_softmax(base)
    lb = _log_softmax(model)
    pa = np.exp(la)
    with np.errstate(invalid="ignore"):
        terms = np.where(pa > 0, pa * (la - lb), 0.0)
    kl = terms.sum(-1)
    ref = {"kl": kl, "agree": np.argmax(base, -1) == np.argmax(model, -1),
           "arg_a": np.argmax(base, -1), "arg_b": np.argmax(model, -1),
           "keep": np.ones(kl.shape, bool), "pos": np.arange(kl.size)}
    if targets is not None:
        keep = targets != ignore_index
        t = np.where(keep, targets, 0)
        lpa = np.take_along_axis(la, t[:, None], -1)[:, 0]
        lpb = np.take_along_axis(lb, t[:, None], -1)[:, 0]
        ref.update(keep=keep, lpa=lpa[keep], lpb=lpb[keep], target=targets[keep])
    k = ref["keep"]
    for name in ("kl", "agree", "arg_a", "arg_b", "pos"):
        ref[name] = ref[name][k]
    return ref


def _stderr(x):
    return np.std(x, ddof=1) / math.sqrt(x.size)


def _check_report(r, ref, tol, seq_len=None, top=20):
    """Every figure of ``r`` against the float64 reference ``ref`` (abs. tolerance on
    per-token values ``tol``)."""
    kl = ref["kl"]
    n = kl.size
    assert r.tokens == n
    assert r.mean_kl == pytest.approx(kl.mean(), abs=tol)
    assert r.kl_stderr == pytest.approx(_stderr(kl), rel=1e-3, abs=tol)
    assert list(r.kl_percentiles) == [0.0, 0.1, 1.0, 5.0, 10.0, 50.0, 90.0, 95.0, 99.0, 99.9, 100.0]
    assert all(type(q) is float for q in r.kl_percentiles)
    want = np.percentile(kl, C.KL_PERCENTILES)
    np.testing.assert_allclose(list(r.kl_percentiles.values()), want, rtol=0, atol=tol)
    assert r.top1_agreement == ref["agree"].mean()
    a = ref["agree"].mean()
    assert r.top1_agreement_stderr == pytest.approx(math.sqrt(a * (1 - a) / n))
    # the largest KL: the values are the reference's top ones, and at each reported
    # position the reference agrees on the KL, both argmaxes and the target
    got = [d["kl"] for d in r.top_disagreements]
    assert len(got) == min(top, n) and got == sorted(got, reverse=True)
    np.testing.assert_allclose(got, np.sort(kl)[::-1][:len(got)], atol=tol)
    where = {p: i for i, p in enumerate(ref["pos"].tolist())}
    for d in r.top_disagreements:
        i = where[d["position"]]
        assert d["kl"] == pytest.approx(kl[i], abs=tol)
        assert (d["base_argmax"], d["model_argmax"]) == (ref["arg_a"][i], ref["arg_b"][i])
        assert d["target"] == (ref["target"][i] if "target" in ref else None)
    if "lpa" in ref:
        nll_a, nll_b = -ref["lpa"], -ref["lpb"]
        assert r.ppl_base == pytest.approx(math.exp(nll_a.mean()), rel=tol)
        assert r.ppl_model == pytest.approx(math.exp(nll_b.mean()), rel=tol)
        assert r.ppl_base_stderr == pytest.approx(math.exp(nll_a.mean()) * _stderr(nll_a), rel=1e-4)
        assert r.ppl_model_stderr == pytest.approx(math.exp(nll_b.mean()) * _stderr(nll_b), rel=1e-4)
        d = nll_b - nll_a
        assert r.log_ppl_ratio == pytest.approx(d.mean(), abs=tol)
        assert r.log_ppl_ratio == pytest.approx(math.log(r.ppl_model / r.ppl_base), abs=1e-9)
        assert r.log_ppl_ratio_stderr == pytest.approx(_stderr(d), rel=1e-3, abs=tol)
        dp = np.exp(ref["lpb"]) - np.exp(ref["lpa"])
        assert r.delta_p_mean == pytest.approx(dp.mean(), abs=tol)
        assert r.delta_p_stderr == pytest.approx(_stderr(dp), rel=1e-3, abs=tol)
        assert r.delta_p_rms == pytest.approx(math.sqrt((dp ** 2).mean()), rel=1e-4, abs=tol)
        np.testing.assert_allclose(list(r.delta_p_percentiles.values()),
                                   np.percentile(dp, C.DELTA_P_PERCENTILES), atol=tol)
        assert r.logprob_correlation == pytest.approx(np.corrcoef(ref["lpa"], ref["lpb"])[0, 1],
                                                      abs=1e-6)
    else:
        assert r.ppl_base is None and r.log_ppl_ratio is None and r.delta_p_percentiles is None
    if seq_len is not None:
        pos = ref["pos"] % seq_len
        cnt = np.bincount(pos, minlength=seq_len)
        s = np.bincount(pos, weights=kl, minlength=seq_len)
        assert r.per_position_count == cnt.tolist()
        for got_p, c, sp in zip(r.per_position_kl, cnt, s, strict=True):
            assert (got_p is None) if c == 0 else got_p == pytest.approx(sp / c, abs=tol)
    hist = r.kl_histogram
    assert sum(hist["counts"]) + hist["below"] == n


def _pair(rng, n, v, noise, dtype=np.float32):
    base = rng.normal(size=(n, v)) * 2.0
    model = base + noise * rng.normal(size=(n, v))
    return base.astype(dtype), model.astype(dtype)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """300,000 tokens x 64 classes, float32: base as three .npy shards, model as two raw
    shards of other sizes; targets with ignored tokens; the float64 reference."""
    rng = np.random.default_rng(11)
    n, v = 300_000, 64
    base, model = _pair(rng, n, v, 0.3)
    t = rng.integers(0, v, n)
    t[rng.random(n) < 0.1] = IGNORE
    d = tmp_path_factory.mktemp("big")
    bcuts, mcuts = [0, 100_003, 250_000, n], [0, 70_001, n]
    bfiles, mfiles = [], []
    for k in range(3):
        f = d / f"base-{k}.npy"
        np.save(f, base[bcuts[k]:bcuts[k + 1]])
        bfiles.append(str(f))
    for k in range(2):
        f = d / f"model-{k}.bin"
        model[mcuts[k]:mcuts[k + 1]].tofile(f)
        mfiles.append(str(f))
    np.save(d / "targets.npy", t)
    ref = _reference(base, model, t)
    ref_all = _reference(base, model)
    return {"dir": d, "base": bfiles, "model": mfiles, "targets": str(d / "targets.npy"),
            "layout": Layout(raw_dtype="float32", vocab=v), "ref": ref, "ref_all": ref_all,
            "arrays": (base, model, t)}


@pytest.mark.parametrize("spill", [False, True])
def test_big_sharded_dump_every_figure(big, spill, monkeypatch, tmp_path):
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    if spill:
        monkeypatch.setattr(fastloss.config, "COMPARE_SPILL_MEMORY_BYTES", 1 << 16)
        monkeypatch.setattr(fastloss.config, "COMPARE_SPILL_READ_VALUES", 10_007)
        monkeypatch.setattr(fastloss.config, "COMPARE_SELECT_GATHER", 500)
    r = fastloss.compare(big["base"], big["model"], big["targets"], layout=big["layout"],
                         seq_len=1000, tmpdir=str(spill_dir), chunk_tokens=40_000)
    assert r.spilled is spill
    assert os.listdir(spill_dir) == []  # the temporary files are gone
    assert r.ignored == int((~big["ref"]["keep"]).sum())
    _check_report(r, big["ref"], 2e-6, seq_len=1000)
    assert r.base_files == big["base"] and r.model_files == big["model"]
    if spill:
        base, model, t = big["arrays"]
        monkeypatch.undo()
        mem = fastloss.compare(base, model, t, seq_len=1000)
        assert not mem.spilled
        # the same per-token values, so the same exact percentiles
        assert r.kl_percentiles == mem.kl_percentiles
        assert r.delta_p_percentiles == mem.delta_p_percentiles


def test_big_without_targets_counts_every_token(big):
    r = fastloss.compare(big["base"], big["model"], layout=big["layout"], top=7)
    assert r.ignored == 0 and r.targets_files == []
    _check_report(r, big["ref_all"], 2e-6, top=7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, BF16])
def test_self_comparison_is_exactly_zero(dtype, tmp_path):
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(3001, 2500)) * 3).astype(dtype)  # two row blocks, a partial one
    x[5, :100] = -np.inf
    t = rng.integers(0, 2500, 3001)
    t[::5] = IGNORE
    x.tofile(tmp_path / "x.bin")  # raw: .npy cannot hold bfloat16
    r = fastloss.compare(x, str(tmp_path / "x.bin"), t, seq_len=3001,
                         layout=Layout(raw_dtype=np.dtype(dtype), vocab=2500))
    assert r.mean_kl == 0.0 and r.kl_stderr == 0.0
    assert set(r.kl_percentiles.values()) == {0.0}
    assert r.top1_agreement == 1.0 and r.top1_agreement_stderr == 0.0
    assert r.log_ppl_ratio == 0.0 and r.log_ppl_ratio_stderr == 0.0
    assert r.ppl_base == r.ppl_model
    assert set(r.delta_p_percentiles.values()) == {0.0} and r.delta_p_rms == 0.0
    assert r.logprob_correlation == pytest.approx(1.0)
    assert all(v == 0.0 for v in r.per_position_kl if v is not None)


@pytest.mark.parametrize("bdtype, mdtype, tol", [
    (np.float32, np.float32, 2e-6),
    (np.float64, np.float64, 1e-11),
    (np.float32, np.float64, 1e-11),
    (np.float16, np.float32, 2e-6),
    (BF16, np.float16, 2e-6),
    (BF16, BF16, 2e-6),
])
def test_dtypes_against_float64(bdtype, mdtype, tol):
    rng = np.random.default_rng(4)
    base, model = _pair(rng, 997, 3001, 0.2, np.float64)  # odd: not a multiple of the block
    base, model = base.astype(bdtype), model.astype(mdtype)
    t = rng.integers(0, 3001, 997)
    t[3] = IGNORE
    r = fastloss.compare(base, model, t, chunk_tokens=101, top=5)
    _check_report(r, _reference(base.astype(np.float64), model.astype(np.float64), t), tol, top=5)


def test_against_torch_kl_div_and_cross_entropy():
    """PyTorch as a second oracle: F.kl_div(log q, log p, log_target=True) summed over
    classes is KL(p || q); F.nll_loss of the log-softmax gives both mean NLLs."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(14)
    base, model = _pair(rng, 513, 1000, 0.5, np.float64)
    t = rng.integers(0, 1000, 513)
    r = fastloss.compare(base.astype(np.float32), model.astype(np.float32), t)
    lp = F.log_softmax(torch.tensor(base.astype(np.float32), dtype=torch.float64), -1)
    lq = F.log_softmax(torch.tensor(model.astype(np.float32), dtype=torch.float64), -1)
    kl = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).numpy()
    assert r.mean_kl == pytest.approx(kl.mean(), abs=2e-6)
    assert r.kl_percentiles[50.0] == pytest.approx(np.percentile(kl, 50), abs=2e-6)
    tt = torch.tensor(t)
    assert r.mean_nll_base == pytest.approx(F.nll_loss(lp, tt).item(), rel=1e-6)
    assert r.mean_nll_model == pytest.approx(F.nll_loss(lq, tt).item(), rel=1e-6)


def test_masked_logits_and_small_shapes():
    """-inf logits: 0 log 0 = 0 where the base has none of the mass; KL = inf where the
    model gives none to a class the base gives some; one class; one token."""
    rng = np.random.default_rng(5)
    base, model = _pair(rng, 50, 9, 0.5)
    base[0, :4] = -np.inf
    model[0, 2:4] = -np.inf  # classes 2, 3 masked on both sides, 0, 1 only in the base
    model[1, 0] = -np.inf
    base[1, 0] = 30.0  # the base puts nearly all its mass there: KL = inf
    r = fastloss.compare(base, model, top=3)
    ref = _reference(base, model)
    assert math.isinf(ref["kl"][1]) and math.isinf(r.kl_percentiles[100])
    assert r.top_disagreements[0]["position"] == 1 and math.isinf(r.top_disagreements[0]["kl"])
    keep = np.isfinite(ref["kl"])
    assert keep.sum() == 49 and math.isinf(r.mean_kl) and math.isnan(r.kl_stderr)
    fin = fastloss.compare(base[keep], model[keep])
    assert fin.mean_kl == pytest.approx(ref["kl"][keep].mean(), abs=1e-6)
    one = fastloss.compare(np.float32([[1.5], [2.0]]), np.float32([[0.0], [7.0]]), [0, 0])
    assert one.mean_kl == 0.0 and one.top1_agreement == 1.0 and one.log_ppl_ratio == 0.0
    single = fastloss.compare(base[2], model[2])
    assert single.tokens == 1 and math.isnan(single.kl_stderr)
    assert single.mean_kl == pytest.approx(_reference(base[2:3], model[2:3])["kl"][0], abs=1e-6)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-6), (np.float64, 1e-11), (BF16, 2e-6)])
def test_kernel_rows_whose_maximum_comes_late(dtype, tol):
    """Rows of three blocks whose later blocks jump far above the first block's max (the
    lazily kept reference is moved up and the sums rescaled), or whose first block is
    all -inf; the argmax is the first index of the max, ties included."""
    from fastloss.cpu.compare_metrics import SKIP, compare_rows

    rng = np.random.default_rng(12)
    n, v = 8, 5000
    base = rng.normal(size=(n, v))
    model = base + 0.3 * rng.normal(size=(n, v))
    base[0, 4100] = model[0, 2100] = 60.0  # a late spike on both sides
    base[1, :2048] = -np.inf  # the first block of the base empty
    model[2, :4096] = -np.inf
    model[2, 4500] = 3.0
    base[3, [2500, 4600]] = 40.0  # a tie of the max across blocks
    model[4, 3000] = 95.0  # beyond the exp clamp of the first block's reference
    base, model = base.astype(dtype), model.astype(dtype)
    t = rng.integers(0, v, n)
    t[7] = SKIP
    out = [np.full(n, np.nan), np.full(n, -7), np.full(n, -7), np.full(n, np.nan),
           np.full(n, np.nan), np.full(n, -7)]
    view = fastloss._validate.kernel_view
    zero = np.float64(0) if dtype == np.float64 else np.float32(0)
    compare_rows(view(base), view(model), t, zero, 3, *out)
    kl, ia, ib, lpa, lpb, status = out
    b64, m64 = base.astype(np.float64), model.astype(np.float64)
    ref = _reference(b64[:7], m64[:7], t[:7])
    np.testing.assert_allclose(kl[:7], ref["kl"], rtol=tol, atol=tol)
    assert (ia[:7] == ref["arg_a"]).all() and (ib[:7] == ref["arg_b"]).all()
    assert ia[3] == 2500 and ia[0] == 4100 and ib[4] == 3000
    np.testing.assert_allclose(lpa[:7], ref["lpa"], rtol=tol, atol=tol)
    np.testing.assert_allclose(lpb[:7], ref["lpb"], rtol=tol, atol=tol)
    assert (status == 0).all()
    assert (kl[7], ia[7], ib[7], lpa[7], lpb[7]) == (0.0, -1, -1, 0.0, 0.0)
    # NaN / +inf late in a row, and an all -inf row: flagged per side
    base[0, 4999] = np.nan
    model[1, 3000] = np.inf
    base[2, :] = -np.inf
    model[2, :] = -np.inf
    compare_rows(view(base), view(model), t, zero, 3, *out)
    assert status[:4].tolist() == [1, 2, 3, 0] and np.isnan(kl[:3]).all()


def test_chunking_does_not_change_per_token_values():
    rng = np.random.default_rng(6)
    base, model = _pair(rng, 2000, 333, 0.4)
    t = rng.integers(0, 333, 2000)
    a = fastloss.compare(base, model, t)
    b = fastloss.compare(base, model, t, chunk_tokens=7)
    assert a.kl_percentiles == b.kl_percentiles and a.delta_p_percentiles == b.delta_p_percentiles
    assert a.top_disagreements == b.top_disagreements
    assert b.mean_kl == pytest.approx(a.mean_kl, rel=1e-12)


def test_progress_bar_on_stderr(capsys):
    rng = np.random.default_rng(13)
    base, model = _pair(rng, 300, 20, 0.3)
    fastloss.compare(base, model, progress=True, chunk_tokens=50)
    assert "fastloss compare" in capsys.readouterr().err
    fastloss.compare(base, model, progress=False)
    assert capsys.readouterr().err == ""


def test_hidden_state_form(tmp_path):
    rng = np.random.default_rng(7)
    n, d, v = 600, 24, 101
    hb = rng.normal(size=(n, d)).astype(np.float32)
    hm = (hb + 0.1 * rng.normal(size=(n, d))).astype(np.float32)
    w = rng.normal(size=(v, d)).astype(np.float32)
    bias = rng.normal(size=v).astype(np.float32)
    wm = (w + 0.05 * rng.normal(size=(v, d))).astype(np.float32)
    t = rng.integers(0, v, n)
    np.save(tmp_path / "w.npy", w)
    lb = hb.astype(np.float64) @ w.T.astype(np.float64) + bias
    lm = hm.astype(np.float64) @ wm.T.astype(np.float64)
    ref = _reference(lb, lm, t)
    r = fastloss.compare(None, None, t, base_hidden=hb, base_lm_head=str(tmp_path / "w.npy"),
                         base_bias=bias, model_hidden=hm, model_lm_head=wm, chunk_tokens=77)
    _check_report(r, ref, 2e-5)
    assert r.base_lm_head_file == str(tmp_path / "w.npy") and r.model_lm_head_file == "<lm_head array>"
    mixed = fastloss.compare(lb.astype(np.float32), None, t, model_hidden=hm, model_lm_head=wm)
    _check_report(mixed, ref, 2e-5)
    with pytest.raises(TypeError, match="base_lm_head: required with base_hidden"):
        fastloss.compare(None, lm, base_hidden=hb)
    with pytest.raises(ValueError, match="give either base logits or base_hidden"):
        fastloss.compare(lb, lm, base_hidden=hb, base_lm_head=w)
    with pytest.raises(ValueError, match="model_lm_head, model_bias: only used with model_hidden"):
        fastloss.compare(lb, lm, model_bias=bias)
    with pytest.raises(TypeError, match=r"model: required \(or model_hidden with model_lm_head\)"):
        fastloss.compare(lb)


def test_shift_matches_explicit_targets():
    rng = np.random.default_rng(8)
    base, model = _pair(rng, 120, 30, 0.3)
    ids = rng.integers(0, 30, 120)
    t = np.roll(ids, -1)
    t[np.arange(120) % 40 == 39] = IGNORE
    a = fastloss.compare(base, model, ids, seq_len=40, shift=True)
    b = fastloss.compare(base, model, t, seq_len=40)
    assert a.to_dict() | {"shift": None} == b.to_dict() | {"shift": None}
    assert a.per_position_count[39] == 0 and a.per_position_kl[39] is None


# errors ------------------------------------------------------------------------------


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(9)
    base, model = _pair(rng, 40, 12, 0.3)
    paths = {}
    for name, arr in (("base", base), ("model", model), ("short", model[:39]),
                      ("wide", np.concatenate([model, model[:, :1]], 1)),
                      ("targets", rng.integers(0, 12, 40)), ("t39", rng.integers(0, 12, 39))):
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], arr)
    bad = model.copy()
    bad[23, 5] = np.nan
    paths["nan"] = str(tmp_path / "nan.npy")
    np.save(paths["nan"], bad)
    bad_t = rng.integers(0, 12, 40)
    bad_t[17] = 12
    paths["bad_t"] = str(tmp_path / "bad_t.npy")
    np.save(paths["bad_t"], bad_t)
    return paths


ERRORS = [  # (base, model), targets, the file named, message
    (("base", "short"), None, "short", r"short\.npy: the model's logits hold 39 tokens, but the base's "
                              r"\(.*base\.npy\) hold 40"),
    (("base", "wide"), None, "wide", r"wide\.npy: vocabulary size 13 of the model differs from the "
                             r"base's 12"),
    (("base", "nan"), None, "nan", r"nan\.npy: NaN or \+inf \(or only -inf\) in the model's logits at "
                            r"token 23 of this file"),
    (("nan", "base"), "targets", "nan", r"nan\.npy: NaN or \+inf \(or only -inf\) in the base's logits "
                                 r"at token 23"),
    (("base", "model"), "bad_t", "bad_t", r"bad_t\.npy: 1 target\(s\) outside \[0, 12\)"),
    (("base", "model"), "t39", "t39", r"t39\.npy: 39 target tokens, but the base and model"),
]


@pytest.mark.parametrize("sides, targets, named, match", ERRORS)
def test_errors_name_the_file(files, sides, targets, named, match, capsys):
    b, m = (files[s] for s in sides)
    t = None if targets is None else files[targets]
    with pytest.raises(EvalInputError, match=match):
        fastloss.compare(b, m, t)
    argv = ["compare", b, m] + ([] if t is None else ["--targets", t])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fastloss compare: error: {files[named]}: ")


def test_nan_error_deletes_spill_files(files, tmp_path, monkeypatch):
    monkeypatch.setattr(fastloss.config, "COMPARE_SPILL_MEMORY_BYTES", 64)
    spill = tmp_path / "spill"
    spill.mkdir()
    with pytest.raises(EvalInputError, match="at token 23"):
        fastloss.compare(files["base"], files["nan"], chunk_tokens=5, tmpdir=str(spill))
    assert os.listdir(spill) == []


def test_argument_errors(files):
    b, m = files["base"], files["model"]
    with pytest.raises(ValueError, match="top: expected a non-negative integer, found -1"):
        fastloss.compare(b, m, top=-1)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fastloss.compare(b, m, chunk_tokens=0)
    with pytest.raises(ValueError, match="shift: needs seq_len"):
        fastloss.compare(b, m, files["targets"], shift=True)
    with pytest.raises(ValueError, match="shift: needs targets"):
        fastloss.compare(b, m, seq_len=4, shift=True)
    with pytest.raises(EvalInputError, match="not a whole number of sequences of seq_len=7"):
        fastloss.compare(b, m, seq_len=7)
    with pytest.raises(TypeError, match="layout: expected a fastloss.evaluation.Layout"):
        fastloss.compare(b, m, layout={})
    with pytest.raises(TypeError, match="ignore_index: expected an integer"):
        fastloss.compare(b, m, files["targets"], ignore_index=1.5)
    r = fastloss.compare(b, m, np.full(40, IGNORE))
    assert r.tokens == 0 and math.isnan(r.mean_kl) and r.warnings


# the percentile selector ---------------------------------------------------------------


def _chunked(x, size):
    return lambda: (x[i:i + size] for i in range(0, x.size, size))


@pytest.mark.parametrize("gather", [1 << 20, 3])
@pytest.mark.parametrize("case", ["normal", "ties", "zeros", "tiny", "inf", "one", "wide"])
def test_percentiles_match_numpy_exactly(case, gather, monkeypatch):
    monkeypatch.setattr(fastloss.config, "COMPARE_SELECT_GATHER", gather)
    rng = np.random.default_rng(sum(map(ord, case)))
    n = 4099
    x = {
        "normal": rng.standard_normal(n),
        "ties": rng.integers(-3, 4, n).astype(np.float64),
        "zeros": rng.choice(np.array([0.0, -0.0, 1.0, -1.0]), n),
        "tiny": rng.choice(np.array([5e-324, -5e-324, 1e-310, 0.0, -0.0, 2.2e-308]), n),
        "inf": rng.choice(np.array([-np.inf, 1.0, 2.0, np.inf]), n, p=[0.001, 0.5, 0.498, 0.001]),
        "one": np.array([0.25]),
        "wide": rng.standard_normal(n) * 10.0 ** rng.integers(-300, 300, n),
    }[case]
    qs = list(C.KL_PERCENTILES) + [33.3, 66.7]
    got = M.percentiles(_chunked(x, 100), x.size, qs)
    with np.errstate(invalid="ignore"):
        want = np.percentile(x, qs)
    srt = np.sort(x)
    for q, g, w in zip(qs, got, want, strict=True):
        if math.isnan(w):  # numpy's inf - inf: the order statistic itself where it is one
            vi = (x.size - 1) * (q / 100)
            k = int(math.floor(vi))
            lo, hi = srt[k], srt[min(k + 1, x.size - 1)]
            if lo == hi or vi == k:
                assert g == lo, (q, g, lo, hi)
            else:  # between -inf and a finite value, say: undefined, NaN as numpy
                assert math.isnan(g), (q, g, lo, hi)
        else:
            assert g == w, (q, g, w)
    assert M.percentiles(_chunked(x[:0], 1), 0, [50]) == [pytest.approx(math.nan, nan_ok=True)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.floats(-1e300, 1e300),  # no overflow in the interpolation
                          st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 1.0])),
                min_size=1, max_size=300),
       st.lists(st.floats(0, 100), min_size=1, max_size=5), st.integers(1, 50),
       st.sampled_from([3, 1 << 20]))
def test_percentiles_property(values, qs, chunk, gather):
    """Finite values (ties, signed zeros, subnormals): exactly np.percentile, whatever the
    chunking and however deep the radix select goes."""
    x = np.array(values, np.float64)
    old = fastloss.config.COMPARE_SELECT_GATHER
    fastloss.config.COMPARE_SELECT_GATHER = gather
    try:
        got = M.percentiles(_chunked(x, chunk), x.size, qs)
    finally:
        fastloss.config.COMPARE_SELECT_GATHER = old
    want = np.percentile(x, qs)
    for g, w in zip(got, want, strict=True):
        assert g == w or (math.isnan(g) and math.isnan(w)), (g, w)


def test_order_keys_round_trip_and_order():
    x = np.array([-np.inf, -1e300, -1.0, -5e-324, -0.0, 0.0, 5e-324, 1.0, 1e300, np.inf])
    k = M.order_keys(x)
    assert (np.diff(k.astype(object)) >= 0).all()  # unsigned order is the values' order
    assert k[4] == k[5]  # -0 and +0: one key
    back = M.key_values(k)
    assert (back == x).all()


def test_spill_columns_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(fastloss.config, "COMPARE_SPILL_MEMORY_BYTES", 100)
    monkeypatch.setattr(fastloss.config, "COMPARE_SPILL_READ_VALUES", 7)
    x = np.arange(50, dtype=np.float64)
    with M.SpillColumns(("a", "b"), str(tmp_path)) as s:
        for lo in range(0, 50, 4):
            s.append(a=x[lo:lo + 4], b=-x[lo:lo + 4])
        assert s.spilled and len(os.listdir(tmp_path)) == 2
        assert (np.concatenate(list(s.chunks("b")())) == -x).all()
        assert (np.concatenate(list(s.chunks("a")())) == x).all()  # again: a fresh iterator
    assert os.listdir(tmp_path) == []


# command line --------------------------------------------------------------------------


def test_cli_json_round_trip_and_plot(files, tmp_path, capsys):
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    assert main(["compare", files["base"], files["model"], "--targets", files["targets"],
                 "--seq-len", "8", "--top", "4", "--json", str(out), "--plot", str(png),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "mean KL" in text and "PPL(model)" in text and "±" in text
    got = json.loads(out.read_text())
    want = fastloss.compare(files["base"], files["model"], files["targets"], seq_len=8,
                            top=4).to_dict()
    assert got == want
    assert list(got["kl_percentiles"]) == ["0", "0.1", "1", "5", "10", "50", "90", "95", "99",
                                           "99.9", "100"]
    assert len(got["top_disagreements"]) == 4 and len(got["per_position_kl"]) == 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_raw_layout_and_hidden(tmp_path, capsys):
    rng = np.random.default_rng(10)
    base, model = _pair(rng, 30, 16, 0.2)
    base.astype(BF16).tofile(tmp_path / "b.bin")
    np.save(tmp_path / "m.npy", model)
    assert main(["compare", str(tmp_path / "b.bin"), str(tmp_path / "m.npy"), "--dtype", "bf16",
                 "--vocab", "16", "--json", str(tmp_path / "r.json")]) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    ref = _reference(base.astype(BF16).astype(np.float64), model)
    assert got["mean_kl"] == pytest.approx(ref["kl"].mean(), abs=2e-6)
    capsys.readouterr()
    h = rng.normal(size=(30, 5)).astype(np.float32)
    w = rng.normal(size=(16, 5)).astype(np.float32)
    np.save(tmp_path / "h.npy", h)
    np.save(tmp_path / "w.npy", w)
    assert main(["compare", str(tmp_path / "m.npy"), "--base-hidden", str(tmp_path / "h.npy"),
                 "--base-lm-head", str(tmp_path / "w.npy")]) == 0
    capsys.readouterr()
    for argv, msg in (
        ([str(tmp_path / "m.npy")], "expected 2 positional dump(s) (BASE and MODEL), found 1"),
        ([str(tmp_path / "m.npy"), "--base-hidden", str(tmp_path / "h.npy")],
         "--base-hidden: needs --base-lm-head FILE"),
        ([str(tmp_path / "m.npy"), str(tmp_path / "m.npy"), "--model-bias", "x.npy"],
         "--model-lm-head/--model-bias: only used with --model-hidden"),
        ([str(tmp_path / "m.npy"), str(tmp_path / "m.npy"), "--top", "-2"],
         "--top: expected a non-negative integer, found -2"),
        ([str(tmp_path / "m.npy"), str(tmp_path / "m.npy"), "--seq-len", "5", "--shift"],
         "--shift: needs --targets"),
        ([str(tmp_path / "m.npy"), str(tmp_path / "nope.npy")], "nope.npy: no such file"),
    ):
        assert main(["compare", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err


def test_moments_and_percentiles_of_huge_values_do_not_warn():
    """A corrupt dump's logits can give losses near float64's limit: their squares and
    differences overflow to inf (as the exact values would), with no RuntimeWarning
    (the suite turns fastloss's RuntimeWarnings into errors)."""
    x = np.array([1e300, -1e300, 3.0])
    m = M.Moments()
    m.add(x)
    assert math.isinf(m.m2) and math.isinf(m.std())
    c = M.CoMoments()
    c.add(x, x[::-1])
    got = M.percentiles(lambda: iter([x]), 3, [0.0, 25.0, 50.0, 100.0])
    assert got[0] == -1e300 and got[2] == 3.0 and got[3] == 1e300
