"""`backend="triton"`: the fused Triton kernel, forward and backward (`ops.fused_attention`).

It serves CUDA tensors (fp16, bf16, fp32; head dims up to 128; bool or float upstream
masks without a gradient; causal; no dropout, no weights). CPU tensors are served only
under Triton's interpreter (`TRITON_INTERPRET=1`), which the tests use. Triton is
imported on the first call, not before.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import torch
from packaging.version import Version

from .. import masking
from ..call import AttentionCall, CallSpec

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128

MIN_TRITON = Version("3.4")
"""The oldest Triton the kernel is declared for (as the `test` extra of pyproject.toml): its
tests run on 3.8; Triton 3.2's interpreter fails on them (NumPy 2 scalars)."""


def installed_triton() -> tuple[bool, str | None]:
    """Whether Triton can be imported, and its version when a distribution declares one
    (`triton`, or `pytorch-triton` as PyTorch's nightlies ship it)."""
    if importlib.util.find_spec("triton") is None:
        return False, None
    for distribution in ("triton", "pytorch-triton"):
        try:
            return True, importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return True, None


def triton_refusal(found: bool, version: str | None) -> str | None:
    """Why this Triton cannot serve the kernel (None when it can; an undeclared version is trusted)."""
    if not found:
        return f"Triton is not installed (pip install 'triton>={MIN_TRITON}')"
    if version is not None and Version(version).release < MIN_TRITON.release:
        return f"the kernel needs Triton >= {MIN_TRITON}, and {version} is installed"
    return None


TRITON_REFUSAL = triton_refusal(*installed_triton())
"""Read once, when this module is imported, so that `refusal` reads a constant: no filesystem
lookup per call, and nothing for `torch.compile` to trace into."""


_INTERPRET_KEY = os.environ.encodekey("TRITON_INTERPRET") if hasattr(os.environ, "encodekey") else None


def _interpret_setting() -> str | None:
    """`os.environ.get("TRITON_INTERPRET")`, read on every attention call: when the variable is
    unset, CPython's `os.environ.get` raises and catches two KeyErrors (several µs per call
    inside a model), so absence is first checked in the dict `os.environ` keeps in sync."""
    data = getattr(os.environ, "_data", None)
    if type(data) is dict and _INTERPRET_KEY not in data:
        return None
    return os.environ.get("TRITON_INTERPRET")


def interpreter_enabled() -> bool:
    """Whether `TRITON_INTERPRET=1` asks for the kernel to run on CPU tensors."""
    return (_interpret_setting() or "0").lower() in ("1", "true", "on", "yes")


class TritonBackend:
    """Fused mul/add attention with M read per tile and dM summed over heads in the kernel."""

    def refusal_context(self) -> str | None:
        """`TRITON_INTERPRET` as set now: whether CPU calls are served depends on it."""
        return _interpret_setting()

    def refusal_for(self, spec: CallSpec) -> str | None:
        """CUDA (or the CPU under `TRITON_INTERPRET=1`), no weights, no dropout, D <= 128."""
        if spec.need_weights:
            return "the kernel does not return attention weights (need_weights=True)"
        if spec.dropout_p > 0.0:
            return "the kernel has no attention dropout (dropout_p > 0)"
        if spec.upstream_mask_needs_grad:
            return "the kernel passes no gradient to a float upstream mask that requires one"
        if spec.dtype not in DTYPES:
            return f"the kernel computes fp16, bf16 and fp32, not {spec.dtype}"
        if max(spec.head_dim, spec.value_dim) > MAX_HEAD_DIM:
            return f"the kernel takes head dims up to {MAX_HEAD_DIM}, not {max(spec.head_dim, spec.value_dim)}"
        if TRITON_REFUSAL is not None:
            return TRITON_REFUSAL
        if spec.device_type == "cuda":
            return None
        if spec.device_type == "cpu" and interpreter_enabled():
            return None
        return (
            f"the kernel runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), and "
            f"these are on {spec.device_type}"
        )

    def refusal(self, call: AttentionCall) -> str | None:
        """`refusal_for` of the call's spec."""
        return self.refusal_for(call.spec)

    def __call__(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the kernel; M is sanitised and cast to the inputs' dtype with saturation."""
        from .ops import fused_attention

        upstream = masking.upstream_mask(call)
        m = masking.lcaam_mask(call, upstream, call.dtype).squeeze(-3)
        kernel_mask = upstream.keep if upstream.bias is None else upstream.additive(call.dtype, fold_causal=False)
        out = fused_attention(
            call.q,
            call.k,
            call.v,
            m,
            fusion=call.fusion,
            scale=call.scale,
            attn_mask=kernel_mask,
            is_causal=call.is_causal,
        )
        return out, None
