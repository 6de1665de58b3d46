"""The guarantees of `apply`/`remove` (docs/design.md §3) on timm and nn.MultiheadAttention models."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_vit
from torch import nn

import lcaam_patch
from lcaam_patch.errors import SequenceTooLongError


def randomize_generators(model: nn.Module) -> None:
    """Move every generator away from identity so that LCAAM changes the output."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lcaam." in f".{name}":
                param.normal_(0.0, 0.5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("fusion", ["mul", "add"])
def test_identity_init_reproduces_timm_outputs_and_gradients(fused, fusion):
    model = tiny_vit()
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = torch.randn(3, 3, 16, 16)
    expected = model(x)
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lcaam_patch.apply(model, fusion=fusion)
    out = model(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    out.sum().backward()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)


def test_generator_is_a_child_and_upstream_keys_are_unchanged():
    model = tiny_vit()
    upstream_keys = list(model.state_dict())
    lcaam_patch.apply(model)
    keys = list(model.state_dict())
    assert [k for k in keys if ".lcaam." not in k] == upstream_keys
    assert "blocks.0.attn.lcaam.layers.0.weight" in keys
    assert isinstance(model.blocks[0].attn.lcaam, lcaam_patch.MaskGenerator)


def test_strict_load_of_unpatched_checkpoint_into_patched_model():
    source = tiny_vit()
    checkpoint = source.state_dict()
    model = lcaam_patch.apply(tiny_vit())
    result = model.load_state_dict(checkpoint, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.eval()(x), source.eval()(x), atol=1e-5, rtol=0)


def test_strict_load_still_reports_missing_upstream_keys():
    model = lcaam_patch.apply(tiny_vit())
    checkpoint = tiny_vit().state_dict()
    del checkpoint["head.weight"]
    with pytest.raises(RuntimeError, match="head.weight"):
        model.load_state_dict(checkpoint, strict=True)


def test_patching_one_instance_leaves_other_instances_alone():
    patched, other = tiny_vit(), tiny_vit()
    other.load_state_dict(patched.state_dict())
    lcaam_patch.apply(patched, init="default")
    randomize_generators(patched)
    x = torch.randn(2, 3, 16, 16)
    assert not lcaam_patch.is_patched(other)
    assert "forward" not in other.blocks[0].attn.__dict__
    assert not torch.allclose(patched(x), other(x))


def test_remove_restores_original_behaviour_exactly():
    model = tiny_vit().eval()
    before_keys = list(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    lcaam_patch.apply(model)
    randomize_generators(model)
    assert not torch.allclose(model(x), expected)
    assert lcaam_patch.remove(model) is model
    assert not lcaam_patch.is_patched(model)
    assert list(model.state_dict()) == before_keys
    assert torch.equal(model(x), expected)
    assert all("forward" not in m.__dict__ and not m._load_state_dict_post_hooks for m in model.modules())


def test_patched_model_learns_something_different():
    model = lcaam_patch.apply(tiny_vit(), init="default")
    x = torch.randn(2, 3, 16, 16)
    reference = tiny_vit()
    reference.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(model(x), reference(x))


def test_every_generator_parameter_gets_a_gradient_after_one_step():
    model = lcaam_patch.apply(tiny_vit(), depth=3, hidden=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    lcaam = {n: p for n, p in model.named_parameters() if ".lcaam." in n}
    assert len(lcaam) == 2 * 3 * 2
    for name, param in lcaam.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_multilayer_has_one_generator_per_layer_and_global_one_per_stack():
    multi = lcaam_patch.apply(tiny_vit(depth=3))
    assert sum(hasattr(b.attn, "lcaam") for b in multi.blocks) == 3
    shared = lcaam_patch.apply(tiny_vit(depth=3), mode="global")
    assert [hasattr(b.attn, "lcaam") for b in shared.blocks] == [True, False, False]
    assert "shared (blocks.0.attn)" in str(lcaam_patch.summary(shared))


def test_global_mode_feeds_every_layer_the_first_layers_mask():
    model = lcaam_patch.apply(tiny_vit(depth=3), mode="global", init="default")
    seen = []
    generator = model.blocks[0].attn.lcaam
    generator.register_forward_hook(lambda mod, args, out: seen.append(out))
    masks = []

    def recording(original):
        def mask(*args):
            masks.append(original(*args))
            return masks[-1]

        return mask

    for block in model.blocks:
        site = block.attn._lcaam_site
        site.mask = recording(site.mask)
    model(torch.randn(2, 3, 16, 16))
    assert len(seen) == 1
    assert all(m is seen[0] for m in masks) and len(masks) == 3


def test_global_mode_matches_a_hand_written_shared_mask():
    torch.manual_seed(3)
    model = lcaam_patch.apply(tiny_vit(depth=2), mode="global", init="default").eval()
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    generator = model.blocks[0].attn.lcaam
    reference = tiny_vit(depth=2).eval()
    reference.load_state_dict(model.state_dict(), strict=False)
    tokens = reference.patch_embed(x)
    tokens = reference._pos_embed(tokens)
    mask = None
    for block in reference.blocks:
        h = block.norm1(tokens)
        if mask is None:
            mask = generator(h)
        attn = block.attn
        B, N, C = h.shape
        q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * attn.scale * mask[:, None]
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        tokens = tokens + attn.proj(a)
        tokens = tokens + block.mlp(block.norm2(tokens))
    expected = reference.forward_head(reference.norm(tokens))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_targets_and_exclude_select_sites_by_path():
    model = lcaam_patch.apply(tiny_vit(depth=3), targets="blocks.*.attn", exclude=["blocks.1.*"])
    assert [p for p, _, _ in lcaam_patch.patched_sites(model)] == ["blocks.0.attn", "blocks.2.attn"]


def test_preset_supplies_options_and_explicit_arguments_override_it():
    model = lcaam_patch.apply(tiny_vit(), preset="timm_vit", fusion="add")
    site = model.blocks[0].attn._lcaam_site
    assert site.fusion == "add"
    assert len(model.blocks[0].attn.lcaam.layers) == 1


def test_sequence_longer_than_the_bound_names_both_numbers_and_the_option():
    model = lcaam_patch.apply(tiny_vit(dynamic_img_size=True))
    with pytest.raises(SequenceTooLongError, match=r"got 37 key tokens .* at most 17.*max_kv_tokens=37"):
        model(torch.randn(1, 3, 24, 24))


def test_max_tokens_raises_the_bound():
    model = lcaam_patch.apply(tiny_vit(dynamic_img_size=True), max_tokens=64)
    assert model(torch.randn(1, 3, 24, 24)).shape == (1, 5)


@pytest.mark.parametrize("activation,fusion", [("softplus", "mul"), ("none", "add"), ("none", "mul")])
def test_identity_init_holds_for_each_activation_that_allows_it(activation, fusion):
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    lcaam_patch.apply(model, activation=activation, fusion=fusion, depth=2)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_sigmoid_activation_keeps_mask_in_unit_interval():
    model = lcaam_patch.apply(tiny_vit(), activation="sigmoid", init="default")
    mask = model.blocks[0].attn.lcaam(torch.randn(2, 17, 32) * 10)
    assert mask.min() >= 0 and mask.max() <= 1


def test_summary_lists_sites_and_totals():
    model = lcaam_patch.apply(tiny_vit())
    report = lcaam_patch.summary(model)
    assert [s.path for s in report.sites] == ["blocks.0.attn", "blocks.1.attn"]
    assert report.sites[0].max_kv_tokens == 17 and report.sites[0].kind == "self"
    assert report.lcaam_params == 2 * (32 * 17 + 17)
    text = str(report)
    assert "blocks.1.attn" in text and "17×17" in text and "2 sites" in text


def test_deep_generator_starts_sensitive_to_its_input():
    generator = lcaam_patch.MaskGenerator(64, 20, depth=32, init="default")
    first, second = torch.randn(2, 10, 64), torch.randn(2, 10, 64)
    hidden = [first, second]
    for layer in generator.layers[:-1]:
        hidden = [torch.relu(layer(h)) for h in hidden]
    assert (hidden[0] - hidden[1]).abs().mean() > 0.1 * hidden[0].abs().mean()
