"""`capture(model)`: record the masks (and attention weights) a patched model computes."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from ..backends import AttentionCall, run
from ..patching import patched_sites, require_patched
from ..site import LCAAMSite


@dataclasses.dataclass
class Capture:
    """What one `capture` block recorded, per site path, one tensor per forward call.

    Attributes:
        masks: path → list of generated masks M, (B, Nq, Nk), detached, on the CPU.
        attention: path → list of post-softmax weights (B, H, Nq, Nk) when asked for.
        max_bytes: recording stops once this many bytes are kept.
        dropped: how many tensors were not kept because of `max_bytes`.
    """

    attention_requested: bool
    max_bytes: int
    masks: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    attention: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    kept_bytes: int = 0
    dropped: int = 0

    def _keep(self, store: dict[str, list[torch.Tensor]], path: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.kept_bytes + size > self.max_bytes:
            self.dropped += 1
            return
        self.kept_bytes += size
        store.setdefault(path, []).append(tensor)

    def record(self, site: LCAAMSite, call: AttentionCall) -> None:
        """Keep the mask (and the reference attention weights) of one attention call."""
        with torch.no_grad():
            mask = call.dense_mask().detach()
            self._keep(self.masks, site.path, mask.float().cpu())
            if self.attention_requested:
                keys = call.k.detach()
                reference = dataclasses.replace(
                    call,
                    q=call.q.detach(),
                    k=keys,
                    v=keys,  # the weights do not depend on the values
                    mask=mask,
                    dropout_p=0.0,
                    need_weights=True,
                )
                weights = run(reference, "eager").weights
                assert weights is not None
                self._keep(self.attention, site.path, weights.float().cpu())


@contextlib.contextmanager
def capture(model: nn.Module, *, attention: bool = False, max_bytes: int = 256 * 2**20) -> Iterator[Capture]:
    """Record, inside the block, each patched site's mask (and attention weights if asked).

    Weights are recomputed by the eager reference without dropout, so they are what the
    layer attends with in eval mode. Outside the block nothing is recorded.

        with lcaam_patch.capture(model, attention=True) as seen:
            model(x)
        seen.masks["blocks.0.attn"][0]   # (B, Nq, Nk)
    """
    require_patched(model, "capture")
    record = Capture(attention_requested=attention, max_bytes=max_bytes)
    sites = [site for _, _, site in patched_sites(model)]
    for site in sites:
        site.recorder = record
    try:
        yield record
    finally:
        for site in sites:
            site.recorder = None
