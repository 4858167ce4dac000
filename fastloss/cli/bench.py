"""``fastloss bench``: time one loss case for every provider and print the table."""

import argparse
import os
import sys


def _size(text):
    """An element count: ``67108864``, ``2^26``, ``2**26`` or ``1<<26``."""
    t = text.replace(" ", "")
    try:
        for op in ("^", "**"):
            if op in t:
                base, exp = t.split(op)
                return int(base) ** int(exp)
        if "<<" in t:
            a, b = t.split("<<")
            return int(a) << int(b)
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number such as 67108864 or 2^26, found {text!r}") from None


_EPILOG_RUNS = """\
saved runs:
  Every run is saved as JSON in the runs folder: $FASTLOSS_BENCH_DIR, else
  $XDG_CACHE_HOME/fastloss/bench, else ~/.cache/fastloss/bench (--dir to
  choose), named after its start time and first case, or NAME with --save NAME.
  --list prints the saved runs (name, date, machine, cases, warnings);
  --compare A B [...] prints the cases common to the runs side by side, each
  provider's median per run and its ratio to the first run (below 1: faster);
  --compare alone compares the two most recent runs. A run is named by its
  name, a unique prefix of it, or a path to its JSON file.

examples:
  fastloss bench --small                       small shapes of every op vs torch eager
  fastloss bench --op soft-ce --mode fwd+bwd   probability targets, 4096x32000
  fastloss bench --op distill --kind kl jsd    distillation (T=2), both kinds
  fastloss bench --shape 4096 32000 --save before
  fastloss bench --shape 4096 32000 --save after
  fastloss bench --compare before after
  fastloss bench --op torch-step --dtype float32 bfloat16   training step, D=256
  fastloss bench --op torch-step --shape 2048 128256 --hidden 256 --no-memory
"""


def add_parser(sub):
    from ..bench.legend import LEGEND, TORCH_STEP_LEGEND
    bench = sub.add_parser(
        "bench", help="time fastloss against torch (eager and torch.compile), numpy and JAX "
                      "on one case, print the table and save the results; list and compare "
                      "saved runs",
        description="Time one loss case (or the --small set) for every provider with the same "
                    "threads, and print median times, GB/s, the fraction of the measured "
                    "bandwidth, the floor, the ratios to the fastest (peer) and the speedup "
                    "against torch eager.",
        epilog=LEGEND + "\n\n" + TORCH_STEP_LEGEND + "\n\n" + _EPILOG_RUNS,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--op", choices=("ce", "soft-ce", "distill", "mse", "lce", "torch-step"),
                       default=None,
                       help="ce: softmax cross-entropy (default); soft-ce: cross-entropy with "
                            "probability targets of the logits' shape; distill: distillation of "
                            "student logits towards a teacher's (both in --dtype) at temperature "
                            "2, batchmean, --kind kl or jsd; mse: mean squared error; "
                            "lce: fused linear cross-entropy (fwd+bwd only); torch-step: a PyTorch "
                            "training step of an LM head and its loss (forward + backward), fastloss.torch "
                            "against torch, with each provider's loss share, peak memory and the "
                            "adapter's per-call overhead at 64x1000")
    bench.add_argument("--shape", nargs="+", type=int, metavar="N",
                       help="ce, soft-ce, distill: logits shape N V (default 4096 32000); "
                            "lce: N D V "
                            "(default 4096 1024 128256); torch-step: N V, or several pairs "
                            "N V N V ... (default 4096 32000; D is --hidden)")
    bench.add_argument("--kind", nargs="+", choices=("kl", "jsd"), default=None,
                       help="distill: forward KL (default) and/or TRL's generalised JSD "
                            "(beta 0.5); each kind is its own case, distill-kl / distill-jsd")
    bench.add_argument("--hidden", type=int, metavar="D",
                       help="torch-step: hidden size D of the LM head (default 256)")
    bench.add_argument("--no-memory", action="store_true",
                       help="torch-step: skip the peak-memory measurement (one child process "
                            "per provider and case)")
    bench.add_argument("--size", type=_size, metavar="SIZE",
                       help="MSE elements, e.g. 2^26 (default) or 268435456")
    bench.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16"), default=None,
                       help="one or both dtypes (default float32)")
    bench.add_argument("--mode", choices=("forward", "fwd+bwd", "both"), default=None,
                       help="forward, forward+backward, or both (default)")
    bench.add_argument("--small", action="store_true",
                       help="instead of one case, the small set: cross-entropy, probability "
                            "targets and distillation (kl, jsd) forward and "
                            "fwd+bwd at 8x100, 64x1000, 256x4096; MSE at the same element "
                            "counts; linear cross-entropy 64x32x500 (N x D x V); float32; "
                            "fastloss against torch eager unless --providers says otherwise")
    bench.add_argument("--providers", nargs="+", metavar="NAME",
                       help="providers or families, space- or comma-separated (default all): "
                            "fastloss, fastloss-out, fastloss-inplace, fastloss-alloc, torch, "
                            "torch-compile, numpy, jax")
    bench.add_argument("--repeat", type=int, default=None,
                       help="timed calls per provider (default 5; 201 with --small, whose calls "
                            "take microseconds and whose medians need more of them)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    bench.add_argument("--max-time", type=float, metavar="SECONDS",
                       help="stop a provider's timed calls after this long (at least 3 are made)")
    bench.add_argument("--threads", type=int,
                       help="threads for every provider (default 2, or $FASTLOSS_BENCH_THREADS)")
    bench.add_argument("--calibration-mib", type=int, metavar="MIB",
                       help="size of the bandwidth-measurement array (default 1024 MiB, or "
                            "$FASTLOSS_BENCH_CALIBRATION_MIB; 256 with --small)")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    bench.add_argument("--save", metavar="NAME",
                       help="save the run as NAME in the runs folder (default: named after "
                            "its start time and first case)")
    bench.add_argument("--dir", metavar="DIR",
                       help="the runs folder, for saving, --list and --compare (default "
                            "$FASTLOSS_BENCH_DIR or ~/.cache/fastloss/bench)")
    bench.add_argument("--no-save", action="store_true", help="do not save the results")
    bench.add_argument("--list", action="store_true",
                       help="list the saved runs (no benchmark is run)")
    bench.add_argument("--compare", nargs="*", metavar="RUN",
                       help="compare saved runs side by side (no benchmark is run); no RUN: "
                            "the two most recent")
    bench.add_argument("--quiet", action="store_true", help="no progress on stderr")
    bench.set_defaults(bench_parser=bench, run=run)


