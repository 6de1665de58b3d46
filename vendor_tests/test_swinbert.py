"""SwinBERT with LCAAM: upstream's own VideoTransformer, optimizer builder, training loop,
checkpoint saver and decoding, on a tiny configuration on the CPU.

Needs the submodule (`git submodule update --init integration/SwinBERT`) and upstream's
pure-Python dependencies (`pip install -e ".[test,swinbert]"`); skips with that message
otherwise. deepspeed, apex, azureml, fairscale, tensorboardX and the download helpers are
replaced by test-only stubs (see `swinbert_support`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from swinbert_support import (
    MAX_SEQ_LENGTH,
    PATCH,
    PIN,
    SKIP_MESSAGE,
    SWINBERT_ROOT,
    TRAIN_SCRIPT,
    VIDEO_TOKENS,
    build_model,
    decode_inputs,
    missing_dependencies,
    submodule_present,
    tokenizer,
    train_batch,
    train_loader,
    training_arguments,
    training_script,
    upstream,
    videos,
)
from torch import nn

import lcaam_patch
from lcaam_patch import is_lcaam_key

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not submodule_present(), reason=SKIP_MESSAGE)]

SUPPORT_SCRIPT = Path(__file__).with_name("swinbert_support.py")
STATIC_LOGIT = 7.0  # sigmoid 0.9991: SwinBERT's (1 - m) * -10000 gives -9.1, a partly open mask
SPARSE_WEIGHT = 0.5  # upstream's --loss_sparse_w in its README's training commands
TRAIN_STEPS = 6
# The training run uses a 2-layer generator: with the preset's 16 layers and PyTorch's default
# Linear init, the 15 hidden ReLU layers wash the input out (the hidden states of two
# different videos agree to about 1e-6), so a few CPU steps could not show per-sample masks.
TRAIN_DEPTH = 2
# Parameters of upstream's model that its captioning loss never uses (BERT's pooler and the
# image-feature head), so that upstream itself needs them frozen under DDP without the
# unused-parameter search.
UPSTREAM_UNUSED = ("trans_encoder.bert.pooler.", "trans_encoder.cls_img_feat.")


@pytest.fixture(scope="module")
def up() -> Iterator[Any]:
    """SwinBERT's modules, imported under the test-only stubs (undone after the module)."""
    missing = missing_dependencies()
    if missing:
        pytest.skip(f'SwinBERT\'s dependencies are missing ({", ".join(missing)}): pip install -e ".[test,swinbert]"')
    with upstream() as namespace:
        yield namespace


@pytest.fixture(scope="module")
def tokens(up: Any) -> Any:
    """Upstream's BERT tokenizer with the vocabulary SwinBERT ships."""
    return tokenizer()


def video_block(model: nn.Module, run: Any) -> list[torch.Tensor]:
    """The video block of the mask each BERT call of `run()` received, one per call.

    Read off SwinBERT's `BertImgModel` input (`attention_mask`, before its
    `(1 - m) * -10000`), so it is exactly what the captioning transformer used.
    """
    seen: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs["attention_mask"]
        seen.append(mask[:, -VIDEO_TOKENS:, -VIDEO_TOKENS:].detach().clone())

    handle = model.trans_encoder.bert.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def set_static(model: nn.Module, value: float) -> None:
    """Make the generator output `value` everywhere, as `learn_vid_att` filled with it does."""
    last = model.lcaam.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(value)


