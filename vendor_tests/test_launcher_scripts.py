"""`lcaam-patch run` on real training scripts, unmodified, offline on the CPU. Neither timm's
`train.py`/`validate.py` nor transformers' `run_clm.py` ships in its package's wheel or sdist, so
each runs when an environment variable names it (`LCAAM_TIMM_SCRIPTS`: a directory holding
`train.py` and `validate.py`, such as a pytorch-image-models checkout; `LCAAM_RUN_CLM`: the path of
run_clm.py), and the same tests always run scripts written after them with their flags and their
library calls (`launcher_scripts/timm_train.py`, `timm_validate.py`, `run_clm_trainer.py`;
`datasets` and `evaluate` as run_clm uses them); single-process and on two CPU ranks
(gloo) under `torchrun --nproc_per_node 2` and `accelerate launch`. Each run goes through
`python -m lcaam_patch run` in a child process, as a user would type it; LCAAM must train
(its weights leave the identity), survive resuming and load when fine-tuning."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lcaam_patch import is_lcaam_key

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "launcher_scripts"
CPU_DDP_SHIM = SCRIPTS / "cpu_ddp"
TORCHRUN = ("torchrun", "--standalone", "--nproc_per_node", "2")

pytestmark = pytest.mark.slow


@dataclasses.dataclass
class Ran:
    status: int
    stderr: str
    stdout: str


def launch(cwd: Path, preset: str, *command: str | os.PathLike[str]) -> Ran:
    """`python -m lcaam_patch run --preset PRESET -- COMMAND`, offline, in `cwd`."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(CPU_DDP_SHIM)]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(cwd / "hf_home"),
        "OMP_NUM_THREADS": "1",
    }
    argv = [sys.executable, "-m", "lcaam_patch", "run", "--preset", preset, "--", *map(str, command)]
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    return Ran(done.returncode, done.stderr, done.stdout)


def lcaam_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LCAAM weights of a state dict."""
    return {key: value.float() for key, value in state.items() if is_lcaam_key(key)}


def moved_from_identity(weights: dict[str, torch.Tensor]) -> bool:
    """Whether the last generator layer (weight 0, bias 1 at the identity) has moved."""
    weights_ = [value for key, value in weights.items() if key.endswith("weight")]
    return bool(weights_) and all(float(value.abs().max()) > 1e-6 for value in weights_)


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    """Whether every LCAAM weight differs between two saves of the same sites."""
    assert before.keys() == after.keys() and before
    return all(not torch.equal(before[key], after[key]) for key in before)


# timm: train.py, resume under two ranks, fine-tune from --initial-checkpoint, validate.py

TIMM_MODEL = (
    "--model", "vit_tiny_patch16_224",
    "--model-kwargs", "img_size=32", "patch_size=8", "depth=2", "embed_dim=32", "num_heads=2",
    "--img-size", "32", "--num-classes", "2",
)  # fmt: skip
TIMM_TRAIN = (
    "--data-dir", "data", "--dataset", "imagefolder", "--train-split", "train", "--val-split", "val",
    *TIMM_MODEL, "-b", "4", "--device", "cpu", "--workers", "0", "--no-prefetcher", "--output", "out",
    "--opt", "adamw", "--lr", "1e-2", "--warmup-epochs", "0", "--seed", "0",
)  # fmt: skip


TIMM_SCRIPTS_DIR = os.environ.get("LCAAM_TIMM_SCRIPTS", "")


@dataclasses.dataclass
class TimmScripts:
    """A training script with train.py's flags and an evaluation script with validate.py's."""

    train: Path
    validate: Path


TIMM_SCRIPTS = [
    pytest.param(TimmScripts(SCRIPTS / "timm_train.py", SCRIPTS / "timm_validate.py"), id="timm_train"),
    pytest.param(
        TimmScripts(Path(TIMM_SCRIPTS_DIR, "train.py"), Path(TIMM_SCRIPTS_DIR, "validate.py")),
        id="timm_scripts",
        marks=pytest.mark.skipif(
            not TIMM_SCRIPTS_DIR,
            reason="timm's train.py and validate.py (pytorch-image-models) ship in neither its wheel nor its sdist; "
            "set LCAAM_TIMM_SCRIPTS to a directory holding both to run these tests on them",
        ),
    ),
]


def timm_lcaam(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The LCAAM weights of a train.py checkpoint."""
    from timm.models import load_state_dict

    return lcaam_of(load_state_dict(str(checkpoint)))


@dataclasses.dataclass
class Timm:
    """A timm working directory (an image folder), its scripts and one epoch of training."""

    work: Path
    scripts: TimmScripts
    single: Ran


