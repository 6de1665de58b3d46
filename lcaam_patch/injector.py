"""`apply`, `remove` and `is_patched`: find attention sites, validate, then patch in place."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .attention import AttentionRequest, backend_supports
from .config import LCAAMConfig
from .errors import (
    AlreadyPatchedError,
    InvalidOptionError,
    LCAAMError,
    NoAttentionFoundError,
    NotPatchedError,
    UnsupportedModuleError,
)
from .generator import MaskGenerator
from .lowrank import LowRankGenerator
from .registry import Adapter, SiteGeometry, get_preset, registered_adapters
from .site import GENERATOR_NAME, SITE_ATTR, LCAAMSite, StackMask, patched_forward
from .state import forgive_missing_lcaam_keys


class _Unset:
    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()
_ATTENTION_LIKE = re.compile(r"attention|attn", re.IGNORECASE)


@dataclasses.dataclass
class _PlannedSite:
    path: str
    module: nn.Module
    adapter: Adapter
    geometry: SiteGeometry
    stack: StackMask | None = None


def apply(
    model: nn.Module,
    mode: str = _UNSET,
    fusion: str = _UNSET,
    *,
    preset: str | None = None,
    depth: int = _UNSET,
    hidden: int | None = _UNSET,
    activation: str = _UNSET,
    init: str = _UNSET,
    max_tokens: int | None = _UNSET,
    max_kv_tokens: int | None = _UNSET,
    targets: str | Sequence[str] | None = _UNSET,
    exclude: str | Sequence[str] | None = _UNSET,
    backend: str = _UNSET,
    generator: str = _UNSET,
    rank: int = _UNSET,
) -> nn.Module:
    """Patch every supported attention module of `model` with LCAAM, in place.

    Defaults: mode="multilayer", fusion="mul", depth=1, hidden=None (the layer width),
    activation="none", init="identity", backend="auto", generator="mlp" (rank=1 for
    generator="lowrank"); `preset` supplies a registered
    set of options and the explicit arguments override it. See `LCAAMConfig` for each
    option. Everything is validated before the model is touched: on error the model is
    unchanged. Returns `model`.
    """
    explicit = {
        name: value
        for name, value in dict(
            mode=mode,
            fusion=fusion,
            depth=depth,
            hidden=hidden,
            activation=activation,
            init=init,
            max_tokens=max_tokens,
            max_kv_tokens=max_kv_tokens,
            targets=targets,
            exclude=exclude,
            backend=backend,
            generator=generator,
            rank=rank,
        ).items()
        if value is not _UNSET
    }
    config = LCAAMConfig.from_options({**(get_preset(preset) if preset is not None else {}), **explicit})
    if is_patched(model):
        raise AlreadyPatchedError(
            "this model is already patched with LCAAM; call lcaam_patch.remove(model) "
            "before applying it again with other options"
        )
    planned = _plan(model, config)
    generators = _build_generators(planned, config)
    for site in planned:
        _patch(model, site, config, generators.get(site.path))
    if any(p.is_meta for g in generators.values() for p in g.parameters()):
        warnings.warn(
            "LCAAM generators were created on the meta device; after model.to_empty(...) call "
            "lcaam_patch.reset_generators(model), or their weights stay uninitialised",
            stacklevel=2,
        )
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether any module of `model` carries LCAAM."""
    return any(hasattr(module, SITE_ATTR) for module in model.modules())


def patched_sites(model: nn.Module) -> list[tuple[str, nn.Module, LCAAMSite]]:
    """(path, module, site) of every patched attention module, in module order."""
    return [
        (path, module, getattr(module, SITE_ATTR))
        for path, module in model.named_modules()
        if hasattr(module, SITE_ATTR)
    ]


