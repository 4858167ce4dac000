"""``fastloss demo``: the built-in example that README's first command runs."""

import sys


def add_parser(sub):
    demo = sub.add_parser(
        "demo", help="train a small character-level language model on Python's own "
                     "documentation with fastloss.cross_entropy_with_grad, then evaluate its "
                     "validation logits and diagnose its loss curves",
        description="Train a next-character model (plain numpy; every gradient from "
                    "fastloss.cross_entropy_with_grad) on pydoc_data.topics, which ships with "
                    "Python, log its losses, dump its validation logits, and print "
                    "fastloss.evaluate's report and the curve diagnosis. No downloads.")
    demo.add_argument("--steps", type=int, help="gradient steps (default 3000; 300 with --quick)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--out", metavar="DIR",
                      help="keep the log (train_log.csv), the dump (val_logits.npy, "
                           "val_targets.npy) and the reports in DIR (default: a temporary "
                           "folder, removed)")
    demo.add_argument("--plot", metavar="DIR",
                      help="draw curves.png and eval.png into DIR (needs matplotlib: "
                           "pip install fastloss[plot])")
    demo.add_argument("--quick", action="store_true",
                      help="a smaller model and run (a few seconds)")
    demo.set_defaults(run=run, demo_parser=demo)


def run(args, argv):
    """``fastloss demo``: returns the exit status."""
    import os

    from ..demo import run_demo

    parser = args.demo_parser
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps: expected a positive integer, found {args.steps}")
    for name in ("out", "plot"):
        folder = getattr(args, name)
        if folder is not None and os.path.exists(folder) and not os.path.isdir(folder):
            parser.error(f"--{name}: {folder} exists and is not a folder")
    run_demo(steps=args.steps, seed=args.seed, out=args.out, plot=args.plot, quick=args.quick,
             stream=sys.stdout)
    return 0
