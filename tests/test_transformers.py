"""Hugging Face transformers: LCAAM on tiny models built from configs (no download)."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from packaging.version import Version
from torch import nn

import lcaam_patch

transformers = pytest.importorskip("transformers")
VERSION = Version(transformers.__version__)
CACHE_HAS_LAYERS = hasattr(transformers.DynamicCache(), "layers")
"""Whether caches expose their layers (newer transformers): the lowrank generator can then
follow a KV cache; on older releases it is refused with a cache."""


def on_interface(model: nn.Module) -> bool:
    """Whether this transformers release runs the model's attention through the attention
    interface (BERT and T5 joined it during 5.x)."""
    from lcaam_patch.adapters.transformers import dispatches_through_interface

    return any(dispatches_through_interface(type(module)) for module in model.modules())


@dataclasses.dataclass
class Family:
    """A tiny model, its inputs, and where its padding is."""

    build: Callable[[str], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    output: Callable[[Any], torch.Tensor]
    valid: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Selects the outputs of non-padded positions."""
    pad: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    """The same inputs with other tokens at the padded positions."""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    sites: int = 0


V, L = 128, 10


def _ids(batch: int = 2, length: int = L) -> torch.Tensor:
    return torch.randint(3, V, (batch, length))


def _padding(length: int = L, *, left: bool) -> torch.Tensor:
    """Row 0 full, row 1 with its first (left) or last (right) 3 positions padded."""
    mask = torch.ones(2, length, dtype=torch.long)
    if left:
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    return mask


def _repad(key: str, mask_key: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def repad(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        changed = dict(inputs)
        padded = inputs[mask_key] == 0
        changed[key] = torch.where(padded, torch.randint(3, V, padded.shape), inputs[key])
        return changed

    return repad


def _valid_rows(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda out: out[mask.bool()]


def _causal_lm(name: str, **extra: Any) -> Family:
    config_class = getattr(transformers, f"{name}Config")
    model_class = getattr(transformers, f"{name}ForCausalLM")
    mask = _padding(left=True)
    options = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )
    return Family(
        build=lambda impl: model_class(config_class(**options, attn_implementation=impl)),
        inputs=lambda: {"input_ids": _ids(), "attention_mask": mask},
        output=lambda out: out.logits,
        valid=_valid_rows(mask),
        pad=_repad("input_ids", "attention_mask"),
        sites=2,
    )


def _gpt2() -> Family:
    mask = _padding(left=True)
    return Family(
        build=lambda impl: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_implementation=impl
            )
        ),
        inputs=lambda: {"input_ids": _ids(), "attention_mask": mask},
        output=lambda out: out.logits,
        valid=_valid_rows(mask),
        pad=_repad("input_ids", "attention_mask"),
        sites=2,
    )


def _bert() -> Family:
    mask = _padding(left=False)
    return Family(
        build=lambda impl: transformers.BertModel(
            transformers.BertConfig(
                vocab_size=V,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=64,
                attn_implementation=impl,
            )
        ),
        inputs=lambda: {"input_ids": _ids(), "attention_mask": mask},
        output=lambda out: out.last_hidden_state,
        valid=_valid_rows(mask),
        pad=_repad("input_ids", "attention_mask"),
        sites=2,
    )


