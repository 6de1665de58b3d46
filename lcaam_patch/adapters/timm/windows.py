"""Window attention: `swin_transformer.WindowAttention`, `swin_transformer_v2.WindowAttention`
and `davit.WindowAttention`.

Each call attends within windows that timm has folded into the batch, x (B·nW, N, C), so the
generator gives every window its own mask (Nq = Nk = the window's tokens). Swin's relative
position bias and its shift mask (0/-100 per window) are added after fusion; Swin v2's cosine
attention becomes q̂·k̂ᵀ with the per-head logit scale folded into q̂ and scale 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...site import LCAAMSite
from .family import SequenceFamily, dropout_p, fused_qkv, split_heads


def _window_tokens(module: Any) -> tuple[int, int]:
    window: Any = module.window_size
    n = math.prod(window) if isinstance(window, (tuple, list)) else int(window) ** 2
    return n, n


def _with_shift_mask(bias: torch.Tensor, mask: torch.Tensor | None, batch: int) -> torch.Tensor:
    """The (1, H, N, N) bias plus Swin's (nW, N, N) shift mask as a (B·nW, H, N, N) mask."""
    if mask is None:
        return bias
    num_windows, n, _ = mask.shape
    heads = bias.shape[1]
    combined = bias.unsqueeze(1) + mask.view(1, num_windows, 1, n, n).to(bias.dtype)
    return combined.expand(batch // num_windows, -1, -1, -1, -1).reshape(batch, heads, n, n)


class SwinFamily(SequenceFamily):
    """Swin v1 window attention with relative position bias and shift mask."""

    locations = (("timm.models.swin_transformer", "WindowAttention"),)

    def static_tokens(self, module: Any, root: nn.Module) -> tuple[int, int] | None:
        """The window's tokens."""
        return _window_tokens(module)

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Swin's forward with LCAAM attention."""
        B_, N, _ = x.shape
        q, k, v = split_heads(module.qkv(x), module.num_heads)
        bias = _with_shift_mask(module._get_rel_pos_bias(), mask, B_)
        out, _ = site.attend(module, x, q, k, v, scale=module.scale, attn_mask=bias, dropout_p=dropout_p(module))
        return module.proj_drop(module.proj(out.transpose(1, 2).reshape(B_, N, -1)))


class SwinV2Family(SequenceFamily):
    """Swin v2 window attention: cosine attention, continuous position bias, shift mask."""

    locations = (("timm.models.swin_transformer_v2", "WindowAttention"),)

    def static_tokens(self, module: Any, root: nn.Module) -> tuple[int, int] | None:
        """The window's tokens."""
        return _window_tokens(module)

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Swin v2's forward with LCAAM attention."""
        B_, N, C = x.shape
        q, k, v = split_heads(fused_qkv(module, x), module.num_heads)
        logit_scale = torch.clamp(module.logit_scale, max=math.log(1.0 / 0.01)).exp()
        q = F.normalize(q, dim=-1) * logit_scale
        k = F.normalize(k, dim=-1)
        table = module.cpb_mlp(module.relative_coords_table).view(-1, module.num_heads)
        bias = table[module.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        bias = (16 * torch.sigmoid(bias)).unsqueeze(0)
        bias = _with_shift_mask(bias, mask, B_)
        out, _ = site.attend(module, x, q, k, v, scale=1.0, attn_mask=bias, dropout_p=dropout_p(module))
        return module.proj_drop(module.proj(out.transpose(1, 2).reshape(B_, N, C)))


class DavitFamily(SequenceFamily):
    """DaViT's spatial window attention (no bias)."""

    locations = (("timm.models.davit", "WindowAttention"),)

    def static_tokens(self, module: Any, root: nn.Module) -> tuple[int, int] | None:
        """The window's tokens."""
        return _window_tokens(module)

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """DaViT's forward with LCAAM attention."""
        B_, N, C = x.shape
        q, k, v = split_heads(module.qkv(x), module.num_heads)
        out, _ = site.attend(module, x, q, k, v, scale=module.scale)
        return module.proj(out.transpose(1, 2).reshape(B_, N, C))


class SwinV2CrFamily(SequenceFamily):
    """`swin_transformer_v2_cr.WindowMultiHeadAttention`: cosine attention, meta-network
    position bias, shift mask."""

    locations = (("timm.models.swin_transformer_v2_cr", "WindowMultiHeadAttention"),)

    def static_tokens(self, module: Any, root: nn.Module) -> tuple[int, int] | None:
        """The window's tokens."""
        return _window_tokens(module)

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Swin v2 CR's forward with LCAAM attention."""
        Bw, L, _C = x.shape
        heads = module.num_heads
        q, k, v = split_heads(module.qkv(x), heads)
        logit_scale = torch.clamp(module.logit_scale.reshape(1, heads, 1, 1), max=math.log(1.0 / 0.01)).exp()
        q = F.normalize(q, dim=-1) * logit_scale
        k = F.normalize(k, dim=-1)
        bias = _with_shift_mask(module._relative_positional_encodings(), mask, Bw)
        out, _ = site.attend(module, x, q, k, v, scale=1.0, attn_mask=bias, dropout_p=dropout_p(module))
        return module.proj_drop(module.proj(out.transpose(1, 2).reshape(Bw, L, -1)))
