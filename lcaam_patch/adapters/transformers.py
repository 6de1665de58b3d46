"""Hugging Face transformers: every attention class that dispatches through the attention
interface (`ALL_ATTENTION_FUNCTIONS`), discovered from the class source, for transformers
`>=4.53,<6`.

How a module is patched, per instance:

- `prepare` gives the module a shallow copy of its config whose
  `_attn_implementation_internal` names `lcaam`, an attention function registered with
  `AttentionInterface.register`. The model's own config (and every other module and model
  built from it) keeps its implementation, so the model's mask preprocessing goes on
  producing the eager/sdpa masks; `restore` puts the original config back.
- The instance forward (`TransformersAdapter.forward`) keeps the layer's input hidden
  states (and, for cross-attention, the key tokens) and the column offset of the cached
  keys, then runs the class's own forward. Upstream computes q, k, v (RoPE, q/k norms, the
  cache update) and calls `lcaam`, which runs `LCAAMSite` attention with them: M from the
  input hidden states, fused into QKᵀ·scale, then the upstream mask (padding, causal,
  sliding window, T5's position bias) added, grouped-query heads expanded.

Masks: a bool mask (sdpa) is kept as is; a float mask (eager) has its `finfo.min` entries
made hard with `harden`; a missing mask under sdpa means causal when the module (or the
call) says so and there is more than one query, as upstream's sdpa decides.

Key columns: key slot j of a call is absolute position `offset + j`, where `offset` is
what the cache layer tells the mask builder (`get_mask_sizes`): 0 except for sliding
windows that have dropped keys. M is computed `offset + Nk` wide and its last Nk columns
are used, so generating with and without a cache gives the same tokens.

Refused at apply, with the reason: model-level implementations other than eager/sdpa
(flash, flex, paged), logit soft-capping, attention sinks, classes that call attention
once per chunk (`cu_seqlens`) or take separate query/key/value inputs, inferred token
bounds above `MAX_INFERRED_TOKENS` (pass `max_kv_tokens` or `generator="lowrank"`).
Refused at call: a model-level implementation switched after apply (`set_attn_implementation`
is refused at once), and a lowrank generator on a KV cache filled before apply.

A lowrank generator reads the key tokens, which a KV cache does not keep: the instance
forward keeps the layer inputs of every position of each cache it sees (beside it, freed
with it) and hands the generator those of the cached slots.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import sys
import threading
import weakref
from typing import Any

import torch
from torch import nn

from ..backends import AttentionCall, LowRankMask, masking
from ..backends.masking import harden
from ..config import LCAAMConfig
from ..errors import MissingBoundError, UnsupportedModuleError
from ..site import GENERATOR_NAME, SITE_ATTR, LCAAMSite, SiteGeometry
from .base import Adapter

ATTENTION_FUNCTION = "lcaam"
"""The name LCAAM's attention function is registered under in `AttentionInterface`."""

MAX_INFERRED_TOKENS = 16384
"""Above this many positions read off a config, the generator width must be given."""

SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")

_CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "cache", "layer_past")
_KEY_TOKEN_ARGUMENTS = ("key_value_states", "encoder_hidden_states")
_CROSS_NAMES = ("cross", "encoder_attn", "encdecattention")


@dataclasses.dataclass
class _Call:
    """What the instance forward keeps for the attention function of the same call.

    `kv_tokens` are the key tokens of a cross-attention, or, for a generator that reads
    them, the tokens of the cached positions `offset...` followed by `x` (self-attention).
    """

    x: torch.Tensor
    kv_tokens: torch.Tensor | None
    offset: int
    from_cache: bool


@dataclasses.dataclass
class _CachedLayer:
    """Where a self-attention call stands in its KV cache (`cache.layers[index]`)."""

    cache: Any
    index: int
    past: int
    offset: int
    static: bool


class _Stash:
    """Per-thread stack of `_Call`s of one module, and the layer inputs of the positions in
    each KV cache it has seen (for generators that read key tokens); never pickled or copied."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._tokens: weakref.WeakKeyDictionary[Any, dict[int, torch.Tensor]] = weakref.WeakKeyDictionary()

    def key_tokens(self, layer: _CachedLayer, x: torch.Tensor, path: str) -> torch.Tensor:
        """The layer inputs of positions `layer.offset...`: the kept ones, then `x`."""
        per_layer = self._tokens.setdefault(layer.cache, {})
        kept = per_layer.get(layer.index) if layer.past else None
        count = 0 if kept is None else kept.shape[-2]
        if count < layer.past:
            raise UnsupportedModuleError(
                f"{path!r}: generator='lowrank' reads the key tokens, but the KV cache holds "
                f"{layer.past} positions of which LCAAM saw {count} (a cache filled before "
                f"lcaam_patch.apply or elsewhere); start from an empty cache, or use generator='mlp'"
            )
        tokens = x if kept is None else torch.cat([kept[:, : layer.past], x], dim=-2)
        per_layer[layer.index] = tokens
        return tokens[:, layer.offset :]

    @property
    def calls(self) -> list[_Call]:
        """This thread's calls in flight (innermost last)."""
        calls = getattr(self._local, "calls", None)
        if calls is None:
            calls = self._local.calls = []
        return calls

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def __deepcopy__(self, memo: dict[int, Any]) -> _Stash:
        return _Stash()