def _bert_decoder() -> Family:
    """BERT as a causal decoder with cross-attention over padded encoder states."""
    memory_mask = torch.ones(2, 7, dtype=torch.long)
    memory_mask[1, -3:] = 0

    def inputs() -> dict[str, torch.Tensor]:
        return {
            "input_ids": _ids(),
            "encoder_hidden_states": torch.randn(2, 7, 64),
            "encoder_attention_mask": memory_mask,
        }

    def repad(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        padded = (memory_mask == 0).unsqueeze(-1)
        noise = torch.randn_like(inputs["encoder_hidden_states"])
        return {**inputs, "encoder_hidden_states": torch.where(padded, noise, inputs["encoder_hidden_states"])}

    return Family(
        build=lambda impl: transformers.BertLMHeadModel(
            transformers.BertConfig(
                vocab_size=V,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=64,
                is_decoder=True,
                add_cross_attention=True,
                attn_implementation=impl,
            )
        ),
        inputs=inputs,
        output=lambda out: out.logits,
        pad=repad,
        sites=4,
    )


VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


def _vit() -> Family:
    return Family(
        build=lambda impl: transformers.ViTModel(
            transformers.ViTConfig(image_size=32, patch_size=8, **VISION, attn_implementation=impl)
        ),
        inputs=lambda: {"pixel_values": _pixels()},
        output=lambda out: out.last_hidden_state,
        sites=2,
    )


def _siglip() -> Family:
    return Family(
        build=lambda impl: transformers.SiglipVisionModel(
            transformers.SiglipVisionConfig(
                image_size=32, patch_size=8, vision_use_head=False, **VISION, attn_implementation=impl
            )
        ),
        inputs=lambda: {"pixel_values": _pixels()},
        output=lambda out: out.last_hidden_state,
        sites=2,
    )


def _clip() -> Family:
    mask = _padding(left=True)

    def build(impl: str) -> nn.Module:
        text = dict(vocab_size=V, max_position_embeddings=16, **VISION)
        vision = dict(image_size=32, patch_size=8, **VISION)
        config = transformers.CLIPConfig(
            text_config=text, vision_config=vision, projection_dim=32, attn_implementation=impl
        )
        return transformers.CLIPModel(config)

    def output(out: Any) -> torch.Tensor:
        return torch.cat([out.text_model_output.last_hidden_state.flatten(1), out.image_embeds], dim=1)

    def valid(out: torch.Tensor) -> torch.Tensor:
        text = out[:, : L * 64].reshape(2, L, 64)[mask.bool()]
        return torch.cat([text.flatten(), out[:, L * 64 :].flatten()])

    return Family(
        build=build,
        inputs=lambda: {"input_ids": _ids(), "attention_mask": mask, "pixel_values": _pixels()},
        output=output,
        valid=valid,
        pad=_repad("input_ids", "attention_mask"),
        sites=4,
    )


def _seq2seq_inputs(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(), "attention_mask": mask, "decoder_input_ids": _ids(2, 6)}


def _bart() -> Family:
    mask = _padding(left=False)
    return Family(
        build=lambda impl: transformers.BartForConditionalGeneration(
            transformers.BartConfig(
                vocab_size=V,
                d_model=64,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
                max_position_embeddings=64,
                attn_implementation=impl,
            )
        ),
        inputs=lambda: _seq2seq_inputs(mask),
        output=lambda out: out.logits,
        pad=_repad("input_ids", "attention_mask"),
        sites=3,
    )


def _t5() -> Family:
    mask = _padding(left=False)
    return Family(
        build=lambda impl: transformers.T5ForConditionalGeneration(
            transformers.T5Config(
                vocab_size=V,
                d_model=64,
                d_kv=16,
                d_ff=128,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                attn_implementation=impl,
            )
        ),
        inputs=lambda: _seq2seq_inputs(mask),
        output=lambda out: out.logits,
        pad=_repad("input_ids", "attention_mask"),
        options=dict(max_tokens=16, max_kv_tokens=16),
        sites=6,
    )


def _whisper() -> Family:
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0

    def inputs() -> dict[str, torch.Tensor]:
        return {
            "input_features": torch.randn(2, 8, 32),
            "decoder_input_ids": _ids(2, 6),
            "decoder_attention_mask": mask,
        }

    return Family(
        build=lambda impl: transformers.WhisperForConditionalGeneration(
            transformers.WhisperConfig(
                vocab_size=V,
                num_mel_bins=8,
                d_model=64,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
                max_source_positions=16,
                max_target_positions=12,
                pad_token_id=0,
                decoder_start_token_id=1,
                attn_implementation=impl,
            )
        ),
        inputs=inputs,
        output=lambda out: out.logits,
        valid=_valid_rows(mask),
        pad=_repad("decoder_input_ids", "decoder_attention_mask"),
        sites=3,
    )


FAMILIES: dict[str, Callable[[], Family]] = {
    "llama": lambda: _causal_lm("Llama"),
    "mistral": lambda: _causal_lm("Mistral", sliding_window=4),
    "qwen3": lambda: _causal_lm("Qwen3", head_dim=16),
    "gpt2": _gpt2,
    "bert": _bert,
    "bert-decoder": _bert_decoder,
    "vit": _vit,
    "clip": _clip,
    "siglip": _siglip,
    "whisper": _whisper,
    "bart": _bart,
    "t5": _t5,
}


def _perturb(model: nn.Module, scale: float = 0.5) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if lcaam_patch.is_lcaam_key(name):
                parameter.normal_(0.0, scale)


def _upstream_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not lcaam_patch.is_lcaam_key(k)}


