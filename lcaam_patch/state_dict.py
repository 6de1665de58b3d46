"""State dicts of the LCAAM weights alone.

A patched model's `state_dict()` holds the upstream keys unchanged plus the generators'
keys (`...attn.lcaam.layers.0.weight`); loading an upstream (unpatched) checkpoint into a
patched model with `strict=True` works, since the generators' keys are forgiven. The other
way round, a patched state dict loaded into an unpatched model with `strict=True`, fails in
PyTorch's words ("Unexpected key(s) ... lcaam ..."): patch the model with the same options
first, or load `{k: v for k, v in sd.items() if not lcaam_patch.is_lcaam_key(k)}`.
To keep and share LCAAM alone, `lcaam_patch.save_pretrained(model, directory)` writes its
weights and options, and `lcaam_patch.from_pretrained(model, directory)` patches an
unpatched model with them and loads the weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .errors import StateDictError
from .patching import require_patched
from .site import is_lcaam_key


def lcaam_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LCAAM generator weights of a patched model, keyed as in `model.state_dict()`."""
    require_patched(model, "lcaam_state_dict")
    return {key: value for key, value in model.state_dict().items() if is_lcaam_key(key)}


def load_lcaam_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load LCAAM weights saved by `lcaam_state_dict`; keys, types and shapes must match.

    Everything is validated before anything is copied, so a failed call changes nothing.
    """
    require_patched(model, "load_lcaam_state_dict")
    if not isinstance(state_dict, Mapping):
        raise StateDictError(
            f"load_lcaam_state_dict takes a mapping of key to tensor, got {type(state_dict).__name__}; "
            f"pass what lcaam_state_dict(model) returned (or torch.load of it)"
        )
    expected = lcaam_state_dict(model)
    for key, value in expected.items():
        if key not in state_dict:
            raise StateDictError(
                f"LCAAM key {key!r} is missing from the state dict; save it with "
                f"lcaam_state_dict(model) from a model patched with the same options"
            )
        given = state_dict[key]
        if not isinstance(given, torch.Tensor):
            raise StateDictError(
                f"LCAAM key {key!r} holds a {type(given).__name__}, not a torch.Tensor; convert it "
                f"with torch.as_tensor, or load the file lcaam_state_dict wrote"
            )
        if given.is_meta:
            raise StateDictError(
                f"LCAAM key {key!r} is a meta tensor without values; load real weights (a model "
                f"patched on meta must be materialised before its state dict is saved)"
            )
        if not given.is_floating_point():
            raise StateDictError(f"LCAAM key {key!r} has dtype {given.dtype}; generator weights are floating point")
        if tuple(given.shape) != tuple(value.shape):
            raise StateDictError(
                f"LCAAM key {key!r} has shape {tuple(given.shape)} but the model expects "
                f"{tuple(value.shape)}; patch the model with the options (depth, hidden, "
                f"max_tokens, max_kv_tokens) used when the state dict was saved"
            )
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise StateDictError(
            f"state dict has keys this model's LCAAM does not: {unexpected[:5]}; patch the "
            f"model with the same targets/exclude/mode as when it was saved"
        )
    model.load_state_dict(dict(state_dict), strict=False)
