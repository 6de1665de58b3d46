"""`backend="sdpa"`: `fusion="add"` through `F.scaled_dot_product_attention`, M in its float mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import masking
from .call import AttentionCall, CallSpec


class SDPABackend:
    """M, the upstream mask and causality folded into one additive mask for SDPA."""

    def refusal_for(self, spec: CallSpec) -> str | None:
        """SDPA adds a mask to the scores; it cannot multiply them, nor return weights."""
        if spec.fusion != "add":
            return "SDPA can add M to the scores but not multiply them (fusion='mul')"
        if spec.need_weights:
            return "SDPA does not return attention weights (need_weights=True)"
        return None

    def refusal(self, call: AttentionCall) -> str | None:
        """`refusal_for` of the call's spec."""
        return self.refusal_for(call.spec)

    def __call__(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One SDPA call; dead rows are computed unmasked and their output set to 0."""
        upstream = masking.upstream_mask(call)
        bias = upstream.additive(call.dtype, masking.lcaam_mask(call, upstream, call.dtype))
        out = F.scaled_dot_product_attention(
            call.q, call.k, call.v, attn_mask=bias, dropout_p=call.dropout_p, scale=call.scale
        )
        return masking.zero_dead_rows(out, upstream), None
