"""Whole models pickled by lcaam-patch 0.1.0 still load, compute the same outputs and unpatch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import lcaam_patch

FIXTURES = Path(__file__).parent / "fixtures"


def _fresh(name: str) -> nn.Module:
    if name == "transformer_encoder":
        layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=4)


@pytest.mark.parametrize("name", ["vit_multilayer", "vit_global", "vit_lowrank", "transformer_encoder"])
def test_old_whole_model_pickle_loads_computes_and_unpatches(name):
    saved = torch.load(FIXTURES / f"{name}.pt", weights_only=False)
    model, x = saved["model"], saved["input"]
    assert lcaam_patch.is_patched(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), saved["output"], rtol=1e-5, atol=1e-6)
    lcaam_patch.remove(model)
    assert not lcaam_patch.is_patched(model)
    state = model.state_dict()
    assert not [key for key in state if "lcaam" in key]
    reference = _fresh(name).eval()
    reference.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
