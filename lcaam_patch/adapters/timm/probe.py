"""The shape probe of timm models (`lcaam_patch.probe`) at their default input size,
recording (Nq, Nk) of every claimed attention module.

The probed model is the outermost module on the site's path that carries timm's
`pretrained_cfg` (or `default_cfg`), so a timm backbone inside a user's wrapper is probed on
its own. Results are cached per probed model and recomputed when its claimed modules or
input size change, so one `apply` probes once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...probe import InputMaker, TokenCounter, image_size_pair, probe_tokens

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
        inputs = [_image_input(size) for size in sizes]
        cached = (key, probe_tokens(model, sites, inputs))
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
    sizes = [(configured[0], *pair) for size in built if (pair := image_size_pair(size)) is not None]
    return tuple(dict.fromkeys([*sizes, configured]))


def _image_input(size: tuple[int, ...]) -> InputMaker:
    """One image of `size` (C, H, W)."""

    def make(dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (torch.empty(1, *size, dtype=dtype),), {}

    return make
