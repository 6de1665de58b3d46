"""The `lcaam-patch` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .inspection import add_inspect_parser
from .launcher import add_run_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lcaam-patch` console script."""
    parser = argparse.ArgumentParser(prog="lcaam-patch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a small timm ViT on scikit-learn's digits, unpatched and patched"
    )
    demo.add_argument(
        "--epochs", type=int, default=30, help="training epochs per run (30: about a minute)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_inspect_parser(commands)
    add_run_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "inspect":
        return args.handler(args)
    if args.command == "run":
        return args.handler(args)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(epochs=args.epochs, seed=args.seed, threads=args.threads)
    return 0
