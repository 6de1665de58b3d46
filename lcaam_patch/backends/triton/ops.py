"""Host side of the fused Triton attention: launches, autograd, and torch.library ops.

The forward and backward are `torch.library` custom ops (`lcaam::fused_attention_fwd`,
`lcaam::fused_attention_bwd`), so `torch.compile` keeps them as opaque calls and autograd
reaches them through `register_autograd`. `forward_launch` and `backward_launches` build
each launch's arguments (also for the sm_90 compile test, which specialises them as Triton's
JIT would); the kernels read M from rows aligned to `ALIGN` elements (`kernel_mask`) and
write dM the same way, without changing the shape of anything the caller sees.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch

_KERNEL_SOURCE = Path(__file__).with_name("kernels.py")
_INTERPRETER_BLOCK = 16
_DELTA_BLOCK = 64


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


ALIGN = 16
"""Rows of M and dM start every ALIGN elements in the kernels' buffers (16-byte or wider
accesses), whatever Nk is; the kernels mask by the true Nk."""

Grid = Callable[[dict[str, Any]], tuple[int, ...]]


class Launch(NamedTuple):
    """One kernel launch: `kernels(interpret).<kernel>[grid](*args, **kwargs)`."""

    kernel: str
    grid: Grid
    args: tuple[object, ...]
    kwargs: dict[str, object]

    def run(self, interpret: bool) -> None:
        """Launch it, compiled for the GPU or under the interpreter."""
        getattr(kernels(interpret), self.kernel)[self.grid](*self.args, **self.kwargs)


def _block(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _bias_strides(bias: torch.Tensor | None, shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if bias is None else tuple(bias.expand(shape).stride())  # type: ignore[return-value]


def _bias_kind(bias: torch.Tensor | None) -> int:
    if bias is None:
        return 0
    return 2 if bias.dtype == torch.bool else 1


def _launch_options(q: torch.Tensor, v: torch.Tensor, interpret: bool) -> dict[str, object]:
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


def _rows_aligned(mask: torch.Tensor) -> bool:
    return mask.stride(-1) == 1 and mask.stride(-2) % ALIGN == 0 and mask.stride(0) % ALIGN == 0


def mask_store_shape(mask: torch.Tensor) -> tuple[int, ...]:
    """Shape of the aligned copy of M (B, Nq, Nk): (B or 1, Nq, Nk rounded up to ALIGN), or
    (0,) when M's rows are aligned already and it is read in place."""
    if _rows_aligned(mask):
        return (0,)
    B, NQ, NK = mask.shape
    return (1 if mask.stride(0) == 0 else B, NQ, _aligned(NK))


def kernel_mask(mask: torch.Tensor, store: torch.Tensor) -> torch.Tensor:
    """The (B, Nq, Nk) view of M the kernels read: into the aligned `store` when there is one."""
    return mask if store.numel() == 0 else store[..., : mask.shape[-1]].expand(mask.shape)


