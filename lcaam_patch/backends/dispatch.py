"""The one dispatch: which backend computes an `AttentionCall`, and running it.

`backend="auto"` takes, per call, the highest-priority registered backend that can compute
the call exactly. A named backend is strict: it computes the call or raises
`BackendUnavailableError` saying why and what to use instead; it never falls back.
"""

from __future__ import annotations

import torch

from ..errors import BackendUnavailableError, InvalidOptionError, RegistrationError
from . import masking
from .call import AttentionBackend, AttentionCall, AttentionResult, LowRankMask

_BACKENDS: dict[str, tuple[int, AttentionBackend]] = {}


def register_backend(name: str, backend: AttentionBackend, priority: int = 0, *, replace: bool = False) -> None:
    """Make `backend` selectable as `backend=name`; `"auto"` prefers higher `priority`.

    `backend` follows `AttentionBackend`: a `refusal(call)` method and a `__call__(call)`.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise RegistrationError(f"register_backend needs a non-empty name other than 'auto', got {name!r}")
    if not callable(backend) or not callable(getattr(backend, "refusal", None)):
        raise RegistrationError(
            f"register_backend({name!r}, ...) got {type(backend).__name__}, which is not an "
            f"AttentionBackend; pass an object with refusal(call) -> str | None and "
            f"__call__(call) -> (output, weights)"
        )
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise RegistrationError(f"register_backend priority must be an int, got {priority!r}")
    if name in _BACKENDS and not replace and _BACKENDS[name][1] is not backend:
        raise RegistrationError(f"a backend named {name!r} is already registered; pass replace=True")
    _BACKENDS[name] = (priority, backend)


def unregister_backend(name: str) -> None:
    """Forget the backend called `name` (a built-in one too); unknown names are ignored."""
    _BACKENDS.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """Names of the registered backends, highest priority first."""
    return tuple(sorted(_BACKENDS, key=lambda n: -_BACKENDS[n][0]))


def get_backend(name: str) -> AttentionBackend:
    """The registered backend called `name`."""
    if name not in _BACKENDS:
        raise InvalidOptionError(f"backend={name!r} is not registered; choose 'auto' or one of {backend_names()}")
    return _BACKENDS[name][1]


def refusal(name: str, call: AttentionCall) -> str | None:
    """Why backend `name` cannot compute `call`, or None when it can."""
    backend = get_backend(name)
    if call.is_lowrank and not getattr(backend, "accepts_lowrank", False):
        call = call.with_dense_mask()
    return backend.refusal(call)


def choose(name: str, call: AttentionCall) -> str:
    """The backend that computes `call` under the option `backend=name`.

    "auto" picks the best that can; a named backend must be able to, or this raises.
    """
    if name != "auto":
        why = refusal(name, call)
        if why is not None:
            able = [n for n in backend_names() if refusal(n, call) is None]
            raise BackendUnavailableError(
                f"backend={name!r} cannot compute this attention call: {why}. Use "
                f"backend='auto' to pick one per call, or one that can: {able}"
            )
        return name
    for candidate in backend_names():
        if refusal(candidate, call) is None:
            return candidate
    reasons = "; ".join(f"{n}: {refusal(n, call)}" for n in backend_names())
    raise BackendUnavailableError(
        f"no registered LCAAM backend computes this attention call ({reasons}); register one "
        f"with lcaam_patch.register_backend"
    )


def run(call: AttentionCall, backend: str = "auto") -> AttentionResult:
    """Compute `call` with the backend `choose(backend, call)` names."""
    name = choose(backend, call)
    chosen = _BACKENDS[name][1]
    call = masking.hide_masked_keys(call)
    if call.is_lowrank and not getattr(chosen, "accepts_lowrank", False):
        call = call.with_dense_mask()
    out, weights = chosen(call)
    return AttentionResult(out, weights, name)


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
    """Compute softmax((QKᵀ·scale ◇ M) + B) V; see `AttentionCall` for the arguments.

    Returns the output (B, H, Nq, Dv) and the weights (B, H, Nq, Nk) when `need_weights`.
    A named `backend` computes the call or raises `BackendUnavailableError`.
    """
    call = AttentionCall(
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
    result = run(call, backend)
    return result.output, result.weights
