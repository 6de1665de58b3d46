"""The older BART/CLIP attention written with `torch.bmm` in the module's forward (XGLM, TrOCR,
GroupViT, MVP): patched by `transformers_legacy` as its second source form, exact at identity
(rows the mask hides entirely included), in the path, verified at the first call, or refused."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn

import lcaam_patch
from lcaam_patch import MissingBoundError, NoAttentionFoundError, UnsupportedModuleError

transformers = pytest.importorskip("transformers")

BART = {
    "vocab_size": 96,
    "d_model": 32,
    "max_position_embeddings": 40,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
}


def _xglm(**options: Any) -> nn.Module:
    config = transformers.XGLMConfig(**{**BART, **options}, num_layers=2, attention_heads=4, ffn_dim=64)
    return transformers.XGLMForCausalLM(config)


def _trocr() -> nn.Module:
    config = transformers.TrOCRConfig(
        **BART, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64, cross_attention_hidden_size=24
    )
    return transformers.TrOCRForCausalLM(config)


def _mvp(**options: Any) -> nn.Module:
    config = transformers.MvpConfig(
        **BART,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        **options,
    )
    return transformers.MvpModel(config)


def _groupvit_text() -> nn.Module:
    config = transformers.GroupViTTextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    config.max_position_embeddings = 20
    return transformers.GroupViTTextModel(config)


def _groupvit_vision() -> nn.Module:
    config = transformers.GroupViTVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        depths=[1, 1],
        num_group_tokens=[8, 0],
        num_output_groups=[4, 4],
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    return transformers.GroupViTVisionModel(config)


def _left_padded_text() -> dict[str, torch.Tensor]:
    """Left padding: in a causal decoder the padded first query sees only padded keys, a row
    the mask hides entirely, where upstream averages every value uniformly."""
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    ids = torch.randint(4, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": mask}


def _with_image_tokens() -> dict[str, torch.Tensor]:
    tokens = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1))
    return {**_left_padded_text(), "encoder_hidden_states": tokens}


def _encoder_decoder_text() -> dict[str, torch.Tensor]:
    text = _left_padded_text()
    decoder = {"decoder_input_ids": text["input_ids"][:, :6], "decoder_attention_mask": text["attention_mask"][:, :6]}
    return {**text, **decoder}


def _image() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


def _logits(output: Any) -> torch.Tensor:
    result: torch.Tensor = output.logits
    return result


def _hidden(output: Any) -> torch.Tensor:
    result: torch.Tensor = output.last_hidden_state
    return result


def _jittered(model: nn.Module) -> nn.Module:
    """`model` with every parameter moved at random, so that the scores of a fresh model
    (initialised at std 0.02) are large enough for a perturbed M to show."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


