"""The `lcaam-patch` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..errors import LCAAMError
from .inspect import add_inspect_parser
from .run import add_run_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lcaam-patch` console script."""
    parser = argparse.ArgumentParser(prog="lcaam-patch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small timm ViT on scikit-learn's digits, unpatched and patched")
    demo.add_argument("--epochs", type=int, default=30, help="training epochs per run (30: about a minute)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    demo.add_argument("--plot-dir", default="lcaam-demo-output", help="where the learned-mask heatmaps go")
    demo.set_defaults(handler=_run_demo)
    add_inspect_parser(commands)
    add_run_parser(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except LCAAMError as error:
        parser.exit(2, f"lcaam-patch {args.command}: {error}\n")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(epochs=args.epochs, seed=args.seed, threads=args.threads, plot_dir=args.plot_dir)
    return 0
