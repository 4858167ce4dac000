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


def add_parser(sub):
    bench = sub.add_parser(
        "bench", help="time fastloss against torch (eager and torch.compile), numpy and JAX "
                      "on one case, print the table and save the results",
        description="Time one loss case for every provider with the same threads, and print "
                    "median times, GB/s, the fraction of the measured bandwidth, the floor "
                    "and the ratios to the fastest (peer). Columns: benchmarks/README.md.")
    bench.add_argument("--op", choices=("ce", "mse", "lce"), default="ce",
                       help="ce: softmax cross-entropy (default); mse: mean squared error; "
                            "lce: fused linear cross-entropy (fwd+bwd only)")
    bench.add_argument("--shape", nargs="+", type=int, metavar="N",
                       help="ce: logits shape N V (default 4096 32000); lce: N D V "
                            "(default 4096 1024 128256)")
    bench.add_argument("--size", type=_size, metavar="SIZE",
                       help="MSE elements, e.g. 2^26 (default) or 268435456")
    bench.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16"), default=["float32"],
                       help="one or both dtypes (default float32)")
    bench.add_argument("--mode", choices=("forward", "fwd+bwd", "both"), default="both",
                       help="forward, forward+backward, or both (default)")
    bench.add_argument("--providers", nargs="+", metavar="NAME",
                       help="providers or families, space- or comma-separated (default all): "
                            "fastloss, fastloss-out, fastloss-inplace, fastloss-alloc, torch, "
                            "torch-compile, numpy, jax")
    bench.add_argument("--repeat", type=int, default=5, help="timed calls per provider (default 5)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    bench.add_argument("--max-time", type=float, metavar="SECONDS",
                       help="stop a provider's timed calls after this long (at least 3 are made)")
    bench.add_argument("--threads", type=int,
                       help="threads for every provider (default 2, or $FASTLOSS_BENCH_THREADS)")
    bench.add_argument("--calibration-mib", type=int, metavar="MIB",
                       help="size of the bandwidth-measurement array (default 1024 MiB, or "
                            "$FASTLOSS_BENCH_CALIBRATION_MIB)")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    bench.add_argument("--save", metavar="DIR",
                       help="save the results (JSON) in DIR (default ~/.cache/fastloss/bench, "
                            "or $FASTLOSS_BENCH_DIR)")
    bench.add_argument("--no-save", action="store_true", help="do not save the results")
    bench.add_argument("--quiet", action="store_true", help="no progress on stderr")
    bench.set_defaults(bench_parser=bench, run=run)


def run(args, argv):
    """``fastloss bench``: run, print the table, write/save the JSON; returns the exit status."""
    parser = args.bench_parser
    from ..bench import cases as C
    from ..bench import runner as R

    if args.op in ("ce", "lce"):
        if args.size is not None:
            parser.error("--size is for --op mse; give --shape for cross-entropy")
        default = (4096, 32000) if args.op == "ce" else C.LCE_SHAPES[0]
        shape = tuple(args.shape or default)
        if len(shape) != len(default):
            parser.error(f"--shape: --op {args.op} takes {len(default)} numbers "
                         f"({'N V' if args.op == 'ce' else 'N D V'}), found {len(shape)}")
    else:
        if args.shape is not None:
            parser.error("--shape is for --op ce; give --size for mse")
        shape = (args.size if args.size is not None else 1 << 26,)
    if min(shape) < 1:
        parser.error(f"sizes must be positive, found {shape}")
    if args.repeat < 1 or args.warmup < 0:
        parser.error("--repeat must be >= 1 and --warmup >= 0")
    threads = args.threads if args.threads is not None else R.DEFAULT_THREADS
    calibration_mib = args.calibration_mib
    if calibration_mib is None:
        calibration_mib = int(os.environ.get("FASTLOSS_BENCH_CALIBRATION_MIB", "1024"))
    if threads < 1 or calibration_mib < 1:
        parser.error("--threads and --calibration-mib must be >= 1")
    modes = C.MODES if args.mode == "both" else (args.mode,)
    if args.op == "lce":
        if args.mode == "forward":
            parser.error("--mode: --op lce is measured as fwd+bwd only")
        modes = ("fwd+bwd",)
    cases = [C.Case(args.op, shape, d, m) for d in dict.fromkeys(args.dtype) for m in modes]
    providers = None
    if args.providers:
        providers = [p for item in args.providers for p in item.split(",") if p]
        try:
            C.providers_for(cases[0], providers)
        except ValueError as e:
            parser.error(str(e))

    def progress(text, end="\n"):
        if not args.quiet:
            sys.stderr.write(text + end)
            sys.stderr.flush()

    result = R.run(cases, providers, threads=threads, repeat=args.repeat, warmup=args.warmup,
                   max_time=args.max_time, calibration_bytes=calibration_mib << 20,
                   progress=progress)
    result["settings"]["command"] = ["fastloss"] + argv
    sys.stdout.write(R.format_table(result))
    sys.stdout.flush()
    if args.json:
        R.write_json(result, args.json)
        progress(f"wrote {args.json}")
    if not args.no_save:
        progress(f"saved {R.save(result, args.save)}")
    return 1 if any(r["status"] == "error" for r in result["results"]) else 0
