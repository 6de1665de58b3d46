"""The attention function LCAAM registers in transformers' attention interface."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...backends import AttentionCall, LowRankMask, masking
from ...backends.masking import harden
from ...errors import UnsupportedModuleError
from ...site import SITE_ATTR, LCAAMSite
from .calls import State

ATTENTION_FUNCTION = "lcaam"
"""The name LCAAM's attention function is registered under in `AttentionInterface`."""


def _hard(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as is; a float mask with its `finfo.min` entries made hard."""
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
    state: State = site.adapter_state
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


def register_attention_function() -> None:
    """Register `lcaam_attention_function` in transformers' `AttentionInterface`."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_FUNCTION, lcaam_attention_function)
