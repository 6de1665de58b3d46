"""LCAAM on timm: site discovery on every timm model that uses a supported attention
class (built on the meta device), and exactness and trainability on small real models."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")

import lcaam_patch  # noqa: E402
from lcaam_patch import NoAttentionFoundError  # noqa: E402

ADAPTER = lcaam_patch.get_adapter("timm")
SUPPORTED = ADAPTER.attention_types()
NUM_CLASSES = 10


# --- every timm model, on the meta device -------------------------------------------------


def _modules_reaching(classes: tuple[type[nn.Module], ...]) -> set[str]:
    """Names of the imported timm modules whose code can build an instance of `classes`.

    timm model code reaches layer classes only through module-level names, so a module
    reaches `classes` when its globals hold one of them or an object that another
    reaching module defines (VisionTransformer, Block, EvaBlock, ...), to a fixpoint.
    Of the modules defining `classes`, only the nn.Module classes carry: their functions
    are helpers (maybe_add_mask, checkpoint filters) that many unrelated models import.
    The set over-approximates (swin imports a vit helper); for timm 1.0.31 an exhaustive
    build of all 1371 models found no model with a supported attention outside it (314).
    """
    defining = {cls.__module__ for cls in classes}

    def carries(value: Any, reaching: set[str]) -> bool:
        if any(value is cls for cls in classes):
            return True
        home = getattr(value, "__module__", None)
        if home not in reaching:
            return False
        return home not in defining or (isinstance(value, type) and issubclass(value, nn.Module))

    modules = {name: mod for name, mod in list(sys.modules.items()) if name.startswith("timm.")}
    reaching: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, module in modules.items():
            if name not in reaching and any(carries(value, reaching) for value in list(vars(module).values())):
                reaching.add(name)
                changed = True
    return reaching


def _meta_candidates() -> list[str]:
    """Every registered timm model whose module reaches a supported attention class."""
    reaching = _modules_reaching(SUPPORTED)
    families = [m for m in timm.list_modules() if f"timm.models.{m}" in reaching]
    return sorted({name for family in families for name in timm.list_models(module=family)})


def _default_input(model: nn.Module) -> torch.Tensor:
    """A meta batch of one image at the model's own image size (its config's otherwise)."""
    size = tuple(model.pretrained_cfg["input_size"])
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img_size, tuple) and len(img_size) == 2:
        size = (size[0], *img_size)
    return torch.empty(1, *size, device="meta")


def _generator_calls(model: nn.Module, inputs: Any) -> dict[str, tuple[int, int]]:
    """(Nq, Nk) of the largest call of each site's generator in one forward of `model`."""
    seen: dict[str, tuple[int, int]] = {}
    handles = []
    for path, module, _ in lcaam_patch.patched_sites(model):

        def hook(generator: nn.Module, args: tuple[Any, ...], path: str = path) -> None:
            nq, nk = args[0].shape[-2], args[1]
            old = seen.get(path, (0, 0))
            seen[path] = (max(old[0], nq), max(old[1], nk))

        handles.append(module.lcaam.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("name", _meta_candidates())
def test_meta_model_sites(name: str) -> None:
    """apply patches exactly the supported attention modules of model `name` with default
    options, and each generator is as wide as the most key tokens its attention gets in a
    forward at the model's default input size (a wider one would be dead weight, a narrower
    one would fail)."""
    with torch.device("meta"):
        model = timm.create_model(name)
    expected = [path for path, module in model.named_modules() if type(module) in SUPPORTED]
    if not expected:
        with pytest.raises(NoAttentionFoundError):
            lcaam_patch.apply(model, generic="off")  # the generic SDPA adapter: tests/test_sdpa_adapter.py
        return
    with pytest.warns(UserWarning, match="meta device"):
        lcaam_patch.apply(model)
    sites = lcaam_patch.patched_sites(model)
    assert [path for path, _, _ in sites] == expected
    parameters = dict(model.named_parameters())
    calls = _generator_calls(model.eval(), _default_input(model))
    for path, _, site in sites:
        assert site.adapter is ADAPTER
        assert parameters[f"{path}.lcaam.layers.0.weight"].is_meta
        nq, nk = calls[path]
        assert site.geometry.max_kv_tokens == nk, path
        assert site.geometry.max_q_tokens == nq, path


# --- small real models ----------------------------------------------------------------------

_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _byobnet(self_attn_layer: str, **self_attn_kwargs: Any) -> dict[str, Any]:
    """ByobNet kwargs for a small net with self-attention blocks at strides 8 (entered with
    stride 2) and 16, `self_attn_layer` configured by `self_attn_kwargs`."""
    from timm.models.byobnet import ByoBlockCfg, ByoModelCfg

    blocks = (
        ByoBlockCfg(type="bottle", d=1, c=32, s=1, br=0.25),
        ByoBlockCfg(type="self_attn", d=2, c=64, s=2, br=0.25),
        ByoBlockCfg(type="self_attn", d=1, c=64, s=2, br=0.25),
    )
    cfg = ByoModelCfg(
        blocks=blocks,
        stem_chs=16,
        stem_pool="maxpool",
        self_attn_layer=self_attn_layer,
        self_attn_kwargs=dict(num_heads=2, **self_attn_kwargs),
    )
    return dict(cfg=cfg)


_MULTI_QUERY = "timm.layers.attention2d:MultiQueryAttention2d"


def _has(path: str) -> bool:
    """Whether the installed timm has `path` ("module:attr"; older releases lack newer ones)."""
    module_name, attr = path.split(":")
    try:
        return hasattr(importlib.import_module(module_name), attr)
    except ImportError:
        return False


def _multi_query_blocks() -> list[list[dict[str, Any]]]:
    """MobileNet block args: MQA with kv stride 2, then with queries pooled by 2 (upsampled
    after); none where timm has no MQA blocks (the case is skipped there)."""
    from timm.models._efficientnet_builder import decode_arch_def

    if not _has(_MULTI_QUERY):
        return []
    blocks: list[list[dict[str, Any]]] = decode_arch_def(
        [["er_r1_k3_s2_e4_c16"], ["mqa_r1_k3_h2_s1_v2_d8_c16", "mqa_r1_k3_h2_s1_d8_c16"], ["cn_r1_k1_s1_c32"]]
    )
    blocks[1][1]["query_strides"] = 2
    return blocks


def _mvitv2(**kwargs: Any) -> Any:
    """A two-stage MViTv2 config, q pooled by 2 into the second stage, kv by 4 then 2."""
    from timm.models.mvitv2 import MultiScaleVitCfg

    return MultiScaleVitCfg(depths=(1, 2), embed_dim=16, num_heads=1, stride_q=((1, 1), (2, 2)), **kwargs)


@dataclasses.dataclass(frozen=True)
class Case:
    """A small timm model exercising one supported attention variant.

        `name` is a timm model name, or "module:Class" for a model class built directly (no
        timm config, so no shape probe: such cases give `max_tokens`). `max_tokens` is given
        to exercise the explicit bound; `naflex` feeds NaFlex patch
        dicts with padding, so the attention gets a mask; `needs` is a "module:attr" the case's
    parts need where its model exists in older timm; `classes` are the attention classes
        (module.Class suffixes) the case must patch.
    """

    id: str
    name: str
    kwargs: dict[str, Any]
    image: int = 32
    max_tokens: int | None = None
    naflex: bool = False
    needs: str | None = None
    classes: tuple[str, ...] = ()


CASES = [
    # timm.layers.attention.Attention
    Case("vit", "vit_tiny_patch16_224", _TINY),
    Case("deit_distilled", "deit_tiny_distilled_patch16_224", _TINY),
    Case("vit_qk_norm", "vit_small_patch16_224", dict(_TINY, qk_norm=True)),
    Case("beit3_scale_norm", "beit3_base_patch16_224", _TINY),
    Case("dinov2_registers", "vit_small_patch14_reg4_dinov2", _TINY),
    Case("vit_hybrid_cnn_stem", "vit_tiny_r_s16_p8_224", dict(img_size=64, depth=2), image=64),
    Case(
        "pit_pooling_stages",
        "pit_ti_224",
        dict(img_size=64, depth=[1, 1, 1]),
        image=64,
    ),
    Case(
        "crossvit_two_branches",
        "crossvit_tiny_240",
        dict(img_size=48, img_scale=(1, 1), embed_dim=[24, 48], num_heads=[2, 2], depth=[[1, 1]]),
        image=48,
    ),
    Case(
        "csatv2_head_dim",
        "csatv2",
        dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), transformer_depths=(0, 0, 1, 1)),
        image=128,
    ),
    Case("naflex_padding_mask", "naflexvit_base_patch16_gap", _TINY, max_tokens=64, naflex=True),
    # timm.models.eva.EvaAttention
    Case("eva02_fused_qkv_bias", "eva02_tiny_patch14_224", _TINY),
    Case("eva02_clip_scale_norm", "eva02_base_patch16_clip_224", _TINY),
    Case("dinov3_rotate_half", "vit_base_patch16_dinov3", _TINY),
    Case(
        "eva_gated",
        "naflexvit_base_patch16_gap",
        dict(_TINY, attn_type="eva", attn_gated=True),
    ),
    # timm.layers.attention.AttentionRope
    Case("vit_rope", "vit_base_patch16_rope_224", _TINY),
    Case(
        "sapiens2_gqa_qk_norm",
        "vit_base_patch16_sapiens2",
        dict(_TINY, embed_dim=64, num_heads=4, num_kv_heads=2),
    ),
    Case("qwen3_rope", "qwen3_vit_88m", dict(_TINY, pos_embed_grid_size=4)),
    Case(
        "rope_gated_padding_mask",
        "naflexvit_base_patch16_gap",
        dict(_TINY, rope_type="axial", attn_gated=True),
        max_tokens=64,
        naflex=True,
    ),
    # timm.models.beit.Attention: own relative position bias, and the shared one
    Case("beit_rel_pos_bias", "beit_base_patch16_224", _TINY, classes=("beit.Attention",)),
    Case(
        "beit_shared_rel_pos_bias",
        "beit_base_patch16_224",
        dict(_TINY, use_rel_pos_bias=False, use_shared_rel_pos_bias=True),
        classes=("beit.Attention",),
    ),
    # timm.models.vision_transformer_relpos.RelPosAttention: own and shared rel_pos
    Case("relpos", "vit_relpos_small_patch16_224", _TINY, classes=("RelPosAttention",)),
    Case(
        "relpos_shared",
        "vit_srelpos_small_patch16_224",
        dict(_TINY, rel_pos_dim=32),
        classes=("RelPosAttention",),
    ),
    # window attention: a mask per window, with Swin's shift mask
    Case(
        "swin_shifted_windows",
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 2)),
        classes=("swin_transformer.WindowAttention",),
    ),
    Case(
        "swinv2_cosine_cpb",
        "swinv2_tiny_window8_256",
        dict(img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 2)),
        classes=("swin_transformer_v2.WindowAttention",),
    ),
    Case(
        "davit_windows",
        "davit_tiny",
        dict(depths=(1, 1), embed_dims=(16, 32), num_heads=(2, 2), window_size=4),
        classes=("davit.WindowAttention",),
    ),
    # CaiT: class attention (Nq = 1) and talking heads; XCiT's class attention is CaiT's
    Case(
        "cait_class_talking_heads",
        "cait_xxs24_224",
        dict(_TINY, depth_token_only=2),
        classes=("ClassAttn", "TalkingHeadAttn"),
    ),
    # VOLO: attention over (B, H, W, C) maps and its class attention
    Case(
        "volo",
        "timm.models.volo:VOLO",
        dict(img_size=64, layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(2, 2, 2, 2)),
        image=64,
        max_tokens=17,
        classes=("volo.Attention", "volo.ClassAttention"),
    ),
    # AttentionPoolLatent: the MAP head's latent queries over the tokens
    Case("siglip_map_head", "vit_base_patch16_siglip_224", _TINY, classes=("AttentionPoolLatent",)),
    # MaxViT/CoAtNet: channels-last block/grid partitions, NCHW full-map attention
    Case("maxvit_partitions", "maxvit_rmlp_pico_rw_256", dict(img_size=64), image=64, classes=("AttentionCl",)),
    Case(
        "coatnet_nchw",
        "coatnet_pico_rw_224",
        dict(img_size=64),
        image=64,
        max_tokens=16,
        classes=("maxxvit.Attention2d",),
    ),
    # Hiera: mask-unit and global attention with q pooling
    Case(
        "hiera_mask_units_q_pool",
        "hiera_tiny_224",
        dict(img_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)),
        image=64,
        classes=("MaskUnitAttention",),
    ),
    # Swin v2 CR: cosine attention with a meta-network bias, shift mask
    Case(
        "swinv2_cr_shifted_windows",
        "swinv2_cr_tiny_224",
        dict(img_size=(32, 32), window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 2)),
        classes=("WindowMultiHeadAttention",),
    ),
    # LeViT: attention biases, subsampled queries; linear and conv layouts
    Case(
        "levit_biases_downsample",
        "levit_128s",
        dict(img_size=128),
        image=128,
        classes=("levit.Attention", "levit.AttentionDownsample"),
    ),
    Case(
        "levit_conv",
        "levit_conv_128s",
        dict(img_size=128),
        image=128,
        classes=("levit.Attention", "levit.AttentionDownsample"),
    ),
    Case("tiny_vit_biases", "tiny_vit_5m_224", {}, image=64, classes=("tiny_vit.Attention",)),
    Case("fastvit_nchw", "fastvit_sa12", dict(layers=(1, 1, 1, 1)), image=64, classes=("fastvit.Attention",)),
    Case(
        "nest_blocks",
        "timm.models.nest:Nest",
        dict(img_size=64, embed_dims=(32, 32, 32), num_heads=(2, 2, 2), depths=(1, 1, 2)),
        image=64,
        max_tokens=16,
        classes=("nest.Attention",),
    ),
    Case(
        "caformer",
        "caformer_s18",
        {},
        image=64,
        classes=("metaformer.Attention",),
    ),
    Case("pvt_v2_spatial_reduction", "pvt_v2_b0", {}, image=64, classes=("pvt_v2.Attention",)),
    Case(
        "pvt_v2_linear_pool",
        "pvt_v2_b0",
        dict(linear=True, depths=(1, 1, 1, 1)),
        image=64,
        classes=("pvt_v2.Attention",),
    ),
    Case(
        "twins_local_and_global",
        "timm.models.twins:Twins",
        dict(
            img_size=64,
            embed_dims=(16, 32, 32, 32),
            num_heads=(1, 2, 2, 2),
            depths=(2, 1, 1, 1),
            wss=(4, 4, 4, 4),
            sr_ratios=(4, 2, 1, 1),
        ),
        image=64,
        max_tokens=256,
        classes=("LocallyGroupedAttn", "GlobalSubSampleAttn"),
    ),
    Case("tnt_inner_outer", "tnt_s_patch16_224", dict(img_size=32), classes=("tnt.Attention",)),
    Case("visformer_nchw", "visformer_tiny", dict(img_size=64), image=64, classes=("visformer.Attention",)),
    Case("efficientformer_biases", "efficientformer_l1", {}, image=224, classes=("efficientformer.Attention",)),
    # ByobNet: halo blocks (strided query blocks, avg-pool downsampling) and bottleneck attention
    Case(
        "halo_strided_blocks",
        "timm.models.byobnet:ByobNet",
        _byobnet("halo", block_size=4, halo_size=1),
        image=64,
        classes=("HaloAttn",),
    ),
    Case(
        "halo_avg_down_scaled_pos",
        "timm.models.byobnet:ByobNet",
        _byobnet("halo", block_size=4, halo_size=1, avg_down=True, scale_pos_embed=True),
        image=64,
        classes=("HaloAttn",),
    ),
    Case(
        "bottleneck_attn",
        "timm.models.byobnet:ByobNet",
        dict(_byobnet("bottleneck"), img_size=64),
        image=64,
        classes=("BottleneckAttn",),
    ),
    Case(
        "bottleneck_attn_scaled_pos",
        "timm.models.byobnet:ByobNet",
        dict(_byobnet("bottleneck", scale_pos_embed=True), img_size=64),
        image=64,
        classes=("BottleneckAttn",),
    ),
    # MViTv2: conv-pooled q (stride 2 between stages) and kv, relative position logits, residual pooling
    Case(
        "mvitv2_pooling",
        "timm.models.mvitv2:MultiScaleVit",
        dict(cfg=_mvitv2(), img_size=(64, 64)),
        image=64,
        max_tokens=256,
        classes=("MultiScaleAttention",),
    ),
    Case(
        "mvitv2_cls_max_pool",
        "timm.models.mvitv2:MultiScaleVit",
        dict(cfg=_mvitv2(use_cls_token=True, mode="max", residual_pooling=False), img_size=(64, 64)),
        image=64,
        max_tokens=257,
        classes=("MultiScaleAttention",),
    ),
    # EfficientViT-MSRA: cascaded heads with attention biases, in padded 7×7 windows then one 4×4 map
    Case(
        "efficientvit_msra_cascaded",
        "efficientvit_m0",
        dict(img_size=128),
        image=128,
        classes=("CascadedGroupAttention",),
    ),
    # LowFormer: attention over a conv-downsampled map (stride 2, then 1), upsampled after
    Case("lowformer_fused_out_proj", "lowformer_b0", {}, image=128, classes=("lowformer.ConvAttention",)),
    Case(
        "lowformer_out_proj",
        "lowformer_b0",
        dict(fused_conv=False),
        image=128,
        classes=("lowformer.ConvAttention",),
    ),
    # AttentionPool2d: the CLIP ResNet head, mean token and positions (position embeddings resampled)
    Case("clip_resnet_attention_pool", "resnet50_clip", {}, image=64, classes=("AttentionPool2d",)),
    # Next-ViT: keys avg-pooled by sr_ratio² and batch-normed (and full keys in the last stage)
    Case(
        "nextvit_pooled_keys",
        "nextvit_small",
        dict(depths=(1, 1, 5, 1)),
        image=64,
        classes=("nextvit.EfficientAttention",),
    ),
    # CPUBone: LowFormer's attention with 2×2 projections (the odd 5×5 map padded), nearest or learned upsampling
    Case("cpubone_small_kernels_nearest", "cpubone_nano", {}, image=80, classes=("cpubone.ConvAttention",)),
    Case(
        "cpubone_small_kernels_transpose",
        "cpubone_nano",
        dict(attn_upsample="transpose", fused_conv=False),
        image=80,
        classes=("cpubone.ConvAttention",),
    ),
    # MultiQueryAttention2d: shared key/value head downsampled by a strided conv, pooled queries
    Case("mnv4_hybrid_multi_query", "mobilenetv4_hybrid_medium", {}, image=64, classes=("MultiQueryAttention2d",)),
    Case(
        "multi_query_strided_queries",
        "timm.models.mobilenetv3:MobileNetV3",
        dict(block_args=_multi_query_blocks(), stem_size=16),
        image=32,
        max_tokens=64,
        needs=_MULTI_QUERY,
        classes=("MultiQueryAttention2d",),
    ),
]