@dataclasses.dataclass(frozen=True)
class Family:
    """A tiny model of one family, its inputs, what it outputs and the sites it must get:
    {(last path part, kind, query bound, key bound)}."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    output: Callable[[Any], torch.Tensor]
    sites: set[tuple[str, str, int | None, int | None]]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


FAMILIES = {
    "xglm": Family(_xglm, _left_padded_text, _logits, {("self_attn", "self", 40, 40)}),
    "trocr": Family(
        _trocr,
        _with_image_tokens,
        _logits,
        {("self_attn", "self", 40, 16), ("encoder_attn", "cross", 40, 16)},
        {"max_kv_tokens": 16},
    ),
    "mvp": Family(
        _mvp, _encoder_decoder_text, _hidden, {("self_attn", "self", 40, 40), ("encoder_attn", "cross", 40, 40)}
    ),
    "groupvit-text": Family(_groupvit_text, _left_padded_text, _hidden, {("self_attn", "self", 20, 20)}),
    "groupvit-vision": Family(
        _groupvit_vision,
        _image,
        _hidden,
        {("self_attn", "self", 24, 24), ("attn", "cross", 4, 16), ("self_attn", "self", 4, 4)},
    ),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_is_exact_at_identity_in_the_path_and_removable(name: str) -> None:
    """Every attention claimed by the BART form with the bounds its config or the shape probe
    gives; identity exact on every position, a perturbed generator moves the output,
    gradients reach every generator, remove restores."""
    family = FAMILIES[name]
    model: Any = _jittered(family.build()).eval()
    reference = copy.deepcopy(model)
    inputs = family.inputs()
    before = snapshot(model)
    with torch.no_grad():
        expected = family.output(reference(**inputs))

    lcaam_patch.apply(model, mode="multilayer", fusion="mul", **family.options)
    sites = lcaam_patch.patched_sites(model)
    assert {site.adapter.name for _, _, site in sites} == {"transformers_legacy"}
    found = {
        (path.rsplit(".", 1)[-1], site.geometry.kind, site.geometry.max_q_tokens, site.geometry.max_kv_tokens)
        for path, _, site in sites
    }
    assert found == family.sites
    with torch.no_grad():
        patched = family.output(model(**inputs))
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=1e-5)
    assert all(site.verified for _, _, site in sites)

    for parameter_name, parameter in model.named_parameters():
        if lcaam_patch.is_lcaam_key(parameter_name):
            parameter.data.add_(torch.randn_like(parameter) * 0.5)
    with torch.no_grad():
        moved = family.output(model(**inputs))
    assert (moved - expected).abs().max() > 1e-4

    model.train()
    family.output(model(**inputs)).square().mean().backward()
    lcaam = [(n, p) for n, p in model.named_parameters() if lcaam_patch.is_lcaam_key(n)]
    assert len(lcaam) >= len(sites)
    for parameter_name, parameter in lcaam:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name

    lcaam_patch.remove(model.eval())
    assert_unchanged(model, before)
    with torch.no_grad():
        torch.testing.assert_close(family.output(model(**inputs)), expected, atol=0, rtol=0)


def test_weights_are_returned_before_dropout_as_upstream() -> None:
    """XGLM returns its attention weights before attention dropout: in training the first
    layer's weights are the upstream's (deterministic) ones, and every row sums to 1."""
    model: Any = _xglm(attention_dropout=0.5)
    reference = copy.deepcopy(model).eval()
    inputs = _left_padded_text()
    lcaam_patch.apply(model)
    model.train()
    ours = model(**inputs, output_attentions=True).attentions
    with torch.no_grad():
        theirs = reference(**inputs, output_attentions=True).attentions
    torch.testing.assert_close(ours[0].detach(), theirs[0], atol=1e-5, rtol=1e-5)
    for weights in ours:
        torch.testing.assert_close(weights.detach().sum(-1), torch.ones(weights.shape[:-1]))


def test_a_decoder_cache_after_the_prompt_is_refused_with_the_fix() -> None:
    """XGLM's prompt fills an empty cache exactly; the next cached step, which would need the
    cached keys' tokens, is refused at the call; greedy decoding without a cache is exact."""
    model: Any = _xglm().eval()
    reference = copy.deepcopy(model)
    ids = torch.randint(4, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    lcaam_patch.apply(model)
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True)
        torch.testing.assert_close(first.logits, reference(input_ids=ids, use_cache=True).logits, atol=1e-5, rtol=1e-5)
        with pytest.raises(UnsupportedModuleError, match=r"XGLMAttention at .*use_cache=False"):
            model(input_ids=ids[:, :1], past_key_values=first.past_key_values, use_cache=True)
        options = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "use_cache": False}
        assert torch.equal(model.generate(ids, **options), reference.generate(ids, **options))


def test_a_cross_attention_without_a_key_bound_is_refused_at_apply() -> None:
    """TrOCR's decoder alone cross-attends an encoder's tokens it does not know the number of."""
    model = _trocr()
    before = snapshot(model)
    with pytest.raises(MissingBoundError, match=r"TrOCRAttention at .*encoder_attn.*max_kv_tokens=M"):
        lcaam_patch.apply(model)
    assert_unchanged(model, before)


