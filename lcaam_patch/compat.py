"""Import paths of lcaam-patch 0.1.0 that whole-model pickles name.

`torch.save(model)` records each class and function by module path; these modules moved
in 0.2.0, so the old paths are kept as aliases of the modules that now hold those names.
"""

from __future__ import annotations

import importlib
import sys

LEGACY_MODULES = {
    "lcaam_patch.generator": "lcaam_patch.generators",
    "lcaam_patch.lowrank": "lcaam_patch.generators",
    "lcaam_patch.registry": "lcaam_patch.site",
    "lcaam_patch.state": "lcaam_patch.site",
}


def install_legacy_aliases() -> None:
    """Make each old module path importable as the module that now holds its names."""
    for old, new in LEGACY_MODULES.items():
        sys.modules.setdefault(old, importlib.import_module(new))
