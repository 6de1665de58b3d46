"""The shape probe: one forward of a model on the `meta` device, recording the token counts
each attention module is called with, so adapters can bound a generator by what the model
really feeds its attention (class, distillation, register and detection tokens included).

Parameters and buffers are swapped for meta tensors for the one call (nothing is copied or
computed), the model runs in eval mode and is left as it was.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

TokenCounter = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[int, int]]
"""(module, forward args, forward kwargs) → (Nq, Nk) of that call."""

InputMaker = Callable[[torch.dtype], tuple[tuple[Any, ...], dict[str, Any]]]
"""dtype → (args, kwargs) of one forward of the probed model, made on the current device."""


def probe_tokens(
    model: nn.Module, sites: Sequence[tuple[str, nn.Module, TokenCounter]], inputs: Sequence[InputMaker]
) -> dict[str, tuple[int, int]]:
    """(Nq, Nk) per site path (paths relative to `model`), the maximum over its calls, for
    the first of `inputs` on which `model` runs on meta; {} when none does."""
    seen: dict[str, tuple[int, int]] = {}

    def recorder(path: str, count: TokenCounter) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            nq, nk = count(module, args, kwargs)
            old_q, old_k = seen.get(path, (0, 0))
            seen[path] = (max(old_q, nq), max(old_k, nk))

        return hook

    handles = [m.register_forward_pre_hook(recorder(p, c), with_kwargs=True) for p, m, c in sites]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for make in inputs:
            seen.clear()
            try:
                _forward_on_meta(model, make)
                return dict(seen)
            except Exception:
                continue
        return {}
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training


def _forward_on_meta(model: nn.Module, make: InputMaker) -> None:
    with torch.no_grad(), torch.device("meta"):
        tensors = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
        dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
        args, kwargs = make(dtype)
        if all(t.is_meta for t in tensors.values()):
            model(*args, **kwargs)
        else:
            functional_call(model, {name: t.to("meta") for name, t in tensors.items()}, args, kwargs)