def _structure(model: nn.Module) -> list[tuple[str, type, list[str], int]]:
    return [(n, type(m), sorted(vars(m)), len(m._load_state_dict_post_hooks)) for n, m in model.named_modules()]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family(name: str, implementation: str) -> None:
    """Identity exact, perturbed M changes the output, gradients reach every LCAAM
    parameter, padded keys have no influence, keys unchanged, remove restores."""
    family = FAMILIES[name]()
    if not on_interface(family.build("eager")):
        with pytest.raises(lcaam_patch.NoAttentionFoundError, match="found no attention module"):
            lcaam_patch.apply(family.build("eager"), **family.options)
        return
    model: Any = family.build(implementation).eval()
    reference = copy.deepcopy(model)
    inputs = family.inputs()
    before, structure = _upstream_state(model), _structure(model)
    config_implementation = model.config._attn_implementation
    configs = {path: module.config for path, module in model.named_modules() if hasattr(module, "config")}
    implementations = {path: config._attn_implementation for path, config in configs.items()}

    lcaam_patch.apply(model, **family.options)
    sites = lcaam_patch.patched_sites(model)
    assert len(sites) == family.sites
    assert {site.adapter.name for _, _, site in sites} == {"transformers"}
    assert model.config._attn_implementation == config_implementation
    for path, module, _ in sites:
        assert isinstance(module.config, transformers.PretrainedConfig)
        assert module.config is not configs[path]
        assert module.config._attn_implementation == "lcaam"
        assert configs[path]._attn_implementation == implementations[path]
    assert set(_upstream_state(model)) == set(before)
    valid = family.valid or (lambda out: out)
    with torch.no_grad():
        expected = family.output(reference(**inputs))
        torch.testing.assert_close(valid(family.output(model(**inputs))), valid(expected), atol=1e-5, rtol=1e-5)

    _perturb(model)
    with torch.no_grad():
        moved = family.output(model(**inputs))
    assert (valid(moved) - valid(expected)).abs().max() > 1e-3
    if family.pad is not None:
        with torch.no_grad():
            repadded = family.output(model(**family.pad(inputs)))
        torch.testing.assert_close(valid(repadded), valid(moved), atol=1e-6, rtol=1e-6)

    model.train()
    family.output(model(**inputs)).square().mean().backward()
    lcaam = [(n, p) for n, p in model.named_parameters() if lcaam_patch.is_lcaam_key(n)]
    assert lcaam
    for parameter_name, parameter in lcaam:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name
    model.zero_grad(set_to_none=True)

    lcaam_patch.remove(model.eval())
    assert _structure(model) == structure
    for path, module, _ in sites:
        assert module.config is configs[path]
        assert "forward" not in vars(module)
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(family.output(model(**inputs)), expected, atol=0, rtol=0)


def _llama(**extra: Any) -> Any:
    options = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    options.update(extra)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**options)).eval()


@pytest.mark.parametrize(
    "name,bounds",
    [
        ("vit", {("self", 17, 17)}),
        ("siglip", {("self", 16, 16)}),
        ("clip", {("self", 16, 16), ("self", 17, 17)}),
        ("whisper", {("self", 16, 16), ("self", 12, 12), ("cross", 12, 16)}),
        ("gpt2", {("self", 64, 64)}),
    ],
)
def test_token_bounds_come_from_the_config(name: str, bounds: set[tuple[str, int, int]]) -> None:
    """Image grids plus prefix tokens (text and vision towers of CLIP), Whisper's source
    (encoder) and target (decoder) positions, text positions."""
    model = lcaam_patch.apply(FAMILIES[name]().build("sdpa"))
    geometry = {
        (site.geometry.kind, site.geometry.max_q_tokens, site.geometry.max_kv_tokens)
        for _, _, site in lcaam_patch.patched_sites(model)
    }
    assert geometry == bounds


def test_absurd_width_is_refused_with_the_ways_out() -> None:
    """Llama-3's 131072 positions: the error names max_kv_tokens and generator='lowrank'."""
    model = _llama(max_position_embeddings=131072)
    with pytest.raises(lcaam_patch.MissingBoundError, match=r"131072.*max_kv_tokens=N.*generator='lowrank'"):
        lcaam_patch.apply(model)
    assert not lcaam_patch.is_patched(model)
    lcaam_patch.apply(model, max_kv_tokens=32)
    assert {site.geometry.max_kv_tokens for _, _, site in lcaam_patch.patched_sites(model)} == {32}
    lcaam_patch.remove(model)
    lcaam_patch.apply(model, generator="lowrank")
    assert lcaam_patch.is_patched(model)


def test_t5_needs_a_bound() -> None:
    model = FAMILIES["t5"]().build("eager")
    if not on_interface(model):
        pytest.skip(f"T5 is not on the attention interface in transformers {VERSION}")
    with pytest.raises(lcaam_patch.MissingBoundError, match="max_tokens=N"):
        lcaam_patch.apply(model)


def _flex() -> nn.Module:
    return _llama(attn_implementation="flex_attention")


def _paged() -> nn.Module:
    model = _llama()
    model.config._attn_implementation_internal = "paged|sdpa"
    return model


def _softcap() -> nn.Module:
    config = transformers.Gemma2Config(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attn_logit_softcapping=50.0,
    )
    return transformers.Gemma2ForCausalLM(config)


def _sinks() -> nn.Module:
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip(f"transformers {VERSION} has no model with attention sinks (gpt-oss)")
    config = transformers.GptOssConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        max_position_embeddings=64,
    )
    return transformers.GptOssForCausalLM(config)


def _chunked() -> nn.Module:
    from transformers.models.qwen2_vl import configuration_qwen2_vl, modeling_qwen2_vl

    config = configuration_qwen2_vl.Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=32, num_heads=4)
    return modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel(config)


@pytest.mark.parametrize(
    "build,reason",
    [
        (_flex, "runs attn_implementation='flex_attention'.*attn_implementation='sdpa'"),
        (_paged, "runs attn_implementation='paged\\|sdpa'"),
        (_softcap, "soft-caps its attention logits"),
        (_sinks, "attention sinks"),
        (_chunked, "once per chunk"),
        (lambda: nn.DataParallel(_llama()), "wrapped by nn.DataParallel"),
    ],
    ids=["flex", "paged", "softcap", "sinks", "chunked", "dataparallel"],
)
def test_what_cannot_be_honoured_is_refused_at_apply(build: Callable[[], nn.Module], reason: str) -> None:
    model = build()
    state = model.state_dict()
    with pytest.raises(lcaam_patch.LCAAMError, match=reason):
        lcaam_patch.apply(model)
    assert not lcaam_patch.is_patched(model)
    assert model.state_dict().keys() == state.keys()


