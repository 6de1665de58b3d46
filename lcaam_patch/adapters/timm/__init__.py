"""The timm adapter: one registered adapter, `TimmAdapter`, over families of timm attention
classes (one module each): ViT-style attention (`vit`), window attention (`windows`), class
attention, talking heads, latent and 2-d attention pooling (`token_attention`), feature-map
and mask-unit attention (`feature_maps`), the hybrid and efficient ViTs (`hybrids`),
ByobNet's halo and bottleneck attention (`byobnet`), MViTv2's pooling attention (`mvit`),
multi-query attention over feature maps (`multi_query`).

Token bounds come from the user's max_tokens/max_kv_tokens where given; else from the
module (window sizes) or a ViT root's patch grid; else from the shape probe (`probe`): one
forward on `meta` at the model's default input size, per site.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ...config import LCAAMConfig
from ...errors import MissingBoundError
from ...site import LCAAMSite, SiteGeometry
from ..base import Adapter, BuilderCall
from .builders import CREATE_MODEL, create_model_call
from .byobnet import BottleneckFamily, HaloFamily
from .family import Family, Location, imported
from .feature_maps import Attention2dFamily, AttentionClFamily, HieraFamily
from .hybrids import (
    CascadedGroupFamily,
    EfficientFormerFamily,
    FastVitFamily,
    LevitDownsampleFamily,
    LevitFamily,
    LowFormerFamily,
    MetaFormerFamily,
    NestFamily,
    NextVitFamily,
    PvtV2Family,
    TinyVitFamily,
    TntFamily,
    TwinsGlobalFamily,
    TwinsLocalFamily,
    VisformerFamily,
)
from .multi_query import MultiQueryFamily
from .mvit import MultiScaleAttentionFamily
from .probe import TokenCounter, probed_tokens
from .token_attention import (
    AttentionPool2dFamily,
    ClassAttnFamily,
    LatentPoolFamily,
    TalkingHeadFamily,
    VoloClassFamily,
    VoloFamily,
)
from .vit import BeitFamily, PlainFamily, RelPosFamily
from .windows import DavitFamily, SwinFamily, SwinV2CrFamily, SwinV2Family

FAMILIES: tuple[Family, ...] = (
    PlainFamily(),
    BeitFamily(),
    RelPosFamily(),
    SwinFamily(),
    SwinV2Family(),
    SwinV2CrFamily(),
    DavitFamily(),
    ClassAttnFamily(),
    TalkingHeadFamily(),
    VoloFamily(),
    VoloClassFamily(),
    LatentPoolFamily(),
    Attention2dFamily(),
    AttentionClFamily(),
    HieraFamily(),
    LevitFamily(),
    LevitDownsampleFamily(),
    TinyVitFamily(),
    FastVitFamily(),
    NestFamily(),
    MetaFormerFamily(),
    PvtV2Family(),
    TwinsLocalFamily(),
    TwinsGlobalFamily(),
    TntFamily(),
    VisformerFamily(),
    EfficientFormerFamily(),
    HaloFamily(),
    BottleneckFamily(),
    MultiScaleAttentionFamily(),
    MultiQueryFamily(),
    CascadedGroupFamily(),
    LowFormerFamily(),
    AttentionPool2dFamily(),
    NextVitFamily(),
)

_CHANNELS = "attends over channels (a C×C map per head), not over tokens: there is no Nq×Nk matrix to mask"
INAPPLICABLE: tuple[tuple[Location, str], ...] = (
    (("timm.models.xcit", "XCA"), "cross-covariance attention " + _CHANNELS),
    (("timm.models.edgenext", "CrossCovarianceAttn"), "cross-covariance attention " + _CHANNELS),
    (("timm.models.davit", "ChannelAttention"), "channel attention " + _CHANNELS),
    (("timm.models.davit", "ChannelAttentionV2"), "channel attention " + _CHANNELS),
    (
        ("timm.models.volo", "OutlookAttention"),
        "outlook attention predicts each token's K×K neighbourhood weights with a linear layer; "
        "there are no query-key scores to fuse a mask with",
    ),
    (
        ("timm.models.mobilevit", "LinearSelfAttention"),
        "separable linear attention scores each key against one latent (N×1), not query against key",
    ),
    (
        ("timm.models.swiftformer", "EfficientAdditiveAttention"),
        "additive attention pools the queries into one global vector; there is no Nq×Nk matrix",
    ),
    (
        ("timm.models.coat", "FactorAttnConvRelPosEnc"),
        "factorized attention computes softmax(K)ᵀV first (a C×C context); there is no Nq×Nk matrix",
    ),
    (
        ("timm.layers.split_attn", "SplitAttn"),
        "split attention weights the radix groups of a convolution's channels, not tokens",
    ),
    (
        ("timm.layers.selective_kernel", "SelectiveKernelAttn"),
        "selective-kernel attention weights convolution branches per channel, not tokens",
    ),
    (
        ("timm.models.nextvit", "ConvAttention"),
        "multi-head convolutional attention is a grouped 3×3 convolution: no query-key scores",
    ),
    (
        ("timm.layers.lambda_layer", "LambdaLayer"),
        "lambda layers summarise the keys into linear lambdas (a softmax over positions of k, "
        "then kᵀv; position lambdas by a convolution): no per-query softmax over keys",
    ),
)


class TimmAdapter(Adapter):
    """Patches timm's token-attention classes (see `FAMILIES`)."""

    name = "timm"
    distribution = "timm"
    supported_versions = ">=0.9.16,<2"
    presets = {
        "timm_vit": {"mode": "multilayer", "fusion": "mul", "depth": 1},
    }
    builders = {"timm_vit": CREATE_MODEL}

    def builder_call(self, preset: str, target: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> BuilderCall:
        """`create_model` holds its `checkpoint_path` back for the patched model (see `builders`)."""
        return create_model_call(target, args, kwargs)

    def attention_types(self) -> tuple[type[nn.Module], ...]:
        """timm attention classes among the timm modules already imported."""
        return tuple(cls for family in FAMILIES for cls in family.types())

    def inapplicable(self) -> Mapping[type[nn.Module], str]:
        """timm attention classes LCAAM does not apply to, with why."""
        return {cls: why for location, why in INAPPLICABLE for cls in imported((location,))}

    def family(self, module: nn.Module) -> Family | None:
        """The family that knows the class of `module`, or None."""
        return next((f for f in FAMILIES if type(module) in f.types()), None)

    def _counter(self, module: nn.Module) -> TokenCounter | None:
        family = self.family(module)
        return None if family is None else family.tokens

    def geometry(self, module: nn.Module, path: str, root: nn.Module, config: LCAAMConfig) -> SiteGeometry:
        """Widths from the projections; bounds from the options, the module, the patch grid
        or the shape probe."""
        family = self.family(module)
        assert family is not None, "claimed modules belong to a family"
        max_q, max_kv = config.max_tokens, config.max_kv_tokens or config.max_tokens
        if max_q is None or max_kv is None:
            inferred = family.static_tokens(module, root) or probed_tokens(root, path, self._counter)
            if inferred is not None:
                max_q, max_kv = max_q or inferred[0], max_kv or inferred[1]
        if max_kv is None and config.generator != "lowrank":
            raise MissingBoundError(
                f"cannot infer the token count of {path!r}: the shape probe (one forward of the "
                f"timm model on meta at its default input size) did not reach it; pass "
                f"max_tokens=N (the longest sequence; max_kv_tokens=N for the keys) to "
                f"lcaam_patch.apply"
            )
        return SiteGeometry(
            embed_dim=family.embed_dim(module),
            max_q_tokens=max_q,
            max_kv_tokens=max_kv,
            kind=family.kind,
            kv_embed_dim=family.kv_embed_dim(module),
        )

    def forward(self, module: nn.Module, site: LCAAMSite, *args: Any, **kwargs: Any) -> Any:
        """The family's forward of `module` with LCAAM attention."""
        family = self.family(module)
        assert family is not None, "patched modules belong to a family"
        return family.forward(module, site, *args, **kwargs)


adapter = TimmAdapter()

__all__ = ["FAMILIES", "INAPPLICABLE", "TimmAdapter", "adapter"]
