"""timm attention: `Attention` (timm.layers.attention, before 1.0.16 in
timm.models.vision_transformer), `AttentionRope` and `eva.EvaAttention`.

The patched forward is timm's own with the attention call replaced; every submodule
(qkv, q_norm/k_norm, rope, scale norm, gate, proj) is the instance's own. Instances of the
timm 0.3.2 fork (forward(x), no head_dim, no norms) are accepted too.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LCAAMConfig
from ..errors import MissingBoundError
from ..site import LCAAMSite, SiteGeometry
from .base import Adapter

_PLAIN = (
    ("timm.layers.attention", "Attention"),
    ("timm.models.vision_transformer", "Attention"),
)
_ROPE = (
    ("timm.layers.attention", "AttentionRope"),
    ("timm.models.eva", "EvaAttention"),
)


def _imported(locations: tuple[tuple[str, str], ...]) -> tuple[type[nn.Module], ...]:
    found: list[type[nn.Module]] = []
    for module_name, attr in locations:
        cls = getattr(sys.modules.get(module_name), attr, None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def _bind(names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    values: dict[str, Any] = dict(zip(names, args))
    values.update(kwargs)
    return [values.get(name, False if name == "is_causal" else None) for name in names]


class TimmAdapter(Adapter):
    """Patches timm's ViT-family attention classes."""

    name = "timm"
    distribution = "timm"
    supported_versions = ">=0.3.2,<2"
    presets = {
        "timm_vit": {"mode": "multilayer", "fusion": "mul", "depth": 1},
    }

    def attention_types(self) -> tuple[type[nn.Module], ...]:
        """timm attention classes among the timm modules already imported."""
        return _imported(_PLAIN) + _imported(_ROPE)

    def geometry(self, module: nn.Module, path: str, root: nn.Module, config: LCAAMConfig) -> SiteGeometry:
        """Width from the q/qkv projection; token bound from the patch grid and prefix tokens."""
        projection = module.qkv if getattr(module, "qkv", None) is not None else module.q_proj
        max_tokens = config.max_tokens or _tokens_from_patch_grid(root)
        if max_tokens is None:
            raise MissingBoundError(
                f"cannot infer the token count of {path!r}: {type(root).__name__} has no "
                f"patch_embed.num_patches; pass max_tokens=N (the longest sequence) to "
                f"lcaam_patch.apply"
            )
        return SiteGeometry(
            embed_dim=projection.in_features,
            max_q_tokens=max_tokens,
            max_kv_tokens=config.max_kv_tokens or max_tokens,
            kind="self",
        )

    def forward(self, module: nn.Module, site: LCAAMSite, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """timm's forward with LCAAM attention."""
        if type(module) in _imported(_ROPE):
            rope, attn_mask, is_causal = _bind(("rope", "attn_mask", "is_causal"), args, kwargs)
        else:
            rope = None
            attn_mask, is_causal = _bind(("attn_mask", "is_causal"), args, kwargs)
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
            dropout_p=module.attn_drop.p if module.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(B, N, -1)
        if getattr(module, "norm", None) is not None:
            out = module.norm(out)
        if gate is not None:
            out = out * gate
        return module.proj_drop(module.proj(out))


def _tokens_from_patch_grid(root: nn.Module) -> int | None:
    patch_embed = getattr(root, "patch_embed", None)
    num_patches = getattr(patch_embed, "num_patches", None)
    if not isinstance(num_patches, int):
        return None
    prefix = getattr(root, "num_prefix_tokens", None)
    if prefix is None:
        prefix = 1 if getattr(root, "cls_token", None) is not None else 0
    return num_patches + prefix


def _project_qkv(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, _C = x.shape
    heads = module.num_heads
    if getattr(module, "qkv", None) is None:
        kv_heads = getattr(module, "num_kv_heads", heads)
        q = module.q_proj(x).reshape(B, N, heads, -1).transpose(1, 2)
        k = module.k_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
        v = module.v_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
        return q, k, v
    q_bias = getattr(module, "q_bias", None)
    if q_bias is None:
        qkv = module.qkv(x)
    else:
        bias = torch.cat((q_bias, module.k_bias, module.v_bias))
        if getattr(module, "qkv_bias_separate", False):
            qkv = module.qkv(x) + bias
        else:
            qkv = F.linear(x, weight=module.qkv.weight, bias=bias)
    q, k, v = qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _apply_rope(
    module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    npt = module.num_prefix_tokens
    half = getattr(module, "rotate_half", False)
    q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
    k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
    return q.type_as(v), k.type_as(v)


adapter = TimmAdapter()
