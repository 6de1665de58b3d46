"""Support for the LLaMA-Adapter V2 vendor test: the submodule, a tiny model, CPU stubs.

Upstream (`integration/LLaMA-Adapter/llama_adapter_v2_multimodal7b`) needs things a CPU
test cannot have; `stubs()` stands in for them while upstream is imported and run:

- `clip.load` downloads OpenAI's CLIP: a tiny randomly initialised CLIP-shaped vision
  encoder (`TinyCLIP`, CLIP's `ResidualAttentionBlock` calls on `nn.MultiheadAttention`)
  takes its place.
- `llama.tokenizer` reads a SentencePiece model: `WordPieces` maps words to ids in
  LLaMA's 32000-word vocabulary (upstream's loss asserts that size).
- `util/misc.py` imports `torch._six`, which PyTorch removed in 2.0: a module with `inf`.
- `LLaMA_adapter` builds LLaMA under `torch.set_default_tensor_type(torch.cuda.HalfTensor)`,
  `Attention.train(False)` allocates its KV cache with `.cuda()` and the training loop calls
  `torch.cuda.synchronize()`: without CUDA these become CPU fp32, identity and a no-op.
- upstream's checkpoints pickle its `argparse.Namespace`, which `torch.load`'s default
  `weights_only=True` (torch >= 2.6) refuses: it is allowed as a safe global.

Run as a script, this module installs the stubs and runs the `lcaam-patch` command line
with its arguments; `pretrain` runs the steps of upstream's `main_pretrain.py` on the tiny
model, so the test drives the real launcher in a fresh process:

    python vendor_tests/llama_adapter_support.py run --preset llama_adapter -- \\
        vendor_tests/llama_adapter_support.py pretrain --workdir DIR

Only the standard library, torch and lcaam_patch are imported at module level, so the
test module imports (and skips) where the submodule is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import types
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from upstream_path import imports_from

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBMODULE = REPO_ROOT / "integration" / "LLaMA-Adapter"
UPSTREAM = SUBMODULE / "llama_adapter_v2_multimodal7b"
PATCH = REPO_ROOT / "integration" / "patches" / "LLaMA-Adapter.patch"
SKIP_MESSAGE = (
    "LLaMA-Adapter is not checked out: run `git submodule update --init "
    "integration/LLaMA-Adapter` (or clone with --recurse-submodules) to run the "
    "LLaMA-Adapter V2 vendor test"
)
UPSTREAM_PACKAGES = (
    "llama",
    "util",
    "data",
    "engine_pretrain",
    "engine_finetune",
    "main_pretrain",
    "main_finetune",
)
STUBBED = ("clip", "sentencepiece", "torch._six")

VOCAB_SIZE = 32000
LLAMA_PARAMS = {"dim": 32, "multiple_of": 16, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-6}
TINY_MODEL = {
    "max_seq_len": 64,
    "max_batch_size": 2,
    "v_embed_dim": 32,
    "v_depth": 2,
    "v_num_heads": 4,
    "v_mlp_ratio": 2.0,
    "query_len": 4,
    "query_layer": 1,
}
CLIP_WIDTH, CLIP_LAYERS, CLIP_HEADS, CLIP_PATCH, CLIP_OUTPUT = 16, 2, 2, 8, 24
IMAGE_SIZE = 16
CLIP_TOKENS = (IMAGE_SIZE // CLIP_PATCH) ** 2 + 1
MAX_WORDS = 48
ALL_TARGETS = ("visual_blocks.*.attn", "clip.visual.transformer.resblocks.*.attn", "llama.layers.*.attention")


def submodule_present() -> bool:
    """Whether integration/LLaMA-Adapter holds upstream's code."""
    return (UPSTREAM / "llama" / "llama_adapter.py").is_file()


class _ResidualAttentionBlock(nn.Module):
    """CLIP's residual block: sequence-first `nn.MultiheadAttention`, called as CLIP calls it."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*(_ResidualAttentionBlock(width, heads) for _ in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class _VisionTransformer(nn.Module):
    """The attributes of CLIP's `VisionTransformer` that `LLaMA_adapter.clip_encode_image` reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, CLIP_WIDTH, kernel_size=CLIP_PATCH, stride=CLIP_PATCH, bias=False)
        self.class_embedding = nn.Parameter(0.1 * torch.randn(CLIP_WIDTH))
        self.positional_embedding = nn.Parameter(0.1 * torch.randn(CLIP_TOKENS, CLIP_WIDTH))
        self.ln_pre = nn.LayerNorm(CLIP_WIDTH)
        self.transformer = _Transformer(CLIP_WIDTH, CLIP_LAYERS, CLIP_HEADS)
        self.ln_post = nn.LayerNorm(CLIP_WIDTH)
        self.proj = nn.Parameter(0.1 * torch.randn(CLIP_WIDTH, CLIP_OUTPUT))


