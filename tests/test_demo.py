"""The demo trains both runs, reports them, and writes its mask heatmaps."""

from __future__ import annotations

import pytest

from lcaam_patch.cli.demo import run_demo


@pytest.mark.slow
def test_demo_reports_both_runs_and_writes_heatmaps(tmp_path, capsys):
    rows = run_demo(epochs=1, seed=0, plot_dir=tmp_path)
    assert [row["run"] for row in rows] == ["unpatched", "lcaam mul"]
    assert rows[1]["params"] > rows[0]["params"]
    assert rows[0]["step_time_ratio"] == 1.0 and rows[1]["step_time_ratio"] > 0
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in rows)
    assert rows[1]["test_accuracy"] > 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"mask_layer{i}.png" for i in range(4)]
    out = capsys.readouterr().out
    assert "vs unpatched" in out and "4 sites" in out
