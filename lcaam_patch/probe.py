"""The shape probe: one forward of a model on the `meta` device, recording the token counts
each attention module is called with, so adapters can bound a generator by what the model
really feeds its attention (class, distillation, register and detection tokens included).

Parameters and buffers are swapped for meta tensors for the one call (nothing is copied or
computed), the model runs in eval mode and is left as it was.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

TokenCounter = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[int, int]]
"""(module, forward args, forward kwargs) → (Nq, Nk) of that call."""

InputMaker = Callable[[torch.dtype], tuple[tuple[Any, ...], dict[str, Any]]]
"""dtype → (args, kwargs) of one forward of the probed model, made on the current device."""

_EXAMPLE_INPUTS: contextvars.ContextVar[tuple[tuple[Any, ...], dict[str, Any]] | None] = contextvars.ContextVar(
    "lcaam_example_inputs", default=None
)


@contextlib.contextmanager
def example_inputs(inputs: Any) -> Iterator[None]:
    """Make `inputs` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments of one forward of the model being patched; None for none) what
    `given_inputs` returns while the block runs: `apply(..., example_inputs=...)` and
    `survey` set it around their walk, so that adapters which probe can use them."""
    token = _EXAMPLE_INPUTS.set(None if inputs is None else as_arguments(inputs))
    try:
        yield
    finally:
        _EXAMPLE_INPUTS.reset(token)


def as_arguments(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`example_inputs` as (args, kwargs): a dict is keyword arguments, a tuple or list
    positional ones, anything else the one positional argument."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def given_inputs() -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The example inputs of the `apply` or `survey` running now, as (args, kwargs), or None."""
    return _EXAMPLE_INPUTS.get()


def on_meta(value: Any) -> Any:
    """`value` with every tensor in it (nested in tuples, lists and dicts) replaced by an
    empty tensor of the same shape and dtype on `meta`."""
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(on_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: on_meta(v) for k, v in value.items()}
    return value


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
                forward_on_meta(model, make)
                return dict(seen)
            except Exception:
                continue
        return {}
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training


def forward_on_meta(model: nn.Module, make: InputMaker) -> Any:
    """One forward of `model` on `meta` with the inputs `make` builds, its parameters and
    buffers swapped for meta tensors for the call; returns the (meta) output."""
    with torch.no_grad(), torch.device("meta"):
        tensors = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
        dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
        args, kwargs = make(dtype)
        if all(t.is_meta for t in tensors.values()):
            return model(*args, **kwargs)
        return functional_call(model, {name: t.to("meta") for name, t in tensors.items()}, args, kwargs)


def image_size_pair(size: Any) -> tuple[int, int] | None:
    """(H, W) from an int or a pair of ints (a config's image size), None for anything else."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    return None
