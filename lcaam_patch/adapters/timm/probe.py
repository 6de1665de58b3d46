"""The shape probe: one forward of a timm model on the `meta` device at its default input
size, recording (Nq, Nk) of every claimed attention module.

The probed model is the outermost module on the site's path that carries timm's
`pretrained_cfg` (or `default_cfg`), so a timm backbone inside a user's wrapper is probed on
its own. Parameters and buffers are swapped for meta tensors for the one call (nothing is
copied or computed), the model runs in eval mode and is left as it was. Results are cached
per probed model and recomputed when its claimed modules or input size change, so one
`apply` probes once.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

TokenCounter = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[int, int]]
"""(module, forward args, forward kwargs) → (Nq, Nk) of that call."""

_Key = tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[_Key, dict[str, tuple[int, int]]]] = weakref.WeakKeyDictionary()


def probed_tokens(
    root: nn.Module, path: str, counter: Callable[[nn.Module], TokenCounter | None]
) -> tuple[int, int] | None:
    """(Nq, Nk) of the module at `path` in `root` seen by the probe, None when the probe
    cannot run (no timm model on the path, or its forward fails on meta) or never calls it.

    `counter` gives the token counter of each module the adapter claims (None for others).
    """
    found = _probe_target(root, path)
    if found is None:
        return None
    model, prefix = found
    sites = [(p, m, c) for p, m in model.named_modules() if (c := counter(m)) is not None]
    sizes = _input_sizes(model)
    key: _Key = (sizes, tuple(id(m) for _, m, _ in sites))
    cached = _CACHE.get(model)
    if cached is None or cached[0] != key:
        cached = (key, _run(model, sites, sizes))
        _CACHE[model] = cached
    return cached[1].get(path[len(prefix) :])


def _probe_target(root: nn.Module, path: str) -> tuple[nn.Module, str] | None:
    """The outermost module on `path` with a timm config, and the path prefix it sits at."""
    module = root
    parts = path.split(".") if path else []
    for i in range(len(parts) + 1):
        if _config(module) is not None:
            prefix = ".".join(parts[:i])
            return module, f"{prefix}." if prefix else ""
        if i < len(parts):
            child = module._modules.get(parts[i])
            if child is None:
                return None
            module = child
    return None


def _config(module: nn.Module) -> dict[str, Any] | None:
    for name in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(module, name, None)
        if isinstance(cfg, dict) and cfg.get("input_size") is not None:
            return cfg
    return None


def _input_sizes(model: nn.Module) -> tuple[tuple[int, ...], ...]:
    """(C, H, W) to try: the image sizes the model (its patch embedding, itself, a child
    such as TNT's pixel embedding, Hiera's token grid) was built for, then its config's."""
    cfg = _config(model)
    assert cfg is not None
    configured = tuple(int(s) for s in cfg["input_size"])
    built: list[Any] = [
        getattr(getattr(model, "patch_embed", None), "img_size", None),
        getattr(model, "img_size", None),
        *(getattr(child, "img_size", None) for child in model.children()),
    ]
    tokens, stride = getattr(model, "tokens_spatial_shape", None), getattr(model, "patch_stride", None)
    if isinstance(tokens, (tuple, list)) and isinstance(stride, (tuple, list)):  # Hiera
        built.append(tuple(t * s for t, s in zip(tokens, stride)))
    sizes = [(configured[0], *pair) for size in built if (pair := _pair(size)) is not None]
    return tuple(dict.fromkeys([*sizes, configured]))


def _pair(size: Any) -> tuple[int, int] | None:
    """(H, W) from an int or a pair of ints, None for anything else."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    return None


def _run(
    model: nn.Module, sites: list[tuple[str, nn.Module, TokenCounter]], sizes: tuple[tuple[int, ...], ...]
) -> dict[str, tuple[int, int]]:
    """(Nq, Nk) per site path, the maximum over its calls, for the first input size that runs."""
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
        for size in sizes:
            seen.clear()
            try:
                _forward_on_meta(model, size)
                return dict(seen)
            except Exception:
                continue
        return {}
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training


def _forward_on_meta(model: nn.Module, size: tuple[int, ...]) -> None:
    with torch.no_grad(), torch.device("meta"):
        tensors = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
        dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
        x = torch.empty(1, *size, dtype=dtype)
        if all(t.is_meta for t in tensors.values()):
            model(x)
        else:
            functional_call(model, {name: t.to("meta") for name, t in tensors.items()}, (x,))
