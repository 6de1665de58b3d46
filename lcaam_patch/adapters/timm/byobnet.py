"""Self-attention of ByobNet's attention blocks (HaloNet, BoTNet): `layers.halo_attn.HaloAttn`
and `layers.bottleneck_attn.BottleneckAttn`, both over (B, C, H, W) maps with 1×1-conv
projections and a relative position embedding of the queries, added after fusion (scaled
with the scores where `scale_pos_embed`).

HaloAttn attends from each query block to the block and its halo (zero-padded at the
border), the blocks folded into the batch (a mask per block); with stride 2 the queries
are the strided positions of the block. BottleneckAttn attends over the whole map.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...site import LCAAMSite
from .family import Family


def _position_bias(module: Any, q: torch.Tensor) -> torch.Tensor:
    """timm's position logits of q, with the scores' scale where timm scales them too."""
    bias: torch.Tensor = module.pos_embed(q)
    return bias * module.scale if module.scale_pos_embed else bias


class HaloFamily(Family):
    """`HaloAttn`: query blocks attend to their block and halo."""

    locations = (("timm.layers.halo_attn", "HaloAttn"),)
    kind = "cross"

    def embed_dim(self, module: Any) -> int:
        """The input channels of the q conv."""
        q: Any = module.q
        return int(q.in_channels)

    def static_tokens(self, module: Any, root: nn.Module) -> tuple[int, int] | None:
        """A query block's positions and its window's."""
        return self.tokens(module, (), {})

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """A query block's positions and its window's."""
        return int(module.block_size_ds) ** 2, int(module.win_size) ** 2

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """HaloAttn's forward with LCAAM attention."""
        B, C, H, W = x.shape
        heads, dqk, dv = module.num_heads, module.dim_head_qk, module.dim_head_v
        bs, bds, stride = module.block_size, module.block_size_ds, module.block_stride
        halo, win = module.halo_size, module.win_size
        assert H % bs == 0 and W % bs == 0, "HaloAttn needs the map to be a multiple of its block size"
        rows, cols = H // bs, W // bs
        blocks = rows * cols

        q = module.q(x).reshape(-1, dqk, rows, bds, cols, bds).permute(0, 1, 3, 5, 2, 4)
        q = q.reshape(B * heads, dqk, -1, blocks).transpose(1, 3)  # timm's (B·heads, blocks, bds², dqk)
        bias = _position_bias(module, q)
        kv = F.pad(module.kv(x), [halo, halo, halo, halo]).unfold(2, win, bs).unfold(3, win, bs)
        kv = kv.reshape(B * heads, dqk + dv, blocks, -1).permute(0, 2, 3, 1)
        k, v = torch.split(kv, [dqk, dv], dim=-1)

        queries = x[:, :, ::stride, ::stride].reshape(B, C, rows, bds, cols, bds).permute(0, 2, 4, 3, 5, 1)
        keys = F.pad(x, [halo, halo, halo, halo]).unfold(2, win, bs).unfold(3, win, bs)
        keys = keys.reshape(B, C, blocks, -1).permute(0, 2, 3, 1)

        def fold(t: torch.Tensor) -> torch.Tensor:
            """(B·heads, blocks, n, d) → (B·blocks, heads, n, d)."""
            return t.reshape(B, heads, blocks, *t.shape[2:]).transpose(1, 2).reshape(B * blocks, heads, *t.shape[2:])

        out, _ = site.attend(
            module,
            queries.reshape(B * blocks, bds * bds, C),
            fold(q),
            fold(k),
            fold(v),
            scale=module.scale,
            attn_mask=fold(bias),
            kv_tokens=keys.reshape(B * blocks, win * win, C),
        )
        out = out.reshape(B, blocks, heads, bds * bds, dv).transpose(1, 2).reshape(B * heads, blocks, bds * bds, dv)
        out = out.transpose(1, 3).reshape(-1, bds, bds, rows, cols)
        out = out.permute(0, 3, 1, 4, 2).contiguous().view(B, module.dim_out_v, H // stride, W // stride)
        result: torch.Tensor = module.pool(out)
        return result


class BottleneckFamily(Family):
    """`BottleneckAttn`: every position of a fixed-size map attends to every position."""

    locations = (("timm.layers.bottleneck_attn", "BottleneckAttn"),)

    def embed_dim(self, module: Any) -> int:
        """The input channels of the qkv conv."""
        qkv: Any = module.qkv
        return int(qkv.in_channels)

    def static_tokens(self, module: Any, root: nn.Module) -> tuple[int, int] | None:
        """The positions of the map size it was built for."""
        return self.tokens(module, (), {})

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """The positions of the map size it was built for (the only size it accepts)."""
        n = int(module.pos_embed.height * module.pos_embed.width)
        return n, n

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """BottleneckAttn's forward with LCAAM attention."""
        B, _C, H, W = x.shape
        assert (H, W) == (module.pos_embed.height, module.pos_embed.width), "BottleneckAttn has a fixed map size"
        heads, dqk, dv = module.num_heads, module.dim_head_qk, module.dim_head_v
        q, k, v = torch.split(module.qkv(x), [module.dim_out_qk, module.dim_out_qk, module.dim_out_v], dim=1)
        q = q.reshape(B * heads, dqk, -1).transpose(-1, -2)
        bias = _position_bias(module, q).view(B, heads, H * W, H * W)
        k = k.reshape(B, heads, dqk, -1).transpose(-1, -2)
        v = v.reshape(B, heads, dv, -1).transpose(-1, -2)
        tokens = x.flatten(2).transpose(1, 2)
        out, _ = site.attend(module, tokens, q.view(B, heads, H * W, dqk), k, v, scale=module.scale, attn_mask=bias)
        result: torch.Tensor = module.pool(out.transpose(-1, -2).reshape(B, module.dim_out_v, H, W))
        return result
