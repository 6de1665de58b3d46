"""Installed by `lcaam-patch run` in every Python process it starts (PYTHONPATH).

Reads the launcher's plan from `LCAAM_PATCH_RUN` and registers a wrapt post-import hook for
each builder's module; only when one is imported does `lcaam_patch.cli.run` (and torch)
load and wrap the builder. At exit the process leaves its report for the launcher. Any
other `sitecustomize` on the path runs afterwards, as it would have without this one.
"""

from __future__ import annotations

import atexit
import importlib.machinery
import importlib.util
import json
import os
import sys
from types import ModuleType
from typing import Any

_PLAN = "LCAAM_PATCH_RUN"
_HERE = os.path.dirname(os.path.abspath(__file__))


def _hook(target: str) -> Any:
    def fire(module: ModuleType) -> None:
        from lcaam_patch.cli.run import child_hook

        child_hook(target, module)

    return fire


def _report(reports: str) -> None:
    launcher = sys.modules.get("lcaam_patch.cli.run")
    report = launcher.child_report() if launcher is not None else None
    if report is None:
        report = {"pid": os.getpid(), "rank": os.environ.get("RANK"), "argv": sys.argv, "patched": []}
    if os.path.isdir(reports):
        with open(os.path.join(reports, f"{os.getpid()}.json"), "w", encoding="utf-8") as f:
            json.dump(report, f)


def _install(text: str) -> None:
    import wrapt

    plan = json.loads(text)
    for target in plan["builders"]:
        wrapt.register_post_import_hook(_hook(target), target.partition(":")[0])
    atexit.register(_report, plan["reports"])


def _chain() -> None:
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get(_PLAN):
    _install(os.environ[_PLAN])
_chain()
