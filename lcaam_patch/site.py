"""Per-module state of a patched attention site, and the forward that replaces the original."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from .attention import AttentionRequest, LowRankMask, resolve_backend, run_backend
from .errors import LCAAMError
from .lowrank import LowRankGenerator
from .registry import Adapter, SiteGeometry

GENERATOR_NAME = "lcaam"
SITE_ATTR = "_lcaam_site"


class Recorder(Protocol):
    """Receives what a site computed during a forward (see `lcaam_patch.capture`)."""

    def record(
        self,
        site: LCAAMSite,
        mask: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scale: float,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> None:
        """Keep what is wanted of one attention call."""
        ...


class StackMask:
    """The mask of `mode="global"`: computed by a stack's first site, read by the others.

    It holds the mask of the latest forward pass only and is never pickled or copied.
    """

    def __init__(self, name: str, leader: str) -> None:
        self.name = name
        self.leader = leader
        self.mask: torch.Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "leader": self.leader, "mask": None}

    def __deepcopy__(self, memo: dict[int, Any]) -> StackMask:
        copied = StackMask(self.name, self.leader)
        memo[id(self)] = copied
        return copied


class LCAAMSite:
    """Everything the patched forward of one attention module needs besides the module.

    Attributes:
        path: the module's path in the model it was patched in.
        adapter: the adapter that runs the module.
        geometry: widths and token bounds read by the adapter.
        fusion, backend: how M is fused and which backend computes the attention.
        stack: the shared mask in `mode="global"`, else None.
        adapter_state: what the adapter's `prepare` returned, for its `restore`.
        last_backend: the backend that computed the latest call (None before the first).
    """

    def __init__(
        self,
        path: str,
        adapter: Adapter,
        geometry: SiteGeometry,
        *,
        fusion: str,
        backend: str,
        stack: StackMask | None = None,
    ) -> None:
        self.path = path
        self.adapter = adapter
        self.geometry = geometry
        self.fusion = fusion
        self.backend = backend
        self.stack = stack
        self.adapter_state: Any = None
        self.recorder: Recorder | None = None
        self.last_backend: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "recorder": None}

    @property
    def owns_generator(self) -> bool:
        """Whether this site's module carries a generator (False for global followers)."""
        return self.stack is None or self.stack.leader == self.path

    def mask(
        self, module: nn.Module, x: torch.Tensor, num_kv_tokens: int, kv_tokens: torch.Tensor | None = None
    ) -> torch.Tensor | LowRankMask:
        """M (B, Nq, Nk) for query tokens `x` (B, Nq, D) and key tokens `kv_tokens`.

        A "lowrank" generator reads the key tokens (default: `x`, self-attention) and
        returns the factors of M as a `LowRankMask`.
        """
        if self.owns_generator:
            generator = getattr(module, GENERATOR_NAME)
            if isinstance(generator, LowRankGenerator):
                mask = generator(x, kv_tokens)
            else:
                mask = generator(x, num_kv_tokens)
            if self.stack is not None:
                self.stack.mask = mask
            return mask
        assert self.stack is not None
        mask = self.stack.mask
        if mask is None or mask.shape[-2] != x.shape[-2] or mask.shape[-1] != num_kv_tokens:
            raise LCAAMError(
                f"mode='global': {self.path!r} ran before {self.stack.leader!r}, the first "
                f"attention of stack {self.stack.name!r}, computed this forward's mask (or with "
                f"other token counts); use mode='multilayer' for models that call their layers "
                f"out of order"
            )
        return mask

    def attend(
        self,
        module: nn.Module,
        x: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        dropout_p: float = 0.0,
        need_weights: bool = False,
        kv_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """LCAAM attention of (B, H, N, D) q, k, v whose query tokens are `x` (B, Nq, D).

        `kv_tokens` (B, Nk, Dk) are the key tokens, which a "lowrank" generator reads;
        None means `x` (self-attention).
        """
        mask = self.mask(module, x, k.shape[-2], kv_tokens)
        if self.recorder is not None:
            dense = mask.dense() if isinstance(mask, LowRankMask) else mask
            self.recorder.record(self, dense, q, k, scale=scale, attn_mask=attn_mask, is_causal=is_causal)
        request = AttentionRequest.of_call(
            q, v, mask, fusion=self.fusion, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=dropout_p, need_weights=need_weights,
        )
        self.last_backend = resolve_backend(self.backend, request)
        return run_backend(
            self.last_backend,
            q,
            k,
            v,
            mask,
            fusion=self.fusion,
            scale=scale,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=dropout_p,
            need_weights=need_weights,
        )


def patched_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The instance-level forward of a patched module: its adapter's forward with LCAAM."""
    site: LCAAMSite = getattr(module, SITE_ATTR)
    return site.adapter.forward(module, site, *args, **kwargs)
