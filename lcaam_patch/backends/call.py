"""What one LCAAM attention call asks of a backend, and the protocol every backend follows."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any, NamedTuple, Protocol

import torch

NEUTRAL = {"mul": 1.0, "add": 0.0}
"""The value of M that leaves the scores unchanged, per fusion."""


@dataclasses.dataclass(frozen=True)
class LowRankMask:
    """M = A·Bᵀ kept as its factors: A (B, Nq, R) from the query tokens, B (B, Nk, R) from the keys.

    Backends with `accepts_lowrank = True` receive the factors; the others get `dense()`.
    """

    a: torch.Tensor
    b: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """The shape of M, (B, Nq, Nk)."""
        return torch.Size((self.a.shape[0], self.a.shape[-2], self.b.shape[-2]))

    def dense(self) -> torch.Tensor:
        """M itself, (B, Nq, Nk)."""
        return self.a @ self.b.transpose(-2, -1)


class CallSpec(NamedTuple):
    """What a backend's decision depends on, without the tensors: hashable, built once per call.

    `AttentionCall.spec` builds it; backends decide with `refusal_for(spec)`, and the dispatch
    caches each decision per (backend, spec). The fields mirror the `AttentionCall`
    properties of the same names.
    """

    device_type: str
    dtype: torch.dtype
    fusion: str
    is_lowrank: bool
    upstream_mask_kind: str
    upstream_mask_needs_grad: bool
    need_weights: bool
    dropout_p: float
    head_dim: int
    value_dim: int
    is_causal: bool
    single_query: bool = False
    """Whether the call has one query (decoding with a KV cache): then M is one row over
    the keys, and (QKᵀ)⊙M equals Q·(K⊙M)ᵀ."""
    grouped_heads: bool = False
    """Whether k and v have fewer heads than q (grouped-query attention)."""


def _new_spec(*fields: Any) -> CallSpec:
    """A `CallSpec` of all its fields, in order, built without NamedTuple's keyword handling
    (once per attention call)."""
    return tuple.__new__(CallSpec, fields)


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """One fused LCAAM attention, softmax((QKᵀ·scale ◇ M) + upstream mask) V.

    Attributes:
        q, k, v: (B, H, Nq, D), (B, Hk, Nk, D), (B, Hk, Nk, Dv), with Hk dividing H: each
            key head serves H / Hk consecutive query heads (grouped-query attention; Hk = H
            for plain multi-head attention).
        mask: the LCAAM mask M (B, Nq, Nk), shared by every head, or its factors.
        fusion: "mul" or "add" (◇).
        scale: the factor on QKᵀ, usually D ** -0.5.
        attn_mask: the upstream mask, broadcastable to (B, H, Nq, Nk): bool with True where
            a query may attend (the SDPA convention), or float, added after fusion; -inf
            entries of a float mask are hard masks like False entries of a bool mask.
        is_causal: keep keys j <= i only (top-left aligned).
        dropout_p: dropout on the attention weights.
        need_weights: also return the weights (B, H, Nq, Nk).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | LowRankMask
    fusion: str
    scale: float
    attn_mask: torch.Tensor | None = None
    is_causal: bool = False
    dropout_p: float = 0.0
    need_weights: bool = False
    upstream: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)
    """The split upstream mask (a `masking.UpstreamMask`, typed `Any` because masking imports
    this module), set by `masking.upstream_mask` the first time it is asked."""

    @property
    def spec(self) -> CallSpec:
        """This call without its tensors: what backends decide on (`dispatch.run` reads it once)."""
        q, attn_mask = self.q, self.attn_mask
        shape = q.shape
        if attn_mask is None:
            kind, needs_grad = "none", False
        elif attn_mask.dtype == torch.bool:
            kind, needs_grad = "bool", False
        else:
            kind, needs_grad = "float", attn_mask.requires_grad and torch.is_grad_enabled()
        return _new_spec(
            q.device.type,
            q.dtype,
            self.fusion,
            isinstance(self.mask, LowRankMask),
            kind,
            needs_grad,
            self.need_weights,
            self.dropout_p,
            shape[-1],
            self.v.shape[-1],
            self.is_causal,
            shape[-2] == 1,
            self.k.shape[1] != shape[1],
        )

    @property
    def device_type(self) -> str:
        """ "cpu", "cuda", ...: where the call runs."""
        return self.q.device.type

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of q."""
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        """D, the width of q and k per head."""
        return self.q.shape[-1]

    @property
    def value_dim(self) -> int:
        """Dv, the width of v per head."""
        return self.v.shape[-1]

    @property
    def is_lowrank(self) -> bool:
        """Whether M comes as its factors."""
        return isinstance(self.mask, LowRankMask)

    @property
    def upstream_mask_kind(self) -> str:
        """ "none", "bool" or "float"."""
        if self.attn_mask is None:
            return "none"
        return "bool" if self.attn_mask.dtype == torch.bool else "float"

    @property
    def upstream_mask_needs_grad(self) -> bool:
        """Whether a float upstream mask must receive a gradient."""
        return (
            self.upstream_mask_kind == "float"
            and self.attn_mask is not None
            and self.attn_mask.requires_grad
            and torch.is_grad_enabled()
        )

    def dense_mask(self) -> torch.Tensor:
        """M as a (B, Nq, Nk) tensor, whichever form it comes in."""
        return self.mask.dense() if isinstance(self.mask, LowRankMask) else self.mask

    def with_dense_mask(self) -> AttentionCall:
        """This call with M as a dense tensor (its split upstream mask carried over)."""
        return self if not isinstance(self.mask, LowRankMask) else self.derived(mask=self.mask.dense())

    def with_repeated_heads(self) -> AttentionCall:
        """This call with k and v repeated to q's heads (each key head H / Hk times)."""
        groups = self.q.shape[1] // self.k.shape[1]
        if groups == 1:
            return self
        return self.derived(k=self.k.repeat_interleave(groups, dim=1), v=self.v.repeat_interleave(groups, dim=1))

    def derived(
        self,
        *,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        mask: torch.Tensor | LowRankMask | None = None,
    ) -> AttentionCall:
        """This call with another k, v or M of the same shapes, keeping its split upstream
        mask (which depends on none of them)."""
        call = object.__new__(AttentionCall)
        fields = call.__dict__
        fields.update(self.__dict__)  # a copy of every field, the split upstream mask included
        if k is not None:
            fields["k"] = k
        if v is not None:
            fields["v"] = v
        if mask is not None:
            fields["mask"] = mask
        return call


