"""Support for the QD-DETR vendor test: the submodule, a synthetic data set, CPU shims.

Run as a script, this module installs the CPU shims and then runs the `lcaam-patch`
command line with its arguments, so the test drives upstream's `qd_detr/train.py` through
the real launcher in a fresh process:

    python vendor_tests/qd_detr_support.py run --preset qd_detr -- qd_detr/train.py ...

Only the standard library, torch and lcaam_patch are imported at module level, so the
test module imports (and skips) where QD-DETR and its dependencies are absent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from upstream_path import imports_from

REPO_ROOT = Path(__file__).resolve().parents[1]
QD_DETR_ROOT = REPO_ROOT / "integration" / "QD-DETR"
ONE_LINE_PATCH = REPO_ROOT / "integration" / "patches" / "QD-DETR.patch"
SKIP_MESSAGE = (
    "QD-DETR is not checked out: run `git submodule update --init integration/QD-DETR` "
    "(or clone with --recurse-submodules) to run the QD-DETR vendor test"
)
UPSTREAM_DEPENDENCIES = ("numpy", "scipy", "sklearn", "pandas", "tabulate", "tensorboard", "tqdm")

V_FEAT_DIM = 16
T_FEAT_DIM = 12
CLIP_LENGTH = 2
LENGTH_BUCKETS = {"short": (4, 10), "middle": (12, 30), "long": (32, 60)}


def submodule_present() -> bool:
    """Whether integration/QD-DETR holds upstream's code."""
    return (QD_DETR_ROOT / "qd_detr" / "train.py").is_file()


def missing_dependencies() -> list[str]:
    """Upstream's training dependencies that are not installed."""
    return [name for name in UPSTREAM_DEPENDENCIES if importlib.util.find_spec(name) is None]


@dataclasses.dataclass(frozen=True)
class SyntheticData:
    """Paths of a synthetic data set in QVHighlights format."""

    train_path: Path
    eval_path: Path
    v_feat_dir: Path
    t_feat_dir: Path
    eval_qids: tuple[int, ...]