def test_switching_the_implementation_after_apply_is_refused() -> None:
    """At the switch (set_attn_implementation), and at the next forward when the config
    was edited directly; after remove the switch works again."""
    model: Any = lcaam_patch.apply(_llama())
    if hasattr(model, "set_attn_implementation"):
        with pytest.raises(
            lcaam_patch.UnsupportedModuleError, match=r"applied under attn_implementation='sdpa'.*remove"
        ):
            model.set_attn_implementation("eager")
        model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation_internal = "eager"
    with pytest.raises(lcaam_patch.UnsupportedModuleError, match=r"switched from 'sdpa' to 'eager'.*remove"):
        model(_ids(1, 5))
    lcaam_patch.remove(model)
    assert "set_attn_implementation" not in vars(model)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
    else:
        model.config._attn_implementation_internal = "sdpa"
    lcaam_patch.apply(model)
    assert model(_ids(1, 5)).logits.isfinite().all()


def test_per_instance_other_models_and_the_config_are_untouched() -> None:
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    patched, other = transformers.LlamaForCausalLM(config).eval(), transformers.LlamaForCausalLM(config).eval()
    assert patched.config is other.config is config
    ids = _ids()
    with torch.no_grad():
        expected = other(ids).logits
    lcaam_patch.apply(patched)
    _perturb(patched)
    assert config._attn_implementation == "sdpa"
    assert all(layer.self_attn.config is config for layer in other.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, expected, atol=0, rtol=0)
        assert (patched(ids).logits - other(ids).logits).abs().max() > 1e-3
    assert not lcaam_patch.is_patched(other)


def _mistral(sliding_window: int) -> nn.Module:
    config = transformers.MistralConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=sliding_window,
    )
    return transformers.MistralForCausalLM(config).eval()


def _generate(model: Any, ids: torch.Tensor, mask: torch.Tensor | None = None, **options: Any) -> Any:
    """Greedy tokens and their scores (B, steps, vocab)."""
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        **options,
    )
    return out.sequences, torch.stack(out.scores, dim=1)


def _assert_same_generation(a: Any, b: Any) -> None:
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_generate_gives_the_same_tokens_with_and_without_cache(sliding_window: int | None) -> None:
    """After LCAAM moved from identity: dynamic and static caches, left padding, sliding
    windows (4 positions, so the 14-token sequences overflow them)."""
    model = _llama() if sliding_window is None else _mistral(sliding_window)
    lcaam_patch.apply(model)
    _perturb(model)
    ids, mask = _ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    without = _generate(model, ids, mask, use_cache=False)
    _assert_same_generation(_generate(model, ids, mask), without)
    _assert_same_generation(_generate(model, ids, mask, cache_implementation="static"), without)
    lcaam_patch.remove(model)
    assert (_generate(model, ids, mask, use_cache=False)[1] - without[1]).abs().max() > 1e-2


