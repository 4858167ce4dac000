"""Saved benchmark runs: find them, list them, compare them side by side.

A run is the JSON that :func:`fastloss.bench.runner.save` wrote into the runs
folder (:func:`fastloss.bench.runner.default_save_dir`); its name is the file
name without ``.json``. :func:`find` resolves what a user typed (a name, a
unique prefix of one, or a path to a JSON file); :func:`format_list` and
:func:`format_compare` are what ``fastloss bench --list`` / ``--compare`` print.
"""

import glob
import json
import os

from . import runner as R

#: Machine fields that must match for timings of two runs to compare.
_SAME_MACHINE = ("cpu_model", "cores", "numba_threads", "torch_threads", "fastloss", "numpy",
                 "numba", "torch", "python")


class RunError(ValueError):
    """A run that cannot be found or read; the message says which and why."""


def load(path):
    """The result saved at ``path``, with ``"name"`` (the file's stem) and ``"path"`` added."""
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: cannot read a saved run ({e})") from None
    if not isinstance(result, dict) or not str(result.get("schema", "")).startswith("fastloss-bench/") \
            or not isinstance(result.get("results"), list):
        raise RunError(f"{path}: not a fastloss bench result (no fastloss-bench schema)")
    result["name"] = os.path.splitext(os.path.basename(path))[0]
    result["path"] = path
    return result


def saved(directory=None):
    """Every run saved in ``directory`` (default: the runs folder), oldest first."""
    directory = directory or R.default_save_dir()
    runs = []
    for path in glob.glob(os.path.join(glob.escape(directory), "*.json")):
        try:
            runs.append(load(path))
        except RunError:
            continue  # another tool's JSON in the same folder is not ours to list
    return sorted(runs, key=lambda r: (R.run_date(r), r["name"]))


def find(ref, directory=None):
    """The run ``ref`` names: a path to a JSON file, a saved run's name, or a
    unique prefix of one. Raises :class:`RunError`."""
    if ref.endswith(".json") and os.path.isfile(ref):
        return load(ref)
    runs = saved(directory)
    exact = [r for r in runs if r["name"] == ref]
    if exact:
        return exact[0]
    prefixed = [r for r in runs if r["name"].startswith(ref)]
    if len(prefixed) == 1:
        return prefixed[0]
    where = directory or R.default_save_dir()
    if prefixed:
        names = ", ".join(r["name"] for r in prefixed)
        raise RunError(f"--compare: {ref!r} matches {len(prefixed)} saved runs ({names}); "
                       f"give more of the name")
    raise RunError(f"--compare: no saved run named {ref!r} in {where} (see fastloss bench --list)")


def latest(count, directory=None):
    """The ``count`` most recent saved runs, oldest first. Raises :class:`RunError`."""
    runs = saved(directory)
    if len(runs) < count:
        raise RunError(f"--compare: {count} saved runs needed, found {len(runs)} in "
                       f"{directory or R.default_save_dir()}")
    return runs[-count:]


def _machine(m):
    threads = f"threads {m.get('numba_threads')}"
    return f"{m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, {threads}"


def _cases(result):
    return list(dict.fromkeys(r["case"] for r in result["results"]))


def format_list(runs, directory=None):
    """``fastloss bench --list``: one line per saved run (name, date, machine,
    cases, warnings)."""
    where = directory or R.default_save_dir()
    if not runs:
        return f"no saved runs in {where}\n"
    width = max(len(r["name"]) for r in runs)
    out = [f"saved runs in {where} (oldest first):",
           f"{'name':<{width}}  {'date':<25}  machine / cases"]
    for r in runs:
        cases = _cases(r)
        shown = ", ".join(cases[:4]) + (f", ... ({len(cases)} cases)" if len(cases) > 4 else "")
        warn = f"  [{len(r['warnings'])} warning(s)]" if r.get("warnings") else ""
        out.append(f"{r['name']:<{width}}  {R.run_date(r):<25}  {_machine(r['machine'])}{warn}")
        out.append(f"{'':<{width}}  {'':<25}  {shown}")
    return "\n".join(out) + "\n"


def _label(i):
    return chr(ord("A") + i) if i < 26 else f"R{i}"


def _medians(result):
    return {(r["case"], r["provider"]): r["median_ms"]
            for r in result["results"] if r.get("status") == "ok"}


def format_compare(runs):
    """``fastloss bench --compare``: the cases common to every run, one block
    each, a provider's median per run side by side and each run's ratio to the
    first (below 1: faster than the first run)."""
    labels = [_label(i) for i in range(len(runs))]
    out = ["runs:"]
    for lab, r in zip(labels, runs):
        out.append(f"  {lab}  {r['name']}  {R.run_date(r)}  {_machine(r['machine'])}")
        out += [f"     warning: {w}" for w in r.get("warnings") or ()]
    base = runs[0]["machine"]
    for lab, r in zip(labels[1:], runs[1:]):
        diff = [k for k in _SAME_MACHINE if r["machine"].get(k) != base.get(k)]
        if diff:
            out.append(f"note: {lab} differs from A in {', '.join(diff)}: "
                       + "; ".join(f"{k} {base.get(k)} -> {r['machine'].get(k)}" for k in diff))
    medians = [_medians(r) for r in runs]
    common = [c for c in _cases(runs[0]) if all(c in _cases(r) for r in runs[1:])]
    cols = [f"{lab} ms" for lab in labels] + [f"{lab}/A" for lab in labels[1:]]
    for case in common:
        providers = list(dict.fromkeys(
            r["provider"] for run in runs for r in run["results"] if r["case"] == case))
        out += ["", case, f"{'provider':<17}" + "".join(f"{c:>10}" for c in cols)]
        for p in providers:
            ms = [m.get((case, p)) for m in medians]
            cells = [("-" if v is None else f"{v:.3f}") for v in ms]
            for v in ms[1:]:
                cells.append("-" if v is None or ms[0] is None else f"{v / ms[0]:.2f}")
            out.append(f"{p:<17}" + "".join(f"{c:>10}" for c in cells))
    if not common:
        out += ["", "no case is in every run"]
    for lab, r in zip(labels, runs):
        only = [c for c in _cases(r) if c not in common]
        if only:
            out.append(f"only in {lab}: {', '.join(only)}")
    out.append("")
    out.append("ratios below 1: faster than run A; single figures on a shared machine are "
               "+-15%, so trust a ratio beyond that")
    return "\n".join(out) + "\n"
