"""Fused LCAAM attention, softmax((S ◇ M) + B) V, and the backends that compute it.

S = QKᵀ·scale, M is the generated mask (B, Nq, Nk) shared by every head, ◇ is `mul` or
`add`, and B is the upstream's own mask, applied after fusion so that a masked position
stays masked whatever M is. A row whose keys are all masked yields zeros, not NaN.

Backends are the extension point for faster kernels: `register_backend` adds one, and
`backend="auto"` takes the first registered backend (highest priority) that supports
the request.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
import torch.nn.functional as F


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


@dataclasses.dataclass(frozen=True)
class AttentionRequest:
    """What one call asks of a backend: enough to decide whether it can serve it.

    Attributes:
        fusion, need_weights, device_type, dtype: as passed to `lcaam_attention`.
        attn_mask: the upstream mask's kind: "none", "bool" or "float".
        attn_mask_grad: whether a float upstream mask needs a gradient.
        is_causal: whether causal masking is asked.
        dropout: whether dropout on the weights is asked.
        head_dim, value_dim: D of q/k and Dv of v; None when unknown.
        mask_form: "dense" (M is a tensor) or "lowrank" (M is a `LowRankMask`).
    """

    fusion: str
    need_weights: bool
    device_type: str
    dtype: torch.dtype
    attn_mask: str = "none"
    attn_mask_grad: bool = False
    is_causal: bool = False
    dropout: bool = False
    head_dim: int | None = None
    value_dim: int | None = None
    mask_form: str = "dense"

    @classmethod
    def of_call(
        cls,
        q: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | LowRankMask,
        *,
        fusion: str,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        dropout_p: float,
        need_weights: bool,
    ) -> AttentionRequest:
        """The request of one `lcaam_attention` call."""
        kind = "none" if attn_mask is None else ("bool" if attn_mask.dtype == torch.bool else "float")
        return cls(
            fusion,
            need_weights,
            q.device.type,
            q.dtype,
            attn_mask=kind,
            attn_mask_grad=kind == "float" and attn_mask.requires_grad and torch.is_grad_enabled(),
            is_causal=is_causal,
            dropout=dropout_p > 0.0,
            head_dim=q.shape[-1],
            value_dim=v.shape[-1],
            mask_form="lowrank" if isinstance(mask, LowRankMask) else "dense",
        )


class AttentionBackend(Protocol):
    """A way to compute LCAAM attention; see `lcaam_attention` for the arguments.

    A backend that sets the attribute `accepts_lowrank = True` receives a `LowRankMask`
    as `mask` when the generator is factorized; every other backend gets a dense M.
    """

    def supports(self, request: AttentionRequest) -> bool:
        """Whether this backend computes `request` exactly."""
        ...

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        *,
        fusion: str,
        scale: float,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        dropout_p: float,
        need_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the attention output (B, H, Nq, Dv) and, if asked, the weights."""
        ...


_BACKENDS: dict[str, tuple[int, AttentionBackend]] = {}


def register_backend(name: str, backend: AttentionBackend, priority: int = 0) -> None:
    """Make `backend` selectable as `backend=name`; `auto` prefers higher priority."""
    _BACKENDS[name] = (priority, backend)


def backend_names() -> tuple[str, ...]:
    """Names of the registered backends, highest priority first."""
    return tuple(sorted(_BACKENDS, key=lambda n: -_BACKENDS[n][0]))


def backend_supports(name: str, request: AttentionRequest) -> bool:
    """Whether the registered backend `name` computes `request` exactly."""
    return _BACKENDS[name][1].supports(request)


def resolve_backend(name: str, request: AttentionRequest) -> str:
    """The name of backend `name` if it supports `request`, else of the best one that does.

    An explicit backend that cannot serve a request (e.g. `sdpa` asked for weights or for
    `mul`) falls back to the best one that can, so results never depend on the choice.
    """
    if name != "auto" and _BACKENDS[name][1].supports(request):
        return name
    for candidate in backend_names():
        if _BACKENDS[candidate][1].supports(request):
            return candidate
    raise RuntimeError(f"no registered LCAAM backend supports {request}")