@pytest.fixture(scope="module", params=TIMM_SCRIPTS)
def timm_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Timm:
    """An image folder (2 classes, 32×32) and one epoch of training on it."""
    from PIL import Image

    scripts: TimmScripts = request.param
    for script in (scripts.train, scripts.validate):
        assert script.is_file(), f"{script} is missing (LCAAM_TIMM_SCRIPTS={TIMM_SCRIPTS_DIR})"
    work = tmp_path_factory.mktemp("timm")
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in range(2):
            folder = work / "data" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(8):
                pixels = (torch.rand(32, 32, 3, generator=generator) * 127 + 128 * label).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    ran = launch(work, "timm_vit", scripts.train, *TIMM_TRAIN, "--epochs", "1", "--experiment", "single")
    return Timm(work, scripts, ran)


def test_timm_train_trains_lcaam(timm_run: Timm) -> None:
    work, ran = timm_run.work, timm_run.single
    assert ran.status == 0, ran.stderr[-3000:]
    assert "patched 2 attention modules of VisionTransformer (preset 'timm_vit'" in ran.stderr
    assert moved_from_identity(timm_lcaam(work / "out" / "single" / "last.pth.tar"))


def test_timm_train_resumes_lcaam_under_two_ranks(timm_run: Timm) -> None:
    work = timm_run.work
    first = work / "out" / "single" / "last.pth.tar"
    ran = launch(work, "timm_vit", *TORCHRUN, timm_run.scripts.train, *TIMM_TRAIN, "--epochs", "2",
                 "--resume", first, "--experiment", "ddp")  # fmt: skip
    assert ran.status == 0, ran.stderr[-3000:]
    for rank in (0, 1):
        assert f"lcaam-patch: rank {rank}: patched 2 attention modules of VisionTransformer" in ran.stderr
    resumed = work / "out" / "ddp" / "last.pth.tar"
    assert torch.load(resumed, map_location="cpu", weights_only=False)["epoch"] == 1  # epoch 0 came from --resume
    assert changed(timm_lcaam(first), timm_lcaam(resumed))


def test_timm_fine_tunes_from_an_lcaam_initial_checkpoint(timm_run: Timm) -> None:
    work = timm_run.work
    first = work / "out" / "single" / "last.pth.tar"
    ran = launch(work, "timm_vit", timm_run.scripts.train, *TIMM_TRAIN, "--epochs", "1",
                 "--initial-checkpoint", first, "--experiment", "tuned")  # fmt: skip
    assert ran.status == 0, ran.stderr[-3000:]
    assert f"loaded 4 LCAAM weights from the checkpoint {first}" in ran.stderr
    assert changed(timm_lcaam(first), timm_lcaam(work / "out" / "tuned" / "last.pth.tar"))


def test_timm_validate_evaluates_the_lcaam_checkpoint(timm_run: Timm) -> None:
    work = timm_run.work
    best = work / "out" / "single" / "model_best.pth.tar"
    ran = launch(work, "timm_vit", timm_run.scripts.validate, "--data-dir", "data/val", *TIMM_MODEL,
                 "--checkpoint", best, "--device", "cpu", "--workers", "0", "--no-prefetcher", "-b", "4")  # fmt: skip
    assert ran.status == 0, ran.stderr[-3000:]
    assert "patched 2 attention modules of VisionTransformer" in ran.stderr
    assert '"top1"' in ran.stdout


# transformers: run_clm from scratch, resumed, fine-tuned under torchrun and accelerate launch (two ranks)

CLM_TRAIN = (
    "--train_file", "train.txt", "--validation_file", "val.txt", "--block_size", "16",
    "--per_device_train_batch_size", "4", "--use_cpu", "--report_to", "none",
    "--save_steps", "5", "--logging_steps", "5", "--do_train", "--do_eval", "--seed", "0",
)  # fmt: skip
CLM_SCRATCH = ("--config_name", "config", "--tokenizer_name", "tokenizer", "--learning_rate", "1e-2", *CLM_TRAIN)
CLM_FINE_TUNE = ("--model_name_or_path", "scratch", "--learning_rate", "1e-3", *CLM_TRAIN, "--max_steps", "5")
ACCELERATE = (
    "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no",
)  # fmt: skip
RUN_CLM = os.environ.get("LCAAM_RUN_CLM")
CLM_SCRIPTS = [
    pytest.param(SCRIPTS / "run_clm_trainer.py", id="run_clm_trainer"),
    pytest.param(
        Path(RUN_CLM or "run_clm.py"),
        id="run_clm",
        marks=pytest.mark.skipif(
            not RUN_CLM,
            reason="transformers' examples/pytorch/language-modeling/run_clm.py ships in neither its wheel nor its "
            "sdist; set LCAAM_RUN_CLM to the path of a copy to run these tests on it",
        ),
    ),
]


@dataclasses.dataclass
class Clm:
    """A run_clm working directory (text, tokenizer, config, metric), its script and the run from scratch."""

    work: Path
    script: Path
    scratch: Ran


