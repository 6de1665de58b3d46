"""Attention of the hybrid and efficient ViTs: LeViT (`levit.Attention`,
`levit.AttentionDownsample`), TinyViT (`tiny_vit.Attention`), FastViT (`fastvit.Attention`),
NesT (`nest.Attention`), MetaFormer (`metaformer.Attention`), PVT-v2 (`pvt_v2.Attention`),
Twins (`twins.LocallyGroupedAttn`, `twins.GlobalSubSampleAttn`), TNT (`tnt.Attention`),
Visformer (`visformer.Attention`), EfficientFormer (`efficientformer.Attention`),
EfficientViT-MSRA (`efficientvit_msra.CascadedGroupAttention`), LowFormer and CPUBone
(`lowformer.ConvAttention`, `cpubone.ConvAttention`) and Next-ViT (`nextvit.EfficientAttention`).

LeViT and TinyViT add learned per-head attention biases, passed after fusion; LeViT's
downsampling attention and the spatial reduction of PVT-v2, Twins and Next-ViT attend from the (subsampled) queries
to other key tokens, so the generator reads the queries and a lowrank one the keys. NesT and
Twins' local attention attend within blocks, folded into the batch (a mask per block).
EfficientViT-MSRA's cascaded heads each read the previous head's output plus their own
channels; one mask, from the module's input tokens, is fused with every head's scores.
LowFormer and CPUBone attend over a map downsampled by a strided depthwise conv, whose
positions the generator reads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...backends import AttentionCall
from ...site import LCAAMSite
from .family import Family, SequenceFamily, dropout_p, first, split_heads


def _in_width(layer: Any) -> int:
    """Input width of a Linear or Conv2d, or of LeViT's LinearNorm/ConvNorm around one."""
    inner = getattr(layer, "linear", layer)
    return int(getattr(inner, "in_features", None) or inner.in_channels)


def _bias_tokens(module: Any) -> tuple[int, int]:
    """(Nq, Nk) of a module with an (Nq, Nk) `attention_bias_idxs`."""
    nq, nk = module.attention_bias_idxs.shape
    return int(nq), int(nk)


def _attention_bias(module: Any, x: torch.Tensor) -> torch.Tensor:
    bias: torch.Tensor = module.get_attention_biases(x.device)
    return bias.unsqueeze(0)


class LevitFamily(Family):
    """LeViT's `Attention` over (B, N, C) tokens or (B, C, H, W) maps, with attention biases."""

    locations = (("timm.models.levit", "Attention"),)

    def embed_dim(self, module: Any) -> int:
        """The input width of qkv."""
        return _in_width(module.qkv)

    def static_tokens(self, module: Any, root: nn.Module) -> tuple[int, int] | None:
        """The positions of its resolution."""
        return _bias_tokens(module)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """Every token (position) of x."""
        x = first(args, kwargs)
        n = x.shape[-2] * x.shape[-1] if module.use_conv else x.shape[1]
        return n, n

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """LeViT Attention's forward with LCAAM attention."""
        heads, dims = module.num_heads, [module.key_dim, module.key_dim, module.val_dim]
        if module.use_conv:
            B, _C, H, W = x.shape
            tokens = x.flatten(2).transpose(1, 2)
            q, k, v = (t.transpose(-2, -1) for t in module.qkv(x).view(B, heads, -1, H * W).split(dims, dim=2))
        else:
            B, N, _C = x.shape
            tokens = x
            q, k, v = (t.transpose(1, 2) for t in module.qkv(x).view(B, N, heads, -1).split(dims, dim=3))
        bias = _attention_bias(module, x)
        out, _ = site.attend(module, tokens, q, k, v, scale=module.scale, attn_mask=bias)
        if module.use_conv:
            return module.proj(out.transpose(-2, -1).reshape(B, -1, H, W))
        return module.proj(out.transpose(1, 2).reshape(B, N, module.val_attn_dim))


