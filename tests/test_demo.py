"""The demo trains both runs, reports what it measured, and writes its mask heatmaps."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lcaam_patch.cli.demo import run_demo

CHANCE = 0.1  # ten digit classes
WIDTH, TOKENS, LAYERS = 64, 17, 4  # the demo ViT: 64 wide, 16 patches + a class token, 4 blocks


@pytest.mark.slow
def test_demo_reports_both_runs_and_writes_heatmaps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_demo(epochs=1, seed=0, plot_dir=tmp_path)
    out = capsys.readouterr().out
    baseline, patched = rows
    assert [baseline["run"], patched["run"]] == ["unpatched", "lcaam mul"]

    # the parameters LCAAM adds are exactly what summary reports: one Linear(64 → 17) per block
    totals = re.search(r"(\d+) sites, ([\d,]+) LCAAM parameters \(.* of ([\d,]+) upstream\)", out)
    assert totals is not None, out
    sites, lcaam, upstream = totals.groups()
    lcaam_params, upstream_params = int(lcaam.replace(",", "")), int(upstream.replace(",", ""))
    assert int(sites) == LAYERS and lcaam_params == LAYERS * (WIDTH * TOKENS + TOKENS)
    assert baseline["params"] == upstream_params
    assert patched["params"] == baseline["params"] + lcaam_params

    # both runs learned: well above chance, and the patched one (identity init) tracks the baseline
    for row in rows:
        assert row["test_accuracy"] > CHANCE + 0.15, row
    assert abs(patched["test_accuracy"] - baseline["test_accuracy"]) < 0.15
    assert patched["step_time_ratio"] == pytest.approx(patched["ms_per_step"] / baseline["ms_per_step"])
    assert all(row["ms_per_step"] > 0 for row in rows)

    # the printed table holds both runs with the numbers measured
    for row in rows:
        line = next(line for line in out.splitlines() if line.startswith(row["run"] + " "))
        cells = line.split()
        assert f"{row['test_accuracy']:.2%}" in cells and f"{row['params']:,}" in cells, line
        assert f"{row['ms_per_step']:.2f}" in cells and f"{row['step_time_ratio']:.2f}×" in cells, line

    heatmaps = sorted(tmp_path.iterdir())
    assert [p.name for p in heatmaps] == [f"mask_layer{i}.png" for i in range(LAYERS)]
    assert all(p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in heatmaps)
    assert all(f"wrote {p}" in out for p in heatmaps)
