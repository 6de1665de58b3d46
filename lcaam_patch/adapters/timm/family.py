"""What the timm adapter knows of one family of timm attention classes, and helpers
the families share."""

from __future__ import annotations

import abc
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...site import LCAAMSite

Location = tuple[str, str]
"""(module name, class name) where timm defines an attention class."""


def imported(locations: tuple[Location, ...]) -> tuple[type[nn.Module], ...]:
    """The classes at `locations` among the timm modules already imported."""
    found: list[type[nn.Module]] = []
    for module_name, attr in locations:
        cls = getattr(sys.modules.get(module_name), attr, None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def home(module: nn.Module) -> Any:
    """The timm module that defines the class of `module` (for the helpers its forward calls)."""
    return sys.modules[type(module).__module__]


def bind(names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The values of the forward arguments `names` (after x), None (False for is_causal) when absent."""
    values: dict[str, Any] = dict(zip(names, args))
    values.update(kwargs)
    return [values.get(name, False if name == "is_causal" else None) for name in names]


def dropout_p(module: Any) -> float:
    """The attention dropout of `module` in its current mode."""
    attn_drop = getattr(module, "attn_drop", None)
    return float(attn_drop.p) if module.training and isinstance(attn_drop, nn.Dropout) else 0.0


def fused_qkv(module: Any, x: torch.Tensor) -> torch.Tensor:
    """The output of `module.qkv` with timm's separate q/k/v biases where the module has them."""
    q_bias = getattr(module, "q_bias", None)
    if q_bias is None:
        out: torch.Tensor = module.qkv(x)
        return out
    bias = torch.cat((q_bias, module.k_bias, module.v_bias))
    if getattr(module, "qkv_bias_separate", False):
        out = module.qkv(x) + bias
        return out
    return F.linear(x, weight=module.qkv.weight, bias=bias)


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3·H·D) → q, k, v of shape (B, H, N, D)."""
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


class Family(abc.ABC):
    """One family of timm attention classes: where they live, their widths, their token
    counts for a given input, and their forward with LCAAM.

    `kind` is "self" (queries are the key tokens) or "cross" (queries are a subset of the
    tokens, or learned latents).
    """

    locations: tuple[Location, ...] = ()
    kind: str = "self"

    def types(self) -> tuple[type[nn.Module], ...]:
        """The family's classes among the timm modules already imported."""
        return imported(self.locations)

    def embed_dim(self, module: Any) -> int:
        """Width of the query tokens the generator reads (default: the qkv input)."""
        qkv: Any = module.qkv
        return int(qkv.in_features)

    def kv_embed_dim(self, module: Any) -> int | None:
        """Width of the key tokens, None when it equals `embed_dim`."""
        return None

    def static_tokens(self, module: Any, root: nn.Module) -> tuple[int, int] | None:
        """(Nq, Nk) read off the module or its model without a forward, or None."""
        return None

    @abc.abstractmethod
    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """(Nq, Nk) of one call of `module` with these forward arguments (its x first)."""

    @abc.abstractmethod
    def forward(self, module: Any, site: LCAAMSite, *args: Any, **kwargs: Any) -> Any:
        """timm's forward of `module` with `site.attend` inside."""


def first(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The input tensor of a forward call (its first argument, or `x`)."""
    x = args[0] if args else kwargs["x"]
    assert isinstance(x, torch.Tensor)
    return x


class SequenceFamily(Family):
    """Self-attention over the tokens of x (B, N, C): Nq = Nk = N."""

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """Nq = Nk = the token count of x."""
        n = first(args, kwargs).shape[-2]
        return n, n
