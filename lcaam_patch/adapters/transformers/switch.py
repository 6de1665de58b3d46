"""The guard against `set_attn_implementation` on a model carrying LCAAM."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ...errors import UnsupportedModuleError

SWITCH = "set_attn_implementation"


def is_guard(value: object) -> bool:
    """Whether `value` is the guard `prepare` installed as `set_attn_implementation`."""
    return isinstance(value, functools.partial) and value.func is refuse_switch


def refuse_switch(model: nn.Module, attn_implementation: Any, *args: Any, **kwargs: Any) -> Any:
    """`set_attn_implementation` of a model carrying LCAAM: the same implementation passes,
    another one is refused."""
    config: Any = model.config
    current = config._attn_implementation
    if attn_implementation == current:
        return getattr(type(model), SWITCH)(model, attn_implementation, *args, **kwargs)
    raise UnsupportedModuleError(
        f"{type(model).__name__} carries LCAAM, applied under attn_implementation={current!r}, whose "
        f"masks it reads; call lcaam_patch.remove(model) before set_attn_implementation("
        f"{attn_implementation!r}), then apply again ('eager' or 'sdpa')"
    )
