"""The registry of adapters and their presets.

Built-in adapters register when `lcaam_patch.adapters` is imported. Third-party packages
register theirs through the entry-point group `lcaam_patch.adapters`; each entry point
names an `Adapter` instance (or a zero-argument callable returning one). An entry point
that fails to load is warned about and skipped. `register_adapter` does the same at run
time.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from ..errors import RegistrationError, UnknownAdapterError
from .base import Adapter

ENTRY_POINT_GROUP = "lcaam_patch.adapters"

_ADAPTERS: dict[str, Adapter] = {}
_entry_points_loaded = False


def register_adapter(adapter: Adapter, *, replace: bool = False) -> Adapter:
    """Register `adapter` under `adapter.name`; returns it so it can decorate."""
    if not isinstance(adapter, Adapter):
        raise RegistrationError(
            f"register_adapter expects an lcaam_patch.Adapter instance, got "
            f"{type(adapter).__name__}; subclass lcaam_patch.Adapter and pass an instance"
        )
    if not isinstance(adapter.name, str) or not adapter.name:
        raise RegistrationError(f"{type(adapter).__name__} has no name; set the class attribute `name`")
    if adapter.name in _ADAPTERS and not replace and _ADAPTERS[adapter.name] is not adapter:
        raise RegistrationError(f"an adapter named {adapter.name!r} is already registered; pass replace=True")
    _ADAPTERS[adapter.name] = adapter
    return adapter


def unregister_adapter(name: str) -> None:
    """Forget the adapter called `name`."""
    _ADAPTERS.pop(name, None)


def registered_adapters() -> dict[str, Adapter]:
    """Every registered adapter by name, entry points included, highest priority first."""
    _load_entry_points()
    return dict(sorted(_ADAPTERS.items(), key=lambda item: -item[1].priority))


def get_adapter(name: str) -> Adapter:
    """The adapter called `name`."""
    adapters = registered_adapters()
    if name not in adapters:
        raise UnknownAdapterError(f"no adapter named {name!r}; registered adapters: {sorted(adapters)}")
    return adapters[name]


def preset_adapter(name: str) -> Adapter:
    """The adapter that declares the preset `name`; on a clash the highest priority wins."""
    for adapter in registered_adapters().values():
        if name in adapter.presets:
            return adapter
    raise UnknownAdapterError(f"no preset named {name!r}; registered presets: {sorted(presets())}")


def presets() -> dict[str, Mapping[str, Any]]:
    """Every preset that a registered adapter declares, by name (the highest-priority
    adapter's where several declare one name)."""
    found: dict[str, Mapping[str, Any]] = {}
    for adapter in registered_adapters().values():
        for name, options in adapter.presets.items():
            found.setdefault(name, options)
    return found


def get_preset(name: str) -> Mapping[str, Any]:
    """The options of the preset called `name` (see `preset_adapter`)."""
    return preset_adapter(name).presets[name]


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in _ADAPTERS:
            continue
        try:
            loaded = entry_point.load()
            adapter = loaded if isinstance(loaded, Adapter) else loaded()
            if adapter.name not in _ADAPTERS:
                register_adapter(adapter)
        except Exception as error:  # a broken third-party adapter must not break apply
            warnings.warn(
                f"skipping the LCAAM adapter entry point {entry_point.name!r} "
                f"({entry_point.value}): {type(error).__name__}: {error}",
                stacklevel=2,
            )
