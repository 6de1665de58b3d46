"""Speed, memory and accuracy of each LCAAM attention route against unpatched flash SDPA.

Two measurements, each as ratios to the unpatched baseline measured in the same run:

* op: the attention call alone on ViT-B/16 shapes (12 heads of 64; 197 tokens at 224 px,
  577 at 384 px), forward only and forward + backward, with M (B, N, N) from a dense
  generator or its rank-R factors. Memory is the peak allocated during one call above
  what was allocated before it. Accuracy is the largest error of the output against the
  eager backend in fp32 on the same inputs.
* inference: a timm ViT-B/16 forward pass under torch.no_grad, patched per route
  (`--inference`), against the unpatched model.

    python benchmarks/attention.py                                   # CPU, seconds
    python benchmarks/attention.py --json attention.json --inference # CUDA: the issue's shapes

On the CPU the default shapes are small and the GPU-only routes (triton, flex) are left
out; on CUDA it runs the issue's configurations (224 px batch 128, 384 px batch 32, bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import lcaam_patch
from lcaam_patch import AttentionCall, LowRankMask, lcaam_attention
from lcaam_patch.backends import choose

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Route:
    """One way to compute the fused attention."""

    name: str
    fusion: str | None  # None: the unpatched baseline
    backend: str = "auto"
    generator: str = "mlp"
    rank: int = 1
    gpu_only: bool = False


ROUTES = (
    Route("unpatched flash", None),
    Route("eager mul", "mul", "eager"),
    Route("eager add", "add", "eager"),
    Route("sdpa add", "add", "sdpa"),
    Route("flex mul", "mul", "flex", gpu_only=True),
    Route("flex add", "add", "flex", gpu_only=True),
    Route("triton mul", "mul", "triton", gpu_only=True),
    Route("triton add", "add", "triton", gpu_only=True),
    Route("lowrank r1 mul", "mul", "lowrank_sdpa", "lowrank", 1),
    Route("lowrank r1 add", "add", "lowrank_sdpa", "lowrank", 1),
    Route("auto mul", "mul", "auto"),
    Route("auto add", "add", "auto"),
)


@dataclasses.dataclass
class Row:
    """One route on one shape."""

    shape: str
    route: str
    resolved: str
    fwd_ms: float
    fwd_bwd_ms: float
    fwd_bwd_mib: float
    max_abs_err: float | None
    fwd_ratio: float = 1.0
    fwd_bwd_ratio: float = 1.0
    mem_ratio: float = 1.0


def timed(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of `fn` after `warmup` untimed calls."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated by one call of `fn` above what was allocated before (CUDA)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - before) / MIB


def op_rows(shape: str, B: int, H: int, N: int, D: int, routes: list[Route], args: argparse.Namespace) -> list[Row]:
    """Measure every route on (B, H, N, D) self-attention."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device, dtype)

    q, k, v, grad = rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)
    leaves = [q, k, v]

    def leaf(t: torch.Tensor) -> torch.Tensor:
        leaves.append(t.requires_grad_())
        return t

    b = leaf(1 + 0.1 * rand(B, N, 1))
    masks = {  # M near the neutral value of each fusion, dense and as rank-1 factors
        ("mlp", "mul"): leaf(1 + 0.1 * rand(B, N, N)),
        ("mlp", "add"): leaf(0.1 * rand(B, N, N)),
        ("lowrank", "mul"): LowRankMask(leaf(1 + 0.1 * rand(B, N, 1)), b),
        ("lowrank", "add"): LowRankMask(leaf(0.1 * rand(B, N, 1)), b),
    }
    for t in leaves:
        t.requires_grad_()
    scale = D**-0.5
    rows = []
    for route in routes:
        if route.fusion is None:

            def call() -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v, scale=scale)

            resolved, err = "flash sdpa" if device.type == "cuda" else "sdpa", None
        else:
            m = masks[route.generator, route.fusion]

            def call(m: torch.Tensor | LowRankMask = m, route: Route = route) -> torch.Tensor:
                return lcaam_attention(q, k, v, m, fusion=route.fusion, scale=scale, backend=route.backend)[0]

            resolved = choose(route.backend, AttentionCall(q, k, v, m, fusion=route.fusion, scale=scale))
            with torch.no_grad():
                reference = lcaam_attention(
                    q.float(),
                    k.float(),
                    v.float(),
                    LowRankMask(m.a.float(), m.b.float()) if isinstance(m, LowRankMask) else m.float(),
                    fusion=route.fusion,
                    scale=scale,
                    backend="eager",
                )[0]
                err = (call().float() - reference).abs().max().item()

        def forward(call: Callable[[], torch.Tensor] = call) -> None:
            with torch.no_grad():
                call()

        def forward_backward(call: Callable[[], torch.Tensor] = call) -> None:
            call().backward(grad)

        print(f"  {shape}: {route.name} ...", file=sys.stderr, flush=True)
        rows.append(
            Row(
                shape=shape,
                route=route.name,
                resolved=resolved,
                fwd_ms=timed(forward, args.iters, args.warmup, device),
                fwd_bwd_ms=timed(forward_backward, args.iters, args.warmup, device),
                fwd_bwd_mib=peak_mib(forward_backward, device),
                max_abs_err=err,
            )
        )
        for t in leaves:
            t.grad = None
    base = rows[0]
    for r in rows:
        r.fwd_ratio, r.fwd_bwd_ratio = r.fwd_ms / base.fwd_ms, r.fwd_bwd_ms / base.fwd_bwd_ms
        r.mem_ratio = r.fwd_bwd_mib / base.fwd_bwd_mib if base.fwd_bwd_mib else float("nan")
    return rows