@pytest.fixture(scope="module", params=CLM_SCRIPTS)
def clm_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Clm:
    """A local word-level tokenizer, a tiny Llama config, text, the local `accuracy` metric, and
    10 steps from scratch with evaluation."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    work = tmp_path_factory.mktemp("clm")
    words = "the cat sat on a mat and dog ran to big red small blue house tree".split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(40)]
    (work / "train.txt").write_text("\n".join(lines) + "\n")
    (work / "val.txt").write_text("\n".join(lines[:8]) + "\n")
    vocab = {word: i for i, word in enumerate(["[UNK]", "[PAD]", "[EOS]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    fast.save_pretrained(work / "tokenizer")
    LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    ).save_pretrained(work / "config")  # fmt: skip
    shutil.copytree(SCRIPTS / "accuracy", work / "accuracy", ignore=shutil.ignore_patterns("__pycache__"))
    scratch = launch(work, "transformers", request.param, *CLM_SCRATCH, "--output_dir", "scratch", "--max_steps", "10")
    return Clm(work, request.param, scratch)


def clm_lcaam(directory: Path) -> dict[str, torch.Tensor]:
    """The LCAAM weights of a Trainer output or checkpoint directory."""
    return lcaam_of(load_file(directory / "model.safetensors"))


def continued_from(tuned: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> bool:
    """Whether the generator weights of a short, slow fine-tune stayed nearer its trained `start`
    than the identity (weight 0): it began from `start`, not from a fresh LCAAM."""
    weights = [key for key in start if key.endswith("weight")]
    return all(float((tuned[k] - start[k]).abs().max()) < float(tuned[k].abs().max()) for k in weights)


def patch_line(rank: int | None, builder: str, weights: str) -> str:
    """What a process of the launcher prints when it patches the tiny Llama."""
    process = f"rank {rank}: " if rank is not None else ""
    return (
        f"lcaam-patch: {process}patched 2 attention modules of LlamaForCausalLM (preset 'transformers', "
        f"builder transformers.modeling_utils:PreTrainedModel.{builder}); {weights}"
    )


SCRATCH_WEIGHTS = "the builder loaded no checkpoint: LCAAM is at init 'identity' until the script loads one"
TUNED_WEIGHTS = "loaded 4 LCAAM weights from scratch (the keys transformers called unexpected)"


def test_run_clm_trains_and_evaluates_lcaam_from_scratch(clm_run: Clm) -> None:
    ran, out = clm_run.scratch, clm_run.work / "scratch"
    assert ran.status == 0, ran.stderr[-3000:]
    assert patch_line(None, "_from_config", SCRATCH_WEIGHTS) in ran.stderr
    assert moved_from_identity(clm_lcaam(out))
    assert changed(clm_lcaam(out / "checkpoint-5"), clm_lcaam(out))
    evaluated = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= evaluated["eval_accuracy"] <= 1.0 and math.isfinite(evaluated["eval_loss"])


def test_run_clm_resume_from_checkpoint_continues_lcaam(clm_run: Clm) -> None:
    work = clm_run.work
    ran = launch(work, "transformers", clm_run.script, *CLM_SCRATCH, "--output_dir", "resumed", "--max_steps", "10",
                     "--resume_from_checkpoint", "scratch/checkpoint-5")  # fmt: skip
    assert ran.status == 0, ran.stderr[-3000:]
    assert patch_line(None, "_from_config", SCRATCH_WEIGHTS) in ran.stderr
    resumed, uninterrupted = clm_lcaam(work / "resumed"), clm_lcaam(work / "scratch")
    assert changed(clm_lcaam(work / "scratch" / "checkpoint-5"), resumed)
    for key, value in uninterrupted.items():  # steps 6-10 again, from the LCAAM weights of step 5
        torch.testing.assert_close(resumed[key], value, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    ("launcher", "output"), [pytest.param(TORCHRUN, "tuned_torchrun", id="torchrun"),
                             pytest.param(ACCELERATE, "tuned_accelerate", id="accelerate")]
)  # fmt: skip
def test_run_clm_fine_tunes_lcaam_of_a_trained_directory_on_two_ranks(
    clm_run: Clm, launcher: tuple[str, ...], output: str
) -> None:
    work = clm_run.work
    ran = launch(work, "transformers", *launcher, clm_run.script, *CLM_FINE_TUNE, "--output_dir", output)
    assert ran.status == 0, ran.stderr[-3000:]
    for rank in (0, 1):
        assert patch_line(rank, "from_pretrained", TUNED_WEIGHTS) in ran.stderr
        assert f"lcaam-patch run: rank {rank} patched LlamaForCausalLM (2 sites)" in ran.stderr
    trained, tuned = clm_lcaam(work / "scratch"), clm_lcaam(work / output)
    assert changed(trained, tuned)
    assert continued_from(tuned, trained)
