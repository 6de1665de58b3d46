"""ViT-style self-attention over (B, N, C) tokens: timm's `Attention` (timm.layers.attention,
before 1.0.16 in timm.models.vision_transformer), `AttentionRope`, `eva.EvaAttention`,
`beit.Attention` (relative position bias, own and shared) and
`vision_transformer_relpos.RelPosAttention`.

The patched forwards are timm's own with the attention call replaced; every submodule
(qkv, q_norm/k_norm, rope, scale norm, gate, proj) is the instance's own. Instances of the
timm 0.3.2 fork that LLaMA-Adapter pins (forward(x), no head_dim, no norms) run through the
same forward. Relative position
biases are passed to `site.attend` as its float mask, added after fusion.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...site import LCAAMSite
from .family import SequenceFamily, bind, dropout_p, fused_qkv, imported, split_heads


def tokens_from_patch_grid(root: nn.Module) -> int | None:
    """Patches + prefix tokens of a ViT root, None when it has no integer `num_patches`."""
    patch_embed = getattr(root, "patch_embed", None)
    num_patches = getattr(patch_embed, "num_patches", None)
    if not isinstance(num_patches, int):
        return None
    prefix = getattr(root, "num_prefix_tokens", None)
    if prefix is None:
        prefix = 1 if getattr(root, "cls_token", None) is not None else 0
    return num_patches + prefix


def _project_qkv(module: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, _C = x.shape
    heads = module.num_heads
    if getattr(module, "qkv", None) is None:
        kv_heads = getattr(module, "num_kv_heads", heads)
        q = module.q_proj(x).reshape(B, N, heads, -1).transpose(1, 2)
        k = module.k_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
        v = module.v_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
        return q, k, v
    return split_heads(fused_qkv(module, x), heads)


def _apply_rope(
    module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    npt = getattr(module, "num_prefix_tokens", 1)  # timm 0.9's EvaAttention keeps just the first token
    # timm before `rotate_half` existed (< 1.0.20) takes no `half` argument
    options = {"half": True} if getattr(module, "rotate_half", False) else {}
    q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, **options)], dim=2)
    k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, **options)], dim=2)
    return q.type_as(v), k.type_as(v)


class PlainFamily(SequenceFamily):
    """`Attention`, `AttentionRope`, `EvaAttention`: qkv or q/k/v projections, optional
    qk norm, rope, grouped kv heads, scale norm, gate, and their own attn_mask/is_causal."""

    rope_locations = (
        ("timm.layers.attention", "AttentionRope"),
        ("timm.models.eva", "EvaAttention"),
    )
    locations = (
        ("timm.layers.attention", "Attention"),
        ("timm.models.vision_transformer", "Attention"),
        *rope_locations,
    )

    def embed_dim(self, module: Any) -> int:
        """The input width of qkv (or of q_proj)."""
        projection: Any = module.qkv if getattr(module, "qkv", None) is not None else module.q_proj
        return int(projection.in_features)

    def static_tokens(self, module: Any, root: nn.Module) -> tuple[int, int] | None:
        """Patches + prefix tokens of a ViT root."""
        n = tokens_from_patch_grid(root)
        return None if n is None else (n, n)

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """timm's forward with LCAAM attention."""
        if type(module) in imported(self.rope_locations):
            rope, attn_mask, is_causal = bind(("rope", "attn_mask", "is_causal"), args, kwargs)
        else:
            rope = None
            attn_mask, is_causal = bind(("attn_mask", "is_causal"), args, kwargs)
        B, N, _ = x.shape
        gate = module.gate(x).sigmoid() if getattr(module, "gate", None) is not None else None
        q, k, v = _project_qkv(module, x)
        if getattr(module, "q_norm", None) is not None:
            q, k = module.q_norm(q), module.k_norm(k)
        if rope is not None:
            q, k = _apply_rope(module, q, k, v, rope)
        groups = getattr(module, "num_kv_groups", 1)
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out, _ = site.attend(
            module,
            x,
            q,
            k,
            v,
            scale=module.scale,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=dropout_p(module),
        )
        out = out.transpose(1, 2).reshape(B, N, -1)
        if getattr(module, "norm", None) is not None:
            out = module.norm(out)
        if gate is not None:
            out = out * gate
        return module.proj_drop(module.proj(out))


def _add(bias: torch.Tensor | None, other: torch.Tensor | None) -> torch.Tensor | None:
    if bias is None:
        return other
    return bias if other is None else bias + other


class BeitFamily(SequenceFamily):
    """`beit.Attention`: its windowed relative position bias and the model's shared one,
    both added after fusion."""

    locations = (("timm.models.beit", "Attention"),)

    def forward(
        self, module: Any, site: LCAAMSite, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """beit's forward with LCAAM attention."""
        B, N, _ = x.shape
        q, k, v = split_heads(fused_qkv(module, x), module.num_heads)
        bias = None
        if module.relative_position_bias_table is not None:
            bias = module._get_rel_pos_bias()
        bias = _add(bias, shared_rel_pos_bias)
        out, _ = site.attend(module, x, q, k, v, scale=module.scale, attn_mask=bias, dropout_p=dropout_p(module))
        return module.proj_drop(module.proj(out.transpose(1, 2).reshape(B, N, -1)))


class RelPosFamily(SequenceFamily):
    """`vision_transformer_relpos.RelPosAttention`: its `rel_pos` bias, or the model's shared
    one, added after fusion."""

    locations = (("timm.models.vision_transformer_relpos", "RelPosAttention"),)

    def forward(
        self, module: Any, site: LCAAMSite, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """RelPosAttention's forward with LCAAM attention."""
        B, N, C = x.shape
        q, k, v = split_heads(module.qkv(x), module.num_heads)
        q, k = module.q_norm(q), module.k_norm(k)
        bias = module.rel_pos.get_bias() if module.rel_pos is not None else shared_rel_pos
        out, _ = site.attend(module, x, q, k, v, scale=module.scale, attn_mask=bias, dropout_p=dropout_p(module))
        return module.proj_drop(module.proj(out.transpose(1, 2).reshape(B, N, C)))
