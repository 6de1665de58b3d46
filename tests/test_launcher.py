"""The launcher (`lcaam-patch run`) on a fake upstream: a package whose setup function
builds a model through a module-global builder, and a training script that uses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from torch import nn

import lcaam_patch
from lcaam_patch import LauncherError
from lcaam_patch.adapters import registry
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


USER_MODEL = """
from torch import nn

def build(width):
    return nn.Sequential(nn.MultiheadAttention(width, 2, batch_first=True))
"""

USER_SCRIPT = """
import sys

import lcaam_patch
from user_model import build

model = build(8)
print("patched" if lcaam_patch.is_patched(model) else "unpatched")
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture
def user_script(tmp_path: Path) -> Path:
    """A user's script whose builder lives in a module beside it."""
    (tmp_path / "user_model.py").write_text(textwrap.dedent(USER_MODEL))
    script = tmp_path / "train_mine.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    yield script
    sys.modules.pop("user_model", None)


def test_builder_flag_patches_a_user_script_and_keeps_its_exit_status(user_script: Path, capsys) -> None:
    argv = ["run", "--builder", "user_model:build", "--max-tokens", "8", "--", str(user_script), "3"]
    assert main(argv) == 3
    captured = capsys.readouterr()
    assert captured.out.strip() == "patched"
    assert "patched 1 attention modules of Sequential (preset None, builder user_model:build)" in captured.err


def test_a_script_that_exits_0_without_building_is_still_reported(tmp_path: Path, capsys) -> None:
    script = tmp_path / "quits.py"
    script.write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(LauncherError, match=r"finished without calling user_model:build, so nothing was patched"):
        launcher.run(script, builders=["user_model:build"])
    with pytest.raises(SystemExit) as exited:
        main(["run", "--builder", "user_model:build", "--", str(script)])
    assert exited.value.code == 2
    assert "lcaam-patch run: " in capsys.readouterr().err


def test_a_child_process_patches_through_the_environment(user_script: Path) -> None:
    """`python SCRIPT` as the command: the bootstrap's sitecustomize patches in the child."""
    env = {**os.environ, "PYTHONPATH": str(Path(lcaam_patch.__file__).parents[1])}
    command = [sys.executable, "-m", "lcaam_patch", "run", "--builder", "user_model:build", "--max-tokens", "8"]
    done = subprocess.run(
        [*command, "--", "python", user_script.name, "0"],
        cwd=user_script.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "patched"), done.stderr
    assert "lcaam-patch run: process" in done.stderr and "patched Sequential (1 sites)" in done.stderr


def test_commands_and_builders_that_cannot_run_are_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(LauncherError, match="needs --preset NAME or --builder"):
        launcher.run(tmp_path / "x.py")
    with pytest.raises(LauncherError, match="neither a script nor found on PATH"):
        launcher.run("no-such-launcher-xyz", builders=["a:b"])
    with pytest.raises(LauncherError, match="is not 'module:attribute'"):
        launcher.run(tmp_path / "x.py", builders=["nocolon"])


def test_generic_presets_declare_their_builders() -> None:
    assert launcher.builder_targets("timm_vit")[0] == "timm.models._factory:create_model"
    assert launcher.builder_targets("transformers") == (
        "transformers.modeling_utils:PreTrainedModel.from_pretrained",
        "transformers.modeling_utils:PreTrainedModel._from_config",
        "transformers.modeling_utils:PreTrainedModel.__init__",
    )


def test_a_preset_name_clash_is_won_by_the_highest_priority(fake_upstream: Path) -> None:
    class Low(FakeAdapter):
        name, priority, presets = "fake_low", -5, {PRESET: {"depth": 9}}

    lcaam_patch.register_adapter(Low())
    try:
        assert registry.preset_adapter(PRESET).name == PRESET
        assert registry.presets()[PRESET] == {"depth": 2} == registry.get_preset(PRESET)
    finally:
        lcaam_patch.unregister_adapter("fake_low")


TIMM_CHECKPOINT_SCRIPT = """
import sys

import timm
import torch

model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                          checkpoint_path=sys.argv[1])
torch.save(model.state_dict(), sys.argv[2])
"""


def test_timm_checkpoint_path_loads_lcaam_into_the_patched_model(tmp_path: Path, capsys) -> None:
    import timm
    import torch

    plain = tmp_path / "plain.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32,
                                 num_heads=2).state_dict(), plain)  # fmt: skip
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent(TIMM_CHECKPOINT_SCRIPT))
    launcher.run(script, [str(plain), str(tmp_path / "patched.pth")], preset="timm_vit")
    assert f"the checkpoint {plain} holds no LCAAM weights: LCAAM starts at its init" in capsys.readouterr().err
    trained = torch.load(tmp_path / "patched.pth")
    trained = {k: v + 0.5 if lcaam_patch.is_lcaam_key(k) else v for k, v in trained.items()}
    torch.save(trained, tmp_path / "trained.pth")
    launcher.run(script, [str(tmp_path / "trained.pth"), str(tmp_path / "again.pth")], preset="timm_vit")
    assert "loaded 2 LCAAM weights from the checkpoint" in capsys.readouterr().err
    again = torch.load(tmp_path / "again.pth")
    assert all(torch.equal(again[k], v) for k, v in trained.items() if lcaam_patch.is_lcaam_key(k))


