"""Support for the SwinBERT vendor test: the submodule, test-only stubs, a tiny model and data.

SwinBERT's modules import packages that a CPU test does not use: deepspeed, apex (amp and
its DDP), azureml (run logging), fairscale's checkpoint wrapper, tensorboardX (the logger
module), and boto3/botocore/requests (checkpoint downloads). `upstream()` replaces each with
a small stub in `sys.modules` while the test runs, and makes `Tensor.cuda()` return the
tensor itself, because upstream's `VideoTransformer.forward` calls `.cuda()` on its
diagonal mask. The model is upstream's own `VideoTransformer`, built from a tiny Video Swin
and a 2-layer BERT, trained by upstream's own `train()` and optimizer builder
(`mixed_precision_init`) from `src/tasks/run_caption_VidSwinBert.py` on batches made by
upstream's `CaptionTensorizer` from random videos.

Run as a script, this module installs the stubs and runs the `lcaam-patch` command line
with its arguments, so the test drives a script through the real launcher in a fresh
process:

    python vendor_tests/swinbert_support.py run --preset swinbert -- build_swinbert.py

Only the standard library, torch and lcaam_patch are imported at module level, so the
test module imports (and skips) where SwinBERT and its dependencies are absent.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
SWINBERT_ROOT = REPO_ROOT / "integration" / "SwinBERT"
TRAIN_SCRIPT = SWINBERT_ROOT / "src" / "tasks" / "run_caption_VidSwinBert.py"
BERT_FILES = SWINBERT_ROOT / "models" / "captioning" / "bert-base-uncased"
SKIP_MESSAGE = (
    "SwinBERT is not checked out: run `git submodule update --init integration/SwinBERT` "
    "(or clone with --recurse-submodules) to run the SwinBERT vendor test"
)
UPSTREAM_DEPENDENCIES = ("einops", "easydict", "six", "addict", "yapf", "yaml", "numpy", "tqdm")
PIN = "03116f1f3fd7e42d4700a25090f13aa2aa253011"
PATCH = REPO_ROOT / "integration" / "patches" / "SwinBERT.patch"
STUBBED = (
    "deepspeed",
    "apex",
    "apex.amp",
    "apex.parallel",
    "azureml",
    "azureml.core",
    "azureml.core.run",
    "fairscale",
    "fairscale.nn",
    "fairscale.nn.misc",
    "tensorboardX",
    "boto3",
    "botocore",
    "botocore.exceptions",
    "requests",
)
# Imports of the training script that only its data loading and evaluation use: they need
# the data sets' TSV files, OpenCV and the COCO caption tools, none of which the test has.
UNUSED_SCRIPT_IMPORTS = (
    "src.datasets.vl_dataloader",
    "src.evalcap.utils_caption_evaluate",
    "src.utils.tsv_file_ops",
)

FRAMES = 4
RESOLUTION = 64
VIDEO_TOKENS = FRAMES // 2 * (RESOLUTION // 32) ** 2
IMG_FEATURE_DIM = 16
MAX_SEQ_LENGTH = 12
MAX_GEN_LENGTH = 8
CAPTIONS = (
    "a man is playing a guitar on a stage",
    "two dogs run along the beach",
    "a woman is cooking pasta in a kitchen",
    "children are playing football in a park",
)


def submodule_present() -> bool:
    """Whether integration/SwinBERT holds upstream's code."""
    return TRAIN_SCRIPT.is_file()


def missing_dependencies() -> list[str]:
    """Upstream's pure-Python dependencies (`pip install -e '.[swinbert]'`) not installed."""
    return [name for name in UPSTREAM_DEPENDENCIES if importlib.util.find_spec(name) is None]


class _Stub:
    """Accepts any call and any attribute; stands in for loggers and writers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return _Stub

    @classmethod
    def get_context(cls) -> _Stub:
        """azureml's `Run.get_context()`."""
        return cls()


@contextlib.contextmanager
def _scale_loss(loss: torch.Tensor, optimizer: Any, delay_unscale: bool = False) -> Iterator[torch.Tensor]:
    yield loss


def _master_params(optimizer: torch.optim.Optimizer) -> Iterator[nn.Parameter]:
    for group in optimizer.param_groups:
        yield from group["params"]


