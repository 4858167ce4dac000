"""``fastloss eval``: stream a dump through the kernels and print the evaluation report."""

import contextlib
import sys

from .._io import check_output_path, write_report_json


def add_stream_options(parser, what, chunk="64 MiB of logits"):
    """The options ``fastloss eval`` and ``fastloss compare`` share: targets handling
    (``--ignore-index``, ``--seq-len``, ``--shift``), how raw and safetensors files are
    read (``--dtype``, ``--vocab``, ``--hidden-dim``, ``--targets-dtype``, ``--*-key``)
    and ``--chunk-tokens``; ``what`` names the per-position figure ("logits" for the
    loss, "mean KL"), ``chunk`` the default chunk size."""
    per = "the loss" if what == "logits" else f"the {what}"
    parser.add_argument("--ignore-index", type=int, default=-100,
                        help="target value not counted (default -100)")
    parser.add_argument("--seq-len", type=int, metavar="L",
                        help=f"sequence length: report {per} per position i %% L")
    parser.add_argument("--shift", action="store_true",
                        help="TARGETS hold the token ids: the target of token i is token i+1 "
                             "within each sequence of --seq-len tokens (the last position is "
                             "ignored)")
    raw = parser.add_argument_group("raw and safetensors files")
    raw.add_argument("--dtype", metavar="DT",
                     help="dtype of raw logits/hidden/LM-head files (float32, float16, bfloat16, "
                          "float64)")
    raw.add_argument("--vocab", type=int, metavar="V", help="vocabulary size of raw logits files")
    raw.add_argument("--hidden-dim", type=int, metavar="D",
                     help="hidden size of raw hidden and LM-head files")
    raw.add_argument("--targets-dtype", metavar="DT",
                     help="dtype of raw target files (default int64)")
    for kind in ("logits", "targets", "hidden", "lm-head", "bias"):
        raw.add_argument(f"--{kind}-key", metavar="NAME",
                         help=f"tensor of .safetensors {kind} files (default: the only one, "
                              f"else a conventional name)")
    parser.add_argument("--chunk-tokens", type=int, metavar="N",
                        help=f"tokens per chunk (default: {chunk})")


def add_progress_options(parser):
    """``--progress`` / ``--no-progress`` and ``--debug``."""
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                     help="show the progress bar on stderr even when it is not a terminal")
    bar.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                     help="no progress bar (default: shown when stderr is a terminal)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def add_cluster_options(parser):
    """``--scheduler`` / ``--workers`` (run on Dask) and ``--worker-threads``."""
    dist = parser.add_argument_group("distributed (Dask; pip install \"fastloss[dask]\")")
    where = dist.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="run the tasks on the workers of this Dask scheduler (tcp://host:8786); "
                            "they read the files themselves, so paths must be valid there")
    where.add_argument("--workers", type=int, metavar="N",
                       help="start a local Dask cluster of N worker processes for this run")
    dist.add_argument("--worker-threads", type=int, metavar="T",
                      help="numba/BLAS threads per task on a worker (default: the host's cores "
                           "over its workers' threads)")


@contextlib.contextmanager
def cluster(args):
    """The ``distributed.Client`` of ``--scheduler`` / ``--workers`` (closed on exit), or None."""
    if args.scheduler is None and args.workers is None:
        yield None
        return
    from ..evaluation import distributed as D

    runner = D.connect(args.scheduler) if args.scheduler is not None else D.LocalClusterRunner(args.workers)
    try:
        yield runner.client
    finally:
        runner.close()


