"""LCAAM on timm: site discovery on every timm model that uses a supported attention
class (built on the meta device), and exactness and trainability on small real models."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")

import lcaam_patch  # noqa: E402
from lcaam_patch import MissingBoundError, NoAttentionFoundError  # noqa: E402

ADAPTER = lcaam_patch.get_adapter("timm")
SUPPORTED = ADAPTER.attention_types()
NUM_CLASSES = 10
META_MAX_TOKENS = 1024


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
    return sorted(timm.list_models(module=families))


def _grid_bound(model: nn.Module) -> int | None:
    """The token bound the adapter is documented to infer, or None when it cannot."""
    num_patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    return num_patches + model.num_prefix_tokens if isinstance(num_patches, int) else None


@pytest.mark.parametrize("name", _meta_candidates())
def test_meta_model_sites(name: str) -> None:
    """apply patches exactly the supported attention modules of model `name`."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name)
    except Exception as error:  # timm's own construction, before lcaam_patch is involved
        pytest.skip(f"timm cannot build {name} on meta: {type(error).__name__}: {error}")
    expected = [path for path, module in model.named_modules() if type(module) in SUPPORTED]
    if not expected:
        with pytest.raises(NoAttentionFoundError):
            lcaam_patch.apply(model)
        return
    bound = _grid_bound(model)
    if bound is None:
        with pytest.raises(MissingBoundError):
            lcaam_patch.apply(model)
        assert not lcaam_patch.is_patched(model)
        bound = META_MAX_TOKENS
        lcaam_patch.apply(model, max_tokens=bound)
    else:
        lcaam_patch.apply(model)
    sites = lcaam_patch.patched_sites(model)
    assert [path for path, _, _ in sites] == expected
    parameters = dict(model.named_parameters())
    for path, _, site in sites:
        assert site.adapter is ADAPTER
        assert site.geometry.max_kv_tokens == bound
        assert parameters[f"{path}.lcaam.layers.0.weight"].is_meta


# --- small real models ----------------------------------------------------------------------

_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@dataclasses.dataclass(frozen=True)
class Case:
    """A small timm model exercising one supported attention variant.

    `max_tokens` is given for models whose token bound apply cannot infer; `naflex`
    feeds NaFlex patch dicts with padding, so the attention gets a mask.
    """

    id: str
    name: str
    kwargs: dict[str, Any]
    image: int = 32
    max_tokens: int | None = None
    naflex: bool = False


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
        max_tokens=64,
    ),
    Case(
        "crossvit_two_branches",
        "crossvit_tiny_240",
        dict(img_size=48, img_scale=(1, 1), embed_dim=[24, 48], num_heads=[2, 2], depth=[[1, 1]]),
        image=48,
        max_tokens=64,
    ),
    Case(
        "csatv2_head_dim",
        "csatv2",
        dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), transformer_depths=(0, 0, 1, 1)),
        image=128,
        max_tokens=64,
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
        max_tokens=64,
    ),
    # timm.layers.attention.AttentionRope
    Case("vit_rope", "vit_base_patch16_rope_224", _TINY),
    Case(
        "sapiens2_gqa_qk_norm",
        "vit_base_patch16_sapiens2",
        dict(_TINY, embed_dim=64, num_heads=4, num_kv_heads=2),
    ),
    Case("qwen3_rope", "qwen3_vit_88m", dict(_TINY, pos_embed_grid_size=4), max_tokens=64),
    Case(
        "rope_gated_padding_mask",
        "naflexvit_base_patch16_gap",
        dict(_TINY, rope_type="axial", attn_gated=True),
        max_tokens=64,
        naflex=True,
    ),
]


def _build(case: Case, *, fused: bool = True) -> nn.Module:
    """The model of `case` with O(1) random weights, its supported attentions set to `fused`.

    timm's own init damps the attention branch (layer scale 1e-5, heads scaled by 1e-3,
    zero-init projections), so a wrong attention would move the logits by less than the
    tolerance; with these weights a 1% change of any attention output moves them by ~1e-2.
    """
    torch.manual_seed(0)
    model = timm.create_model(case.name, num_classes=NUM_CLASSES, **case.kwargs)
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
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_identity_init_reproduces_model(case: Case, fused: bool) -> None:
    """With init='identity' the patched model computes what timm's own attention computes."""
    model = _build(case, fused=fused).eval()
    inputs = _inputs(case)
    with torch.no_grad():
        reference = model(inputs)
        _apply(model, case)
        patched = model(inputs)
    assert len(lcaam_patch.patched_sites(model)) > 0
    torch.testing.assert_close(patched, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
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
