"""`apply`, `remove`, `is_patched`: find attention sites, validate everything, then patch in place.

The walk → claim → plan → inject shape of PEFT's tuners: every registered adapter is asked
whether it claims each module; the claimed modules are validated and planned (geometry,
global-mode stacks, generators) before the first one is touched, and a failure while
injecting undoes what was injected, so a failed `apply` leaves the model as it was.

Besides the public verbs (`apply`, `remove`, `is_patched`, `patched_sites`,
`reset_generators`, exported by `lcaam_patch`), this module is the declared internal API that
tools/, cli/, pretrained.py and state_dict.py build on: the names in `INTERNAL_API`. They are
not exported from `lcaam_patch` and may change between releases; a test checks that nothing
outside this module imports any other of its names.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import probe
from .adapters import Adapter, get_preset, registered_adapters
from .backends import CallSpec, refusal_for
from .config import LCAAMConfig
from .errors import (
    AlreadyPatchedError,
    ForwardReplacedError,
    InvalidOptionError,
    LCAAMError,
    NoAttentionFoundError,
    NotAModuleError,
    NotPatchedError,
    UnsupportedModuleError,
    WrappedModelError,
)
from .generators import LCAAMGenerator, LowRankGenerator, MaskGenerator
from .site import (
    GENERATOR_NAME,
    SITE_ATTR,
    LCAAMSite,
    SiteGeometry,
    StackMask,
    forgive_missing_lcaam_keys,
    generator_of,
    patched_forward,
)


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
    verify: bool = _UNSET,
    generic: str = _UNSET,
    example_inputs: Any = None,
) -> nn.Module:
    """Patch every supported attention module of `model` with LCAAM, in place.

    Each option is described in `LCAAMConfig` (the defaults: mode="multilayer",
    fusion="mul", depth=1, activation="none", init="identity", backend="auto",
    generator="mlp", verify=True, generic="auto"); `preset` supplies a registered set of options
    and the explicit arguments override it. `example_inputs` (a tensor, a tuple of positional
    or a dict of keyword arguments of one forward of `model`; not an option of the config,
    as it holds tensors) is what adapters that probe the model run it on, on `meta` (see
    docs/sdpa.md). Everything is validated before the model is touched: on error the model
    is unchanged. Returns `model`.
    """
    options = {name: value for name, value in locals().items() if name in OPTION_NAMES and value is not _UNSET}
    require_module(model, "apply")
    config = resolve_config(preset, options)
    _refuse_wrapped(model)
    if is_patched(model):
        raise AlreadyPatchedError(
            "this model is already patched with LCAAM; call lcaam_patch.remove(model) "
            "before applying it again with other options"
        )
    with probe.example_inputs(example_inputs):
        planned = _plan(model, config)
    generators = _build_generators(planned, config)
    injected: list[nn.Module] = []
    before = _snapshot(model)
    try:
        for site in planned:
            injected.append(site.module)
            _patch(model, site, config, generators.get(site.path))
    except BaseException:
        for module in reversed(injected):
            _unpatch(module)
        _restore(before)
        raise
    if any(p.is_meta for g in generators.values() for p in g.parameters()):
        warnings.warn(
            "LCAAM generators were created on the meta device; after model.to_empty(...) call "
            "lcaam_patch.reset_generators(model), or their weights stay uninitialised",
            stacklevel=2,
        )
    return model


OPTION_NAMES = frozenset(field.name for field in dataclasses.fields(LCAAMConfig))

INTERNAL_API = (
    "Claim",
    "claims",
    "claimant",
    "site_geometry",
    "looks_like_attention",
    "parameter_count",
    "site_spec",
    "require_module",
    "require_patched",
    "resolve_config",
)
"""What the rest of the package (and scripts/) may import from here besides the public verbs."""

_Snapshot = list[tuple[nn.Module, dict[str, Any], dict[str, dict[Any, Any]]]]


def _snapshot(model: nn.Module) -> _Snapshot:
    """Every module's attributes, and the contents of its dicts (hooks, submodules,
    parameters, buffers), so that a failed `apply` can put back whatever an adapter's
    `prepare` changed before it raised."""
    return [
        (m, dict(vars(m)), {k: dict(v) for k, v in vars(m).items() if isinstance(v, dict)}) for m in model.modules()
    ]


def _restore(snapshot: _Snapshot) -> None:
    for module, attributes, contents in snapshot:
        vars(module).clear()
        vars(module).update(attributes)
        for name, content in contents.items():
            held = vars(module)[name]
            held.clear()
            held.update(content)


def resolve_config(preset: str | None, options: Mapping[str, Any]) -> LCAAMConfig:
    """The config of `preset` (a registered preset name, or None) overridden by `options`."""
    if preset is not None and not isinstance(preset, str):
        raise InvalidOptionError(f"preset={preset!r} must be the name of a registered preset")
    return LCAAMConfig.from_options({**(get_preset(preset) if preset is not None else {}), **options})


def require_module(model: object, what: str) -> None:
    """Raise `NotAModuleError` unless `model` is an `nn.Module`."""
    if not isinstance(model, nn.Module):
        hint = " (pass the model instance, not its class)" if isinstance(model, type) else ""
        raise NotAModuleError(
            f"lcaam_patch.{what} takes a torch.nn.Module, got {type(model).__name__}{hint}; "
            f"call lcaam_patch.{what}(model, ...) with the model itself"
        )


def require_patched(model: object, what: str) -> None:
    """Raise unless `model` is a module patched with LCAAM."""
    require_module(model, what)
    assert isinstance(model, nn.Module)
    if not is_patched(model):
        raise NotPatchedError(f"lcaam_patch.{what} needs a patched model; call lcaam_patch.apply(model, ...) first")


def _wrappers() -> tuple[tuple[type, str], ...]:
    """Module classes that wrap a model for distributed or compiled execution."""
    found: list[tuple[type, str]] = [
        (nn.DataParallel, "nn.DataParallel"),
        (nn.parallel.DistributedDataParallel, "DistributedDataParallel"),
    ]
    if torch.distributed.is_available():
        from torch.distributed import fsdp

        for name in ("FSDPModule", "FullyShardedDataParallel"):
            cls = getattr(fsdp, name, None)
            if isinstance(cls, type):
                found.append((cls, f"FSDP ({name})"))
    optimized = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    cls = getattr(optimized, "OptimizedModule", None)
    if isinstance(cls, type):
        found.append((cls, "torch.compile"))
    return tuple(found)


def _refuse_wrapped(model: nn.Module) -> None:
    """Patching inside DDP/FSDP/DataParallel/torch.compile would escape the wrapper."""
    wrappers = _wrappers()
    for path, module in model.named_modules():
        for cls, label in wrappers:
            if isinstance(module, cls):
                where = f" at {path!r}" if path else ""
                raise WrappedModelError(
                    f"the model{where} is already wrapped by {label}: LCAAM parameters added now "
                    f"would not be synchronised across ranks (or would be missed by the compiled "
                    f"graph). Call lcaam_patch.apply(model, ...) on the bare model first, then "
                    f"wrap it (DDP/FSDP/DataParallel) or compile it"
                )


def is_patched(model: nn.Module) -> bool:
    """Whether any module of `model` carries LCAAM."""
    require_module(model, "is_patched")
    return any(hasattr(module, SITE_ATTR) for module in model.modules())


def patched_sites(model: nn.Module) -> list[tuple[str, nn.Module, LCAAMSite]]:
    """(path, module, site) of every patched attention module, in module order."""
    require_module(model, "patched_sites")
    return [
        (path, module, getattr(module, SITE_ATTR))
        for path, module in model.named_modules()
        if hasattr(module, SITE_ATTR)
    ]


def reset_generators(model: nn.Module) -> nn.Module:
    """Re-initialise every LCAAM generator of `model` as `apply` configured it (identity by
    default). Needed after `to_empty()` when the model was patched on the `meta` device:
    loading an upstream checkpoint then leaves the generators uninitialised. Returns `model`."""
    require_patched(model, "reset_generators")
    for _, module, _ in patched_sites(model):
        generator = generator_of(module)
        if generator is not None:
            generator.reset_parameters()
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: drop every generator and restore the original forwards. Returns `model`."""
    require_module(model, "remove")
    sites = patched_sites(model)
    if not sites:
        raise NotPatchedError("remove() found no LCAAM in this model; it was never patched or was already restored")
    for path, module, _ in sites:
        if not _is_our_forward(module):
            raise ForwardReplacedError(
                f"the forward of {path or 'the model'!r} was replaced after lcaam_patch.apply, so "
                f"remove() would delete it; undo that replacement first (del module.forward, or "
                f"remove the hooks of the tool that installed it), then call remove again"
            )
    for _, module, _ in sites:
        _unpatch(module)
    return model


