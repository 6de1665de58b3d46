"""What `lcaam-patch run --preset timm_vit` wraps: `timm.create_model`, however it is imported.

`create_model(checkpoint_path=...)` (train.py's `--initial-checkpoint`) would load the
checkpoint strictly inside the builder, before the model is patched, so LCAAM keys in it
would be "unexpected"; the wrapper holds the checkpoint back and loads it, with timm's own
`load_checkpoint`, into the patched model. A checkpoint without LCAAM keys loads too
(strict loading forgives the generators' keys) and LCAAM starts at its init.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from ...site import is_lcaam_key
from ..base import BuilderCall

CREATE_MODEL: tuple[str, ...] = (
    "timm.models._factory:create_model",
    "timm.models:create_model",
    "timm:create_model",
)


def create_model_call(target: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> BuilderCall:
    """Call `create_model` without its `checkpoint_path`; load that into the patched model."""
    checkpoint = kwargs.get("checkpoint_path")
    if target not in CREATE_MODEL or not checkpoint:
        return BuilderCall(tuple(args), dict(kwargs))
    kept = {key: value for key, value in kwargs.items() if key != "checkpoint_path"}

    def load(model: nn.Module) -> str:
        from timm.models import load_checkpoint, load_state_dict

        path = os.fspath(checkpoint)
        found = sum(is_lcaam_key(key) for key in load_state_dict(path))
        load_checkpoint(model, path)
        if found:
            return f"loaded {found} LCAAM weights from the checkpoint {path}"
        return f"the checkpoint {path} holds no LCAAM weights: LCAAM starts at its init"

    return BuilderCall(tuple(args), kept, load)
