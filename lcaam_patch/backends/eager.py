"""`backend="eager"`: the reference. It materialises the scores and computes every call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import masking
from .call import AttentionCall, CallSpec


class EagerBackend:
    """The reference computation; the only backend that returns the attention weights."""

    def refusal_for(self, spec: CallSpec) -> str | None:
        """Eager computes every call."""
        return None

    def refusal(self, call: AttentionCall) -> str | None:
        """Eager computes every call."""
        return None

    def __call__(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fused scores and softmax in float32 (float64 for float64 inputs), so that S·M
        cannot overflow in half precision; weights are cast back to the inputs' dtype."""
        compute = torch.promote_types(call.dtype, torch.float32)
        upstream = masking.upstream_mask(call)
        m = masking.lcaam_mask(call, upstream, compute)
        scores = (call.q @ call.k.transpose(-2, -1)).to(compute)
        # M (B, 1, Nq, Nk) is one head's size: scaling it, or adding it with the scale as
        # alpha, spares a pass over the scores of every head
        if call.fusion == "add":
            scores = torch.add(m, scores, alpha=call.scale)
        elif scores.requires_grad or m.requires_grad or m.shape[0] > scores.shape[0]:
            scores = scores * (m * call.scale)
        else:  # nothing else reads the product of q and k: it is scaled in place
            scores = scores.mul_(m * call.scale)
        if upstream.bias is not None:
            scores = scores + upstream.bias.to(compute)
        keep = upstream.full_keep()
        dead = upstream.dead_rows()
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        if dead is not None:
            scores = scores.masked_fill(dead, 0.0)
        weights = torch.softmax(scores, dim=-1)
        if dead is not None:
            weights = weights.masked_fill(dead, 0.0)
        weights = weights.to(call.v.dtype)
        if call.dropout_p > 0.0:
            weights = F.dropout(weights, p=call.dropout_p)
        out = weights @ call.v
        return out, (weights if call.need_weights else None)
