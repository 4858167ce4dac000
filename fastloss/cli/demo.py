"""``fastloss demo``: the built-in example that README's first command runs."""

import sys


def add_parser(sub):
    demo = sub.add_parser(
        "demo", help="train a small softmax-regression model on synthetic data with "
                     "fastloss.cross_entropy_with_grad and print its loss curve")
    demo.add_argument("--steps", type=int, default=150, help="gradient steps (default 150)")
    demo.add_argument("--vocab", type=int, default=512, help="number of classes (default 512)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(run=run, demo_parser=demo)


def run(args, argv):
    from ..demo import run_demo

    if args.steps < 1 or args.vocab < 2:
        args.demo_parser.error("--steps must be >= 1 and --vocab >= 2")
    run_demo(steps=args.steps, vocab=args.vocab, seed=args.seed, stream=sys.stdout)
    return 0
