"""QD-DETR (github.com/wjun0830/QD-DETR, pinned at 56c63b2): LCAAM in the encoder, as in the paper.

The sites are the `nn.MultiheadAttention`s of the encoder of a `qd_detr.model.QDDETR`:

- `transformer.t2v_encoder.layers[i].self_attn`: text-to-video cross-attention, queries
  the Lv video clips (sequence-first), keys and values the Lt text tokens. The generator
  reads the clips and outputs one column per text token: Nq ≤ max_v_l, Nk ≤ max_q_l.
- `transformer.encoder.layers[i].self_attn`: self-attention over the global token and the
  video clips, 1 + Lv ≤ 1 + max_v_l tokens (the text tokens are cut off before it).

The decoder's attentions (`qd_detr.attention.MultiheadAttention`) are left alone.

Bounds: `max_v_l` is the model's `max_v_l` and `max_q_l` the size of its text position
table (`txt_position_embed`, built from `--max_q_l`). The launcher reads both from the
options `build_model(opt)` gets (`opt.max_v_l`, `opt.max_q_l`), which also covers runs
with a longer `--max_v_l` than the model records (TVSum's 1000). `max_tokens` and
`max_kv_tokens` override them: for this adapter they mean max_v_l and max_q_l.

Batches are padded to their own longest video and query, so masks are sliced to each
batch's Lv/Lt by the generator; padded keys stay masked because upstream's masks are
applied after fusion.

Upstream quirk, reproduced on purpose: the T2V layer builds its per-head `attn_mask` as
`mask.repeat(nhead, 1, 1)`, whose row h*B + b belongs to batch item b, while PyTorch reads
row b*H + h as batch b, head h. Batch item b's head h therefore gets the mask of item
(b*H + h) mod B (a key is masked there when that item pads both the clip and the token).
The patched forward reads `attn_mask` exactly as PyTorch does, so a patched model with
identity init computes what upstream computes, quirk included.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..config import LCAAMConfig
from ..errors import UnsupportedModuleError
from ..site import SiteGeometry
from .torch_mha import MultiheadAttentionAdapter

MODEL_MODULE = "qd_detr.model"
_SITE_PATH = re.compile(r"transformer\.(?P<stack>t2v_encoder|encoder)\.layers\.\d+\.self_attn")


class QDDETRAdapter(MultiheadAttentionAdapter):
    """Patches the encoder attentions of QD-DETR models (see the module docstring)."""

    name = "qd_detr"
    priority = 10
    presets = {"qd_detr": {"mode": "multilayer", "fusion": "mul", "depth": 32, "hidden": 256}}
    builders = {"qd_detr": ("qd_detr.model:build_model",)}

    def claims(self, module: nn.Module, path: str, root: nn.Module) -> bool:
        """The encoder `nn.MultiheadAttention`s of a `qd_detr.model.QDDETR` root."""
        model_type = _model_type()
        return (
            model_type is not None
            and isinstance(root, model_type)
            and type(module) is nn.MultiheadAttention
            and _SITE_PATH.fullmatch(path) is not None
        )

    def geometry(self, module: nn.Module, path: str, root: nn.Module, config: LCAAMConfig) -> SiteGeometry:
        """T2V: clips × text tokens (cross); encoder: (1 + clips) × (1 + clips) (self)."""
        max_v_l = config.max_tokens or _model_bound(root, "max_v_l", path)
        max_q_l = config.max_kv_tokens or _text_bound(root, path)
        match = _SITE_PATH.fullmatch(path)
        assert match is not None
        if match["stack"] == "t2v_encoder":
            max_q, max_kv, kind = max_v_l, max_q_l, "cross"
        else:
            max_q, max_kv, kind = 1 + max_v_l, 1 + max_v_l, "self"
        bounded = dataclasses.replace(config, max_tokens=max_q, max_kv_tokens=max_kv)
        return dataclasses.replace(super().geometry(module, path, root, bounded), kind=kind)

    def builder_options(self, preset: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """`build_model(opt)`: the bounds are `opt.max_v_l` and `opt.max_q_l`."""
        opt = args[0] if args else kwargs.get("args")
        if not isinstance(opt, argparse.Namespace):
            return {}
        return {"max_tokens": opt.max_v_l, "max_kv_tokens": opt.max_q_l}


def _model_type() -> type[nn.Module] | None:
    module = sys.modules.get(MODEL_MODULE)
    return getattr(module, "QDDETR", None) if module is not None else None


def _model_bound(root: nn.Module, attribute: str, path: str) -> int:
    value = getattr(root, attribute, None)
    if not isinstance(value, int):
        raise UnsupportedModuleError(
            f"QD-DETR model has no integer {attribute!r}, so the clip bound of {path!r} is "
            f"unknown; pass max_tokens=<max video clips> (the --max_v_l of the run)"
        )
    return value


def _text_bound(root: nn.Module, path: str) -> int:
    table = getattr(getattr(root, "txt_position_embed", None), "position_embeddings", None)
    if not isinstance(table, nn.Embedding):
        raise UnsupportedModuleError(
            f"QD-DETR model has no txt_position_embed.position_embeddings table, so the text "
            f"bound of {path!r} is unknown; pass max_kv_tokens=<max query tokens> (the "
            f"--max_q_l of the run)"
        )
    return table.num_embeddings


adapter = QDDETRAdapter()
