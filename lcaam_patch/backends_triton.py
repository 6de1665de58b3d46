"""`backend="triton"`: the fused Triton kernel of `lcaam_patch.kernels`, forward and backward.

It serves CUDA tensors (fp16, bf16, fp32; head dims up to 128; bool or float upstream
masks without a gradient; causal; no dropout, no weights). CPU tensors are served only
under Triton's interpreter (`TRITON_INTERPRET=1`), which the tests use; `auto` never
sees it otherwise. Triton is imported on the first call, not before.
"""

from __future__ import annotations

import torch

from .attention import AttentionRequest, register_backend
from .kernels import interpreter_enabled, triton_available

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128


class TritonBackend:
    """Fused mul/add attention with M read per tile and dM summed over heads in the kernel."""

    def supports(self, request: AttentionRequest) -> bool:
        """CUDA (or the CPU under `TRITON_INTERPRET=1`), no weights, no dropout, D <= 128."""
        if request.need_weights or request.dropout or request.attn_mask_grad:
            return False
        if request.dtype not in DTYPES:
            return False
        if any(d is not None and d > MAX_HEAD_DIM for d in (request.head_dim, request.value_dim)):
            return False
        if request.device_type == "cuda":
            return triton_available()
        return request.device_type == "cpu" and interpreter_enabled() and triton_available()

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
        """Run the kernel; M is cast to the inputs' dtype as the eager backend does."""
        from .kernels.attention import fused_attention

        out = fused_attention(
            q, k, v, mask.to(q.dtype), fusion=fusion, scale=scale, attn_mask=attn_mask, is_causal=is_causal
        )
        return out, None


register_backend("triton", TritonBackend(), priority=30)