def write_dataset(root: Path, *, n_train: int = 32, n_val: int = 12, seed: int = 0) -> SyntheticData:
    """Write a tiny learnable data set in QVHighlights format under `root`.

    Annotations are jsonl (`qid`, `query`, `duration`, `vid`, `relevant_windows`,
    `relevant_clip_ids`, `saliency_scores`), video features `{vid}.npz["features"]` (one
    row per 2-second clip) and text features `qid{qid}.npz["last_hidden_state"]`. Each
    query has a topic; its text tokens and its relevant clips carry that topic, so
    training can learn to find the moment. Validation windows fall in every length bucket
    of upstream's evaluation (short, middle, long).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    choose = random.Random(seed)
    v_dir, t_dir = root / "video_features", root / "text_features"
    v_dir.mkdir(parents=True, exist_ok=True)
    t_dir.mkdir(parents=True, exist_ok=True)
    projection = rng.standard_normal((T_FEAT_DIM, V_FEAT_DIM)).astype(np.float32)
    buckets = list(LENGTH_BUCKETS.values())

    def record(qid: int, bucket: tuple[int, int]) -> dict[str, Any]:
        window_length = CLIP_LENGTH * choose.randint(bucket[0] // CLIP_LENGTH, bucket[1] // CLIP_LENGTH)
        duration = CLIP_LENGTH * choose.randint(max(window_length // CLIP_LENGTH + 4, 20), 50)
        start = CLIP_LENGTH * choose.randint(0, (duration - window_length) // CLIP_LENGTH)
        clip_ids = list(range(start // CLIP_LENGTH, (start + window_length) // CLIP_LENGTH))
        scores = [[4, 4, 4]] + [[choose.randint(1, 4) for _ in range(3)] for _ in clip_ids[1:]]
        topic = rng.standard_normal(T_FEAT_DIM).astype(np.float32)
        tokens = topic + 0.3 * rng.standard_normal((choose.randint(3, 12), T_FEAT_DIM)).astype(np.float32)
        clips = rng.standard_normal((duration // CLIP_LENGTH, V_FEAT_DIM)).astype(np.float32)
        clips[clip_ids] += 2.0 * topic @ projection
        vid = f"synthetic{qid:04d}_0.0_{float(duration)}"
        np.savez(v_dir / f"{vid}.npz", features=clips)
        np.savez(t_dir / f"qid{qid}.npz", last_hidden_state=tokens)
        return {
            "qid": qid,
            "query": f"synthetic query {qid}",
            "duration": duration,
            "vid": vid,
            "relevant_windows": [[start, start + window_length]],
            "relevant_clip_ids": clip_ids,
            "saliency_scores": scores,
        }

    train = [record(qid, buckets[qid % len(buckets)]) for qid in range(n_train)]
    val = [record(n_train + i, buckets[i % len(buckets)]) for i in range(n_val)]
    paths = root / "highlight_train_release.jsonl", root / "highlight_val_release.jsonl"
    for path, records in zip(paths, (train, val)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return SyntheticData(paths[0], paths[1], v_dir, t_dir, tuple(r["qid"] for r in val))


def train_arguments(data: SyntheticData, results_root: Path, *, n_epoch: int, extra: tuple[str, ...] = ()) -> list[str]:
    """Arguments of upstream's `qd_detr/train.py` for a tiny CPU run on `data`."""
    return [
        "--dset_name", "hl",
        "--ctx_mode", "video_tef",
        "--train_path", str(data.train_path),
        "--eval_path", str(data.eval_path),
        "--eval_split_name", "val",
        "--v_feat_dirs", str(data.v_feat_dir),
        "--v_feat_dim", str(V_FEAT_DIM),
        "--t_feat_dir", str(data.t_feat_dir),
        "--t_feat_dim", str(T_FEAT_DIM),
        "--results_root", str(results_root),
        "--exp_id", "lcaam",
        "--device", "-1",
        "--num_workers", "0",
        "--no_pin_memory",
        "--seed", "2018",
        "--bsz", "8",
        "--eval_bsz", "16",
        "--n_epoch", str(n_epoch),
        "--lr", "1e-3",
        "--dim_feedforward", "64",
        "--num_queries", "5",
        *extra,
    ]  # fmt: skip


def upstream_options(arguments: list[str]) -> argparse.Namespace:
    """The options upstream's `BaseOptions.parse` makes of `arguments`, without its side
    effects (results directory, code copy): what `build_model(opt)` gets."""
    from qd_detr.config import BaseOptions

    options = BaseOptions()
    options.initialize()
    opt = options.parser.parse_args(arguments)
    opt.device = torch.device("cuda" if opt.device >= 0 else "cpu")
    opt.v_feat_dim += 2 if "tef" in opt.ctx_mode else 0
    return opt


def upstream_on_path(root: Path = QD_DETR_ROOT) -> contextlib.AbstractContextManager[None]:
    """Import QD-DETR from `root` (the submodule) in this process, and forget it afterwards.

    Bytecode is not written, so the submodule's work tree stays clean.
    """
    return imports_from(root, ("qd_detr", "utils", "standalone_eval"))


def _cuda_as_identity(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


@contextlib.contextmanager
def cpu_shims() -> Iterator[None]:
    """Let upstream run on a machine without CUDA, for the duration of the block.

    - `transformer.py` moves the decoder's input to the GPU with a hard-coded `.cuda()`;
      without CUDA, `Tensor.cuda` returns the tensor itself.
    - upstream's checkpoints pickle its options (an `argparse.Namespace`), which
      `torch.load`'s default `weights_only=True` (torch >= 2.6) refuses; it is allowed as
      a safe global.
    """
    saved = torch.Tensor.cuda
    if not torch.cuda.is_available():
        torch.Tensor.cuda = _cuda_as_identity
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            yield
    finally:
        torch.Tensor.cuda = saved


def main(argv: list[str]) -> int:
    """`lcaam-patch` with the CPU shims installed."""
    from lcaam_patch.cli import main as cli_main

    with cpu_shims():
        return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