#: With --small the bandwidth array is smaller: the cases are far smaller than
#: any cache-defeating size matters for, and the run should take seconds.
_SMALL_CALIBRATION_MIB = 256


def _saved_runs(args):
    """``--list`` / ``--compare``: print and return the exit status."""
    from ..bench import runs as S
    parser = args.bench_parser
    if args.list and args.compare is not None:
        parser.error("--list and --compare: give one of them")
    if args.list:
        sys.stdout.write(S.format_list(S.saved(args.dir), args.dir))
        return 0
    try:
        if not args.compare:
            chosen = S.latest(2, args.dir)
        elif len(args.compare) == 1:
            parser.error("--compare: give two runs or more (or none, for the two most recent)")
        else:
            chosen = [S.find(ref, args.dir) for ref in args.compare]
    except S.RunError as e:
        sys.stderr.write(f"fastloss bench: {e}\n")
        return 2
    sys.stdout.write(S.format_compare(chosen))
    return 0


def _cases(args, parser):
    """The cases the arguments ask for."""
    from ..bench import cases as C
    if args.small:
        for name in ("op", "shape", "size", "dtype", "mode", "kind"):
            if getattr(args, name) is not None:
                parser.error(f"--{name}: --small runs its own set of cases")
        return C.small_cases()
    op = args.op or "ce"
    if args.kind is not None and op != "distill":
        parser.error(f"--kind is for --op distill, found --op {op}")
    if op != "mse":
        if args.size is not None:
            parser.error("--size is for --op mse; give --shape for cross-entropy")
        default = C.LCE_SHAPES[0] if op == "lce" else (4096, 32000)
        shape = tuple(args.shape or default)
        if len(shape) != len(default):
            parser.error(f"--shape: --op {op} takes {len(default)} numbers "
                         f"({'N D V' if op == 'lce' else 'N V'}), found {len(shape)}")
    else:
        if args.shape is not None:
            parser.error("--shape is for --op ce, soft-ce, distill and lce; give --size for mse")
        shape = (args.size if args.size is not None else 1 << 26,)
    if min(shape) < 1:
        parser.error(f"sizes must be positive, found {shape}")
    mode = args.mode or "both"
    modes = C.MODES if mode == "both" else (mode,)
    if op == "lce":
        if mode == "forward":
            parser.error("--mode: --op lce is measured as fwd+bwd only (forward: --small)")
        modes = ("fwd+bwd",)
    ops = [op]
    if op == "distill":
        ops = [f"distill-{k}" for k in dict.fromkeys(args.kind or ["kl"])]
    return [C.Case(o, shape, d, m) for o in ops for d in dict.fromkeys(args.dtype or ["float32"])
            for m in modes]


