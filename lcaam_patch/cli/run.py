"""`lcaam-patch run`: run an upstream training script unmodified, with LCAAM applied.

The adapter that declares a preset names, in `Adapter.builders`, the upstream functions
that build the model ("module:attribute"). `run` registers a wrapt post-import hook for
each of those modules; when the script imports one, the attribute is wrapped so that the
model it returns (or the first item of a returned tuple) goes through
`lcaam_patch.apply(model, preset=..., **options)` before the script sees it, so the LCAAM
parameters exist before the optimizer is built and before any checkpoint is loaded. A
class's `__init__` may be the builder too ("module:Class.__init__"): the instance is
patched when it returns. Name it instead of the class where the class's own methods name
it (`super(Class, self)`), which a wrapper put in place of the class would break. The
script runs as `__main__` with `sys.argv` and `sys.path[0]` set as `python script.py`
would set them (the script's directory is put in front of the current path).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import runpy
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import wrapt
from torch import nn

from ..adapters import Adapter, registered_adapters
from ..errors import LauncherError, UnknownAdapterError
from ..patching import apply, patched_sites
from .options import add_apply_arguments, apply_options


@dataclasses.dataclass
class _Session:
    preset: str
    adapter: Adapter
    options: dict[str, Any]
    active: bool = True
    built: int = 0
    wrapped: list[tuple[object, str, object]] = dataclasses.field(default_factory=list)


def adapter_for_preset(preset: str) -> Adapter:
    """The registered adapter that declares `preset`."""
    adapters = registered_adapters()
    for adapter in adapters.values():
        if preset in adapter.presets:
            return adapter
    known = sorted(name for adapter in adapters.values() for name in adapter.presets)
    raise UnknownAdapterError(f"no preset named {preset!r}; registered presets: {known}")


def builder_targets(preset: str) -> tuple[str, ...]:
    """The "module:attribute" model builders that `run` wraps for `preset`."""
    adapter = adapter_for_preset(preset)
    targets = tuple(adapter.builders.get(preset, ()))
    if not targets:
        raise LauncherError(
            f"preset {preset!r} (adapter {adapter.name!r}) names no model builder, so the "
            f"launcher cannot find the model; add lcaam_patch.apply(model, preset={preset!r}) "
            f"to the script where it builds the model, or declare the builder in the "
            f"adapter's `builders`"
        )
    for target in targets:
        module_name, _, attribute = target.partition(":")
        if not module_name or not attribute:
            raise LauncherError(
                f"adapter {adapter.name!r} declares builder {target!r} for preset {preset!r}; "
                f"write it as 'package.module:function' (or 'package.module:Class.method')"
            )
    return targets


def run(
    script: str | os.PathLike[str],
    args: Sequence[str] = (),
    *,
    preset: str,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Run `script` as `__main__` with `args`, patching the model its builders return.

    `options` are options of `apply` that override the preset's (and those the adapter
    reads off the builder's arguments). Raises `LauncherError` when the script finishes
    without having called any builder. `sys.argv`, `sys.path` and the wrapped builders are
    restored afterwards.
    """
    path = os.fspath(script)
    if not os.path.isfile(path):
        raise LauncherError(
            f"script {path!r} does not exist; give the path of the upstream's training "
            f"script, e.g. lcaam-patch run --preset {preset} -- path/to/train.py ARGS"
        )
    targets = builder_targets(preset)
    session = _Session(preset, adapter_for_preset(preset), dict(options or {}))
    for target in targets:
        wrapt.register_post_import_hook(_hook(session, target), target.partition(":")[0])
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.realpath(path)))
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        session.active = False
        for owner, attribute, original in session.wrapped:
            setattr(owner, attribute, original)
        sys.argv = saved_argv
        sys.path[:] = saved_path
    if session.built == 0:
        raise LauncherError(
            f"{path} finished without calling {', '.join(targets)}, so nothing was patched; "
            f"run the upstream's training script that builds the model through it, or add "
            f"lcaam_patch.apply(model, preset={preset!r}) to your script"
        )


def _hook(session: _Session, target: str) -> Any:
    module_name, _, attribute = target.partition(":")

    def wrap_builder(module: ModuleType) -> None:
        if not session.active:
            return
        owner: object = module
        *parents, name = attribute.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        if owner is None or not hasattr(owner, name):
            raise LauncherError(
                f"{module_name} has no attribute {attribute!r}, so the launcher cannot wrap "
                f"the model builder of preset {session.preset!r}; this upstream version is "
                f"not the one adapter {session.adapter.name!r} knows: check out the pinned "
                f"version or add lcaam_patch.apply(model, preset={session.preset!r}) to the script"
            )
        original = vars(owner)[name] if name in vars(owner) else getattr(owner, name)
        session.wrapped.append((owner, name, original))
        wrapt.wrap_function_wrapper(owner, name, _patching_wrapper(session))

    return wrap_builder


def _patching_wrapper(session: _Session) -> Any:
    def wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        result = wrapped(*args, **kwargs)
        if not session.active:
            return result
        model = result[0] if isinstance(result, tuple) and result else result
        if result is None and isinstance(instance, nn.Module):
            model = instance  # a wrapped Class.__init__ built `instance`
        if not isinstance(model, nn.Module):
            raise LauncherError(
                f"the builder wrapped for preset {session.preset!r} returned "
                f"{type(model).__name__}, not an nn.Module (or a tuple starting with one); "
                f"fix the adapter's `builders` or patch the model in the script with "
                f"lcaam_patch.apply"
            )
        read = session.adapter.builder_options(session.preset, args, kwargs)
        apply(model, preset=session.preset, **{**read, **session.options})
        session.built += 1
        print(
            f"lcaam-patch: patched {len(patched_sites(model))} attention modules of "
            f"{type(model).__name__} (preset {session.preset!r})",
            file=sys.stderr,
        )
        return result

    return wrapper


def add_run_parser(commands: Any) -> None:
    """Add the `run` subcommand to the `lcaam-patch` argument parser's subparsers."""
    parser = commands.add_parser(
        "run",
        help="run an upstream training script unmodified, with LCAAM applied to its model",
        description=(
            "Run SCRIPT as __main__ with ARGS, patching the model that the preset's builder "
            "returns before the script builds its optimizer or loads a checkpoint. Options "
            "given here override the preset's."
        ),
        usage="lcaam-patch run --preset NAME [options] -- SCRIPT [ARGS ...]",
    )
    parser.add_argument("--preset", required=True, help="a registered preset, e.g. qd_detr")
    add_apply_arguments(parser)
    parser.add_argument("script", help="the upstream script, e.g. qd_detr/train.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    parser.set_defaults(handler=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    run(args.script, args.args, preset=args.preset, options=apply_options(args))
    return 0
