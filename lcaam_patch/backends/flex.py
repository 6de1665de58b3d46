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

from . import masking
from .call import AttentionCall, CallSpec


@functools.cache
def _flex() -> Callable[..., Any] | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False)


def _score_mod(
    mask: torch.Tensor, fusion: str, bias: torch.Tensor | None, keep: torch.Tensor | None, is_causal: bool
) -> Callable[..., torch.Tensor]:
    """score ↦ (score ◇ M[b, i, j]) + bias[b, h, i, j], -inf where hard-masked."""
    mul = fusion == "mul"

    def score_mod(
        score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor
    ) -> torch.Tensor:
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

    def refusal_for(self, spec: CallSpec) -> str | None:
        """CUDA only, no weights, no dropout, a FlexAttention-capable torch."""
        if spec.device_type != "cuda":
            return f"FlexAttention runs on CUDA tensors only, and these are on {spec.device_type}"
        if spec.need_weights:
            return "FlexAttention does not return attention weights (need_weights=True)"
        if spec.dropout_p > 0.0:
            return "FlexAttention has no attention dropout (dropout_p > 0)"
        if _flex() is None:
            return f"this torch ({torch.__version__}) has no FlexAttention"
        return None

    def refusal(self, call: AttentionCall) -> str | None:
        """`refusal_for` of the call's spec."""
        return self.refusal_for(call.spec)

    def __call__(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One FlexAttention call with the fused score_mod."""
        flex = _flex()
        assert flex is not None
        B, H, NQ, _ = call.q.shape
        NK = call.k.shape[-2]
        upstream = masking.upstream_mask(call)
        m = masking.lcaam_mask(call, upstream, call.dtype).squeeze(-3).expand(B, NQ, NK)
        bias = None if upstream.bias is None else upstream.bias.to(call.dtype).expand(B, H, NQ, NK)
        keep = None if upstream.keep is None else upstream.keep.expand(B, H, NQ, NK)
        score_mod = _score_mod(m, call.fusion, bias, keep, call.is_causal)
        out = flex(call.q, call.k, call.v, score_mod=score_mod, scale=call.scale)
        return masking.zero_dead_rows(out, upstream), None
