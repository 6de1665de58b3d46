"""`save_pretrained` / `from_pretrained`: the LCAAM weights alone, and what re-creates them.

A directory written by `save_pretrained` holds two files:

- `lcaam.safetensors`: the generator weights, keyed as in the patched `model.state_dict()`
  (`blocks.0.attn.lcaam.layers.0.weight`), in the dtype they had; no upstream weight.
- `lcaam.json`: the options of `apply` that re-create the sites, the preset if one was
  named, each site (path, adapter, geometry, whether it owns a generator), the adapters
  with their upstream versions, the library version, and each weight's dtype and shape.

`from_pretrained` patches an unpatched model with those options and loads the weights;
it checks the files, the sites and the weights before it touches the model.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import registered_adapters
from .config import LCAAMConfig
from .errors import AlreadyPatchedError, InvalidOptionError, LCAAMError, StateDictError, UnknownAdapterError
from .generators import LCAAMGenerator, LowRankGenerator, MaskGenerator
from .patching import (
    apply,
    claimant,
    is_patched,
    patched_sites,
    remove,
    require_module,
    require_patched,
    resolve_config,
    site_geometry,
)
from .site import GENERATOR_NAME, SiteGeometry, generator_of
from .state_dict import lcaam_state_dict, load_lcaam_state_dict
from .version import __version__

WEIGHTS_NAME = "lcaam.safetensors"
CONFIG_NAME = "lcaam.json"
FORMAT = "lcaam_patch"
FORMAT_VERSION = 1

_Sites = dict[str, tuple[str, SiteGeometry]]
_Found = dict[str, tuple[str, SiteGeometry | str]]


def save_pretrained(
    model: nn.Module, directory: str | os.PathLike[str], *, preset: str | None = None, **options: Any
) -> Path:
    """Write the LCAAM weights of a patched `model` and what re-creates them to `directory`.

    The options of `apply` are read off the model. Pass `preset` and the options you gave
    `apply` to record them as given (needed only where the model cannot tell them, e.g. a
    token bound an adapter does not infer); they must re-create the model's sites exactly.
    Only LCAAM weights are written. Returns the directory.
    """
    require_patched(model, "save_pretrained")
    sites = _patched(model)
    skeleton = _unpatched_skeleton(model)
    if preset is None and not options:
        config = _read_config(model, skeleton, sites)
    else:
        config = resolve_config(preset, options)
        _check_reproduces(model, skeleton, config, sites)
    state = lcaam_state_dict(model)
    meta = sorted(key for key, value in state.items() if value.is_meta)
    if meta:
        raise StateDictError(
            f"LCAAM weights {meta[:3]} are on the meta device; materialise the model "
            f"(model.to_empty(...), then lcaam_patch.reset_generators(model) or training) before saving"
        )
    weights = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    owners = {path for path, module, _ in patched_sites(model) if generator_of(module) is not None}
    adapters = {name for name, _ in sites.values()}
    registry = registered_adapters()
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "model_class": _class_name(model),
        "preset": preset,
        "config": _config_to_json(config),
        "sites": [
            {"path": path, "adapter": name, "geometry": dataclasses.asdict(geometry), "owns_generator": path in owners}
            for path, (name, geometry) in sites.items()
        ],
        "adapters": {
            name: {"distribution": registry[name].distribution, "version": registry[name].installed_version()}
            for name in sorted(adapters)
        },
        "weights": {key: {"dtype": str(value.dtype), "shape": list(value.shape)} for key, value in weights.items()},
    }
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(target / WEIGHTS_NAME), metadata={"format": "pt"})
    (target / CONFIG_NAME).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return target


def from_pretrained(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Patch the unpatched `model` as the model saved in `directory` was, and load its LCAAM
    weights (cast to the generators' dtype and device). Returns `model`.

    The files, the sites `apply` would patch (paths, adapters, geometry) and the weights are
    checked first: on any error the model is unchanged. Different upstream or library
    versions than the saved ones are warned about.
    """
    require_module(model, "from_pretrained")
    source = Path(directory)
    document = _read_document(source)
    weights = _read_weights(source, document)
    if is_patched(model):
        raise AlreadyPatchedError(
            "from_pretrained patches an unpatched model, but this one already carries LCAAM; call "
            "lcaam_patch.remove(model) first, or load the weights alone into a model patched with the "
            f"same options: load_lcaam_state_dict(model, safetensors.torch.load_file('{source / WEIGHTS_NAME}'))"
        )
    config = _config_from_json(document["config"], source)
    _check_adapters(document, source)
    saved: _Sites = {site["path"]: (site["adapter"], site["geometry"]) for site in document["sites"]}
    _compare_sites(saved, _would_patch(model, config), document, model, source)
    _warn_versions(document, source)
    apply(model, **{field.name: getattr(config, field.name) for field in dataclasses.fields(config)})
    try:
        load_lcaam_state_dict(model, weights)
    except BaseException:
        remove(model)
        raise
    return model


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _patched(model: nn.Module) -> _Sites:
    return {path: (site.adapter.name, site.geometry) for path, _, site in patched_sites(model)}


