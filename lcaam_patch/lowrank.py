"""The factorized generator (`generator="lowrank"`) and its exact route through SDPA.

M = A·Bᵀ with A = F_A(X_q) (B, Nq, R) from the query tokens and B = F_B(X_k) (B, Nk, R)
from the key tokens, so the generator has no bound on the number of tokens. The fused
scores never need M itself (DESIGN §6): widening every head turns them into a plain
scaled dot product that SDPA (flash/memory-efficient kernels on the GPU) computes exactly:

- mul: q'ᵢ = [A_ir·qᵢ]_r, k'ⱼ = [B_jr·kⱼ]_r (head dim D·R), so q'ᵢ·k'ⱼ = M_ij (qᵢ·kⱼ);
- add: q'ᵢ = [qᵢ, Aᵢ/scale], k'ⱼ = [kⱼ, Bⱼ] (head dim D+R, zero-padded to a multiple
  of 8), so scale·q'ᵢ·k'ⱼ = scale·qᵢ·kⱼ + M_ij.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionRequest, LowRankMask, _causal_keep, register_backend
from .config import NEUTRAL


def _stack(in_features: int, out_features: int, depth: int, hidden: int | None, **factory: object) -> nn.ModuleList:
    hidden = hidden or in_features
    widths = [in_features] + [hidden] * (depth - 1) + [out_features]
    return nn.ModuleList(nn.Linear(i, o, **factory) for i, o in pairwise(widths))


def _run(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for layer in layers[:-1]:
        x = F.relu(layer(x))
    return layers[-1](x)


class LowRankGenerator(nn.Module):
    """Maps query tokens (B, Nq, D) and key tokens (B, Nk, Dk) to the factors of M = A·Bᵀ.

    `query` and `key` are Linear-ReLU stacks of `depth` layers ending in `rank` outputs.
    With `init="identity"` the key stack's last layer starts at weight 0 and bias e₀
    (mul) or 0 (add), and the query stack's first output at weight 0 and bias 1, so M is
    the fusion's neutral value; the other query outputs keep PyTorch's random init, which
    gives every rank component a gradient from the first step.
    """

    def __init__(
        self,
        in_features: int,
        kv_in_features: int,
        rank: int,
        *,
        depth: int = 1,
        hidden: int | None = None,
        fusion: str = "mul",
        init: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.query = _stack(in_features, rank, depth, hidden, **factory)
        self.key = _stack(kv_in_features, rank, depth, hidden, **factory)
        self.rank = rank
        self.fusion = fusion
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise as configured: He init for the hidden layers (as `MaskGenerator`),
        PyTorch's default for the last ones, then identity if asked. Call it after
        `to_empty()` for a model patched on `meta` (`lcaam_patch.reset_generators`)."""
        with torch.no_grad():
            for stack in (self.query, self.key):
                for layer in stack[:-1]:
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    layer.bias.zero_()
                stack[-1].reset_parameters()
        if self.init == "identity":
            self.reset_to_identity()

    def reset_to_identity(self) -> None:
        """Make M the fusion's neutral value (1 for mul, 0 for add) for every input."""
        neutral = NEUTRAL[self.fusion]
        with torch.no_grad():
            key, query = self.key[-1], self.query[-1]
            key.weight.zero_()
            key.bias.zero_()
            if neutral != 0.0:
                key.bias[0] = 1.0
                query.weight[0].zero_()
                query.bias[0] = neutral

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> LowRankMask:
        """The factors of M for query tokens `x` and key tokens `kv` (default: `x`)."""
        return LowRankMask(_run(self.query, x), _run(self.key, x if kv is None else kv))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, fusion={self.fusion!r}"


def widen(
    q: torch.Tensor, k: torch.Tensor, mask: LowRankMask, *, fusion: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q', k' whose scaled dot products are the fused scores (S ◇ A·Bᵀ)."""
    a = mask.a.to(q.dtype).unsqueeze(1)
    b = mask.b.to(k.dtype).unsqueeze(1)
    if fusion == "mul":
        return (a.unsqueeze(-1) * q.unsqueeze(-2)).flatten(-2), (b.unsqueeze(-1) * k.unsqueeze(-2)).flatten(-2)
    heads = q.shape[1]
    pad = -(q.shape[-1] + a.shape[-1]) % 8
    q_wide = F.pad(torch.cat([q, (a / scale).expand(-1, heads, -1, -1)], -1), (0, pad))
    k_wide = F.pad(torch.cat([k, b.expand(-1, heads, -1, -1)], -1), (0, pad))
    return q_wide, k_wide


class LowRankSDPABackend:
    """A factorized M through `F.scaled_dot_product_attention` with widened heads, exactly.

    Upstream masks and causality go to SDPA as they are; rows whose keys are all masked
    are unmasked for the kernel and their output set to zero, so no NaN reaches autograd.
    """

    accepts_lowrank = True

    def supports(self, request: AttentionRequest) -> bool:
        """Factorized masks, either fusion, every device; never returns weights."""
        return request.mask_form == "lowrank" and not request.need_weights

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: LowRankMask,
        *,
        fusion: str,
        scale: float,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        dropout_p: float,
        need_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the widened q', k' with the upstream mask B."""
        q_wide, k_wide = widen(q, k, mask, fusion=fusion, scale=scale)
        value_dim = v.shape[-1]
        if q.is_cuda and value_dim < q_wide.shape[-1]:
            v = F.pad(v, (0, q_wide.shape[-1] - value_dim))  # equal head dims keep flash eligible
        dead = None
        if attn_mask is not None:
            if is_causal:
                keep = _causal_keep(q.shape[-2], k.shape[-2], q.device)
                attn_mask = attn_mask & keep if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~keep, float("-inf"))
                is_causal = False
            if attn_mask.dtype == torch.bool:
                dead = ~attn_mask.any(-1, keepdim=True)
                attn_mask = attn_mask | dead
            else:
                attn_mask = attn_mask.to(q.dtype)
                dead = torch.isneginf(attn_mask).all(-1, keepdim=True)
                attn_mask = attn_mask.masked_fill(dead, 0.0)
        out = F.scaled_dot_product_attention(
            q_wide, k_wide, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )[..., :value_dim]
        if dead is not None:
            out = out.masked_fill(dead, 0.0)
        return out, None


register_backend("lowrank_sdpa", LowRankSDPABackend(), priority=40)
