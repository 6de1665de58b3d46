"""The attention that older transformers families still write in the module's forward, off
the attention interface, in one of two source forms (`discovery.LEGACY_FORMS`):

- BERT's (MegatronBERT, RemBERT, TAPAS, VisualBERT, FLAVA, BigBird's full attention, GIT's
  and BLIP's text layers, ...): `query`/`key`/`value` Linears, heads split, scores QKᵀ/√d
  plus the model's additive mask, softmax, dropout, times V;
- BART's written with `torch.bmm` (XGLM, TrOCR, GroupViT, MVP): `q_proj`/`k_proj`/`v_proj`
  Linears, queries times `scaling`, plus the (B, 1, Nq, Nk) mask, softmax, dropout, times V,
  `out_proj`; the weights it returns are those before dropout.

The claim is inferred from what the class has: its form's Linears and head attributes, a
forward whose source computes exactly that, whose parameters are ones this adapter reads
(`attention_mask` among them) and whose return form it recognises. Because that is
inferred, `verifies_claims` is set: each site checks itself at its first call against the
class's own forward (exact at identity, M in the path) and raises `UnsupportedModuleError`
otherwise.

Not claimed: a forward whose source adds other score terms or outputs (relative positions,
rotary embeddings, head masks, biases, a convolution joined to the context), or takes other
inputs (CANINE's `from_tensor`/`to_tensor`, LUKE's entity states, MobileViT's no mask).
MVP's prompt keys (`PREFIX_KEY_PARAMETERS`) are refused at apply where its decoder passes
them, and at a call given them.

Bounds: the shape probe of the enclosing image model, else the nearest config's
`max_position_embeddings`. Cross-attention (key tokens from `encoder_hidden_states` or
`key_value_states`, which the generator reads as its key input) is bounded by
`max_kv_tokens`, else by what the probe sees, else by the image tokens of the model's vision
tower or image encoder, else by an encoder-decoder's source positions, else refused at
apply: the module does not know it.

A KV cache is followed for a prompt (an empty cache filled) and for an encoder-decoder
cache's cross-attention; a self-attention after cached tokens is refused at the call (run
with `use_cache=False`). The upstream mask is additive with `finfo.min` where hidden: made
hard by `finite_hard_mask`, with the upstream's uniform average on rows it hides entirely
(`uniform_dead_rows`).
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
    PREFIX_KEY_PARAMETERS,
    LegacyForm,
    forward_parameters,
    forward_source,
    is_config,
    is_cross,
    is_legacy_self_attention,
    legacy_form,
    return_form,
    transformers_loaded,
)
from .probe import probed_tokens
from .switch import ATTENTION_TYPE, drop_guards, guard

_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")
_KEY_TOKEN_ARGUMENTS = ("encoder_hidden_states", "key_value_states")


def _has_projections(module: nn.Module, form: LegacyForm) -> bool:
    linears = (*form.projections, form.output) if form.output else form.projections
    return all(isinstance(module._modules.get(n), nn.Linear) for n in linears) and all(
        isinstance(getattr(module, n, None), int) for n in (form.heads, form.head_width)
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


def _encoder_tokens(model_config: Any, root: nn.Module) -> int | None:
    """The key tokens a cross-attention attends, as far as configs say: the tokens of one
    image of the model's vision tower or image encoder (BLIP's text decoder, TrOCR in a
    `VisionEncoderDecoderModel`; a larger image than configured is refused at the call), else
    an encoder-decoder's source positions (MVP); None without either."""
    root_config = getattr(root, "config", None)
    for name in ("vision_config", "encoder"):
        vision = getattr(root_config, name, None)
        tokens = image_tokens(vision, root) if is_config(vision) else None
        if tokens is not None:
            return tokens
    if getattr(model_config, "is_encoder_decoder", False):
        source = getattr(model_config, "max_source_positions", None)
        return source if isinstance(source, int) else getattr(model_config, "max_position_embeddings", None)
    return None


def _prefixes(path: str) -> list[str]:
    """The paths of the modules above `path`, outermost first, the root ("") excluded."""
    parts = path.split(".") if path else []
    return [".".join(parts[: i + 1]) for i in range(len(parts) - 1)]