@dataclasses.dataclass
class _State:
    """What `restore` needs and the attention function reads."""

    original_config: Any
    implementation: str
    root: nn.Module
    stash: _Stash = dataclasses.field(default_factory=_Stash)


def _transformers_loaded() -> bool:
    return "transformers" in sys.modules


_SOURCES: dict[type[nn.Module], str] = {}
_PARAMETERS: dict[type[nn.Module], tuple[str, ...]] = {}


def _forward_source(cls: type[nn.Module]) -> str:
    if cls not in _SOURCES:
        try:
            _SOURCES[cls] = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _SOURCES[cls] = ""
    return _SOURCES[cls]


def _forward_parameters(cls: type[nn.Module]) -> tuple[str, ...]:
    if cls not in _PARAMETERS:
        try:
            _PARAMETERS[cls] = tuple(inspect.signature(cls.forward).parameters)
        except (TypeError, ValueError):
            _PARAMETERS[cls] = ()
    return _PARAMETERS[cls]


def _is_config(value: object) -> bool:
    configuration = sys.modules.get("transformers.configuration_utils")
    base = getattr(configuration, "PreTrainedConfig", None) or getattr(configuration, "PretrainedConfig", None)
    return isinstance(base, type) and isinstance(value, base)


def dispatches_through_interface(cls: type) -> bool:
    """Whether `cls.forward` picks its attention function from `ALL_ATTENTION_FUNCTIONS`
    by `self.config._attn_implementation`."""
    source = _forward_source(cls)
    return "ALL_ATTENTION_FUNCTIONS" in source and "config._attn_implementation" in source


def _model_implementation(module: nn.Module) -> str:
    config: Any = module.config
    return str(config._attn_implementation)


def _is_cross(module: nn.Module, path: str) -> bool:
    name = path.rsplit(".", 1)[-1].lower()
    return (
        bool(getattr(module, "is_cross_attention", False))
        or "cross" in type(module).__name__.lower()
        or any(part in name for part in _CROSS_NAMES)
    )


def _flag(module: nn.Module, names: tuple[str, ...]) -> str | None:
    for name in names:
        for owner in (module, module.config):
            if getattr(owner, name, None) not in (None, False, 0):
                return name
    return None


