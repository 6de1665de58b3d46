"""LLaMA-Adapter V2 multimodal (github.com/OpenGVLab/LLaMA-Adapter, directory
`llama_adapter_v2_multimodal7b`, pinned at 521a09d): LCAAM in the encoder that feeds LLaMA.

Sites of a `llama.llama_adapter.LLaMA_adapter` model (paths relative to it):

- `visual_blocks[i].attn`: the timm `Attention` of the visual blocks (the paper's encoder),
  self-attention over `query_len` visual queries and the CLIP tokens. Upstream pins a timm
  0.3.2 fork whose `Attention.forward(x)` takes no mask; timm 1.x gives
  `timm.layers.attention.Attention` for the same import. Both run through the timm adapter's
  forward, so this adapter declares its own timm range: the timm adapter's tested range
  (0.9.16 and later) plus that fork, whose `Attention` has the attributes the forward reads
  (qkv, num_heads, scale, attn_drop, proj, proj_drop). The fork itself is a git-only install
  and is not run in the tests; timm 1.0.31 is.
- `clip.visual.transformer.resblocks[i].attn`: the frozen CLIP encoder's
  `nn.MultiheadAttention`s (sequence-first), run through the `nn.MultiheadAttention` adapter.
- `llama.layers[i].attention`: LLaMA's causal attention. `TransformerBlock` calls
  `self.attention.forward(...)` directly, so forward hooks never fire; the patch replaces the
  instance's `forward` attribute, which that call reads. M is fused into QKᵀ/√d before the
  additive causal mask; the adapter-prompt softmax (gated by `gate`) is left as upstream
  computes it. A "lowrank" generator reads the key tokens, so in eval mode the tokens of
  the cached keys are kept beside upstream's KV cache.

Token bounds are read off the model: `query_len` + CLIP's positional-embedding length for
the visual blocks, the latter for CLIP, `max_seq_len` for LLaMA (keys include the KV
cache). `max_tokens`/`max_kv_tokens` override them for every site.

Upstream trains by name: `LLaMA_adapter.get_trainable_params(phase)` freezes every
parameter, then unfreezes (and casts to fp32) those whose names match its substrings. The
LCAAM generators are kept fp32 and trainable in both phases: `prepare` makes them so, and
wraps the instance's `get_trainable_params` so that every later call does it again. Their
inputs are cast to their dtype, so CLIP and LLaMA (fp16 on a GPU) can feed them outside
autocast too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LCAAMConfig
from ..errors import UnsupportedModuleError
from ..site import LCAAMSite, SiteGeometry, generator_of
from .base import Adapter
from .timm import TimmAdapter
from .torch_mha import MultiheadAttentionAdapter

MODEL_MODULE = "llama.llama_adapter"
LLAMA_MODULE = "llama.llama"
BUILDER = "llama.llama_adapter:LLaMA_adapter"
FREEZER = "get_trainable_params"
TOKEN_CACHE = "_lcaam_token_cache"

VISUAL_TARGETS = ("visual_blocks.*.attn",)
CLIP_TARGETS = ("clip.visual.transformer.resblocks.*.attn",)
LLAMA_TARGETS = ("llama.layers.*.attention",)

_VISUAL_PATH = re.compile(r"visual_blocks\.\d+\.attn")
_CLIP_PATH = re.compile(r"clip\.visual\.transformer\.resblocks\.\d+\.attn")
_LLAMA_PATH = re.compile(r"llama\.layers\.\d+\.attention")

_TIMM = TimmAdapter()
_MHA = MultiheadAttentionAdapter()


@dataclasses.dataclass
class _SiteState:
    """What `restore` undoes: the MHA adapter's state and, for one site, the freezer wrap."""

    mha: Any = None
    root: Any | None = None
    previous_freezer: Any = None