class TinyCLIP(nn.Module):
    """A tiny randomly initialised stand-in for what `clip.load` returns."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = _VisionTransformer()
        self.transformer = _Transformer(CLIP_WIDTH, 1, CLIP_HEADS)


def _load_clip(
    name: str, device: Any = "cpu", jit: bool = False, download_root: str | None = None
) -> tuple[nn.Module, Any]:
    return TinyCLIP(), torch.nn.Identity()


class WordPieces:
    """Stands in for `sentencepiece.SentencePieceProcessor`: one id per word, 32000 ids."""

    def __init__(self, model_file: str | None = None) -> None:
        self.model_file = model_file

    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def get_piece_size(self) -> int:
        return VOCAB_SIZE

    def bos_id(self) -> int:
        return 1

    def eos_id(self) -> int:
        return 2

    def pad_id(self) -> int:
        return -1

    def encode(self, text: str) -> list[int]:
        return [3 + zlib.crc32(word.encode()) % (VOCAB_SIZE - 3) for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"<{i}>" for i in ids)


def _stub_modules() -> dict[str, types.ModuleType]:
    clip = types.ModuleType("clip")
    clip.load = _load_clip  # type: ignore[attr-defined]
    sentencepiece = types.ModuleType("sentencepiece")
    sentencepiece.SentencePieceProcessor = WordPieces  # type: ignore[attr-defined]
    six = types.ModuleType("torch._six")
    six.inf = math.inf  # type: ignore[attr-defined]
    return {"clip": clip, "sentencepiece": sentencepiece, "torch._six": six}


def _cpu_tensor_type(set_default_tensor_type: Any) -> Any:
    def set_type(kind: Any) -> None:
        if kind in (torch.cuda.HalfTensor, torch.cuda.FloatTensor):
            kind = torch.FloatTensor
        set_default_tensor_type(kind)

    return set_type


def _identity(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _nothing() -> None:
    return None


@contextlib.contextmanager
def stubs() -> Iterator[None]:
    """Install the stand-ins of the module docstring; restore everything afterwards."""
    saved_modules = {name: sys.modules.get(name) for name in STUBBED}
    saved = (torch.set_default_tensor_type, torch.Tensor.cuda, torch.cuda.synchronize)
    sys.modules.update(_stub_modules())
    if not torch.cuda.is_available():
        torch.set_default_tensor_type = _cpu_tensor_type(saved[0])
        torch.Tensor.cuda = _identity
        torch.cuda.synchronize = _nothing
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            yield
    finally:
        torch.set_default_tensor_type, torch.Tensor.cuda, torch.cuda.synchronize = saved
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def upstream_on_path() -> contextlib.AbstractContextManager[None]:
    """Import upstream from the submodule in this process, and forget it afterwards.

    Bytecode is not written, so the submodule's work tree stays clean.
    """
    return imports_from(UPSTREAM, UPSTREAM_PACKAGES)


def write_checkpoint_dir(root: Path) -> tuple[Path, Path]:
    """A LLaMA directory for the tiny model: `7B/params.json` and an empty tokenizer file."""
    ckpt_dir = root / "7B"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "params.json").write_text(json.dumps(LLAMA_PARAMS))
    tokenizer = root / "tokenizer.model"
    tokenizer.write_bytes(b"")
    return ckpt_dir, tokenizer


def build_model(root: Path, phase: str, **overrides: Any) -> nn.Module:
    """Upstream's `LLaMA_adapter` with the tiny config (stubs and upstream must be active)."""
    from llama.llama_adapter import LLaMA_adapter

    ckpt_dir, tokenizer = write_checkpoint_dir(root)
    return LLaMA_adapter(str(ckpt_dir), str(tokenizer), phase=phase, **{**TINY_MODEL, **overrides})


def open_gates(model: nn.Module, value: float = 0.5) -> None:
    """Set LLaMA's zero-init adapter gates to `value`, as after pre-training, so that the
    visual path (and every LCAAM site) gets gradients."""
    with torch.no_grad():
        for layer in model.llama.layers:
            layer.attention.gate.fill_(value)