def _stub_modules() -> dict[str, types.ModuleType]:
    def module(name: str, **attributes: Any) -> types.ModuleType:
        made = types.ModuleType(name)
        made.__dict__.update(attributes)
        return made

    amp = module(
        "apex.amp",
        initialize=lambda model, optimizer, **options: (model, optimizer),
        scale_loss=_scale_loss,
        master_params=_master_params,
    )
    parallel = module("apex.parallel", DistributedDataParallel=nn.parallel.DistributedDataParallel)
    run = module("azureml.core.run", Run=_Stub)
    misc = module("fairscale.nn.misc", checkpoint_wrapper=lambda wrapped, **options: wrapped)
    exceptions = module("botocore.exceptions", ClientError=Exception)
    return {
        "deepspeed": module("deepspeed"),
        "apex": module("apex", amp=amp, parallel=parallel),
        "apex.amp": amp,
        "apex.parallel": parallel,
        "azureml": module("azureml"),
        "azureml.core": module("azureml.core", run=run),
        "azureml.core.run": run,
        "fairscale": module("fairscale"),
        "fairscale.nn": module("fairscale.nn", misc=misc),
        "fairscale.nn.misc": misc,
        "tensorboardX": module("tensorboardX", SummaryWriter=_Stub),
        "boto3": module("boto3"),
        "botocore": module("botocore", exceptions=exceptions),
        "botocore.exceptions": exceptions,
        "requests": module("requests"),
    }