@pytest.mark.skipif(not hasattr(transformers, "Gemma3nTextConfig"), reason="no Gemma 3n in this release")
@pytest.mark.parametrize("generator", ["mlp", "lowrank"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_layers_that_reuse_another_layers_keys_generate_the_same_with_and_without_cache(
    implementation: str, generator: str
) -> None:
    """Gemma 3n's KV-shared layers keep no cache of their own (a DummyLayer): their key
    columns follow the layer whose keys they reuse, full and sliding."""
    config = transformers.Gemma3nTextConfig(
        vocab_size=V,
        vocab_size_per_layer_input=V,
        hidden_size=64,
        hidden_size_per_layer_input=8,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_kv_shared_layers=2,
        max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"] * 2,
        sliding_window=4,
        laurel_rank=4,
        altup_num_inputs=2,
        activation_sparsity_pattern=[0.0] * 4,
    )
    model = transformers.Gemma3nForCausalLM._from_config(config, attn_implementation=implementation).eval()
    reference = copy.deepcopy(model)
    lcaam_patch.apply(model, generator=generator)
    ids = _ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    _perturb(model, 0.3)
    _assert_same_generation(_generate(model, ids), _generate(model, ids, use_cache=False))


def test_generate_encoder_decoder_with_cache() -> None:
    model = lcaam_patch.apply(FAMILIES["bart"]().build("sdpa").eval())
    _perturb(model, 0.3)
    ids = _ids(2, 6)
    _assert_same_generation(_generate(model, ids), _generate(model, ids, use_cache=False))


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_lowrank_generates_the_same_with_and_without_cache(sliding_window: int | None) -> None:
    """generator='lowrank' reads the key tokens: the adapter keeps the layer inputs of the
    cached positions beside the KV cache (dynamic, static, sliding)."""
    model = _llama() if sliding_window is None else _mistral(sliding_window)
    reference = copy.deepcopy(model)
    lcaam_patch.apply(model, generator="lowrank", rank=2)
    ids, mask = _ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    _perturb(model)
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() > 1e-3
    without = _generate(model, ids, mask, use_cache=False)
    if not CACHE_HAS_LAYERS:
        with pytest.raises(lcaam_patch.UnsupportedModuleError, match="KV cache LCAAM cannot follow.*use_cache=False"):
            _generate(model, ids, mask)
        return
    _assert_same_generation(_generate(model, ids, mask), without)
    _assert_same_generation(_generate(model, ids, mask, cache_implementation="static"), without)


def test_lowrank_refuses_a_cache_filled_before_apply() -> None:
    model = _llama()
    ids = _ids(1, 6)
    past = model(ids, use_cache=True).past_key_values
    lcaam_patch.apply(model, generator="lowrank")
    reason = "holds 6 positions of which LCAAM saw 0" if CACHE_HAS_LAYERS else "KV cache LCAAM cannot follow"
    with pytest.raises(lcaam_patch.UnsupportedModuleError, match=reason):
        model(ids[:, -1:], past_key_values=past)


@pytest.mark.skipif(not CACHE_HAS_LAYERS, reason="the lowrank generator follows only caches with layers")
def test_a_cache_lowrank_followed_pickles_and_its_copy_is_refused_not_misread() -> None:
    """The kept inputs live on the cache: it still pickles (`torch.save(cache)`), and a copy
    (pickled or deep-copied) is one LCAAM did not see, so continuing from it is refused."""
    import pickle

    model = lcaam_patch.apply(_llama(), generator="lowrank")
    ids = _ids(1, 6)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        copies = [pickle.loads(pickle.dumps(cache)), copy.deepcopy(cache)]
        model(ids[:, -1:], past_key_values=cache)  # the original goes on
        for copied in copies:
            with pytest.raises(lcaam_patch.UnsupportedModuleError, match="holds 6 positions of which LCAAM saw 0"):
                model(ids[:, -1:], past_key_values=copied)


@pytest.mark.skipif(not CACHE_HAS_LAYERS, reason="the lowrank generator follows only caches with layers")
def test_lowrank_key_factors_kept_per_cache_position_follow_an_optimizer_step() -> None:
    """Outside autograd the key factor of each cached position is computed once and kept; an
    optimizer step on the generators between two calls on the same cache makes them stale, and
    the next step then equals the forward over every token without a cache (one layer, whose
    cached keys and inputs the step leaves as they are)."""
    model = _llama(num_hidden_layers=1)
    lcaam_patch.apply(model, generator="lowrank", rank=2)
    _perturb(model, 0.3)
    ids = _ids(2, 9)
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).past_key_values
        cache = model(ids[:, 6:7], past_key_values=cache, use_cache=True).past_key_values
        before = model(ids).logits[:, -2:]
    generators = [p for name, p in model.named_parameters() if lcaam_patch.is_lcaam_key(name)]
    optimizer = torch.optim.Adam(generators, lr=0.5)
    model(ids).logits.square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        expected = model(ids).logits[:, -2:]
        stepped = model(ids[:, 7:], past_key_values=cache, use_cache=True).logits
    assert (expected - before).abs().max() > 1e-3
    torch.testing.assert_close(stepped, expected, atol=1e-5, rtol=1e-5)


def test_eager_weights_are_computed_only_when_something_reads_them() -> None:
    """Under the eager implementation a decode step computes no attention weights that
    nothing records (LCAAM then runs fused SDPA); asked for with output_attentions, or seen
    by a forward hook, they are computed and equal the upstream's."""
    model = _llama(attn_implementation="eager")
    reference = copy.deepcopy(model)
    lcaam_patch.apply(model)
    sites = [site for _, _, site in lcaam_patch.patched_sites(model)]
    ids = _ids(2, 7)
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).past_key_values
        cached = copy.deepcopy(cache)
        model(ids[:, 6:], past_key_values=cache, use_cache=True)
        assert {site.last_backend for site in sites} == {"sdpa"}
        ours = model(ids[:, 6:], past_key_values=copy.deepcopy(cached), output_attentions=True).attentions
        assert {site.last_backend for site in sites} == {"eager"}
        upstream_cache = reference(ids[:, :6], use_cache=True).past_key_values
        theirs = reference(ids[:, 6:], past_key_values=upstream_cache, output_attentions=True).attentions
        for mine, upstream in zip(ours, theirs, strict=True):
            torch.testing.assert_close(mine, upstream)
        seen: list[Any] = []
        model.model.layers[0].self_attn.register_forward_hook(lambda module, args, output: seen.append(output[1]))
        model(ids[:, 6:], past_key_values=copy.deepcopy(cached))
    assert sites[0].last_backend == "eager" and sites[1].last_backend == "sdpa"
    assert len(seen) == 1 and seen[0] is not None
    torch.testing.assert_close(seen[0], theirs[0])