def forward_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    fusion_mul: bool,
    causal: bool,
    scale: float,
    *,
    interpret: bool,
) -> tuple[Launch, torch.Tensor, torch.Tensor]:
    """The forward launch on `mask` (rows aligned, see `kernel_mask`), its output (B, H, Nq, Dv)
    and fp32 log-sum-exp (B, H, Nq; +inf for fully masked rows), still unwritten."""
    B, H, NQ, D = q.shape
    NK, DV = k.shape[-2], v.shape[-1]
    out = _head_major_empty(q, DV)
    lse = torch.empty(B, H, NQ, dtype=torch.float32, device=q.device)
    args = (
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
    )
    flags = dict(FUSION_MUL=fusion_mul, BIAS_KIND=_bias_kind(bias), CAUSAL=causal, **_launch_options(q, v, interpret))
    return Launch("_fwd", lambda meta: (H, -(-NQ // meta["BLOCK_M"]), B), args, flags), out, lse


def backward_launches(
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
    *,
    interpret: bool,
) -> tuple[list[Launch], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The backward's launches in order (delta, dK/dV/dM, dQ) and the buffers they write:
    dQ, dK, dV and the fp32 dM (B, Nq, Nk rounded up to ALIGN; only [..., :Nk] is written)."""
    B, H, NQ, D = q.shape
    NK, DV = k.shape[-2], v.shape[-1]
    delta = torch.empty(B, H, NQ, dtype=torch.float32, device=q.device)
    dq = _head_major_empty(q, D)
    dk = _head_major_empty(k, D)
    dv = _head_major_empty(v, DV)
    dm = (torch.zeros if causal else torch.empty)(B, NQ, _aligned(NK), dtype=torch.float32, device=q.device)
    options = _launch_options(q, v, interpret)
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
    delta_block = _INTERPRETER_BLOCK if interpret else _DELTA_BLOCK
    launches = [
        Launch(
            "_bwd_delta",
            lambda meta: (H, -(-NQ // delta_block), B),
            (out, grad_out, delta, *out.stride(), *grad_out.stride(), H, NQ, DV),
            dict(BLOCK_M=delta_block, BLOCK_DV=options["BLOCK_DV"]),
        ),
        Launch(
            "_bwd_dkdv_dm",
            lambda meta: (-(-NK // meta["BLOCK_N"]), B),
            (
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
                *dm.stride()[:2],
                H,
                NQ,
                NK,
                D,
                DV,
                scale,
            ),
            flags,
        ),
        Launch(
            "_bwd_dq",
            lambda meta: (H, -(-NQ // meta["BLOCK_M"]), B),
            (q, k, v, mask, bias_ptr, grad_out, lse, delta, dq, *common, *dq.stride(), H, NQ, NK, D, DV, scale),
            flags,
        ),
    ]
    return launches, (dq, dk, dv, dm)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output (B, H, Nq, Dv), fp32 log-sum-exp (B, H, Nq; +inf for fully masked rows) and the
    row-aligned copy of M the kernels read (see `kernel_mask`; empty when M is read in place)."""
    interpret = q.device.type != "cuda"
    store = mask.new_empty(mask_store_shape(mask))
    if store.numel():
        store[..., : mask.shape[-1]].copy_(mask[: store.shape[0]])
    launch, out, lse = forward_launch(
        q, k, v, kernel_mask(mask, store), bias, fusion_mul, causal, scale, interpret=interpret
    )
    launch.run(interpret)
    return out, lse, store


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        _head_major_empty(q, v.shape[-1]),
        q.new_empty(q.shape[:-1], dtype=torch.float32),
        mask.new_empty(mask_store_shape(mask)),
    )


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
    """dQ, dK, dV and dM (summed over heads; rows ALIGN-aligned in storage) of the fused attention."""
    interpret = q.device.type != "cuda"
    launches, (dq, dk, dv, dm) = backward_launches(
        grad_out, q, k, v, mask, bias, out, lse, fusion_mul, causal, scale, interpret=interpret
    )
    for launch in launches:
        launch.run(interpret)
    return dq, dk, dv, dm.to(mask.dtype)[..., : mask.shape[-1]]


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
    B, NQ, NK = mask.shape
    return (
        _head_major_empty(q, q.shape[-1]),
        _head_major_empty(k, k.shape[-1]),
        _head_major_empty(v, v.shape[-1]),
        mask.new_empty(B, NQ, _aligned(NK))[..., :NK],
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    q, k, v, mask, bias, fusion_mul, causal, scale = inputs
    out, lse, store = output
    ctx.mark_non_differentiable(lse, store)
    ctx.save_for_backward(q, k, v, kernel_mask(mask, store), bias, out, lse)
    ctx.flags = (fusion_mul, causal, scale)


def _backward(ctx: Any, grad_out: torch.Tensor, *_: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
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
    out, _, _ = fused_attention_fwd(q, k, v, mask, attn_mask, fusion == "mul", is_causal, float(scale))
    return out
