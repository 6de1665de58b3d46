"""`lcaam-patch demo`: train a small timm ViT on scikit-learn's digits, unpatched and patched.

Both runs start from the same initial weights and train side by side, a step of each in
turn on the same batches, so that their step times are comparable. The patched run adds
LCAAM with `apply(model, mode="multilayer", fusion="mul")`, whose identity init makes it
start out computing exactly what the unpatched model computes.
Everything runs on the CPU and needs no download (`pip install 'lcaam-patch[demo]'`).
This module imports timm, scikit-learn and tqdm, so `import lcaam_patch` never imports it.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from tqdm.auto import tqdm

import lcaam_patch

from ..errors import InvalidOptionError

BATCH_SIZE = 64
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
TEST_FRACTION = 0.25
SPLIT_SEED = 0


def run_demo(
    epochs: int = 30, seed: int = 0, threads: int | None = None, plot_dir: str | Path | None = "lcaam-demo-output"
) -> list[dict[str, Any]]:
    """Train the ViT unpatched and patched; print the comparison and `lcaam_patch.summary`,
    and write the patched model's learned masks on a test image as heatmaps to `plot_dir`.

    Args:
        epochs: passes over the training images per run; the default 30 takes about a
            minute on 2 CPU cores, for both runs together.
        seed: seeds the initial weights and the batch order (the split is fixed).
        threads: `torch.set_num_threads` value; None leaves PyTorch's default.
        plot_dir: where the mask heatmaps go (PNG, one per layer); None writes none.

    Returns:
        One dict per run with keys "run", "test_accuracy", "params", "ms_per_step" and
        "step_time_ratio" (time per step relative to the unpatched run).
    """
    if epochs < 1:
        raise InvalidOptionError(f"epochs={epochs} must be at least 1")
    if threads is not None:
        torch.set_num_threads(threads)
    data = _digits()
    torch.manual_seed(seed)
    baseline = _build_model()
    patched = lcaam_patch.apply(copy.deepcopy(baseline), mode="multilayer", fusion="mul")
    models = {"unpatched": baseline, "lcaam mul": patched}
    trained = _train(models, data, epochs=epochs, seed=seed)
    rows: list[dict[str, Any]] = []
    for name, (accuracy, step_times) in trained.items():
        rows.append(
            {
                "run": name,
                "test_accuracy": accuracy,
                "params": sum(p.numel() for p in models[name].parameters()),
                "ms_per_step": 1000 * statistics.median(step_times),
            }
        )
    for row in rows:
        row["step_time_ratio"] = row["ms_per_step"] / rows[0]["ms_per_step"]
    print(_table(rows, epochs=epochs, seed=seed))
    print()
    print(lcaam_patch.summary(patched))
    if plot_dir is not None:
        print()
        for path in _write_mask_heatmaps(patched, data[2][:1], Path(plot_dir)):
            print(f"wrote {path}")
    return rows


def _write_mask_heatmaps(model: nn.Module, image: torch.Tensor, directory: Path) -> list[Path]:
    """One heatmap per layer of the masks the trained patched model computes for `image`."""
    from ..tools.plots import mask_heatmap, save_figure

    with torch.no_grad(), lcaam_patch.capture(model.eval()) as seen:
        model(image)
    written = []
    for index, (path, masks) in enumerate(seen.masks.items()):
        tokens = masks[0].shape[-1]
        groups = [("cls", 0, 1), ("patches", 1, tokens)]
        figure = mask_heatmap(masks[0], groups=groups, title=f"{path}: learned mask M, one test digit")
        written.append(save_figure(figure, directory / f"mask_layer{index}.png"))
    return written


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 8×8 digits as (N, 1, 8, 8) floats in [0, 1], split once, stratified by label."""
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )

    def as_images(x: Any) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0

    def as_labels(y: Any) -> torch.Tensor:
        return torch.as_tensor(y, dtype=torch.long)

    return as_images(x_train), as_labels(y_train), as_images(x_test), as_labels(y_test)


def _build_model() -> VisionTransformer:
    """A 4-block, 64-wide ViT on 2×2 patches of an 8×8 image: 16 patches and a class token.

    timm's "jax" init (Xavier-uniform Linear weights) matters here: with the default
    N(0, 0.02) init the attention of so small a model starts uniform and stays stuck
    near chance for several epochs on this little data.
    """
    return VisionTransformer(
        img_size=8,
        patch_size=2,
        in_chans=1,
        num_classes=10,
        embed_dim=64,
        depth=4,
        num_heads=4,
        weight_init="jax",
    )


def _train(
    models: dict[str, nn.Module],
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    seed: int,
) -> dict[str, tuple[float, list[float]]]:
    """Train each model with its own AdamW and cosine schedule, on the same batches.

    The models take turns, one step each on every batch, so that a slow spell of the
    machine slows every run alike and the step times stay comparable; the runs do not
    otherwise interact. Returns each model's test accuracy and step times (s).
    """
    x_train, y_train, x_test, y_test = data
    steps_per_epoch = len(x_train) // BATCH_SIZE
    total = epochs * steps_per_epoch
    order = torch.Generator().manual_seed(seed)
    step_times: dict[str, list[float]] = {name: [] for name in models}
    with contextlib.ExitStack() as stack:
        runs = []
        for position, (name, model) in enumerate(models.items()):
            optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
            bar = stack.enter_context(tqdm(total=total, desc=name, unit="step", position=position))
            runs.append((name, model.train(), optimizer, schedule, bar))
        for _ in range(epochs):
            shuffled = torch.randperm(len(x_train), generator=order)
            for batch in shuffled[: steps_per_epoch * BATCH_SIZE].split(BATCH_SIZE):
                for name, model, optimizer, schedule, bar in runs:
                    start = time.perf_counter()
                    loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step_times[name].append(time.perf_counter() - start)
                    schedule.step()
                    bar.update()
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    results = {}
    for name, model in models.items():
        with torch.no_grad():
            predictions = model.eval()(x_test).argmax(dim=-1)
        results[name] = ((predictions == y_test).float().mean().item(), step_times[name])
    return results


def _table(rows: list[dict[str, Any]], *, epochs: int, seed: int) -> str:
    """The comparison table, one line per run."""
    header = ("run", "test acc", "params", "ms/step", "vs unpatched")
    cells = [
        (
            row["run"],
            f"{row['test_accuracy']:.2%}",
            f"{row['params']:,}",
            f"{row['ms_per_step']:.2f}",
            f"{row['step_time_ratio']:.2f}×",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]

    def line(values: tuple[str, ...]) -> str:
        cells = zip(values, widths, strict=True)
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(cells))

    rule = "  ".join("-" * w for w in widths)
    title = (
        f"digits, {epochs} epochs, batch {BATCH_SIZE}, AdamW lr {LEARNING_RATE}, seed {seed}, "
        f"{torch.get_num_threads()} threads (ms/step: median forward+backward+AdamW step)"
    )
    return "\n".join([title, line(header), rule, *map(line, cells)])
