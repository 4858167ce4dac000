"""``fastloss curves``: diagnose a training run from its loss log."""

import sys


def _positive_int(name, minimum):
    def parse(text):
        import argparse
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, found {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, found {value}")
        return value
    parse.__name__ = name
    return parse


def _positive_float(text):
    import argparse
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive loss, found {text!r}")
    return value


def add_parser(sub):
    cv = sub.add_parser(
        "curves", help="diagnose a training run from its loss log (CSV or JSON lines): still "
                       "improving, converged or undetermined, overfitting, underfitting",
        description="Read LOG (CSV with a header naming step, train_loss and optionally "
                    "val_loss; or JSON lines with those keys) and print what the curves show, "
                    "with the numbers behind each finding. Bad input exits with status 2 and a "
                    "one-line message naming the file.")
    cv.add_argument("log", metavar="LOG", help="training log: .csv or .jsonl")
    cv.add_argument("--window", type=_positive_int("window", 3), metavar="K",
                    help="trailing training points whose slope decides 'still improving', "
                         "'converged' (its +-2 se interval allows at most a 1%% change across "
                         "them) or 'undetermined' (default: the last 20%%, at least 5)")
    cv.add_argument("--vocab", type=_positive_int("vocab", 2), metavar="V",
                    help="number of classes: compare against the uniform baseline ln V")
    cv.add_argument("--baseline", type=_positive_float, metavar="X",
                    help="another reference loss in nats (e.g. the unigram entropy)")
    cv.add_argument("--json", metavar="PATH", help="also write the diagnosis as JSON to PATH")
    cv.add_argument("--plot", metavar="PNG", help="also draw the curves to PNG (needs matplotlib)")
    cv.add_argument("--debug", action="store_true", help="show the traceback of an error")
    cv.set_defaults(run=run)


def run(args, argv):
    """``fastloss curves``: returns the exit status (2 on bad input, with one line on stderr)."""
    from .._io import check_output_path, write_report_json
    from ..evaluation.curves import diagnose, read_log

    def fail(e, status):
        if args.debug:
            raise e
        msg = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"fastloss curves: error: {msg}\n")
        return status

    try:
        for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
            if path is not None:  # before any work: a bad path prints no report
                check_output_path(path, flag)
        log = read_log(args.log)
        report = diagnose(log, window=args.window, baseline=args.baseline, vocab=args.vocab)
    except (ValueError, TypeError) as e:
        return fail(e, 2)
    sys.stdout.write(report.format())
    sys.stdout.flush()
    if args.json:
        try:
            write_report_json(report.to_dict(), args.json)
        except OSError as e:
            return fail(e, 2)
    if args.plot:
        from ..evaluation.plot import plot_curves
        try:
            plot_curves(log, args.plot, vocab=args.vocab, baseline=args.baseline, report=report)
        except RuntimeError as e:  # matplotlib missing
            return fail(e, 1)
        except OSError as e:
            return fail(OSError(f"{args.plot}: cannot write: {e.strerror or e}"), 2)
    return 0
