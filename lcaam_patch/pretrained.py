"""`save_pretrained` / `from_pretrained`: the LCAAM weights alone, and what re-creates them.

A directory written by `save_pretrained` holds two files:

- `lcaam.safetensors`: the generator weights, keyed as in the patched `model.state_dict()`
  (`blocks.0.attn.lcaam.layers.0.weight`), in the dtype they had; no upstream weight.
- `lcaam.json`: the options of `apply` that re-create the sites (the config the sites
  record), the preset if one was named, each site (path, adapter, geometry, whether it owns a generator), the adapters
  with their upstream versions, the library version, and each weight's dtype and shape.

`from_pretrained` patches an unpatched model with those options and loads the weights;
it checks the files, the sites and the weights before it touches the model.
"""

from __future__ import annotations

import dataclasses
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
from .errors import AlreadyPatchedError, InvalidOptionError, StateDictError, UnknownAdapterError
from .patching import (
    Claim,
    apply,
    claims,
    is_patched,
    patched_sites,
    remove,
    require_module,
    require_patched,
    resolve_config,
)
from .site import GENERATOR_NAME, LCAAMSite, SiteGeometry
from .state_dict import lcaam_state_dict, load_lcaam_state_dict
from .version import __version__

WEIGHTS_NAME = "lcaam.safetensors"
CONFIG_NAME = "lcaam.json"
FORMAT = "lcaam_patch"
FORMAT_VERSION = 1

_Sites = dict[str, tuple[str, SiteGeometry]]


def save_pretrained(
    model: nn.Module, directory: str | os.PathLike[str], *, preset: str | None = None, **options: Any
) -> Path:
    """Write the LCAAM weights of a patched `model` and what re-creates them to `directory`.

    The options recorded are the config `apply` patched the sites with (`LCAAMSite.config`).
    A config does not name its preset: pass `preset` (with the options you gave `apply`) to
    record it; they must resolve to that config. A model pickled by lcaam-patch 0.1.0 records
    no config and is refused with a StateDictError that says how to re-apply it (its options
    are not reconstructed). Only LCAAM weights are written. Returns the directory.
    """
    require_patched(model, "save_pretrained")
    sites = patched_sites(model)
    config = _config_of(sites)
    if preset is not None or options:
        _check_given(resolve_config(preset, options), config)
    state = lcaam_state_dict(model)
    meta = sorted(key for key, value in state.items() if value.is_meta)
    if meta:
        raise StateDictError(
            f"LCAAM weights {meta[:3]} are on the meta device; materialise the model "
            f"(model.to_empty(...), then lcaam_patch.reset_generators(model) or training) before saving"
        )
    weights = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    registry = registered_adapters()
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "model_class": _class_name(model),
        "preset": preset,
        "config": _config_to_json(config),
        "sites": [
            {
                "path": path,
                "adapter": site.adapter.name,
                "geometry": dataclasses.asdict(site.geometry),
                "owns_generator": site.owns_generator,
            }
            for path, _, site in sites
        ],
        "adapters": {
            name: {"distribution": registry[name].distribution, "version": registry[name].installed_version()}
            for name in sorted({site.adapter.name for _, _, site in sites})
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
    _compare_sites(saved, claims(model, config), document, model, source)
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


def _config_of(sites: list[tuple[str, nn.Module, LCAAMSite]]) -> LCAAMConfig:
    """The one config the `sites` were patched with, which each of them records."""
    recorded = [site.config for _, _, site in sites]
    if None in recorded:
        raise StateDictError(
            "this model's sites record no options of apply (it was pickled by lcaam-patch 0.1.0); "
            "re-apply them, keeping the trained weights: state = lcaam_patch.lcaam_state_dict(model); "
            "lcaam_patch.remove(model); lcaam_patch.apply(model, <the options you gave apply>); "
            "lcaam_patch.load_lcaam_state_dict(model, state); then save_pretrained(model, directory)"
        )
    configs = {config for config in recorded if config is not None}
    if len(configs) > 1:
        raise StateDictError(
            "this model's sites were patched by several apply calls with different options (on its "
            "submodules), and lcaam.json holds one set; save each patched submodule on its own, or "
            "remove them and apply once to the whole model"
        )
    (config,) = configs
    return config


def _check_given(given: LCAAMConfig, config: LCAAMConfig) -> None:
    """Refuse a preset and options given to `save_pretrained` that are not the model's `config`."""
    differing = [f.name for f in dataclasses.fields(config) if getattr(given, f.name) != getattr(config, f.name)]
    if differing:
        raise InvalidOptionError(
            f"the options given to save_pretrained do not re-create this model's sites (options "
            f"{differing} differ from those apply patched it with); pass the preset and options "
            f"given to apply, or none to record the model's own"
        )


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
        if not bool(torch.isfinite(tensor).all()):
            raise StateDictError(
                f"weight {key!r} in {path} holds NaN or infinite values, which would make every output "
                f"of the model NaN; save it again from a model whose training did not diverge (lower the "
                f"learning rate), or patch afresh with lcaam_patch.apply"
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


def _compare_sites(
    saved: _Sites, claimed: list[Claim], document: dict[str, Any], model: nn.Module, source: Path
) -> None:
    """Refuse a model whose sites under the saved options (`claimed`) are not the saved ones."""
    found: dict[str, tuple[str, SiteGeometry | str]] = {}
    for claim in claimed:
        if claim.refusal is not None:
            found[claim.path] = (claim.adapter.name, f"refused: {claim.refusal}")
        elif claim.geometry is not None:
            found[claim.path] = (claim.adapter.name, claim.geometry)
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