def _available(case: Case) -> bool:
    """Whether the installed timm has the case's model and the parts it needs."""
    if case.needs is not None and not _has(case.needs):
        return False
    return _has(case.name) if ":" in case.name else bool(timm.is_model(case.name))


CASE_PARAMS = [
    pytest.param(
        case,
        id=case.id,
        marks=pytest.mark.skipif(not _available(case), reason=f"timm {timm.__version__} has no {case.name}"),
    )
    for case in CASES
]


def _build(case: Case, *, fused: bool = True) -> nn.Module:
    """The model of `case` with O(1) random weights, its supported attentions set to `fused`.

    timm's own init damps the attention branch (layer scale 1e-5, heads scaled by 1e-3,
    zero-init projections), so a wrong attention would move the logits by less than the
    tolerance; with these weights a 1% change of any attention output moves them by ~1e-2.
    """
    torch.manual_seed(0)
    kwargs = copy.deepcopy(case.kwargs)  # builders may consume their arguments (MobileNet's block args)
    if ":" in case.name:
        module_name, class_name = case.name.split(":")
        model = getattr(importlib.import_module(module_name), class_name)(num_classes=NUM_CLASSES, **kwargs)
    else:
        model = timm.create_model(case.name, num_classes=NUM_CLASSES, **kwargs)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:  # biases, norm weights, layer scales
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(std=parameter[0].numel() ** -0.5)
    for module in model.modules():
        if type(module) in SUPPORTED:
            module.fused_attn = fused
    return model


