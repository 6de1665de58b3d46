"""State dicts: the LCAAM weights alone, and strict loading of unpatched checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import NotPatchedError, StateDictError
from .site import GENERATOR_NAME, SITE_ATTR


def is_lcaam_key(key: str) -> bool:
    """Whether a state-dict key belongs to an LCAAM generator."""
    return GENERATOR_NAME in key.split(".")


def forgive_missing_lcaam_keys(module: nn.Module, incompatible_keys: Any) -> None:
    """Load-state-dict post hook: an upstream checkpoint lacks LCAAM keys, and that is fine."""
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not is_lcaam_key(key)]


def lcaam_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LCAAM generator weights of a patched model, keyed as in `model.state_dict()`."""
    _require_patched(model, "lcaam_state_dict")
    return {key: value for key, value in model.state_dict().items() if is_lcaam_key(key)}


def load_lcaam_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load LCAAM weights saved by `lcaam_state_dict`; the key set and shapes must match.

    Validation happens before anything is copied, so a failed call changes nothing.
    """
    _require_patched(model, "load_lcaam_state_dict")
    expected = lcaam_state_dict(model)
    for key, value in expected.items():
        if key not in state_dict:
            raise StateDictError(
                f"LCAAM key {key!r} is missing from the state dict; save it with "
                f"lcaam_state_dict(model) from a model patched with the same options"
            )
        given = state_dict[key]
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


def _require_patched(model: nn.Module, what: str) -> None:
    if not any(hasattr(m, SITE_ATTR) for m in model.modules()):
        raise NotPatchedError(
            f"{what} needs a patched model; call lcaam_patch.apply(model, ...) first"
        )