class TransformersAdapter(Adapter):
    """Patches transformers attention classes that use the attention interface."""

    name = "transformers"
    distribution = "transformers"
    supported_versions = ">=4.53,<6"

    def attention_types(self) -> tuple[type[nn.Module], ...]:
        """Attention classes of the imported transformers model modules that dispatch
        through the attention interface."""
        if not _transformers_loaded():
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
            _transformers_loaded()
            and _is_config(getattr(module, "config", None))
            and dispatches_through_interface(type(module))
        )

    def geometry(self, module: nn.Module, path: str, root: nn.Module, config: LCAAMConfig) -> SiteGeometry:
        """Refuse what LCAAM cannot honour; widths and token bounds from the config."""
        _refuse_unsupported(module, path)
        model_config = module.config
        embed_dim = getattr(model_config, "hidden_size", None)
        if not isinstance(embed_dim, int):
            raise UnsupportedModuleError(
                f"{type(module).__name__} at {path!r}: its config has no hidden_size, so the width of "
                f"the tokens LCAAM reads is unknown; exclude it with exclude=[{path!r}]"
            )
        cross = _is_cross(module, path)
        q_bound, kv_bound = _token_bounds(module, path, root, cross)
        max_q = config.max_tokens or q_bound
        max_kv = config.max_kv_tokens or (config.max_tokens if not cross else None) or kv_bound
        if config.generator == "mlp":
            if max_kv is None:
                raise MissingBoundError(
                    f"{type(module).__name__} at {path!r}: its config gives no bound on the number of "
                    f"key tokens (e.g. T5's relative positions); pass max_tokens=N (and, for "
                    f"cross-attention, max_kv_tokens=M) to lcaam_patch.apply, or generator='lowrank'"
                )
            if config.max_kv_tokens is None and config.max_tokens is None and max_kv > MAX_INFERRED_TOKENS:
                raise MissingBoundError(
                    f"{type(module).__name__} at {path!r}: its config allows {max_kv} positions, so the "
                    f"LCAAM generator would be a Linear {embed_dim}×{max_kv} per layer; pass "
                    f"max_kv_tokens=N (the longest sequence you will run, cache included) to "
                    f"lcaam_patch.apply, or generator='lowrank', which has no bound"
                )
        return SiteGeometry(
            embed_dim=embed_dim,
            max_q_tokens=max_q,
            max_kv_tokens=max_kv,
            kind="cross" if cross else "self",
            kv_embed_dim=_key_width(module, embed_dim) if cross else None,
        )

    def prepare(self, module: nn.Module, root: nn.Module) -> _State:
        """Give `module` its own config copy that dispatches to LCAAM's attention function."""
        _register_attention_function()
        state = _State(module.config, _model_implementation(module), root)
        own: Any = copy.copy(module.config)
        own._attn_implementation_internal = ATTENTION_FUNCTION
        module.config = own
        for model in root.modules():
            switchable = hasattr(type(model), SWITCH)  # transformers < 4.54 has no such method
            if switchable and _is_pretrained_model(model) and not _is_guard(vars(model).get(SWITCH)):
                setattr(model, SWITCH, functools.partial(refuse_switch, model))
        return state

    def restore(self, module: nn.Module, state: _State) -> None:
        """Put the module's original config back; drop the switch guards with the last site."""
        module.config = state.original_config
        if not any(hasattr(m, SITE_ATTR) for m in state.root.modules()):
            for model in state.root.modules():
                if _is_guard(vars(model).get(SWITCH)):
                    delattr(model, SWITCH)

    def forward(self, module: nn.Module, site: LCAAMSite, *args: Any, **kwargs: Any) -> Any:
        """The class's own forward, with the layer input kept for the attention function."""
        state: _State = site.adapter_state
        current = str(state.original_config._attn_implementation)
        if current != state.implementation:
            raise UnsupportedModuleError(
                f"the attention implementation of {site.path!r} was switched from "
                f"{state.implementation!r} to {current!r} after lcaam_patch.apply, which reads the "
                f"masks of the implementation it was applied under; call lcaam_patch.remove(model) "
                f"before switching, then apply again ('eager' or 'sdpa')"
            )
        _refuse_wrapped_generator(module, site.path)
        arguments = _bind(type(module), args, kwargs)
        x = arguments.get("hidden_states", args[0] if args else None)
        if not isinstance(x, torch.Tensor):
            raise UnsupportedModuleError(
                f"{type(module).__name__} at {site.path!r} was called without hidden states as its "
                f"first argument; LCAAM reads them. Exclude it with exclude=[{site.path!r}]"
            )
        kv_tokens = next((arguments[n] for n in _KEY_TOKEN_ARGUMENTS if arguments.get(n) is not None), None)
        cache = next((arguments[n] for n in _CACHE_ARGUMENTS if arguments.get(n) is not None), None)
        layer = None if kv_tokens is not None else _cached_layer(module, cache, x.shape[-2])
        call = _Call(x, kv_tokens, 0, False)
        if layer is not None:
            call.offset, call.from_cache = layer.offset, bool(layer.past) or layer.static
            if getattr(module._modules.get(GENERATOR_NAME), "reads_key_tokens", False):
                call.kv_tokens, call.offset = state.stash.key_tokens(layer, x, site.path), 0
        state.stash.calls.append(call)
        try:
            return type(module).forward(module, *args, **kwargs)
        finally:
            state.stash.calls.pop()


def _refuse_wrapped_generator(module: nn.Module, path: str) -> None:
    """A generator whose Linears another tuner wrapped (PEFT's target_modules="all-linear")
    would run their base weights only: the tuner's update would be silently lost."""
    generator = module._modules.get(GENERATOR_NAME)
    if generator is not None and any(hasattr(m, "base_layer") for m in generator.modules()):
        raise UnsupportedModuleError(
            f"the LCAAM generator of {path!r} had its Linear layers wrapped by another tuner (e.g. "
            f"LoRA with target_modules='all-linear'), whose update LCAAM's sliced weights would "
            f"silently skip; leave the generators out (LoraConfig(..., exclude_modules=r'.*\\.lcaam\\..*')) "
            f"and train them as they are (modules_to_save=['lcaam'])"
        )


SWITCH = "set_attn_implementation"


