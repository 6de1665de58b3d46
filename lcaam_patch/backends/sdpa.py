"""`backend="sdpa"`: M folded into `F.scaled_dot_product_attention`, exactly.

- add: M joins the float mask SDPA adds to the scores.
- mul with one query (decoding): M is one row over the keys, so (q·kⱼ)·Mⱼ = q·(Mⱼkⱼ) and
  SDPA attends keys scaled by M. With several queries M differs per query and no key
  scaling equals it: the call is refused (`eager`, `triton` or `flex` compute it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import masking
from .call import AttentionCall, CallSpec

SDPA_GROUPS_HEADS = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)
"""Whether this torch's SDPA takes keys with fewer heads than the queries (`enable_gqa`)."""


def grouped(call: AttentionCall) -> dict[str, bool]:
    """SDPA's keyword for a call whose k and v have fewer heads than q (none otherwise)."""
    return {"enable_gqa": True} if call.k.shape[1] != call.q.shape[1] else {}


class SDPABackend:
    """M, the upstream mask and causality folded into one SDPA call."""

    accepts_grouped_heads = SDPA_GROUPS_HEADS

    def refusal_for(self, spec: CallSpec) -> str | None:
        """SDPA adds a mask to the scores; it multiplies them only by scaling the keys, which
        one query's single row of M allows; it never returns weights."""
        if spec.need_weights:
            return "SDPA does not return attention weights (need_weights=True)"
        if spec.fusion == "mul":
            if not spec.single_query:
                return (
                    "SDPA can add M to the scores but not multiply them (fusion='mul') unless the call has "
                    "one query, whose row of M can scale the keys"
                )
            if spec.dtype == torch.float16:
                return "keys scaled by M can overflow float16, where eager's float32 scores do not (fusion='mul')"
        return None

    def refusal(self, call: AttentionCall) -> str | None:
        """`refusal_for` of the call's spec."""
        return self.refusal_for(call.spec)

    def __call__(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One SDPA call; dead rows are computed unmasked and their output set to 0."""
        upstream = masking.upstream_mask(call)
        m = masking.lcaam_mask(call, upstream, call.dtype)
        k = call.k
        if call.fusion == "mul":
            k, bias = k * m.transpose(-1, -2), upstream.additive(call.dtype)
        else:
            bias = upstream.additive(call.dtype, m)
        out = F.scaled_dot_product_attention(
            call.q, k, call.v, attn_mask=bias, dropout_p=call.dropout_p, scale=call.scale, **grouped(call)
        )
        return masking.zero_dead_rows(out, upstream), None
