"""Host side of the fused Triton attention: launches, autograd, and torch.library ops.

The forward and backward are `torch.library` custom ops (`lcaam::fused_attention_fwd`,
`lcaam::fused_attention_bwd`), so `torch.compile` keeps them as opaque calls and autograd
reaches them through `register_autograd`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

_KERNEL_SOURCE = Path(__file__).with_name("kernels.py")
_INTERPRETER_BLOCK = 16


@contextlib.contextmanager
def _interpret_env(on: bool) -> Iterator[None]:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def kernels(interpret: bool) -> ModuleType:
    """The kernel module, compiled for the GPU or run by Triton's interpreter.

    `triton.jit` fixes the mode when it decorates, so the source is executed once per
    mode; both can live in one process (CUDA tensors compiled, CPU tensors interpreted).
    """
    name = f"lcaam_patch.backends.triton._kernels_{'interpreted' if interpret else 'compiled'}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, _KERNEL_SOURCE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        with _interpret_env(interpret):
            spec.loader.exec_module(module)
        sys.modules[name] = module
    return module


def _block(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _bias_strides(bias: torch.Tensor | None, shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if bias is None else tuple(bias.expand(shape).stride())  # type: ignore[return-value]


def _bias_kind(bias: torch.Tensor | None) -> int:
    if bias is None:
        return 0
    return 2 if bias.dtype == torch.bool else 1


def _launch_options(q: torch.Tensor, v: torch.Tensor) -> dict[str, object]:
    interpret = q.device.type != "cuda"
    options: dict[str, object] = dict(
        BLOCK_D=_block(q.shape[-1]),
        BLOCK_DV=_block(v.shape[-1]),
        UPCAST=interpret,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if interpret:
        options.update(BLOCK_M=_INTERPRETER_BLOCK, BLOCK_N=_INTERPRETER_BLOCK)
    return options


def _head_major_empty(like: torch.Tensor, last: int) -> torch.Tensor:
    """An uninitialised (B, H, N, last) tensor laid out as (B, N, H, last), as flash returns."""
    B, H, N, _ = like.shape
    return like.new_empty(B, N, H, last).transpose(1, 2)


@torch.library.custom_op("lcaam::fused_attention_fwd", mutates_args=())
def fused_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    fusion_mul: bool,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, H, Nq, Dv) and fp32 log-sum-exp (B, H, Nq; +inf for fully masked rows)."""
    B, H, NQ, D = q.shape
    NK, DV = k.shape[-2], v.shape[-1]
    out = _head_major_empty(q, DV)
    lse = torch.empty(B, H, NQ, dtype=torch.float32, device=q.device)
    options = _launch_options(q, v)
    module = kernels(interpret=q.device.type != "cuda")

    def grid(meta: dict[str, Any]) -> tuple[int, int, int]:
        return H, -(-NQ // meta["BLOCK_M"]), B

    module._fwd[grid](
        q,
        k,
        v,
        mask,
        mask if bias is None else bias,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *mask.stride(),
        *_bias_strides(bias, (B, H, NQ, NK)),
        *out.stride(),
        H,
        NQ,
        NK,
        D,
        DV,
        scale,
        FUSION_MUL=fusion_mul,
        BIAS_KIND=_bias_kind(bias),
        CAUSAL=causal,
        **options,
    )
    return out, lse


@fused_attention_fwd.register_fake
def _fused_attention_fwd_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    fusion_mul: bool,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _head_major_empty(q, v.shape[-1]), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("lcaam::fused_attention_bwd", mutates_args=())
def fused_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    fusion_mul: bool,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV and dM (summed over heads) of the fused attention."""
    B, H, NQ, D = q.shape
    NK, DV = k.shape[-2], v.shape[-1]
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    dq = _head_major_empty(q, D)
    dk = _head_major_empty(k, D)
    dv = _head_major_empty(v, DV)
    dm = (torch.zeros if causal else torch.empty)(B, NQ, NK, dtype=torch.float32, device=q.device)
    options = _launch_options(q, v)
    module = kernels(interpret=q.device.type != "cuda")
    flags = dict(FUSION_MUL=fusion_mul, BIAS_KIND=_bias_kind(bias), CAUSAL=causal, **options)
    common = (
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *mask.stride(),
        *_bias_strides(bias, (B, H, NQ, NK)),
        *grad_out.stride(),
    )
    bias_ptr = mask if bias is None else bias
    module._bwd_dkdv_dm[lambda meta: (-(-NK // meta["BLOCK_N"]), B)](
        q,
        k,
        v,
        mask,
        bias_ptr,
        grad_out,
        lse,
        delta,
        dk,
        dv,
        dm,
        *common,
        *dk.stride(),
        *dv.stride(),
        H,
        NQ,
        NK,
        D,
        DV,
        scale,
        **flags,
    )
    module._bwd_dq[lambda meta: (H, -(-NQ // meta["BLOCK_M"]), B)](
        q,
        k,
        v,
        mask,
        bias_ptr,
        grad_out,
        lse,
        delta,
        dq,
        *common,
        *dq.stride(),
        H,
        NQ,
        NK,
        D,
        DV,
        scale,
        **flags,
    )
    return dq, dk, dv, dm.to(mask.dtype)


@fused_attention_bwd.register_fake
def _fused_attention_bwd_fake(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    fusion_mul: bool,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        _head_major_empty(q, q.shape[-1]),
        _head_major_empty(k, k.shape[-1]),
        _head_major_empty(v, v.shape[-1]),
        torch.empty_like(mask, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, mask, bias, fusion_mul, causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, mask, bias, out, lse)
    ctx.flags = (fusion_mul, causal, scale)


def _backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    q, k, v, mask, bias, out, lse = ctx.saved_tensors
    dq, dk, dv, dm = fused_attention_bwd(grad_out, q, k, v, mask, bias, out, lse, *ctx.flags)
    return dq, dk, dv, dm, None, None, None, None


fused_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    fusion: str,
    scale: float,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """softmax((QKᵀ·scale ◇ M) + B) V with the Triton kernel, differentiable in q, k, v, M.

    Args:
        q, k, v: (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv); D, Dv <= 128; k and v
            may have one head (or batch) shared by all.
        mask: M, (B, Nq, Nk), shared by every head.
        fusion: "mul" or "add".
        scale: the factor on QKᵀ.
        attn_mask: B, broadcastable to (B, H, Nq, Nk): bool (True = attend) or additive
            float (no gradient flows into it).
        is_causal: keep keys j <= i (top-left aligned).
    """
    B, H, NQ, _ = q.shape
    NK = k.shape[-2]
    k, v = k.expand(B, H, NK, -1), v.expand(B, H, NK, -1)  # shared key heads: stride 0
    if attn_mask is not None:
        attn_mask = attn_mask.expand(B, H, NQ, NK)
    mask = mask.expand(B, NQ, NK)
    out, _ = fused_attention_fwd(q, k, v, mask, attn_mask, fusion == "mul", is_causal, float(scale))
    return out
