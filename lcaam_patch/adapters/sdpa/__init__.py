"""The generic SDPA adapter: attention no other adapter claims, found and patched through its
one call of `torch.nn.functional.scaled_dot_product_attention` (see docs/sdpa.md).

It claims a module whose own forward (its children's excluded) called SDPA in the shape
probe (`probe`), refuses at `apply` what LCAAM cannot place (not one call per forward, q not
(B, H, Nq, D) of the input X (B, Nq, C), no bound), and verifies each site at its first call
against the original SDPA call (`lcaam_patch.verification`).
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch import nn

from ...config import LCAAMConfig
from ...errors import MissingBoundError, UnsupportedModuleError
from ...site import GENERATOR_NAME, LCAAMSite, SiteGeometry
from ..base import Adapter
from ..registry import registered_adapters
from .intercept import Expected, Forward, Intercept, State, enter_child, leave_child
from .probe import Key, Record, candidate, probe

COMPILE_FLOOR = (2, 6)
"""The first torch whose Dynamo traces a `TorchFunctionMode` created in compiled code."""


class SDPAAdapter(Adapter):
    """Patches modules no other adapter claims through their one SDPA call per forward."""

    name = "sdpa"
    priority = -100
    verifies_claims = True
    fallback = True

    def attention_types(self) -> tuple[type[nn.Module], ...]:
        """None listed: claims come from the shape probe."""
        return ()

    def claims(self, module: nn.Module, path: str, root: nn.Module) -> bool:
        """Modules whose own forward called SDPA in the probe, of no class an adapter declares
        inapplicable, MultiheadAttention (whose call a mode does not see) excluded."""
        if isinstance(module, nn.MultiheadAttention):
            return False
        record = probe(root).records.get(path)
        return record is not None and any(f.calls for f in record.forwards) and not _inapplicable(module)

    def declines(self, module: nn.Module, path: str, root: nn.Module) -> str | None:
        """Why a candidate the probe ran is not claimed."""
        if not candidate(module):
            return None
        found = probe(root)
        if path in found.failures:
            return f"the SDPA probe could not run it: {found.failures[path]}"
        record = found.records.get(path)
        if record is not None and not any(f.calls for f in record.forwards):
            return "its forward calls no torch.nn.functional.scaled_dot_product_attention of its own"
        return None

    def geometry(self, module: nn.Module, path: str, root: nn.Module, config: LCAAMConfig) -> SiteGeometry:
        """One SDPA call per forward, q (B, H, Nq, D) of X (B, Nq, C); bounds from the options
        or from example inputs."""
        record = probe(root).records[path]
        expected, kv_width, seen_q, seen_kv = _read_calls(module, path, record)
        cross = expected.kv_key is not None or seen_kv != seen_q
        max_q = config.max_tokens or (seen_q if record.real_tokens else None)
        max_kv = config.max_kv_tokens or (config.max_tokens if not cross else None)
        max_kv = max_kv or (seen_kv if record.real_tokens else None)
        if max_kv is None and config.generator == "mlp":
            raise MissingBoundError(
                f"{type(module).__name__} at {path!r} calls scaled_dot_product_attention, but nothing gives a "
                f"bound on its key tokens; pass max_kv_tokens=N (the longest key sequence; max_tokens=N for "
                f"self-attention) or example_inputs=(...) of the longest input to lcaam_patch.apply, or use "
                f"generator='lowrank', which has no bound"
            )
        _EXPECTED[module] = expected
        return SiteGeometry(
            embed_dim=expected.width,
            max_q_tokens=max_q,
            max_kv_tokens=max_kv,
            kind="cross" if cross else "self",
            kv_embed_dim=kv_width if cross else None,
        )

    def prepare(self, module: nn.Module, root: nn.Module) -> State:
        """Count the running descendants, so that their SDPA calls are not this site's."""
        state = State(_EXPECTED.pop(module), type(module).forward)
        for child in _descendants(module):
            child.register_forward_pre_hook(functools.partial(enter_child, state))
            child.register_forward_hook(functools.partial(leave_child, state), always_call=True)
        return state

    def restore(self, module: nn.Module, state: State) -> None:
        """Remove the hooks `prepare` registered."""
        for child in module.modules():
            for hooks in (child._forward_pre_hooks, child._forward_hooks):
                for key in [k for k, h in hooks.items() if _ours(h, state)]:
                    del hooks[key]
                    child._forward_hooks_always_called.pop(key, None)

    def forward(self, module: nn.Module, site: LCAAMSite, *args: Any, **kwargs: Any) -> Any:
        """The module's own forward, its SDPA call computed with LCAAM."""
        if torch.compiler.is_compiling() and _torch_version() < COMPILE_FLOOR:
            raise UnsupportedModuleError(
                f"{type(module).__name__} at {site.path!r} is patched through its SDPA call, which "
                f"torch.compile can trace from torch 2.6 on (torch {torch.__version__} is installed); "
                f"upgrade torch, or run this model eagerly"
            )
        state: State = site.adapter_state
        x = _input(args, kwargs, state.expected.x_key)
        if not isinstance(x, torch.Tensor):
            raise UnsupportedModuleError(
                f"{type(module).__name__} at {site.path!r} was called without the tensor input apply read as "
                f"its query tokens (argument {state.expected.x_key!r}); call it as apply saw it, or exclude "
                f"it with exclude=[{site.path!r}]"
            )
        kv = _input(args, kwargs, state.expected.kv_key) if state.expected.kv_key is not None else None
        current = Forward(x, kv if isinstance(kv, torch.Tensor) else None)
        state.forwards.append(current)
        try:
            with Intercept(module, site, current):
                output = state.forward(module, *args, **kwargs)
        finally:
            state.forwards.pop()
        if current.calls == 0 and not torch.compiler.is_compiling():
            raise UnsupportedModuleError(
                f"{type(module).__name__} at {site.path!r} ran its forward without calling "
                f"scaled_dot_product_attention, which apply saw it call, so LCAAM is not in its path; "
                f"exclude it with exclude=[{site.path!r}]"
            )
        return output