def test_prompt_keys_are_refused_at_apply_and_at_the_call() -> None:
    """MVP's prompt tuning puts keys of no token before the call's: refused at apply when the
    decoder passes them, and at a call given them."""
    model = _mvp(use_prompt=True, prompt_length=3, prompt_mid_dim=16)
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match=r"MvpAttention at 'decoder.*use_prompt=True.*exclude="):
        lcaam_patch.apply(model)
    assert_unchanged(model, before)

    plain: Any = _mvp().eval()
    lcaam_patch.apply(plain)
    attention = plain.encoder.layers[0].self_attn
    prompt = torch.zeros(2, 3, 4, 8)
    with pytest.raises(UnsupportedModuleError, match=r"MvpAttention at 'encoder.layers.0.self_attn'.*given"):
        attention(torch.randn(1, 5, 32), attn_prompt=prompt)


def test_a_class_that_computes_something_else_is_refused_at_its_first_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim is verified against the class's own forward: if upstream computed another
    attention (here: on halved hidden states), the first call raises and names the class."""
    from transformers.models.xglm import modeling_xglm as upstream

    model: Any = _xglm().eval()
    lcaam_patch.apply(model)
    original = upstream.XGLMAttention.forward

    def tempered(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return original(self, hidden_states * 0.5, *args, **kwargs)

    monkeypatch.setattr(upstream.XGLMAttention, "forward", tempered)
    with pytest.raises(UnsupportedModuleError, match="XGLMAttention at .*other than the upstream"):
        model(**_left_padded_text())


def test_fsmt_is_not_claimed() -> None:
    """FSMT's attention is (T, B, C) with a key padding mask and other parameter names: not
    a recognised form, so `apply` finds nothing to patch."""
    config = transformers.FSMTConfig(
        langs=["en", "de"],
        src_vocab_size=96,
        tgt_vocab_size=96,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
    )
    with pytest.raises(NoAttentionFoundError):
        lcaam_patch.apply(transformers.FSMTModel(config))


def test_trocr_under_a_vit_cross_attends_the_image_tokens_exactly() -> None:
    """In a `VisionEncoderDecoderModel`, TrOCR's cross-attention is bounded by the ViT
    encoder's tokens (16 patches + the class token) and exact at identity."""
    encoder = transformers.ViTConfig(
        hidden_size=24, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=32, patch_size=8
    )
    decoder = transformers.TrOCRConfig(
        **BART, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, cross_attention_hidden_size=24
    )
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    model: Any = _jittered(transformers.VisionEncoderDecoderModel(config)).eval()
    reference = copy.deepcopy(model)
    inputs = {**_image(), "decoder_input_ids": torch.randint(4, 96, (2, 5))}
    lcaam_patch.apply(model)
    cross = [site for path, _, site in lcaam_patch.patched_sites(model) if path.endswith("encoder_attn")]
    assert [(site.adapter.name, site.geometry.kind, site.geometry.max_kv_tokens) for site in cross] == [
        ("transformers_legacy", "cross", 17)
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert cross[0].verified


def test_weights_asked_for_are_upstream_s() -> None:
    """MVP returns its weights only when `output_attentions` asks: then they are the
    upstream's, for the encoder's, the decoder's and the cross-attention."""
    model: Any = _jittered(_mvp()).eval()
    reference = copy.deepcopy(model)
    inputs = _encoder_decoder_text()
    lcaam_patch.apply(model)
    with torch.no_grad():
        ours = model(**inputs, output_attentions=True)
        theirs = reference(**inputs, output_attentions=True)
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        assert len(getattr(ours, name)) == 1
        torch.testing.assert_close(getattr(ours, name)[0], getattr(theirs, name)[0], atol=1e-5, rtol=1e-5)
