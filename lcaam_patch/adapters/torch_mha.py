"""`torch.nn.MultiheadAttention`, self- and cross-attention, batch-first or sequence-first.

The generator reads the query tokens and outputs one column per key token, so
cross-attention with Nq ≠ Nk works; the bound on key tokens is `max_kv_tokens`
(or `max_tokens`), which the user gives: the module does not know its sequence length.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import masking
from ..config import LCAAMConfig
from ..errors import MissingBoundError, UnsupportedModuleError
from ..site import LCAAMSite, SiteGeometry
from .base import Adapter


def keep_off_fast_path(module: Any, args: tuple[Any, ...]) -> None:
    """Forward pre-hook that does nothing; its presence keeps
    `nn.TransformerEncoderLayer` off its fused fast path, which would bypass the patch."""


class MultiheadAttentionAdapter(Adapter):
    """Patches `torch.nn.MultiheadAttention` instances."""

    name = "torch_mha"

    def attention_types(self) -> tuple[type[nn.Module], ...]:
        """`nn.MultiheadAttention` only (subclasses may change its forward)."""
        return (nn.MultiheadAttention,)

    def geometry(self, module: Any, path: str, root: Any, config: LCAAMConfig) -> SiteGeometry:
        """Reject add_zero_attn/add_bias_kv; bounds come from max_tokens/max_kv_tokens.

        generator="lowrank" needs no bound; it reads the key tokens (width `kdim`).
        """
        for option, active in (
            ("add_zero_attn", module.add_zero_attn),
            ("add_bias_kv", module.bias_k is not None),
        ):
            if active:
                raise UnsupportedModuleError(
                    f"nn.MultiheadAttention at {path!r} uses {option}=True, which LCAAM does not "
                    f"support (it appends a key the generator cannot place); build it with "
                    f"{option}=False or exclude it with exclude=[{path!r}]"
                )
        max_kv = config.max_kv_tokens or config.max_tokens
        if max_kv is None and config.generator != "lowrank":
            raise MissingBoundError(
                f"nn.MultiheadAttention at {path!r} does not know how many tokens it sees; pass "
                f"max_tokens=N (the longest query sequence) and, for cross-attention, "
                f"max_kv_tokens=M (the longest key sequence) to lcaam_patch.apply"
            )
        cross = not module._qkv_same_embed_dim or (
            config.max_kv_tokens is not None and config.max_kv_tokens != config.max_tokens
        )
        return SiteGeometry(
            module.embed_dim, config.max_tokens, max_kv, "cross" if cross else "self", kv_embed_dim=module.kdim
        )

    def prepare(self, module: Any, root: Any) -> list[nn.TransformerEncoder]:
        """Keep fused fast paths of enclosing `nn.Transformer*` modules from bypassing the patch."""
        module.register_forward_pre_hook(keep_off_fast_path)
        encoders = [
            m
            for m in root.modules()
            if isinstance(m, nn.TransformerEncoder)
            and getattr(m, "use_nested_tensor", False)
            and any(layer is module for layer in m.modules())
        ]
        for encoder in encoders:
            encoder.use_nested_tensor = False
        return encoders

    def restore(self, module: Any, state: list[nn.TransformerEncoder] | None) -> None:
        """Remove the marker hook and re-enable nested tensors where they were on."""
        hooks = module._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is keep_off_fast_path]:
            del hooks[key]
        for encoder in state or []:
            encoder.use_nested_tensor = True

    def forward(
        self,
        module: Any,
        site: LCAAMSite,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`nn.MultiheadAttention.forward` with LCAAM attention; same arguments and outputs."""
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        if query.is_nested or key.is_nested or value.is_nested:
            raise UnsupportedModuleError(
                f"nn.MultiheadAttention at {site.path!r} received nested tensors: an enclosing "
                f"nn.TransformerEncoder packs padded batches into nested tensors in eval mode, "
                f"which this patch does not compute. Patch the enclosing model instead "
                f"(lcaam_patch.apply(encoder, ...) turns nested tensors off), or build the "
                f"encoder with enable_nested_tensor=False"
            )
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not module.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, E = query.shape
        S = key.shape[1]
        H = module.num_heads
        q, k, v = _project(module, query, key, value)
        q, k, v = (t.reshape(B, -1, H, module.head_dim).transpose(1, 2) for t in (q, k, v))
        bias = _merge_masks(attn_mask, key_padding_mask, B, H, L, S, q.dtype)
        out, weights = site.attend(
            module,
            query,
            q,
            k,
            v,
            scale=module.head_dim**-0.5,
            attn_mask=bias,
            dropout_p=module.dropout if module.training else 0.0,
            need_weights=need_weights,
            kv_tokens=key,
        )
        out = out.transpose(1, 2).reshape(B, L, E)
        out = F.linear(out, module.out_proj.weight, module.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not module.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights


def _project(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    if module.in_proj_bias is not None:
        b_q, b_k, b_v = module.in_proj_bias.chunk(3)
    else:
        b_q = b_k = b_v = None
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _merge_masks(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    B: int,
    H: int,
    L: int,
    S: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """MHA's masks (bool with True = masked, or additive floats) as one mask of
    `AttentionCall`'s convention, broadcastable to (B, H, L, S)."""
    if attn_mask is not None:
        attn_mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
        attn_mask = attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2 else attn_mask.view(B, H, L, S)
    if key_padding_mask is not None:
        key_padding_mask = ~key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask
        key_padding_mask = key_padding_mask.view(B, 1, 1, S)
    return masking.combine([attn_mask, key_padding_mask], dtype)


adapter = MultiheadAttentionAdapter()
