"""`summary(model)`: which sites are patched, how, and what LCAAM adds."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..backends import choose
from ..patching import parameter_count, patched_sites, require_patched, site_spec
from ..site import generator_of


@dataclasses.dataclass(frozen=True)
class SiteSummary:
    """One patched attention module."""

    path: str
    adapter: str
    kind: str
    max_q_tokens: int | None
    max_kv_tokens: int | None
    fusion: str
    backend: str
    generator: str
    generator_params: int


@dataclasses.dataclass(frozen=True)
class PatchSummary:
    """Every patched site and the totals; `str()` renders a table."""

    sites: tuple[SiteSummary, ...]
    lcaam_params: int
    model_params: int

    @property
    def overhead(self) -> float:
        """LCAAM parameters as a fraction of the upstream model's parameters."""
        upstream = self.model_params - self.lcaam_params
        return self.lcaam_params / upstream if upstream else float("inf")

    def __str__(self) -> str:
        header = ("path", "adapter", "kind", "Nq×Nk bound", "fusion", "backend", "generator", "params")
        rows = [
            (
                s.path,
                s.adapter,
                s.kind,
                f"{s.max_q_tokens if s.max_q_tokens is not None else '-'}×"
                f"{s.max_kv_tokens if s.max_kv_tokens is not None else '-'}",
                s.fusion,
                s.backend,
                s.generator,
                f"{s.generator_params:,}",
            )
            for s in self.sites
        ]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

        rule = "  ".join("-" * w for w in widths)
        total = (
            f"{len(self.sites)} sites, {self.lcaam_params:,} LCAAM parameters "
            f"({self.overhead:.2%} of {self.model_params - self.lcaam_params:,} upstream)"
        )
        return "\n".join([line(header), rule, *map(line, rows), rule, total])


def summary(model: nn.Module) -> PatchSummary:
    """Describe the LCAAM sites of a patched model; `print()` it for a table.

    With backend="auto" the backend column reads "auto→NAME": the backend that computed
    the site's latest call, or before any forward the one auto picks for a call without
    upstream mask on the model's device and dtype.
    """
    require_patched(model, "summary")
    reference = next(model.parameters())
    rows = []
    sites = patched_sites(model)
    owners = {site.path: module for _, module, site in sites}
    for path, module, site in sites:
        generator = generator_of(module)
        if generator is not None:
            description = generator.describe()
        else:
            description = f"shared ({site.stack.leader})" if site.stack else "-"
        backend = site.backend
        if backend == "auto":
            owner = owners.get(site.stack.leader, module) if site.stack is not None else module
            source = generator_of(owner)
            spec = site_spec(
                kind=source.kind if source is not None else "mlp",
                fusion=site.fusion,
                device="cpu" if reference.device.type == "meta" else reference.device.type,
                dtype=reference.dtype,
            )
            backend = f"auto→{site.last_backend or choose('auto', spec)}"
        rows.append(
            SiteSummary(
                path=path or "(root)",
                adapter=site.adapter.name,
                kind=site.geometry.kind,
                max_q_tokens=site.geometry.max_q_tokens,
                max_kv_tokens=site.geometry.max_kv_tokens,
                fusion=site.fusion,
                backend=backend,
                generator=description,
                generator_params=parameter_count(generator),
            )
        )
    lcaam = sum(r.generator_params for r in rows)
    return PatchSummary(tuple(rows), lcaam, parameter_count(model))
