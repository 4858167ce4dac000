"""``fastloss eval``: stream a dump through the kernels and print the evaluation report."""

import os
import sys


def add_parser(sub):
    ev = sub.add_parser(
        "eval", help="evaluate a logits dump (.npy files, streamed in chunks) against targets "
                     "and print loss, perplexity, accuracy, calibration and baselines",
        description="Stream LOGITS (one or more .npy shards of shape (..., V), concatenated "
                    "along tokens) against TARGETS and print the evaluation table. Bad input "
                    "exits with status 2 and a one-line message naming the file.")
    ev.add_argument("logits", nargs="+", metavar="LOGITS", help=".npy file(s) of logits")
    ev.add_argument("--targets", nargs="+", required=True, metavar="T",
                    help=".npy file(s) of integer targets, the same number of tokens in total")
    ev.add_argument("--ignore-index", type=int, default=-100,
                    help="target value not counted (default -100)")
    ev.add_argument("--chunk-tokens", type=int, metavar="N",
                    help="tokens per chunk (default: 64 MiB of logits)")
    ev.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    ev.add_argument("--train-loss", type=float, metavar="X",
                    help="training loss (nats) to report the validation - train gap")
    ev.add_argument("--skip-invalid", action="store_true",
                    help="leave tokens with a NaN loss out (with a warning) instead of failing")
    ev.add_argument("--debug", action="store_true", help="show the traceback of an error")
    ev.set_defaults(run=run)


def write_json_atomic(obj, path):
    """Write ``obj`` as JSON to ``path`` via a temporary file in the same folder and os.replace."""
    import json
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastloss-eval-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def run(args, argv):
    """``fastloss eval``: returns the exit status (2 on bad input, with one line on stderr)."""
    from ..evaluation import evaluate

    try:
        if args.chunk_tokens is not None and args.chunk_tokens < 1:
            raise ValueError(f"--chunk-tokens: expected a positive integer, found {args.chunk_tokens}")
        report = evaluate(args.logits, args.targets, ignore_index=args.ignore_index,
                          chunk_tokens=args.chunk_tokens,
                          on_invalid="skip" if args.skip_invalid else "raise",
                          train_loss=args.train_loss)
        if report.tokens == 0:
            raise ValueError(f"{', '.join(args.targets)}: no counted tokens (every target equals "
                             f"--ignore-index {args.ignore_index})")
        sys.stdout.write(report.format())
        sys.stdout.flush()
        if args.json:
            write_json_atomic(report.to_dict(), args.json)
    except (ValueError, TypeError, OSError) as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"fastloss eval: error: {msg}\n")
        return 2
    return 0
