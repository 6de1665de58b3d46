"""capture, plots, cost and the inspect command."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_vit
from torch import nn

import lcaam_patch
from lcaam_patch.cli import main
from lcaam_patch.tools import plots


def patched(**options: object) -> nn.Module:
    return lcaam_patch.apply(tiny_vit(), init="default", **options).eval()


def test_capture_records_the_masks_the_forward_used():
    model = patched()
    used = {}
    for path, module, _ in lcaam_patch.patched_sites(model):
        module.lcaam.register_forward_hook(lambda m, args, out, path=path: used.setdefault(path, out.detach()))
    x = torch.randn(3, 3, 16, 16)
    with lcaam_patch.capture(model) as seen:
        model(x)
    assert list(seen.masks) == ["blocks.0.attn", "blocks.1.attn"]
    for path, masks in seen.masks.items():
        assert len(masks) == 1 and masks[0].shape == (3, 17, 17) and masks[0].device.type == "cpu"
        assert torch.equal(masks[0], used[path])
    assert seen.attention == {}


def test_capture_attention_weights_match_a_reference():
    model = patched()
    x = torch.randn(2, 3, 16, 16)
    with lcaam_patch.capture(model, attention=True) as seen:
        model(x)
    block = model.blocks[0]
    tokens = model._pos_embed(model.patch_embed(x))
    h = block.norm1(tokens)
    q, k, _ = block.attn.qkv(h).reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1)) * block.attn.scale * block.attn.lcaam(h)[:, None]
    weights = seen.attention["blocks.0.attn"][0]
    assert weights.shape == (2, 4, 17, 17)
    torch.testing.assert_close(weights, scores.softmax(-1).detach(), atol=1e-5, rtol=1e-5)


def test_nothing_is_recorded_outside_the_block():
    model = patched()
    x = torch.randn(1, 3, 16, 16)
    with lcaam_patch.capture(model) as seen:
        model(x)
    model(x)
    assert [len(v) for v in seen.masks.values()] == [1, 1]
    assert all(site.recorder is None for _, _, site in lcaam_patch.patched_sites(model))


def test_capture_keeps_within_its_byte_bound():
    model = patched()
    one_mask = 2 * 17 * 17 * 4
    with lcaam_patch.capture(model, max_bytes=3 * one_mask) as seen:
        for _ in range(2):
            model(torch.randn(2, 3, 16, 16))
    assert sum(len(v) for v in seen.masks.values()) == 3 and seen.dropped == 1


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_render_headless_to_png_and_svg(tmp_path):
    mask = torch.rand(2, 50, 50)
    groups = [("video", 0, 25), ("audio", 25, 50)]
    heatmap = plots.mask_heatmap(mask, groups=groups)
    assert _png_size(plots.save_figure(heatmap, tmp_path / "heatmap.png")) == (600, 500)
    assert "video 0–24 | audio 25–49" in heatmap.axes[0].get_xlabel()
    rows = plots.token_rows(mask, [0, 30], groups=groups)
    assert _png_size(plots.save_figure(rows, tmp_path / "rows.png")) == (700, 350)
    histograms = plots.attention_histograms(
        {"a": torch.rand(1, 2, 5, 5), "b": torch.rand(1, 2, 5, 5)}, {"a": torch.rand(1, 2, 5, 5)}
    )
    assert _png_size(plots.save_figure(histograms, tmp_path / "hist.png")) == (800, 320)
    svg = plots.save_figure(heatmap, tmp_path / "heatmap.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    with pytest.raises(lcaam_patch.LCAAMError, match="png or .svg"):
        plots.save_figure(heatmap, tmp_path / "heatmap.jpg")


def test_cost_counts_the_generator_flops_by_hand():
    depth, hidden = 2, 8
    model = lcaam_patch.apply(tiny_vit(), depth=depth, hidden=hidden)
    B, N, D, layers = 2, 17, 32, 2
    table = lcaam_patch.cost(model, torch.randn(B, 3, 16, 16), repeats=1)
    generator_flops = layers * 2 * B * N * (D * hidden + hidden * N)
    assert table.patched.flops - table.unpatched.flops == generator_flops
    assert table.patched.params - table.unpatched.params == layers * (D * hidden + hidden + hidden * N + N)
    assert table.patched.macs == table.patched.flops // 2
    assert lcaam_patch.is_patched(model)
    text = str(table)
    assert "unpatched" in text and "LCAAM" in text and "ratio" in text


def test_cost_counts_attention_of_the_unpatched_model_on_cpu():
    model = lcaam_patch.apply(tiny_vit())
    table = lcaam_patch.cost(model, torch.randn(1, 3, 16, 16), repeats=1)
    attention = 2 * (2 * 1 * 4 * 17 * 17 * 8)
    linear = 2 * 17 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32)
    patch_embed = 2 * 16 * 32 * 3 * 4 * 4
    head = 2 * 32 * 5
    assert table.unpatched.flops == 2 * (attention + linear) + patch_embed + head


def test_survey_reports_patch_filtered_error_and_unclaimed():
    class MyAttention(nn.Module):
        pass

    model = nn.ModuleDict(
        {
            "ok": nn.MultiheadAttention(8, 2),
            "skipped": nn.MultiheadAttention(8, 2),
            "refused": nn.MultiheadAttention(8, 2, add_zero_attn=True),
            "custom": MyAttention(),
        }
    )
    entries = {e.path: e for e in lcaam_patch.survey(model, max_tokens=4, exclude="skipped")}
    assert entries["ok"].status == "patch" and "4×4" in entries["ok"].detail
    assert entries["skipped"].status == "filtered"
    assert entries["refused"].status == "error" and "add_zero_attn" in entries["refused"].detail
    assert entries["custom"].status == "unclaimed" and entries["custom"].adapter is None
    assert not lcaam_patch.is_patched(model)


@pytest.mark.slow
def test_inspect_prints_tables_and_writes_plots(tmp_path, capsys):
    assert (
        main(
            ["inspect", "helpers:tiny_vit", "--input-shape", "1,3,16,16", "--init", "default", "--plot", str(tmp_path)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "[patch    ] blocks.0.attn" in out
    assert "2 sites" in out and "GFLOPs" in out
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [
        "attention_histograms.png",
        "mask_00_blocks_0_attn.png",
        "mask_01_blocks_1_attn.png",
        "mask_rows.png",
    ]
