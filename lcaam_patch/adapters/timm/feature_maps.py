"""Attention over feature maps and mask units: MaxViT/CoAtNet (`maxxvit.Attention2d` over
(B, C, H, W), `maxxvit.AttentionCl` over (B, ..., C)) and Hiera's `MaskUnitAttention`.

MaxViT folds its block and grid partitions into the batch, so each call is one window
(Nq = Nk = its positions); the relative position bias (own or shared) is added after fusion.
Hiera attends within mask units (or globally) and may max-pool its queries by `q_stride`;
the generator reads the input tokens pooled the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...site import LCAAMSite
from .family import Family, dropout_p, first


def _rel_pos_bias(module: Any, shared_rel_pos: torch.Tensor | None) -> torch.Tensor | None:
    rel_pos: Any = module.rel_pos
    return rel_pos.get_bias() if rel_pos is not None else shared_rel_pos


class Attention2dFamily(Family):
    """`maxxvit.Attention2d`: NCHW maps, 1×1-conv qkv."""

    locations = (("timm.models.maxxvit", "Attention2d"),)

    def embed_dim(self, module: Any) -> int:
        """The input channels of the qkv conv."""
        qkv: Any = module.qkv
        return int(qkv.in_channels)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """Every position of the map."""
        x = first(args, kwargs)
        n = x.shape[-2] * x.shape[-1]
        return n, n

    def forward(
        self, module: Any, site: LCAAMSite, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention2d's forward with LCAAM attention."""
        B, _C, H, W = x.shape
        heads, head_dim = module.num_heads, module.dim_head
        if module.head_first:
            q, k, v = module.qkv(x).view(B, heads, head_dim * 3, -1).chunk(3, dim=2)
        else:
            q, k, v = module.qkv(x).reshape(B, 3, heads, head_dim, -1).unbind(1)
        tokens = x.flatten(2).transpose(1, 2)
        out, _ = site.attend(
            module,
            tokens,
            q.transpose(-1, -2),
            k.transpose(-1, -2),
            v.transpose(-1, -2),
            scale=module.scale,
            attn_mask=_rel_pos_bias(module, shared_rel_pos),
            dropout_p=dropout_p(module),
        )
        out = out.transpose(-1, -2).reshape(B, -1, H, W)
        return module.proj_drop(module.proj(out))


class AttentionClFamily(Family):
    """`maxxvit.AttentionCl`: channels-last (B, ..., C) windows."""

    locations = (("timm.models.maxxvit", "AttentionCl"),)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """Every position between the batch and the channels."""
        n = math.prod(first(args, kwargs).shape[1:-1])
        return n, n

    def forward(
        self, module: Any, site: LCAAMSite, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """AttentionCl's forward with LCAAM attention."""
        B = x.shape[0]
        restore_shape = x.shape[:-1]
        heads, head_dim = module.num_heads, module.dim_head
        if module.head_first:
            q, k, v = module.qkv(x).view(B, -1, heads, head_dim * 3).transpose(1, 2).chunk(3, dim=3)
        else:
            q, k, v = module.qkv(x).reshape(B, -1, 3, heads, head_dim).transpose(1, 3).unbind(2)
        tokens = x.reshape(B, -1, x.shape[-1])
        out, _ = site.attend(
            module,
            tokens,
            q,
            k,
            v,
            scale=module.scale,
            attn_mask=_rel_pos_bias(module, shared_rel_pos),
            dropout_p=dropout_p(module),
        )
        out = out.transpose(1, 2).reshape((*restore_shape, -1))
        return module.proj_drop(module.proj(out))


class HieraFamily(Family):
    """Hiera's `MaskUnitAttention`: mask-unit (windowed) or global attention, q pooling."""

    locations = (("timm.models.hiera", "MaskUnitAttention"),)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """Pooled queries and keys of one mask unit (of the whole sequence when global)."""
        n = first(args, kwargs).shape[1]
        keys = n // self._windows(module, n)
        return keys // module.q_stride, keys

    @staticmethod
    def _windows(module: Any, n: int) -> int:
        if not module.use_mask_unit_attn:
            return 1
        return int(n // (module.q_stride * module.window_size))

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """MaskUnitAttention's forward with LCAAM attention; global attention is one unit."""
        B, N, C = x.shape
        heads, head_dim, stride = module.heads, module.head_dim, module.q_stride
        windows = self._windows(module, N)
        qkv = module.qkv(x).reshape(B, -1, windows, 3, heads, head_dim).permute(3, 0, 4, 2, 1, 5)
        q, k, v = qkv.unbind(0)  # (B, heads, windows, tokens, head_dim)
        tokens = x.reshape(B, -1, windows, C).transpose(1, 2)  # (B, windows, tokens, C)
        if stride > 1:
            q = q.view(B, heads, windows, stride, -1, head_dim).amax(dim=3)
            tokens = tokens.reshape(B, windows, stride, -1, C).amax(dim=2)

        def fold(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2).reshape(B * windows, heads, -1, head_dim)

        out, _ = site.attend(module, tokens.reshape(B * windows, -1, C), fold(q), fold(k), fold(v), scale=module.scale)
        out = out.view(B, windows, heads, -1, head_dim).transpose(1, 2)
        return module.proj(out.transpose(1, 3).reshape(B, -1, module.dim_out))
