"""``fastloss compare``: how far a model's next-token distributions moved from a base model's."""

import sys

from .._io import write_report_json
from .evaluate import (
    add_cluster_options,
    add_progress_options,
    add_stream_options,
    check_stream_options,
    cluster,
    fail,
    layout,
)


def add_parser(sub):
    cp = sub.add_parser(
        "compare", help="compare two models' logits dumps of the same tokens: KL divergence "
                        "(mean, percentiles), top-1 agreement and, with targets, both "
                        "perplexities (like llama-perplexity --kl-divergence)",
        description="Stream the logits of BASE and MODEL for the same tokens (.npy, "
                    ".safetensors or raw shards; a quoted glob such as 'base/logits-*.npy' "
                    "gives several shards, expanded in natural order; the two may be sharded "
                    "differently) and report KL(base || model) per token (mean, standard "
                    "error, exact percentiles, the largest), how often the argmaxes agree "
                    "and, with --targets, both perplexities, ln(PPL(model)/PPL(base)) and "
                    "the change in the target's probability. Either side may instead be "
                    "hidden states with its LM head (--base-hidden/--base-lm-head, "
                    "--model-hidden/--model-lm-head); then only the other side is given "
                    "positionally. Put --targets after the positional files. Bad input "
                    "exits with status 2 and a one-line message naming the file.")
    cp.add_argument("dumps", nargs="*", metavar="BASE MODEL",
                    help="the base model's and the model's logits: one file or pattern each")
    cp.add_argument("--targets", nargs="+", metavar="T",
                    help="integer target file(s) or pattern(s) (optional): tokens whose target "
                         "is --ignore-index are left out of every figure")
    for role in ("base", "model"):
        cp.add_argument(f"--{role}-hidden", nargs="+", metavar="H",
                        help=f"instead of {role.upper()}: hidden-state file(s) (..., D) whose "
                             f"logits are H @ LM_HEAD.T + BIAS")
        cp.add_argument(f"--{role}-lm-head", metavar="FILE",
                        help=f"LM head (V, D), with --{role}-hidden")
        cp.add_argument(f"--{role}-bias", metavar="FILE",
                        help=f"LM-head bias (V,), with --{role}-hidden")
    add_stream_options(cp, "mean KL", chunk="128 MiB of each side's logits")
    cp.add_argument("--top", type=int, default=20, metavar="N",
                    help="list the N tokens of largest KL (default 20)")
    cp.add_argument("--tmpdir", metavar="DIR",
                    help="folder for the temporary files of per-token values of large dumps "
                         "(default: the system's temporary folder)")
    cp.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    cp.add_argument("--plot", metavar="PNG",
                    help="also draw the KL histogram (and, with --seq-len, the mean KL per "
                         "position) to PNG (needs matplotlib: pip install fastloss[plot])")
    add_cluster_options(cp)
    add_progress_options(cp)
    cp.set_defaults(run=run)


def _sides(args):
    """(base, model) logits paths from the positional files and the --*-hidden options."""
    hidden = [args.base_hidden is not None, args.model_hidden is not None]
    need = hidden.count(False)
    if len(args.dumps) != need:
        roles = [r.upper() for r, h in zip(("base", "model"), hidden, strict=True) if not h]
        expect = " and ".join(roles) if roles else "none (both sides are --*-hidden)"
        raise ValueError(f"expected {need} positional dump(s) ({expect}), found "
                         f"{len(args.dumps)}: {' '.join(args.dumps) or 'none'}")
    files = iter(args.dumps)
    base = None if hidden[0] else next(files)
    model = None if hidden[1] else next(files)
    for role, h in zip(("base", "model"), hidden, strict=True):
        if h and getattr(args, f"{role}_lm_head") is None:
            raise ValueError(f"--{role}-hidden: needs --{role}-lm-head FILE")
        if not h and (getattr(args, f"{role}_lm_head") or getattr(args, f"{role}_bias")):
            raise ValueError(f"--{role}-lm-head/--{role}-bias: only used with --{role}-hidden")
    return base, model


def run(args, argv):
    """``fastloss compare``: returns the exit status (2 on bad input, 1 when --plot lacks
    matplotlib; one line on stderr)."""
    from ..evaluation import compare

    try:
        base, model = _sides(args)
        check_stream_options(args)
        if args.top < 0:
            raise ValueError(f"--top: expected a non-negative integer, found {args.top}")
        if args.shift and not args.targets:
            raise ValueError("--shift: needs --targets (the token ids)")
        with cluster(args) as client:
            report = compare(base, model, args.targets,
                             base_hidden=args.base_hidden, base_lm_head=args.base_lm_head,
                             base_bias=args.base_bias, model_hidden=args.model_hidden,
                             model_lm_head=args.model_lm_head, model_bias=args.model_bias,
                             ignore_index=args.ignore_index, seq_len=args.seq_len, shift=args.shift,
                             chunk_tokens=args.chunk_tokens, top=args.top, layout=layout(args),
                             tmpdir=args.tmpdir, progress=args.progress, client=client,
                             worker_threads=args.worker_threads)
        if report.tokens == 0:
            raise ValueError(f"{', '.join(report.targets_files)}: no counted tokens (every "
                             f"target equals --ignore-index {args.ignore_index})")
        sys.stdout.write(report.format())
        sys.stdout.flush()
        if args.json:
            write_report_json(report.to_dict(), args.json)
    except (ValueError, TypeError, OSError) as e:
        fail(args, e, "compare")
        return 2
    except ImportError as e:  # Dask missing for --scheduler / --workers
        fail(args, e, "compare")
        return 1
    if args.plot:
        from ..evaluation.plot import plot_compare
        try:
            plot_compare(report, args.plot)
        except RuntimeError:  # matplotlib missing (plot.INSTALL_HINT)
            fail(args, RuntimeError("--plot needs matplotlib: pip install fastloss[plot]"), "compare")
            return 1
        except OSError as e:
            fail(args, OSError(f"{args.plot}: cannot write: {e.strerror or e}"), "compare")
            return 2
    return 0
