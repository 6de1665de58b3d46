"""`survey(model)`: a dry run of `apply` that lists what it would patch, and why not."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .. import probe
from ..adapters import registered_adapters
from ..patching import claims, looks_like_attention, require_module, resolve_config


@dataclasses.dataclass(frozen=True)
class SurveyEntry:
    """What `apply` would do with one module.

    Attributes:
        path: the module's path.
        class_name: its class, with the module it comes from.
        adapter: the adapter that claims it, or None.
        status: "patch", "filtered" (left out by targets/exclude, or by its adapter under
            these options), "error" (the adapter refuses it), "inapplicable" (an adapter
            declares that LCAAM does not apply to the class; the detail says why) or
            "unclaimed" (attention-like, but no adapter knows the class).
        detail: the bound it would get, or why not.
    """

    path: str
    class_name: str
    adapter: str | None
    status: str
    detail: str


def survey(
    model: nn.Module, *, preset: str | None = None, example_inputs: Any = None, **options: Any
) -> list[SurveyEntry]:
    """A dry run of `apply(model, preset=preset, example_inputs=example_inputs, **options)`
    that changes nothing.

    Lists every module an adapter claims, every module of a class an adapter declares
    inapplicable and every other attention-like module none claims, with what `apply`
    would do and why (for modules the generic SDPA adapter looked at, why it declines them).
    """
    require_module(model, "survey")
    config = resolve_config(preset, options)
    adapters = list(registered_adapters().values())
    inapplicable = {cls: f"{a.name}: {why}" for a in reversed(adapters) for cls, why in a.inapplicable().items()}
    with probe.example_inputs(example_inputs):
        claimed = {claim.path: claim for claim in claims(model, config)}
        entries = []
        for path, module in model.named_modules():
            if path not in claimed:
                entry = _unclaimed(path, module, model, adapters, inapplicable)
                if entry is not None:
                    entries.append(entry)
    entries = [*entries, *_claimed(model, claimed)]
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    return sorted(entries, key=lambda entry: order[entry.path])


def _class_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _unclaimed(
    path: str, module: nn.Module, model: nn.Module, adapters: list[Any], inapplicable: dict[type, str]
) -> SurveyEntry | None:
    if type(module) in inapplicable:
        return SurveyEntry(path, _class_name(module), None, "inapplicable", inapplicable[type(module)])
    declined = next(
        (f"{a.name}: {why}" for a in adapters if (why := a.declines(module, path, model)) is not None), None
    )
    if declined is not None:
        return SurveyEntry(path, _class_name(module), None, "unclaimed", declined)
    if looks_like_attention(module):
        return SurveyEntry(path, _class_name(module), None, "unclaimed", "no registered adapter patches this class")
    return None


def _claimed(model: nn.Module, claimed: dict[str, Any]) -> list[SurveyEntry]:
    entries = []
    for path, module in model.named_modules():
        class_name = _class_name(module)
        claim = claimed.get(path)
        if claim is None:
            continue
        name = claim.adapter.name
        if claim.refusal is not None:
            entries.append(SurveyEntry(path, class_name, name, "error", str(claim.refusal)))
        elif claim.geometry is None:
            why = "left out by targets/exclude, or by its adapter under these options"
            entries.append(SurveyEntry(path, class_name, name, "filtered", why))
        else:
            geometry = claim.geometry
            bound = f"{geometry.max_q_tokens or '-'}×{geometry.max_kv_tokens}"
            entries.append(SurveyEntry(path, class_name, name, "patch", f"{geometry.kind}, Nq×Nk ≤ {bound}"))
    return entries
