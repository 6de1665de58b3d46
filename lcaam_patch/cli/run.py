"""`lcaam-patch run`: run an upstream training command unmodified, with LCAAM applied.

The model builders ("module:attribute") are those the preset's adapter declares in
`Adapter.builders`, plus any given with `--builder`. Each Python process that imports a
builder's module has that attribute wrapped (a wrapt post-import hook), so that the model
it returns (or the first item of a returned tuple) goes through `lcaam_patch.apply` before
the script sees it: the LCAAM parameters exist before the optimizer is built, before DDP
wraps the model and before the script loads a checkpoint. A class's `__init__` may be the
builder too ("module:Class.__init__"): then the own `__init__` of every subclass, defined
before or after, is wrapped as well, and an instance is patched when its outermost
constructor returns, so a subclass that adds modules after `super().__init__()` is patched
whole. Name it instead of the class where the class's own methods name it
(`super(Class, self)`), which a wrapper put in place of the class would break. A builder
called inside another one (an `Auto*` class calling the model class, a model built inside
another's constructor) is left to the outer call.

How every process gets the hooks, as `opentelemetry-instrument` does: the plan (preset,
builders, options, a report directory) goes into the environment (`LCAAM_PATCH_RUN`, JSON)
and `bootstrap/` (whose `sitecustomize.py` installs the hooks at interpreter start) goes
in front of `PYTHONPATH`, so every Python child, of any launcher (`torchrun`,
`accelerate launch`, `python -m`), patches the model it builds. A `.py` script given
directly runs in this process as `__main__`, with `sys.argv` and `sys.path[0]` set as
`python script.py` sets them; any other command runs as a child process. Each process
leaves a report in the report directory; the launcher prints which processes patched what,
fails (`LauncherError`) when none patched anything, and otherwise returns the command's
exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import wrapt
from torch import nn

from ..adapters import Adapter, preset_adapter
from ..adapters.base import BuilderCall
from ..errors import LauncherError
from ..patching import apply, patched_sites, resolve_config
from ..pretrained import from_pretrained
from .options import add_apply_arguments, apply_options

ENV_PLAN = "LCAAM_PATCH_RUN"
BOOTSTRAP = Path(__file__).resolve().parent / "bootstrap"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every process of one `lcaam-patch run` patches; travels as JSON in `ENV_PLAN`."""

    preset: str | None
    builders: tuple[str, ...]
    options: dict[str, Any]
    reports: str

    def to_json(self) -> str:
        """The plan as the JSON that `from_json` reads."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """The plan written by `to_json`."""
        data = json.loads(text)
        return cls(data["preset"], tuple(data["builders"]), dict(data["options"]), data["reports"])


def adapter_for_preset(preset: str) -> Adapter:
    """The registered adapter that declares `preset` (the highest priority on a clash)."""
    return preset_adapter(preset)


def builder_targets(preset: str | None, builders: Sequence[str] = ()) -> tuple[str, ...]:
    """The "module:attribute" model builders that `run` wraps: the preset's, then `builders`."""
    declared = tuple(adapter_for_preset(preset).builders.get(preset, ())) if preset is not None else ()
    targets = tuple(dict.fromkeys((*declared, *builders)))
    if not targets:
        if preset is None:
            raise LauncherError(
                "lcaam-patch run needs --preset NAME or --builder module:function (the function of your "
                "script that returns the model), e.g. --builder train:build_model"
            )
        raise LauncherError(
            f"preset {preset!r} (adapter {adapter_for_preset(preset).name!r}) names no model builder, so "
            f"the launcher cannot find the model; name the function that returns it with --builder "
            f"module:function, add lcaam_patch.apply(model, preset={preset!r}) to the script, or declare "
            f"the builder in the adapter's `builders`"
        )
    for target in targets:
        module_name, _, attribute = target.partition(":")
        if not module_name or not attribute:
            raise LauncherError(
                f"builder {target!r} is not 'module:attribute'; write it as 'package.module:function' "
                f"(or 'package.module:Class.method')"
            )
    return targets


