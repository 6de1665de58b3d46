"""`TransformersAdapter`: claims, geometry, the per-instance config switch and the instance forward."""

from __future__ import annotations

import copy
import re
import sys
from typing import Any

import torch
from torch import nn

from ...config import LCAAMConfig
from ...errors import UnsupportedModuleError
from ...generators import LowRankGenerator
from ...site import GENERATOR_NAME, LCAAMSite, SiteGeometry
from ...verification import needs_verification
from ..base import Adapter, BuilderCall
from . import builders as launcher
from .attention import ATTENTION_FUNCTION, eager_function, register_attention_function
from .bounds import key_width, query_width, require_generator_bound, token_bounds
from .calls import Call, State, cached_layer
from .discovery import (
    config_flag,
    dispatches_through_interface,
    forward_parameters,
    forward_source,
    implementation_branches,
    is_config,
    is_cross,
    is_pretrained_model,
    model_implementation,
    transformers_loaded,
)
from .switch import SWITCH, drop_guards, guard

SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")
_PASSES_SINKS = re.compile(r"\bsinks\s*=\s*(?!None\b)\w")

_CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "cache", "layer_past")
_KEY_TOKEN_ARGUMENTS = ("key_value_states", "encoder_hidden_states")


class TransformersAdapter(Adapter):
    """Patches transformers attention classes that use the attention interface."""

    name = "transformers"
    verifies_claims = True
    distribution = "transformers"
    supported_versions = ">=4.53,<6"

    def attention_types(self) -> tuple[type[nn.Module], ...]:
        """Attention classes of the imported transformers model modules that dispatch
        through the attention interface."""
        if not transformers_loaded():
            return ()
        found: list[type[nn.Module]] = []
        for module_name, module in list(sys.modules.items()):
            if not module_name.startswith("transformers.models.") or module is None:
                continue
            for value in list(vars(module).values()):
                if (
                    isinstance(value, type)
                    and issubclass(value, nn.Module)
                    and value.__module__ == module_name
                    and value not in found
                    and dispatches_through_interface(value)
                ):
                    found.append(value)
        return tuple(found)

    def claims(self, module: nn.Module, path: str, root: nn.Module) -> bool:
        """Modules with a transformers config whose class dispatches through the interface."""
        return (
            transformers_loaded()
            and is_config(getattr(module, "config", None))
            and dispatches_through_interface(type(module))
        )

    def geometry(self, module: nn.Module, path: str, root: nn.Module, config: LCAAMConfig) -> SiteGeometry:
        """Refuse what LCAAM cannot honour; the width from the query projection, token bounds
        from the config."""
        _refuse_unsupported(module, path)
        if config.verify and model_implementation(module) == "eager" and eager_function(type(module)) is None:
            raise UnsupportedModuleError(
                f"{type(module).__name__} at {path!r}: its forward names no eager attention function "
                f"LCAAM can find to verify its patch against; exclude it with exclude=[{path!r}], or "
                f"pass verify=False if you know it computes plain attention"
            )
        embed_dim = query_width(module)
        if embed_dim is None:
            raise UnsupportedModuleError(
                f"{type(module).__name__} at {path!r}: neither a query projection nor its config's "
                f"hidden_size gives the width of the tokens LCAAM reads; exclude it with exclude=[{path!r}]"
            )
        cross = is_cross(module, path)
        q_bound, kv_bound = token_bounds(module, path, root, cross)
        max_q = config.max_tokens or q_bound
        max_kv = config.max_kv_tokens or (config.max_tokens if not cross else None) or kv_bound
        require_generator_bound(
            config,
            f"{type(module).__name__} at {path!r}",
            max_kv,
            embed_dim,
            "its config gives no bound on the number of key tokens (e.g. T5's relative positions)",
        )
        return SiteGeometry(
            embed_dim=embed_dim,
            max_q_tokens=max_q,
            max_kv_tokens=max_kv,
            kind="cross" if cross else "self",
            kv_embed_dim=key_width(module, embed_dim) if cross else None,
        )

    def prepare(self, module: nn.Module, root: nn.Module) -> State:
        """Give `module` its own config copy that dispatches to LCAAM's attention function."""
        register_attention_function()
        original: Any = module.config
        state = State(original, model_implementation(module), root)
        state.implementation_internal = vars(original).get("_attn_implementation_internal")
        own: Any = copy.copy(original)
        own._attn_implementation_internal = ATTENTION_FUNCTION
        module.config = own
        models = []
        for model in root.modules():
            if is_pretrained_model(model):
                models.append(model)
                if hasattr(type(model), SWITCH):  # not in < 4.54
                    guard(model, SWITCH)
        state.weights_optional = bool(models) and all(getattr(m, "_supports_sdpa", False) is True for m in models)
        return state

    def restore(self, module: nn.Module, state: State) -> None:
        """Put the module's original config back; drop the switch guards with the last site."""
        module.config = state.original_config
        drop_guards(state.root)

    def forward(self, module: nn.Module, site: LCAAMSite, *args: Any, **kwargs: Any) -> Any:
        """The class's own forward, with the layer input kept for the attention function.

        Per call it reads only what the call brings (its arguments by the positions kept per
        class, its cache layer); everything else was settled at `apply`.
        """
        state: State = site.adapter_state
        if vars(state.original_config).get("_attn_implementation_internal") != state.implementation_internal:
            _refuse_switched(state, site.path)
        positions = _positions(type(module))
        x = _argument(positions, args, kwargs, "hidden_states")
        if x is None and args:
            x = args[0]
        if not isinstance(x, torch.Tensor):
            raise UnsupportedModuleError(
                f"{type(module).__name__} at {site.path!r} was called without hidden states as its "
                f"first argument; LCAAM reads them. Exclude it with exclude=[{site.path!r}]"
            )
        kv_tokens = _first_argument(positions, args, kwargs, _KEY_TOKEN_ARGUMENTS)
        layer = None
        if kv_tokens is None:
            layer = cached_layer(module, _first_argument(positions, args, kwargs, _CACHE_ARGUMENTS), x.shape[-2])
        call = Call(x, kv_tokens, 0, False)
        slot = None
        if layer is not None:
            call.offset, call.from_cache = layer.offset, bool(layer.past) or layer.static
            call.positions = layer.past + x.shape[-2]
            generator = module._modules.get(GENERATOR_NAME)
            if getattr(generator, "reads_key_tokens", False):
                factored = _factored(generator)
                slot, call.kv_tokens, call.key_factor = state.stash.key_tokens(layer, x, site.path, factored)
                call.offset = 0 if layer.offset is not None else None
        calls = state.stash.calls
        calls.append(call)
        try:
            output = type(module).forward(module, *args, **kwargs)
        finally:
            calls.pop()
        if slot is not None and layer is not None:
            slot.updated(layer)
        if not call.attended and needs_verification(site, x):
            raise UnsupportedModuleError(
                f"{type(module).__name__} at {site.path!r} names the attention interface in its source, "
                f"but its forward ran without calling it, so LCAAM is not in its path. Exclude it with "
                f"exclude=[{site.path!r}] and report the class to lcaam-patch; verify=False skips this check"
            )
        return output

    presets = launcher.PRESETS
    builders = launcher.BUILDERS

    def builder_call(self, preset: str, target: str, args: tuple[Any, ...], kwargs: Any) -> BuilderCall:
        """`from_pretrained` of a directory with LCAAM weights loads them into the patched model."""
        return launcher.builder_call(target, args, kwargs)


