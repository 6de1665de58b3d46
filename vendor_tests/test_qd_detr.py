"""QD-DETR with LCAAM: upstream's own training loop, run unmodified through the launcher.

Needs the submodule (`git submodule update --init integration/QD-DETR`) and upstream's
training dependencies (`pip install -e ".[test,qd-detr]"`); skips with that message
otherwise. The training run uses a small generator (depth 2, width 64) to stay within a
CPU budget; the identity-init comparison uses the paper's preset as it is.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from qd_detr_support import (
    ONE_LINE_PATCH,
    QD_DETR_ROOT,
    SKIP_MESSAGE,
    cpu_shims,
    missing_dependencies,
    submodule_present,
    train_arguments,
    upstream_on_path,
    upstream_options,
    write_dataset,
)
from torch import nn

import lcaam_patch
from lcaam_patch import is_lcaam_key

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not submodule_present(), reason=SKIP_MESSAGE)]

SUPPORT_SCRIPT = Path(__file__).with_name("qd_detr_support.py")
GENERATOR = {"depth": 2, "hidden": 64}
N_EPOCH = 5  # upstream evaluates (and saves its best checkpoint) every 5 epochs


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """What one launcher run of upstream's train.py left behind."""

    results_dir: Path
    output: str
    opt: Any
    unpatched_checkpoint: Path
    eval_path: Path
    wall_s: float


@pytest.fixture(scope="module")
def upstream() -> None:
    """Skip when upstream's training dependencies are not installed."""
    missing = missing_dependencies()
    if missing:
        pytest.skip(
            f'QD-DETR\'s training dependencies are missing ({", ".join(missing)}): pip install -e ".[test,qd-detr]"'
        )


def build_upstream_model(opt: Any) -> nn.Module:
    """`qd_detr.model.build_model(opt)`'s model (call inside `upstream_on_path`)."""
    from qd_detr.model import build_model

    model, _ = build_model(opt)
    return model


def load_checkpoint(path: Path) -> dict[str, Any]:
    """An upstream checkpoint, whose pickled options need the CPU shims' safe globals."""
    with cpu_shims():
        return torch.load(path, map_location="cpu")


def launch(script: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """`PYTHONPATH=. lcaam-patch run --preset qd_detr --depth 2 --hidden 64 -- SCRIPT ARGS`
    in the submodule, with the CPU shims."""
    generator = [f"--{name}={value}" for name, value in GENERATOR.items()]
    command = [sys.executable, str(SUPPORT_SCRIPT), "run", "--preset", "qd_detr", *generator]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [".", os.environ.get("PYTHONPATH")])),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return subprocess.run(
        [*command, "--", script, *arguments],
        cwd=QD_DETR_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )


@pytest.fixture(scope="module")
def training_run(upstream: None, tmp_path_factory: pytest.TempPathFactory) -> TrainingRun:
    """Train through `lcaam-patch run`, resuming from a checkpoint of the unpatched model."""
    root = tmp_path_factory.mktemp("qd_detr")
    data = write_dataset(root / "data", n_train=24, n_val=12)
    arguments = train_arguments(data, root / "results", n_epoch=N_EPOCH)
    with upstream_on_path():
        opt = upstream_options(arguments)
        torch.manual_seed(0)
        unpatched = build_upstream_model(opt)
    checkpoint = root / "unpatched.ckpt"
    torch.save({"model": unpatched.state_dict(), "epoch": 0, "opt": opt}, checkpoint)
    started = time.monotonic()
    result = launch("qd_detr/train.py", *arguments, "--resume", str(checkpoint))
    wall_s = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"upstream training failed:\n{output[-6000:]}"
    (results_dir,) = (root / "results").iterdir()
    return TrainingRun(results_dir, output, opt, checkpoint, data.eval_path, wall_s)


def patched_model(opt: Any) -> nn.Module:
    """The model the launcher trained: upstream's, patched as `lcaam-patch run` patches it."""
    with upstream_on_path():
        return lcaam_patch.apply(
            build_upstream_model(opt),
            preset="qd_detr",
            max_tokens=opt.max_v_l,
            max_kv_tokens=opt.max_q_l,
            **GENERATOR,
        )


def epoch_losses(results_dir: Path) -> list[float]:
    """`loss_overall` of every epoch in upstream's train.log.txt."""
    text = (results_dir / "train.log.txt").read_text()
    return [float(v) for v in re.findall(r"loss_overall (\S+)", text)]