def _is_cross(module: nn.Module, path: str, root: nn.Module, form: LegacyForm) -> bool:
    """Whether the module attends other tokens than its queries': a key Linear of another
    width, or a name that says so (its path, class or parent's class: GroupViT's
    `GroupViTCrossAttentionLayer`)."""
    query, key = (module._modules[n] for n in form.projections[:2])
    assert isinstance(query, nn.Linear) and isinstance(key, nn.Linear)
    prefixes = _prefixes(path)
    parent = root.get_submodule(prefixes[-1]) if prefixes else root
    return (
        key.in_features != query.in_features
        or is_cross(module, path)
        or "crossattention" in path.split(".")
        or "cross" in type(parent).__name__.lower()
    )


def _prefix_keys_given(path: str, root: nn.Module, cls: type[nn.Module]) -> str | None:
    """The `PREFIX_KEY_PARAMETERS` flag that the innermost module above `path` holding it has
    set, so that it passes prefix keys to this class (MVP's decoder's `use_prompt`); None
    when that module has it unset or there is none."""
    for parameter, flag in PREFIX_KEY_PARAMETERS.items():
        if parameter in forward_parameters(cls):
            for prefix in reversed(["", *_prefixes(path)]):
                setting = getattr(root.get_submodule(prefix), flag, None)
                if setting is not None:
                    return flag if setting is True else None
    return None


def _refuse_prefix_keys(name: str, path: str, what: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"{name} at {path!r}: {what} keys of no token (prompt tuning) before the call's own; LCAAM's "
        f"generator has no tokens to read for them, so this patch does not reproduce them. Turn the "
        f"prompts off, or exclude it with exclude=[{path!r}]"
    )


def _dropout_probability(module: nn.Module) -> float:
    """The attention dropout the forward applies now: its `nn.Dropout` (BERT) or its float
    `dropout` (BART) while training; 0 otherwise."""
    dropout = getattr(module, "dropout", None)
    if isinstance(dropout, nn.Dropout):
        return float(dropout.p) if dropout.training else 0.0
    return float(dropout) if isinstance(dropout, (int, float)) and module.training else 0.0