def test_an_upstream_mask_changed_in_place_between_layers_is_read_again() -> None:
    """The upstream mask a model hands every layer is read once per forward, unless it
    changed in place in between (its version): a hook hides key 1 from layer 1 on."""
    model = _llama(attn_implementation="eager")
    reference = copy.deepcopy(model)
    lcaam_patch.apply(model)
    ids = _ids(2, 6)
    with torch.no_grad():
        unhooked = reference(ids).logits
        for each in (model, reference):
            each.model.layers[1].self_attn.register_forward_pre_hook(_hide_key_one, with_kwargs=True)
        expected = reference(ids).logits
        assert (expected - unhooked).abs().max() > 1e-3
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)


def _hide_key_one(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dtype != torch.bool:
        mask[..., 1:, 1] = torch.finfo(mask.dtype).min


def _lora(**options: Any) -> Any:
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, lora_alpha=8, **options)


def _train_step(model: nn.Module, ids: torch.Tensor) -> None:
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()


def _assert_lcaam_and_lora_learn(model: nn.Module) -> None:
    lcaam = {n: p for n, p in model.named_parameters() if lcaam_patch.is_lcaam_key(n) and p.requires_grad}
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lcaam and lora
    assert all(p.requires_grad for p in lora.values())
    for name, parameter in {**lcaam, **lora}.items():
        if "lora_A" not in name:  # lora_B starts at 0, so lora_A gets no gradient in the first step
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_peft_lora_then_lcaam() -> None:
    """get_peft_model first (all-linear), apply after: the generators are not LoRA-wrapped
    and stay trainable; identity exact."""
    peft = pytest.importorskip("peft")
    model = _llama()
    reference = copy.deepcopy(model)
    ids = _ids()
    peft_model = peft.get_peft_model(model, _lora(target_modules="all-linear"))
    lcaam_patch.apply(peft_model)
    assert all(site.path.startswith("base_model.model.") for _, _, site in lcaam_patch.patched_sites(peft_model))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    _train_step(peft_model, ids)
    _assert_lcaam_and_lora_learn(peft_model)


def test_peft_lcaam_then_lora() -> None:
    """apply first: PEFT freezes every non-LoRA parameter, so the generators go through
    modules_to_save=['lcaam'] (trainable copies PEFT also saves)."""
    peft = pytest.importorskip("peft")
    model = lcaam_patch.apply(_llama())
    reference = copy.deepcopy(model)
    ids = _ids()
    frozen = peft.get_peft_model(copy.deepcopy(model), _lora(target_modules=["q_proj", "v_proj"]))
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if lcaam_patch.is_lcaam_key(n))
    peft_model = peft.get_peft_model(model, _lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lcaam"]))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    _train_step(peft_model, ids)
    _assert_lcaam_and_lora_learn(peft_model)
    saved = peft.get_peft_model_state_dict(peft_model)
    assert any(lcaam_patch.is_lcaam_key(key) for key in saved)


def test_peft_all_linear_does_not_silently_swallow_the_generators() -> None:
    peft = pytest.importorskip("peft")
    ids = _ids()
    wrapped = peft.get_peft_model(lcaam_patch.apply(_llama()), _lora(target_modules="all-linear"))
    with pytest.raises(lcaam_patch.UnsupportedModuleError, match=r"wrapped by another tuner.*exclude_modules"):
        wrapped(ids)
    excluded = peft.get_peft_model(
        lcaam_patch.apply(_llama()),
        _lora(target_modules="all-linear", exclude_modules=r".*\.lcaam\..*", modules_to_save=["lcaam"]),
    )
    _train_step(excluded, ids)
    _assert_lcaam_and_lora_learn(excluded)


def test_trainer_checkpoint_holds_and_resume_restores_lcaam(tmp_path: Any) -> None:
    from safetensors.torch import load_file

    ids = _ids(8, 8)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_steps=3,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        logging_steps=100,
        disable_tqdm=True,
    )
    model = lcaam_patch.apply(_llama())
    initial = {k: v.clone() for k, v in lcaam_patch.lcaam_state_dict(model).items()}
    transformers.Trainer(model=model, args=arguments, train_dataset=dataset).train()
    trained = lcaam_patch.lcaam_state_dict(model)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
    checkpoint = tmp_path / "checkpoint-3"
    saved = load_file(str(checkpoint / "model.safetensors"))
    for key, value in trained.items():
        torch.testing.assert_close(saved[key], value, atol=0, rtol=0)

    resumed = lcaam_patch.apply(_llama())
    transformers.Trainer(model=resumed, args=arguments, train_dataset=dataset).train(
        resume_from_checkpoint=str(checkpoint)
    )
    for key, value in lcaam_patch.lcaam_state_dict(resumed).items():
        torch.testing.assert_close(value, trained[key], atol=0, rtol=0)


INSPECT_TARGET = """
import transformers


def tiny_vit():
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    return transformers.ViTModel(config)


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)
"""


