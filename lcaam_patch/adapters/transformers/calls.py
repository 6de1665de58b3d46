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
    """Instead of `kv_tokens` (then None), the lowrank generator's key factor B of those
    tokens, row for row, where the stash keeps B per position."""

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
    generator's key factor B of each.

    Nothing here is written in place: the inputs are kept as the pieces the calls brought
    (joined when read, and every `_MAX_PIECES` calls), and B grows by concatenation, so what
    an earlier call was handed never changes. Outside autograd and `torch.compile`, B's rows
    are computed once per position and kept while the generator's key weights stay the same
    objects at the same `_version` (an optimizer step or a load moves it); else B is
    recomputed over every kept input. Inside autograd the inputs are joined per call and B
    is the generator's own, so gradients are exact.
    """

    def __init__(self) -> None:
        self.pieces: list[torch.Tensor] = []
        self._count = 0
        self.factors: torch.Tensor | None = None
        self.weights: tuple[torch.Tensor, ...] = ()
        self.state: tuple[int, ...] = ()
        self.cache_keys: weakref.ref[torch.Tensor] | None = None
        """The cache layer's keys tensor as the last call's update left it (outside
        `torch.compile`): a different one at the next call means the rows were reordered."""

    def __getstate__(self) -> dict[str, Any]:
        """Picklable with the cache that holds it (`torch.save(cache)`): the weak reference to
        the cache's keys is dropped."""
        return {**self.__dict__, "cache_keys": None}

    def updated(self, layer: CachedLayer) -> None:
        """Note the keys tensor the call's cache update left in `layer` (outside
        `torch.compile`), which the next call of this slot expects to find there."""
        keys = _layer_keys(layer)
        if keys is not None and not torch.compiler.is_compiling():
            self.cache_keys = weakref.ref(keys)

    @property
    def count(self) -> int:
        """How many positions the kept inputs cover. Under `torch.compile` it is read off the
        kept tensors' lengths, which the compiler treats as dynamic after one recompile: an
        int attribute would be a constant of the graph, recompiled at every decoding step."""
        if torch.compiler.is_compiling():
            return sum(piece.shape[-2] for piece in self.pieces)
        return self._count

    @property
    def batch(self) -> int | None:
        """The batch size of the kept inputs (None before the first)."""
        return self.pieces[0].shape[0] if self.pieces else None

    def kept(self, past: int) -> torch.Tensor | None:
        """The inputs of positions `0...past`, as one tensor (None for none)."""
        if not past:
            self.pieces, self._count = [], 0
            return None
        if len(self.pieces) > 1 or self.count != past:
            joined = self.pieces[0] if len(self.pieces) == 1 else torch.cat(self.pieces, dim=-2)
            self.pieces, self._count = [joined[:, :past]], past
        return self.pieces[0]

    def concatenate(self, x: torch.Tensor, past: int) -> torch.Tensor:
        """The inputs of positions `0...past` followed by `x`, as one new tensor, kept as
        such; B is forgotten (autograd or `torch.compile`: nothing kept across calls)."""
        kept = self.kept(past)
        tokens = x if kept is None else torch.cat([kept, x], dim=-2)
        self.pieces, self._count, self.factors = [tokens], tokens.shape[-2], None
        return tokens

    def key_factor(self, generator: LowRankGenerator, x: torch.Tensor, past: int) -> torch.Tensor:
        """B of positions `0...past` followed by `x`, whose inputs it keeps; the kept rows are
        reused while the key weights are unchanged."""
        factors = self.factors
        if self.count > past:
            self.kept(past)
            factors = None if factors is None else factors[:, :past]
        self.pieces.append(x)
        self._count = past + x.shape[-2]
        if len(self.pieces) > _MAX_PIECES:
            self.kept(self.count)
        weights = generator.key_weights()
        # the kept `weights` hold those tensors alive, so an id here is never a reused one
        state = tuple([value for w in weights for value in (id(w), w._version)])
        if factors is not None and state == self.state and factors.shape[-2] == past:
            new = generator.key_factor(x)
            if new.dtype == factors.dtype:
                self.factors = torch.cat([factors, new], dim=-2)
                return self.factors
        kept = self.kept(self.count)
        assert kept is not None
        self.factors, self.weights, self.state = generator.key_factor(kept), weights, state
        return self.factors


