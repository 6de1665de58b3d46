"""Multi-query attention over feature maps, `layers.attention2d.MultiQueryAttention2d` (the
MobileNetV4 hybrids, MobileNetV5): per-head queries, one key and one value head shared by
all, both optionally downsampled by a strided depthwise conv and a norm, the queries
optionally average-pooled and normed (then upsampled back after the attention).

The generator reads the query path's input to its projection (x, or x pooled and normed),
a lowrank one the key path's (x, or x downsampled and normed); the model's `attn_mask` is
added after fusion.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...site import LCAAMSite
from .family import Family, dropout_p, first


def _features(path: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The input of the path's last layer (its 1×1 projection): x after pooling and norm."""
    for layer in list(path)[:-1]:
        x = layer(x)
    return x


class MultiQueryFamily(Family):
    """`MultiQueryAttention2d`: (strided) queries attend to (downsampled) shared keys."""

    locations = (("timm.layers.attention2d", "MultiQueryAttention2d"),)
    kind = "cross"

    def embed_dim(self, module: Any) -> int:
        """The input channels of the query projection."""
        proj: Any = module.query.proj
        return int(proj.in_channels)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """The positions of the query and the key paths' maps."""
        x = first(args, kwargs)
        return _features(module.query, x)[0, 0].numel(), _features(module.key, x)[0, 0].numel()

    def forward(
        self, module: Any, site: LCAAMSite, x: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """MultiQueryAttention2d's forward with LCAAM attention; k and v are expanded to the heads."""
        B, _C, H, W = x.shape
        heads = module.num_heads
        queries, keys = _features(module.query, x), _features(module.key, x)
        q = module.query.proj(queries).reshape(B, heads, module.key_dim, -1).transpose(-1, -2)
        k = module.key.proj(keys).flatten(2).transpose(1, 2).unsqueeze(1).expand(-1, heads, -1, -1)
        v = module.value(x).flatten(2).transpose(1, 2).unsqueeze(1).expand(-1, heads, -1, -1)
        out, _ = site.attend(
            module,
            queries.flatten(2).transpose(1, 2),
            q,
            k,
            v,
            scale=module.scale,
            attn_mask=attn_mask,
            dropout_p=dropout_p(module),
            kv_tokens=keys.flatten(2).transpose(1, 2),
        )
        strides = module.query_strides
        out = out.transpose(1, 2).reshape(B, H // strides[0], W // strides[1], -1).permute(0, 3, 1, 2)
        result: torch.Tensor = module.output(out.contiguous())
        return result