def inference_rows(routes: list[Route], args: argparse.Namespace) -> list[dict[str, object]]:
    """Forward-only timm ViT-B/16 at 224 px, unpatched and patched per route."""
    import copy

    import timm

    device = torch.device(args.device)
    torch.manual_seed(0)
    template = timm.create_model(args.model, pretrained=False).eval().to(device)
    images = torch.randn(args.inference_batch, 3, 224, 224, device=device)
    rows: list[dict[str, object]] = []
    for route in routes:
        model = copy.deepcopy(template)
        if route.fusion is not None:
            options = dict(generator=route.generator, rank=route.rank) if route.generator == "lowrank" else {}
            lcaam_patch.apply(model, fusion=route.fusion, backend=route.backend, **options)

        def forward(model: torch.nn.Module = model) -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=getattr(torch, args.dtype)):
                model(images)

        print(f"  inference: {route.name} ...", file=sys.stderr, flush=True)
        ms = timed(forward, args.iters, args.warmup, device)
        backend = lcaam_patch.summary(model).sites[0].backend if route.fusion is not None else "-"
        rows.append({"route": route.name, "resolved": backend, "ms": ms, "ratio": ms / rows[0]["ms"] if rows else 1.0})
        del model
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the op (and optionally the inference) benchmark; print tables, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float16", "float32"),
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default: 30 CUDA, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 10 CUDA, 2 CPU)")
    parser.add_argument("--inference", action="store_true", help="also time a patched ViT forward pass")
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model for --inference")
    parser.add_argument("--inference-batch", type=int, default=None, help="default: 128 CUDA, 2 CPU")
    parser.add_argument("--json", metavar="PATH", default=None)
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.iters = args.iters or (30 if cuda else 5)
    args.warmup = args.warmup or (10 if cuda else 2)
    args.inference_batch = args.inference_batch or (128 if cuda else 2)
    routes = [r for r in ROUTES if cuda or not r.gpu_only]
    shapes = [("224px b128", 128, 12, 197, 64), ("384px b32", 32, 12, 577, 64)] if cuda else [("cpu b2", 2, 4, 65, 32)]
    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{where}, {args.dtype}, torch {torch.__version__}, iters {args.iters} after {args.warmup} warmup")
    rows = [row for shape in shapes for row in op_rows(*shape, routes, args)]
    header = (
        f"{'shape':<11} {'route':<16} {'resolved':<13} {'fwd ms':>8} {'×':>5} {'f+b ms':>8} {'×':>5} "
        f"{'f+b MiB':>8} {'×':>5} {'max err':>8}"
    )
    print(header)
    for r in rows:
        err = "-" if r.max_abs_err is None else f"{r.max_abs_err:.1e}"
        print(
            f"{r.shape:<11} {r.route:<16} {r.resolved:<13} {r.fwd_ms:8.3f} {r.fwd_ratio:5.2f} "
            f"{r.fwd_bwd_ms:8.3f} {r.fwd_bwd_ratio:5.2f} {r.fwd_bwd_mib:8.1f} {r.mem_ratio:5.2f} {err:>8}"
        )
    inference = inference_rows(routes, args) if args.inference else []
    for r in inference:
        print(f"inference {r['route']:<16} {r['resolved']:<20} {r['ms']:8.2f} ms  ×{r['ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": where,
                    "args": vars(args),
                    "torch": torch.__version__,
                    "op": [dataclasses.asdict(r) for r in rows],
                    "inference": inference,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