class LevitDownsampleFamily(Family):
    """LeViT's `AttentionDownsample`: subsampled queries attend to every token."""

    locations = (("timm.models.levit", "AttentionDownsample"),)
    kind = "cross"

    def embed_dim(self, module: Any) -> int:
        """The input width of kv (the queries are subsampled tokens of the same width)."""
        return _in_width(module.kv)

    def static_tokens(self, module: Any, root: nn.Module) -> tuple[int, int] | None:
        """Subsampled and full positions of its resolution."""
        return _bias_tokens(module)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """Subsampled queries, every token a key."""
        x = first(args, kwargs)
        if module.use_conv:
            H, W = x.shape[-2:]
            stride = module.stride
            return ((H - 1) // stride + 1) * ((W - 1) // stride + 1), H * W
        return math.prod(module.q.down(x).shape[1:-1]), x.shape[1]

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """LeViT AttentionDownsample's forward with LCAAM attention."""
        heads, dims = module.num_heads, [module.key_dim, module.val_dim]
        down = module.q.down(x)
        if module.use_conv:
            B, _C, H, W = x.shape
            HH, WW = down.shape[-2:]
            tokens, queries = x.flatten(2).transpose(1, 2), down.flatten(2).transpose(1, 2)
            k, v = (t.transpose(-2, -1) for t in module.kv(x).view(B, heads, -1, H * W).split(dims, dim=2))
            q = module.q.ln(down).view(B, heads, module.key_dim, -1).transpose(-2, -1)
        else:
            B, N, _C = x.shape
            tokens, queries = x, down
            k, v = (t.transpose(1, 2) for t in module.kv(x).view(B, N, heads, -1).split(dims, dim=3))
            q = module.q.ln(down).view(B, -1, heads, module.key_dim).transpose(1, 2)
        bias = _attention_bias(module, x)
        out, _ = site.attend(module, queries, q, k, v, scale=module.scale, attn_mask=bias, kv_tokens=tokens)
        if module.use_conv:
            return module.proj(out.transpose(-2, -1).reshape(B, module.val_attn_dim, HH, WW))
        return module.proj(out.transpose(1, 2).reshape(B, -1, module.val_attn_dim))


class TinyVitFamily(SequenceFamily):
    """TinyViT's `Attention`: a norm first, attention biases after fusion."""

    locations = (("timm.models.tiny_vit", "Attention"),)

    def static_tokens(self, module: Any, root: nn.Module) -> tuple[int, int] | None:
        """The positions of its window."""
        return _bias_tokens(module)

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """TinyViT Attention's forward with LCAAM attention; the generator reads the normed x."""
        bias = _attention_bias(module, x)
        B, N, _ = x.shape
        x = module.norm(x)
        dims = [module.key_dim, module.key_dim, module.val_dim]
        q, k, v = (t.transpose(1, 2) for t in module.qkv(x).view(B, N, module.num_heads, -1).split(dims, dim=3))
        out, _ = site.attend(module, x, q, k, v, scale=module.scale, attn_mask=bias)
        return module.proj(out.transpose(1, 2).reshape(B, N, module.out_dim))


class FastVitFamily(Family):
    """FastViT's `Attention` over (B, C, H, W) maps."""

    locations = (("timm.models.fastvit", "Attention"),)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """Every position of the map."""
        x = first(args, kwargs)
        n = x.shape[-2] * x.shape[-1]
        return n, n

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """FastViT Attention's forward with LCAAM attention."""
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(-2, -1)
        q, k, v = split_heads(module.qkv(tokens), module.num_heads)
        out, _ = site.attend(module, tokens, q, k, v, scale=module.scale, dropout_p=dropout_p(module))
        out = module.proj_drop(module.proj(out.transpose(1, 2).reshape(B, H * W, C)))
        return out.transpose(-2, -1).reshape(B, C, H, W)


class NestFamily(Family):
    """NesT's `Attention` within image blocks, x (B, T, N, C): a mask per block."""

    locations = (("timm.models.nest", "Attention"),)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """The tokens of one block."""
        n = first(args, kwargs).shape[2]
        return n, n

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """NesT Attention's forward with LCAAM attention."""
        B, T, N, C = x.shape
        tokens = x.reshape(B * T, N, C)
        q, k, v = split_heads(module.qkv(tokens), module.num_heads)
        out, _ = site.attend(module, tokens, q, k, v, scale=module.scale, dropout_p=dropout_p(module))
        # NesT lays the heads out innermost: channel d·H + h
        out = out.view(B, T, -1, N, C // module.num_heads).permute(0, 1, 3, 4, 2).reshape(B, T, N, C)
        return module.proj_drop(module.proj(out))


class MetaFormerFamily(SequenceFamily):
    """MetaFormer's `Attention` (the CAFormer token mixer)."""

    locations = (("timm.models.metaformer", "Attention"),)

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """MetaFormer Attention's forward with LCAAM attention."""
        B, N, _C = x.shape
        q, k, v = split_heads(module.qkv(x), module.num_heads)
        out, _ = site.attend(module, x, q, k, v, scale=module.scale, dropout_p=dropout_p(module))
        return module.proj_drop(module.proj(out.transpose(1, 2).reshape(B, N, -1)))


class PvtV2Family(Family):
    """PVT-v2's spatial-reduction `Attention`: every token attends to reduced key tokens."""

    locations = (("timm.models.pvt_v2", "Attention"),)
    kind = "cross"

    def embed_dim(self, module: Any) -> int:
        """The input width of q."""
        return _in_width(module.q)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """Every token a query; the reduced map's positions as keys."""
        x = first(args, kwargs)
        feat_size = args[1] if len(args) > 1 else kwargs["feat_size"]
        return x.shape[1], self._reduced(module, x, feat_size).shape[1]

    @staticmethod
    def _reduced(module: Any, x: torch.Tensor, feat_size: Any) -> torch.Tensor:
        """The key tokens: x itself, or x reduced by (pool and) the sr conv, normed."""
        if module.sr is None and module.pool is None:
            return x
        B, _N, C = x.shape
        H, W = feat_size
        grid = x.permute(0, 2, 1).reshape(B, C, H, W)
        if module.pool is not None:
            grid = module.pool(grid)
        reduced = module.norm(module.sr(grid).reshape(B, C, -1).permute(0, 2, 1))
        return module.act(reduced) if module.pool is not None else reduced

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor, feat_size: Any) -> torch.Tensor:
        """PVT-v2 Attention's forward with LCAAM attention."""
        B, N, C = x.shape
        heads = module.num_heads
        q = module.q(x).reshape(B, N, heads, -1).transpose(1, 2)
        keys = self._reduced(module, x, feat_size)
        k, v = module.kv(keys).reshape(B, -1, 2, heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out, _ = site.attend(module, x, q, k, v, scale=module.scale, dropout_p=dropout_p(module), kv_tokens=keys)
        return module.proj_drop(module.proj(out.transpose(1, 2).reshape(B, N, C)))


class TwinsLocalFamily(Family):
    """Twins' `LocallyGroupedAttn`: windows of `ws`×`ws` (zero-padded) folded into the batch."""

    locations = (("timm.models.twins", "LocallyGroupedAttn"),)

    def static_tokens(self, module: Any, root: nn.Module) -> tuple[int, int] | None:
        """The window's tokens."""
        n = int(module.ws) ** 2
        return n, n

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """The window's tokens."""
        n = int(module.ws) ** 2
        return n, n

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor, size: Any) -> torch.Tensor:
        """LocallyGroupedAttn's forward with LCAAM attention."""
        B, N, C = x.shape
        H, W = size
        ws = module.ws
        grid = F.pad(x.view(B, H, W, C), (0, 0, 0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))
        Hp, Wp = grid.shape[1:3]
        rows, cols = Hp // ws, Wp // ws
        windows = grid.reshape(B, rows, ws, cols, ws, C).transpose(2, 3).reshape(B * rows * cols, ws * ws, C)
        q, k, v = split_heads(module.qkv(windows), module.num_heads)
        out, _ = site.attend(module, windows, q, k, v, scale=module.scale, dropout_p=dropout_p(module))
        out = out.transpose(1, 2).reshape(B, rows, cols, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        out = out[:, :H, :W, :].reshape(B, N, C)
        return module.proj_drop(module.proj(out))


class TwinsGlobalFamily(PvtV2Family):
    """Twins' `GlobalSubSampleAttn`: every token attends to the sr-reduced tokens."""

    locations = (("timm.models.twins", "GlobalSubSampleAttn"),)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """Every token a query; the reduced map's positions as keys."""
        x = first(args, kwargs)
        size = args[1] if len(args) > 1 else kwargs["size"]
        return x.shape[1], self._keys(module, x, size).shape[1]

    @staticmethod
    def _keys(module: Any, x: torch.Tensor, size: Any) -> torch.Tensor:
        if module.sr is None:
            return x
        B, _N, C = x.shape
        return module.norm(module.sr(x.permute(0, 2, 1).reshape(B, C, *size)).reshape(B, C, -1).permute(0, 2, 1))

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor, size: Any) -> torch.Tensor:
        """GlobalSubSampleAttn's forward with LCAAM attention."""
        B, N, C = x.shape
        heads = module.num_heads
        q = module.q(x).reshape(B, N, heads, C // heads).transpose(1, 2)
        keys = self._keys(module, x, size)
        k, v = module.kv(keys).reshape(B, -1, 2, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out, _ = site.attend(module, x, q, k, v, scale=module.scale, dropout_p=dropout_p(module), kv_tokens=keys)
        return module.proj_drop(module.proj(out.transpose(1, 2).reshape(B, N, C)))


class TntFamily(SequenceFamily):
    """TNT's `Attention` (inner over pixels, outer over patches): a qk and a v projection."""

    locations = (("timm.models.tnt", "Attention"),)

    def embed_dim(self, module: Any) -> int:
        """The input width of qk."""
        return _in_width(module.qk)

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """TNT Attention's forward with LCAAM attention."""
        B, N, _C = x.shape
        heads = module.num_heads
        q, k = module.qk(x).reshape(B, N, 2, heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        v = module.v(x).reshape(B, N, heads, -1).transpose(1, 2)
        out, _ = site.attend(module, x, q, k, v, scale=module.scale, dropout_p=dropout_p(module))
        return module.proj_drop(module.proj(out.transpose(1, 2).reshape(B, N, -1)))


class VisformerFamily(FastVitFamily):
    """Visformer's `Attention` over (B, C, H, W) maps, 1×1-conv qkv."""

    locations = (("timm.models.visformer", "Attention"),)

    def embed_dim(self, module: Any) -> int:
        """The input channels of the qkv conv."""
        return _in_width(module.qkv)

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """Visformer Attention's forward with LCAAM attention."""
        B, _C, H, W = x.shape
        q, k, v = module.qkv(x).reshape(B, 3, module.num_heads, module.head_dim, -1).permute(1, 0, 2, 4, 3).unbind(0)
        tokens = x.flatten(2).transpose(1, 2)
        out, _ = site.attend(module, tokens, q, k, v, scale=module.scale, dropout_p=dropout_p(module))
        return module.proj_drop(module.proj(out.permute(0, 1, 3, 2).reshape(B, -1, H, W)))


class EfficientFormerFamily(SequenceFamily):
    """EfficientFormer's `Attention`: attention biases after fusion."""

    locations = (("timm.models.efficientformer", "Attention"),)

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """EfficientFormer Attention's forward with LCAAM attention."""
        B, N, _C = x.shape
        dims = [module.key_dim, module.key_dim, module.val_dim]
        q, k, v = module.qkv(x).reshape(B, N, module.num_heads, -1).transpose(1, 2).split(dims, dim=3)
        bias = _attention_bias(module, x)
        out, _ = site.attend(module, x, q, k, v, scale=module.scale, attn_mask=bias)
        return module.proj(out.transpose(1, 2).reshape(B, N, module.val_attn_dim))


class CascadedGroupFamily(Family):
    """EfficientViT-MSRA's `CascadedGroupAttention` over (B, C, H, W) windows: heads in a
    cascade, each with a depthwise conv on its queries and attention biases."""

    locations = (("timm.models.efficientvit_msra", "CascadedGroupAttention"),)

    def embed_dim(self, module: Any) -> int:
        """The input channels of all heads together."""
        return len(module.qkvs) * _in_width(module.qkvs[0].conv)

    def static_tokens(self, module: Any, root: nn.Module) -> tuple[int, int] | None:
        """The positions of its window."""
        return _bias_tokens(module)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """Every position of the (window's) map."""
        x = first(args, kwargs)
        n = x.shape[-2] * x.shape[-1]
        return n, n

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """CascadedGroupAttention's forward with LCAAM attention: one mask, every head."""
        B, _C, H, W = x.shape
        dims = [module.key_dim, module.key_dim, module.val_dim]
        mask = site.mask(module, x.flatten(2).transpose(1, 2), H * W)
        bias = module.get_attention_biases(x.device)
        feats_in = x.chunk(len(module.qkvs), dim=1)
        feats_out: list[torch.Tensor] = []
        feat = feats_in[0]
        for head, (qkv, dws) in enumerate(zip(module.qkvs, module.dws)):
            if head > 0:
                feat = feat + feats_in[head]
            q, k, v = qkv(feat).view(B, -1, H, W).split(dims, dim=1)
            q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (dws(q), k, v))
            call = AttentionCall(q, k, v, mask, fusion=site.fusion, scale=module.scale, attn_mask=bias[head])
            feat = site.run(call).output.squeeze(1).transpose(1, 2).reshape(B, module.val_dim, H, W)
            feats_out.append(feat)
        out: torch.Tensor = module.proj(torch.cat(feats_out, 1))
        return out


class LowFormerFamily(Family):
    """LowFormer's and CPUBone's `ConvAttention`: self-attention over the conv-downsampled map,
    upsampled after (CPUBone's 2×2 projection pads odd maps first)."""

    locations = (("timm.models.lowformer", "ConvAttention"), ("timm.models.cpubone", "ConvAttention"))

    def embed_dim(self, module: Any) -> int:
        """The input channels of the pointwise qkv conv."""
        return _in_width(module.pwise)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """The positions of the downsampled map."""
        n = self._downsampled(module, first(args, kwargs))[0, 0].numel()
        return n, n

    @staticmethod
    def _downsampled(module: Any, x: torch.Tensor) -> torch.Tensor:
        """The conv-downsampled map, x padded to a multiple of the stride for small kernels."""
        stride = module.att_stride
        if getattr(module, "small_kernels", False) and stride > 1:
            x = F.pad(x, (0, -x.shape[-1] % stride, 0, -x.shape[-2] % stride))
        feats: torch.Tensor = module.conv_proj(x)
        return feats

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """ConvAttention's forward with LCAAM attention."""
        H, W = x.shape[-2:]
        feats = self._downsampled(module, x)
        B, _C, h, w = feats.shape
        qkv = module.pwise(feats).reshape(B, module.num_heads, module.num_keys * module.head_dim, h * w)
        q, k, v = qkv.permute(0, 1, 3, 2).chunk(3, dim=3)
        out, _ = site.attend(module, feats.flatten(2).transpose(1, 2), q, k, v, scale=module.scale)
        out = module.o_proj(out.permute(0, 1, 3, 2).reshape(B, module.o_proj_inpdim, h, w))
        upsampled: torch.Tensor = module.upsampling(out)
        return upsampled[..., :H, :W]


class NextVitFamily(Family):
    """Next-ViT's `EfficientAttention`: every token attends to the avg-pooled (by sr_ratio²), normed tokens."""

    locations = (("timm.models.nextvit", "EfficientAttention"),)
    kind = "cross"

    def embed_dim(self, module: Any) -> int:
        """The input width of q."""
        return _in_width(module.q)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """Every token a query; the pooled tokens as keys."""
        x = first(args, kwargs)
        return x.shape[1], self._keys(module, x).shape[1]

    @staticmethod
    def _keys(module: Any, x: torch.Tensor) -> torch.Tensor:
        if module.sr is None:
            return x
        keys: torch.Tensor = module.norm(module.sr(x.transpose(1, 2))).transpose(1, 2)
        return keys

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """EfficientAttention's forward with LCAAM attention."""
        B, N, C = x.shape
        heads, head_dim = module.num_heads, module.head_dim
        q = module.q(x).reshape(B, N, heads, head_dim).transpose(1, 2)
        keys = self._keys(module, x)
        k = module.k(keys).reshape(B, -1, heads, head_dim).transpose(1, 2)
        v = module.v(keys).reshape(B, -1, heads, head_dim).transpose(1, 2)
        out, _ = site.attend(module, x, q, k, v, scale=module.scale, dropout_p=dropout_p(module), kv_tokens=keys)
        return module.proj_drop(module.proj(out.transpose(1, 2).reshape(B, N, C)))
