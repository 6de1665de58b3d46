"""`survey(model)`: a dry run of `apply` that lists what it would patch, and why not."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

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


def survey(model: nn.Module, *, preset: str | None = None, **options: Any) -> list[SurveyEntry]:
    """A dry run of `apply(model, preset=preset, **options)` that changes nothing.

    Lists every module an adapter claims, every module of a class an adapter declares
    inapplicable and every other attention-like module none claims, with what `apply`
    would do and why.
    """
    require_module(model, "survey")
    config = resolve_config(preset, options)
    adapters = list(registered_adapters().values())
    inapplicable = {cls: f"{a.name}: {why}" for a in reversed(adapters) for cls, why in a.inapplicable().items()}
    claimed = {claim.path: claim for claim in claims(model, config)}
    entries = []
    for path, module in model.named_modules():
        class_name = f"{type(module).__module__}.{type(module).__qualname__}"
        claim = claimed.get(path)
        if claim is None:
            if type(module) in inapplicable:
                entries.append(SurveyEntry(path, class_name, None, "inapplicable", inapplicable[type(module)]))
            elif looks_like_attention(module):
                entries.append(
                    SurveyEntry(path, class_name, None, "unclaimed", "no registered adapter patches this class")
                )
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
