"""LLaMA-Adapter V2 multimodal (integration/LLaMA-Adapter at 521a09d), patched with LCAAM.

Upstream's own `LLaMA_adapter`, built with a tiny config on the CPU (stubs: see
`llama_adapter_support`), trained with its own `train_one_epoch`, saved and loaded with its
own `misc`. Skips when the submodule is not checked out.
"""

from __future__ import annotations

import ast
import copy
import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import lcaam_patch
from lcaam_patch.errors import UnsupportedModuleError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_adapter_support as support

if not support.submodule_present():
    pytest.skip(support.SKIP_MESSAGE, allow_module_level=True)
pytest.importorskip("timm", reason="LLaMA-Adapter's visual blocks are timm Blocks: pip install timm")

VISUAL = ["visual_blocks.0.attn", "visual_blocks.1.attn"]
CLIP = ["clip.visual.transformer.resblocks.0.attn", "clip.visual.transformer.resblocks.1.attn"]
LLAMA = ["llama.layers.0.attention", "llama.layers.1.attention"]
TINY_VISUAL_TOKENS = support.TINY_MODEL["query_len"] + support.CLIP_TOKENS


@pytest.fixture(scope="module", autouse=True)
def upstream() -> Iterator[None]:
    with support.stubs(), support.upstream_on_path():
        yield


@pytest.fixture
def build(tmp_path: Path):
    def make(phase: str = "pretrain", seed: int = 0, **overrides: object) -> nn.Module:
        torch.manual_seed(seed)
        model = support.build_model(tmp_path / "llama", phase, **overrides)
        support.open_gates(model)
        return model

    return make


