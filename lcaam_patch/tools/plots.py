"""Figures like the paper's: mask heatmaps (Fig. S6, S8, S9), per-token mask rows (Fig. S6b)
and attention-weight histograms with and without LCAAM (Fig. S5, S7).

Needs matplotlib (`pip install "lcaam-patch[plots]"`). Every function returns a
`matplotlib.figure.Figure`; `save_figure` writes PNG or SVG by the file suffix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InvalidOptionError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TokenGroup = tuple[str, int, int]


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _group_label(groups: Sequence[TokenGroup]) -> str:
    return " | ".join(f"{name} {start}–{stop - 1}" for name, start, stop in groups)


def mask_heatmap(
    mask: torch.Tensor,
    *,
    groups: Sequence[TokenGroup] = (),
    title: str = "LCAAM mask",
    cmap: str = "viridis",
) -> Figure:
    """Heatmap of one mask (Nq, Nk) — or the first sample of (B, Nq, Nk) — with lines and
    labels at token-group boundaries, e.g. groups=[("video", 0, 25), ("audio", 25, 50)]."""
    one = mask[0] if mask.dim() == 3 else mask
    values = one.detach().float().cpu().numpy()
    figure = _figure(6.0, 5.0)
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap=cmap, aspect="auto", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="M")
    for _, start, _ in groups[1:]:
        axes.axhline(start - 0.5, color="white", linewidth=1)
        axes.axvline(start - 0.5, color="white", linewidth=1)
    if groups:
        centers = [(start + stop - 1) / 2 for _, start, stop in groups]
        axes.set_xticks(centers, [name for name, _, _ in groups])
        axes.set_yticks(centers, [name for name, _, _ in groups])
        axes.set_xlabel(f"key tokens ({_group_label(groups)})")
        axes.set_ylabel("query tokens")
    else:
        axes.set_xlabel("key token")
        axes.set_ylabel("query token")
    axes.set_title(title)
    return figure


def token_rows(
    mask: torch.Tensor,
    tokens: Sequence[int],
    *,
    groups: Sequence[TokenGroup] = (),
    title: str = "LCAAM mask rows",
) -> Figure:
    """One line per chosen query token: how it weighs every key token (Fig. S6b)."""
    values = mask[0] if mask.dim() == 3 else mask
    values = values.detach().float().cpu()
    figure = _figure(7.0, 3.5)
    axes = figure.add_subplot()
    for token in tokens:
        axes.plot(values[token].numpy(), label=f"query {token}", linewidth=1.2)
    for name, start, stop in groups:
        axes.axvspan(start - 0.5, stop - 0.5, alpha=0.08)
        axes.text((start + stop - 1) / 2, 1.0, name, transform=axes.get_xaxis_transform(), ha="center", va="bottom")
    axes.set_xlabel("key token")
    axes.set_ylabel("M")
    axes.set_title(title, pad=14 if groups else 6)
    axes.legend(fontsize="small")
    return figure


def attention_histograms(
    patched: Mapping[str, torch.Tensor],
    unpatched: Mapping[str, torch.Tensor] | None = None,
    *,
    layers: Sequence[str] | None = None,
    bins: int = 50,
) -> Figure:
    """Histograms of post-softmax attention weights per layer, patched vs unpatched."""
    chosen = list(layers) if layers is not None else list(patched)
    figure = _figure(4.0 * len(chosen), 3.2)
    for index, layer in enumerate(chosen, start=1):
        axes = figure.add_subplot(1, len(chosen), index)
        series = [("with LCAAM", patched[layer])]
        if unpatched is not None and layer in unpatched:
            series.insert(0, ("without LCAAM", unpatched[layer]))
        for label, weights in series:
            axes.hist(
                weights.detach().float().flatten().cpu().numpy(),
                bins=bins,
                range=(0.0, 1.0),
                alpha=0.6,
                label=label,
                log=True,
            )
        axes.set_title(layer, fontsize="small")
        axes.set_xlabel("attention weight")
        if index == 1:
            axes.set_ylabel("count (log)")
        axes.legend(fontsize="x-small")
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write `figure` to `path` (.png or .svg) and return the path."""
    target = Path(path)
    if target.suffix.lower() not in (".png", ".svg"):
        raise InvalidOptionError(f"save_figure writes .png or .svg, not {target.suffix!r}; change the file suffix")
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target)
    return target