_EXPECTED: weakref.WeakKeyDictionary[nn.Module, Expected] = weakref.WeakKeyDictionary()
"""What `geometry` read for each module, for its `prepare`."""


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _inapplicable(module: nn.Module) -> bool:
    return any(type(module) in a.inapplicable() for a in registered_adapters().values() if not a.fallback)


def _descendants(module: nn.Module) -> list[nn.Module]:
    generator = module._modules.get(GENERATOR_NAME)
    inside = set() if generator is None else {id(m) for m in generator.modules()}
    return [m for m in module.modules() if m is not module and id(m) not in inside]


def _ours(hook: Any, state: State) -> bool:
    return (
        isinstance(hook, functools.partial)
        and hook.func in (enter_child, leave_child)
        and bool(hook.args)
        and hook.args[0] is state
    )


def _input(args: tuple[Any, ...], kwargs: dict[str, Any], key: Key) -> Any:
    if isinstance(key, int):
        return args[key] if key < len(args) else None
    return kwargs.get(key)


def _read_calls(module: nn.Module, path: str, record: Record) -> tuple[Expected, int | None, int, int]:
    """What every probed forward of `module` agrees on, and the largest Nq and Nk it saw;
    UnsupportedModuleError for what LCAAM cannot place."""
    name = type(module).__name__
    counts = sorted({len(f.calls) for f in record.forwards})
    if counts != [1]:
        raise UnsupportedModuleError(
            f"{name} at {path!r} calls scaled_dot_product_attention {' or '.join(map(str, counts))} times per "
            f"forward; LCAAM places one mask per forward, so it patches modules that call it exactly once. "
            f"Exclude it with exclude=[{path!r}], or write an adapter for it (docs/adapters.md)"
        )
    found: Expected | None = None
    kv_width: int | None = None
    seen_q = seen_kv = 0
    for forward in record.forwards:
        (q, k), x_key = forward.calls[0], forward.x_key
        x = forward.inputs.get(x_key) if x_key is not None else None
        if x is None or len(x) != 3 or len(q) != 4 or len(k) != 4 or x[0] != q[0] or x[1] != q[2]:
            raise UnsupportedModuleError(
                f"{name} at {path!r} calls scaled_dot_product_attention with q of shape {q} for an input X of "
                f"shape {x}; LCAAM reads X (B, Nq, C) as the query tokens of q (B, H, Nq, D), and these do not "
                f"line up ({_why_not(x, q)}). Exclude it with exclude=[{path!r}], or write an adapter for it "
                f"(docs/adapters.md)"
            )
        assert x_key is not None
        kv_key, width = _key_tokens(forward, x_key, x, k)
        expected = Expected(x_key, kv_key, x[2], q[1], q[3])
        if found is not None and found != expected:
            raise UnsupportedModuleError(
                f"{name} at {path!r} calls scaled_dot_product_attention differently from one forward to the "
                f"next ({found} and {expected}); exclude it with exclude=[{path!r}]"
            )
        found, kv_width = expected, width
        seen_q, seen_kv = max(seen_q, q[2]), max(seen_kv, k[2])
    assert found is not None
    return found, kv_width, seen_q, seen_kv


def _key_tokens(forward: Any, x_key: Key, x: tuple[int, ...], k: tuple[int, ...]) -> tuple[Key | None, int | None]:
    """The input holding the key tokens (None: X itself) and its width: the one other 3-D
    input of the keys' batch and length, when the keys are not as many as the queries."""
    if k[2] == x[1]:
        return None, None
    inputs = [(key, s) for key, s in forward.inputs.items() if key != x_key and len(s) == 3]
    matching = [(key, s) for key, s in inputs if s[0] == k[0] and s[1] == k[2]]
    if len(matching) == 1:
        return matching[0][0], matching[0][1][2]
    return None, None


def _why_not(x: tuple[int, ...] | None, q: tuple[int, ...]) -> str:
    if x is None:
        return "it takes no tensor input"
    if len(x) == 4:
        return "X is a 4-D feature map; its tokens are flattened inside the forward"
    if len(q) != 4 or len(x) != 3:
        return f"q is {len(q)}-D and X {len(x)}-D"
    if x[0] != q[0]:
        return "q's batch is not X's: heads, windows or frames are packed into the batch"
    return "q's tokens are not X's: tokens are joined (e.g. text and image), pooled or packed into the sequence"


adapter = SDPAAdapter()
