"""Fused kernels for LCAAM attention.

`lcaam_patch.kernels.attention.fused_attention` runs the Triton kernel (forward and
backward) on CUDA tensors, and on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, for tests). Importing this package does not import Triton.
"""

from __future__ import annotations

import importlib.util
import os


def triton_available() -> bool:
    """Whether Triton can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether `TRITON_INTERPRET=1` asks for the kernel to run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