def check_stream_options(args):
    """ValueError for bad values of the shared options (and of --json / --plot paths)."""
    for flag, value in (("--chunk-tokens", args.chunk_tokens), ("--seq-len", args.seq_len),
                        ("--vocab", args.vocab), ("--hidden-dim", args.hidden_dim),
                        ("--workers", args.workers), ("--worker-threads", args.worker_threads)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: expected a positive integer, found {value}")
    if args.shift and args.seq_len is None:
        raise ValueError("--shift: needs --seq-len L, the length of each sequence")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            check_output_path(path, flag)


def add_parser(sub):
    ev = sub.add_parser(
        "eval", help="evaluate a logits dump (.npy, .safetensors or raw files, streamed in "
                     "chunks) against targets and print loss, perplexity, accuracy, "
                     "calibration and baselines",
        description="Stream LOGITS (.npy, .safetensors or raw shards of shape (..., V), "
                    "concatenated along tokens; glob patterns such as 'dump/logits-*.npy' are "
                    "expanded in natural order), or hidden states through an LM head, against "
                    "TARGETS and print the evaluation table. Bad input exits with status 2 and "
                    "a one-line message naming the file.")
    ev.add_argument("logits", nargs="*", metavar="LOGITS",
                    help="logits file(s) or pattern(s): .npy, .safetensors, or raw (with --dtype "
                         "and --vocab)")
    ev.add_argument("--targets", nargs="+", required=True, metavar="T",
                    help="integer target file(s) or pattern(s), the same number of tokens in total "
                         "(with --shift: the token ids)")
    ev.add_argument("--hidden", nargs="+", metavar="H",
                    help="instead of LOGITS: hidden-state file(s) (..., D); the logits are "
                         "H @ LM_HEAD.T + BIAS, computed per chunk")
    ev.add_argument("--vocab-shards", nargs="+", metavar="SLICE",
                    help="instead of LOGITS: a vocabulary-sharded dump (tensor-parallel ranks), one "
                         "file or pattern per vocabulary slice, in vocabulary order; each slice's "
                         "files hold all tokens and its columns of the vocabulary")
    ev.add_argument("--lm-head", metavar="FILE", help="LM head (V, D), with --hidden")
    ev.add_argument("--bias", metavar="FILE", help="LM-head bias (V,), with --hidden")
    add_stream_options(ev, "logits")
    ev.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    ev.add_argument("--plot", metavar="PNG",
                    help="also draw the loss histogram (and, with --seq-len, the loss per "
                         "position) to PNG (needs matplotlib: pip install fastloss[plot])")
    ev.add_argument("--histogram", action="store_true",
                    help="print the per-token loss histogram (folded to one line by default; "
                         "--json always holds it)")
    ev.add_argument("--curves", metavar="LOG",
                    help="training log (CSV or JSON lines, as for `fastloss curves`): its final "
                         "training loss gives the validation - train gap (unless --train-loss), "
                         "and its diagnosis is printed after the report")
    ev.add_argument("--train-loss", type=float, metavar="X",
                    help="training loss (nats) to report the validation - train gap")
    ev.add_argument("--skip-invalid", action="store_true",
                    help="leave tokens with a NaN loss, and shards that fail to read, out (with "
                         "a warning; the report lists them) instead of failing")
    add_cluster_options(ev)
    add_progress_options(ev)
    ev.set_defaults(run=run)


def _check_args(args):
    """ValueError for argument combinations argparse cannot express."""
    if args.vocab_shards:
        if args.logits or args.hidden:
            raise ValueError("give one of LOGITS, --hidden (with --lm-head) or --vocab-shards")
        if args.lm_head or args.bias:
            raise ValueError("--lm-head/--bias: only used with --hidden")
    elif args.hidden:
        if args.logits:
            raise ValueError("give either LOGITS or --hidden (with --lm-head), not both")
        if not args.lm_head:
            raise ValueError("--hidden: needs --lm-head FILE")
    else:
        if not args.logits:
            raise ValueError("no LOGITS given (or --hidden with --lm-head)")
        if args.lm_head or args.bias:
            raise ValueError("--lm-head/--bias: only used with --hidden")
    check_stream_options(args)


def layout(args):
    """The ``Layout`` of the raw-file and safetensors flags (``--dtype``, ``--vocab``, ...)."""
    from ..evaluation import Layout

    return Layout(raw_dtype=args.dtype, vocab=args.vocab, hidden_dim=args.hidden_dim,
                  targets_dtype=args.targets_dtype, logits_key=args.logits_key,
                  targets_key=args.targets_key, hidden_key=args.hidden_key,
                  lm_head_key=args.lm_head_key, bias_key=args.bias_key)


def fail(args, e, command="eval"):
    """One ``fastloss COMMAND: error:`` line on stderr (or the exception with --debug)."""
    if args.debug:
        raise e
    msg = " ".join(str(e).split()) or type(e).__name__
    sys.stderr.write(f"fastloss {command}: error: {msg}\n")


def _step_text(step):
    """A logged step as printed: 3,000 (or 12.5 for a fractional step)."""
    return f"{int(step):,}" if float(step).is_integer() else f"{step:g}"


def run(args, argv):
    """``fastloss eval``: returns the exit status (2 on bad input, 1 when --plot lacks
    matplotlib; one line on stderr)."""
    from ..evaluation import evaluate

    try:
        _check_args(args)
        log = None
        train_loss = args.train_loss
        train_source = "given with --train-loss" if train_loss is not None else None
        if args.curves:
            from ..evaluation.curves import read_log
            log = read_log(args.curves)
            if train_loss is None:
                train_loss = float(log.train_loss[-1])
                train_source = (f"the last train_loss of {args.curves}, at step "
                                f"{_step_text(log.steps[-1])}")
        with cluster(args) as client:
            report = evaluate(args.logits or None, args.targets, hidden=args.hidden,
                              lm_head=args.lm_head, bias=args.bias, vocab_shards=args.vocab_shards,
                              ignore_index=args.ignore_index, seq_len=args.seq_len,
                              shift=args.shift, chunk_tokens=args.chunk_tokens,
                              on_invalid="skip" if args.skip_invalid else "raise",
                              train_loss=train_loss, layout=layout(args),
                              progress=args.progress, client=client,
                              worker_threads=args.worker_threads)
        report.train_loss_source = train_source
        if report.tokens == 0:
            raise ValueError(f"{', '.join(report.targets_files)}: no counted tokens (every "
                             f"target equals --ignore-index {args.ignore_index})")
        out = report.to_dict()
        text = report.format(histogram=args.histogram)
        if log is not None:
            from ..evaluation.curves import diagnose
            curves = diagnose(log, vocab=report.vocab, baseline=report.unigram_baseline,
                              baseline_name=f"unigram baseline (counts from the "
                                            f"{report.unigram_source})")
            out["curves"] = curves.to_dict()
            text += "\n" + curves.format()
        sys.stdout.write(text)
        sys.stdout.flush()
        if args.json:
            write_report_json(out, args.json)
    except (ValueError, TypeError, OSError) as e:
        fail(args, e)
        return 2
    except ImportError as e:  # Dask missing for --scheduler / --workers
        fail(args, e)
        return 1
    if args.plot:
        from ..evaluation.plot import plot_report
        try:
            plot_report(report.to_dict(), args.plot)
        except RuntimeError:  # matplotlib missing (plot.INSTALL_HINT)
            fail(args, RuntimeError("--plot needs matplotlib: pip install fastloss[plot]"))
            return 1
        except OSError as e:
            fail(args, OSError(f"{args.plot}: cannot write: {e.strerror or e}"))
            return 2
    return 0
