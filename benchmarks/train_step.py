"""Time and memory of one training step of a timm model, unpatched and patched with LCAAM.

A training step is forward + cross-entropy + backward + AdamW step on a fixed random batch.
Every variant is a fresh deep copy of the same unpatched model (same weights), patched with
`lcaam_patch.apply(model, mode="multilayer", fusion=..., backend=...)` for each backend ×
fusion, then backend="auto" for each fusion; a combination the library rejects (sdpa with
mul) is skipped with a note.

Time: after warmup, the variants take turns one step at a time, so that a slow spell of a
shared machine hits every variant alike; the median step is reported, and on the CPU also
the median CPU time of the process (all threads), which other load inflates less.

Memory:
  * saved activations (CPU and CUDA): bytes of the distinct storages that autograd saves for
    backward in one forward pass (torch.autograd.graph.saved_tensors_hooks), parameters
    excluded. Deterministic; it is the part of training memory that grows with batch size
    and sequence length, which is what LCAAM changes.
  * peak allocated (CUDA only): torch.cuda.max_memory_allocated over one training step of
    the variant alone on the device (peak stats reset per variant, after warmup steps):
    weights, gradients, optimizer state and activations together.

    python benchmarks/train_step.py                            # CPU defaults, about a minute
    python benchmarks/train_step.py --device cuda --dtype bf16 --json results.json
    python benchmarks/train_step.py --config vit_b16_224 --json train_224.json  # issue 6, CUDA

On CUDA the backends default to eager, sdpa, flex and triton, and the lowrank generator
(rank 1, backend auto) is measured for each fusion too.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import lcaam_patch

FUSIONS = ("mul", "add")
MIB = 2**20
CONFIGS = {  # the configurations of issue 6: ViT-B/16, bf16
    "vit_b16_224": {"model": "vit_base_patch16_224", "batch_size": 128, "dtype": "bf16"},
    "vit_b16_384": {"model": "vit_base_patch16_384", "batch_size": 32, "dtype": "bf16"},
}

Autocast = Callable[[], AbstractContextManager[Any]]
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model to measure: the unpatched model, or `apply` with this fusion and backend."""

    name: str
    fusion: str | None = None
    backend: str | None = None
    rank: int | None = None  # a generator="lowrank" of this rank


@dataclasses.dataclass
class Result:
    """Measurements of one variant; the ratios are to the unpatched model."""

    variant: str
    backend: str
    params: int
    ms_per_step: float
    cpu_ms_per_step: float | None
    saved_activation_mib: float
    peak_allocated_mib: float | None
    time_ratio: float = 1.0
    cpu_time_ratio: float | None = None
    saved_activation_ratio: float = 1.0
    peak_allocated_ratio: float | None = None


class Trainer:
    """A model with its own AdamW; `step()` runs one training step on a fixed batch."""

    def __init__(self, model: nn.Module, batch: Batch, autocast: Autocast) -> None:
        self.model = model
        self.batch = batch
        self.autocast = autocast
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(self) -> None:
        """Forward, loss, backward and optimizer step."""
        inputs, targets = self.batch
        with self.autocast():
            loss = F.cross_entropy(self.model(inputs), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; batch size, steps and warmup default by device."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), help="model, batch size and dtype of an issue-6 run")
    parser.add_argument("--model", help="timm model name (default: vit_tiny_patch16_224)")
    parser.add_argument("--img-size", type=int, help="input size (default: the model's)")
    parser.add_argument("--batch-size", type=int, help="default: 8 on CPU, 64 on CUDA")
    parser.add_argument("--steps", type=int, help="timed steps each (default: 8 CPU, 50 CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed steps each (default: 2 CPU, 10 CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        help="bf16: the step runs under torch.autocast(bfloat16); weights and optimizer stay fp32",
    )
    parser.add_argument(
        "--backends",
        type=lambda text: text.split(","),
        help="comma-separated LCAAM backends, each tried with every fusion (default: eager,sdpa "
        "on CPU, eager,sdpa,flex,triton on CUDA); backend=auto is always measured too",
    )
    parser.add_argument(
        "--lowrank-ranks",
        type=lambda text: [int(r) for r in text.split(",") if r],
        help="ranks of generator='lowrank' to measure with backend=auto for every fusion "
        "(default: none on CPU, 1 on CUDA)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    for name, value in CONFIGS.get(args.config, {}).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    defaults = (
        ("model", "vit_tiny_patch16_224", "vit_tiny_patch16_224"),
        ("dtype", "fp32", "fp32"),
        ("batch_size", 8, 64),
        ("steps", 8, 50),
        ("warmup", 2, 10),
        ("backends", ["eager", "sdpa"], ["eager", "sdpa", "flex", "triton"]),
        ("lowrank_ranks", [], [1]),
    )
    for name, on_cpu, on_cuda in defaults:
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    return args


def variants(backends: list[str], lowrank_ranks: Sequence[int] = ()) -> list[Variant]:
    """The unpatched model, every backend × fusion, backend="auto" for each fusion, then
    each lowrank rank × fusion with backend="auto"."""
    patched = [Variant(f"{b}/{f}", f, b) for b in backends for f in FUSIONS]
    patched += [Variant(f"auto/{f}", f, "auto") for f in FUSIONS]
    patched += [Variant(f"lowrank{r}/{f}", f, "auto", r) for r in lowrank_ranks for f in FUSIONS]
    return [Variant("unpatched"), *patched]


def build_model(name: str, img_size: int | None, seed: int) -> nn.Module:
    """The timm model `name` with seeded random weights, in training mode."""
    torch.manual_seed(seed)
    kwargs = {"img_size": img_size} if img_size is not None else {}
    return timm.create_model(name, pretrained=False, **kwargs).train()


def random_batch(model: nn.Module, batch_size: int, img_size: int | None, seed: int) -> Batch:
    """Seeded random images of the model's input size (or `img_size`) and random labels."""
    channels, height, width = timm.data.resolve_model_data_config(model)["input_size"]
    if img_size is not None:
        height = width = img_size
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, channels, height, width, generator=generator)
    targets = torch.randint(0, model.num_classes, (batch_size,), generator=generator)
    return inputs, targets