def synthetic_batches(
    model: nn.Module, count: int, batch_size: int = 2, seed: int = 0
) -> list[tuple[torch.Tensor, ...]]:
    """Image/caption batches in the format of upstream's `PretrainDataset`.

    Each item is (tokens, labels, token mask, image): the caption prompt of upstream's
    pre-training, tokenised with the model's tokenizer, padded to `MAX_WORDS`; labels are 0
    (ignored by the loss) on the prompt and the padding. The caption names the colour that
    dominates the image.
    """
    from llama.utils import format_prompt

    generator = torch.Generator().manual_seed(seed)
    colours = ("red", "green", "blue")
    prompt = format_prompt("Generate caption of this image", None)
    batches = []
    for _ in range(count):
        items = []
        for _ in range(batch_size):
            colour = int(torch.randint(len(colours), (1,), generator=generator))
            image = 0.1 * torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
            image[colour] += 1.0
            caption = f"a {colours[colour]} picture"
            start = torch.tensor(model.tokenizer.encode(prompt, bos=True, eos=False))
            tokens = torch.tensor(model.tokenizer.encode(prompt + " " + caption, bos=True, eos=True))
            tokens = torch.cat([tokens, torch.zeros(MAX_WORDS - len(tokens), dtype=torch.int64)])
            labels = tokens.clone()
            labels[: len(start)] = 0
            items.append((tokens, labels, (tokens != 0).float(), image))
        batches.append(tuple(torch.stack(column) for column in zip(*items)))
    return batches


def training_args(output_dir: Path, **overrides: Any) -> argparse.Namespace:
    """The options upstream's `train_one_epoch` and `misc.save_model` read."""
    options = {
        "accum_iter": 1,
        "lr": 1e-3,
        "min_lr": 0.0,
        "warmup_epochs": 0,
        "epochs": 1,
        "weight_decay": 0.05,
        "output_dir": str(output_dir),
    }
    options.update(overrides)
    return argparse.Namespace(**options)


def lcaam_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LCAAM generator parameters of `model` by name."""
    return {name: p for name, p in model.named_parameters() if ".lcaam." in f".{name}"}


def pretrain(workdir: Path, steps: int = 2) -> dict[str, Any]:
    """The steps of upstream's `main_pretrain.py` on the tiny model, in its import order.

    Model, `misc.add_weight_decay` groups, AdamW, `NativeScalerWithGradNormCount`,
    `engine_pretrain.train_one_epoch`, `misc.save_model`. Returns what the test checks.
    """
    import lcaam_patch

    sys.path.insert(0, str(UPSTREAM))
    # main_pretrain.py's imports, in its order: the launcher's post-import hook sees them so
    from util import misc  # noqa: I001
    from util.misc import NativeScalerWithGradNormCount as NativeScaler
    from llama.llama_adapter import LLaMA_adapter
    from engine_pretrain import train_one_epoch

    ckpt_dir, tokenizer = write_checkpoint_dir(workdir)
    model = LLaMA_adapter(str(ckpt_dir), str(tokenizer), phase="pretrain", **TINY_MODEL)
    patched_at_build = (
        [path for path, _, _ in lcaam_patch.patched_sites(model)] if lcaam_patch.is_patched(model) else []
    )
    model.to(torch.device("cpu"))
    open_gates(model)
    args = training_args(workdir)
    param_groups = misc.add_weight_decay(model, args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95))
    loss_scaler = NativeScaler()
    in_groups = {id(p) for group in param_groups for p in group["params"]}
    lcaam = lcaam_parameters(model)
    before = {name: p.detach().clone() for name, p in lcaam.items()}
    stats = train_one_epoch(
        model, synthetic_batches(model, steps), optimizer, torch.device("cpu"), 0, loss_scaler, args=args
    )
    misc.save_model(
        args=args, model=model, model_without_ddp=model, optimizer=optimizer, loss_scaler=loss_scaler, epoch=0
    )
    return {
        "patched_at_build": patched_at_build,
        "lcaam_parameters": sorted(lcaam),
        "in_weight_decay_groups": sorted(name for name, p in lcaam.items() if id(p) in in_groups),
        "changed": sorted(name for name, p in lcaam.items() if not torch.equal(p.detach(), before[name])),
        "loss": stats["closs"],
    }


def main(argv: list[str]) -> int:
    """`pretrain --workdir DIR`: the tiny pre-training run (inside the launcher);
    anything else: `lcaam-patch` with the stubs installed."""
    if argv[:1] == ["pretrain"]:
        parser = argparse.ArgumentParser(prog="llama_adapter_support.py pretrain")
        parser.add_argument("--workdir", type=Path, required=True)
        parser.add_argument("--steps", type=int, default=2)
        options = parser.parse_args(argv[1:])
        report = pretrain(options.workdir, options.steps)
        (options.workdir / "report.json").write_text(json.dumps(report))
        return 0
    from lcaam_patch.cli import main as cli_main

    with stubs():
        return cli_main(argv)


if __name__ == "__main__":
    status = main(sys.argv[1:])
    if status:
        sys.exit(status)