class Session:
    """The builders wrapped in one process, and what the wrappers patched."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.adapter = adapter_for_preset(plan.preset) if plan.preset is not None else None
        self.active = True
        self.depth = 0
        self.patched: list[dict[str, Any]] = []
        self.wrapped: list[tuple[object, str, object]] = []
        self._wrappers: set[int] = set()
        self._constructed: set[type] = set()

    def install(self) -> None:
        """Wrap each builder as soon as its module is imported (at once if it already is)."""
        for target in self.plan.builders:
            wrapt.register_post_import_hook(self.hook(target), target.partition(":")[0])

    def uninstall(self) -> None:
        """Stop patching and put the original builders back."""
        self.active = False
        for owner, attribute, original in reversed(self.wrapped):
            if original is _ABSENT:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)
        self.wrapped.clear()
        self._wrappers.clear()
        self._constructed.clear()

    def hook(self, target: str) -> Any:
        """The post-import hook that wraps `target` in its module."""

        def wrap_builder(module: ModuleType) -> None:
            self.wrap(target, module)

        return wrap_builder

    def wrap(self, target: str, module: ModuleType) -> None:
        """Wrap `target` ("module:attribute") in the imported `module`."""
        if not self.active:
            return
        attribute = target.partition(":")[2]
        owner: object = module
        *parents, name = attribute.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        if owner is None or not hasattr(owner, name):
            raise LauncherError(
                f"{module.__name__} has no attribute {attribute!r}, so the launcher cannot wrap the model "
                f"builder {target!r}; name a function that exists with --builder, or, for a preset's "
                f"builder, install the upstream version its adapter supports"
            )
        if name == "__init__" and isinstance(owner, type):
            self._wrap_constructors(target, owner)
            return
        original = vars(owner)[name] if name in vars(owner) else getattr(owner, name)
        if id(original) in self._wrappers:
            return  # an alias of a builder already wrapped (`from module import builder`)
        wrapt.wrap_function_wrapper(owner, name, self._wrapper(target))
        self._wrappers.add(id(vars(owner)[name]))
        self.wrapped.append((owner, name, original))

    def _wrap_constructors(self, target: str, base: type) -> None:
        """Wrap the own `__init__` of `base` and of each of its subclasses, those defined now and,
        through `base.__init_subclass__`, those defined later."""
        if base in self._constructed:
            return
        self._constructed.add(base)
        self._wrap_constructor(target, base, inherited=True)
        pending: list[type] = base.__subclasses__()
        while pending:
            cls = pending.pop()
            self._wrap_constructor(target, cls)
            pending.extend(cls.__subclasses__())
        original = vars(base).get("__init_subclass__", _ABSENT)
        session = self
        parent_of: Any = base

        def init_subclass(cls: Any, **kwargs: Any) -> None:
            if original is _ABSENT:
                super(parent_of, cls).__init_subclass__(**kwargs)
            else:
                original.__get__(None, cls)(**kwargs)
            if session.active:
                session._wrap_constructor(target, cls)

        base.__init_subclass__ = classmethod(init_subclass)  # type: ignore[assignment,method-assign]
        self.wrapped.append((base, "__init_subclass__", original))

    def _wrap_constructor(self, target: str, cls: type, inherited: bool = False) -> None:
        """Wrap `cls.__init__` if `cls` defines its own, or the one it inherits if `inherited`."""
        original = vars(cls).get("__init__", _ABSENT)
        if (original is _ABSENT and not inherited) or id(original) in self._wrappers:
            return
        wrapt.wrap_function_wrapper(cls, "__init__", self._wrapper(target, constructor=cls))
        self._wrappers.add(id(vars(cls)["__init__"]))
        self.wrapped.append((cls, "__init__", original))

    def _wrapper(self, target: str, constructor: type | None = None) -> Any:
        def wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not self.active or self.depth:
                return wrapped(*args, **kwargs)
            if constructor is not None and _own_constructor(type(instance)) is not constructor:
                return wrapped(*args, **kwargs)  # a base's `__init__`, called by the instance's own
            preset = self.plan.preset
            call = BuilderCall(args, kwargs)
            if self.adapter is not None and preset is not None:
                call = self.adapter.builder_call(preset, target, args, kwargs)
            self.depth += 1
            try:
                result = wrapped(*call.args, **call.kwargs)
                model = result[0] if isinstance(result, tuple) and result else result
                if result is None and isinstance(instance, nn.Module):
                    model = instance  # a wrapped Class.__init__ built `instance`
                if not isinstance(model, nn.Module):
                    raise LauncherError(
                        f"the builder {target!r} returned {type(model).__name__}, not an nn.Module (or a "
                        f"tuple starting with one); name the function that returns the model with "
                        f"--builder, or patch the model in the script with lcaam_patch.apply"
                    )
                self._patch(model, target, call, args, kwargs)
            finally:
                self.depth -= 1
            return result

        return wrapper

    def _patch(
        self, model: nn.Module, target: str, call: BuilderCall, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> None:
        preset = self.plan.preset
        if call.saved is not None:
            from_pretrained(model, call.saved)
            weights = f"patched as saved in {call.saved}, its LCAAM weights loaded"
        else:
            read = {}
            if self.adapter is not None and preset is not None:
                read = self.adapter.builder_options(preset, args, kwargs)
            apply(model, preset=preset, **{**read, **self.plan.options})
            if call.load is not None:
                weights = call.load(model)
            else:
                init = resolve_config(preset, {**read, **self.plan.options}).init
                weights = f"the builder loaded no checkpoint: LCAAM is at init {init!r} until the script loads one"
        sites = len(patched_sites(model))
        entry = {"model": type(model).__name__, "sites": sites, "builder": target, "weights": weights}
        self.patched.append(entry)
        # One write of the whole line: ranks share stderr, and print's separate newline lets their lines run together.
        sys.stderr.write(
            f"lcaam-patch: {_process()}patched {sites} attention modules of {entry['model']} "
            f"(preset {preset!r}, builder {target}); {weights}\n"
        )
        sys.stderr.flush()

    def report(self) -> dict[str, Any]:
        """What this process patched, as the launcher collects it."""
        return {"pid": os.getpid(), "rank": os.environ.get("RANK"), "argv": sys.argv, "patched": self.patched}

    def write_report(self) -> None:
        """Leave `report()` in the plan's report directory."""
        write_report(self.plan.reports, self.report())


