"""The ``fastloss`` command line: one module per subcommand.

Each subcommand module has ``add_parser(sub)``, which adds its parser and sets
``run``, and ``run(args, argv) -> exit status``.
"""

import argparse
import os
import sys

from .._version import __version__
from . import bench, compare, curves, demo, evaluate

SUBCOMMANDS = (demo, bench, evaluate, compare, curves)


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="fastloss",
        description="Fused, compiled loss kernels for numpy: cross-entropy and MSE.")
    parser.add_argument("--version", action="version", version=f"fastloss {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv=None):
    """Entry point of the ``fastloss`` command; returns the exit status."""
    parser = _build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args, argv)
    except Exception as e:  # a bug: exit 1 with one line (bad input exits 2 in run)
        if os.environ.get("FASTLOSS_DEBUG") == "1" or getattr(args, "debug", False):
            raise
        msg = " ".join(str(e).split())
        sys.stderr.write(f"fastloss {args.command}: internal error: {type(e).__name__}"
                         f"{': ' + msg if msg else ''} (please report it with the command "
                         f"line; FASTLOSS_DEBUG=1 shows the traceback)\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
