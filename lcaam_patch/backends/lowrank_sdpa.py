"""`backend="lowrank_sdpa"`: a factorized M = A·Bᵀ through SDPA with widened heads, exactly.

The fused scores never need M itself: widening every head turns them into a plain scaled
dot product that SDPA (flash/memory-efficient kernels on the GPU) computes exactly:

- mul: q'ᵢ = [A_ir·qᵢ]_r, k'ⱼ = [B_jr·kⱼ]_r (head dim D·R), so q'ᵢ·k'ⱼ = M_ij (qᵢ·kⱼ);
- add: q'ᵢ = [qᵢ, Aᵢ/scale], k'ⱼ = [kⱼ, Bⱼ] (head dim D+R, zero-padded to a multiple
  of 8), so scale·q'ᵢ·k'ⱼ = scale·qᵢ·kⱼ + M_ij.

The factors are used as they are: the masking module's sanitising of M at hard-masked keys
does not apply to them (a non-finite factor of a masked key is not cleaned).

A fused kernel's backward takes rowsum(dO·O) from the stored output, so where the softmax
saturates (|M| of 1e10 and more) its rounding, of order ε·|dO|·|v|, reaches q and the
factors multiplied by |M|: gradients of 1e3 to 1e13 where eager's are 0. On the CPU, a
call that autograd will differentiate therefore runs SDPA's math kernel, whose softmax
backward is eager's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import masking
from .call import AttentionCall, CallSpec, LowRankMask
from .sdpa import SDPA_GROUPS_HEADS, grouped


def widen(
    q: torch.Tensor, k: torch.Tensor, mask: LowRankMask, *, fusion: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q', k' whose scaled dot products are the fused scores (S ◇ A·Bᵀ)."""
    a, b = mask.a, mask.b
    a = (a if a.dtype == q.dtype else a.to(q.dtype)).unsqueeze(1)
    b = (b if b.dtype == k.dtype else b.to(k.dtype)).unsqueeze(1)
    if fusion == "mul":
        if a.shape[-1] == 1:  # rank 1: the heads keep their width, scaled per token
            return q * a, k * b
        return (a.unsqueeze(-1) * q.unsqueeze(-2)).flatten(-2), (b.unsqueeze(-1) * k.unsqueeze(-2)).flatten(-2)
    pad = -(q.shape[-1] + a.shape[-1]) % 8
    q_wide = F.pad(torch.cat([q, (a / scale).expand(-1, q.shape[1], -1, -1)], -1), (0, pad))
    k_wide = F.pad(torch.cat([k, b.expand(-1, k.shape[1], -1, -1)], -1), (0, pad))
    return q_wide, k_wide


class LowRankSDPABackend:
    """Factorized masks of either fusion on every device; never returns weights."""

    accepts_lowrank = True
    accepts_grouped_heads = SDPA_GROUPS_HEADS

    def refusal_for(self, spec: CallSpec) -> str | None:
        """Only factorized masks (generator='lowrank'), and no weights."""
        if not spec.is_lowrank:
            return "it needs M as factors, which only generator='lowrank' produces"
        if spec.need_weights:
            return "SDPA does not return attention weights (need_weights=True)"
        return None

    def refusal(self, call: AttentionCall) -> str | None:
        """`refusal_for` of the call's spec."""
        return self.refusal_for(call.spec)

    def __call__(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the widened q', k' under the upstream mask."""
        assert isinstance(call.mask, LowRankMask)
        q_wide, k_wide = widen(call.q, call.k, call.mask, fusion=call.fusion, scale=call.scale)
        v = call.v
        value_dim = v.shape[-1]
        if v.is_cuda and value_dim < q_wide.shape[-1]:
            v = F.pad(v, (0, q_wide.shape[-1] - value_dim))  # equal head dims keep flash eligible
        upstream = masking.upstream_mask(call)
        differentiated = torch.is_grad_enabled() and any(
            t.requires_grad for t in (q_wide, k_wide, v, upstream.bias) if t is not None
        )
        only_causal = upstream.causal and upstream.keep is None and upstream.bias is None
        attn_mask = None if only_causal else upstream.additive(q_wide.dtype)

        def attend() -> torch.Tensor:
            return F.scaled_dot_product_attention(
                q_wide,
                k_wide,
                v,
                attn_mask=attn_mask,
                dropout_p=call.dropout_p,
                is_causal=only_causal,
                scale=call.scale,
                **grouped(call),
            )

        if differentiated and v.device.type == "cpu":
            with sdpa_kernel(SDPBackend.MATH):
                out = attend()
        else:
            out = attend()
        if out.shape[-1] != value_dim:
            out = out[..., :value_dim]
        return masking.zero_dead_rows(out, upstream), None