_ABSENT = object()  # an attribute that the class did not define itself


def _own_constructor(cls: type) -> type:
    """The class whose `__init__` constructs instances of `cls` (the first in its MRO to define one)."""
    return next(klass for klass in cls.__mro__ if "__init__" in vars(klass))


def write_report(directory: str, report: Mapping[str, Any]) -> None:
    """Write one process's report into the report `directory` (silently skipped once it is gone)."""
    if os.path.isdir(directory):
        Path(directory, f"{os.getpid()}.json").write_text(json.dumps(report), encoding="utf-8")


_CHILD: Session | None = None


def child_hook(target: str, module: ModuleType) -> None:
    """Wrap `target` in a child process started under the launcher (called by the bootstrap)."""
    global _CHILD
    if _CHILD is None:
        _CHILD = Session(Plan.from_json(os.environ[ENV_PLAN]))
    _CHILD.wrap(target, module)


def child_report() -> dict[str, Any] | None:
    """This child process's report, or None when no builder module was imported."""
    return None if _CHILD is None else _CHILD.report()


def run(
    command: str | os.PathLike[str],
    args: Sequence[str] = (),
    *,
    preset: str | None = None,
    builders: Sequence[str] = (),
    options: Mapping[str, Any] | None = None,
) -> int:
    """Run `command` with `args`, patching the model that the builders return in every Python
    process it starts; returns the command's exit status.

    `options` are options of `apply` that override the preset's (and those the adapter
    reads off the builder's arguments). A `.py` script runs in this process as `__main__`
    (`sys.argv`, `sys.path` and the wrapped builders are restored afterwards); any other
    command runs as a child process. Raises `LauncherError` when no process built a model
    through a builder and the command succeeded.
    """
    name = os.fspath(command)
    targets = builder_targets(preset, builders)
    with tempfile.TemporaryDirectory(prefix="lcaam-patch-run-") as reports:
        plan = Plan(preset, targets, dict(options or {}), reports)
        with _environment(plan):
            if name.endswith(".py"):
                status = _run_script(plan, name, args)
            else:
                status = _run_command([_executable(name, preset), *args])
        collected = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(Path(reports).glob("*.json"))]
    _summarise(collected, name, targets, status, preset)
    return status


