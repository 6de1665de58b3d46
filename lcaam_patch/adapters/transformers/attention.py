"""The attention function LCAAM registers in transformers' attention interface."""

from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...backends import AttentionCall, LowRankMask, masking, run
from ...errors import UnsupportedModuleError
from ...site import SITE_ATTR, LCAAMSite
from ...verification import attended_keys, needs_verification, verify_first_call
from .calls import State
from .discovery import forward_source

_REFUSED_ARGUMENTS = frozenset({"softcap", "s_aux", "sinks", "sparse_indices", "topk_indices"})
"""Arguments that change what attention computes and that LCAAM's attention does not honour."""

ATTENTION_FUNCTION = "lcaam"
"""The name LCAAM's attention function is registered under in `AttentionInterface`."""


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
    for option in _REFUSED_ARGUMENTS.intersection(kwargs):
        if kwargs[option] is not None:
            raise UnsupportedModuleError(
                f"{site.path!r} passed {option} to its attention function, which LCAAM's fused attention "
                f"does not compute; exclude it with exclude=[{site.path!r}]"
            )
    call = calls[-1]
    call.attended = True
    state: State = site.adapter_state
    _check_queries(site, module, call.x, query)
    given_key, given_value, given_mask = key, value, attention_mask
    num_queries, num_keys = query.shape[-2], key.shape[-2]
    causal = False
    dead_rows = None
    if attention_mask is not None:
        attention_mask, dead_rows = _hard_mask(attention_mask, num_keys)
    elif state.implementation == "sdpa":
        wanted = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(wanted) and num_queries > 1
    if position_bias is not None:
        attention_mask = _with_bias(attention_mask, position_bias, query.dtype)
    kv_tokens, key_factor = call.kv_tokens, call.key_factor
    per_key = kv_tokens if kv_tokens is not None else key_factor  # one row per key token
    offset = call.key_offset(num_keys)
    if per_key is not None:
        if call.offset is None:  # the last keys of a layer that reuses another's
            per_key = per_key[:, offset:]
        if per_key.shape[-2] > num_keys:
            raise UnsupportedModuleError(
                f"{site.path!r} got {num_keys} keys for {per_key.shape[-2]} key tokens; a KV cache "
                f"LCAAM cannot follow (e.g. cropped): start from an empty cache"
            )
        if per_key.shape[-2] < num_keys:
            # a static cache's slots after the filled ones: hard-masked, so their M never counts
            per_key = torch.nn.functional.pad(per_key, (0, 0, 0, num_keys - per_key.shape[-2]))
        if kv_tokens is not None:
            kv_tokens = per_key
        else:
            key_factor = per_key
    mask = site.mask(module, call.x, (0 if per_key is not None else offset) + num_keys, kv_tokens, key_factor)
    if isinstance(mask, LowRankMask) and per_key is None and (call.from_cache or num_keys != call.x.shape[-2]):
        raise UnsupportedModuleError(
            f"{site.path!r}: generator='lowrank' reads the key tokens, but these keys come from a "
            f"KV cache LCAAM cannot follow ({type(module).__name__} gave no cache layers); run "
            f"without a cache (use_cache=False) or use generator='mlp'"
        )
    if offset and per_key is None:
        assert isinstance(mask, torch.Tensor)
        mask = mask[..., offset:]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5

    def attend(m: torch.Tensor | LowRankMask, p: float, weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention = AttentionCall(
            query,
            key,
            value,
            m,
            fusion=site.fusion,
            scale=scale,
            attn_mask=attention_mask,
            is_causal=causal,
            dropout_p=p,
            need_weights=weights,
        )
        result = site.run(attention) if m is mask else run(attention, site.backend)
        out, attention_weights = result.output, result.weights
        if dead_rows is not None:
            out, attention_weights = masking.uniform_dead_rows(out, attention_weights, value, dead_rows)
        return out.transpose(1, 2).contiguous(), attention_weights

    need_weights = state.implementation == "eager" and (not state.weights_optional or weights_wanted(module, kwargs))
    output, weights = attend(mask, dropout, need_weights)
    if needs_verification(site, query):
        extra = dict(kwargs)
        if is_causal is not None:
            extra["is_causal"] = is_causal
        if position_bias is not None:
            extra["position_bias"] = position_bias
        upstream = upstream_attention(module, state.implementation)
        with torch.no_grad():  # nothing saved for backward: a recomputation skips the check
            probe = AttentionCall(query, key, value, mask, fusion=site.fusion, scale=scale, attn_mask=attention_mask)
            attended = attended_keys(probe, site.fusion)
        verify_first_call(
            site,
            type(module).__name__,
            compute=lambda m: attend(m, 0.0, False)[0],
            reference=lambda: upstream(
                module, query, given_key, given_value, given_mask, dropout=0.0, scaling=scaling, **extra
            )[0],
            mask_shape=(query.shape[0], num_queries, num_keys),
            attended=attended,
        )
    return output, weights


_HARD_MASK: tuple[weakref.ReferenceType[torch.Tensor], int, int, tuple[torch.Tensor | None, torch.Tensor | None]] | None
_HARD_MASK = None
"""The last upstream mask `_hard_mask` read, its version, key count and answer: a model hands
the same mask to each of its layers (forgotten when the mask is freed)."""


def _hard_mask(attention_mask: torch.Tensor, num_keys: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`masking.finite_hard_mask` of the first `num_keys` columns of `attention_mask`, read once
    for all the layers given the same mask (outside autograd and `torch.compile`)."""
    global _HARD_MASK
    kept = not attention_mask.requires_grad and not torch.compiler.is_compiling()
    last = _HARD_MASK
    if kept and last is not None and last[0]() is attention_mask and last[1:3] == (attention_mask._version, num_keys):
        return last[3]
    answer = masking.finite_hard_mask(attention_mask[..., :num_keys])
    if kept:
        _HARD_MASK = (weakref.ref(attention_mask, _forget_hard_mask), attention_mask._version, num_keys, answer)
    return answer


def _forget_hard_mask(freed: weakref.ReferenceType[torch.Tensor]) -> None:
    global _HARD_MASK
    last = _HARD_MASK
    if last is not None and last[0] is freed:
        _HARD_MASK = None


_RECORDER_MODULE = "transformers.utils.output_capturing"
_NOT_WEIGHTS = frozenset({"hidden_states", "_hidden_states_layers"})


def weights_wanted(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether something may read the attention weights this call of `module` returns: the
    call asks (`output_attentions`), transformers records this forward's outputs other than
    hidden states (`capture_outputs`), or a forward hook other than transformers' recorder
    sees the module's output. True whenever that cannot be told (no recorder to ask in this
    transformers, or inside `torch.compile`)."""
    if kwargs.get("output_attentions") or torch.compiler.is_compiling():
        return True
    if getattr(torch.nn.modules.module, "_global_forward_hooks", None):
        return True
    for hook in module._forward_hooks.values():
        if getattr(hook, "__module__", None) != _RECORDER_MODULE:
            return True
    collector = getattr(sys.modules.get(_RECORDER_MODULE), "_active_collector", None)
    if collector is None:
        return True
    recorded = collector.get()
    return bool(recorded) and any(key not in _NOT_WEIGHTS for key in recorded)


def _check_queries(site: LCAAMSite, module: nn.Module, x: torch.Tensor, query: torch.Tensor) -> None:
    """The layer input must be the queries' tokens: same batch and length."""
    if x.dim() != 3 or x.shape[0] != query.shape[0] or x.shape[1] != query.shape[-2]:
        raise UnsupportedModuleError(
            f"{type(module).__name__} at {site.path!r} attends with queries of batch {query.shape[0]} and "
            f"length {query.shape[-2]}, but its input hidden states have shape {tuple(x.shape)}: they are "
            f"not the queries' tokens (a chunked or reshaped call), so LCAAM's mask cannot be placed. "
            f"Exclude it with exclude=[{site.path!r}]"
        )


_EAGER_FUNCTION = re.compile(
    r"get_interface\(\s*self\.config\._attn_implementation\s*,\s*(\w+)"
    r"|attention_interface\s*(?::[^=\n]+)?=\s*(\w+)\s*$",
    re.MULTILINE,
)


def upstream_attention(module: nn.Module, implementation: str) -> Callable[..., Any]:
    """The attention function the module's forward would call under `implementation`
    without LCAAM: its own eager function for "eager", the registered one otherwise."""
    if implementation != "eager":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        function: Callable[..., Any] = ALL_ATTENTION_FUNCTIONS[implementation]
        return function
    eager = eager_function(type(module))
    if eager is None:
        raise UnsupportedModuleError(
            f"{type(module).__name__}: its forward names no eager attention function LCAAM can find "
            f"to verify against; exclude it, or pass verify=False if you know it computes plain attention"
        )
    return eager


def eager_function(cls: type[nn.Module]) -> Callable[..., Any] | None:
    """The eager attention function `cls.forward` falls back to, looked up in its module."""
    namespace = vars(sys.modules[cls.__module__]) if cls.__module__ in sys.modules else {}
    names = [a or b for a, b in _EAGER_FUNCTION.findall(forward_source(cls))] + ["eager_attention_forward"]
    return next((namespace[n] for n in names if callable(namespace.get(n))), None)


def register_attention_function() -> None:
    """Register `lcaam_attention_function` in transformers' `AttentionInterface`."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_FUNCTION, lcaam_attention_function)
