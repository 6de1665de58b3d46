"""MViTv2's pooling attention, `mvitv2.MultiScaleAttention`: q, k and v are pooled (a
depthwise conv per head and a norm, or max/avg pooling) over the (H, W) grid of the tokens,
the class token (if any) kept apart, so queries at the q stride attend to keys at the kv
stride.

timm's pooling keeps a kernel's centre positions (padding kernel // 2), so the generator reads
the input tokens at the q stride, as LeViT's subsampled queries; a lowrank generator reads
them at the kv stride. The decomposed relative position logits are added after fusion, and
the residual pooling (+ the pooled q) after the attention.
"""

from __future__ import annotations

from typing import Any

import torch

from ...site import LCAAMSite
from .family import Family, first, home


def _stride(pool: Any) -> tuple[int, int]:
    """The (h, w) stride of a pooling layer, (1, 1) for none."""
    stride = getattr(pool, "stride", 1)
    return (stride, stride) if isinstance(stride, int) else (int(stride[0]), int(stride[1]))


def _strided(x: torch.Tensor, feat_size: Any, stride: tuple[int, int], cls_token: bool) -> torch.Tensor:
    """The tokens of x (B, N, C) at `stride` on its (H, W) grid, the class token first."""
    B, _N, C = x.shape
    H, W = feat_size
    head, grid = (x[:, :1], x[:, 1:]) if cls_token else (x[:, :0], x)
    grid = grid.reshape(B, H, W, C)[:, :: stride[0], :: stride[1]].reshape(B, -1, C)
    return torch.cat((head, grid), dim=1)


def _pooled(module: Any, t: torch.Tensor, feat_size: Any, pool: Any, norm: Any) -> tuple[torch.Tensor, list[int]]:
    """timm's pooling (and norm) of one of q, k, v (B, heads, N, head_dim), and its grid size."""
    size = list(feat_size)
    if pool is not None:
        grid, cls_token = home(module).reshape_pre_pool(t, feat_size, module.has_cls_token)
        t, size = home(module).reshape_post_pool(pool(grid), module.num_heads, cls_token)
    if norm is not None:
        t = norm(t)
    return t, size


class MultiScaleAttentionFamily(Family):
    """`mvitv2.MultiScaleAttention`: pooled queries attend to pooled keys."""

    locations = (("timm.models.mvitv2", "MultiScaleAttention"),)
    kind = "cross"

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """The input tokens at the q stride and at the kv stride."""
        x = first(args, kwargs)
        feat_size = args[1] if len(args) > 1 else kwargs["feat_size"]
        cls_token = module.has_cls_token
        nq = _strided(x, feat_size, _stride(module.pool_q), cls_token).shape[1]
        return nq, _strided(x, feat_size, _stride(module.pool_k), cls_token).shape[1]

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor, feat_size: Any) -> tuple[torch.Tensor, list[int]]:
        """MultiScaleAttention's forward with LCAAM attention."""
        B, N, _ = x.shape
        q, k, v = module.qkv(x).reshape(B, N, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(dim=0)
        q, q_size = _pooled(module, q, feat_size, module.pool_q, module.norm_q)
        k, k_size = _pooled(module, k, feat_size, module.pool_k, module.norm_k)
        v, _ = _pooled(module, v, feat_size, module.pool_v, module.norm_v)
        queries = _strided(x, feat_size, _stride(module.pool_q), module.has_cls_token)
        keys = _strided(x, feat_size, _stride(module.pool_k), module.has_cls_token)
        assert queries.shape[1] == q.shape[2] and keys.shape[1] == k.shape[2], "pooling keeps the centre positions"
        bias = None
        if module.rel_pos_type == "spatial":
            zeros = q.new_zeros(B, module.num_heads, q.shape[2], k.shape[2])
            bias = home(module).cal_rel_pos_type(
                zeros, q, module.has_cls_token, q_size, k_size, module.rel_pos_h, module.rel_pos_w
            )
        out, _ = site.attend(module, queries, q, k, v, scale=module.scale, attn_mask=bias, kv_tokens=keys)
        if module.residual_pooling:
            out = out + q
        return module.proj(out.transpose(1, 2).reshape(B, -1, module.dim_out)), q_size
