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
from ...generators import LowRankGenerator


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
    key_factor: torch.Tensor | None = None
    """The lowrank generator's key factor of `kv_tokens`, row for row, when the stash kept it."""

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


class KeySlot:
    """The layer inputs of the positions of one KV-cache layer, in order, and the lowrank
    generator's key factor of each, computed once per position.

    Inside autograd (or a `torch.compile` trace) each call concatenates: the tokens are a
    new tensor per call and no key factor is kept, so gradients and graphs are the
    generator's own. Outside it, the tokens and the factors grow in buffers that are only
    ever appended to (a rewound or reshaped cache gets new ones), so a view handed out by
    an earlier call never changes; the factors are recomputed over every kept token when
    the generator's key weights changed since (a parameter replaced or its `_version`
    moved, as an optimizer step does).
    """

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.count = 0
        self.owned = False
        self.factors: torch.Tensor | None = None
        self.factor_count = 0
        self.weights: tuple[torch.Tensor, ...] = ()
        self.state: tuple[int, ...] = ()

    def keep(self, tokens: torch.Tensor) -> None:
        """Keep `tokens` (every position so far) as they are, forgetting the factors."""
        self.tokens, self.count, self.owned = tokens, tokens.shape[-2], False
        self.factors, self.factor_count = None, 0

    def append(self, x: torch.Tensor, past: int) -> torch.Tensor:
        """The buffer holding the kept tokens of positions `0...past` followed by `x`."""
        end = past + x.shape[-2]
        buffer = self.tokens
        if not (self.owned and buffer is not None and past == self.count and _fits(buffer, x, end)):
            grown = x.new_empty((x.shape[0], end + max(64, end // 4), x.shape[-1]))  # room for more steps
            if past:
                assert buffer is not None
                grown[:, :past].copy_(buffer[:, :past])
            buffer, self.owned = grown, True
            self.factors, self.factor_count = None, 0
        buffer[:, past:end].copy_(x)
        self.tokens, self.count = buffer, end
        return buffer

    def key_factor(self, generator: LowRankGenerator, x: torch.Tensor, past: int) -> torch.Tensor:
        """The buffer holding B = F_B(tokens) of positions `0...past` followed by `x`, the last
        ones `append`ed (kept rows reused while the key weights are unchanged)."""
        assert self.tokens is not None
        end = past + x.shape[-2]
        weights = generator.key_weights()
        # the kept `weights` hold the tensors alive, so an id here is never a reused one
        state = tuple([value for w in weights for value in (id(w), w._version)])
        factors = self.factors
        if factors is not None and self.factor_count == past and state == self.state:
            new = generator.key_factor(x)
            if _fits(factors, new, end):
                factors[:, past:end].copy_(new)
                self.factor_count = end
                return factors
        computed = generator.key_factor(self.tokens[:, :end])
        factors = computed.new_empty((computed.shape[0], self.tokens.shape[-2], computed.shape[-1]))
        factors[:, :end].copy_(computed)
        self.factors, self.factor_count, self.weights, self.state = factors, end, weights, state
        return factors


def _fits(buffer: torch.Tensor, rows: torch.Tensor, end: int) -> bool:
    """Whether `rows` can be written into `buffer` up to row `end` (same batch, width, dtype,
    device, and in inference mode exactly when the buffer is an inference tensor)."""
    return (
        buffer.shape[-2] >= end
        and buffer.shape[0] == rows.shape[0]
        and buffer.shape[-1] == rows.shape[-1]
        and buffer.dtype == rows.dtype
        and buffer.device == rows.device
        and buffer.is_inference() == torch.is_inference_mode_enabled()
    )


class Stash:
    """Per-thread stack of `Call`s of one module, and a `KeySlot` per layer of each KV cache
    it has seen (for generators that read key tokens); never pickled or copied."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._slots: weakref.WeakKeyDictionary[Any, dict[int, KeySlot]] = weakref.WeakKeyDictionary()

    def key_tokens(
        self, layer: CachedLayer, x: torch.Tensor, path: str, generator: LowRankGenerator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer inputs of positions `layer.offset...` (all of them for a layer that reuses
        another layer's keys): the kept ones, then `x`; and, given the lowrank `generator`
        and outside autograd, their key factor B (else None)."""
        per_layer = self._slots.get(layer.cache)
        if per_layer is None:
            per_layer = self._slots[layer.cache] = {}
        slot = per_layer.get(layer.index)
        count = 0 if slot is None or not layer.past else slot.count
        if count < layer.past:
            raise UnsupportedModuleError(
                f"{path!r}: generator='lowrank' reads the key tokens, but the KV cache holds "
                f"{layer.past} positions of which LCAAM saw {count} (a cache filled before "
                f"lcaam_patch.apply or elsewhere); start from an empty cache, or use generator='mlp'"
            )
        if slot is None:
            slot = per_layer[layer.index] = KeySlot()
        elif layer.past and slot.tokens is not None and slot.tokens.shape[0] != x.shape[0]:
            raise UnsupportedModuleError(
                f"{path!r}: generator='lowrank' reads the key tokens, but the KV cache's batch changed "
                f"from {slot.tokens.shape[0]} to {x.shape[0]} (reordered or expanded), which LCAAM "
                f"cannot follow; start from an empty cache, or use generator='mlp'"
            )
        start, end = layer.offset or 0, layer.past + x.shape[-2]
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            kept = slot.tokens
            tokens = x if kept is None or not layer.past else torch.cat([kept[:, : layer.past], x], dim=-2)
            slot.keep(tokens)
            return tokens[:, start:], None
        tokens = slot.append(x, layer.past)
        if generator is None:
            return tokens[:, start:end], None
        return tokens[:, start:end], slot.key_factor(generator, x, layer.past)[:, start:end]

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
    """What `restore` needs and the attention function reads.

    `implementation_internal` is the original config's `_attn_implementation_internal` at
    `apply`, which the forward compares first (a switch shows there); `weights_optional` says
    whether every transformers model in the tree runs under `sdpa`, whose attention returns no
    weights, so that its code never needs them unless they are recorded (`weights_wanted`).
    """

    original_config: Any
    implementation: str
    root: nn.Module
    stash: Stash = dataclasses.field(default_factory=Stash)
    implementation_internal: Any = None
    weights_optional: bool = False


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
