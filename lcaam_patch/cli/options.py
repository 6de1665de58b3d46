"""The options of `apply` as command-line flags, generated from `LCAAMConfig`'s fields."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..config import LCAAMConfig

_INTEGER_OPTIONS = ("depth", "hidden", "max_tokens", "max_kv_tokens", "rank")
_PATTERN_OPTIONS = ("targets", "exclude")


def flag(name: str) -> str:
    """The command-line flag of the option `name`: `max_kv_tokens` → `--max-kv-tokens`."""
    return "--" + name.replace("_", "-")


def add_apply_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag for every option of `apply`; each overrides the preset's value when given."""
    for field in dataclasses.fields(LCAAMConfig):
        options: dict[str, Any] = {"help": field.metadata["help"], "dest": field.name}
        if field.metadata["choices"] is not None:
            options["choices"] = field.metadata["choices"]
        if field.type in (bool, "bool"):
            options["action"] = argparse.BooleanOptionalAction
        if field.name in _INTEGER_OPTIONS:
            options["type"] = int
        if field.name in _PATTERN_OPTIONS:
            options.update(action="append", metavar="PATTERN")
            options["help"] += " (repeat the flag for several)"
        parser.add_argument(flag(field.name), **options)


def apply_options(args: argparse.Namespace) -> dict[str, Any]:
    """The apply options given on the command line (those left out are not set)."""
    names = [field.name for field in dataclasses.fields(LCAAMConfig)]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
