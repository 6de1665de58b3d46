"""CaiT (`ClassAttn`, `TalkingHeadAttn`), VOLO (`Attention`, `ClassAttention`),
`AttentionPoolLatent` and `AttentionPool2d`.

Class attention lets the class token (the query, Nq = 1) attend to all tokens; the
generator reads the class token. `AttentionPoolLatent` (the MAP heads of SigLIP-style ViTs)
lets its learned latents attend to the tokens; the generator reads the latents.
`AttentionPool2d` (the CLIP ResNets' head) is self-attention over the map's positions and a
mean (or class) token in front, position embeddings added; the generator reads those tokens.
Talking-heads attention mixes the heads' logits before the softmax (proj_l) and the
weights after it (proj_w): the mixed logits are written as one q'·k'ᵀ (each head's q'
concatenates the scaled heads of q weighted by proj_l, plus its bias against a column of
ones), M is fused with them, and proj_w mixes the weights `site.attend` returns.
"""

from __future__ import annotations

from typing import Any

import torch

from ...site import LCAAMSite
from .family import Family, SequenceFamily, bind, dropout_p, first, home, split_heads


class ClassAttnFamily(Family):
    """CaiT's `ClassAttn`: the class token x[:, :1] attends to x."""

    locations = (("timm.models.cait", "ClassAttn"),)
    kind = "cross"

    def embed_dim(self, module: Any) -> int:
        """The input width of q."""
        q: Any = module.q
        return int(q.in_features)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """One query, every token a key."""
        return 1, first(args, kwargs).shape[-2]

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """ClassAttn's forward with LCAAM attention."""
        B, N, C = x.shape
        heads = module.num_heads
        queries = x[:, :1]
        q = module.q(queries).reshape(B, 1, heads, C // heads).transpose(1, 2)
        k = module.k(x).reshape(B, N, heads, C // heads).transpose(1, 2)
        v = module.v(x).reshape(B, N, heads, C // heads).transpose(1, 2)
        out, _ = site.attend(module, queries, q, k, v, scale=module.scale, dropout_p=dropout_p(module), kv_tokens=x)
        return module.proj_drop(module.proj(out.transpose(1, 2).reshape(B, 1, C)))


class VoloClassFamily(ClassAttnFamily):
    """VOLO's `ClassAttention`: the class token attends to x through a kv projection."""

    locations = (("timm.models.volo", "ClassAttention"),)

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """VOLO ClassAttention's forward with LCAAM attention."""
        B, N, _ = x.shape
        heads, head_dim = module.num_heads, module.head_dim
        queries = x[:, :1]
        k, v = module.kv(x).reshape(B, N, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = module.q(queries).reshape(B, heads, 1, head_dim)
        out, _ = site.attend(module, queries, q, k, v, scale=module.scale, dropout_p=dropout_p(module), kv_tokens=x)
        return module.proj_drop(module.proj(out.transpose(1, 2).reshape(B, 1, heads * head_dim)))


class VoloFamily(SequenceFamily):
    """VOLO's `Attention` over an (B, H, W, C) feature map: Nq = Nk = H·W."""

    locations = (("timm.models.volo", "Attention"),)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """Every position of the map."""
        x = first(args, kwargs)
        n = x.shape[1] * x.shape[2]
        return n, n

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """VOLO Attention's forward with LCAAM attention."""
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)
        q, k, v = split_heads(module.qkv(tokens), module.num_heads)
        out, _ = site.attend(module, tokens, q, k, v, scale=module.scale, dropout_p=dropout_p(module))
        return module.proj_drop(module.proj(out.transpose(1, 2).reshape(B, H, W, C)))


class TalkingHeadFamily(SequenceFamily):
    """CaiT's `TalkingHeadAttn` (see the module docstring)."""

    locations = (("timm.models.cait", "TalkingHeadAttn"),)

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor) -> torch.Tensor:
        """TalkingHeadAttn's forward with LCAAM fused with the head-mixed logits."""
        B, N, C = x.shape
        heads = module.num_heads
        q, k, v = split_heads(module.qkv(x), heads)
        weight, bias = module.proj_l.weight, module.proj_l.bias
        # q'[b, g, n] = concat_h(W[g, h] · scale · q[b, h, n]) ++ [bias[g]];  k' = concat_h(k[b, h]) ++ [1]
        mixed_q = torch.einsum("gh,bhnd->bgnhd", weight, q * module.scale).reshape(B, heads, N, -1)
        keys = k.transpose(1, 2).reshape(B, 1, N, -1).expand(-1, heads, -1, -1)
        if bias is not None:
            mixed_q = torch.cat([mixed_q, bias.view(1, heads, 1, 1).expand(B, -1, N, 1)], dim=-1)
            keys = torch.cat([keys, keys.new_ones(B, heads, N, 1)], dim=-1)
        _, weights = site.attend(module, x, mixed_q, keys, v, scale=1.0, need_weights=True)
        assert weights is not None
        weights = module.proj_w(weights.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        weights = module.attn_drop(weights)
        out = (weights @ v).transpose(1, 2).reshape(B, N, C)
        return module.proj_drop(module.proj(out))


class LatentPoolFamily(Family):
    """`AttentionPoolLatent`: learned latents (B, L, latent_dim) attend to x (B, N, C)."""

    locations = (
        ("timm.layers.attention_pool", "AttentionPoolLatent"),
        ("timm.layers", "AttentionPoolLatent"),
    )
    kind = "cross"

    def embed_dim(self, module: Any) -> int:
        """The width of the latents."""
        latent: Any = module.latent
        return int(latent.shape[-1])

    def kv_embed_dim(self, module: Any) -> int | None:
        """The width of the tokens."""
        kv: Any = module.kv
        return int(kv.in_features)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """The latents as queries, the tokens as keys."""
        return int(module.latent_len), first(args, kwargs).shape[-2]

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """AttentionPoolLatent's forward with LCAAM attention."""
        (attn_mask,) = bind(("attn_mask",), args, kwargs)
        B, N, C = x.shape
        heads, length = module.num_heads, module.latent_len
        if module.pos_embed is not None:
            x = x + module.pos_embed.unsqueeze(0).to(x.dtype)
        latents = module.latent.expand(B, -1, -1)
        q = module.q(latents).reshape(B, length, heads, -1).transpose(1, 2)
        k, v = module.kv(x).reshape(B, N, 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = module.q_norm(q), module.k_norm(k)
        out, _ = site.attend(module, latents, q, k, v, scale=module.scale, attn_mask=attn_mask, kv_tokens=x)
        out = module.proj_drop(module.proj(out.transpose(1, 2).reshape(B, length, C)))
        if module.mlp is not None:
            out = out + module.mlp(module.norm(out))
        if module.pool == "token":
            return out[:, 0]
        if module.pool == "avg":
            return out.mean(1)
        return out


class AttentionPool2dFamily(Family):
    """`AttentionPool2d`: a mean (or class) token and the positions of x (B, C, H, W)."""

    locations = (("timm.layers.attention_pool2d", "AttentionPool2d"),)

    def embed_dim(self, module: Any) -> int:
        """The width of the input tokens."""
        return int(module.in_features)

    def tokens(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
        """The positions and the token in front."""
        x = first(args, kwargs)
        n = x.shape[-2] * x.shape[-1] + 1
        return n, n

    def forward(self, module: Any, site: LCAAMSite, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """AttentionPool2d's forward with LCAAM attention."""
        B, _C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        front = tokens.mean(1, keepdim=True) if module.cls_token is None else module.cls_token.expand(B, -1, -1)
        pos_embed = home(module).resample_abs_pos_embed(
            module.pos_embed.unsqueeze(0), (H, W), old_size=module.feat_size, num_prefix_tokens=1
        )
        tokens = torch.cat([front, tokens], dim=1) + pos_embed
        heads = module.num_heads
        if module.qkv is None:
            q, k, v = (
                proj(tokens).reshape(B, -1, heads, module.head_dim).transpose(1, 2)
                for proj in (module.q, module.k, module.v)
            )
        else:
            q, k, v = split_heads(module.qkv(tokens), heads)
        out, _ = site.attend(module, tokens, q, k, v, scale=module.scale)
        out = module.drop(out.transpose(1, 2).reshape(B, H * W + 1, -1))
        pooled: torch.Tensor = module._pool(out if pre_logits else module.proj(out), H, W)
        return pooled