def _unpatched_skeleton(model: nn.Module) -> nn.Module | None:
    """A copy of the patched `model` with LCAAM removed and every parameter and buffer on
    `meta` (no weight is copied), for dry runs of `apply`; None if the model cannot be copied."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    try:
        skeleton = copy.deepcopy(model, memo)
        remove(skeleton)
    except Exception:  # an attribute deepcopy cannot copy, or a forward replaced after apply
        return None
    return skeleton


def _would_patch(model: nn.Module, config: LCAAMConfig) -> _Found:
    """The sites `apply(model, **config)` would patch in the unpatched `model`, by path, with
    adapter name and geometry (or why the adapter refuses the module); changes nothing."""
    adapters = list(registered_adapters().values())
    found: _Found = {}
    for path, module in model.named_modules():
        adapter = claimant(adapters, module, path, model)
        if adapter is None:
            continue
        try:
            geometry = site_geometry(path, module, adapter, model, config)
        except LCAAMError as error:
            found[path] = (adapter.name, f"refused: {error}")
            continue
        if geometry is not None:
            found[path] = (adapter.name, geometry)
    return found


def _first_generator(model: nn.Module) -> LCAAMGenerator:
    return next(g for _, m, _ in patched_sites(model) if (g := generator_of(m)) is not None)


def _first_layers(model: nn.Module) -> nn.ModuleList:
    """The Linear stack that reads the query tokens, of the first generator of `model`."""
    generator = _first_generator(model)
    if isinstance(generator, MaskGenerator):
        return generator.layers
    if isinstance(generator, LowRankGenerator):
        return generator.query
    raise StateDictError(
        f"save_pretrained knows MaskGenerator and LowRankGenerator, not {type(generator).__name__}; "
        f"save this model's LCAAM with lcaam_state_dict(model) instead"
    )


def _generator_options(model: nn.Module) -> dict[str, Any]:
    """The options of `apply` that shaped the generators and sites of `model`."""
    layers = _first_layers(model)
    generator = _first_generator(model)
    site = patched_sites(model)[0][2]
    options: dict[str, Any] = {
        "mode": "global" if site.stack is not None else "multilayer",
        "fusion": site.fusion,
        "backend": site.backend,
        "depth": len(layers),
        "hidden": layers[0].out_features if len(layers) > 1 else None,
    }
    if isinstance(generator, MaskGenerator):
        options.update(generator="mlp", activation=generator.activation, init=generator.init)
    elif isinstance(generator, LowRankGenerator):
        options.update(generator="lowrank", rank=generator.rank, init=generator.init)
    return options


def _read_config(model: nn.Module, skeleton: nn.Module | None, sites: _Sites) -> LCAAMConfig:
    """The config that re-creates the sites of `model`, checked by a dry run on `skeleton`:
    the generators' options, the fewest token bounds that give the sites' bounds (none when
    the adapters infer them), and targets naming the sites only when not every supported
    module is patched."""
    options = _generator_options(model)
    geometries = [geometry for _, geometry in sites.values()]
    q_bounds = {g.max_q_tokens for g in geometries}
    kv_bounds = {g.max_kv_tokens for g in geometries}
    bounds: list[dict[str, Any]] = [{}]
    if len(q_bounds) == 1 and len(kv_bounds) == 1:
        (max_q,), (max_kv,) = q_bounds, kv_bounds
        bounds += [{"max_kv_tokens": max_kv}, {"max_tokens": max_q}, {"max_tokens": max_q, "max_kv_tokens": max_kv}]
    targets = tuple(_escape(path) for path in sites)
    for bound in bounds:
        for restrict in ({}, {"targets": targets}):
            config = LCAAMConfig.from_options({**options, **bound, **restrict})
            if skeleton is not None and _would_patch(skeleton, config) == sites:
                return config
    raise StateDictError(
        "save_pretrained cannot read the options of apply off this model (its adapters do not "
        "infer the token bounds the sites have, or the model cannot be copied for a dry run); "
        "pass the options you gave apply: lcaam_patch.save_pretrained(model, directory, max_tokens=..., ...)"
    )


def _check_reproduces(model: nn.Module, skeleton: nn.Module | None, config: LCAAMConfig, sites: _Sites) -> None:
    """Refuse options given to `save_pretrained` that would not re-create `model`'s LCAAM
    (the sites are checked when the model could be copied for a dry run)."""
    expected = _generator_options(model)
    width = _first_layers(model)[0].in_features
    given = {**dataclasses.asdict(config), "hidden": (config.hidden or width) if config.depth > 1 else None}
    differing = sorted(key for key, value in expected.items() if given[key] != value)
    found = sites if skeleton is None else _would_patch(skeleton, config)
    if found != sites or differing:
        detail = f"options {differing} differ" if differing else f"they patch {sorted(found)}, not {sorted(sites)}"
        raise InvalidOptionError(
            f"the options given to save_pretrained do not re-create this model's sites ({detail}); "
            f"pass the preset and options given to apply, or none to read them off the model"
        )


def _escape(path: str) -> str:
    """`path` as a glob pattern that matches it alone."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def _config_to_json(config: LCAAMConfig) -> dict[str, Any]:
    return {
        field.name: list(value) if isinstance(value := getattr(config, field.name), tuple) else value
        for field in dataclasses.fields(config)
    }


