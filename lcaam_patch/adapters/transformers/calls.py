"""What the instance forward keeps for the attention function: the call's layer input, the
KV-cache layer it stands in, and the layer inputs of cached positions."""

from __future__ import annotations

import dataclasses
import inspect
import threading
import weakref
from typing import Any

import torch
from torch import nn

from ...errors import UnsupportedModuleError


@dataclasses.dataclass
class Call:
    """What the instance forward keeps for the attention function of the same call.

    `kv_tokens` are the key tokens of a cross-attention, or, for a generator that reads
    them, the tokens of the cached positions `offset...` followed by `x` (self-attention).
    `offset` is the absolute position of key slot 0; None when the keys are the last ones of
    the `positions` seen so far (a layer that reuses another layer's keys), known at the call.
    """

    x: torch.Tensor
    kv_tokens: torch.Tensor | None
    offset: int | None
    from_cache: bool
    positions: int = 0
    attended: bool = False

    def key_offset(self, num_keys: int) -> int:
        """The absolute position of key slot 0 of a call with `num_keys` keys."""
        return self.offset if self.offset is not None else max(0, self.positions - num_keys)


@dataclasses.dataclass
class CachedLayer:
    """Where a self-attention call stands in its KV cache (`cache.layers[index]`).

    `offset` is None for a layer that keeps no keys of its own and reuses another layer's
    (Gemma 3n's KV-shared layers): its keys are the last ones of the `past` positions and this
    call's, as many as the call gets.
    """

    cache: Any
    index: int
    past: int
    offset: int | None
    static: bool


class Stash:
    """Per-thread stack of `Call`s of one module, and the layer inputs of the positions in
    each KV cache it has seen (for generators that read key tokens); never pickled or copied."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._tokens: weakref.WeakKeyDictionary[Any, dict[int, torch.Tensor]] = weakref.WeakKeyDictionary()

    def key_tokens(self, layer: CachedLayer, x: torch.Tensor, path: str) -> torch.Tensor:
        """The layer inputs of positions `layer.offset...` (all of them for a layer that reuses
        another layer's keys): the kept ones, then `x`."""
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
        return tokens[:, layer.offset or 0 :]

    @property
    def calls(self) -> list[Call]:
        """This thread's calls in flight (innermost last)."""
        calls = getattr(self._local, "calls", None)
        if calls is None:
            calls = self._local.calls = []
        return calls

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def __deepcopy__(self, memo: dict[int, Any]) -> Stash:
        return Stash()


@dataclasses.dataclass
class State:
    """What `restore` needs and the attention function reads."""

    original_config: Any
    implementation: str
    root: nn.Module
    stash: Stash = dataclasses.field(default_factory=Stash)


def cached_layer(module: nn.Module, cache: Any, num_queries: int) -> CachedLayer | None:
    """The KV-cache layer of a self-attention call, before this call's update; None without one."""
    if cache is None:
        return None
    cache = getattr(cache, "self_attention_cache", cache)
    layers = getattr(cache, "layers", None)
    index = getattr(module, "layer_idx", None)
    if not isinstance(layers, (list, tuple)) or not isinstance(index, int):
        return None
    if index >= len(layers):  # created on its first update: empty
        return CachedLayer(cache, index, 0, 0, False)
    layer = layers[index]
    if not hasattr(layer, "get_seq_length"):  # keeps no keys: reuses another layer's
        return _sharing_layer(module, cache, layers, index, num_queries)
    past = int(layer.get_seq_length()) if getattr(layer, "is_initialized", True) else 0
    if _sizes_take_positions(type(layer)):
        offset = layer.get_mask_sizes(torch.arange(past, past + num_queries))[1]
    else:
        offset = layer.get_mask_sizes(num_queries)[1]
    return CachedLayer(cache, index, past, int(offset), "Static" in type(layer).__name__)


def _sharing_layer(module: nn.Module, cache: Any, layers: Any, index: int, num_queries: int) -> CachedLayer:
    """A layer that reuses the keys of the last earlier layer of its kind (sliding or not),
    which has already stored this call's positions."""
    sliding = getattr(module, "sliding_window", None) is not None
    producer = next(
        (
            layer
            for layer in reversed(layers[:index])
            if hasattr(layer, "get_seq_length") and ("Sliding" in type(layer).__name__) == sliding
        ),
        None,
    )
    if producer is None:
        raise UnsupportedModuleError(
            f"{type(module).__name__} (layer {index}) reuses another layer's keys, but no earlier cache "
            f"layer of its kind holds them, so LCAAM cannot place its key columns; run without a "
            f"cache (use_cache=False) or exclude the layer"
        )
    positions = int(producer.get_seq_length())
    return CachedLayer(cache, index, max(0, positions - num_queries), None, False)


_TAKES_POSITIONS: dict[type, bool] = {}


def _sizes_take_positions(cls: Any) -> bool:
    """Whether `cls.get_mask_sizes` takes the cache positions (older releases) rather than
    the query count; read once per class."""
    if cls not in _TAKES_POSITIONS:
        _TAKES_POSITIONS[cls] = "cache_position" in inspect.signature(cls.get_mask_sizes).parameters
    return _TAKES_POSITIONS[cls]