class LLaMAAdapterAdapter(Adapter):
    """Patches the attentions of LLaMA-Adapter V2 multimodal models (see the module docstring)."""

    name = "llama_adapter"
    priority = 10
    distribution = "timm"
    supported_versions = ">=0.3.2,<2"
    presets = {
        "llama_adapter": {"mode": "multilayer", "fusion": "mul", "depth": 16, "targets": VISUAL_TARGETS},
        "llama_adapter_clip": {
            "mode": "multilayer",
            "fusion": "mul",
            "depth": 1,
            "targets": VISUAL_TARGETS + CLIP_TARGETS,
        },
        "llama_adapter_llm": {
            "mode": "multilayer",
            "fusion": "mul",
            "depth": 1,
            "targets": VISUAL_TARGETS + LLAMA_TARGETS,
        },
    }
    builders = {preset: (BUILDER,) for preset in presets}

    def attention_types(self) -> tuple[type[nn.Module], ...]:
        """timm `Attention`, `nn.MultiheadAttention` and LLaMA's `Attention`, where imported."""
        llama_attention = _llama_attention_type()
        extra = (llama_attention,) if llama_attention is not None else ()
        return (*_TIMM.attention_types(), nn.MultiheadAttention, *extra)

    def claims(self, module: Any, path: str, root: Any) -> bool:
        """The visual-block, CLIP and LLaMA attentions of a `LLaMA_adapter` root."""
        model_type = _model_type()
        if model_type is None or not isinstance(root, model_type):
            return False
        if _VISUAL_PATH.fullmatch(path):
            return type(module) in _TIMM.attention_types()
        if _CLIP_PATH.fullmatch(path):
            return type(module) is nn.MultiheadAttention
        if _LLAMA_PATH.fullmatch(path):
            return type(module) is _llama_attention_type()
        return False

    def geometry(self, module: Any, path: str, root: Any, config: LCAAMConfig) -> SiteGeometry:
        """Self-attention bounds: visual queries + CLIP tokens, CLIP tokens, or `max_seq_len`."""
        kind = type(module)
        if kind is nn.MultiheadAttention:
            bound = config.max_tokens or _clip_tokens(root, path)
            return _MHA.geometry(module, path, root, dataclasses.replace(config, max_tokens=bound))
        if kind is _llama_attention_type():
            bound = config.max_tokens or module.args.max_seq_len
            return SiteGeometry(module.wq.in_features, bound, config.max_kv_tokens or bound, "self")
        query_len: Any = getattr(root, "query_len", None)
        if config.max_tokens is None and not isinstance(query_len, int):
            raise UnsupportedModuleError(
                f"LLaMA_adapter model has no integer 'query_len', so the token bound of {path!r} "
                f"is unknown; pass max_tokens=<visual queries + CLIP tokens> to lcaam_patch.apply"
            )
        bound = config.max_tokens or query_len + _clip_tokens(root, path)
        return _TIMM.geometry(module, path, root, dataclasses.replace(config, max_tokens=bound))

    def forward(self, module: Any, site: LCAAMSite, *args: Any, **kwargs: Any) -> Any:
        """The upstream forward of the site's class, with LCAAM attention."""
        if type(module) is nn.MultiheadAttention:
            return _MHA.forward(module, site, *args, **kwargs)
        if type(module) is _llama_attention_type():
            return _llama_attention_forward(module, site, *args, **kwargs)
        return _TIMM.forward(module, site, *args, **kwargs)

    def prepare(self, module: Any, root: Any) -> _SiteState:
        """Keep the generator fp32 and trainable; wrap the root's freezer once."""
        state = _SiteState()
        if type(module) is nn.MultiheadAttention:
            state.mha = _MHA.prepare(module, root)
        generator = generator_of(module)
        if generator is not None:
            _make_trainable(generator)
            generator.register_forward_pre_hook(cast_to_generator_dtype)
        current = vars(root).get(FREEZER)
        if hasattr(root, FREEZER) and not _is_freezer_wrap(current):
            original = current if current is not None else functools.partial(getattr(type(root), FREEZER), root)
            setattr(root, FREEZER, functools.partial(freeze_then_keep_lcaam_trainable, root, original))
            state.root, state.previous_freezer = root, current
        return state

    def restore(self, module: Any, state: _SiteState) -> None:
        """Undo `prepare`: the MHA adapter's hooks, the key-token cache and the freezer wrap."""
        if type(module) is nn.MultiheadAttention:
            _MHA.restore(module, state.mha)
        vars(module).pop(TOKEN_CACHE, None)
        root = state.root
        if root is not None and _is_freezer_wrap(vars(root).get(FREEZER)):
            if state.previous_freezer is None:
                delattr(root, FREEZER)
            else:
                setattr(root, FREEZER, state.previous_freezer)


def make_lcaam_trainable(root: Any) -> None:
    """Make every LCAAM generator parameter under `root` fp32 and trainable."""
    for module in root.modules():
        generator = generator_of(module)
        if generator is not None:
            _make_trainable(generator)


def freeze_then_keep_lcaam_trainable(root: Any, original: Any, *args: Any, **kwargs: Any) -> Any:
    """Upstream's `get_trainable_params`, then the LCAAM parameters made trainable again."""
    result = original(*args, **kwargs)
    make_lcaam_trainable(root)
    return result


