"""`lcaam-patch inspect`: what LCAAM would patch in a model, what it costs, what it learned."""

from __future__ import annotations

import argparse
import copy
import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidOptionError
from ..patching import apply, patched_sites
from ..pretrained import from_pretrained
from ..site import generator_of
from ..state_dict import load_lcaam_state_dict
from ..tools.capture import capture
from ..tools.cost import cost
from ..tools.summary import summary
from ..tools.survey import survey
from .options import add_apply_arguments, apply_options


def add_inspect_parser(commands: Any) -> None:
    """Register the `inspect` subcommand on an argparse subparsers object."""
    parser = commands.add_parser(
        "inspect",
        help="show the sites LCAAM would patch in a model, the summary and cost tables, and plots",
    )
    parser.add_argument("model", help="a timm model name, or module:function returning an nn.Module")
    parser.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (timm models know theirs)")
    parser.add_argument("--plot", metavar="DIR", help="write mask heatmaps and attention histograms here")
    parser.add_argument("--lcaam-weights", metavar="PATH", help="LCAAM weights saved with lcaam_state_dict")
    parser.add_argument(
        "--lcaam-dir", metavar="DIR", help="patch with the options and weights save_pretrained wrote there"
    )
    parser.add_argument("--preset", help="a registered preset; the options below override it")
    add_apply_arguments(parser)
    parser.set_defaults(handler=run_inspect)


def load_model(target: str) -> nn.Module:
    """A timm model by name (random weights), or the result of calling `module:function`."""
    if ":" in target:
        module_name, _, function = target.partition(":")
        try:
            model = getattr(importlib.import_module(module_name), function)()
        except (ImportError, AttributeError) as error:
            raise InvalidOptionError(
                f"cannot load {target!r} ({error}); give module:function where the module is "
                f"importable (check PYTHONPATH) and the function returns an nn.Module"
            ) from error
    else:
        import timm

        if target not in timm.list_models():
            raise InvalidOptionError(
                f"{target!r} is not a timm model name; see timm.list_models(), or give "
                f"module:function for your own model"
            )
        model = timm.create_model(target, pretrained=False)
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(f"{target!r} returned {type(model).__name__}, not an nn.Module")
    return model.eval()


def example_input(model: nn.Module, shape: str | None) -> torch.Tensor:
    """Random input of `shape`, or of the input size a timm model declares.

    A model whose main input is token ids (a transformers text model) gets random ids below
    its vocabulary size, of shape `shape` (default 1,16).
    """
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if getattr(model, "main_input_name", None) == "input_ids" and isinstance(vocab_size, int):
        sizes = [int(n) for n in shape.split(",")] if shape else [1, 16]
        return torch.randint(0, vocab_size, sizes)
    if shape:
        return torch.randn(*(int(n) for n in shape.split(",")))
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if "input_size" not in config:
        raise InvalidOptionError("this model does not declare its input size; pass --input-shape, e.g. 1,3,224,224")
    return torch.randn(1, *config["input_size"])


def token_groups(model: nn.Module, num_tokens: int) -> list[tuple[str, int, int]]:
    """Prefix tokens and patches of a timm ViT; one group otherwise."""
    prefix = getattr(model, "num_prefix_tokens", 0)
    if 0 < prefix < num_tokens:
        return [("prefix", 0, prefix), ("patches", prefix, num_tokens)]
    return [("tokens", 0, num_tokens)]


def _print_survey(model: nn.Module, options: dict[str, Any]) -> None:
    entries = survey(model, **options)
    print(f"Sites in {type(model).__name__}:")
    if not entries:
        print("  no attention module found")
    for entry in entries:
        who = entry.adapter or "no adapter"
        print(f"  [{entry.status:9}] {entry.path or '(root)'}  {entry.class_name}  ({who}): {entry.detail}")


def _write_plots(model: nn.Module, x: torch.Tensor, directory: Path) -> list[Path]:
    from ..tools.plots import attention_histograms, mask_heatmap, save_figure, token_rows

    baseline = copy.deepcopy(model)
    for _, module, _ in patched_sites(baseline):
        generator = generator_of(module)
        if generator is not None:
            generator.reset_to_identity()
    with torch.no_grad(), capture(model, attention=True) as seen, capture(baseline, attention=True) as plain:
        model(x)
        baseline(x)
    written = []
    paths = list(seen.masks)
    for index, path in enumerate(paths):
        mask = seen.masks[path][0]
        groups = token_groups(model, mask.shape[-1])
        name = path.replace(".", "_")
        written.append(
            save_figure(
                mask_heatmap(mask, groups=groups, title=f"{path}: M"), directory / f"mask_{index:02d}_{name}.png"
            )
        )
    middle = paths[len(paths) // 2]
    mask = seen.masks[middle][0]
    rows = sorted({0, mask.shape[-2] // 2, mask.shape[-2] - 1})
    written.append(
        save_figure(
            token_rows(mask, rows, groups=token_groups(model, mask.shape[-1]), title=f"{middle}: rows of M"),
            directory / "mask_rows.png",
        )
    )
    layers = sorted({paths[0], middle, paths[-1]}, key=paths.index)
    histograms = attention_histograms(
        {p: seen.attention[p][0] for p in layers}, {p: plain.attention[p][0] for p in layers}, layers=layers
    )
    written.append(save_figure(histograms, directory / "attention_histograms.png"))
    return written


def run_inspect(args: argparse.Namespace) -> int:
    """Print the survey, summary and cost tables; write plots when asked."""
    options = apply_options(args)
    if args.preset is not None:
        options["preset"] = args.preset
    model = load_model(args.model)
    if args.lcaam_dir:
        if options or args.lcaam_weights:
            raise InvalidOptionError(
                "--lcaam-dir brings its own options and weights; drop the apply options, --preset and --lcaam-weights"
            )
        from_pretrained(model, args.lcaam_dir)
    else:
        _print_survey(model, options)
        apply(model, **options)
        if args.lcaam_weights:
            load_lcaam_state_dict(model, torch.load(args.lcaam_weights, map_location="cpu"))
    print()
    print(summary(model))
    x = example_input(model, args.input_shape)
    print()
    print(f"Cost of one forward pass on input {tuple(x.shape)}:")
    print(cost(model, x))
    if args.plot:
        print()
        for path in _write_plots(model, x, Path(args.plot)):
            print(f"wrote {path}")
    return 0