def run(args, argv):
    """``fastloss bench``: run, print the table, write/save the JSON (or list /
    compare saved runs); returns the exit status."""
    parser = args.bench_parser
    if args.list or args.compare is not None:
        return _saved_runs(args)
    if args.op == "torch-step":
        return _torch_step(args, argv)
    if args.hidden is not None or args.no_memory:
        parser.error("--hidden and --no-memory are for --op torch-step")
    from ..bench import cases as C
    from ..bench import runner as R

    cases = _cases(args, parser)
    if args.repeat is None:
        args.repeat = 201 if args.small else 5
    if args.repeat < 1 or args.warmup < 0:
        parser.error("--repeat must be >= 1 and --warmup >= 0")
    threads = args.threads if args.threads is not None else R.DEFAULT_THREADS
    calibration_mib = args.calibration_mib
    if calibration_mib is None:
        default = _SMALL_CALIBRATION_MIB if args.small else 1024
        calibration_mib = int(os.environ.get("FASTLOSS_BENCH_CALIBRATION_MIB", default))
    if threads < 1 or calibration_mib < 1:
        parser.error("--threads and --calibration-mib must be >= 1")
    _save_checks(args, parser, R.default_save_dir())
    providers = list(C.SMALL_PROVIDERS) if args.small else None
    if args.providers:
        providers = [p for item in args.providers for p in item.split(",") if p]
        try:
            C.providers_for(cases[0], providers)
        except ValueError as e:
            parser.error(str(e))

    progress = _progress(args)

    result = R.run(cases, providers, threads=threads, repeat=args.repeat, warmup=args.warmup,
                   max_time=args.max_time, calibration_bytes=calibration_mib << 20,
                   progress=progress)
    return _report(result, R.format_table, args, argv, progress)


def _progress(args):
    """The run's progress printer: stderr, silent with ``--quiet``."""
    def progress(text, end="\n"):
        if not args.quiet:
            sys.stderr.write(text + end)
            sys.stderr.flush()
    return progress


def _report(result, format_table, args, argv, progress):
    """Print a run's table, write its JSON (``--json``), save it (unless
    ``--no-save``); the exit status: 1 if a provider failed, else 0."""
    from ..bench import runner as R
    result["settings"]["command"] = ["fastloss"] + argv
    sys.stdout.write(format_table(result))
    sys.stdout.flush()
    if args.json:
        R.write_json(result, args.json)
        progress(f"wrote {args.json}")
    if not args.no_save:
        progress(f"saved {R.save(result, args.dir, args.save)}")
    return 1 if any(r["status"] == "error" for r in result["results"]) else 0


def _save_checks(args, parser, default_dir):
    if args.save is not None:
        if not args.save or os.sep in args.save or args.save in (".", ".."):
            parser.error(f"--save takes a name (give the folder with --dir), found {args.save!r}")
        if args.no_save:
            parser.error("--save and --no-save: give one of them")
        target = os.path.join(args.dir or default_dir, args.save + ".json")
        if os.path.exists(target):
            parser.error(f"--save: a run named {args.save!r} already exists ({target})")


def torch_step_cases(args, parser):
    """The :class:`~fastloss.bench.torch_step.StepCase` list of ``--op torch-step``."""
    from ..bench import torch_step as T
    for name in ("size", "mode", "calibration_mib", "kind"):
        if getattr(args, name) is not None:
            parser.error(f"--{name.replace('_', '-')} does not apply to --op torch-step")
    if args.small:
        parser.error("--small does not apply to --op torch-step (its output always ends with the "
                     "adapter-overhead section at 64x1000; give a small --shape for a quick run)")
    shape = list(args.shape or T.DEFAULT_SHAPE)
    if len(shape) % 2:
        parser.error(f"--shape: --op torch-step takes N V (or pairs N V N V ...), found {len(shape)} numbers")
    d = T.DEFAULT_HIDDEN if args.hidden is None else args.hidden
    if min(shape) < 1 or d < 1:
        parser.error(f"sizes must be positive, found --shape {' '.join(map(str, shape))} --hidden {d}")
    pairs = list(dict.fromkeys(zip(shape[0::2], shape[1::2])))
    return [T.StepCase(n, v, d, dt) for n, v in pairs for dt in dict.fromkeys(args.dtype or ["float32"])]


def _torch_step(args, argv):
    """``fastloss bench --op torch-step``: the training-step benchmark."""
    from ..bench import runner as R
    from ..bench import torch_step as T
    parser = args.bench_parser
    cases = torch_step_cases(args, parser)
    repeat = T.DEFAULT_REPEAT if args.repeat is None else args.repeat
    if repeat < 1 or args.warmup < 0:
        parser.error("--repeat must be >= 1 and --warmup >= 0")
    threads = args.threads if args.threads is not None else R.DEFAULT_THREADS
    if threads < 1:
        parser.error("--threads must be >= 1")
    _save_checks(args, parser, R.default_save_dir())
    providers = None
    if args.providers:
        providers = [p for item in args.providers for p in item.split(",") if p]
        try:
            T.providers_for(providers)
        except ValueError as e:
            parser.error(str(e))
    try:
        import torch  # noqa: F401
    except ImportError as e:
        sys.stderr.write(f"fastloss bench: --op torch-step needs PyTorch ({e})\n")
        return 2

    progress = _progress(args)

    result = T.run(cases, providers, threads=threads, repeat=repeat, warmup=args.warmup,
                   max_time=args.max_time, memory=not args.no_memory, progress=progress)
    return _report(result, T.format_table, args, argv, progress)
