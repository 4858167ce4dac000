"""The ``fastloss`` command line."""

import argparse
import sys

from ._version import __version__


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="fastloss",
        description="Fused, compiled loss kernels for numpy: cross-entropy and MSE.")
    parser.add_argument("--version", action="version", version=f"fastloss {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="train a small softmax-regression model on synthetic data with "
                     "fastloss.cross_entropy_with_grad and print its loss curve")
    demo.add_argument("--steps", type=int, default=150, help="gradient steps (default 150)")
    demo.add_argument("--vocab", type=int, default=512, help="number of classes (default 512)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def main(argv=None):
    """Entry point of the ``fastloss`` command; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo
        if args.steps < 1 or args.vocab < 2:
            parser.error("--steps must be >= 1 and --vocab >= 2")
        run_demo(steps=args.steps, vocab=args.vocab, seed=args.seed, stream=sys.stdout)
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