def test_inspect_a_transformers_model_given_as_module_function(tmp_path: Any, monkeypatch: Any, capsys: Any) -> None:
    from lcaam_patch.cli import main

    (tmp_path / "tiny_hf_models.py").write_text(INSPECT_TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["inspect", "tiny_hf_models:tiny_vit", "--input-shape", "2,3,32,32"]) == 0
    out = capsys.readouterr().out
    claimed = r"\[patch    \] \S+  transformers\.models\.vit\.modeling_vit\.ViT\w*Attention  \(transformers\)"
    assert len(re.findall(claimed + ": self, Nq×Nk ≤ 17×17", out)) == 2
    assert len(re.findall(r"\S+  transformers  self  17×17  ", out)) == 2
    assert "Cost of one forward pass on input (2, 3, 32, 32)" in out


def test_inspect_a_text_model_feeds_it_token_ids(tmp_path: Any, monkeypatch: Any, capsys: Any) -> None:
    from lcaam_patch.cli import main

    (tmp_path / "tiny_hf_models.py").write_text(INSPECT_TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["inspect", "tiny_hf_models:tiny_llama", "--input-shape", "2,9"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"model\.layers\.\d\.self_attn\s+transformers\s+self\s+64×64", out)) == 2
    assert "Cost of one forward pass on input (2, 9)" in out


def test_cross_attention_sites_are_cross() -> None:
    model = FAMILIES["bert-decoder"]().build("sdpa")
    if not on_interface(model):
        pytest.skip(f"BERT is not on the attention interface in transformers {VERSION}")
    model = lcaam_patch.apply(model)
    kinds = {path: site.geometry.kind for path, _, site in lcaam_patch.patched_sites(model)}
    assert sorted(kinds.values()) == ["cross", "cross", "self", "self"]
    assert all(kind == "cross" for path, kind in kinds.items() if "crossattention" in path)


def test_global_mode_generates_the_same_with_and_without_cache() -> None:
    model = _llama()
    reference = copy.deepcopy(model)
    lcaam_patch.apply(model, mode="global")
    assert sum(site.owns_generator for _, _, site in lcaam_patch.patched_sites(model)) == 1
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    _perturb(model)
    _assert_same_generation(_generate(model, ids), _generate(model, ids, use_cache=False))


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = lcaam_patch.apply(_llama())
    _perturb(model)
    checkpointed: Any = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = _ids()
    _train_step(model, ids)
    _train_step(checkpointed, ids)
    grads = dict(checkpointed.named_parameters())
    for name, parameter in model.named_parameters():
        if lcaam_patch.is_lcaam_key(name):
            torch.testing.assert_close(grads[name].grad, parameter.grad, atol=1e-6, rtol=1e-5)


def test_a_family_off_the_attention_interface_is_not_claimed() -> None:
    """Bloom computes attention in its own code: nothing to patch, and the error says so."""
    config = transformers.BloomConfig(vocab_size=V, hidden_size=64, n_layer=1, n_head=4)
    with pytest.raises(lcaam_patch.NoAttentionFoundError, match="BloomAttention"):
        lcaam_patch.apply(transformers.BloomModel(config))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_bfloat16_identity_and_padded_keys_weigh_zero(implementation: str) -> None:
    """finfo.min masks of a bfloat16 model stay hard; eager returns the weights upstream
    returns, exactly 0 on padded keys whatever the generator says."""
    model = _llama(attn_implementation=implementation).to(torch.bfloat16)
    reference = copy.deepcopy(model)
    lcaam_patch.apply(model)
    ids, mask = _ids(), _padding(left=True)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits[mask.bool()]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[mask.bool()], expected, atol=1e-2, rtol=2e-2)
    _perturb(model, 2.0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    assert out.logits.isfinite().all()
    if implementation == "eager":
        for weights in out.attentions:
            assert weights.dtype == torch.bfloat16
            assert torch.equal(weights[1, :, 3:, :3], torch.zeros_like(weights[1, :, 3:, :3]))
            assert torch.equal(weights[0].triu(1), torch.zeros_like(weights[0]))


def test_a_patched_model_pickles_and_deep_copies() -> None:
    import pickle

    model = lcaam_patch.apply(_llama())
    _perturb(model)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    copies: list[Any] = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    for copied in copies:
        with torch.no_grad():
            torch.testing.assert_close(copied(ids).logits, expected, atol=0, rtol=0)
        lcaam_patch.remove(copied)
        assert all("set_attn_implementation" not in vars(m) for m in copied.modules())
        assert all(layer.self_attn.config is copied.config for layer in copied.model.layers)


@pytest.mark.slow
@pytest.mark.parametrize("generator", ["mlp", "lowrank"])
def test_static_cache_generation_compiles_fullgraph_with_the_eager_tokens(generator: str) -> None:
    """The way transformers' docs compile generation (a static cache, the forward compiled
    with fullgraph=True): no graph break (fullgraph raises on one), eager's tokens, more new
    tokens than dynamo's recompile limit (8), so a graph per decoding step would fail, and a
    second `generate` (a new cache) that compiles nothing new."""
    model = _llama(num_hidden_layers=1)
    lcaam_patch.apply(model, generator=generator)
    _perturb(model, 0.3)
    prompts = [_ids(1, 5), _ids(1, 5)]
    options: dict[str, Any] = dict(
        max_new_tokens=16, min_new_tokens=16, do_sample=False, cache_implementation="static", pad_token_id=0
    )
    eager = [model.generate(ids, **options) for ids in prompts]
    graphs: list[Any] = []

    def counting_aot_eager(graph: Any, example_inputs: Any) -> Any:
        graphs.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=counting_aot_eager, fullgraph=True)
    try:
        assert torch.equal(model.generate(prompts[0], **options), eager[0])
        compiled = len(graphs)
        assert torch.equal(model.generate(prompts[1], **options), eager[1])
        assert len(graphs) == compiled
    finally:
        del model.forward
        torch._dynamo.reset()


