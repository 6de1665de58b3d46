"""The one dispatch: which backend computes an `AttentionCall`, and running it.

`backend="auto"` takes, per call, the highest-priority registered backend that can compute
the call exactly. A named backend is strict: it computes the call or raises
`BackendUnavailableError` saying why and what to use instead; it never falls back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable

import torch

from ..errors import BackendUnavailableError, InvalidOptionError, RegistrationError
from . import masking
from .call import AttentionBackend, AttentionCall, AttentionResult, CallSpec, LowRankMask


@dataclasses.dataclass(frozen=True)
class _Registered:
    priority: int
    backend: AttentionBackend
    refusal_for: Callable[[CallSpec], str | None] | None  # None: asked per call, with the call
    accepts_lowrank: bool
    accepts_grouped_heads: bool


_BACKENDS: dict[str, _Registered] = {}
_ORDER: tuple[str, ...] = ()
_CONTEXTS: tuple[Callable[[], Hashable], ...] = ()
_Key = tuple[str, CallSpec, tuple[Hashable, ...]]
_DECISIONS: dict[_Key, str | None] = {}
"""(backend, spec, context) → its `refusal_for`: each backend is asked once per spec."""
_CHOICES: dict[_Key, str] = {}
"""(option, spec, context) → the backend that computes it, when no per-call refusal took part."""


def _registry_changed() -> None:
    global _ORDER, _CONTEXTS
    _ORDER = tuple(sorted(_BACKENDS, key=lambda n: -_BACKENDS[n].priority))
    hooks = (getattr(entry.backend, "refusal_context", None) for entry in _BACKENDS.values())
    _CONTEXTS = tuple(hook for hook in hooks if callable(hook))
    _DECISIONS.clear()
    _CHOICES.clear()


def register_backend(name: str, backend: AttentionBackend, priority: int = 0, *, replace: bool = False) -> None:
    """Make `backend` selectable as `backend=name`; `"auto"` prefers higher `priority`.

    `backend` follows `AttentionBackend`: a `refusal(call)` method and a `__call__(call)`,
    and, to be decided once per `CallSpec` instead of on every call, `refusal_for(spec)`.
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
    if name in _BACKENDS and not replace and _BACKENDS[name].backend is not backend:
        raise RegistrationError(f"a backend named {name!r} is already registered; pass replace=True")
    by_spec = getattr(backend, "refusal_for", None)
    _BACKENDS[name] = _Registered(
        priority,
        backend,
        by_spec if callable(by_spec) else None,
        bool(getattr(backend, "accepts_lowrank", False)),
        bool(getattr(backend, "accepts_grouped_heads", False)),
    )
    _registry_changed()


def unregister_backend(name: str) -> None:
    """Forget the backend called `name` (a built-in one too); unknown names are ignored."""
    if _BACKENDS.pop(name, None) is not None:
        _registry_changed()


def backend_names() -> tuple[str, ...]:
    """Names of the registered backends, highest priority first."""
    return _ORDER


def get_backend(name: str) -> AttentionBackend:
    """The registered backend called `name`."""
    if name not in _BACKENDS:
        raise InvalidOptionError(f"backend={name!r} is not registered; choose 'auto' or one of {backend_names()}")
    return _BACKENDS[name].backend


class _Asked:
    """One call as the dispatch asks backends about it: its spec, the process context, and
    the forms other backends need (M dense, k and v repeated to q's heads), each made at most
    once and only for a backend that needs it."""

    __slots__ = ("_dense", "_forms", "_repeated", "call", "context", "spec")

    def __init__(self, call: AttentionCall | None, spec: CallSpec) -> None:
        self.call = call
        self.spec = spec
        self.context = tuple([hook() for hook in _CONTEXTS]) if _CONTEXTS else ()
        self._forms: dict[tuple[bool, bool], AttentionCall] | None = None
        self._dense: torch.Tensor | None = None
        self._repeated: AttentionCall | None = None

    def form_for(self, entry: _Registered) -> AttentionCall:
        """The call as `entry` receives it: factors and grouped heads for a backend that
        accepts them, else M dense and k, v repeated to q's heads."""
        call = self.call
        assert call is not None
        dense = self.spec.is_lowrank and not entry.accepts_lowrank
        repeat = self.spec.grouped_heads and not entry.accepts_grouped_heads
        if not (dense or repeat):
            return call
        if self._forms is None:
            self._forms = {}
        form = self._forms.get((dense, repeat))
        if form is None:
            form = call
            if repeat:
                if self._repeated is None:
                    self._repeated = call.with_repeated_heads()
                form = self._repeated
            if dense:
                if self._dense is None:
                    self._dense = call.dense_mask()
                form = form.derived(mask=self._dense)
            self._forms[(dense, repeat)] = form
        return form