def test_launcher_patches_the_model_before_upstream_resumes_an_unpatched_checkpoint(
    training_run: TrainingRun,
) -> None:
    output = training_run.output
    print(f"upstream train.py through the launcher: {training_run.wall_s:.1f} s")
    # train.py builds the model twice: for training, and to evaluate its best checkpoint
    assert output.count("lcaam-patch: patched 4 attention modules of QDDETR (preset 'qd_detr',") == 2
    assert f"Load checkpoint from {training_run.unpatched_checkpoint}" in output
    assert "Loaded model saved at epoch 0" in output


def test_losses_are_finite_and_fall(training_run: TrainingRun) -> None:
    losses = epoch_losses(training_run.results_dir)
    assert len(losses) == N_EPOCH
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]


def test_upstream_evaluation_wrote_its_metrics(training_run: TrainingRun) -> None:
    results = training_run.results_dir
    assert "[Metrics]" in (results / "eval.log.txt").read_text()
    for name in ("best_hl_val_preds_metrics.json", "hl_val_submission_metrics.json"):
        metrics = json.loads((results / name).read_text())
        for bucket in ("short", "middle", "long", "full"):
            assert bucket in metrics, f"{name}: no validation window in the {bucket} bucket"
        for key in ("MR-full-mAP", "MR-full-R1@0.7", "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1"):
            assert math.isfinite(metrics["brief"][key]), key
    for bucket in ("short", "middle", "long"):
        assert re.search(rf"{bucket}: \[\d+, \d+\], [1-9]\d*/12=", training_run.output), bucket


def test_best_checkpoint_holds_lcaam_weights_and_reloads_strictly(
    training_run: TrainingRun,
) -> None:
    checkpoint = load_checkpoint(training_run.results_dir / "model_best.ckpt")
    model = patched_model(training_run.opt)
    saved = {key for key in checkpoint["model"] if is_lcaam_key(key)}
    assert saved == set(lcaam_patch.lcaam_state_dict(model))
    assert {key.split(".lcaam.")[0] for key in saved} == {
        f"transformer.{stack}.layers.{i}.self_attn" for stack in ("t2v_encoder", "encoder") for i in (0, 1)
    }
    model.load_state_dict(checkpoint["model"], strict=True)


def test_upstream_inference_script_evaluates_the_patched_checkpoint(
    training_run: TrainingRun,
) -> None:
    best = training_run.results_dir / "model_best.ckpt"
    result = launch(
        "qd_detr/inference.py",
        *(
            "--resume",
            str(best),
            "--eval_split_name",
            "val",
            "--eval_path",
            str(training_run.eval_path),
        ),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"upstream inference failed:\n{output[-6000:]}"
    assert "lcaam-patch: patched 4 attention modules of QDDETR" in output
    assert "metrics_no_nms" in output


def test_lcaam_parameters_were_in_the_optimizer_and_trained(training_run: TrainingRun) -> None:
    checkpoint = load_checkpoint(training_run.results_dir / "model_best.ckpt")
    names = [name for name, p in patched_model(training_run.opt).named_parameters() if p.requires_grad]
    (group,) = checkpoint["optimizer"]["param_groups"]
    assert len(group["params"]) == len(names)
    state = checkpoint["optimizer"]["state"]
    weights = checkpoint["model"]
    lcaam = [(index, name) for index, name in zip(group["params"], names) if is_lcaam_key(name)]
    assert len(lcaam) == 4 * 2 * GENERATOR["depth"]
    for index, name in lcaam:
        assert state[index]["exp_avg"].shape == weights[name].shape, name
        assert state[index]["exp_avg"].abs().sum() > 0, f"{name} never got a gradient"
    for name, value in weights.items():
        if is_lcaam_key(name) and f"layers.{GENERATOR['depth'] - 1}." in name.split(".lcaam.")[1]:
            identity = torch.zeros_like(value) if name.endswith("weight") else torch.ones_like(value)
            assert not torch.equal(value, identity), f"{name} is still at its identity init"


def synthetic_batch(lengths: list[tuple[int, int]], opt: Any) -> dict[str, torch.Tensor]:
    """Model inputs as upstream's collate makes them: padded, masks 1 = valid."""
    generator = torch.Generator().manual_seed(0)
    batch, max_v, max_t = len(lengths), max(v for v, _ in lengths), max(t for _, t in lengths)
    inputs = {
        "src_txt": torch.randn(batch, max_t, opt.t_feat_dim, generator=generator),
        "src_txt_mask": torch.zeros(batch, max_t),
        "src_vid": torch.randn(batch, max_v, opt.v_feat_dim, generator=generator),
        "src_vid_mask": torch.zeros(batch, max_v),
    }
    for b, (v, t) in enumerate(lengths):
        inputs["src_vid_mask"][b, :v] = 1
        inputs["src_txt_mask"][b, :t] = 1
    return inputs


def test_identity_init_computes_what_upstream_computes(upstream: None, tmp_path: Path) -> None:
    data = write_dataset(tmp_path, n_train=1, n_val=1)
    with upstream_on_path():
        opt = upstream_options(train_arguments(data, tmp_path / "results", n_epoch=1))
        torch.manual_seed(0)
        model = build_upstream_model(opt).eval()
        patched = lcaam_patch.apply(copy.deepcopy(model), preset="qd_detr")
    assert [path for path, _, _ in lcaam_patch.patched_sites(patched)] == [
        f"transformer.{stack}.layers.{i}.self_attn" for stack in ("t2v_encoder", "encoder") for i in (0, 1)
    ]
    inputs = synthetic_batch([(37, 5), (20, 11), (28, 3)], opt)
    with cpu_shims(), torch.no_grad():
        expected, actual = model(**inputs), patched(**inputs)
    for key in ("pred_logits", "pred_spans", "saliency_scores", "saliency_scores_neg"):
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-5)