def tiny_llama_directory(directory: Path) -> Path:
    """A saved tiny Llama (no LCAAM)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_transformers_from_pretrained_loads_lcaam_saved_beside_or_inside(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from lcaam_patch.adapters.transformers import builders

    directory = tiny_llama_directory(tmp_path / "llama")
    assert builders.SAVED_CONFIG == lcaam_patch.pretrained.CONFIG_NAME
    session = launcher.Session(
        launcher.Plan("transformers", launcher.builder_targets("transformers"), {}, str(tmp_path))
    )
    session.install()
    try:
        model = AutoModelForCausalLM.from_pretrained(directory)
        assert lcaam_patch.is_patched(model) and "starts at its init" in session.patched[-1]["weights"]
        state = {k: v + 0.25 if lcaam_patch.is_lcaam_key(k) else v for k, v in model.state_dict().items()}
        save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
        model = AutoModelForCausalLM.from_pretrained(directory)
        assert "loaded 2 LCAAM weights" in session.patched[-1]["weights"]
        for key, value in lcaam_patch.lcaam_state_dict(model).items():
            torch.testing.assert_close(value, state[key])
        lcaam_patch.save_pretrained(model, tmp_path / "saved")
        for name in ("lcaam.json", "lcaam.safetensors"):
            (directory / name).write_bytes((tmp_path / "saved" / name).read_bytes())
        model = AutoModelForCausalLM.from_pretrained(directory)
        assert "patched as saved in" in session.patched[-1]["weights"]
        (directory / "lcaam.json").unlink()
        broken = {k: torch.full_like(v, float("nan")) if lcaam_patch.is_lcaam_key(k) else v for k, v in state.items()}
        save_file({k: v.contiguous() for k, v in broken.items()}, directory / "model.safetensors")
        with pytest.raises(LauncherError, match="NaN or infinite"):
            AutoModelForCausalLM.from_pretrained(directory)
        assert set(load_file(directory / "model.safetensors")) == set(state)
    finally:
        session.uninstall()


CONSTRUCTED_SOURCE = """
from torch import nn

class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)

class Stack(Block):
    def __init__(self, width):
        super().__init__(width)
        self.inner = Block(width)  # built inside another's constructor: left to the outer one
        self.head = nn.MultiheadAttention(width, 2, batch_first=True)  # after super().__init__()

class Renamed(Block):  # no __init__ of its own
    pass
"""


def test_a_constructor_builder_patches_the_outermost_instance_of_the_class_and_its_subclasses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "constructed_model.py").write_text(textwrap.dedent(CONSTRUCTED_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    plan = launcher.Plan(None, ("constructed_model:Block.__init__",), {"max_tokens": 8}, str(tmp_path))
    session = launcher.Session(plan)
    session.install()
    try:
        import constructed_model

        block = constructed_model.Block(8)
        stack = constructed_model.Stack(8)

        class Later(constructed_model.Stack):  # defined after the builder was wrapped
            def __init__(self, width: int) -> None:
                super().__init__(width)
                self.tail = nn.MultiheadAttention(width, 2, batch_first=True)

        later = Later(8)
        assert [(p["model"], p["sites"]) for p in session.patched] == [("Block", 1), ("Stack", 3), ("Later", 4)]
        assert {site[0] for site in lcaam_patch.patched_sites(later)} == {"attn", "inner.attn", "head", "tail"}
        assert lcaam_patch.is_patched(block) and lcaam_patch.is_patched(stack)
    finally:
        session.uninstall()
        sys.modules.pop("constructed_model", None)
    assert "__init_subclass__" not in vars(constructed_model.Block)
    assert not lcaam_patch.is_patched(constructed_model.Stack(8)) and not lcaam_patch.is_patched(Later(8))
    inherited = launcher.Session(launcher.Plan(None, ("constructed_model:Renamed.__init__",), {"max_tokens": 8}, ""))
    inherited.install()
    try:
        import constructed_model as reimported

        assert lcaam_patch.is_patched(reimported.Renamed(8))
        assert not lcaam_patch.is_patched(reimported.Block(8))
    finally:
        inherited.uninstall()
        sys.modules.pop("constructed_model", None)
    assert "__init__" not in vars(reimported.Renamed)


def test_transformers_model_classes_called_directly_are_patched_once(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)  # fmt: skip
    session = launcher.Session(
        launcher.Plan("transformers", launcher.builder_targets("transformers"), {}, str(tmp_path))
    )
    session.install()
    try:
        direct = LlamaForCausalLM(config)

        class WithValueHead(LlamaForCausalLM):
            def __init__(self, config: LlamaConfig) -> None:
                super().__init__(config)
                self.value_head = nn.Linear(config.hidden_size, 1)

        headed = WithValueHead(config)
        auto = AutoModelForCausalLM.from_config(config)
        builders = [(p["model"], p["sites"], p["builder"].rpartition(".")[2]) for p in session.patched]
        assert builders == [
            ("LlamaForCausalLM", 2, "__init__"),
            ("WithValueHead", 2, "__init__"),
            ("LlamaForCausalLM", 2, "_from_config"),
        ]  # the LlamaModel inside each is left to its outer model
        assert all(lcaam_patch.is_patched(model) for model in (direct, headed, auto))
        assert "the builder loaded no checkpoint" in session.patched[0]["weights"]
    finally:
        session.uninstall()
    assert not lcaam_patch.is_patched(LlamaForCausalLM(config))