class AttentionResult(NamedTuple):
    """The output (B, H, Nq, Dv), the weights when asked, and the backend that computed them."""

    output: torch.Tensor
    weights: torch.Tensor | None
    backend: str


class AttentionBackend(Protocol):
    """A way to compute an `AttentionCall`: the one extension point for faster kernels.

    `refusal` says why the backend cannot compute a call exactly (None when it can);
    `__call__` computes it and returns the output and, when asked, the weights. A backend
    that sets `accepts_lowrank = True` receives a factorized M as a `LowRankMask`; every
    other backend gets a dense M. One that sets `accepts_grouped_heads = True` receives k
    and v with the heads they come with (Hk dividing H); the others get them repeated to H.
    A backend that also has `refusal_for(spec)` (`SpecRefusal`)
    is asked that instead, once per distinct `CallSpec`; one with only `refusal(call)` is
    asked on every call.
    """

    def refusal(self, call: AttentionCall) -> str | None:
        """None when this backend computes `call` exactly, else the reason it cannot."""
        ...

    def __call__(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output (B, H, Nq, Dv) and, if `call.need_weights`, the weights."""
        ...


class SpecRefusal(Protocol):
    """What a backend offers to be decided once per `CallSpec` rather than on every call."""

    def refusal_for(self, spec: CallSpec) -> str | None:
        """None when this backend computes every call of `spec` exactly, else the reason."""
        ...


class RefusalContext(Protocol):
    """A backend whose decisions also depend on the process, not only on the call."""

    def refusal_context(self) -> Hashable:
        """A cheap hashable reading of that state (Triton: `TRITON_INTERPRET`); it joins the
        dispatch's cache key, so a change of it is decided afresh."""
        ...
