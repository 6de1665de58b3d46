"""What `lcaam-patch run --preset transformers` wraps: `from_pretrained` and `_from_config`
of `PreTrainedModel`, so every model class and every `Auto*` class (which call the model
class's) build a patched model; the `Auto*` call is the outer one, the model class's
inside it is left alone. `PreTrainedModel.__init__` too, so a model built by calling its
class (`LlamaForCausalLM(config)`, a subclass of one's own) is patched when its outermost
constructor returns; the models built inside it (`LlamaModel`, a composite model's vision
tower) are left to it, as are those `from_pretrained`/`_from_config` build.

`from_pretrained` of a local directory with LCAAM in it would drop those weights (an
"unexpected keys" warning) before the model is patched. So after patching:

- a directory with `lcaam.json`/`lcaam.safetensors` (`lcaam_patch.save_pretrained`) patches
  the model as saved there, its weights loaded;
- a directory whose model weights (`model.safetensors`, sharded or not, or
  `pytorch_model.bin`, as `Trainer` saves a patched model) hold LCAAM keys has those loaded;
- otherwise LCAAM starts at its init, and the launcher says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ...errors import LauncherError
from ...site import is_lcaam_key
from ..base import BuilderCall

FROM_PRETRAINED = "transformers.modeling_utils:PreTrainedModel.from_pretrained"
FROM_CONFIG = "transformers.modeling_utils:PreTrainedModel._from_config"
CONSTRUCTOR = "transformers.modeling_utils:PreTrainedModel.__init__"
PRESETS: dict[str, dict[str, Any]] = {"transformers": {"mode": "multilayer", "fusion": "mul", "depth": 1}}
BUILDERS: dict[str, tuple[str, ...]] = {"transformers": (FROM_PRETRAINED, FROM_CONFIG, CONSTRUCTOR)}

SAVED_CONFIG = "lcaam.json"  # `lcaam_patch.pretrained.CONFIG_NAME`, which imports the adapters
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
_TORCH = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def builder_call(target: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> BuilderCall:
    """Call the builder as the script did; after patching, load the LCAAM weights of a local
    `from_pretrained` directory."""
    call = BuilderCall(tuple(args), dict(kwargs))
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    if target != FROM_PRETRAINED or source is None:
        return call
    directory = Path(os.fspath(source)) / str(kwargs.get("subfolder") or "")
    if not directory.is_dir():
        call.load = lambda model: f"{source} is not a local directory: LCAAM starts at its init"
    elif (directory / SAVED_CONFIG).is_file():
        call.saved = directory
    else:
        call.load = lambda model: load_checkpoint_lcaam(model, directory)
    return call


def load_checkpoint_lcaam(model: nn.Module, directory: Path) -> str:
    """Load the LCAAM weights kept in the model weights of `directory` into the patched `model`;
    returns what happened."""
    found = _lcaam_weights(directory)
    if not found:
        return f"{directory} holds no LCAAM weights: LCAAM starts at its init"
    state = model.state_dict()
    expected = {key for key in state if is_lcaam_key(key)}
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    for keyed in (
        found,
        {key.removeprefix(prefix): value for key, value in found.items()},
        {prefix + key: value for key, value in found.items()},
    ):
        if set(keyed) == expected:
            bad = sorted(key for key, value in keyed.items() if not bool(torch.isfinite(value).all()))
            if bad:
                raise LauncherError(
                    f"the LCAAM weights {bad[:3]} in {directory} hold NaN or infinite values; resume "
                    f"from an earlier checkpoint (the training diverged), or start LCAAM afresh from a "
                    f"checkpoint without them"
                )
            shaped = sorted(key for key, value in keyed.items() if value.shape != state[key].shape)
            if shaped:
                raise LauncherError(
                    f"the LCAAM weights {shaped[:3]} in {directory} have other shapes than this model's "
                    f"LCAAM; run with the apply options (--depth, --hidden, --max-kv-tokens, ...) that "
                    f"the checkpoint was trained with"
                )
            model.load_state_dict(keyed, strict=False)
            return f"loaded {len(keyed)} LCAAM weights from {directory} (the keys transformers called unexpected)"
    raise LauncherError(
        f"{directory} holds {len(found)} LCAAM weights that do not match the {len(expected)} of this "
        f"model's LCAAM; run with the apply options (--preset, --depth, --max-kv-tokens, ...) that the "
        f"checkpoint was trained with"
    )


def _lcaam_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The LCAAM tensors among the model weights saved in `directory`."""
    weights: dict[str, torch.Tensor] = {}
    for name in (*_SAFETENSORS, *_TORCH):
        path = directory / name
        if not path.is_file():
            continue
        files = [path]
        if name.endswith(".index.json"):
            shards = json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()
            files = [directory / shard for shard in sorted(set(shards))]
        for file in files:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as opened:
                    weights.update({k: opened.get_tensor(k) for k in opened.keys() if is_lcaam_key(k)})
            else:
                state = torch.load(file, map_location="cpu", weights_only=True)
                weights.update({k: v for k, v in state.items() if is_lcaam_key(k)})
        return weights
    return weights