def _tensor_itself(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def _is_upstream(name: str) -> bool:
    return name == "src" or name.startswith("src.")


def install() -> None:
    """Stubs into `sys.modules`, `Tensor.cuda` as a no-op, SwinBERT's root on `sys.path`."""
    sys.modules.update(_stub_modules())
    torch.Tensor.cuda = _tensor_itself  # type: ignore[method-assign]
    sys.path.insert(0, str(SWINBERT_ROOT))


@contextlib.contextmanager
def upstream() -> Iterator[types.SimpleNamespace]:
    """Install the stubs, import SwinBERT's modules, and undo all of it on exit.

    Yields a namespace with the modules and classes the test uses.
    """
    saved_modules = {name: sys.modules.get(name) for name in STUBBED}
    saved_cuda = torch.Tensor.cuda
    saved_path = list(sys.path)
    install()
    try:
        yield types.SimpleNamespace(
            model=importlib.import_module("src.modeling.video_captioning_e2e_vid_swin_bert"),
            load_swin=importlib.import_module("src.modeling.load_swin"),
            video_swin=importlib.import_module("src.modeling.video_swin.swin_transformer"),
            bert=importlib.import_module("src.layers.bert"),
            tensorizer=importlib.import_module("src.datasets.caption_tensorizer"),
            load_save=importlib.import_module("src.utils.load_save"),
        )
    finally:
        torch.Tensor.cuda = saved_cuda  # type: ignore[method-assign]
        sys.path[:] = saved_path
        for name in [n for n in sys.modules if _is_upstream(n)]:
            del sys.modules[name]
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def model_arguments(**overrides: Any) -> argparse.Namespace:
    """The training options `VideoTransformer(args, ...)` and the test's runs read.

    The names and meanings are upstream's command-line options (`src/configs/config.py`
    and `run_caption_VidSwinBert.py`); `max_img_seq_length` is what upstream's
    `check_arguments` computes from `max_num_frames` and `img_res`.
    """
    options = dict(
        max_num_frames=FRAMES,
        img_res=RESOLUTION,
        max_img_seq_length=VIDEO_TOKENS,
        img_feature_dim=IMG_FEATURE_DIM,
        max_seq_length=MAX_SEQ_LENGTH,
        max_seq_a_length=MAX_SEQ_LENGTH,
        max_gen_length=MAX_GEN_LENGTH,
        max_masked_tokens=3,
        mask_prob=0.5,
        use_checkpoint=False,
        freeze_backbone=False,
        grid_feat=True,
        learn_mask_enabled=True,
        sparse_mask_soft2hard=False,
        loss_sparse_w=0.5,
        drop_out=0.1,
    )
    options.update(overrides)
    return argparse.Namespace(**options)


def tokenizer() -> Any:
    """Upstream's `BertTokenizer` with the vocabulary SwinBERT ships."""
    from src.layers.bert import BertTokenizer

    return BertTokenizer.from_pretrained(str(BERT_FILES), do_lower_case=True)


def build_parts(args: argparse.Namespace) -> tuple[Any, nn.Module, nn.Module]:
    """A tiny Video Swin (upstream's `myVideoSwin` around `SwinTransformer3D`) and a 2-layer
    `BertForImageCaptioning` configured as upstream's `get_bert_model` configures it.

    Returns (bert_config, swin, bert), the arguments `VideoTransformer` takes after `args`.
    """
    from src.layers.bert import BertConfig, BertForImageCaptioning
    from src.modeling.load_swin import myVideoSwin
    from src.modeling.video_swin.swin_transformer import SwinTransformer3D

    backbone = SwinTransformer3D(
        patch_size=(2, 4, 4),
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=(2, 2, 2),
        drop_path_rate=0.0,
        patch_norm=True,
    )
    swin = myVideoSwin(args=args, cfg=None, backbone=backbone)
    config = BertConfig.from_pretrained(str(BERT_FILES), num_labels=2, finetuning_task="image_captioning")
    config.img_feature_type = "frcnn"
    config.hidden_dropout_prob = args.drop_out
    config.loss_type = "classification"
    config.tie_weights = True
    config.freeze_embedding = False
    config.label_smoothing = 0
    config.drop_worst_ratio = 0
    config.drop_worst_after = 0
    config.img_feature_dim = args.img_feature_dim
    config.num_hidden_layers = 2
    config.hidden_size = 32
    config.num_attention_heads = 2
    config.intermediate_size = 64
    config.max_position_embeddings = 64
    return config, swin, BertForImageCaptioning(config)


def build_model(**overrides: Any) -> nn.Module:
    """Upstream's `VideoTransformer` on the tiny parts, built and frozen as upstream's
    training script does (seeded, so two calls give the same weights)."""
    from src.modeling.video_captioning_e2e_vid_swin_bert import VideoTransformer

    args = model_arguments(**overrides)
    torch.manual_seed(0)
    model = VideoTransformer(args, *build_parts(args))
    model.freeze_backbone(freeze=args.freeze_backbone)
    return model


def _tensorizer(tokens: Any, *, is_train: bool) -> Any:
    from src.datasets.caption_tensorizer import CaptionTensorizer

    length = MAX_SEQ_LENGTH if is_train else MAX_GEN_LENGTH
    return CaptionTensorizer(
        tokens,
        max_img_seq_length=VIDEO_TOKENS,
        max_seq_length=length,
        max_seq_a_length=length,
        mask_prob=0.5,
        max_masked_tokens=3,
        attn_mask_type="learn_vid_att",
        is_train=is_train,
    )


def videos(count: int, *, seed: int) -> torch.Tensor:
    """Random videos (count, frames, 3, H, W), distinct per sample."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, FRAMES, 3, RESOLUTION, RESOLUTION, generator=generator)


def train_batch(tokens: Any, clips: torch.Tensor, *, seed: int) -> dict[str, torch.Tensor]:
    """A training batch from upstream's tensorizer: the inputs dict its `train()` builds."""
    tensorizer = _tensorizer(tokens, is_train=True)
    torch.manual_seed(seed)
    examples = [tensorizer.tensorize_example_e2e(CAPTIONS[i % len(CAPTIONS)], clip) for i, clip in enumerate(clips)]
    batch = [torch.stack(column) for column in zip(*examples)]
    names = (
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "img_feats",
        "masked_pos",
        "masked_ids",
    )
    return dict(zip(names, batch))


def train_loader(tokens: Any, *, steps: int, batch_size: int) -> list[tuple[list[str], tuple[torch.Tensor, ...], dict]]:
    """What upstream's train loader yields, (img_keys, batch, meta_data), for `steps` steps."""
    loader = []
    for step in range(steps):
        inputs = train_batch(tokens, videos(batch_size, seed=step), seed=step)
        keys = [f"video{step}_{i}" for i in range(batch_size)]
        loader.append((keys, tuple(inputs.values()), {}))
    return loader


def decode_inputs(tokens: Any, clips: torch.Tensor, *, num_beams: int) -> dict[str, Any]:
    """The inputs upstream's `test()` gives the model to decode captions."""
    tensorizer = _tensorizer(tokens, is_train=False)
    examples = [tensorizer.tensorize_example_e2e("", clip) for clip in clips]
    batch = [torch.stack(column) for column in zip(*examples)]
    cls_id, sep_id, pad_id, mask_id = tokens.convert_tokens_to_ids(
        [tokens.cls_token, tokens.sep_token, tokens.pad_token, tokens.mask_token]
    )
    return {
        "is_decode": True,
        "input_ids": batch[0],
        "attention_mask": batch[1],
        "token_type_ids": batch[2],
        "img_feats": batch[3],
        "masked_pos": batch[4],
        "do_sample": False,
        "bos_token_id": cls_id,
        "pad_token_id": pad_id,
        "eos_token_ids": [sep_id],
        "mask_token_id": mask_id,
        "add_od_labels": False,
        "od_labels_start_posid": MAX_GEN_LENGTH,
        "max_length": MAX_GEN_LENGTH,
        "num_beams": num_beams,
        "temperature": 1,
        "top_k": 0,
        "top_p": 1,
        "repetition_penalty": 1,
        "length_penalty": 1,
        "num_return_sequences": 1,
        "num_keep_best": 1,
    }


def training_arguments(output_dir: Path, *, steps: int, **overrides: Any) -> argparse.Namespace:
    """The options upstream's `mixed_precision_init` and `train()` read, for a CPU run.

    Values follow upstream's MSRVTT training command (learning rate, backbone
    coefficient, sparsity weight) with apex at O0, which the stub makes plain fp32.
    """
    options = vars(model_arguments()) | dict(
        device=torch.device("cpu"),
        output_dir=str(output_dir),
        learning_rate=3e-4,
        backbone_coef_lr=0.05,
        adam_epsilon=1e-8,
        scheduler="warmup_linear",
        warmup_ratio=0.1,
        mixed_precision_method="apex",
        amp_opt_level=0,
        deepspeed_fp16=False,
        distributed=False,
        num_gpus=1,
        max_iter=steps,
        max_global_step=steps,
        global_iters_per_epoch=steps,
        save_steps=steps,
        num_train_epochs=1,
        gradient_accumulation_steps=1,
        max_grad_norm=1.0,
        logging_steps=steps,
        restore_ratio=-1,
        evaluate_during_training=False,
        val_yaml="MSRVTT-v2/val_32frames.yaml",
    )
    options.update(overrides)
    return argparse.Namespace(**options)


def training_script(*names: str) -> dict[str, Any]:
    """Functions of upstream's `run_caption_VidSwinBert.py`, run from its own source.

    The script's module-level imports run as written, except those that only its data
    loading and evaluation need (`UNUSED_SCRIPT_IMPORTS`); its `sys.path` setup and
    `main()` are left out. Returns the module namespace holding the functions `names`.
    """
    tree = ast.parse(TRAIN_SCRIPT.read_text(), filename=str(TRAIN_SCRIPT))
    kept: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            if module not in UNUSED_SCRIPT_IMPORTS:
                kept.append(node)
        elif isinstance(node, ast.FunctionDef) and node.name in names:
            kept.append(node)
        elif isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "aml_run" for target in node.targets
        ):
            kept.append(node)
    missing = set(names) - {n.name for n in kept if isinstance(n, ast.FunctionDef)}
    if missing:
        raise LookupError(f"{TRAIN_SCRIPT} defines no {sorted(missing)}; check out the pinned commit")
    namespace: dict[str, Any] = {
        "__name__": "run_caption_VidSwinBert",
        "__file__": str(TRAIN_SCRIPT),
    }
    exec(compile(ast.Module(body=kept, type_ignores=[]), str(TRAIN_SCRIPT), "exec"), namespace)
    return namespace


if __name__ == "__main__":
    install()
    from lcaam_patch.cli import main

    sys.exit(main(sys.argv[1:]))
