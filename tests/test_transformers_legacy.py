"""transformers' BERT-style self-attention written in the module's forward (off the attention
interface): patched by `LegacySelfAttentionAdapter`, exact at identity, in the path, verified."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import lcaam_patch
from lcaam_patch import MissingBoundError, NoAttentionFoundError, UnsupportedModuleError

transformers = pytest.importorskip("transformers")

TEXT = {
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 24,
}


def _megatron() -> nn.Module:
    return transformers.MegatronBertModel(transformers.MegatronBertConfig(**TEXT))


def _rembert() -> nn.Module:
    return transformers.RemBertModel(
        transformers.RemBertConfig(**TEXT, input_embedding_size=16, output_embedding_size=16)
    )


def _flava_image() -> nn.Module:
    config = transformers.FlavaImageConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
    )
    return transformers.FlavaImageModel(config)


def _text_inputs() -> dict[str, torch.Tensor]:
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, -5:] = 0
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": mask}


def _image_inputs() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, torch.Tensor]], int]] = {
    "megatron-bert": (_megatron, _text_inputs, 24),
    "rembert": (_rembert, _text_inputs, 24),
    "flava-image": (_flava_image, _image_inputs, 17),
}


def _valid(inputs: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    return hidden if mask is None else hidden[mask.bool()]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_is_exact_at_identity_in_the_path_and_removable(name: str) -> None:
    """Identity exact (padding included), a perturbed generator moves the output, gradients
    reach every generator, the bounds come from the config or the probe, remove restores."""
    build, make_inputs, bound = FAMILIES[name]
    torch.manual_seed(0)
    model: Any = build().eval()
    reference = copy.deepcopy(model)
    inputs = make_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = reference(**inputs).last_hidden_state

    lcaam_patch.apply(model, mode="multilayer", fusion="mul")
    sites = lcaam_patch.patched_sites(model)
    assert len(sites) == 2
    assert {site.adapter.name for _, _, site in sites} == {"transformers_legacy"}
    assert {(site.geometry.max_q_tokens, site.geometry.max_kv_tokens) for _, _, site in sites} == {(bound, bound)}
    with torch.no_grad():
        patched = model(**inputs).last_hidden_state
    torch.testing.assert_close(_valid(inputs, patched), _valid(inputs, expected), atol=1e-5, rtol=1e-5)
    assert all(site.verified for _, _, site in sites)

    for parameter_name, parameter in model.named_parameters():
        if lcaam_patch.is_lcaam_key(parameter_name):
            parameter.data.add_(torch.randn_like(parameter) * 0.5)
    with torch.no_grad():
        moved = model(**inputs).last_hidden_state
    assert (_valid(inputs, moved) - _valid(inputs, expected)).abs().max() > 1e-4  # identity: < 1e-6

    model.train()
    model(**inputs).last_hidden_state.square().mean().backward()
    lcaam = [(n, p) for n, p in model.named_parameters() if lcaam_patch.is_lcaam_key(n)]
    assert lcaam
    for parameter_name, parameter in lcaam:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name

    lcaam_patch.remove(model.eval())
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, expected, atol=0, rtol=0)


def test_output_attentions_returns_the_weights_as_upstream() -> None:
    """The weights a model returns with output_attentions come from LCAAM's attention."""
    model: Any = _megatron().eval()
    reference = copy.deepcopy(model)
    inputs = _text_inputs()
    lcaam_patch.apply(model)
    with torch.no_grad():
        ours = model(**inputs, output_attentions=True).attentions
        theirs = reference(**inputs, output_attentions=True).attentions
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cross_attention_without_a_key_bound_is_refused_at_apply() -> None:
    """BLIP's text decoder attends image tokens whose number the module does not know."""
    config = transformers.BlipTextConfig(**TEXT, encoder_hidden_size=24)
    model = transformers.BlipTextModel(config)
    with pytest.raises(MissingBoundError, match=r"crossattention\.self.*max_kv_tokens=M"):
        lcaam_patch.apply(model)
    assert not lcaam_patch.patched_sites(model)


def test_a_cache_it_cannot_follow_is_refused_at_the_call() -> None:
    """A decoder's first call fills the empty cache exactly; the next one, which would need the
    cached keys' tokens, is refused with the way out."""
    config = transformers.RemBertConfig(
        **TEXT, input_embedding_size=16, output_embedding_size=16, is_decoder=True, use_cache=True
    )
    model: Any = transformers.RemBertModel(config).eval()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 96, (1, 6))
    lcaam_patch.apply(model)
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True)
        torch.testing.assert_close(
            first.last_hidden_state, reference(input_ids=ids, use_cache=True).last_hidden_state, atol=1e-5, rtol=1e-5
        )
        with pytest.raises(UnsupportedModuleError, match="use_cache=False"):
            model(input_ids=ids[:, :1], past_key_values=first.past_key_values, use_cache=True)


