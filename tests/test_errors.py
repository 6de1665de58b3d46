"""Every misuse raises an LCAAMError that says what to do, and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, snapshot, tiny_vit
from torch import nn

import lcaam_patch
from lcaam_patch.adapters import registry
from lcaam_patch.errors import (
    AlreadyPatchedError,
    InvalidOptionError,
    LCAAMError,
    MissingBoundError,
    NoAttentionFoundError,
    NotPatchedError,
    StateDictError,
    UnsupportedModuleError,
    UpstreamVersionError,
)


@pytest.mark.parametrize(
    "option,value,choices",
    [
        ("mode", "layerwise", "'multilayer', 'global'"),
        ("fusion", "concat", "'mul', 'add'"),
        ("backend", "cuda-magic", "'auto', 'lowrank_sdpa', 'triton', 'flex', 'sdpa', 'eager'"),
        ("generator", "dense", "'mlp', 'lowrank'"),
        ("activation", "tanh", "'none', 'sigmoid', 'softplus'"),
        ("init", "zeros", "'identity', 'default'"),
    ],
)
def test_unknown_choice_lists_the_choices(option, value, choices):
    model = tiny_vit()
    before = snapshot(model)
    with pytest.raises(InvalidOptionError) as error:
        lcaam_patch.apply(model, **{option: value})
    assert f"{option}={value!r}" in str(error.value) and choices in str(error.value)
    assert isinstance(error.value, LCAAMError)
    assert_unchanged(model, before)


def test_non_positive_depth_is_rejected():
    with pytest.raises(InvalidOptionError, match="depth=0 must be a positive integer"):
        lcaam_patch.apply(tiny_vit(), depth=0)


def test_sdpa_backend_cannot_multiply():
    model = tiny_vit()
    before = snapshot(model)
    with pytest.raises(InvalidOptionError, match="backend='sdpa' cannot compute fusion='mul'.*backend='auto'"):
        lcaam_patch.apply(model, fusion="mul", backend="sdpa")
    assert_unchanged(model, before)


def test_sigmoid_with_identity_init_explains_the_fix():
    with pytest.raises(InvalidOptionError, match="init='default'"):
        lcaam_patch.apply(tiny_vit(), activation="sigmoid", fusion="mul")


def test_model_without_attention_lists_adapters_and_attention_like_classes():
    class HomeMadeAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(4, 12)

    model = nn.Sequential(nn.Linear(4, 4), HomeMadeAttention())
    before = snapshot(model)
    with pytest.raises(NoAttentionFoundError) as error:
        lcaam_patch.apply(model)
    message = str(error.value)
    assert "timm" in message and "torch_mha" in message
    assert "HomeMadeAttention" in message and "adapter" in message
    assert_unchanged(model, before)


def test_targets_that_match_nothing_say_so():
    with pytest.raises(NoAttentionFoundError, match="filtered out by targets"):
        lcaam_patch.apply(tiny_vit(), targets="decoder.*")


def test_apply_twice_is_an_error_and_keeps_the_first_patch():
    model = lcaam_patch.apply(tiny_vit())
    before = snapshot(model)
    with pytest.raises(AlreadyPatchedError, match=r"lcaam_patch.remove\(model\)"):
        lcaam_patch.apply(model, fusion="add")
    assert_unchanged(model, before)


def test_remove_on_unpatched_model():
    model = tiny_vit()
    before = snapshot(model)
    with pytest.raises(NotPatchedError, match="never patched"):
        lcaam_patch.remove(model)
    assert_unchanged(model, before)


def test_load_lcaam_state_dict_missing_key_names_it():
    model = lcaam_patch.apply(tiny_vit())
    state = lcaam_patch.lcaam_state_dict(model)
    del state["blocks.1.attn.lcaam.layers.0.bias"]
    before = snapshot(model)
    with pytest.raises(StateDictError, match="'blocks.1.attn.lcaam.layers.0.bias' is missing"):
        lcaam_patch.load_lcaam_state_dict(model, state)
    assert_unchanged(model, before)


def test_load_lcaam_state_dict_wrong_shape_names_key_and_shapes():
    model = lcaam_patch.apply(tiny_vit())
    state = lcaam_patch.lcaam_state_dict(model)
    state["blocks.0.attn.lcaam.layers.0.weight"] = torch.zeros(20, 32)
    before = snapshot(model)
    with pytest.raises(StateDictError, match=r"'blocks.0.attn.lcaam.layers.0.weight' has shape \(20, 32\).*\(17, 32\)"):
        lcaam_patch.load_lcaam_state_dict(model, state)
    assert_unchanged(model, before)


def test_load_lcaam_state_dict_unexpected_key():
    model = lcaam_patch.apply(tiny_vit())
    state = lcaam_patch.lcaam_state_dict(model)
    state["blocks.7.attn.lcaam.layers.0.bias"] = torch.zeros(17)
    with pytest.raises(StateDictError, match="blocks.7.attn"):
        lcaam_patch.load_lcaam_state_dict(model, state)


def test_upstream_version_out_of_range(monkeypatch):
    adapter = lcaam_patch.get_adapter("timm")
    monkeypatch.setattr(adapter, "installed_version", lambda: "0.1.0")
    model = tiny_vit()
    before = snapshot(model)
    with pytest.raises(UpstreamVersionError, match=r"timm>=0.9.16,<2 but timm==0.1.0 is installed.*pip install"):
        lcaam_patch.apply(model)
    assert_unchanged(model, before)


def test_mha_options_it_cannot_honour_fail_at_apply_time():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, add_zero_attn=True))
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="add_zero_attn=True.*exclude"):
        lcaam_patch.apply(model, max_tokens=4)
    assert_unchanged(model, before)


def test_mha_without_bound_asks_for_max_tokens():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(MissingBoundError, match="max_tokens=N"):
        lcaam_patch.apply(model)


def test_a_failure_on_a_late_site_leaves_early_sites_untouched():
    model = nn.ModuleDict({"good": nn.MultiheadAttention(8, 2), "bad": nn.MultiheadAttention(8, 2, add_bias_kv=True)})
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="add_bias_kv"):
        lcaam_patch.apply(model, max_tokens=4)
    assert_unchanged(model, before)
    assert not lcaam_patch.is_patched(model)


def test_unknown_preset_lists_presets():
    with pytest.raises(LCAAMError, match="timm_vit"):
        lcaam_patch.apply(tiny_vit(), preset="no-such-preset")


def test_registering_a_custom_adapter(monkeypatch):
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(4, 12)

        def forward(self, x):
            q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
            return torch.softmax(q @ k.transpose(-2, -1), -1) @ v

    class ToyAdapter(lcaam_patch.Adapter):
        name = "toy"

        def attention_types(self):
            return (Toy,)

        def geometry(self, module, path, root, config):
            return lcaam_patch.SiteGeometry(4, 3, config.max_tokens or 3, "self")

        def forward(self, module, site, x):
            q, k, v = module.qkv(x).unsqueeze(1).chunk(3, dim=-1)
            out, _ = site.attend(module, x, q, k, v, scale=1.0)
            return out

    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry.registered_adapters()))
    lcaam_patch.register_adapter(ToyAdapter())
    model = nn.Sequential(Toy())
    x = torch.randn(2, 3, 4)
    expected = model(x)
    lcaam_patch.apply(model)
    torch.testing.assert_close(model(x).squeeze(1), expected.squeeze(1))
    assert lcaam_patch.summary(model).sites[0].adapter == "toy"
