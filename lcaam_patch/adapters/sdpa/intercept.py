"""The patched forward's interception: a `TorchFunctionMode`, entered only while one patched
module's forward runs, that computes that forward's one SDPA call with LCAAM.

Calls made while a child module runs (hooks on every descendant count them) go to the
original SDPA, or to the child's own interception when the child is patched; LCAAM's own
computation runs with torch functions disabled, so no enclosing site catches it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ...backends import AttentionCall, LowRankMask, masking, run
from ...errors import UnsupportedModuleError
from ...site import LCAAMSite
from ...verification import needs_verification, verify_first_call
from .probe import SDPA, Key

_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclasses.dataclass
class Expected:
    """What `apply` saw of a site's call: the input read as X, the argument holding the
    key tokens (None: X, self-attention), and the SDPA call's heads and head width."""

    x_key: Key
    kv_key: Key | None
    width: int
    heads: int
    head_dim: int


@dataclasses.dataclass
class Forward:
    """One forward of a patched module: its X, its key tokens, the SDPA calls it made, and
    how many of its descendants are running now."""

    x: torch.Tensor
    kv_tokens: torch.Tensor | None
    calls: int = 0
    depth: int = 0


@dataclasses.dataclass
class State:
    """A site's adapter state: what `apply` saw, the class's own forward (read once: Dynamo
    does not trace attribute reads on classes marked allow-in-graph, as diffusers marks its
    `Attention`), and the forwards running now."""

    expected: Expected
    forward: Callable[..., Any]
    forwards: list[Forward] = dataclasses.field(default_factory=list)


def enter_child(state: State, module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook of a patched module's descendants: a child is running."""
    if state.forwards:
        state.forwards[-1].depth += 1


def leave_child(state: State, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """Forward hook (always called) of a patched module's descendants: the child is done."""
    if state.forwards:
        state.forwards[-1].depth -= 1


class Intercept(TorchFunctionMode):
    """Computes the SDPA call of one forward of `module` with LCAAM."""

    def __init__(self, module: nn.Module, site: LCAAMSite, forward: Forward) -> None:
        super().__init__()
        self.module, self.site, self.forward = module, site, forward

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is not SDPA or self.forward.depth:
            return func(*args, **kwargs)
        arguments = dict(zip(_SDPA_PARAMETERS, args))
        arguments.update(kwargs)
        with torch._C.DisableTorchFunction():
            return attend(self.module, self.site, self.forward, **arguments)


def attend(
    module: nn.Module,
    site: LCAAMSite,
    forward: Forward,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(query, key, value, ...)` with LCAAM's mask fused in,
    for the forward `forward` of `module`; checked against the original at the first call."""
    name = type(module).__name__
    forward.calls += 1
    if forward.calls > 1:
        raise UnsupportedModuleError(
            f"{name} at {site.path!r} called scaled_dot_product_attention a second time in one forward; "
            f"LCAAM places one mask per forward and apply saw one call. Exclude it with "
            f"exclude=[{site.path!r}], or write an adapter for it (docs/adapters.md)"
        )
    _check_shapes(site, name, forward.x, query, key)
    given_key, given_value, given_mask = key, value, attn_mask
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
    attn_mask, dead_rows = masking.finite_hard_mask(attn_mask)
    num_queries, num_keys = query.shape[-2], key.shape[-2]
    kv_tokens = forward.kv_tokens
    lowrank = site.config is not None and site.config.generator == "lowrank"
    if lowrank and kv_tokens is None and num_keys != num_queries:
        raise UnsupportedModuleError(
            f"{name} at {site.path!r} attends {num_queries} queries to {num_keys} keys, but apply saw no "
            f"input holding its key tokens, which generator='lowrank' reads; pass example_inputs=(...) "
            f"to apply with the key tokens as they are given at run time, or use generator='mlp'"
        )
    mask = site.mask(module, forward.x, num_keys, kv_tokens)
    scaling = scale if scale is not None else query.shape[-1] ** -0.5

    def compute(m: torch.Tensor | LowRankMask, p: float) -> torch.Tensor:
        call = AttentionCall(
            query,
            key,
            value,
            m,
            fusion=site.fusion,
            scale=scaling,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=p,
        )
        out = (site.run(call) if m is mask else run(call, site.backend)).output
        if dead_rows is not None:
            out = masking.uniform_dead_rows(out, None, value, dead_rows)[0]
        return out

    output = compute(mask, dropout_p)
    if needs_verification(site, query):
        probe = AttentionCall(
            query, key, value, mask, fusion=site.fusion, scale=scaling, attn_mask=attn_mask, is_causal=is_causal
        )
        attended = masking.upstream_mask(probe).full_keep()
        if site.fusion == "mul":  # where QKᵀ is 0 (keys still at zero init), no M can change it
            moves = (query @ key.transpose(-2, -1)) != 0
            attended = moves if attended is None else attended & moves
        verify_first_call(
            site,
            name,
            compute=lambda m: compute(m, 0.0),
            reference=lambda: SDPA(
                query,
                given_key,
                given_value,
                attn_mask=given_mask,
                dropout_p=0.0,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            ),
            mask_shape=(query.shape[0], num_queries, num_keys),
            attended=attended,
        )
    return output


def _check_shapes(site: LCAAMSite, name: str, x: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> None:
    """The call must look as it did when `apply` probed it: q (B, H, Nq, D) of X (B, Nq, C)."""
    expected: Expected = site.adapter_state.expected
    lines_up = (
        query.dim() == 4
        and key.dim() == 4
        and x.dim() == 3
        and x.shape[0] == query.shape[0]
        and x.shape[1] == query.shape[2]
        and x.shape[2] == expected.width
        and query.shape[1] == expected.heads
        and query.shape[3] == expected.head_dim
    )
    if not lines_up:
        raise UnsupportedModuleError(
            f"{name} at {site.path!r} called scaled_dot_product_attention with q of shape {tuple(query.shape)} "
            f"for an input X of shape {tuple(x.shape)}; apply saw q (B, {expected.heads}, N, {expected.head_dim}) "
            f"for X (B, N, {expected.width}), so LCAAM's mask cannot be placed on this call. Apply with "
            f"example_inputs=(...) shaped like this call, or exclude it with exclude=[{site.path!r}]"
        )
