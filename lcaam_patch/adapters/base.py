"""The adapter base class: one adapter knows one upstream attention implementation."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn

from ..errors import UpstreamVersionError
from ..site import LCAAMSite, SiteGeometry

if TYPE_CHECKING:
    from ..config import LCAAMConfig


@dataclasses.dataclass
class BuilderCall:
    """How the launcher calls a wrapped builder (see `Adapter.builder_call`).

    `args`/`kwargs` are what the builder is called with (e.g. without the checkpoint it
    would load before the model is patched). After the model is patched, `load` (if set)
    loads what was held back and returns a sentence for the launcher's report. `saved` is
    a `save_pretrained` directory: the model is patched as saved there instead of with the
    preset's options.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    load: Callable[[nn.Module], str] | None = None
    saved: Path | None = None


class Adapter(abc.ABC):
    """Knows one upstream attention implementation: how to find it and run it with LCAAM.

    Subclasses set `name`, and `distribution`/`supported_versions` when they patch a
    third-party package, and implement `attention_types`, `geometry` and `forward`.
    Where several adapters claim a module, the one with the highest `priority` wins
    (model-family adapters above generic ones).

    An adapter that infers what it claims (from source text or shapes) sets
    `verifies_claims = True` and checks each of its sites at their first call with
    `lcaam_patch.verification.verify_first_call` (exact at identity, M in the path).

    A generic adapter that claims what no other adapter knows (the SDPA adapter) sets
    `fallback = True`: it is asked only as `LCAAMConfig.generic` says (by default, only in
    models where no other adapter claims a module).

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
    verifies_claims: bool = False
    fallback: bool = False
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
    def geometry(self, module: nn.Module, path: str, root: nn.Module, config: LCAAMConfig) -> SiteGeometry | None:
        """Validate `module` and read its widths and token bounds.

        Raises `UnsupportedModuleError` for options it cannot honour and
        `MissingBoundError` when the token bound is neither inferable nor given. Returns
        None to leave `module` unpatched under `config` (e.g. a mode that does not use it),
        as targets/exclude would.
        """

    @abc.abstractmethod
    def forward(self, module: nn.Module, site: LCAAMSite, *args: Any, **kwargs: Any) -> Any:
        """The patched forward: the upstream's computation with `site.attend` inside."""

    def inapplicable(self) -> Mapping[type[nn.Module], str]:
        """Upstream attention classes (among those imported) that LCAAM does not apply to,
        each with the reason; `survey` reports them as "inapplicable". The default knows none."""
        return {}

    def declines(self, module: nn.Module, path: str, root: nn.Module) -> str | None:
        """Why this adapter does not claim `module`, for `survey`, where it has looked at it
        (a fallback adapter that probed it); None where it has nothing to say."""
        return None

    def builder_options(self, preset: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Options of `apply` read off the arguments of a wrapped builder (see `builders`).

        The launcher passes them under the user's own options; the default reads none.
        """
        return {}

    def builder_call(self, preset: str, target: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> BuilderCall:
        """How the launcher calls the wrapped builder `target` ("module:attribute"); the
        default calls it as the script did and loads nothing afterwards."""
        return BuilderCall(tuple(args), dict(kwargs))

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
