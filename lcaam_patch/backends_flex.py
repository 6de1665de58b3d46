"""`backend="flex"`: FlexAttention with the fusion as a `score_mod` (CUDA only).

FlexAttention computes S = QKᵀ·scale and hands each score to `score_mod`, which applies
M, the upstream mask and causality. It is compiled once per process with
`torch.compile`; gradients reach M through the captured tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from .attention import AttentionRequest, register_backend


@functools.cache
def _flex() -> Callable[..., Any] | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False)


def _score_mod(
    mask: torch.Tensor, fusion: str, attn_mask: torch.Tensor | None, is_causal: bool
) -> Callable[..., torch.Tensor]:
    """score ↦ (score ◇ M[b, i, j]) + B[b, h, i, j], -inf where masked."""
    mul = fusion == "mul"
    keep = attn_mask if attn_mask is not None and attn_mask.dtype == torch.bool else None
    bias = attn_mask if attn_mask is not None and keep is None else None

    def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        m = mask[b, i, j]
        z = score * m if mul else score + m
        if bias is not None:
            z = z + bias[b, h, i, j]
        if keep is not None:
            z = torch.where(keep[b, h, i, j], z, float("-inf"))
        if is_causal:
            z = torch.where(j <= i, z, float("-inf"))
        return z

    return score_mod


class FlexBackend:
    """FlexAttention `score_mod` route: the reference fast path (its dM is a scatter)."""

    def supports(self, request: AttentionRequest) -> bool:
        """CUDA only, no weights, no dropout, a FlexAttention-capable torch."""
        if request.need_weights or request.dropout or request.device_type != "cuda":
            return False
        return _flex() is not None

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        *,
        fusion: str,
        scale: float,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        dropout_p: float,
        need_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One FlexAttention call with the fused score_mod."""
        flex = _flex()
        assert flex is not None
        B, H, NQ, _ = q.shape
        NK = k.shape[-2]
        if attn_mask is not None:
            attn_mask = attn_mask.expand(B, H, NQ, NK)
        score_mod = _score_mod(mask.to(q.dtype).expand(B, NQ, NK), fusion, attn_mask, is_causal)
        return flex(q, k, v, score_mod=score_mod, scale=scale), None


register_backend("flex", FlexBackend(), priority=20)
