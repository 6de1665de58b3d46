"""Image classification evaluation with timm, written after timm's `validate.py`
(pytorch-image-models): `from timm.models import create_model`, then `load_checkpoint` of
`--checkpoint` into the built model, an image folder through `create_dataset`/`create_loader`,
and the result printed as validate.py prints it: `--result` and a JSON object with `top1`.

validate.py itself ships in neither the timm wheel nor its sdist, so CI runs this script, which
takes validate.py's flags (those below); `vendor_tests/test_launcher_scripts.py` runs validate.py
too when `LCAAM_TIMM_SCRIPTS` names a directory holding it. It knows nothing of LCAAM:
`lcaam-patch run --preset timm_vit -- timm_validate.py ...` patches it.
"""

from __future__ import annotations

import argparse
import json

import torch
from timm import utils
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.models import create_model, load_checkpoint


def arguments() -> argparse.Namespace:
    """validate.py's flags that the launcher tests pass."""
    parser = argparse.ArgumentParser(description="timm image classification evaluation (validate.py's flags)")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=utils.ParseKwargs)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("-b", "--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--no-prefetcher", action="store_false", dest="prefetcher")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    device = torch.device(args.device)
    model = create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    model.to(device).eval()
    data = resolve_data_config(vars(args), model=model)
    dataset = create_dataset(args.dataset, root=args.data_dir, split=args.split)
    batches = create_loader(
        dataset,
        input_size=data["input_size"],
        batch_size=args.batch_size,
        use_prefetcher=args.prefetcher,
        interpolation=data["interpolation"],
        mean=data["mean"],
        std=data["std"],
        crop_pct=data["crop_pct"],
        num_workers=args.workers,
        device=device,
    )
    top1, top5 = utils.AverageMeter(), utils.AverageMeter()
    with torch.no_grad():
        for images, targets in batches:
            output, targets = model(images.to(device)), targets.to(device)
            acc1, acc5 = utils.accuracy(output, targets, topk=(1, min(5, output.shape[-1])))
            top1.update(acc1.item(), len(targets))
            top5.update(acc5.item(), len(targets))
    results = {"model": args.model, "top1": round(top1.avg, 4), "top5": round(top5.avg, 4)}
    print(f"--result\n{json.dumps(results, indent=4)}")


if __name__ == "__main__":
    main()