def _factored(generator: nn.Module | None) -> LowRankGenerator | None:
    """`generator` when its M is `LowRankMask(query_factor(x), key_factor(kv))`, whose key
    factors the stash may keep (a subclass with its own forward computes something else)."""
    if isinstance(generator, LowRankGenerator) and type(generator).forward is LowRankGenerator.forward:
        return generator
    return None


def _refuse_switched(state: State, path: str) -> None:
    """UnsupportedModuleError if the model's attention implementation was switched after apply."""
    current = str(state.original_config._attn_implementation)
    if current != state.implementation:
        raise UnsupportedModuleError(
            f"the attention implementation of {path!r} was switched from "
            f"{state.implementation!r} to {current!r} after lcaam_patch.apply, which reads the "
            f"masks of the implementation it was applied under; call lcaam_patch.remove(model) "
            f"before switching, then apply again ('eager' or 'sdpa')"
        )


_POSITIONS: dict[type, dict[str, int]] = {}


def _positions(cls: type) -> dict[str, int]:
    """Where each parameter of `cls.forward` sits among the positional arguments (self
    excluded); read once per class."""
    positions = _POSITIONS.get(cls)
    if positions is None:
        positions = _POSITIONS[cls] = {name: i for i, name in enumerate(forward_parameters(cls)[1:])}
    return positions


