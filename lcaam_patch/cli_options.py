"""The options of `apply` as command-line arguments, shared by `lcaam-patch` subcommands."""

from __future__ import annotations

import argparse
from typing import Any

from .config import ACTIVATIONS, FUSIONS, INITS, MODES

APPLY_OPTIONS = (
    "mode",
    "fusion",
    "depth",
    "hidden",
    "activation",
    "init",
    "max_tokens",
    "max_kv_tokens",
    "backend",
)


def add_apply_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --mode, --fusion, ... --backend; each overrides the preset's value when given."""
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--fusion", choices=FUSIONS)
    parser.add_argument("--depth", type=int, help="Linear layers of the generator")
    parser.add_argument("--hidden", type=int, help="hidden width of the generator")
    parser.add_argument("--activation", choices=ACTIVATIONS)
    parser.add_argument("--init", choices=INITS)
    parser.add_argument("--max-tokens", type=int, help="bound on the query tokens")
    parser.add_argument("--max-kv-tokens", type=int, help="bound on the key tokens")
    parser.add_argument("--backend", help="auto, eager, sdpa or a registered backend")


def apply_options(args: argparse.Namespace) -> dict[str, Any]:
    """The apply options given on the command line (those left out are not set)."""
    return {name: getattr(args, name) for name in APPLY_OPTIONS if getattr(args, name) is not None}