def _inputs(case: Case) -> torch.Tensor | dict[str, torch.Tensor]:
    """Two images, or for NaFlex their patches with 4 padding slots and a shorter 2nd image."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, case.image, case.image)
    if not case.naflex:
        return images
    patch = case.kwargs["patch_size"]
    patches, (rows, cols) = timm.models.naflexvit.batch_patchify(images, (patch, patch))
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    coords = grid.reshape(1, -1, 2).expand(2, -1, -1)
    valid = torch.ones(2, rows * cols, dtype=torch.bool)
    valid[1, rows * cols // 2 :] = False
    pad = 4
    return {
        "patches": F.pad(patches, (0, 0, 0, pad)),
        "patch_coord": F.pad(coords, (0, 0, 0, pad)),
        "patch_valid": F.pad(valid, (0, pad), value=False),
    }


def _apply(model: nn.Module, case: Case, **options: Any) -> nn.Module:
    """Patch `model`, passing the case's token bound where apply cannot infer it."""
    if case.max_tokens is not None:
        options["max_tokens"] = case.max_tokens
    return lcaam_patch.apply(model, **options)


def _lcaam_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that LCAAM added, by name."""
    return {name: p for name, p in model.named_parameters() if ".lcaam." in name}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_identity_init_reproduces_model(case: Case, fused: bool) -> None:
    """With init='identity' the patched model computes what timm's own attention computes.

    In float64, so that another attention kernel's rounding, amplified by the O(1) random
    weights (logits up to ~1e3), stays far below the tolerance while a wrong mask does not.
    """
    model = _build(case, fused=fused).double().eval()
    inputs = _inputs(case)
    inputs = {k: _double(v) for k, v in inputs.items()} if isinstance(inputs, dict) else _double(inputs)
    with torch.no_grad():
        reference = model(inputs)
        _apply(model, case)
        patched = model(inputs)
    assert len(lcaam_patch.patched_sites(model)) > 0
    torch.testing.assert_close(patched, reference, rtol=0, atol=1e-9 * max(1.0, reference.abs().max().item()))


def _double(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.double() if tensor.is_floating_point() else tensor


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_lcaam_parameters_receive_gradients(case: Case) -> None:
    """After one optimiser step away from identity, every LCAAM parameter gets a gradient.

    With depth=2 and init='identity' the last generator layer starts at zero, so the first
    layer gets no gradient until a step has moved the last one.
    """
    model = _apply(_build(case).train(), case, depth=2)
    parameters = _lcaam_parameters(model)
    for path, _, _ in lcaam_patch.patched_sites(model):
        assert any(name.startswith(f"{path}.lcaam.") for name in parameters), path
    inputs = _inputs(case)
    targets = torch.arange(2) % NUM_CLASSES
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    for name, parameter in parameters.items():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_remove_restores_outputs_exactly() -> None:
    """remove undoes a non-identity patch: same outputs bit for bit, same state dict keys."""
    case = next(case for case in CASES if case.id == "eva02_fused_qkv_bias")
    model = _build(case).eval()
    inputs = _inputs(case)
    keys = list(model.state_dict())
    with torch.no_grad():
        reference = model(inputs)
        _apply(model, case, init="default")
        assert not torch.equal(model(inputs), reference)
        lcaam_patch.remove(model)
        restored = model(inputs)
    assert not lcaam_patch.is_patched(model)
    assert list(model.state_dict()) == keys
    assert torch.equal(restored, reference)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_case_patches_its_attention_classes(case: Case) -> None:
    """Every attention class a case stands for is patched, with inferred bounds unless given."""
    model = _apply(_build(case), case)
    patched = {f"{type(m).__module__}.{type(m).__qualname__}" for _, m, _ in lcaam_patch.patched_sites(model)}
    for suffix in case.classes:
        assert any(name.endswith(suffix) for name in patched), (suffix, patched)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_perturbed_generators_change_outputs(case: Case) -> None:
    """Moving every generator away from identity changes what the model computes.

    With fusion="add": a multiplied mask leaves the softmax alone where the scores are
    near zero (EfficientFormer's random init), an added one moves it always.
    """
    model = _apply(_build(case).eval(), case, fusion="add")
    inputs = _inputs(case)
    with torch.no_grad():
        reference = model(inputs)
        torch.manual_seed(2)
        for parameter in _lcaam_parameters(model).values():
            parameter.add_(torch.randn_like(parameter) * 0.5)
        perturbed = model(inputs)
    assert torch.isfinite(perturbed).all()
    assert (perturbed - reference).abs().max() > 1e-3


def test_survey_reports_inapplicable_classes() -> None:
    """survey says why XCiT's cross-covariance and DaViT's channel attention are not patched."""
    from lcaam_patch.tools.survey import survey

    for name, class_name in [("xcit_nano_12_p16_224", "XCA"), ("davit_tiny", "ChannelAttention")]:
        entries = survey(timm.create_model(name))
        skipped = [e for e in entries if e.class_name.endswith(f".{class_name}")]
        assert skipped, name
        assert all(e.status == "inapplicable" and "channels" in e.detail for e in skipped)
        assert any(e.status == "patch" for e in entries)


def test_probe_finds_a_timm_model_inside_a_wrapper_and_leaves_it_as_it_was() -> None:
    """A CrossViT (no patch grid) inside a user's module gets per-branch bounds; the probe
    leaves the weights, their device and the training mode alone."""
    case = next(case for case in CASES if case.id == "crossvit_two_branches")
    backbone = _build(case).train()
    wrapper = nn.Sequential(backbone)
    weights = {name: p.clone() for name, p in backbone.named_parameters()}
    lcaam_patch.apply(wrapper)
    widths = {s.geometry.max_kv_tokens for _, _, s in lcaam_patch.patched_sites(wrapper)}
    assert widths == {1 + (48 // 12) ** 2, 1 + (48 // 16) ** 2}
    assert all(m.training for m in backbone.modules())
    for name, p in backbone.named_parameters():
        if name in weights:
            assert not p.is_meta and torch.equal(p, weights[name]), name


@pytest.mark.skipif(
    not timm.is_model("resnet50_clip"), reason=f"timm {timm.__version__} predates AttentionPool2d's qkv_separate"
)
def test_attention_pool2d_fused_qkv_and_class_token() -> None:
    """AttentionPool2d's fused qkv and class token (no registered model has them): identity
    reproduces it, perturbed generators change it, every LCAAM parameter gets a gradient."""
    from timm.layers.attention_pool2d import AttentionPool2d

    torch.manual_seed(0)
    pool = AttentionPool2d(16, feat_size=4, num_heads=2, qkv_separate=False, class_token=True, out_features=8)
    model = nn.Sequential(pool).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    x = torch.randn(2, 16, 4, 4, dtype=torch.double)
    with torch.no_grad():
        reference = model(x)
        lcaam_patch.apply(model, max_tokens=17, depth=1)
        torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-9 * reference.abs().max().item())
        for parameter in _lcaam_parameters(model).values():
            parameter.add_(torch.randn_like(parameter) * 0.5)
        assert (model(x) - reference).abs().max() > 1e-3
    model(x).square().sum().backward()
    for name, parameter in _lcaam_parameters(model).items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