def reset_generators(model: nn.Module) -> nn.Module:
    """Re-initialise every LCAAM generator of `model` as `apply` configured it (identity by
    default). Needed after `to_empty()` when the model was patched on the `meta` device:
    loading an upstream checkpoint then leaves the generators uninitialised. Returns `model`."""
    for _, module, _ in patched_sites(model):
        generator = generator_of(module)
        if generator is not None:
            generator.reset_parameters()
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: drop every generator and restore the original forwards. Returns `model`."""
    sites = patched_sites(model)
    if not sites:
        raise NotPatchedError(
            "remove() found no LCAAM in this model; it was never patched or was already restored"
        )
    for _, module, site in sites:
        if GENERATOR_NAME in module._modules:
            delattr(module, GENERATOR_NAME)
        del module.forward
        delattr(module, SITE_ATTR)
        hooks = module._load_state_dict_post_hooks
        for key in [k for k, hook in hooks.items() if hook is forgive_missing_lcaam_keys]:
            del hooks[key]
        site.adapter.restore(module, site.adapter_state)
    return model


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def _site_geometry(
    path: str, module: nn.Module, adapter: Adapter, model: nn.Module, config: LCAAMConfig
) -> SiteGeometry | None:
    """The geometry of a claimed module, None when targets/exclude leave it out."""
    if config.targets is not None and not _matches(path, config.targets):
        return None
    if config.exclude is not None and _matches(path, config.exclude):
        return None
    if hasattr(module, GENERATOR_NAME):
        raise UnsupportedModuleError(
            f"{path!r} already has an attribute {GENERATOR_NAME!r}; rename it or exclude "
            f"this module with exclude=[{path!r}]"
        )
    adapter.check_version()
    return adapter.geometry(module, path, model, config)


def _claimant(adapters: list[Adapter], module: nn.Module, path: str, model: nn.Module) -> Adapter | None:
    return next((a for a in adapters if a.claims(module, path, model)), None)


def _plan(model: nn.Module, config: LCAAMConfig) -> list[_PlannedSite]:
    adapters = list(registered_adapters().values())
    planned: list[_PlannedSite] = []
    claimed_paths: set[str] = set()
    for path, module in model.named_modules():
        adapter = _claimant(adapters, module, path, model)
        if adapter is None:
            continue
        claimed_paths.add(path)
        geometry = _site_geometry(path, module, adapter, model, config)
        if geometry is not None:
            planned.append(_PlannedSite(path, module, adapter, geometry))
    if config.backend != "auto" and planned:
        _check_backend(config, planned[0].module)
    if not planned:
        raise NoAttentionFoundError(_nothing_found_message(model, config, adapters, claimed_paths))
    if config.mode == "global":
        _group_into_stacks(planned)
    return planned


@dataclasses.dataclass(frozen=True)
class SurveyEntry:
    """What `apply` would do with one module.

    Attributes:
        path: the module's path.
        class_name: its class, with the module it comes from.
        adapter: the adapter that claims it, or None.
        status: "patch", "filtered" (left out by targets/exclude, or by its adapter under
            these options), "error" (the adapter refuses it) or "unclaimed" (attention-like,
            but no adapter knows the class).
        detail: the bound it would get, or why not.
    """

    path: str
    class_name: str
    adapter: str | None
    status: str
    detail: str


def survey(model: nn.Module, *, preset: str | None = None, **options: Any) -> list[SurveyEntry]:
    """A dry run of `apply(model, preset=preset, **options)` that changes nothing.

    Lists every module an adapter claims and every attention-like module none claims,
    with what `apply` would do and why.
    """
    config = LCAAMConfig.from_options({**(get_preset(preset) if preset is not None else {}), **options})
    adapters = list(registered_adapters().values())
    entries = []
    for path, module in model.named_modules():
        class_name = f"{type(module).__module__}.{type(module).__qualname__}"
        adapter = _claimant(adapters, module, path, model)
        if adapter is None:
            if _ATTENTION_LIKE.search(type(module).__name__):
                entries.append(
                    SurveyEntry(path, class_name, None, "unclaimed", "no registered adapter patches this class")
                )
            continue
        try:
            geometry = _site_geometry(path, module, adapter, model, config)
        except LCAAMError as error:
            entries.append(SurveyEntry(path, class_name, adapter.name, "error", str(error)))
            continue
        if geometry is None:
            why = "left out by targets/exclude, or by its adapter under these options"
            entries.append(SurveyEntry(path, class_name, adapter.name, "filtered", why))
        else:
            bound = f"{geometry.max_q_tokens or '-'}×{geometry.max_kv_tokens}"
            entries.append(SurveyEntry(path, class_name, adapter.name, "patch", f"{geometry.kind}, Nq×Nk ≤ {bound}"))
    return entries


def _nothing_found_message(
    model: nn.Module, config: LCAAMConfig, adapters: list[Adapter], claimed: set[str]
) -> str:
    seen = sorted(
        {
            f"{type(m).__module__}.{type(m).__qualname__}"
            for _, m in model.named_modules()
            if _ATTENTION_LIKE.search(type(m).__name__)
        }
    )
    parts = [f"found no attention module to patch in {type(model).__name__}."]
    if claimed:
        parts.append(
            f"{len(claimed)} supported module(s) were filtered out by targets={config.targets} "
            f"exclude={config.exclude}; adjust the patterns (paths look like {sorted(claimed)[0]!r})."
        )
    parts.append(f"Registered adapters: {', '.join(a.name for a in adapters) or 'none'}.")
    parts.append(
        f"Attention-like classes seen: {', '.join(seen) if seen else 'none'}. "
        "Write and register an adapter for your attention class (see README, 'Writing an adapter')."
    )
    return " ".join(parts)


def _check_backend(config: LCAAMConfig, module: nn.Module) -> None:
    reference = next(module.parameters(), None)
    device = reference.device.type if reference is not None else "cpu"
    dtype = reference.dtype if reference is not None else torch.float32
    form = "lowrank" if config.generator == "lowrank" else "dense"
    # a model patched on the CPU is often moved to the GPU afterwards
    devices = sorted({"cpu" if device == "meta" else device, *(("cuda",) if torch.cuda.is_available() else ())})
    if not any(
        backend_supports(config.backend, AttentionRequest(config.fusion, False, d, dtype, mask_form=form))
        for d in devices
    ):
        raise InvalidOptionError(
            f"backend={config.backend!r} cannot compute fusion={config.fusion!r} with "
            f"generator={config.generator!r} on {'/'.join(devices)} in {dtype}; use backend='auto' "
            f"(or 'eager', which computes everything)"
        )


def _stack_name(path: str) -> str:
    parts = path.split(".")
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: numeric[-1]]) if numeric else path


def _group_into_stacks(planned: list[_PlannedSite]) -> None:
    stacks: dict[str, list[_PlannedSite]] = {}
    for site in planned:
        stacks.setdefault(_stack_name(site.path), []).append(site)
    for name, members in stacks.items():
        widths = {m.geometry.embed_dim for m in members}
        if len(widths) > 1:
            raise UnsupportedModuleError(
                f"mode='global' shares one mask across stack {name!r}, but its attention layers "
                f"have different widths {sorted(widths)}; use mode='multilayer'"
            )
        shared = StackMask(name, members[0].path)
        for member in members:
            member.stack = shared


def _build_generators(
    planned: list[_PlannedSite], config: LCAAMConfig
) -> dict[str, MaskGenerator | LowRankGenerator]:
    generators: dict[str, MaskGenerator | LowRankGenerator] = {}
    for site in planned:
        if site.stack is not None and site.stack.leader != site.path:
            continue
        if config.generator == "lowrank":
            generators[site.path] = _lowrank_generator(site, config)
            continue
        members = [s for s in planned if site.stack is not None and s.stack is site.stack]
        max_kv = max(s.geometry.max_kv_tokens for s in members or [site])
        reference = next(site.module.parameters(), None)
        generators[site.path] = MaskGenerator(
            site.geometry.embed_dim,
            max_kv,
            depth=config.depth,
            hidden=config.hidden,
            activation=config.activation,
            fusion=config.fusion,
            init=config.init,
            site=site.path,
            device=reference.device if reference is not None else None,
            dtype=reference.dtype if reference is not None and reference.is_floating_point() else None,
        )
    return generators


def _lowrank_generator(site: _PlannedSite, config: LCAAMConfig) -> LowRankGenerator:
    reference = next(site.module.parameters(), None)
    return LowRankGenerator(
        site.geometry.embed_dim,
        site.geometry.kv_embed_dim or site.geometry.embed_dim,
        config.rank,
        depth=config.depth,
        hidden=config.hidden,
        fusion=config.fusion,
        init=config.init,
        device=reference.device if reference is not None else None,
        dtype=reference.dtype if reference is not None and reference.is_floating_point() else None,
    )


def _patch(
    root: nn.Module,
    site: _PlannedSite,
    config: LCAAMConfig,
    generator: MaskGenerator | LowRankGenerator | None,
) -> None:
    module = site.module
    if generator is not None:
        module.add_module(GENERATOR_NAME, generator)
    patched = LCAAMSite(
        site.path,
        site.adapter,
        site.geometry,
        fusion=config.fusion,
        backend=config.backend,
        stack=site.stack,
    )
    setattr(module, SITE_ATTR, patched)
    module.forward = functools.partial(patched_forward, module)
    module.register_load_state_dict_post_hook(forgive_missing_lcaam_keys)
    patched.adapter_state = site.adapter.prepare(module, root)


def generator_of(module: nn.Module) -> MaskGenerator | LowRankGenerator | None:
    """The generator a patched module owns, or None (unpatched or a global follower)."""
    generator = module._modules.get(GENERATOR_NAME)
    return generator if isinstance(generator, (MaskGenerator, LowRankGenerator)) else None


def parameter_count(module: nn.Module | None) -> int:
    """Number of parameter elements of `module` (0 for None)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())