def test_a_forward_with_other_terms_is_not_claimed() -> None:
    """ConvBERT joins a convolution to the attention's context: not this adapter's shape."""
    config = transformers.ConvBertConfig(**TEXT, embedding_size=32)
    with pytest.raises(NoAttentionFoundError):
        lcaam_patch.apply(transformers.ConvBertModel(config))


def test_a_class_that_computes_something_else_is_refused_at_its_first_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim is verified against the class's own forward: if upstream computed another
    attention (here: its scores halved), the first call raises and names the class."""
    from transformers.models.megatron_bert import modeling_megatron_bert as upstream

    model: Any = _megatron().eval()
    lcaam_patch.apply(model)
    original = upstream.MegatronBertSelfAttention.forward

    def tempered(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return original(self, hidden_states * 0.5, *args, **kwargs)

    monkeypatch.setattr(upstream.MegatronBertSelfAttention, "forward", tempered)
    with pytest.raises(UnsupportedModuleError, match="MegatronBertSelfAttention at .*other than the upstream"):
        model(**_text_inputs())


def test_blip_captioning_cross_attends_the_image_tokens_exactly() -> None:
    """BLIP's text decoder cross-attends the vision tower's tokens: their number is the
    key bound, and the cross-attention sites are exact and verified at identity."""
    text = {**TEXT, "encoder_hidden_size": 24}
    vision = {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = transformers.BlipConfig(
        text_config=text, vision_config={**vision, "image_size": 32, "patch_size": 8}, projection_dim=16
    )
    model: Any = transformers.BlipForConditionalGeneration(config).eval()
    reference = copy.deepcopy(model)
    inputs = {**_image_inputs(), "input_ids": torch.randint(0, 96, (2, 7))}
    lcaam_patch.apply(model)
    cross = [(path, site) for path, _, site in lcaam_patch.patched_sites(model) if "crossattention" in path]
    assert len(cross) == 2
    assert {(site.geometry.max_kv_tokens, site.geometry.kind) for _, site in cross} == {(17, "cross")}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert all(site.verified for _, site in cross)


def test_big_bird_attention_type_switch_after_apply_is_refused_until_remove() -> None:
    """BigBird's `set_attention_type` puts a new, unpatched attention module in place of the
    patched one: after `apply` a switch is refused (the current type passes), and `remove`
    gives the method back."""
    config = transformers.BigBirdConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attention_type="original_full",
    )
    model = transformers.BigBirdModel(config).eval()
    lcaam_patch.apply(model)
    model.set_attention_type("original_full")
    with pytest.raises(lcaam_patch.UnsupportedModuleError, match=r"set_attention_type\('block_sparse'\).*remove"):
        model.set_attention_type("block_sparse")
    with pytest.raises(lcaam_patch.UnsupportedModuleError, match="unpatched attention module"):
        model.encoder.layer[0].attention.set_attention_type("block_sparse")
    assert model.attention_type == "original_full" and model.encoder.attention_type == "original_full"
    assert all(hasattr(layer.attention.self, "lcaam") for layer in model.encoder.layer)
    lcaam_patch.remove(model)
    model.set_attention_type("block_sparse")
    assert model.encoder.layer[0].attention.attention_type == "block_sparse"


def test_remove_drops_every_switch_guard_when_two_adapters_patched_the_model() -> None:
    """BigBird-Pegasus's encoder is patched by the legacy adapter, its decoder through the
    interface: whichever site is restored last, `remove` leaves no guard behind, so the
    unpatched model switches its attention type and implementation again."""
    config = transformers.BigBirdPegasusConfig(
        vocab_size=96,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        attention_type="original_full",
        attn_implementation="eager",
    )
    model = transformers.BigBirdPegasusModel(config).eval()
    lcaam_patch.apply(model)
    adapters = {site.adapter.name for _, _, site in lcaam_patch.patched_sites(model)}
    assert adapters == {"transformers_legacy", "transformers"}
    with pytest.raises(lcaam_patch.UnsupportedModuleError, match="set_attention_type"):
        model.encoder.set_attention_type("block_sparse")
    lcaam_patch.remove(model)
    switches = ("set_attention_type", "set_attn_implementation")
    assert [(name, s) for name, m in model.named_modules() for s in switches if s in vars(m)] == []
    model.encoder.set_attention_type("block_sparse")
    assert model.encoder.attention_type == "block_sparse"
