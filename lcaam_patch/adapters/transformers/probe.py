"""Token bounds of vision models from what they really feed their attention: the shape probe
(`lcaam_patch.probe`) of the outermost image model on a site's path, at its configured
image size, so class, distillation, register and detection tokens, queries a model appends
and video frames are all counted."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...errors import UnsupportedModuleError
from ...probe import InputMaker, image_size_pair, probe_tokens
from .discovery import (
    dispatches_through_interface,
    forward_parameters,
    is_config,
    is_legacy_self_attention,
    is_pretrained_model,
)

_Key = tuple[int, ...]
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[_Key, dict[str, tuple[int, int]]]] = weakref.WeakKeyDictionary()


def probed_tokens(module: nn.Module, path: str, root: nn.Module) -> tuple[int, int] | None:
    """(Nq, Nk) of the module at `path` in one forward of its image model on meta, at the
    configured image size; None when there is no image model on the path or it cannot run.

    Raises `UnsupportedModuleError` when the probe sees the module called with hidden states
    that are not a (B, N, C) token sequence (a (B, H, W, C) window of a feature map)."""
    found = _image_model(root, path)
    if found is None:
        return None
    model, prefix = found
    sites = [(p, m, _count_mha if type(m) is nn.MultiheadAttention else _count) for p, m in _probed(model)]
    key = tuple(id(m) for _, m, _ in sites)
    cached = _CACHE.get(model)
    if cached is None or cached[0] != key:
        cached = (key, probe_tokens(model, sites, _inputs(model, module)))
        _CACHE[model] = cached
    found_tokens = cached[1].get(path[len(prefix) :])
    if found_tokens is not None and found_tokens[0] < 0:
        raise UnsupportedModuleError(
            f"{type(module).__name__} at {path!r} is called with {-found_tokens[0]}-D hidden states (a "
            f"window of a feature map, not a (B, N, C) token sequence), so its queries are not the "
            f"tokens LCAAM's generator reads; exclude it with exclude=[{path!r}]"
        )
    return found_tokens


def image_model_on_path(root: nn.Module, path: str) -> bool:
    """Whether a transformers model whose input is `pixel_values` contains `path`."""
    return _image_model(root, path) is not None


def _probed(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose calls the probe records: the transformers attention classes (on the
    interface or BERT-style legacy ones) and the `nn.MultiheadAttention` pooling heads
    (SigLIP's) of the model."""
    return [(p, m) for p, m in model.named_modules() if type(m) is nn.MultiheadAttention or _claimable(m)]


def _claimable(module: nn.Module) -> bool:
    interface = is_config(getattr(module, "config", None)) and dispatches_through_interface(type(module))
    return interface or is_legacy_self_attention(type(module))


def _image_model(root: nn.Module, path: str) -> tuple[nn.Module, str] | None:
    """The outermost transformers model on `path` whose input is `pixel_values`: a
    `PreTrainedModel` whose main input it is, or a module with a config whose forward takes it
    first (the vision tower of a dual model: GroupViT's `GroupViTVisionTransformer`)."""
    module = root
    parts = path.split(".") if path else []
    for i in range(len(parts) + 1):
        if _takes_pixels(module):
            prefix = ".".join(parts[:i])
            return module, f"{prefix}." if prefix else ""
        if i < len(parts):
            child = module._modules.get(parts[i])
            if child is None:
                return None
            module = child
    return None


def _takes_pixels(module: nn.Module) -> bool:
    if is_pretrained_model(module):
        return getattr(module, "main_input_name", None) == "pixel_values"
    return is_config(getattr(module, "config", None)) and forward_parameters(type(module))[1:2] == ("pixel_values",)


def _count(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
    """(Nq, Nk) of one call; (-rank, -rank) for hidden states that are not 3-D."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    if isinstance(x, torch.Tensor) and x.dim() != 3:
        return -x.dim(), -x.dim()
    keys = kwargs.get("encoder_hidden_states", kwargs.get("key_value_states"))
    nq = x.shape[-2] if isinstance(x, torch.Tensor) else 0
    return nq, keys.shape[-2] if isinstance(keys, torch.Tensor) else nq


def _count_mha(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
    """(Nq, Nk) of one `nn.MultiheadAttention` call: its query and key lengths, on the
    sequence axis its `batch_first` and the tensors' rank say."""
    query = kwargs.get("query", args[0] if args else None)
    key = kwargs.get("key", args[1] if len(args) > 1 else None)
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
        return 0, 0
    axis = 1 if getattr(module, "batch_first", False) and query.dim() == 3 else 0
    return query.shape[axis], key.shape[axis]


def _inputs(model: nn.Module, site: nn.Module) -> list[InputMaker]:
    """Images (and videos) at each image size the site's and the model's configs give."""
    configs = [getattr(site, "config", None), getattr(model, "config", None)]
    configs += [getattr(c, "vision_config", None) for c in list(configs)]
    makers: list[InputMaker] = []
    for config in configs:
        size = image_size_pair(getattr(config, "image_size", None))
        if size is None:
            continue
        channels = int(getattr(config, "num_channels", 3) or 3)
        makers.append(_pixels((channels, *size)))
        frames = getattr(config, "num_frames", None)
        if isinstance(frames, int):
            makers.append(_pixels((frames, channels, *size)))
    return makers


def _pixels(shape: tuple[int, ...]) -> Callable[[torch.dtype], tuple[tuple[Any, ...], dict[str, Any]]]:
    def make(dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), {"pixel_values": torch.empty(1, *shape, dtype=dtype)}

    return make