def _argument(positions: dict[str, int], args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Any:
    """The call's argument `name`, by keyword or by position; None when not given."""
    value = kwargs.get(name)
    if value is None:
        index = positions.get(name)
        if index is not None and index < len(args):
            value = args[index]
    return value


def _first_argument(
    positions: dict[str, int], args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...]
) -> Any:
    """The first of the arguments `names` the call gives (not None), or None."""
    for name in names:
        value = _argument(positions, args, kwargs, name)
        if value is not None:
            return value
    return None


def _refuse_unsupported(module: nn.Module, path: str) -> None:
    """UnsupportedModuleError for what the LCAAM attention function cannot compute exactly."""
    name = type(module).__name__
    implementation = model_implementation(module)
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise UnsupportedModuleError(
            f"{name} at {path!r} runs attn_implementation={implementation!r}; LCAAM needs the "
            f"masks of 'eager' or 'sdpa' (flash, flex and paged attention take other mask forms). "
            f"Build the model with attn_implementation='sdpa' (or call "
            f"model.set_attn_implementation('sdpa')) before lcaam_patch.apply"
        )
    for kind, names in implementation_branches(type(module)):
        if implementation in names and (kind == "in" or implementation != "eager"):
            others = [n for n in SUPPORTED_IMPLEMENTATIONS if n not in names]
            way_out = f"build the model with attn_implementation={others[0]!r}, or " if others else ""
            raise UnsupportedModuleError(
                f"{name} at {path!r} builds what it hands its attention function by the implementation's "
                f"name (attn_implementation {kind} {sorted(names)}), and LCAAM's per-module switch to its "
                f"own function would send it down another branch (e.g. a sparse top-k index passed on "
                f"instead of applied as a mask); {way_out}exclude it with exclude=[{path!r}]"
            )
    source = forward_source(type(module))
    softcap = config_flag(module, ("attn_logit_softcapping", "softcap", "logit_softcapping"))
    if softcap is not None:
        raise UnsupportedModuleError(
            f"{name} at {path!r} soft-caps its attention logits ({softcap}), which LCAAM's fused "
            f"attention does not compute; set config.{softcap}=None, or exclude it with exclude=[{path!r}]"
        )
    if "s_aux" in source or _PASSES_SINKS.search(source) or isinstance(getattr(module, "sinks", None), torch.Tensor):
        raise UnsupportedModuleError(
            f"{name} at {path!r} uses attention sinks (an extra logit per head or token), which LCAAM's "
            f"fused attention does not compute; exclude it with exclude=[{path!r}]"
        )
    if "cu_seqlens" in source or "cu_seq_lens" in source:
        raise UnsupportedModuleError(
            f"{name} at {path!r} calls attention once per chunk of a packed sequence (cu_seqlens), "
            f"so its input hidden states are not the queries of one call; exclude it with exclude=[{path!r}]"
        )
    parameters = forward_parameters(type(module))
    if {"query", "key", "value"} <= set(parameters):
        raise UnsupportedModuleError(
            f"{name} at {path!r} takes separate query, key and value inputs; LCAAM reads the layer's "
            f"hidden states. Exclude it with exclude=[{path!r}]"
        )


adapter = TransformersAdapter()
