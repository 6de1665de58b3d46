"""Image classification training with timm, written after timm's `train.py` (pytorch-image-models):
`init_distributed_device` (gloo on the CPU under `torchrun`), `from timm.models import
create_model` with `--initial-checkpoint` as its `checkpoint_path` (loaded strictly inside the
builder), `create_optimizer_v2` and `create_scheduler_v2` on the built model, `resume_checkpoint`
for `--resume` before the DDP wrap, an image folder through `create_dataset`/`create_loader`,
top-1 on the validation split each epoch, and `CheckpointSaver` writing `last.pth.tar` and
`model_best.pth.tar` under `--output`/`--experiment` on rank 0.

train.py itself ships in neither the timm wheel nor its sdist, so CI runs this script, which takes
train.py's flags (those below); `vendor_tests/test_launcher_scripts.py` runs train.py too when
`LCAAM_TIMM_SCRIPTS` names a directory holding it. It knows nothing of LCAAM:
`lcaam-patch run --preset timm_vit -- timm_train.py ...` patches it.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from timm import utils
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.models import create_model, resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def arguments() -> argparse.Namespace:
    """train.py's flags that the launcher tests pass."""
    parser = argparse.ArgumentParser(description="timm image classification training (train.py's flags)")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="validation")
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=utils.ParseKwargs)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--initial-checkpoint", default="")
    parser.add_argument("--resume", default="")
    parser.add_argument("-b", "--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--no-prefetcher", action="store_false", dest="prefetcher")
    parser.add_argument("--opt", default="sgd")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default="./output/train")
    parser.add_argument("--experiment", required=True)
    return parser.parse_args()


def loader(args: argparse.Namespace, data: dict[str, Any], split: str, training: bool) -> Any:
    """An image-folder split of `--data-dir`, transformed as timm does for `data` and sharded per rank."""
    dataset = create_dataset(args.dataset, root=args.data_dir, split=split, is_training=training)
    return create_loader(
        dataset,
        input_size=data["input_size"],
        batch_size=args.batch_size,
        is_training=training,
        use_prefetcher=args.prefetcher,
        interpolation=data["interpolation"],
        mean=data["mean"],
        std=data["std"],
        crop_pct=data["crop_pct"],
        num_workers=args.workers,
        distributed=args.distributed,
        device=torch.device(args.device),
    )


def top1(model: nn.Module, batches: Any, device: torch.device) -> float:
    """Top-1 accuracy (percent) of `model` on `batches`."""
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for images, targets in batches:
            predicted = model(images.to(device)).argmax(dim=-1)
            correct += int((predicted == targets.to(device)).sum())
            seen += len(targets)
    return 100.0 * correct / max(seen, 1)


def main() -> None:
    args = arguments()
    device = utils.init_distributed_device(args)
    utils.random_seed(args.seed, args.rank)
    model = create_model(
        args.model,
        num_classes=args.num_classes,
        checkpoint_path=args.initial_checkpoint,
        **args.model_kwargs,
    )
    model.to(device)
    data = resolve_data_config(vars(args), model=model)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr)
    start_epoch = 0
    if args.resume:
        start_epoch = resume_checkpoint(model, args.resume, optimizer=optimizer, log_info=args.rank == 0) or 0
    if args.distributed:
        model = DistributedDataParallel(model)
    scheduler, epochs = create_scheduler_v2(optimizer, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs)
    scheduler.step(start_epoch)
    train_batches = loader(args, data, args.train_split, training=True)
    val_batches = loader(args, data, args.val_split, training=False)
    saver = None
    if args.rank == 0:
        saver = utils.CheckpointSaver(
            model=model,
            optimizer=optimizer,
            args=args,
            checkpoint_dir=utils.get_outdir(args.output, args.experiment),
            max_history=1,
        )
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start_epoch, epochs):
        if args.distributed:
            train_batches.sampler.set_epoch(epoch)
        model.train()
        for images, targets in train_batches:
            loss = loss_fn(model(images.to(device)), targets.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step(epoch + 1)
        accuracy = top1(model, val_batches, device)
        if saver is not None:
            saver.save_checkpoint(epoch, metric=accuracy)
            print(f"epoch {epoch}: loss {loss.item():.4f}, top1 {accuracy:.2f}")
    if args.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
