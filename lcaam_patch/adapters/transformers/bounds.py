"""Token bounds and widths read off a transformers config."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import LCAAMConfig
from ...errors import MissingBoundError
from .probe import probed_tokens

MAX_INFERRED_TOKENS = 16384
"""Above this many positions read off a config, the generator width must be given."""


def require_generator_bound(config: LCAAMConfig, site: str, max_kv: int | None, embed_dim: int, unbounded: str) -> None:
    """Refuse an `mlp` generator whose key bound is unknown or, read off a config, too large
    for a Linear `embed_dim`×bound per layer. `site` names the module ("Class at 'path'"),
    `unbounded` says why it has no bound."""
    if config.generator != "mlp":
        return
    if max_kv is None:
        raise MissingBoundError(
            f"{site}: {unbounded}; pass max_tokens=N (and, for cross-attention, max_kv_tokens=M) to "
            f"lcaam_patch.apply, or generator='lowrank'"
        )
    if config.max_kv_tokens is None and config.max_tokens is None and max_kv > MAX_INFERRED_TOKENS:
        raise MissingBoundError(
            f"{site}: its config allows {max_kv} positions, so the LCAAM generator would be a Linear "
            f"{embed_dim}×{max_kv} per layer; pass max_kv_tokens=N (the longest sequence you will run, cache "
            f"included) to lcaam_patch.apply, or generator='lowrank', which has no bound"
        )


def image_tokens(config: Any, root: nn.Module) -> int | None:
    """Patch tokens of one image plus the prefix tokens; None without image and patch sizes."""
    image_size, patch_size = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image_size is None or patch_size is None:
        return None
    sizes = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    patches = tuple(patch_size) if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)
    grid = (sizes[0] // patches[0]) * (sizes[1] // patches[1])
    return grid + prefix_tokens(config, root)


def prefix_tokens(config: Any, root: nn.Module) -> int:
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


def token_bounds(module: nn.Module, path: str, root: nn.Module, cross: bool) -> tuple[int | None, int | None]:
    """(query bound, key bound): what the shape probe sees the module called with in its
    image model, else read off the module's config; None where there is none."""
    probed = probed_tokens(module, path, root)
    if probed is not None:
        return probed
    config = module.config
    image = image_tokens(config, root)
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
    queries = getattr(config, "num_queries", None)
    if isinstance(queries, int) and "decoder" in path.split(".") and not cross:  # DETR's object queries
        return queries, queries
    positions = getattr(config, "max_position_embeddings", None)
    return positions, positions


_QUERY_PROJECTIONS = ("q_proj", "query", "q", "q_lin", "qkv", "qkv_proj", "c_attn", "Wqkv", "in_proj", "to_q")


def query_width(module: nn.Module) -> int | None:
    """The width of the tokens the module's queries are projected from: its query (or fused
    qkv) projection's input, else its config's `hidden_size`; None when neither is there."""
    for name in _QUERY_PROJECTIONS:
        projection = getattr(module, name, None)
        if isinstance(projection, nn.Linear):
            return projection.in_features
        weight = getattr(projection, "weight", None)
        if type(projection).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):
            return int(weight.shape[0])  # transformers' Conv1D: weight (in, out)
    width = getattr(module.config, "hidden_size", None)
    return width if isinstance(width, int) else None


def key_width(module: nn.Module, default: int) -> int:
    """The width of the key tokens of a cross-attention: its key projection's input."""
    for name in ("k_proj", "key", "k"):
        projection = getattr(module, name, None)
        if isinstance(projection, nn.Linear):
            return projection.in_features
    return default
