"""Attention backends: one call object (`AttentionCall`), one protocol, one dispatch.

The built-in backends and their priorities for `backend="auto"` are listed in
`BUILTIN_BACKENDS`, the one priority table; `register_backend` adds more.
"""

from __future__ import annotations

from .call import NEUTRAL, AttentionBackend, AttentionCall, AttentionResult, CallSpec, LowRankMask, SpecRefusal
from .dispatch import (
    backend_names,
    choose,
    get_backend,
    lcaam_attention,
    refusal,
    refusal_for,
    register_backend,
    run,
    unregister_backend,
)
from .eager import EagerBackend
from .flex import FlexBackend
from .lowrank_sdpa import LowRankSDPABackend
from .sdpa import SDPABackend
from .triton import TritonBackend

BUILTIN_BACKENDS: tuple[tuple[str, AttentionBackend, int], ...] = (
    ("lowrank_sdpa", LowRankSDPABackend(), 40),
    ("triton", TritonBackend(), 30),
    ("flex", FlexBackend(), 20),
    ("sdpa", SDPABackend(), 10),
    ("eager", EagerBackend(), 0),
)

for _name, _backend, _priority in BUILTIN_BACKENDS:
    register_backend(_name, _backend, _priority)

__all__ = [
    "BUILTIN_BACKENDS",
    "NEUTRAL",
    "AttentionBackend",
    "AttentionCall",
    "AttentionResult",
    "CallSpec",
    "LowRankMask",
    "SpecRefusal",
    "backend_names",
    "choose",
    "get_backend",
    "lcaam_attention",
    "refusal",
    "refusal_for",
    "register_backend",
    "run",
    "unregister_backend",
]