def cast_to_generator_dtype(generator: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the generator's input tokens in the generator's (fp32) dtype."""
    dtype = next(generator.parameters()).dtype
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _make_trainable(generator: nn.Module) -> None:
    for parameter in generator.parameters():
        if parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
        parameter.requires_grad = True


def _is_freezer_wrap(value: Any) -> bool:
    return isinstance(value, functools.partial) and value.func is freeze_then_keep_lcaam_trainable


def _model_type() -> type[nn.Module] | None:
    return getattr(sys.modules.get(MODEL_MODULE), "LLaMA_adapter", None)


def _llama_attention_type() -> type[nn.Module] | None:
    return getattr(sys.modules.get(LLAMA_MODULE), "Attention", None)


def _clip_tokens(root: Any, path: str) -> int:
    embedding = getattr(getattr(getattr(root, "clip", None), "visual", None), "positional_embedding", None)
    if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2:
        raise UnsupportedModuleError(
            f"LLaMA_adapter model has no clip.visual.positional_embedding, so the CLIP token "
            f"count that bounds {path!r} is unknown; pass max_tokens=N to lcaam_patch.apply"
        )
    return embedding.shape[0]


def _llama_attention_forward(
    module: Any,
    site: LCAAMSite,
    x: torch.Tensor,
    start_pos: int,
    freqs_cis: torch.Tensor,
    mask: torch.Tensor | None,
    adapter: torch.Tensor | None = None,
) -> torch.Tensor:
    """LLaMA's attention (`llama.llama.Attention.forward`) with LCAAM in its causal softmax.

    Computed with the module's own projections, LoRA branches, KV cache and gates, and
    upstream's `apply_rotary_emb`; the adapter-prompt attention is upstream's computation.
    """
    if mask is None:
        raise UnsupportedModuleError(
            f"LLaMA attention at {site.path!r} was called without a mask (upstream's "
            f"Transformer.forward on one token, where upstream also skips the softmax); LCAAM "
            f"patches the calls LLaMA_adapter makes, which always pass the causal mask. Leave "
            f"the LLaMA layers unpatched (preset 'llama_adapter') to call Transformer.forward"
        )
    bsz, seqlen, _ = x.shape
    heads, head_dim = module.n_local_heads, module.head_dim
    q, k, v = _with_lora(module, x, "q"), _with_lora(module, x, "k"), _with_lora(module, x, "v")
    rotary = sys.modules[type(module).__module__].apply_rotary_emb
    q, k = rotary(q.view(bsz, seqlen, heads, head_dim), k.view(bsz, seqlen, heads, head_dim), freqs_cis=freqs_cis)
    v = v.view(bsz, seqlen, heads, head_dim)
    key_tokens = None
    if not module.training:
        module.cache_k = module.cache_k.to(q)
        module.cache_v = module.cache_v.to(q)
        module.cache_k[:bsz, start_pos : start_pos + seqlen] = k
        module.cache_v[:bsz, start_pos : start_pos + seqlen] = v
        k = module.cache_k[:bsz, : start_pos + seqlen]
        v = module.cache_v[:bsz, : start_pos + seqlen]
        generator = generator_of(module)
        if generator is not None and generator.reads_key_tokens:
            key_tokens = _cached_key_tokens(module, x, start_pos)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scale = 1.0 / math.sqrt(head_dim)
    out, _ = site.attend(module, x, q, k, v, scale=scale, attn_mask=mask, kv_tokens=key_tokens)
    if adapter is not None:
        out = out + _adapter_prompt(module, q, adapter)
    out = out.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
    result = module.wo(out)
    if module.w_lora:
        result = result + module.lora_wo_l2(module.lora_wo_l1(out))
    return result


def _cached_key_tokens(module: Any, x: torch.Tensor, start_pos: int) -> torch.Tensor:
    """The tokens of every cached key, for a "lowrank" generator (which reads key tokens):
    kept beside upstream's KV cache, with the same layout."""
    bsz, seqlen, dim = x.shape
    shape = (module.args.max_batch_size, module.args.max_seq_len, dim)
    cache = vars(module).get(TOKEN_CACHE)
    cache = x.new_zeros(shape) if cache is None or cache.shape != shape else cache.to(x)
    setattr(module, TOKEN_CACHE, cache)
    cache[:bsz, start_pos : start_pos + seqlen] = x
    return cache[:bsz, : start_pos + seqlen]


def _with_lora(module: Any, x: torch.Tensor, which: str) -> torch.Tensor:
    projected = getattr(module, f"w{which}")(x)
    if module.w_lora:
        projected = projected + getattr(module, f"lora_w{which}_l2")(getattr(module, f"lora_w{which}_l1")(x))
    return projected


def _adapter_prompt(module: Any, q: torch.Tensor, adapter: torch.Tensor) -> torch.Tensor:
    """The gated adapter-prompt attention that upstream adds to the output, untouched by M."""
    bsz, length, _ = adapter.shape
    shape = (bsz, length, module.n_local_heads, module.head_dim)
    adapter_v = module.wv(adapter).view(shape).transpose(1, 2)
    if length == 1:
        return module.gate.tanh() * adapter_v
    adapter_k = module.wk(adapter).view(shape).transpose(1, 2)
    scores = torch.matmul(q, adapter_k.transpose(2, 3)) / math.sqrt(module.head_dim)
    weights = F.softmax(scores.float(), dim=-1).type_as(q)
    weights = module.gate.tanh() * weights
    if module.w_new_gate:
        weights = module.new_gate * weights
    return weights @ adapter_v


adapter = LLaMAAdapterAdapter()