def upstream_loss(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The loss upstream's `train()` backpropagates with `--learn_mask_enabled`."""
    return outputs[0] + SPARSE_WEIGHT * outputs[-1]


def test_patch_applies_at_the_pin_before_any_checkpoint_load(tmp_path: Path) -> None:
    head = subprocess.run(
        ["git", "-C", str(SWINBERT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    )
    assert head.stdout.strip() == PIN
    subprocess.run(["git", "-C", str(SWINBERT_ROOT), "apply", "--check", str(PATCH)], check=True)
    copy = tmp_path / TRAIN_SCRIPT.relative_to(SWINBERT_ROOT)
    copy.parent.mkdir(parents=True)
    shutil.copy(TRAIN_SCRIPT, copy)
    subprocess.run(["git", "apply", str(PATCH)], cwd=tmp_path, check=True)
    original, patched = TRAIN_SCRIPT.read_text().splitlines(), copy.read_text().splitlines()
    added = [i for i, line in enumerate(patched) if "lcaam_patch.apply(vl_transformer" in line]
    assert len(patched) == len(original) + 1 and len(added) == 1
    frozen = next(i for i, line in enumerate(patched) if "vl_transformer.freeze_backbone(" in line)
    loads = [i for i, line in enumerate(patched) if "vl_transformer.load_state_dict(" in line]
    transfers = [i for i, line in enumerate(patched) if "_attn_mask(" in line and "vl_transformer." in line]
    assert frozen + 1 == added[0] < min(loads + transfers)
    compile(copy.read_text(), str(copy), "exec")


@pytest.mark.parametrize("mode", ["global", "multilayer"])
@pytest.mark.parametrize("soft2hard", [False, True], ids=["soft", "soft2hard"])
def test_reproduces_upstream_with_the_static_mask(up: Any, tokens: Any, mode: str, soft2hard: bool) -> None:
    reference, patched = (build_model(sparse_mask_soft2hard=soft2hard) for _ in range(2))
    with torch.no_grad():
        reference.learn_vid_att.weight.fill_(STATIC_LOGIT)
    lcaam_patch.apply(patched, preset="swinbert", mode=mode, max_tokens=MAX_SEQ_LENGTH)
    set_static(patched, STATIC_LOGIT)
    expected_sites = 1 if mode == "global" else 3
    assert len(lcaam_patch.patched_sites(patched)) == expected_sites
    reference.eval()
    patched.eval()
    batch = train_batch(tokens, videos(2, seed=0), seed=0)
    expected, got = reference(**batch), patched(**batch)
    assert len(got) == len(expected) == 3
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)
    upstream_loss(expected).backward()
    upstream_loss(got).backward()
    ours = dict(patched.named_parameters())
    for name, parameter in reference.named_parameters():
        if parameter.grad is not None and name != "learn_vid_att.weight":
            torch.testing.assert_close(ours[name].grad, parameter.grad, rtol=1e-4, atol=1e-7, msg=name)
    # the generator's bias feeds every row: its gradient is the static mask's, summed over rows
    static_grad = reference.learn_vid_att.weight.grad.view(VIDEO_TOKENS, VIDEO_TOKENS).sum(0)
    torch.testing.assert_close(patched.lcaam.layers[-1].bias.grad, static_grad, rtol=1e-4, atol=1e-7)
    assert patched.learn_vid_att.weight.grad is None


@pytest.mark.parametrize("mode", ["global", "multilayer"])
def test_decoding_matches_upstream_with_the_static_mask(up: Any, tokens: Any, mode: str) -> None:
    reference, patched = build_model(), build_model()
    with torch.no_grad():
        reference.learn_vid_att.weight.fill_(STATIC_LOGIT)
    lcaam_patch.apply(patched, preset="swinbert", mode=mode, max_tokens=MAX_SEQ_LENGTH)
    set_static(patched, STATIC_LOGIT)
    reference.eval()
    patched.eval()
    clips = videos(2, seed=3)
    for cached in (False, True):
        for model in (reference, patched):
            model.trans_encoder.bert.encoder.output_hidden_states = cached
        for beams in (1, 2):
            with torch.no_grad():
                expected = reference(**decode_inputs(tokens, clips, num_beams=beams))
                got = patched(**decode_inputs(tokens, clips, num_beams=beams))
            assert torch.equal(got[0], expected[0]), (cached, beams)
            torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


@dataclasses.dataclass
class TrainedRun:
    """What upstream's training loop left behind for a model patched with the preset."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    initial_lcaam: dict[str, torch.Tensor]
    initial_static: torch.Tensor
    checkpoint_dir: Path
    wall_s: float


@pytest.fixture(scope="module")
def trained(up: Any, tokens: Any, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """Upstream's `mixed_precision_init` and `train()` run for a few steps on the CPU."""
    start = time.perf_counter()
    model = lcaam_patch.apply(build_model(), preset="swinbert", depth=TRAIN_DEPTH)
    initial = {k: v.clone() for k, v in lcaam_patch.lcaam_state_dict(model).items()}
    static = model.learn_vid_att.weight.detach().clone()
    output_dir = tmp_path_factory.mktemp("swinbert_run")
    script = training_script("compute_score_with_logits", "mixed_precision_init", "train")
    args = training_arguments(output_dir, steps=TRAIN_STEPS)
    args, model, optimizer, scheduler = script["mixed_precision_init"](args, model)
    loader = train_loader(tokens, steps=TRAIN_STEPS, batch_size=2)
    saver = up.load_save.TrainingSaver(str(output_dir))
    checkpoint_dir = script["train"](args, loader, None, model, tokens, saver, optimizer, scheduler)
    return TrainedRun(model, optimizer, initial, static, Path(checkpoint_dir), time.perf_counter() - start)


def test_lcaam_parameters_join_upstreams_optimizer_groups(trained: TrainedRun) -> None:
    groups = [{id(p) for p in group["params"]} for group in trained.optimizer.param_groups]
    decay_swin, decay_bert, no_decay_swin, no_decay_bert = groups
    for name, parameter in trained.model.named_parameters():
        if is_lcaam_key(name):
            assert id(parameter) in (decay_bert if name.endswith("weight") else no_decay_bert), name
            assert id(parameter) not in decay_swin | no_decay_swin, name
    rates = [group["initial_lr"] for group in trained.optimizer.param_groups]
    assert rates == [3e-4 * 0.05, 3e-4, 3e-4 * 0.05, 3e-4]  # the generator trains at the BERT rate


def test_training_moves_every_generator_tensor_and_freezes_the_static_mask(trained: TrainedRun) -> None:
    state = lcaam_patch.lcaam_state_dict(trained.model)
    assert state.keys() == trained.initial_lcaam.keys() and len(state) == 2 * TRAIN_DEPTH
    for key, before in trained.initial_lcaam.items():
        assert not torch.equal(state[key], before), f"{key} did not train"
    assert not trained.model.learn_vid_att.weight.requires_grad
    assert torch.equal(trained.model.learn_vid_att.weight, trained.initial_static)


def test_gradients_reach_the_generator(up: Any, tokens: Any, trained: TrainedRun) -> None:
    model = trained.model
    model.train()
    model.zero_grad()
    outputs = model(**train_batch(tokens, videos(2, seed=11), seed=11))
    upstream_loss(outputs).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if is_lcaam_key(name)}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads[f"lcaam.layers.{TRAIN_DEPTH - 1}.weight"].abs().sum() > 0
    assert grads["lcaam.layers.0.weight"].abs().sum() > 0
    assert model.learn_vid_att.weight.grad is None
    model.zero_grad()


def test_generated_mask_is_per_sample_with_swinberts_conventions(up: Any, tokens: Any, trained: TrainedRun) -> None:
    batch = train_batch(tokens, videos(2, seed=21), seed=21)
    fresh = lcaam_patch.apply(build_model(), preset="swinbert", depth=TRAIN_DEPTH)
    for model in (trained.model, fresh):
        model.eval()
    with torch.no_grad():
        (before,) = video_block(fresh, lambda: fresh(**batch))
        outputs: list[tuple[torch.Tensor, ...]] = []
        (after,) = video_block(trained.model, lambda: outputs.append(trained.model(**batch)))
    assert torch.equal(before[0], before[1])  # identity init: one mask for every sample
    assert (after[0] - after[1]).abs().max() > 1e-4  # trained: a mask per sample
    eye = torch.eye(VIDEO_TOKENS, dtype=torch.bool)
    assert torch.all(after[:, eye] == 1)
    assert torch.all((after >= 0) & (after <= 1))
    sparsity = outputs[0][-1]
    assert torch.isfinite(sparsity) and sparsity > 0
    torch.testing.assert_close(sparsity, after.masked_fill(eye, 0).abs().mean())
    hard = lcaam_patch.apply(build_model(sparse_mask_soft2hard=True), preset="swinbert", depth=TRAIN_DEPTH)
    hard.load_state_dict(trained.model.state_dict())
    hard.eval()
    with torch.no_grad():
        (binary,) = video_block(hard, lambda: hard(**batch))
    assert torch.equal(binary, (after >= 0.5).float())


@pytest.mark.parametrize("beams", [1, 2])
def test_decoding_carries_each_samples_mask_to_its_beams(up: Any, tokens: Any, trained: TrainedRun, beams: int) -> None:
    model = trained.model
    model.eval()
    encoded: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        encoded.append(kwargs["attention_mask"][:, -VIDEO_TOKENS:, -VIDEO_TOKENS:].clone())

    handle = model.trans_encoder.register_forward_pre_hook(keep, with_kwargs=True)
    outputs: list[tuple[torch.Tensor, ...]] = []
    try:
        with torch.no_grad():
            steps = video_block(
                model, lambda: outputs.append(model(**decode_inputs(tokens, videos(2, seed=4), num_beams=beams)))
            )
    finally:
        handle.remove()
    captions, logprobs, sparsity = outputs[0]
    assert captions.shape[:2] == (2, 1) and torch.isfinite(logprobs).all() and torch.isfinite(sparsity)
    generated = encoded[0]  # the VideoTransformer's call; generate() then calls the model per step
    assert (generated[0] - generated[1]).abs().max() > 1e-4
    assert len(steps) > 1
    for step in steps:
        assert torch.equal(step, generated.repeat_interleave(beams, dim=0))


def test_upstreams_checkpoint_reloads_into_a_patched_model(up: Any, tokens: Any, trained: TrainedRun) -> None:
    saved = torch.load(trained.checkpoint_dir / "model.bin", map_location="cpu")
    assert {k for k in saved if is_lcaam_key(k)} == set(trained.initial_lcaam)
    fresh = lcaam_patch.apply(build_model(), preset="swinbert", depth=TRAIN_DEPTH)
    result = fresh.load_state_dict(saved, strict=False)  # as upstream loads it
    assert not result.missing_keys and not result.unexpected_keys
    batch = train_batch(tokens, videos(2, seed=31), seed=31)
    for model in (fresh, trained.model):
        model.eval()
    with torch.no_grad():
        for want, have in zip(trained.model(**batch), fresh(**batch)):
            torch.testing.assert_close(have, want)
    unpatched = build_model().load_state_dict(saved, strict=False)
    assert sorted(unpatched.unexpected_keys) == sorted(trained.initial_lcaam)  # why the patch comes first


def _parameters_without_gradient(model: nn.Module, batch: dict[str, torch.Tensor]) -> set[str]:
    model.zero_grad()
    upstream_loss(model(**batch)).backward()
    return {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}


def _train_twice_under_ddp(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    for name, parameter in model.named_parameters():
        if name.startswith(UPSTREAM_UNUSED):
            parameter.requires_grad_(False)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        upstream_loss(ddp(**batch)).backward()
        optimizer.step()


def test_ddp_without_unused_parameter_search(up: Any, tokens: Any, tmp_path: Path) -> None:
    batch = train_batch(tokens, videos(2, seed=41), seed=41)
    unused = _parameters_without_gradient(build_model(), batch)
    assert unused and all(name.startswith(UPSTREAM_UNUSED) for name in unused)
    patched = lcaam_patch.apply(build_model(), preset="swinbert")
    assert _parameters_without_gradient(patched, batch) == unused  # learn_vid_att is frozen
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        _train_twice_under_ddp(patched, batch)
        replaced = lcaam_patch.apply(build_model(), preset="swinbert")
        replaced.random_init_attn_mask()  # upstream's transfer across frame counts: a fresh, trainable mask
        _train_twice_under_ddp(replaced, batch)
        assert torch.count_nonzero(replaced.learn_vid_att.weight.grad) == 0
        control = lcaam_patch.apply(build_model(), preset="swinbert")
        control.unused = nn.Linear(1, 1)
        with pytest.raises(RuntimeError, match="did not receive grad|finished reduction"):
            _train_twice_under_ddp(control, batch)
    finally:
        dist.destroy_process_group()


def test_remove_restores_upstream(up: Any, tokens: Any) -> None:
    reference, model = build_model(), build_model()
    lcaam_patch.apply(model, preset="swinbert", mode="multilayer", max_tokens=MAX_SEQ_LENGTH)
    assert not model.learn_vid_att.weight.requires_grad
    lcaam_patch.remove(model)
    assert model.learn_vid_att.weight.requires_grad
    assert model.state_dict().keys() == reference.state_dict().keys()
    batch = train_batch(tokens, videos(2, seed=51), seed=51)
    reference.eval()
    model.eval()
    with torch.no_grad():
        for want, have in zip(reference(**batch), model(**batch)):
            assert torch.equal(have, want)


def test_upstream_checkpoints_and_transfer_code_still_work(up: Any) -> None:
    pretrained = build_model()
    with torch.no_grad():
        pretrained.learn_vid_att.weight.normal_()
    checkpoint = pretrained.state_dict()
    model = lcaam_patch.apply(build_model(), preset="swinbert")
    model.load_state_dict(checkpoint, strict=True)  # only the LCAAM keys are missing, and forgiven
    assert torch.equal(model.learn_vid_att.weight, checkpoint["learn_vid_att.weight"])
    # run_caption_VidSwinBert.py's transfer paths: --transfer_method 1, --att_mask_expansion 0
    same_size = torch.randn(VIDEO_TOKENS * VIDEO_TOKENS, 1)
    model.reload_attn_mask(same_size)
    assert torch.equal(model.learn_vid_att.weight, same_size)
    half = VIDEO_TOKENS // 2
    fewer_frames = torch.randn(half * half, 1)
    model.diag_based_init_attn_mask(fewer_frames)
    grid = model.learn_vid_att.weight.view(VIDEO_TOKENS, VIDEO_TOKENS)
    for block in range(2):
        window = slice(block * half, (block + 1) * half)
        assert torch.equal(grid[window, window], fewer_frames.view(half, half))
    assert not model.learn_vid_att.weight.requires_grad


def test_bert_sites_place_text_and_video_columns_on_their_keys(up: Any, tokens: Any) -> None:
    model = lcaam_patch.apply(build_model(), preset="swinbert", mode="multilayer", max_tokens=MAX_SEQ_LENGTH)
    width = MAX_SEQ_LENGTH + VIDEO_TOKENS
    columns = 1.0 + torch.arange(width) / 100
    for path, module, _ in lcaam_patch.patched_sites(model):
        if path:
            with torch.no_grad():
                module.lcaam.layers[-1].weight.zero_()
                module.lcaam.layers[-1].bias.copy_(columns)
    model.eval()
    text, video = columns[:MAX_SEQ_LENGTH], columns[MAX_SEQ_LENGTH:]
    for cached in (False, True):
        model.trans_encoder.bert.encoder.output_hidden_states = cached
        with lcaam_patch.capture(model) as seen, torch.no_grad():
            model(**decode_inputs(tokens, videos(2, seed=61), num_beams=2))
        masks = seen.masks["trans_encoder.bert.encoder.layer.0.attention.self"]
        assert len(masks) > 2
        for call, mask in enumerate(masks):
            keys = mask.shape[-1] - VIDEO_TOKENS
            history = cached and call > 0
            expected = torch.cat([video, text[:keys]] if history else [text[:keys], video])
            assert torch.equal(mask, expected.expand_as(mask)), (cached, call)


def test_modes_without_the_learnable_mask(up: Any, tokens: Any) -> None:
    plain = build_model(learn_mask_enabled=False)
    with pytest.raises(lcaam_patch.UnsupportedModuleError, match="learn_mask_enabled"):
        lcaam_patch.apply(plain, preset="swinbert")
    assert not lcaam_patch.is_patched(plain)
    lcaam_patch.apply(plain, preset="swinbert", mode="multilayer", max_tokens=MAX_SEQ_LENGTH)
    assert [path for path, _, _ in lcaam_patch.patched_sites(plain)] == [
        f"trans_encoder.bert.encoder.layer.{i}.attention.self" for i in range(2)
    ]
    plain.eval()
    with torch.no_grad():
        assert len(plain(**train_batch(tokens, videos(2, seed=71), seed=71))) == 2  # no sparsity loss


def test_survey_and_option_errors(up: Any, tokens: Any) -> None:
    model = build_model()
    statuses = {e.path: e.status for e in lcaam_patch.survey(model, preset="swinbert") if e.adapter == "swinbert"}
    assert statuses.pop("") == "patch" and set(statuses.values()) == {"filtered"} and len(statuses) == 2
    with pytest.raises(lcaam_patch.InvalidOptionError, match="max_tokens"):
        lcaam_patch.apply(model, preset="swinbert", max_kv_tokens=20)
    short = lcaam_patch.apply(model, preset="swinbert", mode="multilayer", max_tokens=4)
    with pytest.raises(lcaam_patch.SequenceTooLongError, match="max_tokens=12"):
        short(**train_batch(tokens, videos(2, seed=81), seed=81))


def test_launcher_patches_the_model_the_script_builds(tmp_path: Path) -> None:
    driver = tmp_path / "build_swinbert.py"
    report = tmp_path / "report.json"
    driver.write_text(
        f"""\
import json, sys
sys.path.insert(0, {str(SUPPORT_SCRIPT.parent)!r})
import swinbert_support as support
sys.path.insert(0, str(support.SWINBERT_ROOT))  # as upstream's script puts its root first
import lcaam_patch
from src.modeling.video_captioning_e2e_vid_swin_bert import VideoTransformer

args = support.model_arguments()
config, swin_model, bert_model = support.build_parts(args)
vl_transformer = VideoTransformer(args, config, swin_model, bert_model)
vl_transformer.freeze_backbone(freeze=args.freeze_backbone)
batch = support.train_batch(support.tokenizer(), support.videos(2, seed=0), seed=0)
outputs = vl_transformer(**batch)
json.dump({{
    "sites": {{p: s.geometry.max_kv_tokens for p, _, s in lcaam_patch.patched_sites(vl_transformer)}},
    "static_mask_trainable": vl_transformer.learn_vid_att.weight.requires_grad,
    "sparsity": float(outputs[-1]),
}}, open(sys.argv[1], "w"))
"""
    )
    command = [sys.executable, str(SUPPORT_SCRIPT), "run", "--preset", "swinbert", "--mode", "multilayer"]
    done = subprocess.run(
        [*command, "--", str(driver), str(report)], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "patched 3 attention modules of VideoTransformer (preset 'swinbert'," in done.stderr
    result = json.loads(report.read_text())
    bert_bound = MAX_SEQ_LENGTH + VIDEO_TOKENS  # max(--max_seq_length, --max_gen_length) + M
    assert result["sites"] == {
        "": VIDEO_TOKENS,
        "trans_encoder.bert.encoder.layer.0.attention.self": bert_bound,
        "trans_encoder.bert.encoder.layer.1.attention.self": bert_bound,
    }
    assert result["static_mask_trainable"] is False and result["sparsity"] > 0