def test_t2v_attn_mask_rows_are_read_as_pytorch_reads_them(upstream: None, tmp_path: Path) -> None:
    """Upstream's T2V mask is `repeat`ed (rows h*B + b); PyTorch reads row b*H + h. The
    patched layer must give upstream's result, which differs from the intended one."""
    data = write_dataset(tmp_path, n_train=1, n_val=1)
    with upstream_on_path():
        opt = upstream_options(train_arguments(data, tmp_path / "results", n_epoch=1))
        torch.manual_seed(0)
        model = build_upstream_model(opt).eval()
        patched_whole = lcaam_patch.apply(copy.deepcopy(model), preset="qd_detr")
    attention = model.transformer.t2v_encoder.layers[0].self_attn
    patched = patched_whole.transformer.t2v_encoder.layers[0].self_attn
    lengths = [(9, 2), (4, 6), (7, 5)]
    heads, batch, lv, lt = attention.num_heads, len(lengths), 9, 6
    query_pad = torch.tensor([[i >= v for i in range(lv)] for v, _ in lengths])
    key_pad = torch.tensor([[j >= t for j in range(lt)] for _, t in lengths])
    pair_pad = query_pad.unsqueeze(2) & key_pad.unsqueeze(1)
    q, kv = torch.randn(lv, batch, attention.embed_dim), torch.randn(lt, batch, attention.embed_dim)
    with torch.no_grad():
        upstream_rows = attention(q, kv, kv, attn_mask=pair_pad.repeat(heads, 1, 1), key_padding_mask=key_pad)[0]
        intended_rows = attention(q, kv, kv, attn_mask=pair_pad.repeat_interleave(heads, 0), key_padding_mask=key_pad)[
            0
        ]
        patched_rows = patched(q, kv, kv, attn_mask=pair_pad.repeat(heads, 1, 1), key_padding_mask=key_pad)[0]
    assert not torch.allclose(upstream_rows, intended_rows, atol=1e-3)
    torch.testing.assert_close(patched_rows, upstream_rows, atol=1e-5, rtol=1e-5)


def test_one_line_patch_applies_at_the_pin_and_patches_setup_model(upstream: None, tmp_path: Path) -> None:
    """The one-line alternative: upstream's `setup_model` patches the model itself, before
    its optimizer and its strict load of an unpatched checkpoint."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to apply integration/patches/QD-DETR.patch")
    check = subprocess.run(
        ["git", "apply", "--check", str(ONE_LINE_PATCH)],
        cwd=QD_DETR_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    copy_root = tmp_path / "QD-DETR"
    shutil.copytree(QD_DETR_ROOT, copy_root, ignore=shutil.ignore_patterns(".git", "results", "run_on_video"))
    subprocess.run(["git", "apply", str(ONE_LINE_PATCH)], cwd=copy_root, check=True)
    data = write_dataset(tmp_path / "data", n_train=1, n_val=1)
    arguments = train_arguments(data, tmp_path / "results", n_epoch=1)
    with upstream_on_path(copy_root), cpu_shims():
        from qd_detr.inference import setup_model

        opt = upstream_options(arguments)
        checkpoint = tmp_path / "unpatched.ckpt"
        torch.save({"model": build_upstream_model(opt).state_dict(), "epoch": 0, "opt": opt}, checkpoint)
        opt.resume = str(checkpoint)
        model, _, optimizer, _ = setup_model(opt)
    assert len(lcaam_patch.patched_sites(model)) == 4
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    generators = [p for name, p in model.named_parameters() if is_lcaam_key(name)]
    assert generators and all(id(p) in optimized for p in generators)