def make_variant(template: nn.Module, variant: Variant, device: torch.device) -> nn.Module:
    """A deep copy of `template` on `device`, patched as `variant` says.

    Raises lcaam_patch.InvalidOptionError for a combination the library rejects.
    """
    model = copy.deepcopy(template).to(device)
    if variant.fusion is not None:
        lowrank = {} if variant.rank is None else {"generator": "lowrank", "rank": variant.rank}
        lcaam_patch.apply(model, mode="multilayer", fusion=variant.fusion, backend=variant.backend, **lowrank)
    return model


def resolved_backend(model: nn.Module) -> str:
    """The backend of the first patched site as `lcaam_patch.summary` shows it, or "-"."""
    if not lcaam_patch.is_patched(model):
        return "-"
    return lcaam_patch.summary(model).sites[0].backend


def time_interleaved(
    trainers: list[Trainer], steps: int, warmup: int, device: torch.device
) -> list[tuple[list[float], list[float]]]:
    """Per trainer, wall-clock and process-CPU seconds of `steps` steps taken in turns."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for trainer in trainers:
        for _ in range(warmup):
            trainer.step()
    sync()
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in trainers]
    for _ in range(steps):
        for trainer, (wall, cpu) in zip(trainers, times, strict=True):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            trainer.step()
            sync()
            wall.append(time.perf_counter() - start_wall)
            cpu.append(time.process_time() - start_cpu)
    return times


def saved_activation_bytes(model: nn.Module, inputs: torch.Tensor, autocast: Autocast) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward pass.

    A storage counts once however many saved tensors view it; parameters are left out
    (they live for the whole run whether or not anything is saved).
    """
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast():
        output = model(inputs)
    del output
    return sum(saved.values())


def cuda_peak_mib(
    template: nn.Module, variant: Variant, batch: Batch, autocast: Autocast, device: torch.device
) -> float:
    """torch.cuda.max_memory_allocated over one step of `variant` alone, after two warmup steps."""
    trainer = Trainer(make_variant(template, variant, device), batch, autocast)
    for _ in range(2):
        trainer.step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    trainer.step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / MIB


def add_ratios(results: list[Result]) -> None:
    """Fill in each result's ratios to the first (unpatched) result."""
    base = results[0]
    for r in results:
        r.time_ratio = r.ms_per_step / base.ms_per_step
        r.saved_activation_ratio = r.saved_activation_mib / base.saved_activation_mib
        if r.cpu_ms_per_step is not None and base.cpu_ms_per_step:
            r.cpu_time_ratio = r.cpu_ms_per_step / base.cpu_ms_per_step
        if r.peak_allocated_mib is not None and base.peak_allocated_mib:
            r.peak_allocated_ratio = r.peak_allocated_mib / base.peak_allocated_mib