def run(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's training forward: the loss and the LLaMA logits it came from."""
    seen: list[torch.Tensor] = []
    handle = model.llama.output.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        loss, _ = model(batch[0], batch[1], batch[3])
    finally:
        handle.remove()
    return loss, seen[0]


def site_paths(model: nn.Module) -> list[str]:
    return [path for path, _, _ in lcaam_patch.patched_sites(model)]


@pytest.mark.parametrize(
    ("preset", "expected"),
    [("llama_adapter", VISUAL), ("llama_adapter_clip", CLIP + VISUAL), ("llama_adapter_llm", VISUAL + LLAMA)],
)
def test_presets_patch_the_sites_they_name(build, preset, expected):
    model = lcaam_patch.apply(build(), preset=preset)
    assert site_paths(model) == expected
    depth = {"llama_adapter": 16}.get(preset, 1)
    bounds = {
        "visual": TINY_VISUAL_TOKENS,
        "clip": support.CLIP_TOKENS,
        "llama": support.TINY_MODEL["max_seq_len"],
    }
    for path, _, site in lcaam_patch.patched_sites(model):
        assert site.adapter.name == "llama_adapter"
        kind = "visual" if path.startswith("visual") else path.split(".")[0]
        assert (site.geometry.max_q_tokens, site.geometry.max_kv_tokens, site.geometry.kind) == (
            bounds[kind],
            bounds[kind],
            "self",
        )
        assert len(lcaam_patch.site.generator_of(model.get_submodule(path)).layers) == depth


def test_without_a_preset_every_attention_is_patched_with_bounds_read_off_the_model(build):
    model = lcaam_patch.apply(build())
    assert site_paths(model) == CLIP + VISUAL + LLAMA


@pytest.mark.parametrize(
    ("phase", "options"),
    [("pretrain", {}), ("finetune", {"w_lora": True, "w_new_gate": True, "lora_rank": 4})],
)
def test_identity_init_computes_what_upstream_computes(build, phase, options):
    model = build(phase, **options)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name or name.endswith("new_gate"):
                parameter.normal_(0.0, 0.2)
    batch = support.synthetic_batches(model, 1)[0]
    reference_loss, reference_logits = run(model, batch)
    patched = lcaam_patch.apply(copy.deepcopy(model), targets=support.ALL_TARGETS, depth=3)
    loss, logits = run(patched, batch)
    torch.testing.assert_close(logits, reference_logits)
    torch.testing.assert_close(loss, reference_loss)
    lcaam_patch.remove(patched)
    assert "get_trainable_params" not in vars(patched)
    torch.testing.assert_close(run(patched, batch)[1], reference_logits)


def test_every_site_runs_patched_although_llama_calls_attention_forward_directly(build):
    model = build()
    batch = support.synthetic_batches(model, 1)[0]
    _, reference_logits = run(model, batch)
    patched = lcaam_patch.apply(copy.deepcopy(model), targets=support.ALL_TARGETS, init="default")
    hook_calls: list[str] = []
    attention = patched.llama.layers[0].attention
    attention.register_forward_hook(lambda module, args, out: hook_calls.append("called"))
    with lcaam_patch.capture(patched) as seen:
        _, logits = run(patched, batch)
    assert sorted(seen.masks) == sorted(CLIP + VISUAL + LLAMA)
    assert hook_calls == [], "upstream calls attention.forward(...) directly: hooks never fire"
    assert attention.forward.func is lcaam_patch.site.patched_forward
    assert not torch.allclose(logits, reference_logits, atol=1e-3)


def _attention_inputs(model: nn.Module, seqlen: int = 6) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    x = torch.randn(2, seqlen, support.LLAMA_PARAMS["dim"])
    freqs = model.llama.freqs_cis[:seqlen]
    mask = torch.triu(torch.full((1, 1, seqlen, seqlen), float("-inf")), diagonal=1)
    prompt = torch.randn(2, support.TINY_MODEL["query_len"], support.LLAMA_PARAMS["dim"])
    return x, freqs, mask, prompt


def test_llama_mask_is_fused_before_the_causal_mask_and_spares_the_adapter_prompt(build):
    model = lcaam_patch.apply(build("finetune"), preset="llama_adapter_llm")
    attention = model.llama.layers[1].attention
    with torch.no_grad():
        attention.lcaam.layers[-1].bias.zero_()
        attention.wo.bias.normal_()
    x, freqs, mask, prompt = _attention_inputs(model)
    upstream_forward = type(attention).forward
    # M = 0 under mul: every score is 0 before the causal mask, so each query averages the
    # values of the keys up to itself (fused after the mask, 0 * -inf would give NaN).
    values = attention.wv(x)
    causal_mean = values.cumsum(dim=1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)
    torch.testing.assert_close(attention.forward(x, 0, freqs, mask), attention.wo(causal_mean))
    # the adapter-prompt attention adds exactly what it adds upstream, whatever M is
    prompt_part = attention.forward(x, 0, freqs, mask, prompt) - attention.forward(x, 0, freqs, mask)
    upstream_part = upstream_forward(attention, x, 0, freqs, mask, prompt) - upstream_forward(
        attention, x, 0, freqs, mask
    )
    assert prompt_part.abs().max() > 1e-3
    torch.testing.assert_close(prompt_part, upstream_part)


def test_llama_attention_without_a_mask_is_refused(build):
    model = lcaam_patch.apply(build(), preset="llama_adapter_llm")
    x, freqs, _, _ = _attention_inputs(model, seqlen=1)
    with pytest.raises(UnsupportedModuleError, match="without a mask"):
        model.llama.layers[0].attention.forward(x, 0, freqs, None)


def _generate_logits(model: nn.Module, tokens: torch.Tensor, images: torch.Tensor, prefix: int) -> list[torch.Tensor]:
    """Upstream's `forward_inference` as `generate` calls it: the prompt, then one token at a time."""
    visual_query = model.forward_visual(images)
    logits = [model.forward_inference(visual_query, tokens[:, :prefix], 0)]
    for position in range(prefix, tokens.shape[1]):
        logits.append(model.forward_inference(visual_query, tokens[:, position : position + 1], position))
    return logits


@pytest.mark.parametrize("options", [{}, {"generator": "lowrank", "rank": 2}], ids=["mlp", "lowrank"])
def test_kv_cache_generation_with_lcaam(build, options):
    model = build().eval()
    batch = support.synthetic_batches(model, 1)[0]
    tokens, images = batch[0][:, :12], batch[3]
    reference = _generate_logits(model, tokens, images, prefix=8)
    identity = lcaam_patch.apply(copy.deepcopy(model), targets=support.ALL_TARGETS, **options).eval()
    for got, expected in zip(_generate_logits(identity, tokens, images, prefix=8), reference):
        torch.testing.assert_close(got, expected)
    trained = lcaam_patch.apply(copy.deepcopy(model), targets=support.ALL_TARGETS, init="default", **options).eval()
    step_by_step = _generate_logits(trained, tokens, images, prefix=8)[-1]
    whole = trained.forward_inference(trained.forward_visual(images), tokens, 0)
    torch.testing.assert_close(step_by_step, whole)
    assert not torch.allclose(whole, reference[-1], atol=1e-3)
    lcaam_patch.remove(trained)
    assert not any("_lcaam" in name for module in trained.modules() for name in vars(module))


def _upstream_substrings(model: nn.Module) -> set[str]:
    """The string constants of upstream's `get_trainable_params`: the substrings it freezes by."""
    tree = ast.parse(inspect.getsource(type(model).get_trainable_params).strip())
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_lcaam_stays_trainable_whatever_upstream_freezes(build, phase):
    model = build(phase)
    upstream_trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lcaam_patch.apply(model, preset="llama_adapter", targets=support.ALL_TARGETS)
    lcaam = support.lcaam_parameters(model)
    assert len(lcaam) == 6 * 16 * 2
    for _ in range(2):
        assert all(p.requires_grad and p.dtype == torch.float32 for p in lcaam.values())
        others = {name for name, p in model.named_parameters() if p.requires_grad and name not in lcaam}
        assert others == upstream_trainable
        model.get_trainable_params(phase)
    substrings = _upstream_substrings(model) - {"finetune", "pretrain"}
    assert {"gate", "visual_blocks", "norm", "bias"} <= substrings
    assert not any(s in "lcaam.layers" for s in substrings)
    clone = copy.deepcopy(model)
    clone.get_trainable_params(phase)
    assert all(p.requires_grad for p in support.lcaam_parameters(clone).values())
    assert clone.get_trainable_params.args[0] is clone


def test_generators_are_fp32_and_read_fp16_inputs(build):
    model = build()
    model.llama.half()
    model.clip.half()
    lcaam_patch.apply(model, targets=support.ALL_TARGETS)
    assert {p.dtype for p in support.lcaam_parameters(model).values()} == {torch.float32}
    attention = model.llama.layers[0].attention
    x, freqs, mask, _ = _attention_inputs(model)
    out = attention.forward(x.half(), 0, freqs, mask.half())
    expected = type(attention).forward(attention, x.half(), 0, freqs, mask.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
    tokens = torch.randn(support.CLIP_TOKENS, 2, support.CLIP_WIDTH, dtype=torch.float16)
    transformer = model.clip.visual.transformer
    assert transformer(tokens).dtype == torch.float16


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_upstream_training_trains_lcaam_and_its_checkpoints_keep_it(build, tmp_path, phase):
    from util import misc

    engine = __import__(f"engine_{phase}")
    model = lcaam_patch.apply(build(phase), preset="llama_adapter", targets=support.ALL_TARGETS)
    args = support.training_args(tmp_path / "out")
    (tmp_path / "out").mkdir()
    groups = misc.add_weight_decay(model, args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    scaler = misc.NativeScalerWithGradNormCount()
    lcaam = support.lcaam_parameters(model)
    no_decay, decay = ({id(p) for p in group["params"]} for group in groups)
    for name, parameter in lcaam.items():
        assert id(parameter) in (no_decay if name.endswith(".bias") else decay), name
    before = {name: p.detach().clone() for name, p in lcaam.items()}
    stats = engine.train_one_epoch(
        model, support.synthetic_batches(model, 3), optimizer, torch.device("cpu"), 0, scaler, args=args
    )
    assert torch.isfinite(torch.tensor(stats["closs"]))
    unchanged = [name for name, p in lcaam.items() if torch.equal(p.detach(), before[name])]
    assert unchanged == []
    misc.save_model(args=args, epoch=0, model=model, model_without_ddp=model, optimizer=optimizer, loss_scaler=scaler)
    fresh = lcaam_patch.apply(build(phase, seed=1), preset="llama_adapter", targets=support.ALL_TARGETS)
    misc.load_model(fresh, str(tmp_path / "out" / "checkpoint-0.pth"))
    for name, parameter in support.lcaam_parameters(fresh).items():
        torch.testing.assert_close(parameter, lcaam[name], msg=name)


def test_adapter_export_with_lcaam_keys_loads_as_llama_load_does(build, tmp_path):
    model = lcaam_patch.apply(build("finetune"), targets=support.ALL_TARGETS, init="default")
    state = model.state_dict()
    upstream_keys = [
        name for name, p in model.named_parameters() if p.requires_grad and name not in support.lcaam_parameters(model)
    ]
    small = {key: state[key] for key in upstream_keys}
    small.update(lcaam_patch.lcaam_state_dict(model))
    torch.save(
        {"model": small, "config": {"w_bias": True, "w_lora": False, "lora_rank": 16}},
        tmp_path / "adapter.pth",
    )
    checkpoint = torch.load(tmp_path / "adapter.pth", map_location="cpu")
    patched = lcaam_patch.apply(build("finetune", seed=1), targets=support.ALL_TARGETS)
    assert patched.load_state_dict(checkpoint["model"], strict=False).unexpected_keys == []
    for key, value in lcaam_patch.lcaam_state_dict(model).items():
        torch.testing.assert_close(patched.state_dict()[key], value)
    unpatched = build("finetune", seed=1)
    unexpected = unpatched.load_state_dict(checkpoint["model"], strict=False).unexpected_keys
    assert sorted(unexpected) == sorted(lcaam_patch.lcaam_state_dict(model))


def _checked_out_source(git: str, relative: str) -> str:
    """A file of the submodule as committed at its checked-out pin (the work tree may carry
    the patch already), or as in the work tree where the submodule is no git checkout."""
    if (support.SUBMODULE / ".git").exists():
        shown = subprocess.run(
            [git, "show", f"HEAD:{relative}"],
            cwd=support.SUBMODULE,
            capture_output=True,
            text=True,
            check=False,
        )
        if shown.returncode == 0:
            return shown.stdout
    return (support.SUBMODULE / relative).read_text()


def test_the_patch_applies_at_the_pin_right_after_the_model_is_built(tmp_path):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    scripts = [f"{support.UPSTREAM.name}/{name}" for name in ("main_pretrain.py", "main_finetune.py")]
    (tmp_path / support.UPSTREAM.name).mkdir()
    for script in scripts:
        (tmp_path / script).write_text(_checked_out_source(git, script))
    subprocess.run([git, "apply", str(support.PATCH)], cwd=tmp_path, check=True)
    for script in scripts:
        lines = (tmp_path / script).read_text().splitlines()
        built = next(i for i, line in enumerate(lines) if "= LLaMA_adapter(" in line)
        assert (
            lines[built + 1].strip() == 'import lcaam_patch; model = lcaam_patch.apply(model, preset="llama_adapter")'
        )
        later = [
            next(i for i, line in enumerate(lines) if needle in line)
            for needle in ("model.to(device)", "DistributedDataParallel", "add_weight_decay")
        ]
        assert built + 1 < min(later)
        assert "from llama.llama_adapter import LLaMA_adapter" in lines, (
            "the launcher wraps llama.llama_adapter:LLaMA_adapter"
        )
    if (support.SUBMODULE / ".git").exists():
        subprocess.run([git, "apply", "--check", "--cached", str(support.PATCH)], cwd=support.SUBMODULE, check=True)


def test_launcher_patches_the_model_of_upstreams_pretraining_steps(tmp_path):
    script = Path(support.__file__)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    command = [
        sys.executable,
        str(script),
        "run",
        "--preset",
        "llama_adapter",
        "--",
        str(script),
        "pretrain",
        "--workdir",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "lcaam-patch: patched 2 attention modules of LLaMA_adapter (preset 'llama_adapter'," in result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["patched_at_build"] == VISUAL
    assert len(report["lcaam_parameters"]) == 2 * 16 * 2
    assert report["in_weight_decay_groups"] == report["lcaam_parameters"]
    assert report["changed"] == report["lcaam_parameters"]
    with support.stubs():
        saved = torch.load(tmp_path / "checkpoint-0.pth", map_location="cpu")["model"]
    assert sorted(key for key in saved if ".lcaam." in key) == report["lcaam_parameters"]
