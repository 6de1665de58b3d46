"""The guards against switches that would take LCAAM out of a patched model:
`set_attn_implementation`, and BigBird's `set_attention_type`, which puts a new attention
module in place of the patched one."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ...errors import UnsupportedModuleError
from ...site import SITE_ATTR

SWITCH = "set_attn_implementation"
ATTENTION_TYPE = "set_attention_type"


def is_guard(value: object) -> bool:
    """Whether `value` is a guard `guard` installed (`set_attn_implementation` or
    `set_attention_type`)."""
    return isinstance(value, functools.partial) and value.func in (refuse_switch, refuse_attention_type)


def guard(holder: nn.Module, name: str) -> None:
    """Install the guard of switch `name` (`SWITCH` or `ATTENTION_TYPE`) on `holder`, once."""
    if not is_guard(vars(holder).get(name)):
        refusal = refuse_switch if name == SWITCH else refuse_attention_type
        setattr(holder, name, functools.partial(refusal, holder))


def drop_guards(root: nn.Module) -> None:
    """Remove every guard in `root` once no site is left in it, whichever adapter installed
    them and whichever site was restored last."""
    if any(hasattr(m, SITE_ATTR) for m in root.modules()):
        return
    for holder in root.modules():
        for name in (SWITCH, ATTENTION_TYPE):
            if is_guard(vars(holder).get(name)):
                delattr(holder, name)


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


def refuse_attention_type(holder: nn.Module, value: Any, *args: Any, **kwargs: Any) -> Any:
    """`set_attention_type` of a module above a patched attention (BigBird's model, encoder,
    layers, attention): the current type passes, another one is refused."""
    current = getattr(holder, "attention_type", None)
    if value == current:
        return getattr(type(holder), ATTENTION_TYPE)(holder, value, *args, **kwargs)
    raise UnsupportedModuleError(
        f"{type(holder).__name__} holds an attention LCAAM patched under attention_type={current!r}; "
        f"set_attention_type({value!r}) would put an unpatched attention module in its place. Call "
        f"lcaam_patch.remove(model) first, switch, then apply again (a 'block_sparse' attention is "
        f"not claimed)"
    )