def lcaam_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | LowRankMask,
    *,
    fusion: str,
    scale: float,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Compute softmax((QKᵀ·scale ◇ M) + B) V.

    Args:
        q, k, v: (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv).
        mask: the LCAAM mask M, (B, Nq, Nk), or its factors as a `LowRankMask`; the same
            for every head.
        fusion: "mul" or "add".
        scale: the factor on QKᵀ, usually D ** -0.5.
        attn_mask: the upstream mask B, broadcastable to (B, H, Nq, Nk): bool with True
            where a query may attend (the SDPA convention) or float, added to the scores.
        is_causal: mask out keys after the query's position (top-left aligned).
        dropout_p: dropout on the attention weights.
        need_weights: also return the weights (B, H, Nq, Nk), after dropout.
        backend: a registered backend name or "auto".
    """
    request = AttentionRequest.of_call(
        q, v, mask, fusion=fusion, attn_mask=attn_mask, is_causal=is_causal,
        dropout_p=dropout_p, need_weights=need_weights,
    )
    return run_backend(
        resolve_backend(backend, request),
        q,
        k,
        v,
        mask,
        fusion=fusion,
        scale=scale,
        attn_mask=attn_mask,
        is_causal=is_causal,
        dropout_p=dropout_p,
        need_weights=need_weights,
    )


def run_backend(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | LowRankMask,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Call the registered backend `name`, already resolved for this call (see
    `resolve_backend`); a `LowRankMask` is made dense for backends that do not take it."""
    chosen = _BACKENDS[name][1]
    if isinstance(mask, LowRankMask) and not getattr(chosen, "accepts_lowrank", False):
        mask = mask.dense()
    return chosen(q, k, v, mask, **options)


def _causal_keep(nq: int, nk: int, device: torch.device) -> torch.Tensor:
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril()


class EagerBackend:
    """The reference: materialises the scores; supports everything, returns weights."""

    def supports(self, request: AttentionRequest) -> bool:
        """Eager supports every request."""
        return True

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        *,
        fusion: str,
        scale: float,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        dropout_p: float,
        need_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference computation in the inputs' dtype with an fp32 softmax."""
        scores = (q @ k.transpose(-2, -1)) * scale
        m = mask.unsqueeze(-3).to(scores.dtype)
        scores = scores * m if fusion == "mul" else scores + m
        scores = scores.float()
        masked = attn_mask is not None or is_causal
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask.float()
        if is_causal:
            keep = _causal_keep(q.shape[-2], k.shape[-2], q.device)
            scores = scores.masked_fill(~keep, float("-inf"))
        if masked:
            dead_rows = torch.isneginf(scores).all(dim=-1, keepdim=True)
            scores = scores.masked_fill(dead_rows, 0.0)
        weights = torch.softmax(scores, dim=-1)
        if masked:
            weights = weights.masked_fill(dead_rows, 0.0)
        weights = weights.to(q.dtype)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = weights @ v
        return out, (weights if need_weights else None)


class SDPABackend:
    """`fusion="add"` through `F.scaled_dot_product_attention` with M in a float mask."""

    def supports(self, request: AttentionRequest) -> bool:
        """SDPA takes an additive mask only and never returns weights."""
        return request.fusion == "add" and not request.need_weights

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        *,
        fusion: str,
        scale: float,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        dropout_p: float,
        need_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fold M, the upstream mask and causality into one additive float mask."""
        bias = mask.unsqueeze(-3).to(q.dtype)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                bias = bias.masked_fill(~attn_mask, float("-inf"))
            else:
                bias = bias + attn_mask.to(q.dtype)
        if is_causal:
            keep = _causal_keep(q.shape[-2], k.shape[-2], q.device)
            bias = bias.masked_fill(~keep, float("-inf"))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale
        )
        return out, None


register_backend("eager", EagerBackend(), priority=0)
register_backend("sdpa", SDPABackend(), priority=10)