def _is_pretrained_model(module: nn.Module) -> bool:
    base = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    return isinstance(base, type) and isinstance(module, base)


def _is_guard(value: object) -> bool:
    return isinstance(value, functools.partial) and value.func is refuse_switch


def refuse_switch(model: nn.Module, attn_implementation: Any, *args: Any, **kwargs: Any) -> Any:
    """`set_attn_implementation` of a model carrying LCAAM: the same implementation passes,
    another one is refused."""
    config: Any = model.config
    current = config._attn_implementation
    if attn_implementation == current:
        return type(model).set_attn_implementation(model, attn_implementation, *args, **kwargs)  # type: ignore[attr-defined]
    raise UnsupportedModuleError(
        f"{type(model).__name__} carries LCAAM, applied under attn_implementation={current!r}, whose "
        f"masks it reads; call lcaam_patch.remove(model) before set_attn_implementation("
        f"{attn_implementation!r}), then apply again ('eager' or 'sdpa')"
    )


def _bind(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (self excluded), `**kwargs` merged in."""
    names = _forward_parameters(cls)[1:]
    bound: dict[str, Any] = dict(kwargs)
    bound.update(zip(names, args))
    return bound


def _cached_layer(module: nn.Module, cache: Any, num_queries: int) -> _CachedLayer | None:
    """The KV-cache layer of a self-attention call, before this call's update; None without one."""
    if cache is None:
        return None
    cache = getattr(cache, "self_attention_cache", cache)
    layers = getattr(cache, "layers", None)
    index = getattr(module, "layer_idx", None)
    if not isinstance(layers, (list, tuple)) or not isinstance(index, int):
        return None
    if index >= len(layers):  # created on its first update: empty
        return _CachedLayer(cache, index, 0, 0, False)
    layer = layers[index]
    past = int(layer.get_seq_length()) if getattr(layer, "is_initialized", True) else 0
    sizes = layer.get_mask_sizes
    if "cache_position" in inspect.signature(sizes).parameters:
        offset = sizes(torch.arange(past, past + num_queries))[1]
    else:
        offset = sizes(num_queries)[1]
    return _CachedLayer(cache, index, past, int(offset), "Static" in type(layer).__name__)


def _refuse_unsupported(module: nn.Module, path: str) -> None:
    """UnsupportedModuleError for what the LCAAM attention function cannot compute exactly."""
    name = type(module).__name__
    implementation = _model_implementation(module)
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise UnsupportedModuleError(
            f"{name} at {path!r} runs attn_implementation={implementation!r}; LCAAM needs the "
            f"masks of 'eager' or 'sdpa' (flash, flex and paged attention take other mask forms). "
            f"Build the model with attn_implementation='sdpa' (or call "
            f"model.set_attn_implementation('sdpa')) before lcaam_patch.apply"
        )
    source = _forward_source(type(module))
    softcap = _flag(module, ("attn_logit_softcapping", "softcap", "logit_softcapping"))
    if softcap is not None:
        raise UnsupportedModuleError(
            f"{name} at {path!r} soft-caps its attention logits ({softcap}), which LCAAM's fused "
            f"attention does not compute; set config.{softcap}=None, or exclude it with exclude=[{path!r}]"
        )
    if "s_aux" in source or isinstance(getattr(module, "sinks", None), torch.Tensor):
        raise UnsupportedModuleError(
            f"{name} at {path!r} uses attention sinks (an extra logit per head), which LCAAM's "
            f"fused attention does not compute; exclude it with exclude=[{path!r}]"
        )
    if "cu_seqlens" in source or "cu_seq_lens" in source:
        raise UnsupportedModuleError(
            f"{name} at {path!r} calls attention once per chunk of a packed sequence (cu_seqlens), "
            f"so its input hidden states are not the queries of one call; exclude it with exclude=[{path!r}]"
        )
    parameters = _forward_parameters(type(module))
    if {"query", "key", "value"} <= set(parameters):
        raise UnsupportedModuleError(
            f"{name} at {path!r} takes separate query, key and value inputs; LCAAM reads the layer's "
            f"hidden states. Exclude it with exclude=[{path!r}]"
        )


def _image_tokens(config: Any, root: nn.Module) -> int | None:
    image_size, patch_size = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image_size is None or patch_size is None:
        return None
    sizes = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    patches = tuple(patch_size) if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)
    grid = (sizes[0] // patches[0]) * (sizes[1] // patches[1])
    return grid + _prefix_tokens(config, root)


def _prefix_tokens(config: Any, root: nn.Module) -> int:
    """Class, distillation and register tokens of the embeddings that share `config`."""
    for module in root.modules():
        if getattr(module, "config", None) is config and any(
            hasattr(module, name) for name in ("patch_embeddings", "patch_embedding")
        ):
            count = 0
            for name in ("cls_token", "class_embedding", "distillation_token"):
                count += isinstance(getattr(module, name, None), torch.Tensor)
            registers = getattr(module, "register_tokens", None)
            if isinstance(registers, torch.Tensor):
                count += registers.shape[-2]
            return count
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def _token_bounds(module: nn.Module, path: str, root: nn.Module, cross: bool) -> tuple[int | None, int | None]:
    """(query bound, key bound) read off the module's config; None where there is none."""
    config = module.config
    image = _image_tokens(config, root)
    if image is not None:
        return image, image
    source = getattr(config, "max_source_positions", None)
    target = getattr(config, "max_target_positions", None)
    if source is not None or target is not None:
        decoder = "decoder" in path.split(".") or bool(getattr(module, "is_decoder", False))
        if cross:
            return target, source
        bound = target if decoder else source
        return bound, bound
    positions = getattr(config, "max_position_embeddings", None)
    return positions, positions


def _key_width(module: nn.Module, default: int) -> int:
    for name in ("k_proj", "key", "k"):
        projection = getattr(module, name, None)
        if isinstance(projection, nn.Linear):
            return projection.in_features
    return default


def _hard(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    return harden(mask, torch.finfo(mask.dtype).min / 2)


def _with_bias(mask: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The upstream mask with T5's position bias added (both after fusion)."""
    return masking.combine([mask, bias], dtype)


def lcaam_attention_function(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function registered as `lcaam`: upstream's arguments, LCAAM attention."""
    site: LCAAMSite | None = getattr(module, SITE_ATTR, None)
    calls = site.adapter_state.stash.calls if site is not None else []
    if site is None or not calls:
        raise UnsupportedModuleError(
            f"{type(module).__name__} dispatched to the {ATTENTION_FUNCTION!r} attention function without "
            f"running its LCAAM-patched forward; call the module itself (module(...)), not its class's "
            f"forward, and do not set attn_implementation={ATTENTION_FUNCTION!r} yourself"
        )
    for option in ("softcap", "s_aux", "sinks"):
        if kwargs.get(option) is not None:
            raise UnsupportedModuleError(
                f"{site.path!r} passed {option} to its attention function, which LCAAM's fused attention "
                f"does not compute; exclude it with exclude=[{site.path!r}]"
            )
    call = calls[-1]
    state: _State = site.adapter_state
    num_queries, num_keys = query.shape[-2], key.shape[-2]
    if key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    causal = False
    if attention_mask is not None:
        attention_mask = _hard(attention_mask[..., :num_keys])
    elif state.implementation == "sdpa":
        wanted = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(wanted) and num_queries > 1
    attention_mask = _with_bias(attention_mask, position_bias, query.dtype)
    kv_tokens = call.kv_tokens
    if kv_tokens is not None and kv_tokens.shape[-2] != num_keys:
        if kv_tokens.shape[-2] > num_keys:
            raise UnsupportedModuleError(
                f"{site.path!r} got {num_keys} keys for {kv_tokens.shape[-2]} key tokens; a KV cache "
                f"LCAAM cannot follow (e.g. cropped): start from an empty cache"
            )
        # a static cache's slots after the filled ones: hard-masked, so their M never counts
        kv_tokens = torch.nn.functional.pad(kv_tokens, (0, 0, 0, num_keys - kv_tokens.shape[-2]))
    mask = site.mask(module, call.x, call.offset + num_keys, kv_tokens)
    if isinstance(mask, LowRankMask) and kv_tokens is None and (call.from_cache or num_keys != call.x.shape[-2]):
        raise UnsupportedModuleError(
            f"{site.path!r}: generator='lowrank' reads the key tokens, but these keys come from a "
            f"KV cache LCAAM cannot follow ({type(module).__name__} gave no cache layers); run "
            f"without a cache (use_cache=False) or use generator='mlp'"
        )
    if call.offset:
        assert isinstance(mask, torch.Tensor)
        mask = mask[..., call.offset :]
    result = site.run(
        AttentionCall(
            query,
            key,
            value,
            mask,
            fusion=site.fusion,
            scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
            attn_mask=attention_mask,
            is_causal=causal,
            dropout_p=dropout,
            need_weights=state.implementation == "eager",
        )
    )
    return result.output.transpose(1, 2).contiguous(), result.weights


def _register_attention_function() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_FUNCTION, lcaam_attention_function)


adapter = TransformersAdapter()