def _is_our_forward(module: nn.Module) -> bool:
    forward = vars(module).get("forward")
    return isinstance(forward, functools.partial) and forward.func is patched_forward


def _unpatch(module: nn.Module, *, restore_adapter: bool = True) -> None:
    """Undo `_patch` on one module (a no-op on a module it did not patch)."""
    site: LCAAMSite | None = vars(module).get(SITE_ATTR)
    if GENERATOR_NAME in module._modules:
        delattr(module, GENERATOR_NAME)
    if _is_our_forward(module):
        del module.forward
    hooks = module._load_state_dict_post_hooks
    for key in [k for k, hook in hooks.items() if hook is forgive_missing_lcaam_keys]:
        del hooks[key]
    if site is not None:
        delattr(module, SITE_ATTR)
        if restore_adapter:
            site.adapter.restore(module, site.adapter_state)


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def site_geometry(
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


def claimant(adapters: list[Adapter], module: nn.Module, path: str, model: nn.Module) -> Adapter | None:
    """The first adapter (highest priority) that claims `module`, or None."""
    return next((a for a in adapters if a.claims(module, path, model)), None)


def looks_like_attention(module: nn.Module) -> bool:
    """Whether the class name of `module` says attention."""
    return _ATTENTION_LIKE.search(type(module).__name__) is not None


@dataclasses.dataclass(frozen=True)
class Claim:
    """One module an adapter claims, and what `apply` with a config would do with it.

    Attributes:
        path, module, adapter: where the module is, the module, the adapter that claims it.
        geometry: what the adapter reads off it; None when the options leave it out.
        refusal: the error the adapter raises for it under these options, if any.
    """

    path: str
    module: nn.Module
    adapter: Adapter
    geometry: SiteGeometry | None
    refusal: LCAAMError | None = None


def claims(model: nn.Module, config: LCAAMConfig) -> list[Claim]:
    """Walk `model` and ask the registered adapters (highest priority first) about each
    module: the dry run of `apply` that `_plan`, `survey` and `from_pretrained` share.
    Changes nothing; an adapter's refusal is recorded, not raised."""
    adapters = list(registered_adapters().values())
    specific = [a for a in adapters if not a.fallback]
    found = _claims_by(specific, model, config)
    if config.generic == "on" or (config.generic == "auto" and not found):
        found = _claims_by(adapters, model, config)
    return found


def _claims_by(adapters: list[Adapter], model: nn.Module, config: LCAAMConfig) -> list[Claim]:
    found: list[Claim] = []
    for path, module in model.named_modules():
        adapter = claimant(adapters, module, path, model)
        if adapter is None:
            continue
        try:
            found.append(Claim(path, module, adapter, site_geometry(path, module, adapter, model, config)))
        except LCAAMError as error:
            found.append(Claim(path, module, adapter, None, error))
    return found


def _plan(model: nn.Module, config: LCAAMConfig) -> list[_PlannedSite]:
    claimed = claims(model, config)
    refused = next((c.refusal for c in claimed if c.refusal is not None), None)
    if refused is not None:
        raise refused
    planned = [_PlannedSite(c.path, c.module, c.adapter, c.geometry) for c in claimed if c.geometry is not None]
    if config.backend != "auto" and planned:
        _check_backend(config, planned[0].module)
    if not planned:
        adapters = list(registered_adapters().values())
        raise NoAttentionFoundError(_nothing_found_message(model, config, adapters, {c.path for c in claimed}))
    if config.mode == "global":
        _group_into_stacks(planned)
    return planned


def _nothing_found_message(model: nn.Module, config: LCAAMConfig, adapters: list[Adapter], claimed: set[str]) -> str:
    seen = sorted(
        {f"{type(m).__module__}.{type(m).__qualname__}" for _, m in model.named_modules() if looks_like_attention(m)}
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
        "Write and register an adapter for your attention class (see docs/adapters.md)."
    )
    return " ".join(parts)


def site_spec(*, kind: str, fusion: str, device: str, dtype: torch.dtype) -> CallSpec:
    """The plainest call of a site (no upstream mask, no weights, no dropout), with a generator
    kind's mask form: what backends are asked about a site before it runs."""
    return CallSpec(device, dtype, fusion, kind == "lowrank", "none", False, False, 0.0, 8, 8, False)


def _check_backend(config: LCAAMConfig, module: nn.Module) -> None:
    reference = next(module.parameters(), None)
    device = reference.device.type if reference is not None else "cpu"
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    # a model patched on the CPU is often moved to the GPU afterwards
    devices = sorted({"cpu" if device == "meta" else device, *(("cuda",) if torch.cuda.is_available() else ())})
    reasons = {
        d: refusal_for(config.backend, site_spec(kind=config.generator, fusion=config.fusion, device=d, dtype=dtype))
        for d in devices
    }
    if all(reason is not None for reason in reasons.values()):
        why = "; ".join(f"{d}: {reason}" for d, reason in reasons.items())
        raise InvalidOptionError(
            f"backend={config.backend!r} cannot compute fusion={config.fusion!r} with "
            f"generator={config.generator!r} in {dtype} ({why}); use backend='auto' "
            f"(or 'eager', which computes everything)"
        )


def stack_name(path: str) -> str:
    """The global-mode stack of the site at `path`: its path with the last layer index
    replaced by `*`, so that each attention kind of a layer stack (e.g. a decoder's
    self- and cross-attention) has a stack of its own."""
    parts = path.split(".")
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    if not numeric:
        return path
    parts[numeric[-1]] = "*"
    return ".".join(parts)


def _group_into_stacks(planned: list[_PlannedSite]) -> None:
    stacks: dict[str, list[_PlannedSite]] = {}
    for site in planned:
        stacks.setdefault(stack_name(site.path), []).append(site)
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


def _build_generators(planned: list[_PlannedSite], config: LCAAMConfig) -> dict[str, LCAAMGenerator]:
    generators: dict[str, LCAAMGenerator] = {}
    for site in planned:
        if site.stack is not None and site.stack.leader != site.path:
            continue
        reference = next(site.module.parameters(), None)
        factory: dict[str, Any] = dict(
            device=reference.device if reference is not None else None,
            dtype=reference.dtype if reference is not None and reference.is_floating_point() else None,
        )
        if config.generator == "lowrank":
            generators[site.path] = LowRankGenerator(
                site.geometry.embed_dim,
                site.geometry.kv_embed_dim or site.geometry.embed_dim,
                config.rank,
                depth=config.depth,
                hidden=config.hidden,
                fusion=config.fusion,
                init=config.init,
                **factory,
            )
            continue
        members = [s for s in planned if site.stack is not None and s.stack is site.stack]
        bounds = [s.geometry.max_kv_tokens for s in members or [site]]
        assert all(b is not None for b in bounds), "adapters give a key bound for generator='mlp'"
        generators[site.path] = MaskGenerator(
            site.geometry.embed_dim,
            max(b for b in bounds if b is not None),
            depth=config.depth,
            hidden=config.hidden,
            activation=config.activation,
            fusion=config.fusion,
            init=config.init,
            site=site.path,
            **factory,
        )
    return generators


def _patch(
    root: nn.Module,
    site: _PlannedSite,
    config: LCAAMConfig,
    generator: LCAAMGenerator | None,
) -> None:
    module = site.module
    if generator is not None:
        assert isinstance(generator, nn.Module)
        module.add_module(GENERATOR_NAME, generator)
    patched = LCAAMSite(
        site.path,
        site.adapter,
        site.geometry,
        fusion=config.fusion,
        backend=config.backend,
        stack=site.stack,
        config=config,
    )
    setattr(module, SITE_ATTR, patched)
    module.forward = functools.partial(patched_forward, module)
    module.register_load_state_dict_post_hook(forgive_missing_lcaam_keys)
    try:
        patched.adapter_state = site.adapter.prepare(module, root)
    except BaseException:
        _unpatch(module, restore_adapter=False)
        raise


def parameter_count(module: nn.Module | LCAAMGenerator | None) -> int:
    """Number of parameter elements of `module` (0 for None)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())
