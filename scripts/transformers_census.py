"""Census of every model type of the installed transformers under LCAAM.

    python scripts/transformers_census.py [--types a,b] [--implementations eager,sdpa]
                                          [--workers N] [--timeout S] [--json FILE]

Each model type of `CONFIG_MAPPING` is built tiny and at random from its config class (the
defaults, shrunk recursively into the sub-configs: widths, heads, layers, vocabularies,
image and audio sizes; `OVERRIDES` fixes what the generic rules get wrong), under each
`attn_implementation`, and given generated inputs (text with a padded row, images, audio).
The output compared is every floating tensor of the model's output, in eval mode.
Each (type, implementation) runs in its own forked process under a timeout and gets one
status:

- `unbuildable`: the tiny model cannot be built or cannot run unpatched (the row says why);
- `not claimed`: `apply` raises `NoAttentionFoundError`;
- `refused at apply`: `apply` raises another `LCAAMError` (class and message kept);
- `refused at first call`: the first patched forward raises an `LCAAMError`;
- `exact`: patched at identity init the output is the unpatched one within `TOLERANCE`, a
  perturbation of every generator changes it (at all: some models, MobileBERT's stacked
  bottlenecks, damp it below the tolerance), a backward gives a generator parameter a
  nonzero finite gradient, and `remove` gives the unpatched output back. Every upstream
  parameter is jittered first (`_jitter`), so that a projection a random init leaves at 0
  does not hide whether LCAAM is in the path;
- broken: `not exact at identity`, `not in path`, `error on first forward` (another
  exception after a successful apply), `remove not exact`, `error` (anything else).

TOLERANCE: float32 throughout; the patched attention computes the same scores in another
order of operations (its own backend instead of upstream's), which moves each output by a
few float32 ulps per layer (~1e-6 relative over widths of 64 and two layers), while a real
change of the attention (a lost mask, scale or bias) moves it by 1e-3 or more. So a row is
exact within 1e-5 · max(1, max |unpatched output|).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import multiprocessing
import os
import re
import sys
import time
import warnings
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import transformers
import transformers.modeling_utils  # imported once here, before the workers fork)
from torch import nn
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import lcaam_patch

STATUSES = (
    "exact",
    "not claimed",
    "refused at apply",
    "refused at first call",
    "unbuildable",
    "not exact at identity",
    "not in path",
    "error on first forward",
    "remove not exact",
    "error",
)
BROKEN = STATUSES[5:]
TOLERANCE = 1e-5
MAX_PARAMETERS = 80_000_000
"""A model still above this after shrinking is unbuildable (the rules missed a width); below it,
a model whose one embedding or vision stack stays large (Csm's codebook embeddings, ALIGN's
EfficientNet) still builds and runs in seconds."""

HIDDEN, HEADS, LAYERS, FFN, POSITIONS, VOCAB = 64, 4, 2, 128, 128, 1000
BATCH, TEXT, TARGET = 2, 12, 8
_HIDDEN_KEYS = {
    "hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "dim", "model_dim", "d_embed", "hidden_dim",
    "word_embed_proj_dim", "projection_dim", "encoder_hidden_size", "vision_embed_dim", "text_embed_dim",
    "text_hidden_size", "vision_hidden_size", "mm_hidden_size", "embedding_size", "cross_attention_hidden_size",
    "emb_dim", "d_latents",
}  # fmt: skip
_HEAD_KEYS = {
    "num_attention_heads", "n_head", "num_heads", "n_heads", "num_head", "attention_heads",
    "encoder_attention_heads", "decoder_attention_heads",
}  # fmt: skip
_KV_KEYS = {"num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv"}
_HEAD_DIM_KEYS = {"head_dim", "d_kv", "kv_channels", "attention_head_size", "d_head", "v_head_dim"}
_LAYER_KEYS = {
    "num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
    "num_decoder_layers", "num_encoder_layers",
}  # fmt: skip
_FFN_KEYS = {
    "intermediate_size", "ffn_dim", "n_inner", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_hidden_size",
    "intermediate_dim", "moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
}  # fmt: skip
_POSITION_KEYS = {
    "max_position_embeddings", "n_positions", "max_source_positions", "max_target_positions", "n_ctx",
    "model_max_length",
}  # fmt: skip
_SMALL = {
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "num_experts_per_token": 2,
    "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "kv_lora_rank": 16, "q_lora_rank": 16,
    "num_conv_pos_embeddings": 16, "image_size": 32, "patch_size": 8, "window_size": 2, "rotary_dim": 16,
}  # fmt: skip
_WIDTH_NAME = re.compile(r"hidden|dim|_size$|channels|width")
_NOT_WIDTH = re.compile(
    r"vocab|position|image|patch|kernel|window|stride|head|num_|max_|mel|codebook_size|sampl|chunk|layer"
)
_OUTPUTS = ("out_features", "out_indices")
_LIST_KEYS = {"depths": 1, "num_heads": 2, "num_attention_heads": 2, "hidden_sizes": 32, "conv_dim": 32}

OVERRIDES: dict[str, dict[str, Any]] = {
    "jamba": {"attn_layer_offset": 1, "attn_layer_period": 2, "expert_layer_offset": 1, "expert_layer_period": 2},
    "bamba": {"attn_layer_indices": [1]},  # no attention layer by default; the published checkpoints have some
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},  # likewise (all Mamba by default)
    "dory": {"n_input_layers": 0, "n_recurrent_layers": 2, "n_output_layers": 0},  # the sections sum to the layers
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # left None by the defaults, read per layer
    "step3p5": {"sliding_window": TEXT // 2},  # its mask builder needs a window even for full-attention layers
    "step3p7": {"text_config.sliding_window": TEXT // 2},
}
"""Per model type, config values set after the generic shrinking (dotted keys for sub-configs)."""


def _token_ids(tree: dict[str, Any]) -> list[int]:
    """Every token id or index anywhere in a config dict (vocabularies must keep them)."""
    found: list[int] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            found += _token_ids(value)
        elif _is_token_key(key):
            values = value if isinstance(value, list) else [value]
            found += [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return found


def _is_token_key(key: Any) -> bool:
    return str(key).endswith(("_token_id", "_token_index", "_token_ids"))


def _renumber_tokens(tree: dict[str, Any], numbers: dict[int, int]) -> None:
    """Give every special token id the number `numbers` has for it, in place: ids past the
    tiny vocabulary (a 150k-token model's image token) move just past `VOCAB`, so the
    vocabulary shrinks while generated text (ids below `VOCAB`) never holds them."""
    for key, value in tree.items():
        if isinstance(value, dict):
            _renumber_tokens(value, numbers)
        elif _is_token_key(key) and isinstance(value, list):
            tree[key] = [numbers.get(v, v) if isinstance(v, int) else v for v in value]
        elif _is_token_key(key) and isinstance(value, int) and not isinstance(value, bool):
            tree[key] = numbers.get(value, value)


def _widths(tree: dict[str, Any]) -> set[int]:
    """Every model width of a config dict before shrinking (values of the hidden-size keys)."""
    found: set[int] = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            found |= _widths(value)
        elif key in _HIDDEN_KEYS and isinstance(value, int) and not isinstance(value, bool) and value > HIDDEN:
            found.add(value)
    return found


def _is_width_key(key: str) -> bool:
    """A key that may hold a model width under another name (`out_hidden_size`,
    `adapter_in_dim`, `condition_dim`, `emb_dim`): shrunk with the widths it equals."""
    return _WIDTH_NAME.search(key) is not None and _NOT_WIDTH.search(key) is None


def _shrink(tree: dict[str, Any], vocab: int, widths: set[int], nested: bool = False) -> None:
    """Shrink a config dict in place, sub-configs (dicts with a model_type) included;
    `widths` are the model widths before shrinking, which other width keys may repeat;
    `nested` for a sub-config (a backbone's, whose head reads one feature map per stage)."""
    heads = tree.get("num_attention_heads", tree.get("n_head", HEADS))
    original = dict(tree)
    layers_before = [v for k, v in tree.items() if k in _LAYER_KEYS and isinstance(v, int) and v > LAYERS]
    for key, value in list(tree.items()):
        if isinstance(value, dict) and "model_type" in value:
            _shrink(value, vocab, widths, nested=True)
        elif isinstance(value, dict) and isinstance(value.get("mrope_section"), list):
            value["mrope_section"] = _split(HIDDEN // HEADS // 2, value["mrope_section"])
        elif key in _OUTPUTS:
            continue  # below, once the layer count is known
        elif key in ("image_size", "patch_size") and isinstance(value, list) and len(value) == 2:
            tree[key] = [min(v, _SMALL[key]) for v in value]
        elif isinstance(value, list) and key in _LIST_KEYS and all(isinstance(v, int) for v in value):
            tree[key] = [_LIST_KEYS[key]] * len(value)
        elif value is None and key == "vocab_size" and "hidden_size" in tree:  # left to a tokenizer (ESM)
            tree[key] = vocab
        elif value is None and key in ("head_dim", *_KV_KEYS) and any(k in tree for k in _HEAD_KEYS):
            tree[key] = HIDDEN // HEADS if key == "head_dim" else HEADS  # "derive it" left to the model
        elif value is None and key in _SMALL and any(k in tree for k in _HEAD_KEYS):
            tree[key] = _SMALL[key]  # expert counts left unset by the defaults (DeepSeek-V2, dots.llm1)
        elif not isinstance(value, int) or isinstance(value, bool):
            continue
        elif key in _HIDDEN_KEYS:
            tree[key] = HIDDEN
        elif key in _HEAD_KEYS:
            tree[key] = HEADS
        elif key in _KV_KEYS:
            tree[key] = HEADS if isinstance(heads, int) and value >= heads else min(value, 2)
        elif key in _HEAD_DIM_KEYS:
            tree[key] = HIDDEN // HEADS
        elif key in _LAYER_KEYS:
            tree[key] = min(value, LAYERS)
        elif key in _FFN_KEYS:
            tree[key] = FFN
        elif key in _POSITION_KEYS:
            tree[key] = min(value, POSITIONS)
        elif "vocab" in key and value > vocab:  # vocab_size, entity_vocab_size, hash-group vocabularies
            tree[key] = min(value, vocab)
        elif key in _SMALL:
            tree[key] = min(value, _SMALL[key])
        elif value in widths and _is_width_key(key):
            tree[key] = HIDDEN
    staged = (
        nested and isinstance(tree.get("depths"), list) and any(isinstance(original.get(k), list) for k in _OUTPUTS)
    )
    _backbone_outputs(tree, original, staged)
    rope = tree.get("rope_parameters")
    if isinstance(rope, dict) and "mrope_section" not in rope and _model_reads_mrope(tree.get("model_type")):
        partial = rope.get("partial_rotary_factor", tree.get("partial_rotary_factor")) or 1.0
        rope["mrope_section"] = _split(int(HIDDEN // HEADS * partial) // 2, [2, 3, 3])  # the default fits 128
    if all(isinstance(original.get(k), int) for k in ("qk_rope_head_dim", "qk_nope_head_dim")):
        rope, nope = tree["qk_rope_head_dim"], tree["qk_nope_head_dim"]  # MLA: keep what head_dim was
        for key in ("head_dim", "qk_head_dim"):
            if original.get(key) == original["qk_rope_head_dim"]:
                tree[key] = rope
            elif original.get(key) == original["qk_rope_head_dim"] + original["qk_nope_head_dim"]:
                tree[key] = rope + nope
    layer_kinds = tree.get("layer_types") if isinstance(tree.get("layer_types"), list) else []
    if tree.get("sliding_window", 0) is None and "sliding_attention" in layer_kinds:  # a window its layers need
        tree["sliding_window"] = TEXT // 2
    if isinstance(tree.get("mamba_d_head"), int) and isinstance(tree.get("mamba_expand"), int):  # Mamba-2 heads
        tree.update(mamba_n_heads=HEADS, mamba_d_head=tree["mamba_expand"] * HIDDEN // HEADS, mamba_n_groups=1)
        if isinstance(tree.get("mamba_d_ssm"), int):  # Falcon-H1's inner width, which the heads split
            tree["mamba_d_ssm"] = tree["mamba_expand"] * HIDDEN
    if staged and "num_layers" in tree:  # a backbone keeps its stages: its head reads one map per stage
        tree["num_layers"] = len(tree["depths"])
    for key, value in list(tree.items()):  # per-layer lists and dicts (layer_types, ...) follow the layer count
        if staged and (key in _LIST_KEYS or key in _OUTPUTS):
            continue
        kinds = [v for i, v in enumerate(value) if v not in value[:i]] if isinstance(value, list) else []
        if isinstance(value, list) and layers_before and len(value) in layers_before:
            tree[key] = (kinds + [v for v in value if v == kinds[0]])[:LAYERS]  # each kind of layer once, first
        elif key.endswith("_types") and kinds and layers_before and len(value) < min(layers_before):
            tree[key] = kinds  # a pattern the layers repeat (RecurrentGemma's block_types): each kind once
        elif isinstance(value, dict) and "layer" in key and value and all(str(k).isdigit() for k in value):
            tree[key] = {k: v for k, v in value.items() if int(k) < LAYERS}
    if isinstance(tree.get("num_kv_shared_layers"), int) and tree["num_kv_shared_layers"]:  # Gemma 3n
        kinds = list(dict.fromkeys(layer_kinds))  # layers that reuse keys need an earlier layer of each kind
        for key, value in list(tree.items()):  # the per-layer lists, one per layer again
            if isinstance(value, list) and isinstance(original.get(key), list) and len(original[key]) in layers_before:
                tree[key] = [value[0]] * (2 * len(kinds))
        tree.update(num_hidden_layers=2 * len(kinds), num_kv_shared_layers=len(kinds), layer_types=kinds + kinds)


def _backbone_outputs(tree: dict[str, Any], original: dict[str, Any], staged: bool) -> None:
    """Keep the number of feature maps a backbone config hands its head (a neck sized for 4
    maps needs 4): stages (`depths`) are kept, so their names stay valid; layers are shrunk,
    so a layer backbone (DINOv2 in Depth Anything) outputs its last layers, as many as before."""
    outputs = [o for o in (original.get(k) for k in _OUTPUTS) if isinstance(o, list)]
    layer_key = next((k for k in ("num_hidden_layers", "num_layers") if isinstance(tree.get(k), int)), None)
    if not outputs or (staged and isinstance(tree.get("depths"), list)):
        return
    if layer_key is None or isinstance(tree.get("depths"), list):  # the config derives them again
        tree.update(out_indices=None, out_features=None)
        return
    count = len(outputs[0])
    layers = tree[layer_key] = max(tree[layer_key], count)
    indices = list(range(layers - count + 1, layers + 1))
    tree.update(out_indices=indices, out_features=[f"stage{i}" for i in indices])


def _model_reads_mrope(model_type: Any) -> bool:
    """Whether the modeling source of `model_type` falls back to a default multimodal-RoPE
    section (`rope_parameters.get("mrope_section", [16, 24, 24])`) sized for a full head."""
    if model_type not in CONFIG_MAPPING:
        return False
    package = CONFIG_MAPPING[model_type].__module__.rsplit(".", 1)[0]
    try:
        modeling = importlib.import_module(f"{package}.modeling_{package.rsplit('.', 1)[-1]}")
        return '.get("mrope_section", [' in inspect.getsource(modeling)
    except (ImportError, OSError, TypeError):
        return False


def _split(total: int, sections: list[int]) -> list[int]:
    """`sections` rescaled to sum to `total` (rotary sections of multimodal RoPE)."""
    scaled = [max(1, total * s // max(1, sum(sections))) for s in sections]
    scaled[0] += total - sum(scaled)
    return scaled


def tiny_config(model_type: str) -> Any:
    """The config of `model_type` with its defaults, shrunk, with the type's overrides."""
    config_class = CONFIG_MAPPING[model_type]
    tree = config_class().to_dict()
    large = sorted({i for i in _token_ids(tree) if i >= VOCAB})
    _renumber_tokens(tree, {old: VOCAB + rank for rank, old in enumerate(large)})
    _shrink(tree, VOCAB + len(large), _widths(tree))
    for dotted, value in OVERRIDES.get(model_type, {}).items():
        *parents, leaf = dotted.split(".")
        node = tree
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config_class.from_dict(tree)


def model_class(config: Any) -> type[transformers.PreTrainedModel]:
    """AutoModel's class for the config, else the first other auto mapping that has one."""
    others = sorted(n for n in dir(modeling_auto) if n.startswith("MODEL_FOR_") and n.endswith("_MAPPING"))
    names = ["MODEL_MAPPING", *others]
    for name in names:
        try:
            found = getattr(modeling_auto, name)[type(config)]
        except (KeyError, ValueError, AttributeError, ImportError):
            continue
        return found[0] if isinstance(found, (tuple, list)) else found
    package = type(config).__module__.rsplit(".", 1)[0]
    modeling = sys.modules.get(f"{package}.modeling_{package.rsplit('.', 1)[-1]}")
    if modeling is None:
        modeling = importlib.import_module(f"{package}.modeling_{package.rsplit('.', 1)[-1]}")
    own = [
        value
        for value in vars(modeling).values()
        if isinstance(value, type)
        and issubclass(value, transformers.PreTrainedModel)
        and getattr(value, "config_class", None) is type(config)
    ]
    if not own:
        raise LookupError("neither an auto mapping nor its modeling module has a model class for this config")
    return min(own, key=lambda c: (not c.__name__.endswith("Model"), len(c.__name__)))


def _size(config: Any, name: str, default: int) -> int:
    """An int size of the config, else of its vision config, else of its other sub-configs
    (an ASR model's mel bins live in its encoder or audio config)."""
    owners = [config, getattr(config, "vision_config", None)]
    owners += [v for v in vars(config).values() if isinstance(v, transformers.PretrainedConfig)]
    for owner in owners:
        value = getattr(owner, name, None)
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def make_inputs(model: nn.Module, config: Any) -> list[dict[str, Any]]:
    """Generated inputs for the model's main input, plus the masks and decoder ids it takes:
    the recipes to try in turn (audio comes as (B, T) or (B, 1, T) samples and as (B, T, F)
    or (B, F, T) features, which the config does not say)."""
    signature = inspect.signature(type(model).forward).parameters
    parameters = set(signature)
    required = {k for k, v in signature.items() if v.default is v.empty and v.kind is v.POSITIONAL_OR_KEYWORD}
    name = getattr(model, "main_input_name", "input_ids")
    if (
        isinstance(name, str) and name not in parameters and "pixel_values" in required
    ):  # a vision tower that kept the text default
        name = "pixel_values"
    text = config.get_text_config()
    inputs: dict[str, Any] = {}
    layouts: list[dict[str, Any]] = []
    if "qformer_input_ids" in required:
        inputs["qformer_input_ids"] = torch.randint(4, min(_size(config, "vocab_size", VOCAB), VOCAB), (BATCH, TEXT))
    if (
        name == "input_ids"
        or "input_ids" in required
        or ("input_ids" in parameters and name not in ("pixel_values", "input_values"))
    ):
        vocab = min(_size(text, "vocab_size", VOCAB), VOCAB)
        inputs["input_ids"] = torch.randint(4, vocab, (BATCH, TEXT))
        mask = torch.ones(BATCH, TEXT, dtype=torch.long)
        mask[1, -3:] = 0
        inputs["attention_mask"] = mask
    placeholders = any("image_token" in key or "video_token" in key for key in _keys(config.to_dict()))
    if name == "pixel_values" or (
        "pixel_values" in parameters and hasattr(config, "vision_config") and not placeholders
    ):
        size = _size(config, "image_size", 32)
        frames = _size(config, "num_frames", 0)  # a video model takes (B, T, C, H, W)
        inputs["pixel_values"] = torch.randn(
            BATCH, *[frames][: bool(frames)], _size(config, "num_channels", 3), size, size
        )
    if "spatial_shapes" in parameters and _size(config, "num_patches", 0) > 0 and "pixel_values" in inputs:
        side = int(_size(config, "num_patches", 16) ** 0.5)  # NaFlex (SigLIP 2): patches flattened, with their grid
        patch, channels = _size(config, "patch_size", 8), _size(config, "num_channels", 3)
        inputs["pixel_values"] = torch.randn(BATCH, side * side, channels * patch * patch)
        inputs["pixel_attention_mask"] = torch.ones(BATCH, side * side, dtype=torch.long)
        inputs["spatial_shapes"] = torch.tensor([[side, side]] * BATCH)
    if name == "pixel_values_videos":
        size = _size(config, "image_size", 32)
        inputs[name] = torch.randn(BATCH, _size(config, "num_frames", 4), _size(config, "num_channels", 3), size, size)
    if name == "input_features":
        if hasattr(config, "max_source_positions") and hasattr(config, "num_mel_bins"):
            inputs[name] = torch.randn(BATCH, config.num_mel_bins, 2 * config.max_source_positions)
        else:
            features = _size(config, "input_feat_per_channel", 0) * _size(config, "input_channels", 1)
            features = _size(config, "num_mel_bins", 0) or features or _size(config, "feature_size", 80)
            inputs[name] = torch.randn(BATCH, 64, features)
            layouts.append({name: inputs[name].transpose(1, 2).contiguous()})
    if name == "past_values":  # time series: (B, context, channels)
        context = _size(config, "context_length", 32)
        inputs[name] = torch.randn(BATCH, context, _size(config, "num_input_channels", 1)).squeeze(-1)
        layouts.append({name: inputs[name].reshape(BATCH, context, -1)})
    if name == "input_values":
        inputs[name] = torch.randn(BATCH, 1600)
        layouts.append({name: inputs[name].unsqueeze(1)})
        if _size(config, "num_mel_bins", 0) and _size(config, "max_length", 0):  # a spectrogram (AST)
            layouts.append({name: torch.randn(BATCH, _size(config, "max_length", 0), _size(config, "num_mel_bins", 0))})
    if "input_ids" in parameters and "input_ids" not in inputs:  # an image model that also reads text
        ids = torch.randint(4, min(_size(text, "vocab_size", VOCAB), VOCAB), (BATCH, TEXT))
        layouts.append({"input_ids": ids})
    if not inputs:
        raise LookupError(f"no input recipe for main_input_name={name!r}")
    if config.is_encoder_decoder and "decoder_input_ids" in parameters:
        inputs["decoder_input_ids"] = torch.randint(4, min(_size(text, "vocab_size", VOCAB), VOCAB), (BATCH, TARGET))
    inputs = {k: v for k, v in inputs.items() if k in parameters}
    inputs = {**inputs, "use_cache": False} if "use_cache" in parameters else inputs
    return [inputs, *({**inputs, **layout} for layout in layouts)]


def _keys(tree: dict[str, Any]) -> list[str]:
    """Every key of a config dict, sub-configs included."""
    return [str(k) for k, v in tree.items() for k in [k, *(_keys(v) if isinstance(v, dict) else [])]]


def floats(output: Any) -> torch.Tensor:
    """Every floating tensor of a model output (ModelOutput, tuple, dict or tensor),
    flattened into one vector: a model's first output may not depend on its attention
    (Deformable DETR's reference points)."""
    found: list[torch.Tensor] = []

    def collect(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                found.append(value.flatten())
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, (tuple, list)):
            for item in value:
                collect(item)

    collect(output)
    if not found:
        raise LookupError("the output holds no floating tensor")
    return torch.cat(found)


def _jitter(model: nn.Module) -> None:
    """Add small noise to every floating parameter: random inits that leave an output
    projection, a key projection or a layer scale at exactly 0 (NeoMME, Zaya) would otherwise
    hide whether LCAAM is in the path, which no trained model does."""
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point():
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.add_(noise * 0.02)


def _run(model: nn.Module, inputs: dict[str, Any], grad: bool = False) -> torch.Tensor:
    """The output compared; seeded, so that models drawing noise (MAE masking) repeat."""
    torch.manual_seed(3)
    with torch.set_grad_enabled(grad):
        return floats(model(**inputs))


def _first_that_runs(model: nn.Module, recipes: list[dict[str, Any]]) -> tuple[dict[str, Any], torch.Tensor]:
    """The first input recipe the unpatched model runs on, with its output (and the hidden
    states where the output is all zeros, so that it can show a change); else the first
    recipe's error."""
    first: Exception | None = None
    for inputs in recipes:
        try:
            output = _run(model, inputs)
        except Exception as error:  # the next layout may be the model's
            first = first or error
            continue
        accepted = inspect.signature(model.forward).parameters
        if not bool(output.ne(0).any()) and (
            "output_hidden_states" in accepted or any(v.kind is v.VAR_KEYWORD for v in accepted.values())
        ):
            inputs = {**inputs, "output_hidden_states": True}  # a head clamped to 0 (ReLU depth) hides the rest
            output = _run(model, inputs)
        return inputs, output
    assert first is not None
    raise first


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max()) if a.shape == b.shape else float("inf")


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:400]


def check(model_type: str, implementation: str, conn: Connection) -> dict[str, Any]:
    """The census row of one (model type, implementation); stages are reported on `conn`."""
    row: dict[str, Any] = {"type": model_type, "implementation": implementation, "detail": "", "sites": 0}
    row["attention_classes"] = []

    def stage(name: str) -> None:
        conn.send(("stage", name))

    try:
        stage("build")
        torch.manual_seed(0)
        config = tiny_config(model_type)
        cls = model_class(config)
        row["model_class"] = cls.__name__
        with torch.device("meta"):
            count = sum(p.numel() for p in cls._from_config(config, attn_implementation=implementation).parameters())
        if count > MAX_PARAMETERS:
            raise ValueError(f"{count} parameters after shrinking")
        model = cls._from_config(config, attn_implementation=implementation).float().eval()
        _jitter(model)
        stage("reference")
        torch.manual_seed(1)
        inputs, reference = _first_that_runs(model, make_inputs(model, config))
        if _diff(_run(model, inputs), reference) != 0:
            raise ValueError("two unpatched forwards differ")
    except Exception as error:  # every failure to build or run unpatched is a row
        return {**row, "status": "unbuildable", "detail": _short(error)}
    tolerance = TOLERANCE * max(1.0, float(reference.abs().max()))
    stage("apply")
    try:
        lcaam_patch.apply(model, mode="multilayer", fusion="mul")
    except lcaam_patch.NoAttentionFoundError as error:
        return {**row, "status": "not claimed", "detail": str(error)[:400]}
    except lcaam_patch.LCAAMError as error:
        return {**row, "status": "refused at apply", "detail": _short(error)}
    except Exception as error:  # a crash of apply itself
        return {**row, "status": "error", "detail": f"apply: {_short(error)}"}
    sites = lcaam_patch.patched_sites(model)
    row["sites"] = len(sites)
    row["attention_classes"] = sorted({type(module).__name__ for _, module, _ in sites})
    stage("patched forward")
    try:
        patched = _run(model, inputs)
    except lcaam_patch.LCAAMError as error:
        return {**row, "status": "refused at first call", "detail": _short(error)}
    except Exception as error:  # the broken kind the census is for
        return {**row, "status": "error on first forward", "detail": _short(error)}
    identity = _diff(patched, reference)
    if not identity <= tolerance:
        return {
            **row,
            "status": "not exact at identity",
            "detail": f"max diff {identity:.3g} (tolerance {tolerance:.3g})",
        }
    try:
        stage("backward")
        generators = [g for _, m, _ in sites if (g := m._modules.get("lcaam")) is not None]
        parameters = [p for g in generators for p in g.parameters()]
        torch.manual_seed(2)
        out = _run(model, inputs, grad=True)
        (out * torch.randn_like(out)).sum().backward()
        grads = [p.grad for p in parameters if p.grad is not None]
        moved = any(bool(g.abs().sum() > 0) for g in grads) and all(bool(g.isfinite().all()) for g in grads)
        stage("perturbed forward")
        with torch.no_grad():
            for parameter in parameters:
                parameter.add_(0.5 * torch.randn_like(parameter))
        perturbed = _diff(_run(model, inputs), reference)
        if not moved or perturbed == 0.0:
            detail = f"generator grad {'nonzero' if moved else 'zero or missing'}, perturbed diff {perturbed:.3g}"
            return {**row, "status": "not in path", "detail": f"{detail} ({len(parameters)} generator parameters)"}
        stage("remove")
        lcaam_patch.remove(model)
        removed = _diff(_run(model, inputs), reference)
    except Exception as error:  # backward, perturbation or remove crashed
        return {**row, "status": "error", "detail": _short(error)}
    if not removed <= tolerance:
        return {**row, "status": "remove not exact", "detail": f"max diff {removed:.3g} after remove"}
    return {**row, "status": "exact", "detail": f"identity diff {identity:.2g}, perturbed diff {perturbed:.2g}"}


def _child(model_type: str, implementation: str, conn: Connection) -> None:
    """Forked worker: quiet, one thread, one row sent back."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    row = check(model_type, implementation, conn)
    conn.send(("row", row))
    conn.close()


def _lost(task: tuple[str, str], stage: str, why: str) -> dict[str, Any]:
    """The row of a worker that timed out or died: unbuildable before apply, error after."""
    status = "unbuildable" if stage in ("build", "reference") else "error"
    detail = f"{why} during {stage}"
    return {
        "type": task[0],
        "implementation": task[1],
        "status": status,
        "detail": detail,
        "sites": 0,
        "attention_classes": [],
    }


def census(tasks: list[tuple[str, str]], workers: int, timeout: float) -> list[dict[str, Any]]:
    """Run every (type, implementation) in its own forked process, at most `workers` at once."""
    context = multiprocessing.get_context("fork")
    pending, rows = list(reversed(tasks)), []
    running: dict[Connection, tuple[Any, tuple[str, str], float, str]] = {}
    while pending or running:
        while pending and len(running) < workers:
            task = pending.pop()
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(*task, send), daemon=True)
            process.start()
            send.close()
            running[receive] = (process, task, time.monotonic(), "start")
        wait(list(running), timeout=1.0)
        for conn, (process, task, started, stage) in list(running.items()):
            row = None
            try:
                while conn.poll():
                    kind, value = conn.recv()
                    if kind == "stage":
                        stage = value
                        running[conn] = (process, task, started, stage)
                    else:
                        row = value
            except (EOFError, OSError):
                row = row or _lost(task, stage, f"worker died (exit code {process.exitcode})")
            if row is None and time.monotonic() - started > timeout:
                process.kill()
                row = _lost(task, stage, f"timeout after {timeout:.0f} s")
            if row is not None:
                process.join()
                conn.close()
                del running[conn]
                rows.append(row)
                print(f"[{len(rows)}/{len(tasks)}] {task[0]} {task[1]}: {row['status']}", file=sys.stderr, flush=True)
    order = {task: i for i, task in enumerate(tasks)}
    return sorted(rows, key=lambda r: order[(r["type"], r["implementation"])])


def table(rows: list[dict[str, Any]], implementations: list[str]) -> str:
    """Markdown: counts per status × implementation, then every broken row."""
    counts = collections.Counter((r["status"], r["implementation"]) for r in rows)
    lines = [f"transformers {transformers.__version__}, {len({r['type'] for r in rows})} model types\n"]
    lines += ["| status | " + " | ".join(implementations) + " |", "|---" * (len(implementations) + 1) + "|"]
    for status in STATUSES:
        lines.append(f"| {status} | " + " | ".join(str(counts[status, i]) for i in implementations) + " |")
    lines.append(
        "| total | " + " | ".join(str(sum(r["implementation"] == i for r in rows)) for i in implementations) + " |"
    )
    broken = [r for r in rows if r["status"] in BROKEN]
    lines += [
        "",
        f"Broken rows ({len(broken)}):",
        "",
        "| type | impl | status | attention | detail |",
        "|---|---|---|---|---|",
    ]
    for r in broken:
        detail = r["detail"].replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r['type']} | {r['implementation']} | {r['status']} | {', '.join(r['attention_classes'])} | {detail} |"
        )
    return "\n".join(lines)


def main() -> int:
    """Parse the command line, run the census, print the table; 1 when a row is broken."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", help="comma-separated model types (default: every CONFIG_MAPPING key)")
    parser.add_argument("--implementations", default="eager,sdpa", help="comma-separated attn_implementation values")
    parser.add_argument("--workers", type=int, default=1, help="processes at once (at most 2 on shared machines)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per (type, implementation)")
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    types = args.types.split(",") if args.types else list(CONFIG_MAPPING.keys())
    implementations = args.implementations.split(",")
    torch.set_num_threads(1)
    rows = census([(t, i) for t in types for i in implementations], args.workers, args.timeout)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows, implementations))
    return int(any(r["status"] in BROKEN for r in rows))


if __name__ == "__main__":
    sys.exit(main())
