"""The census's tiny-model builder (scripts/transformers_census.py): what it shrinks must
still build the model the config describes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("transformers")


def _census() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "scripts" / "transformers_census.py"
    spec = importlib.util.spec_from_file_location("transformers_census", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("transformers_census", module)
    spec.loader.exec_module(module)
    return module


census = _census()


def test_special_tokens_past_the_tiny_vocabulary_are_renumbered_and_never_generated() -> None:
    """LLaVA's image token (32000) moves just past the tiny vocabulary, which shrinks with it,
    and generated text never holds it (a placeholder would need an image)."""
    config = census.tiny_config("llava")
    text = config.get_text_config()
    assert census.VOCAB <= config.image_token_id < text.vocab_size <= census.VOCAB + 8
    model = census.model_class(config)._from_config(config)
    inputs = census.make_inputs(model, config)[0]
    assert int(inputs["input_ids"].max()) < census.VOCAB


def test_a_backbone_keeps_as_many_feature_maps_as_its_neck_reads() -> None:
    """Depth Anything's neck reads 4 maps: its DINOv2 backbone keeps 4 layers and outputs
    each, instead of the default last-layer map."""
    config = census.tiny_config("depth_anything")
    backbone = config.backbone_config
    assert len(backbone.out_indices) == len(config.neck_hidden_sizes) == 4
    assert backbone.num_hidden_layers >= 4


def test_widths_under_other_names_shrink_with_the_width_they_equal() -> None:
    """GLM-4V's vision output width must equal its text width: both shrink together."""
    config = census.tiny_config("glm4v")
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size == census.HIDDEN


def test_hybrid_models_keep_an_attention_layer() -> None:
    """A pattern of layer kinds shorter than the layer count (RecurrentGemma's block_types)
    keeps each kind once, and the hybrids whose defaults have no attention layer get one:
    a census row of a tiny hybrid must count its attention (and Falcon-H1's Mamba heads must
    still split its inner width)."""
    gemma = census.tiny_config("recurrent_gemma")
    assert gemma.num_hidden_layers == census.LAYERS and gemma.block_types == ["recurrent", "attention"]
    for model_type in ("recurrent_gemma", "bamba", "granitemoehybrid", "falcon_h1"):
        config = census.tiny_config(model_type)
        with torch.device("meta"):
            model = census.model_class(config)(config)
        names = {type(m).__name__ for m in model.modules()}
        assert any(name.endswith("Attention") for name in names), (model_type, names)


def test_expert_counts_the_defaults_leave_unset_get_small_values() -> None:
    """DeepSeek-V2's defaults leave `num_experts_per_tok` None (its router then fails); the
    builder gives it the small count of the other MoE models, below the experts it routes to."""
    config = census.tiny_config("deepseek_v2")
    assert config.num_experts_per_tok == census._SMALL["num_experts_per_tok"] < config.n_routed_experts