def format_table(results: list[Result]) -> str:
    """The results as an aligned table: CPU-time columns on the CPU, peak allocated on CUDA."""
    cuda = results[0].peak_allocated_mib is not None
    header = ["variant", "backend", "params", "ms/step", "×time"]
    header += [] if cuda else ["cpu ms/step", "×cpu"]
    header += ["saved act MiB", "×act"]
    header += ["peak alloc MiB", "×peak"] if cuda else []
    rows = []
    for r in results:
        row = [r.variant, r.backend, f"{r.params:,}", f"{r.ms_per_step:.1f}", f"{r.time_ratio:.2f}"]
        if not cuda:
            row += [f"{r.cpu_ms_per_step:.1f}", f"{r.cpu_time_ratio:.2f}"]
        row += [f"{r.saved_activation_mib:.1f}", f"{r.saved_activation_ratio:.2f}"]
        if cuda:
            row += [f"{r.peak_allocated_mib:.1f}", f"{r.peak_allocated_ratio:.2f}"]
        rows.append(row)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in pairs)

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, rows)])


def describe_setup(args: argparse.Namespace, device: torch.device, input_shape: tuple[int, ...]) -> str:
    """Lines saying what ran, where, and how it was measured."""
    cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {threads} threads"
    setup = (
        f"{args.model}, input {input_shape}, {args.dtype}, {where}, torch {torch.__version__}, "
        f"timm {timm.__version__}, lcaam_patch {lcaam_patch.__version__}"
    )
    timing = (
        f"time: median of {args.steps} steps (forward + backward + AdamW), variants in turns, "
        f"after {args.warmup} warmup steps; ms = wall clock"
    )
    if not cuda:
        timing += "; cpu ms = CPU time of the process (all threads)"
    memory = (
        "memory: saved act = distinct storages saved for backward in one forward "
        "(saved_tensors_hooks, parameters excluded)"
    )
    if cuda:
        memory += "; peak alloc = torch.cuda.max_memory_allocated over one step of the variant alone, reset per variant"
    return f"{setup}\n{timing}\n{memory}"


def time_variants(
    template: nn.Module,
    candidates: list[Variant],
    args: argparse.Namespace,
    batch: Batch,
    autocast: Autocast,
) -> tuple[list[Variant], list[Result], list[str]]:
    """Build every variant the library accepts, time them in turns, and count saved activations.

    Returns the variants measured, their results, and notes on the skipped ones. The models
    are freed on return.
    """
    device = batch[0].device
    measured: list[Variant] = []
    trainers: list[Trainer] = []
    notes: list[str] = []
    for variant in candidates:
        try:
            model = make_variant(template, variant, device)
        except lcaam_patch.InvalidOptionError as error:
            notes.append(f"note: skipped {variant.name}: {error}")
            continue
        measured.append(variant)
        trainers.append(Trainer(model, batch, autocast))
    print(f"timing {len(trainers)} variants ...", file=sys.stderr, flush=True)
    times = time_interleaved(trainers, args.steps, args.warmup, device)
    results = []
    for variant, trainer, (wall, cpu) in zip(measured, trainers, times, strict=True):
        activations = saved_activation_bytes(trainer.model, batch[0], autocast)
        results.append(
            Result(
                variant=variant.name,
                backend=resolved_backend(trainer.model),
                params=sum(p.numel() for p in trainer.model.parameters()),
                ms_per_step=1000 * statistics.median(wall),
                cpu_ms_per_step=None if device.type == "cuda" else 1000 * statistics.median(cpu),
                saved_activation_mib=activations / MIB,
                peak_allocated_mib=None,
            )
        )
    return measured, results, notes


def run(args: argparse.Namespace) -> tuple[list[Result], list[str], tuple[int, ...]]:
    """Measure every variant; return the results, notes on skipped variants, the input shape."""
    device = torch.device(args.device)
    autocast: Autocast = (
        functools.partial(torch.autocast, device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext
    )
    template = build_model(args.model, args.img_size, args.seed)
    inputs, targets = random_batch(template, args.batch_size, args.img_size, args.seed)
    batch = (inputs.to(device), targets.to(device))
    measured, results, notes = time_variants(
        template, variants(args.backends, args.lowrank_ranks), args, batch, autocast
    )
    if device.type == "cuda":
        for variant, result in zip(measured, results, strict=True):
            gc.collect()
            torch.cuda.empty_cache()
            print(f"peak memory of {variant.name} ...", file=sys.stderr, flush=True)
            result.peak_allocated_mib = cuda_peak_mib(template, variant, batch, autocast, device)
    add_ratios(results)
    return results, notes, tuple(inputs.shape)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, and write JSON if asked."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results, notes, input_shape = run(args)
    print(describe_setup(args, torch.device(args.device), input_shape))
    print(format_table(results))
    print(*notes, sep="\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "torch": torch.__version__,
                    "timm": timm.__version__,
                    "results": [dataclasses.asdict(r) for r in results],
                    "notes": notes,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
