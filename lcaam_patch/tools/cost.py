"""`cost(model, example_inputs)`: parameters, FLOPs, MACs and latency with and without LCAAM
(the paper's Table 4), counted with PyTorch's own FLOP counter."""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..patching import remove, require_patched


@dataclasses.dataclass(frozen=True)
class CostRow:
    """Cost of one model on the example inputs (forward pass)."""

    name: str
    params: int
    flops: int
    latency_ms: float

    @property
    def macs(self) -> int:
        """Multiply-accumulates: half the FLOPs of the matrix products counted."""
        return self.flops // 2


@dataclasses.dataclass(frozen=True)
class CostTable:
    """Unpatched and patched cost side by side; `str()` renders a table."""

    unpatched: CostRow
    patched: CostRow

    def __str__(self) -> str:
        base, lcaam = self.unpatched, self.patched

        def ratio(a: float, b: float) -> str:
            return f"{a / b:.3f}×" if b else "-"

        rows = [
            ("", "params", "GFLOPs", "GMACs", "latency ms"),
            (
                base.name,
                f"{base.params:,}",
                f"{base.flops / 1e9:.4f}",
                f"{base.macs / 1e9:.4f}",
                f"{base.latency_ms:.2f}",
            ),
            (
                lcaam.name,
                f"{lcaam.params:,}",
                f"{lcaam.flops / 1e9:.4f}",
                f"{lcaam.macs / 1e9:.4f}",
                f"{lcaam.latency_ms:.2f}",
            ),
            (
                "ratio",
                ratio(lcaam.params, base.params),
                ratio(lcaam.flops, base.flops),
                ratio(lcaam.macs, base.macs),
                ratio(lcaam.latency_ms, base.latency_ms),
            ),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _cpu_flash_sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def measure(model: nn.Module, example_inputs: Any, *, name: str, repeats: int = 10, warmup: int = 2) -> CostRow:
    """FLOPs (PyTorch's FlopCounterMode), parameters and median forward latency of `model`."""
    from torch.utils.flop_counter import FlopCounterMode

    # PyTorch's counter knows the CUDA SDPA kernels but not the CPU one.
    extra_formulas = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flops}
    args = _as_args(example_inputs)
    with torch.no_grad():
        with FlopCounterMode(display=False, custom_mapping=extra_formulas) as counter:
            model(*args)
        for _ in range(warmup):
            model(*args)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(*args)
            times.append((time.perf_counter() - start) * 1e3)
    return CostRow(
        name, sum(p.numel() for p in model.parameters()), counter.get_total_flops(), statistics.median(times)
    )


def cost(model: nn.Module, example_inputs: Any | Sequence[Any], *, repeats: int = 10) -> CostTable:
    """Cost of a patched `model` and of the same model unpatched, on `example_inputs`.

    FLOPs count matrix products (the generator's Linear layers and the attention's two
    products); element-wise fusion is not a FLOP in PyTorch's counter. Latency is the
    median of `repeats` forward passes in eval mode without gradients.
    """
    require_patched(model, "cost")
    was_training = model.training
    model.eval()
    try:
        unpatched = remove(copy.deepcopy(model))
        return CostTable(
            unpatched=measure(unpatched, example_inputs, name="unpatched", repeats=repeats),
            patched=measure(model, example_inputs, name="LCAAM", repeats=repeats),
        )
    finally:
        model.train(was_training)