def _corrupt(source: Path, detail: str) -> StateDictError:
    return StateDictError(
        f"{source / CONFIG_NAME} is not a valid LCAAM config ({detail}); write the directory again "
        f"with lcaam_patch.save_pretrained(model, directory)"
    )


def _read_document(source: Path) -> dict[str, Any]:
    """The parsed and checked `lcaam.json` of `source`."""
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (source / name).is_file()]
    if missing:
        raise StateDictError(
            f"{source} lacks {', '.join(missing)}; give a directory written by "
            f"lcaam_patch.save_pretrained(model, directory)"
        )
    try:
        document = json.loads((source / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(source, f"not JSON: {error}") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise _corrupt(source, f"no 'format': {FORMAT!r}")
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StateDictError(
            f"{source / CONFIG_NAME} has format_version {version!r}, which this lcaam_patch does not "
            f"know (it reads {FORMAT_VERSION}); upgrade lcaam_patch (pip install -U lcaam-patch)"
        )
    shapes = {"config": dict, "sites": list, "adapters": dict, "weights": dict}
    for key, kind in shapes.items():
        if not isinstance(document.get(key), kind):
            raise _corrupt(source, f"{key!r} must be a JSON {'object' if kind is dict else 'array'}")
    sites = []
    for site in document["sites"]:
        try:
            geometry = SiteGeometry(**site["geometry"])
            path, adapter, owns = site["path"], site["adapter"], site["owns_generator"]
        except (KeyError, TypeError) as error:
            raise _corrupt(source, f"a site lacks path, adapter, geometry or owns_generator: {error}") from error
        if not (isinstance(path, str) and isinstance(adapter, str) and isinstance(owns, bool)):
            raise _corrupt(source, f"site {path!r} has a path, adapter or owns_generator of the wrong type")
        sites.append({"path": path, "adapter": adapter, "geometry": geometry, "owns_generator": owns})
    if not sites:
        raise _corrupt(source, "no site")
    document["sites"] = sites
    return document


def _read_weights(source: Path, document: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of `lcaam.safetensors`, checked against the JSON and the saved sites."""
    path = source / WEIGHTS_NAME
    try:
        weights = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise StateDictError(
            f"{path} is not a readable safetensors file ({error}); write the directory again with "
            f"lcaam_patch.save_pretrained(model, directory)"
        ) from error
    described: dict[str, Any] = document["weights"]
    if set(weights) != set(described):
        difference = sorted(set(weights) ^ set(described))
        raise StateDictError(
            f"{path} and {CONFIG_NAME} disagree on the weights {difference[:5]}; the two files come from "
            f"different saves: write the directory again with lcaam_patch.save_pretrained"
        )
    owners = [site["path"] for site in document["sites"] if site["owns_generator"]]
    prefixes = tuple(f"{p}.{GENERATOR_NAME}." if p else f"{GENERATOR_NAME}." for p in owners)
    for key, tensor in weights.items():
        entry = described[key]
        if (
            not isinstance(entry, dict)
            or entry.get("dtype") != str(tensor.dtype)
            or entry.get("shape") != list(tensor.shape)
        ):
            raise StateDictError(
                f"weight {key!r} in {path} has dtype {tensor.dtype} and shape {list(tensor.shape)}, not "
                f"what {CONFIG_NAME} records ({entry}); the files come from different saves: write the "
                f"directory again with lcaam_patch.save_pretrained"
            )
        if not tensor.is_floating_point():
            raise StateDictError(
                f"weight {key!r} in {path} has dtype {tensor.dtype}; generator weights are floating point: "
                f"save them from a patched model with lcaam_patch.save_pretrained"
            )
        if not key.startswith(prefixes):
            raise StateDictError(
                f"weight {key!r} in {path} belongs to no generator of the saved sites; "
                f"write the directory again with lcaam_patch.save_pretrained"
            )
    for owner, prefix in zip(owners, prefixes):
        if not any(key.startswith(prefix) for key in weights):
            raise StateDictError(
                f"{path} has no weight for the generator of {owner!r}; write the directory again "
                f"with lcaam_patch.save_pretrained"
            )
    return weights


def _config_from_json(options: dict[str, Any], source: Path) -> LCAAMConfig:
    try:
        return LCAAMConfig.from_options(options)
    except InvalidOptionError as error:
        raise _corrupt(source, f"its options are refused: {error}") from error
    except TypeError as error:
        raise _corrupt(source, f"its options are malformed: {error}") from error


def _check_adapters(document: dict[str, Any], source: Path) -> None:
    registry = registered_adapters()
    unknown = sorted({site["adapter"] for site in document["sites"]} - set(registry))
    if unknown:
        entries = [document["adapters"].get(name) for name in unknown]
        distributions = [e.get("distribution") for e in entries if isinstance(e, dict)]
        hint = ", ".join(d for d in distributions if isinstance(d, str)) or "the package that provides them"
        raise UnknownAdapterError(
            f"{source} was saved with the adapter(s) {unknown}, which are not registered here; "
            f"install {hint} (and import it) before calling from_pretrained"
        )


def _compare_sites(saved: _Sites, found: _Found, document: dict[str, Any], model: nn.Module, source: Path) -> None:
    """Refuse a model whose sites under the saved options are not the saved ones."""
    missing = [path for path in saved if path not in found]
    extra = [path for path in found if path not in saved]
    differing = [path for path in saved if path in found and found[path] != saved[path]]
    if not (missing or extra or differing):
        return
    parts = []
    if missing:
        parts.append(f"the model has no supported attention module at {missing[:3]}")
    if extra:
        parts.append(f"the saved options would also patch {extra[:3]}, which were not saved")
    for path in differing[:3]:
        (saved_adapter, saved_geometry), (adapter, geometry) = saved[path], found[path]
        parts.append(f"{path!r} is {adapter} {geometry} here but was saved as {saved_adapter} {saved_geometry}")
    classes = f"{document.get('model_class')} was saved, this is {_class_name(model)}"
    raise StateDictError(
        f"{source} does not fit this model ({classes}): {'; '.join(parts)}. Load it into the "
        f"architecture it was saved from (same widths and token bounds), or patch this model with "
        f"lcaam_patch.apply and train its LCAAM afresh"
    )


def _warn_versions(document: dict[str, Any], source: Path) -> None:
    saved = document.get("library_version")
    if saved != __version__:
        warnings.warn(
            f"{source} was saved by lcaam_patch {saved}, this is {__version__}; the generators are "
            f"re-created with this version's code",
            stacklevel=3,
        )
    registry = registered_adapters()
    for name, entry in document["adapters"].items():
        if name not in registry or not isinstance(entry, dict):
            continue
        installed = registry[name].installed_version()
        if entry.get("version") != installed:
            warnings.warn(
                f"{source} was saved with {entry.get('distribution')}=={entry.get('version')} "
                f"(adapter {name!r}); {installed} is installed, so outputs may differ",
                stacklevel=3,
            )