class LegacySelfAttentionAdapter(Adapter):
    """Patches transformers' attention modules that compute BERT's or the older BART's eager
    attention in their own forward (see the module docstring)."""

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

    def prepare(self, module: nn.Module, root: nn.Module) -> nn.Module:
        """Guard the modules above `module` that could swap it for an unpatched one
        (BigBird's `set_attention_type`); returns `root` for `restore`."""
        path = next(name for name, m in root.named_modules() if m is module)
        for prefix in ["", *_prefixes(path)]:
            holder = root.get_submodule(prefix)
            if hasattr(type(holder), ATTENTION_TYPE):
                guard(holder, ATTENTION_TYPE)
        return root

    def restore(self, module: nn.Module, state: nn.Module) -> None:
        """Drop the switch guards with the model's last site."""
        drop_guards(state)

    def claims(self, module: nn.Module, path: str, root: nn.Module) -> bool:
        """A module of such a class with its form's Linears and head attributes."""
        if not transformers_loaded():
            return False
        form = legacy_form(type(module))
        return form is not None and _has_projections(module, form)

    def geometry(self, module: nn.Module, path: str, root: nn.Module, config: LCAAMConfig) -> SiteGeometry:
        """Width from the query Linear; bounds from the probe, the config or the options."""
        cls = type(module)
        form = legacy_form(cls)
        assert form is not None
        name = cls.__name__
        prompted = _prefix_keys_given(path, root, cls)
        if prompted is not None:
            raise _refuse_prefix_keys(name, path, f"a module above it has {prompted}=True, so it attends")
        query, key = (module._modules[n] for n in form.projections[:2])
        assert isinstance(query, nn.Linear) and isinstance(key, nn.Linear)
        cross = _is_cross(module, path, root, form)
        probed = probed_tokens(module, path, root)
        model_config = _nearest_config(module, path, root)
        positions = getattr(model_config, "max_position_embeddings", None)
        q_bound = config.max_tokens or (probed[0] if probed else positions)
        if cross:
            kv_bound = config.max_kv_tokens or (probed[1] if probed else _encoder_tokens(model_config, root))
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
        form = legacy_form(cls)
        assert form is not None
        arguments: dict[str, Any] = dict(kwargs)
        arguments.update(zip(forward_parameters(cls)[1:], args))
        if any(arguments.get(n) is not None for n in PREFIX_KEY_PARAMETERS):
            raise _refuse_prefix_keys(cls.__name__, site.path, "it was given")
        x: torch.Tensor = arguments["hidden_states"]
        kv_tokens = next((arguments[n] for n in _KEY_TOKEN_ARGUMENTS if arguments.get(n) is not None), None)
        attention_mask = arguments.get("attention_mask")
        if kv_tokens is not None and "encoder_attention_mask" in arguments:
            attention_mask = arguments["encoder_attention_mask"]
        source = x if kv_tokens is None else kv_tokens
        heads, width = getattr(module, form.heads), getattr(module, form.head_width)
        query, key, value = (module._modules[n] for n in form.projections)
        q = query(x).view(*x.shape[:-1], -1, width).transpose(1, 2)
        k = key(source).view(*source.shape[:-1], -1, width).transpose(1, 2)
        v = value(source).view(*source.shape[:-1], -1, width).transpose(1, 2)
        cache_name = next((n for n in _CACHE_ARGUMENTS if arguments.get(n) is not None), None)
        if cache_name is not None:
            k, v = _through_cache(module, site.path, arguments[cache_name], k, v, kv_tokens is not None)
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(q.dtype)
        mask, dead_rows = masking.finite_hard_mask(attention_mask)
        generated = site.mask(module, x, k.shape[-2], kv_tokens)
        returned = return_form(cls)
        output_attentions = bool(arguments.get("output_attentions", False))
        want_weights = returned == "pair" or (returned in ("optional", "pair_if_asked") and output_attentions)
        scale = form.scale(module)
        output: nn.Module | None = module._modules[form.output] if form.output else None

        def attend(m: Any, probability: float, weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            before_dropout = weights and probability > 0.0 and form.weights_before_dropout
            dropout_p = 0.0 if before_dropout else probability
            call = AttentionCall(q, k, v, m, site.fusion, scale, mask, dropout_p=dropout_p, need_weights=weights)
            result = site.run(call)
            out, attention_weights = result.output, result.weights
            if dead_rows is not None:
                out, attention_weights = masking.uniform_dead_rows(out, attention_weights, v, dead_rows)
            if before_dropout:  # the weights returned are those before dropout, as upstream's
                assert attention_weights is not None
                out = nn.functional.dropout(attention_weights, p=probability) @ v
            context = out.transpose(1, 2).reshape(*x.shape[:-1], heads * width)
            return (context if output is None else output(context)), attention_weights

        result, weights = attend(generated, _dropout_probability(module), want_weights)
        if needs_verification(site, x):
            upstream_arguments = {**arguments, cache_name: None} if cache_name else arguments  # same keys
            with torch.no_grad():
                probe = AttentionCall(q, k, v, generated, fusion=site.fusion, scale=scale, attn_mask=mask)
                attended = attended_keys(probe, site.fusion)
            verify_first_call(
                site,
                cls.__name__,
                compute=lambda m: attend(m, 0.0, False)[0],
                reference=lambda: _upstream_output(module, upstream_arguments),
                mask_shape=(q.shape[0], q.shape[-2], k.shape[-2]),
                attended=attended,
            )
        if returned == "plain":
            return result
        if returned in ("pair", "pair_if_asked"):
            return result, weights
        outputs = (result, weights) if output_attentions else (result,)
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


def _upstream_output(module: nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
    """The output the class's own forward computes for these arguments, without dropout."""
    with _evaluating(module):
        output = type(module).forward(module, **arguments)
    context: torch.Tensor = output[0] if isinstance(output, tuple) else output
    return context


adapter = LegacySelfAttentionAdapter()
