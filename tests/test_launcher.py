"""The launcher (`lcaam-patch run`) on a fake upstream: a package whose setup function
builds a model through a module-global builder, and a training script that uses it."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from torch import nn

import lcaam_patch
from lcaam_patch import LauncherError
from lcaam_patch.adapters.torch_mha import MultiheadAttentionAdapter
from lcaam_patch.cli import main
from lcaam_patch.cli import run as launcher

PACKAGE = "fake_upstream_for_launcher"
PRESET = "fake_launcher"

MODEL_SOURCE = """
from torch import nn

class Model(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.head = nn.Linear(width, 1)

def build_model(opt):
    if opt.get("not_a_model"):
        return "not a model", None
    return Model(opt["width"]), "criterion"
"""

SETUP_SOURCE = f"""
import torch
from {PACKAGE}.model import build_model

def setup(opt):
    model, criterion = build_model(opt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, criterion, optimizer
"""

SCRIPT_SOURCE = f"""
import json
import sys

import lcaam_patch
from {PACKAGE}.setup import setup

out, width, not_a_model = sys.argv[1], int(sys.argv[2]), "--not-a-model" in sys.argv
model, criterion, optimizer = setup({{"width": width, "not_a_model": not_a_model}})
optimized = {{id(p) for group in optimizer.param_groups for p in group["params"]}}
generator = model.attn.lcaam
with open(out, "w") as f:
    json.dump({{
        "name": __name__,
        "argv": sys.argv,
        "path0": sys.path[0],
        "patched": lcaam_patch.is_patched(model),
        "criterion": criterion,
        "in_optimizer": all(id(p) in optimized for p in generator.parameters()),
        "depth": len(generator.layers),
        "max_kv_tokens": generator.max_kv_tokens,
    }}, f)
"""


class FakeAdapter(MultiheadAttentionAdapter):
    """Claims the fake package's attention; reads the token bound off the builder's options."""

    name = PRESET
    priority = 100
    presets = {PRESET: {"depth": 2}, "fake_no_builder": {"depth": 1}}
    builders = {PRESET: (f"{PACKAGE}.setup:build_model",)}

    def claims(self, module: nn.Module, path: str, root: nn.Module) -> bool:
        return type(root).__module__ == f"{PACKAGE}.model" and super().claims(module, path, root)

    def builder_options(self, preset: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return {"max_tokens": args[0]["width"] + 1}


@pytest.fixture
def fake_upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The fake package on sys.path, its script, and the fake adapter registered."""
    package = tmp_path / "src" / PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text(textwrap.dedent(MODEL_SOURCE))
    (package / "setup.py").write_text(textwrap.dedent(SETUP_SOURCE))
    script = tmp_path / "scripts" / "train.py"
    script.parent.mkdir()
    script.write_text(textwrap.dedent(SCRIPT_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    lcaam_patch.register_adapter(FakeAdapter())
    yield script
    lcaam_patch.unregister_adapter(PRESET)
    for name in [n for n in sys.modules if n.split(".")[0] == PACKAGE]:
        del sys.modules[name]


def test_run_patches_the_built_model_before_the_script_builds_its_optimizer(
    fake_upstream: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.json"
    argv, path0 = list(sys.argv), sys.path[0]
    launcher.run(fake_upstream, [str(out), "6"], preset=PRESET, options={"depth": 3})
    seen = json.loads(out.read_text())
    assert seen["name"] == "__main__"
    assert seen["argv"] == [str(fake_upstream), str(out), "6"]
    assert seen["path0"] == str(fake_upstream.parent.resolve())
    assert seen["patched"] and seen["in_optimizer"]
    assert seen["criterion"] == "criterion"
    assert seen["depth"] == 3  # the user's option overrides the preset's
    assert seen["max_kv_tokens"] == 7  # read off the builder's arguments
    assert (sys.argv, sys.path[0]) == (argv, path0)
    setup = sys.modules[f"{PACKAGE}.setup"]
    assert setup.build_model is sys.modules[f"{PACKAGE}.model"].build_model  # unwrapped again


def test_cli_run_passes_options_and_the_script_arguments(fake_upstream: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    argv = ["run", "--preset", PRESET, "--max-tokens", "9", "--", str(fake_upstream), str(out), "4"]
    assert main(argv) == 0
    seen = json.loads(out.read_text())
    assert seen["argv"] == [str(fake_upstream), str(out), "4"]
    assert (seen["depth"], seen["max_kv_tokens"]) == (2, 9)


def test_a_second_run_in_the_same_process_patches_again(fake_upstream: Path, tmp_path: Path) -> None:
    for width in (4, 8):
        out = tmp_path / f"out{width}.json"
        launcher.run(fake_upstream, [str(out), str(width)], preset=PRESET)
        assert json.loads(out.read_text())["max_kv_tokens"] == width + 1


def test_a_script_that_never_builds_the_model_is_an_error(fake_upstream: Path, tmp_path: Path) -> None:
    script = tmp_path / "other.py"
    script.write_text("print('no model here')\n")
    with pytest.raises(LauncherError, match=r"finished without calling .*setup:build_model"):
        launcher.run(script, preset=PRESET)


def test_a_builder_that_returns_no_module_is_an_error(fake_upstream: Path, tmp_path: Path) -> None:
    with pytest.raises(LauncherError, match="not an nn.Module"):
        launcher.run(fake_upstream, [str(tmp_path / "o.json"), "4", "--not-a-model"], preset=PRESET)


def test_misuse_is_reported_with_the_fix(fake_upstream: Path, tmp_path: Path) -> None:
    with pytest.raises(LauncherError, match="does not exist"):
        launcher.run(tmp_path / "missing.py", preset=PRESET)
    with pytest.raises(lcaam_patch.UnknownAdapterError, match="no preset named 'nope'"):
        launcher.run(fake_upstream, preset="nope")
    with pytest.raises(LauncherError, match="names no model builder"):
        launcher.run(fake_upstream, preset="fake_no_builder")


def test_qd_detr_preset_wraps_upstreams_builder() -> None:
    assert launcher.builder_targets("qd_detr") == ("qd_detr.model:build_model",)