def _layer_keys(layer: CachedLayer) -> torch.Tensor | None:
    """The keys tensor of the cache layer (None for a layer that keeps none)."""
    layers = getattr(layer.cache, "layers", ())
    keys = getattr(layers[layer.index], "keys", None) if layer.index < len(layers) else None
    return keys if isinstance(keys, torch.Tensor) else None


def _replaced(slot: KeySlot, layer: CachedLayer) -> bool:
    """Whether the cache layer holds another keys tensor than the last update left there
    (never known under `torch.compile`)."""
    if slot.cache_keys is None or torch.compiler.is_compiling():
        return False
    return _layer_keys(layer) is not slot.cache_keys()


_MAX_PIECES = 64
"""Kept inputs are joined into one tensor once a slot holds more pieces than this."""


_SLOTS_ATTR = "_lcaam_key_slots"
"""The attribute of a KV cache holding each stash's `KeySlot`s by layer index: they live and
die with the cache, and `torch.compile` sees a fresh cache as the same kind of object, not as
another key of a dict of caches (which it guards by identity: a recompile per `generate`)."""


def _cache_slots(cache: Any, stash: Stash) -> dict[int, KeySlot]:
    """The `KeySlot`s `stash` keeps on `cache`, by layer index (made on first use)."""
    kept: dict[Stash, dict[int, KeySlot]] | None = getattr(cache, _SLOTS_ATTR, None)
    if kept is None:
        kept = {}
        setattr(cache, _SLOTS_ATTR, kept)
    slots = kept.get(stash)
    if slots is None:
        slots = kept[stash] = {}
    return slots


class Stash:
    """Per-thread stack of `Call`s of one module, and the way to its `KeySlot` in each KV
    cache it meets (for generators that read key tokens); never pickled or copied."""

    def __init__(self) -> None:
        self._local = threading.local()

    def key_tokens(
        self, layer: CachedLayer, x: torch.Tensor, path: str, generator: LowRankGenerator | None = None
    ) -> tuple[KeySlot, torch.Tensor | None, torch.Tensor | None]:
        """For the positions `layer.offset...` (all of them for a layer that reuses another
        layer's keys), the kept layer inputs then `x`, or, given the lowrank `generator` and
        outside autograd and `torch.compile`, their key factor B instead: (slot, tokens, None)
        or (slot, None, B), where `slot` keeps them (its `updated` follows the cache update)."""
        per_layer = _cache_slots(layer.cache, self)
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
        elif layer.past and slot.batch != x.shape[0]:
            raise UnsupportedModuleError(
                f"{path!r}: generator='lowrank' reads the key tokens, but the KV cache's batch changed "
                f"from {slot.batch} to {x.shape[0]} (reordered or expanded), which LCAAM cannot "
                f"follow; start from an empty cache, or use generator='mlp'"
            )
        elif layer.past and slot.count == layer.past and _replaced(slot, layer):
            raise UnsupportedModuleError(
                f"{path!r}: generator='lowrank' reads the key tokens, but the KV cache's rows were "
                f"reordered or moved since the last call (beam search's reorder_cache, offloading), "
                f"and the layer inputs LCAAM keeps would belong to other rows; generate with "
                f"num_beams=1, or use generator='mlp'"
            )
        start = layer.offset or 0
        if generator is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return slot, slot.concatenate(x, layer.past)[:, start:], None
        factors = slot.key_factor(generator, x, layer.past)
        return slot, None, factors[:, start:] if start else factors

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
