"""Hugging Face transformers: every attention class that dispatches through the attention
interface (`ALL_ATTENTION_FUNCTIONS`), discovered from the class source, for transformers
`>=4.53,<6`.

How a module is patched, per instance:

- `prepare` gives the module a shallow copy of its config whose
  `_attn_implementation_internal` names `lcaam`, an attention function registered with
  `AttentionInterface.register`. The model's own config (and every other module and model
  built from it) keeps its implementation, so the model's mask preprocessing goes on
  producing the eager/sdpa masks; `restore` puts the original config back.
- The instance forward (`TransformersAdapter.forward`) keeps the layer's input hidden
  states (and, for cross-attention, the key tokens) and the column offset of the cached
  keys, then runs the class's own forward. Upstream computes q, k, v (RoPE, q/k norms, the
  cache update) and calls `lcaam`, which runs `LCAAMSite` attention with them: M from the
  input hidden states, fused into QKᵀ·scale, then the upstream mask (padding, causal,
  sliding window, T5's position bias) added, grouped-query heads expanded.

Masks: a bool mask (sdpa) is kept as is; a float mask (eager) has its `finfo.min` entries
made hard with `harden`; a missing mask under sdpa means causal when the module (or the
call) says so and there is more than one query, as upstream's sdpa decides.

Key columns: key slot j of a call is absolute position `offset + j`, where `offset` is
what the cache layer tells the mask builder (`get_mask_sizes`): 0 except for sliding
windows that have dropped keys. M is computed `offset + Nk` wide and its last Nk columns
are used, so generating with and without a cache gives the same tokens.

Refused at apply, with the reason: model-level implementations other than eager/sdpa
(flash, flex, paged), logit soft-capping, attention sinks, classes that call attention
once per chunk (`cu_seqlens`) or take separate query/key/value inputs, inferred token
bounds above `MAX_INFERRED_TOKENS` (pass `max_kv_tokens` or `generator="lowrank"`).
Refused at call: a model-level implementation switched after apply (`set_attn_implementation`
is refused at once), and a lowrank generator on a KV cache filled before apply.

`nn.MultiheadAttention` pooling heads inside image models (SigLIP's) are patched by
`PoolingHeadAdapter` (pooling.py), with the bounds the shape probe sees.

Attention that older families still compute in the module's own forward, off the
interface, in BERT's shape (MegatronBERT, RemBERT, TAPAS, VisualBERT, FLAVA, ...) or BART's
written with `torch.bmm` (XGLM, TrOCR, GroupViT, MVP), is patched by
`LegacySelfAttentionAdapter` (legacy.py), which verifies each claim at its first call.

A lowrank generator reads the key tokens, which a KV cache does not keep: the instance
forward keeps the layer inputs of every position of each cache it sees (beside it, freed
with it) and hands the generator those of the cached slots, or, outside autograd, the key
factors it kept for them (`calls.KeySlot`, recomputed when the key weights change).

Under `eager`, the attention weights are computed only when something may read them
(`attention.weights_wanted`); under `sdpa`, never, as upstream.
"""

from .adapter import TransformersAdapter, adapter
from .attention import ATTENTION_FUNCTION, lcaam_attention_function
from .discovery import dispatches_through_interface
from .legacy import LegacySelfAttentionAdapter
from .legacy import adapter as legacy_adapter
from .pooling import PoolingHeadAdapter
from .pooling import adapter as pooling_head_adapter

__all__ = [
    "ATTENTION_FUNCTION",
    "LegacySelfAttentionAdapter",
    "PoolingHeadAdapter",
    "TransformersAdapter",
    "adapter",
    "dispatches_through_interface",
    "lcaam_attention_function",
    "legacy_adapter",
    "pooling_head_adapter",
]