def _run_script(plan: Plan, path: str, args: Sequence[str]) -> int:
    if not os.path.isfile(path):
        raise LauncherError(
            f"script {path!r} does not exist; give the path of the training script, e.g. "
            f"lcaam-patch run --preset {plan.preset or 'NAME'} -- path/to/train.py ARGS"
        )
    session = Session(plan)
    session.install()
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.realpath(path)))
    try:
        runpy.run_path(path, run_name="__main__")
        status = 0
    except SystemExit as exit_:
        status = _exit_status(exit_.code)
    finally:
        session.uninstall()
        session.write_report()
        sys.argv = saved_argv
        sys.path[:] = saved_path
    return status


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _executable(name: str, preset: str | None) -> str:
    """`name` as a path, or found on PATH (this Python's bin directory first)."""
    if os.sep in name and os.access(name, os.X_OK):
        return name
    found = shutil.which(name, path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if found is None:
        raise LauncherError(
            f"command {name!r} is neither a script nor found on PATH; give a training script "
            f"(lcaam-patch run --preset {preset or 'NAME'} -- train.py ARGS) or a launcher that is "
            f"installed (torchrun, accelerate, python -m MODULE)"
        )
    return found


def _run_command(command: list[str]) -> int:
    return subprocess.run(command, check=False).returncode


@contextmanager
def _environment(plan: Plan) -> Iterator[None]:
    """`ENV_PLAN` and the bootstrap in front of PYTHONPATH, for this process's children."""
    saved = {key: os.environ.get(key) for key in (ENV_PLAN, "PYTHONPATH")}
    os.environ[ENV_PLAN] = plan.to_json()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(BOOTSTRAP), saved["PYTHONPATH"]) if p)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _process() -> str:
    rank = os.environ.get("RANK")
    return f"rank {rank}: " if rank is not None else ""


def _summarise(
    reports: list[dict[str, Any]], command: str, targets: Sequence[str], status: int, preset: str | None
) -> None:
    patched = [report for report in reports if report["patched"]]
    idle = len(reports) - len(patched)
    for report in patched:
        where = f"rank {report['rank']}" if report["rank"] is not None else f"process {report['pid']}"
        models = ", ".join(f"{p['model']} ({p['sites']} sites)" for p in report["patched"])
        print(f"lcaam-patch run: {where} patched {models}", file=sys.stderr)
    if patched:
        if idle:
            print(f"lcaam-patch run: {idle} other Python process(es) built no model", file=sys.stderr)
        return
    apply = f", preset={preset!r}" if preset is not None else ", ..."
    message = (
        f"{command} finished without calling {', '.join(targets)}, so nothing was patched; run the "
        f"training script that builds the model through it, name your own builder with --builder "
        f"module:function, or add lcaam_patch.apply(model{apply}) to your script"
    )
    if status != 0:
        print(f"lcaam-patch run: {message} (it exited with status {status})", file=sys.stderr)
        return
    raise LauncherError(message)


def add_run_parser(commands: Any) -> None:
    """Add the `run` subcommand to the `lcaam-patch` argument parser's subparsers."""
    parser = commands.add_parser(
        "run",
        help="run a training script or launcher unmodified, with LCAAM applied to its model",
        description=(
            "Run COMMAND (a training script, python -m MODULE, torchrun, accelerate launch, ...) "
            "with ARGS; every Python process it starts patches the model that a builder returns, "
            "before the script builds its optimizer or loads a checkpoint. Options given here "
            "override the preset's. Exits with the command's status."
        ),
        usage="lcaam-patch run (--preset NAME | --builder MODULE:FUNCTION ...) [options] -- COMMAND [ARGS ...]",
    )
    parser.add_argument("--preset", help="a registered preset, e.g. timm_vit, transformers, qd_detr")
    parser.add_argument(
        "--builder",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION",
        help="a function that returns the model, e.g. train:build_model (repeat the flag for several)",
    )
    add_apply_arguments(parser)
    parser.add_argument("launched", metavar="COMMAND", help="the training script or launcher: train.py, torchrun, ...")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    parser.set_defaults(handler=_run_command_line)


def _run_command_line(args: argparse.Namespace) -> int:
    return run(args.launched, args.args, preset=args.preset, builders=args.builder, options=apply_options(args))
