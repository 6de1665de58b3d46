"""What a patched attention module carries: its geometry, its site, and the forward that
replaces the original."""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

from .backends import AttentionCall, AttentionResult, LowRankMask, run
from .errors import GlobalModeError
from .generators import LCAAMGenerator, LowRankGenerator, MaskGenerator

if TYPE_CHECKING:
    from .config import LCAAMConfig

GENERATOR_NAME = "lcaam"
SITE_ATTR = "_lcaam_site"


@dataclasses.dataclass(frozen=True)
class SiteGeometry:
    """What an adapter reads off one attention module.

    Attributes:
        embed_dim: width of the query tokens the generator reads.
        max_q_tokens: bound on query tokens (None when the adapter has no bound).
        max_kv_tokens: bound on key tokens: the generator's output width (None only
            where the options need no bound, i.e. generator="lowrank").
        kind: "self" or "cross".
        kv_embed_dim: width of the key tokens a "lowrank" generator reads; None when it
            equals `embed_dim`.
    """

    embed_dim: int
    max_q_tokens: int | None
    max_kv_tokens: int | None
    kind: str
    kv_embed_dim: int | None = None


class SiteAdapter(Protocol):
    """What a site needs of the adapter that runs it (`lcaam_patch.adapters.Adapter`)."""

    name: str

    def forward(self, module: nn.Module, site: LCAAMSite, *args: Any, **kwargs: Any) -> Any:
        """The patched forward."""
        ...

    def restore(self, module: nn.Module, state: Any) -> None:
        """Undo what the adapter's `prepare` did."""
        ...


class Recorder(Protocol):
    """Receives what a site computed during a forward (see `lcaam_patch.capture`)."""

    def record(self, site: LCAAMSite, call: AttentionCall) -> None:
        """Keep what is wanted of one attention call."""
        ...


class StackMask:
    """The mask of `mode="global"`: computed by a stack's first site, read by the others.

    It holds the mask of the latest forward pass of the current thread only, and is never
    pickled or copied.
    """

    def __init__(self, name: str, leader: str) -> None:
        self.name = name
        self.leader = leader
        self._local = threading.local()

    @property
    def mask(self) -> torch.Tensor | LowRankMask | None:
        """The mask the leader computed in this thread's latest forward, or None."""
        return getattr(self._local, "mask", None)

    @mask.setter
    def mask(self, value: torch.Tensor | LowRankMask | None) -> None:
        self._local.mask = value

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "leader": self.leader}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], state["leader"])  # type: ignore[misc]

    def __deepcopy__(self, memo: dict[int, Any]) -> StackMask:
        copied = StackMask(self.name, self.leader)
        memo[id(self)] = copied
        return copied