def _refusal(name: str, asked: _Asked, cache: bool = True) -> str | None:
    """Why `name` refuses the call; None also when it can only be asked with a call and
    `asked` has none (a spec alone)."""
    entry = _BACKENDS[name]
    if entry.refusal_for is None:
        return None if asked.call is None else entry.backend.refusal(asked.form_for(entry))
    if not cache:
        return entry.refusal_for(asked.spec)
    key = (name, asked.spec, asked.context)
    try:
        return _DECISIONS[key]
    except KeyError:
        why = _DECISIONS[key] = entry.refusal_for(asked.spec)
        return why


def _choose(option: str, asked: _Asked) -> str:
    # under torch.compile the decisions are plain calls: no cache for the graph to guard on
    cache = not torch.compiler.is_compiling()
    key = (option, asked.spec, asked.context)
    if cache:
        chosen = _CHOICES.get(key)
        if chosen is not None:
            return chosen
    if option != "auto":
        get_backend(option)
    static = True
    for candidate in _ORDER if option == "auto" else (option,):
        static = static and _BACKENDS[candidate].refusal_for is not None
        if _refusal(candidate, asked, cache) is None:
            if cache and static:
                _CHOICES[key] = candidate
            return candidate
    raise _unavailable(option, asked)


def _unavailable(option: str, asked: _Asked) -> BackendUnavailableError:
    if option != "auto":
        able = [n for n in _ORDER if _refusal(n, asked, cache=False) is None]
        return BackendUnavailableError(
            f"backend={option!r} cannot compute this attention call: {_refusal(option, asked, cache=False)}. "
            f"Use backend='auto' to pick one per call, or one that can: {able}"
        )
    reasons = "; ".join(f"{n}: {_refusal(n, asked, cache=False)}" for n in _ORDER)
    return BackendUnavailableError(
        f"no registered LCAAM backend computes this attention call ({reasons}); register one "
        f"with lcaam_patch.register_backend"
    )


def refusal(name: str, call: AttentionCall) -> str | None:
    """Why backend `name` cannot compute `call`, or None when it can."""
    get_backend(name)
    return _refusal(name, _Asked(call, call.spec))


def refusal_for(name: str, spec: CallSpec) -> str | None:
    """Why backend `name` cannot compute calls of `spec`, or None when it can, without tensors.

    A third-party backend with only `refusal(call)` can be asked with a call only: for it this
    returns None, and it is asked at each call.
    """
    get_backend(name)
    return _refusal(name, _Asked(None, spec))


def choose(name: str, call: AttentionCall | CallSpec) -> str:
    """The backend that computes `call` (or calls of a `CallSpec`) under `backend=name`.

    "auto" picks the best that can; a named backend must be able to, or this raises. Given a
    spec, backends with only `refusal(call)` are taken to accept it.
    """
    if isinstance(call, CallSpec):
        return _choose(name, _Asked(None, call))
    return _choose(name, _Asked(call, call.spec))


def run(call: AttentionCall, backend: str = "auto") -> AttentionResult:
    """Compute `call` with the backend `choose(backend, call)` names.

    The upstream mask is split once and handed to the backend on the call; a factorized M is
    made dense at most once, and only for a backend that needs it dense.
    """
    call = masking.hide_masked_keys(call)
    asked = _Asked(call, call.spec)
    name = _choose(backend, asked)
    out, weights = _BACKENDS[name].backend(asked.form_for(_BACKENDS[name]))
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
