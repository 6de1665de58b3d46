"""SwinBERT (github.com/microsoft/SwinBERT, pinned at 03116f1): LCAAM replaces the learnable
sparse attention mask, as in the paper, and may also sit in each BERT self-attention.

Sites of a `src.modeling.video_captioning_e2e_vid_swin_bert.VideoTransformer` (SwinBERT's
model; paths relative to it):

- the `VideoTransformer` itself, when it was built with `learn_mask_enabled` (upstream's
  `--learn_mask_enabled`). Upstream writes `sigmoid(learn_vid_att)`, one M×M matrix shared by
  every video, with its diagonal forced to 1, into `attention_mask[:, -M:, -M:]` (M =
  `max_img_seq_length` video tokens) and returns the sparsity loss `mean(|off-diagonal|)` as
  its last output. The patched forward computes that block per sample instead:
  `sigmoid(F(V))` with V (B, M, img_feature_dim) the video tokens (the Video Swin features
  after `fc`, what BERT receives as `img_feats`) and F the LCAAM generator, the child
  `lcaam`. Everything else is kept: values in [0, 1], diagonal 1, `sparse_mask_soft2hard`
  (≥ 0.5 → 1, else 0, no gradient through the mask), the sparsity loss computed by
  upstream's `get_loss_sparsity` on the generated off-diagonal block (averaged over the batch
  too) as the last output, which the training loop weights with `--loss_sparse_w`.
- `trans_encoder.bert.encoder.layer[i].attention.self` (`BertSelfAttention`), in
  `mode="multilayer"` only: LCAAM fused (`mul` or `add`) into QKᵀ/√d before SwinBERT's
  additive mask `(1 − attention_mask)·−10000`. The generator reads each query token and
  outputs one column per text position (up to `max_tokens`) and one per video token; the
  columns are mapped to the keys of each call: text keys first and the M video keys last
  (training and upstream's decoding), or the M video keys first when decoding with cached
  history states.

`mode="global"` (the `swinbert` preset) patches the `VideoTransformer` only: its mask is the
one every BERT layer reads. `mode="multilayer"` patches it and every `BertSelfAttention`;
without `learn_mask_enabled` there is no sparse mask, and only the `BertSelfAttention`s are
patched. The generator's `fusion` and neutral init concern the BERT sites; the video site
always produces a mask in SwinBERT's convention, sigmoid of the generator's output.

`learn_vid_att` stays in the model and in every state dict, so upstream's checkpoints and
its transfer code (`reload_attn_mask`, `diag_based_init_attn_mask`, the reads of
`learn_vid_att.weight` from checkpoints) keep working, but it no longer shapes the
attention: `prepare` sets its `requires_grad` to False (`remove` restores it), so DDP with
`find_unused_parameters=False` does not wait for a gradient that never comes and the
optimizers skip it. If it is replaced after patching by a trainable one (upstream's
`random_init_attn_mask`, used when transferring across frame counts), the sparsity loss gets
a `0 · sum(learn_vid_att)` term, so that parameter receives an all-zero gradient instead of
none.

Bounds: M is the model's `max_img_seq_length`. The text bound of the BERT sites is
`max_tokens`; by default BERT's `max_position_embeddings`; the launcher reads
`max(args.max_seq_length, args.max_gen_length)` off the arguments of
`VideoTransformer(args, config, swin, transformer_encoder)`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..backends import AttentionCall, masking
from ..config import LCAAMConfig
from ..errors import (
    InvalidOptionError,
    SequenceTooLongError,
    UnsupportedModuleError,
)
from ..site import LCAAMSite, SiteGeometry
from .base import Adapter

MODEL_MODULE = "src.modeling.video_captioning_e2e_vid_swin_bert"
BERT_MODULE = "src.layers.bert.modeling_bert"
# the constructor, not the class: VideoTransformer's methods call super(VideoTransformer, self)
BUILDER = f"{MODEL_MODULE}:VideoTransformer.__init__"
BERT_MASKED = -10000.0
"""SwinBERT's BERT writes a masked key as (1 - 0) * -10000 in its additive mask; LCAAM
treats that value (and anything below) as a hard mask."""
_BERT_SITE = re.compile(r"(?:(?P<model>.+)\.)?trans_encoder\.bert\.encoder\.layer\.\d+\.attention\.self")


@dataclasses.dataclass
class _FrozenMask:
    """What `prepare` changed on a `VideoTransformer`: the parameter it froze and its flag."""

    weight: nn.Parameter
    requires_grad: bool


def _upstream_class(module_name: str, attribute: str) -> type[nn.Module] | None:
    """An upstream class, if its module is imported."""
    found = getattr(sys.modules.get(module_name), attribute, None)
    return found if isinstance(found, type) else None


def _video_transformer_type() -> type[nn.Module] | None:
    return _upstream_class(MODEL_MODULE, "VideoTransformer")


def _bert_self_attention_type() -> type[nn.Module] | None:
    return _upstream_class(BERT_MODULE, "BertSelfAttention")


def _enclosing_model(path: str, root: Any) -> Any:
    """The `VideoTransformer` whose BERT holds the self-attention at `path`, if any."""
    match = _BERT_SITE.fullmatch(path)
    video_transformer = _video_transformer_type()
    if match is None or video_transformer is None:
        return None
    model = root.get_submodule(match["model"] or "")
    return model if type(model) is video_transformer else None


class SwinBERTAdapter(Adapter):
    """Patches SwinBERT's sparse video mask and its BERT self-attentions (module docstring)."""

    name = "swinbert"
    priority = 10
    presets = {"swinbert": {"mode": "global", "fusion": "mul", "depth": 16}}
    builders = {"swinbert": (BUILDER,)}

    def attention_types(self) -> tuple[type[nn.Module], ...]:
        """`VideoTransformer` and `BertSelfAttention`, where SwinBERT's modules are imported."""
        return tuple(t for t in (_video_transformer_type(), _bert_self_attention_type()) if t is not None)

    def claims(self, module: Any, path: str, root: Any) -> bool:
        """A `VideoTransformer` with its learnable mask on, and the `BertSelfAttention`s of a
        `VideoTransformer`'s captioning transformer."""
        kind = type(module)
        if kind is _video_transformer_type():
            return bool(getattr(module, "learn_mask_enabled", False))
        return kind is _bert_self_attention_type() and _enclosing_model(path, root) is not None

    def geometry(self, module: Any, path: str, root: Any, config: LCAAMConfig) -> SiteGeometry | None:
        """Video site: M×M over the video tokens. BERT sites (multilayer only): (T + M)²."""
        if config.generator != "mlp":
            raise UnsupportedModuleError(
                f"{path!r}: SwinBERT's sites place the generator's columns on text and video "
                f"keys, which needs the dense generator; use generator='mlp'"
            )
        if config.max_kv_tokens is not None:
            raise InvalidOptionError(
                "SwinBERT's keys are its text tokens and its video tokens, whose count the model "
                "fixes (max_img_seq_length); drop max_kv_tokens and give the text bound as "
                "max_tokens"
            )
        if type(module) is _video_transformer_type():
            return self._video_geometry(module, path)
        model = _enclosing_model(path, root)
        assert model is not None
        if config.mode == "global":
            if model.learn_mask_enabled:
                return None
            raise UnsupportedModuleError(
                f"mode='global' replaces SwinBERT's learnable sparse mask, but the model holding "
                f"{path!r} was built without it (learn_mask_enabled=False); run upstream with "
                f"--learn_mask_enabled (and --loss_sparse_w, as its README's training commands "
                f"do), or pass mode='multilayer' to put LCAAM in each BertSelfAttention instead"
            )
        text = config.max_tokens or model.trans_encoder.config.max_position_embeddings
        tokens = text + model.max_img_seq_length
        return SiteGeometry(module.query.in_features, tokens, tokens, "self")

    def _video_geometry(self, module: Any, path: str) -> SiteGeometry:
        video = module.max_img_seq_length
        entries = module.learn_vid_att.num_embeddings
        if entries != video * video:
            raise UnsupportedModuleError(
                f"VideoTransformer at {path!r} has max_img_seq_length={video} but a "
                f"learn_vid_att of {entries} entries (not {video}²); patch it with the "
                f"max_img_seq_length it runs with, right after it is built"
            )
        return SiteGeometry(module.fc.out_features, video, video, "self")

    def builder_options(self, preset: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """`VideoTransformer(args, ...)`: the text bound is the longest of training and decoding."""
        options = args[0] if args else kwargs.get("args")
        given = [getattr(options, name, None) for name in ("max_seq_length", "max_gen_length")]
        lengths = [int(n) for n in given if isinstance(n, int) and n > 0]
        return {"max_tokens": max(lengths)} if lengths else {}

    def prepare(self, module: Any, root: Any) -> _FrozenMask | int:
        """Video site: freeze `learn_vid_att`. BERT site: the number of video tokens."""
        kind = type(module)
        if kind is _video_transformer_type():
            weight: nn.Parameter = module.learn_vid_att.weight
            frozen = _FrozenMask(weight, weight.requires_grad)
            weight.requires_grad_(False)
            return frozen
        path = next(p for p, m in root.named_modules() if m is module)
        model = _enclosing_model(path, root)
        assert model is not None
        return int(model.max_img_seq_length)

    def restore(self, module: Any, state: _FrozenMask | int) -> None:
        """Give `learn_vid_att` back its `requires_grad` if it is still the one frozen."""
        if isinstance(state, _FrozenMask) and module.learn_vid_att.weight is state.weight:
            state.weight.requires_grad_(state.requires_grad)

    def forward(self, module: Any, site: LCAAMSite, *args: Any, **kwargs: Any) -> Any:
        """Upstream's `VideoTransformer.forward` or `BertSelfAttention.forward`, with LCAAM."""
        if type(module) is _video_transformer_type():
            return _video_forward(module, site, *args, **kwargs)
        return _bert_forward(module, site, *args, **kwargs)


def _video_forward(module: Any, site: LCAAMSite, *args: Any, **kwargs: Any) -> Any:
    """`VideoTransformer.forward` with the video block of the mask generated per sample."""
    images = kwargs["img_feats"]
    B = images.shape[0]
    vid_feats = module.swin(images.permute(0, 2, 1, 3, 4))
    if module.use_grid_feat:
        vid_feats = vid_feats.permute(0, 2, 3, 4, 1)
    vid_feats = module.fc(vid_feats.reshape(B, -1, module.latent_feat_size))
    kwargs["img_feats"] = vid_feats
    if module.trans_encoder.bert.encoder.output_attentions:
        module.trans_encoder.bert.encoder.set_output_attentions(False)
    video = module.max_img_seq_length
    generated = site.mask(module, vid_feats, video)
    assert isinstance(generated, torch.Tensor), "geometry() refuses generator='lowrank' for SwinBERT"
    learned = torch.sigmoid(generated)
    diagonal = torch.eye(video, device=learned.device, dtype=learned.dtype)
    video_attention = (1.0 - diagonal) * learned
    video_mask = diagonal + video_attention
    if module.sparse_mask_soft2hard:
        video_mask = (video_mask >= 0.5).to(video_mask.dtype)
    attention_mask = kwargs["attention_mask"].float().clone()
    attention_mask[:, -video:, -video:] = video_mask
    kwargs["attention_mask"] = attention_mask
    outputs = module.trans_encoder(*args, **kwargs)
    loss_sparsity = module.get_loss_sparsity(video_attention)
    replaced = module.learn_vid_att.weight
    if replaced.requires_grad and torch.is_grad_enabled():
        loss_sparsity = loss_sparsity + 0.0 * replaced.sum()
    return (*outputs, loss_sparsity)


def _bert_forward(
    module: Any,
    site: LCAAMSite,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    head_mask: torch.Tensor | None = None,
    history_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """`BertSelfAttention.forward` with LCAAM fused before SwinBERT's additive mask."""
    if head_mask is not None:
        raise UnsupportedModuleError(
            f"BertSelfAttention at {site.path!r} got a head_mask, which LCAAM does not apply "
            f"(SwinBERT never passes one); call it without head_mask or exclude this site "
            f"with exclude=[{site.path!r}]"
        )
    states = hidden_states if history_state is None else torch.cat([history_state, hidden_states], dim=1)
    q = module.transpose_for_scores(module.query(hidden_states))
    k = module.transpose_for_scores(module.key(states))
    v = module.transpose_for_scores(module.value(states))
    video: int = site.adapter_state
    assert site.geometry.max_kv_tokens is not None
    text_bound = site.geometry.max_kv_tokens - video
    text = k.shape[-2] - video
    if not 0 <= text <= text_bound:
        raise SequenceTooLongError(
            f"BertSelfAttention at {site.path!r} got {k.shape[-2]} keys: {text} text tokens "
            f"besides the {video} video tokens, but its LCAAM generator places at most "
            f"{text_bound} text tokens; pass max_tokens={max(text, 1)} (or larger: the longest "
            f"of --max_seq_length and --max_gen_length) to lcaam_patch.apply"
        )
    columns = site.mask(module, hidden_states, text_bound + video)
    assert isinstance(columns, torch.Tensor), "geometry() refuses generator='lowrank' for SwinBERT"
    text_columns, video_columns = columns[..., :text], columns[..., text_bound:]
    ordered = (video_columns, text_columns) if history_state is not None else (text_columns, video_columns)
    mask = torch.cat(ordered, dim=-1)
    call = AttentionCall(
        q,
        k,
        v,
        mask,
        fusion=site.fusion,
        scale=1.0 / math.sqrt(module.attention_head_size),
        attn_mask=masking.harden(attention_mask, BERT_MASKED),
        dropout_p=module.dropout.p if module.training else 0.0,
        need_weights=module.output_attentions,
    )
    context, probs, _ = site.run(call)
    context = context.permute(0, 2, 1, 3).reshape(*hidden_states.shape[:-1], module.all_head_size)
    if module.output_attentions:
        assert probs is not None
        return (context, probs)
    return (context,)


adapter = SwinBERTAdapter()