def _in_backward() -> bool:
    """Whether this code runs inside autograd's backward (activation recomputation)."""
    if torch.compiler.is_compiling():
        return False
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class LCAAMSite:
    """Everything the patched forward of one attention module needs besides the module.

    Attributes:
        path: the module's path in the model it was patched in.
        adapter: the adapter that runs the module.
        geometry: widths and token bounds read by the adapter.
        fusion, backend: how M is fused and which backend computes the attention.
        stack: the shared mask in `mode="global"`, else None.
        config: the options `apply` patched it with (None in models pickled by 0.1.0).
        adapter_state: what the adapter's `prepare` returned, for its `restore`.
        last_backend: the backend that computed the latest call (None before the first).
        verified: whether the site passed its first-call check (`lcaam_patch.verification`).
    """

    def __init__(
        self,
        path: str,
        adapter: SiteAdapter,
        geometry: SiteGeometry,
        *,
        fusion: str,
        backend: str,
        stack: StackMask | None = None,
        config: LCAAMConfig | None = None,
    ) -> None:
        self.path = path
        self.adapter = adapter
        self.geometry = geometry
        self.fusion = fusion
        self.backend = backend
        self.stack = stack
        self.config = config
        self.adapter_state: Any = None
        self.recorder: Recorder | None = None
        self.last_backend: str | None = None
        self.verified = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "recorder": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"config": None, "verified": False, **state})

    @property
    def owns_generator(self) -> bool:
        """Whether this site's module carries a generator (False for global followers)."""
        return self.stack is None or self.stack.leader == self.path

    def mask(
        self,
        module: nn.Module,
        x: torch.Tensor,
        num_kv_tokens: int,
        kv_tokens: torch.Tensor | None = None,
        key_factor: torch.Tensor | None = None,
    ) -> torch.Tensor | LowRankMask:
        """M (B, Nq, Nk) for query tokens `x` (B, Nq, D) and key tokens `kv_tokens`.

        A "lowrank" generator reads the key tokens (default: `x`, self-attention) and
        returns the factors of M as a `LowRankMask`; `key_factor`, when given, is its
        `key_factor(kv_tokens)` computed before (kept per KV-cache position).
        """
        if self.stack is not None and _in_backward():
            raise GlobalModeError(
                f"mode='global' cannot run under activation checkpointing: {self.path!r} is being "
                f"recomputed in backward, where the mask of stack {self.stack.name!r} may belong to "
                f"another forward; use mode='multilayer', or turn activation checkpointing off"
            )
        if self.owns_generator:
            # the submodule dict itself: nn.Module.__getattr__ is Python, on every attention call
            generator = cast(LCAAMGenerator, module._modules[GENERATOR_NAME])
            if key_factor is not None and isinstance(generator, LowRankGenerator):
                mask: torch.Tensor | LowRankMask = LowRankMask(generator.query_factor(x), key_factor)
            else:
                mask = generator(x, num_kv_tokens, kv_tokens)
            if self.stack is not None:
                self.stack.mask = mask
            return mask
        assert self.stack is not None
        shared = self.stack.mask
        if shared is None or shared.shape[-2] != x.shape[-2] or shared.shape[-1] != num_kv_tokens:
            raise GlobalModeError(
                f"mode='global': {self.path!r} ran before {self.stack.leader!r}, the first "
                f"attention of stack {self.stack.name!r}, computed this forward's mask (or with "
                f"other token counts); use mode='multilayer' for models that call their layers "
                f"out of order"
            )
        return shared

    def run(self, call: AttentionCall) -> AttentionResult:
        """Compute `call` with this site's backend, recording it and which backend ran."""
        if self.recorder is not None:
            self.recorder.record(self, call)
        result = run(call, self.backend)
        self.last_backend = result.backend
        return result

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
        None means `x` (self-attention). `attn_mask` follows `AttentionCall`.
        """
        call = AttentionCall(
            q,
            k,
            v,
            self.mask(module, x, k.shape[-2], kv_tokens),
            fusion=self.fusion,
            scale=scale,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=dropout_p,
            need_weights=need_weights,
        )
        result = self.run(call)
        return result.output, result.weights


def generator_of(module: nn.Module) -> MaskGenerator | LowRankGenerator | None:
    """The generator a patched module owns, or None (unpatched or a global follower)."""
    generator = module._modules.get(GENERATOR_NAME)
    return generator if isinstance(generator, (MaskGenerator, LowRankGenerator)) else None


def patched_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The instance-level forward of a patched module: its adapter's forward with LCAAM."""
    site: LCAAMSite = getattr(module, SITE_ATTR)
    return site.adapter.forward(module, site, *args, **kwargs)


def is_lcaam_key(key: str) -> bool:
    """Whether a state-dict key belongs to an LCAAM generator."""
    return GENERATOR_NAME in key.split(".")


def forgive_missing_lcaam_keys(module: nn.Module, incompatible_keys: Any) -> None:
    """Load-state-dict post hook of a patched module: an upstream checkpoint lacks the LCAAM
    keys, and that is fine (they keep their identity init)."""
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not is_lcaam_key(key)]
