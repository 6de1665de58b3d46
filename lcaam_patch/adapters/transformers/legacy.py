"""The BERT-style self-attention that older transformers families still write in the module's
forward, off the attention interface (MegatronBERT, RemBERT, TAPAS, VisualBERT, FLAVA,
BigBird's full attention, GIT's and BLIP's text layers, ...): `query`/`key`/`value` Linears,
heads split, scores QKᵀ/√d plus the model's additive mask, softmax, dropout, times V.

The claim is inferred from what the class has: those three Linears and the head attributes,
a forward whose source computes exactly that, whose parameters are ones this adapter reads
(`attention_mask` among them) and whose return form it recognises (the context, the context
and the weights, or the weights when `output_attentions` asks). Because that is inferred,
`verifies_claims` is set: each site checks itself at its first call against the class's own
forward (exact at identity, M in the path) and raises `UnsupportedModuleError` otherwise.

Not claimed: a forward whose source adds other score terms or outputs (relative positions,
rotary embeddings, head masks, biases, a convolution joined to the context), or takes other
inputs (CANINE's `from_tensor`/`to_tensor`, LUKE's entity states, MobileViT's no mask).

Bounds: the shape probe of the enclosing image model, else the nearest config's
`max_position_embeddings`. Cross-attention (key tokens from `encoder_hidden_states`, which
the generator reads as its key input) is bounded by `max_kv_tokens`, else by the image
tokens of the model's vision tower (BLIP's text decoder attends the image), else refused at
apply: the module does not know it.

A KV cache is followed for a prompt (an empty cache filled) and for an encoder-decoder
cache's cross-attention; a self-attention after cached tokens is refused at the call (run
with `use_cache=False`). The upstream mask is BERT's extended mask (`finfo.min` where
hidden): made hard by `finite_hard_mask`, with the upstream's uniform average on rows it
hides entirely (`uniform_dead_rows`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...backends import AttentionCall, masking
from ...config import LCAAMConfig
from ...errors import UnsupportedModuleError
from ...site import LCAAMSite, SiteGeometry
from ...verification import attended_keys, needs_verification, verify_first_call
from ..base import Adapter
from .bounds import image_tokens, require_generator_bound
from .discovery import (
    forward_parameters,
    forward_source,
    is_config,
    is_legacy_self_attention,
    return_form,
    transformers_loaded,
)
from .probe import probed_tokens

_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


def _has_projections(module: nn.Module) -> bool:
    return all(isinstance(module._modules.get(n), nn.Linear) for n in ("query", "key", "value")) and all(
        isinstance(getattr(module, n, None), int) for n in ("num_attention_heads", "attention_head_size")
    )


def _nearest_config(module: nn.Module, path: str, root: nn.Module) -> Any:
    """The transformers config of the module, else of its nearest ancestor on `path`."""
    if is_config(getattr(module, "config", None)):
        return module.config
    found: Any = root.config if is_config(getattr(root, "config", None)) else None
    for prefix in _prefixes(path):
        config = getattr(root.get_submodule(prefix), "config", None)
        found = config if is_config(config) else found
    return found


def _image_tokens_attended(root: nn.Module) -> int | None:
    """The tokens of one image of the model's vision tower (BLIP's text decoder cross-attends
    them), None without one; a larger image than configured is refused at the call."""
    vision = getattr(getattr(root, "config", None), "vision_config", None)
    return image_tokens(vision, root) if is_config(vision) else None


def _prefixes(path: str) -> list[str]:
    """The paths of the modules above `path`, outermost first, the root ("") excluded."""
    parts = path.split(".") if path else []
    return [".".join(parts[: i + 1]) for i in range(len(parts) - 1)]


class LegacySelfAttentionAdapter(Adapter):
    """Patches transformers' BERT-style self-attention modules that compute attention in
    their own forward (see the module docstring)."""

    name = "transformers_legacy"
    verifies_claims = True
    distribution = "transformers"
    supported_versions = ">=4.53,<6"

    def attention_types(self) -> tuple[type[nn.Module], ...]:
        """The imported transformers classes whose forward this adapter reproduces."""
        if not transformers_loaded():
            return ()
        found: list[type[nn.Module]] = []
        for module_name, module in list(sys.modules.items()):
            if not module_name.startswith("transformers.models.") or module is None:
                continue
            for value in list(vars(module).values()):
                if isinstance(value, type) and value.__module__ == module_name and value not in found:
                    if is_legacy_self_attention(value):
                        found.append(value)
        return tuple(found)

    def claims(self, module: nn.Module, path: str, root: nn.Module) -> bool:
        """A module of such a class with its `query`/`key`/`value` Linears and head attributes."""
        return transformers_loaded() and is_legacy_self_attention(type(module)) and _has_projections(module)

    def geometry(self, module: nn.Module, path: str, root: nn.Module, config: LCAAMConfig) -> SiteGeometry:
        """Width from the query Linear; bounds from the probe, the config or the options."""
        name = type(module).__name__
        query, key = module._modules["query"], module._modules["key"]
        assert isinstance(query, nn.Linear) and isinstance(key, nn.Linear)
        cross = key.in_features != query.in_features or "crossattention" in path.split(".")
        probed = None if cross else probed_tokens(module, path, root)
        model_config = _nearest_config(module, path, root)
        positions = getattr(model_config, "max_position_embeddings", None)
        q_bound = config.max_tokens or (probed[0] if probed else positions)
        if cross:
            kv_bound = config.max_kv_tokens or _image_tokens_attended(root)
        else:
            kv_bound = config.max_kv_tokens or config.max_tokens or (probed[1] if probed else positions)
        require_generator_bound(
            config, f"{name} at {path!r}", kv_bound, query.in_features, "it does not know how many key tokens it sees"
        )
        return SiteGeometry(
            embed_dim=query.in_features,
            max_q_tokens=q_bound,
            max_kv_tokens=kv_bound,
            kind="cross" if cross else "self",
            kv_embed_dim=key.in_features if cross else None,
        )

    def forward(self, module: Any, site: LCAAMSite, *args: Any, **kwargs: Any) -> Any:
        """The class's forward with LCAAM attention; same arguments and outputs."""
        cls = type(module)
        arguments: dict[str, Any] = dict(kwargs)
        arguments.update(zip(forward_parameters(cls)[1:], args))
        x: torch.Tensor = arguments["hidden_states"]
        kv_tokens = arguments.get("encoder_hidden_states")
        attention_mask = arguments.get("attention_mask")
        if kv_tokens is not None and "encoder_attention_mask" in arguments:
            attention_mask = arguments["encoder_attention_mask"]
        source = x if kv_tokens is None else kv_tokens
        heads, width = module.num_attention_heads, module.attention_head_size
        q = module.query(x).view(*x.shape[:-1], -1, width).transpose(1, 2)
        k = module.key(source).view(*source.shape[:-1], -1, width).transpose(1, 2)
        v = module.value(source).view(*source.shape[:-1], -1, width).transpose(1, 2)
        cache_name = next((n for n in _CACHE_ARGUMENTS if arguments.get(n) is not None), None)
        if cache_name is not None:
            k, v = _through_cache(module, site.path, arguments[cache_name], k, v, kv_tokens is not None)
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(q.dtype)
        mask, dead_rows = masking.finite_hard_mask(attention_mask)
        generated = site.mask(module, x, k.shape[-2], kv_tokens)
        form = return_form(cls)
        output_attentions = bool(arguments.get("output_attentions", False))
        want_weights = form == "pair" or (form == "optional" and output_attentions)
        dropout: nn.Module | None = module._modules.get("dropout")
        p = float(getattr(dropout, "p", 0.0)) if dropout is not None and dropout.training else 0.0

        def attend(m: Any, probability: float, weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            scale = width**-0.5
            call = AttentionCall(q, k, v, m, site.fusion, scale, mask, dropout_p=probability, need_weights=weights)
            result = site.run(call)
            out, attention_weights = result.output, result.weights
            if dead_rows is not None:
                out, attention_weights = masking.uniform_dead_rows(out, attention_weights, v, dead_rows)
            return out.transpose(1, 2).reshape(*x.shape[:-1], heads * width), attention_weights

        context, weights = attend(generated, p, want_weights)
        if needs_verification(site, x):
            upstream_arguments = {**arguments, cache_name: None} if cache_name else arguments  # same keys
            with torch.no_grad():
                probe = AttentionCall(q, k, v, generated, fusion=site.fusion, scale=width**-0.5, attn_mask=mask)
                attended = attended_keys(probe, site.fusion)
            verify_first_call(
                site,
                cls.__name__,
                compute=lambda m: attend(m, 0.0, False)[0],
                reference=lambda: _upstream_context(module, upstream_arguments),
                mask_shape=(q.shape[0], q.shape[-2], k.shape[-2]),
                attended=attended,
            )
        if form == "plain":
            return context
        if form == "pair":
            return context, weights
        outputs = (context, weights) if output_attentions else (context,)
        if getattr(module, "is_decoder", False) and "outputs = outputs + (cache,)" in forward_source(cls):
            outputs = (*outputs, arguments.get(cache_name) if cache_name else None)  # TAPAS as a decoder
        return outputs


@contextlib.contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """`module` and its children in eval mode (no dropout) for the duration."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _through_cache(
    module: nn.Module, path: str, cache: Any, k: torch.Tensor, v: torch.Tensor, cross: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of a call given a cache, kept in it as upstream does: a
    self-attention that fills an empty cache layer (a prompt), or a cross-attention of an
    `EncoderDecoderCache` (filled once, then read back). A self-attention after cached
    tokens is refused: the generator would need their tokens, which this patch does not keep."""
    index = getattr(module, "layer_idx", None)
    updated: Any = getattr(cache, "is_updated", None)
    layers: Any = getattr(cache, "cross_attention_cache" if cross else "self_attention_cache", None if cross else cache)
    if not isinstance(index, int) or layers is None or (cross and not isinstance(updated, dict)):
        followed = False
    elif cross:
        if updated.get(index):
            layer = layers.layers[index]
            return layer.keys, layer.values
        updated[index] = True
        followed = True
    else:
        followed = layers.get_seq_length(index) == 0
    if not followed:
        raise UnsupportedModuleError(
            f"{type(module).__name__} at {path!r} was given a KV cache that LCAAM's patch of this class "
            f"does not follow (it fills an empty cache with a prompt's keys, and an encoder-decoder cache's "
            f"cross-attention keys); run the model with use_cache=False, or exclude it with exclude=[{path!r}]"
        )
    keys, values = layers.update(k, v, index)
    return keys, values


def _upstream_context(module: nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
    """The context the class's own forward computes for these arguments, without dropout."""
    with _evaluating(module):
        output = type(module).forward(module, **arguments)
    context: torch.Tensor = output[0] if isinstance(output, tuple) else output
    return context


adapter = LegacySelfAttentionAdapter()
