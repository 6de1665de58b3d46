"""What a patched model pays per attention call on top of LCAAM's own arithmetic (issue 19).

Prints, in one run, patched / unpatched time ratios for

- greedy decode (48 new tokens, one thread on the CPU) of a Llama built from a config
  (8 layers, hidden 256, 8 heads, 4 kv heads, vocab 256), with the eager and the sdpa model
  implementations, patched with the mlp generator (max_kv_tokens=128) and the lowrank
  generator (rank 1);
- a batch-1 forward of a timm ViT-S/16 at 224 px;
- a batch-64 training step (forward, cross-entropy, backward, AdamW) of a timm ViT-Ti;

and the library's own time per attention call, against a hand-written eager LCAAM attention
of the same shapes, so that neither the generator's nor the attention op's own cost counts
as overhead:

- `dispatch`: `lcaam_attention(q, k, v, M)` minus the hand-written fused attention
  softmax((QKᵀ·scale ◇ M)) V of the same (decode) shapes;
- `decode/<impl>/<generator>`: (patched − unpatched decode time) / attention calls, minus
  what the hand-written LCAAM attention with its generator costs over the plain attention
  at those shapes: everything the library and its adapter add per call.

Run: `python benchmarks/per_call.py` (a few minutes on two CPU cores; on a GPU when one is
there, `--device cuda` for the ViT rows). Times are the best of repeats taken in turns (`--statistic
median` for medians), on the wall clock, or with `--clock cpu` in this process's CPU time (all
its threads), which other processes on a shared machine disturb much less (CPU runs only). A
machine shared with other work only ever slows a repeat down, so the best of them is the
least disturbed figure and the one that repeats from run to run (timeit's advice).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import lcaam_patch

DECODE_TOKENS = 48
PROMPT_TOKENS = 16
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


STATISTICS: dict[str, Callable[[list[float]], float]] = {"best": min, "median": statistics.median}
statistic = STATISTICS["best"]


def _timed_in_turns(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Seconds per call of each function (`statistic` of its repeats), the functions taking
    turns each repeat."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    sync()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            sync()
            times[name].append(clock() - start)
    return {name: statistic(values) for name, values in times.items()}


def _llama(implementation: str) -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
        attn_implementation=implementation,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _decode(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    def step() -> object:
        with torch.no_grad():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=DECODE_TOKENS,
                min_new_tokens=DECODE_TOKENS,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )

    return step


def _handwritten(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor | None, scale: float
) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * scale
    if m is not None:
        scores = scores * m.unsqueeze(1)
    return torch.softmax(scores, dim=-1) @ v


def _per_call_costs(repeats: int) -> dict[str, float]:
    """Seconds per call at decode shapes (1 query, 8 heads of 32, keys up to 64): the plain
    attention, the hand-written LCAAM attention with each generator, and `lcaam_attention`."""
    heads, dim, width, keys = 8, 32, 256, PROMPT_TOKENS + DECODE_TOKENS // 2
    q = torch.randn(1, heads, 1, dim)
    k, v = torch.randn(1, heads, keys, dim), torch.randn(1, heads, keys, dim)
    x, kv_tokens = torch.randn(1, 1, width), torch.randn(1, keys, width)
    mlp, a_proj, b_proj = nn.Linear(width, 128), nn.Linear(width, 1), nn.Linear(width, 1)
    scale = dim**-0.5
    m = torch.ones(1, 1, keys)
    low = lcaam_patch.LowRankMask(torch.ones(1, 1, 1), torch.ones(1, keys, 1))
    inner = 200

    def loop(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            for _ in range(inner):
                fn()
            return None

        return run

    with torch.no_grad():
        fns = {
            "plain": loop(lambda: _handwritten(q, k, v, None, scale)),
            "handwritten": loop(lambda: _handwritten(q, k, v, m, scale)),
            "handwritten+mlp": loop(lambda: _handwritten(q, k, v, mlp(x)[..., :keys], scale)),
            "handwritten+lowrank": loop(
                lambda: _handwritten(q, k, v, a_proj(x) @ b_proj(kv_tokens).transpose(-2, -1), scale)
            ),
            "lcaam_attention": loop(lambda: lcaam_patch.lcaam_attention(q, k, v, m, fusion="mul", scale=scale)),
            "lcaam_attention/lowrank": loop(
                lambda: lcaam_patch.lcaam_attention(q, k, v, low, fusion="mul", scale=scale)
            ),
        }
        times = _timed_in_turns(fns, repeats, lambda: None)
    return {name: t / inner for name, t in times.items()}


def decode_rows(repeats: int) -> list[tuple[str, float, float, float]]:
    """(variant, unpatched s, patched s, overhead µs per attention call) for each decode case."""
    costs = _per_call_costs(repeats * 3)
    rows = []
    ids = torch.randint(0, 256, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    calls = 8 * DECODE_TOKENS  # the prefill is one call per layer too, and counted in
    for implementation in ("eager", "sdpa"):
        base = _llama(implementation)
        variants = {
            "mlp": lcaam_patch.apply(copy.deepcopy(base), max_kv_tokens=128),
            "lowrank": lcaam_patch.apply(copy.deepcopy(base), generator="lowrank", rank=1),
        }
        fns = {"unpatched": _decode(base, ids), **{n: _decode(m, ids) for n, m in variants.items()}}
        times = _timed_in_turns(fns, repeats, lambda: None)
        for generator in variants:
            arithmetic = costs[f"handwritten+{generator}"] - costs["plain"]
            overhead = (times[generator] - times["unpatched"]) / calls - arithmetic
            rows.append((f"decode/{implementation}/{generator}", times["unpatched"], times[generator], overhead))
    rows.append(
        (
            "dispatch (lcaam_attention, dense M)",
            costs["handwritten"],
            costs["lcaam_attention"],
            costs["lcaam_attention"] - costs["handwritten"],
        )
    )
    rows.append(
        (
            "dispatch (lcaam_attention, lowrank M)",
            costs["handwritten"],
            costs["lcaam_attention/lowrank"],
            costs["lcaam_attention/lowrank"] - costs["handwritten"],
        )
    )
    return rows


def vit_rows(device: str, repeats: int, train_batch: int) -> list[tuple[str, float, float, float]]:
    """(variant, unpatched s, patched s, nan) for the ViT-S/16 forward and the ViT-Ti step."""
    import timm

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    torch.manual_seed(0)
    small = timm.create_model("vit_small_patch16_224", num_classes=10).eval().to(device)
    patched_small = lcaam_patch.apply(copy.deepcopy(small), fusion="mul")
    image = torch.randn(1, 3, 224, 224, device=device)

    def forward(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return model(image)

        return run

    times = _timed_in_turns({"unpatched": forward(small), "patched": forward(patched_small)}, repeats, sync)
    rows.append(("vit_s16 forward b1", times["unpatched"], times["patched"], float("nan")))

    tiny = timm.create_model("vit_tiny_patch16_224", num_classes=10).train().to(device)
    patched_tiny = lcaam_patch.apply(copy.deepcopy(tiny), fusion="mul")
    images = torch.randn(train_batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 10, (train_batch,), device=device)

    def step(model: nn.Module) -> Callable[[], object]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run() -> object:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            return None

        return run

    times = _timed_in_turns({"unpatched": step(tiny), "patched": step(patched_tiny)}, max(2, repeats // 2), sync)
    rows.append((f"vit_ti train step b{train_batch}", times["unpatched"], times["patched"], float("nan")))
    return rows


def main() -> None:
    """Run every case and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the ViT rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (CPU runs only)")
    parser.add_argument("--statistic", choices=sorted(STATISTICS), default="best", help="of the repeats of each case")
    args = parser.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu times CPU runs only; a GPU's work is not in the process's CPU time")
    global clock, statistic
    clock, statistic = CLOCKS[args.clock], STATISTICS[args.statistic]
    import timm
    import transformers

    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
        f"lcaam_patch {lcaam_patch.__version__}; decode on the CPU with 1 thread, ViT rows on "
        f"{args.device} ({threads} threads); {args.statistic} of {args.repeats} repeats in turns, {args.clock} clock"
    )
    torch.set_num_threads(1)
    rows = decode_rows(args.repeats)
    torch.set_num_threads(threads)
    rows += vit_rows(args.device, args.repeats, args.train_batch)
    print(f"{'case':<40} {'unpatched':>12} {'patched':>12} {'ratio':>6} {'own µs/call':>12}")
    for name, base, patched, overhead in rows:
        own = "" if overhead != overhead else f"{overhead * 1e6:12.1f}"
        unit, scale = ("µs", 1e6) if name.startswith("dispatch") else ("ms", 1e3)
        print(f"{name:<40} {base * scale:10.1f}{unit} {patched * scale:10.1f}{unit} {patched / base:6.2f} {own:>12}")


if __name__ == "__main__":
    main()
