"""Adapters (one per upstream attention implementation), presets, and their discovery.

Third-party packages register adapters through the entry-point group
`lcaam_patch.adapters`; each entry point names an `Adapter` instance (or a zero-argument
callable returning one). `register_adapter` does the same at run time.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn

from .errors import UnknownAdapterError, UpstreamVersionError

if TYPE_CHECKING:
    from .config import LCAAMConfig
    from .site import LCAAMSite

ENTRY_POINT_GROUP = "lcaam_patch.adapters"


@dataclasses.dataclass(frozen=True)
class SiteGeometry:
    """What an adapter reads off one attention module.

    Attributes:
        embed_dim: width of the query tokens the generator reads.
        max_q_tokens: bound on query tokens (None when the adapter has no bound).
        max_kv_tokens: bound on key tokens: the generator's output width (None only
            where the options need no bound, i.e. generator="lowrank").
        kind: "self" or "cross".
        kv_embed_dim: width of the key tokens a "lowrank" generator reads; None when it
            equals `embed_dim`.
    """

    embed_dim: int
    max_q_tokens: int | None
    max_kv_tokens: int | None
    kind: str
    kv_embed_dim: int | None = None


class Adapter(abc.ABC):
    """Knows one upstream attention implementation: how to find it and run it with LCAAM.

    Subclasses set `name`, and `distribution`/`supported_versions` when they patch a
    third-party package, and implement `attention_types`, `geometry` and `forward`.
    Where several adapters claim a module, the one with the highest `priority` wins
    (model-family adapters above generic ones).

    `presets` maps a preset name to options of `apply`. `builders` maps a preset name to
    the upstream functions that build the model, as "module:attribute" strings (e.g.
    "qd_detr.model:build_model"); `lcaam-patch run --preset NAME` wraps each one right after
    its module is imported, so later `from module import attribute` statements get the
    wrapper, and the model it returns (or the first item of a returned tuple) is patched
    before the script sees it. `builder_options` may read further options (token bounds)
    off the builder's arguments.
    """

    name: str = ""
    priority: int = 0
    distribution: str | None = None
    supported_versions: str = ""
    presets: Mapping[str, Mapping[str, Any]] = {}
    builders: Mapping[str, tuple[str, ...]] = {}

    @abc.abstractmethod
    def attention_types(self) -> tuple[type[nn.Module], ...]:
        """Classes this adapter patches, among upstream modules already imported."""

    def claims(self, module: nn.Module, path: str, root: nn.Module) -> bool:
        """Whether this adapter patches `module` (at `path` in `root`).

        The default claims instances of exactly one of `attention_types`; adapters for a
        model family (e.g. QD-DETR's encoder) may also look at the path and the root.
        """
        return type(module) in self.attention_types()

    @abc.abstractmethod
    def geometry(
        self, module: nn.Module, path: str, root: nn.Module, config: LCAAMConfig
    ) -> SiteGeometry | None:
        """Validate `module` and read its widths and token bounds.

        Raises `UnsupportedModuleError` for options it cannot honour and
        `MissingBoundError` when the token bound is neither inferable nor given. Returns
        None to leave `module` unpatched under `config` (e.g. a mode that does not use it),
        as targets/exclude would.
        """

    @abc.abstractmethod
    def forward(self, module: nn.Module, site: LCAAMSite, *args: Any, **kwargs: Any) -> Any:
        """The patched forward: the upstream's computation with `site.attend` inside."""

    def builder_options(
        self, preset: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Options of `apply` read off the arguments of a wrapped builder (see `builders`).

        The launcher passes them under the user's own options; the default reads none.
        """
        return {}

    def prepare(self, module: nn.Module, root: nn.Module) -> Any:
        """Called after `module` is patched; returns what `restore` needs to undo it."""
        return None

    def restore(self, module: nn.Module, state: Any) -> None:  # noqa: B027 - optional hook
        """Called when `module` is unpatched with what `prepare` returned."""

    def installed_version(self) -> str | None:
        """The installed version of `distribution`, or None when not applicable."""
        if self.distribution is None:
            return None
        try:
            return metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return None

    def check_version(self) -> None:
        """Raise `UpstreamVersionError` if the installed upstream is out of range."""
        version = self.installed_version()
        if version is None or not self.supported_versions:
            return
        if Version(version) not in SpecifierSet(self.supported_versions):
            raise UpstreamVersionError(
                f"adapter {self.name!r} supports {self.distribution}{self.supported_versions} "
                f"but {self.distribution}=={version} is installed; install a supported "
                f"version (pip install '{self.distribution}{self.supported_versions}') or "
                f"exclude these modules with exclude=[...]"
            )


_ADAPTERS: dict[str, Adapter] = {}
_entry_points_loaded = False


def register_adapter(adapter: Adapter, *, replace: bool = False) -> Adapter:
    """Register `adapter` under `adapter.name`; returns it so it can decorate."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"expected an lcaam_patch.Adapter instance, got {type(adapter).__name__}")
    if adapter.name in _ADAPTERS and not replace and _ADAPTERS[adapter.name] is not adapter:
        raise ValueError(f"an adapter named {adapter.name!r} is already registered; pass replace=True")
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
        raise UnknownAdapterError(
            f"no adapter named {name!r}; registered adapters: {sorted(adapters)}"
        )
    return adapters[name]


def presets() -> dict[str, Mapping[str, Any]]:
    """Every preset that a registered adapter declares, by name."""
    found: dict[str, Mapping[str, Any]] = {}
    for adapter in registered_adapters().values():
        found.update(adapter.presets)
    return found


def get_preset(name: str) -> Mapping[str, Any]:
    """The options of the preset called `name`."""
    known = presets()
    if name not in known:
        raise UnknownAdapterError(f"no preset named {name!r}; registered presets: {sorted(known)}")
    return known[name]


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry_point.load()
        adapter = loaded if isinstance(loaded, Adapter) else loaded()
        if adapter.name not in _ADAPTERS:
            register_adapter(adapter)
