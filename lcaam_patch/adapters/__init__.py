"""Adapters: one module per upstream attention implementation, registered on import.

`base.Adapter` is what an adapter implements; `registry` holds the registered adapters,
their presets and the third-party entry points.
"""

from __future__ import annotations

from . import llama_adapter, qd_detr, sdpa, swinbert, timm, torch_mha, transformers
from .base import Adapter
from .registry import (
    ENTRY_POINT_GROUP,
    get_adapter,
    get_preset,
    preset_adapter,
    presets,
    register_adapter,
    registered_adapters,
    unregister_adapter,
)

BUILTIN_ADAPTERS: tuple[Adapter, ...] = (
    timm.adapter,
    torch_mha.adapter,
    qd_detr.adapter,
    swinbert.adapter,
    llama_adapter.adapter,
    transformers.adapter,
    transformers.pooling_head_adapter,
    transformers.legacy_adapter,
    sdpa.adapter,
)

for _adapter in BUILTIN_ADAPTERS:
    register_adapter(_adapter)

__all__ = [
    "BUILTIN_ADAPTERS",
    "ENTRY_POINT_GROUP",
    "Adapter",
    "get_adapter",
    "get_preset",
    "preset_adapter",
    "presets",
    "register_adapter",
    "registered_adapters",
    "unregister_adapter",
]