@pytest.mark.parametrize(
    "build, tokens",
    [
        (lambda: transformers.DeiTModel(transformers.DeiTConfig(**_VISION, image_size=32, patch_size=8)), 18),
        (
            lambda: transformers.YolosModel(
                transformers.YolosConfig(**_VISION, image_size=[32, 32], patch_size=8, num_detection_tokens=5)
            ),
            22,
        ),
    ],
    ids=["deit", "yolos"],
)
def test_image_models_are_bounded_by_what_they_feed_their_attention(
    build: Callable[[], nn.Module], tokens: int
) -> None:
    """The shape probe counts DeiT's distillation token and YOLOS's detection tokens."""
    model = build().eval()
    reference = copy.deepcopy(model)
    lcaam_patch.apply(model)
    assert {site.geometry.max_kv_tokens for _, _, site in lcaam_patch.patched_sites(model)} == {tokens}
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).last_hidden_state, reference(pixels).last_hidden_state)


_VISION: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def test_siglip_pooling_head_is_bounded_by_the_probe() -> None:
    """SigLIP's `nn.MultiheadAttention` pooling head (one probe query over the patches) gets
    its bounds from what the model feeds it: exact at identity, in the path, a larger image
    than configured refused at the call, and `remove` gives the model back."""
    config = transformers.SiglipVisionConfig(**_VISION, image_size=32, patch_size=8, vision_use_head=True)
    model = transformers.SiglipVisionModel(config).eval()
    reference = copy.deepcopy(model)
    lcaam_patch.apply(model, exclude=["encoder.layers.0.self_attn"])  # the head alone
    sites = lcaam_patch.patched_sites(model)
    assert {(p, g.max_q_tokens, g.max_kv_tokens, g.kind) for p, _, s in sites for g in [s.geometry]} == {
        ("head.attention", 1, 16, "cross")
    }
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).pooler_output, reference(pixels).pooler_output)
    generator = model.head.attention.lcaam
    model(pixels).pooler_output.square().sum().backward()
    gradients = [p.grad for p in generator.parameters() if p.grad is not None]
    assert gradients and all(g.isfinite().all() for g in gradients) and any(g.abs().sum() > 0 for g in gradients)
    with torch.no_grad():
        for parameter in generator.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
        assert not torch.allclose(model(pixels).pooler_output, reference(pixels).pooler_output)
        with pytest.raises(lcaam_patch.LCAAMError, match="head.attention"):
            model(torch.randn(1, 3, 48, 48), interpolate_pos_encoding=True)
    lcaam_patch.remove(model)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).pooler_output, reference(pixels).pooler_output)


def test_a_given_bound_overrides_the_probed_pooling_head_bound() -> None:
    """`max_tokens`/`max_kv_tokens` passed to apply take precedence over the probe."""
    config = transformers.SiglipVisionConfig(**_VISION, image_size=32, patch_size=8, vision_use_head=True)
    model = transformers.SiglipVisionModel(config).eval()
    lcaam_patch.apply(model, max_tokens=25, max_kv_tokens=36)
    head = model.head.attention
    geometry = next(site.geometry for _, module, site in lcaam_patch.patched_sites(model) if module is head)
    assert (geometry.max_q_tokens, geometry.max_kv_tokens) == (25, 36)


@pytest.mark.skipif(not CACHE_HAS_LAYERS, reason="the lowrank generator follows only caches with layers")
def test_beam_search_reordering_the_cache_is_refused_under_lowrank_and_exact_under_mlp() -> None:
    """Beam search reorders the KV cache's rows between steps; the lowrank generator's kept
    layer inputs would then belong to other beams, so the step after a reorder is refused.
    The mlp generator reads no key tokens: its beam search equals the uncached one."""
    ids = _ids(2, 6)
    for generator in ("mlp", "lowrank"):
        model = _llama()
        lcaam_patch.apply(model, generator=generator, **({"rank": 2} if generator == "lowrank" else {}))
        _perturb(model)
        beams = {"num_beams": 3, "num_return_sequences": 1}
        if generator == "mlp":
            _assert_same_generation(_generate(model, ids, **beams), _generate(model, ids, use_cache=False, **beams))
            continue
        with pytest.raises(lcaam_patch.UnsupportedModuleError, match=r"reordered.*num_beams=1.*generator='mlp'"):
            _generate(model, ids, **beams)
