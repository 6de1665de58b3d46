"""Small models and helpers shared by the core tests (fixtures live in conftest.py)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_vit(**kwargs: object) -> nn.Module:
    """A 2-block timm ViT on 16×16 images: 16 patches + 1 class token."""
    from timm.models.vision_transformer import VisionTransformer

    options = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=4)
    options.update(kwargs)
    return VisionTransformer(**options)


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything `apply` could change: parameters, buffers, modules, hooks, forwards."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(name, type(m), sorted(m.__dict__)) for name, m in model.named_modules()],
        "hooks": [
            (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._load_state_dict_post_hooks))
            for m in model.modules()
        ],
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    """Assert `model` is as `snapshot` saw it."""
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
