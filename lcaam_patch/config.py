"""The options of `lcaam_patch.apply`, validated in one place."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from .errors import InvalidOptionError

MODES = ("multilayer", "global")
FUSIONS = ("mul", "add")
ACTIVATIONS = ("none", "sigmoid", "softplus")
INITS = ("identity", "default")
GENERATORS = ("mlp", "lowrank")


@dataclasses.dataclass(frozen=True)
class LCAAMConfig:
    """Every option of `apply` except the model and the preset name.

    Attributes:
        mode: "multilayer" (a generator per attention layer) or "global" (one per stack).
        fusion: "mul" (the paper's default) or "add": how M is fused into the scores.
        depth: number of Linear layers in the generator (eq. 2-4); depth 1 is one Linear.
        hidden: width of the hidden layers; None takes the attention's embedding width.
        activation: applied to M: "none", "sigmoid" or "softplus".
        init: "identity" (the patched model computes what the original computes) or
            "default" (PyTorch's default Linear init for every layer).
        max_tokens: bound on the query tokens (and key tokens for self-attention).
        max_kv_tokens: bound on the key tokens, i.e. the generator's output width.
        targets: glob patterns on module paths; only matching sites are patched.
        exclude: glob patterns on module paths; matching sites are left alone.
        backend: "auto", "eager", "sdpa", "triton", "flex", "lowrank_sdpa" or a backend
            registered later.
        generator: "mlp" (the paper's Linear-ReLU stack, M (B, Nq, Nk) bounded by the token
            counts) or "lowrank" (M = A·Bᵀ from query and key tokens, no token bound).
        rank: R of the "lowrank" generator.
    """

    mode: str = "multilayer"
    fusion: str = "mul"
    depth: int = 1
    hidden: int | None = None
    activation: str = "none"
    init: str = "identity"
    max_tokens: int | None = None
    max_kv_tokens: int | None = None
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    backend: str = "auto"
    generator: str = "mlp"
    rank: int = 1

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_choice("fusion", self.fusion, FUSIONS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("init", self.init, INITS)
        from .attention import backend_names

        _check_choice("backend", self.backend, ("auto", *backend_names()))
        _check_choice("generator", self.generator, GENERATORS)
        _check_positive_int("depth", self.depth)
        _check_positive_int("rank", self.rank)
        if self.generator == "mlp" and self.rank != 1:
            raise InvalidOptionError(
                f"rank={self.rank} applies to generator='lowrank' only; pass generator='lowrank' "
                f"or drop rank"
            )
        if self.generator == "lowrank" and self.activation != "none":
            raise InvalidOptionError(
                f"generator='lowrank' keeps M = A·Bᵀ factorized, which activation="
                f"{self.activation!r} would break; use activation='none' or generator='mlp'"
            )
        for name in ("hidden", "max_tokens", "max_kv_tokens"):
            value = getattr(self, name)
            if value is not None:
                _check_positive_int(name, value)
        if self.init == "identity" and neutral_bias(self.fusion, self.activation) is None:
            raise InvalidOptionError(
                f"activation={self.activation!r} can never output the neutral value "
                f"{NEUTRAL[self.fusion]} of fusion={self.fusion!r}, so init='identity' cannot "
                f"reproduce the original model; use init='default' or pick an activation "
                f"from {_identity_activations(self.fusion)}"
            )

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> LCAAMConfig:
        """Build a config from keyword options, normalising pattern arguments."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidOptionError(
                f"unknown option(s) {unknown}; the options of apply are {sorted(known)}"
            )
        values = dict(options)
        for name in ("targets", "exclude"):
            values[name] = _as_patterns(name, values.get(name))
        return cls(**values)


NEUTRAL = {"mul": 1.0, "add": 0.0}


def neutral_bias(fusion: str, activation: str) -> float | None:
    """The last-layer bias b with activation(b) equal to the fusion's neutral value."""
    target = NEUTRAL[fusion]
    if activation == "none":
        return target
    if activation == "softplus" and target > 0:
        return math.log(math.expm1(target))
    return None


def _identity_activations(fusion: str) -> list[str]:
    return [a for a in ACTIVATIONS if neutral_bias(fusion, a) is not None]


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InvalidOptionError(
            f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}"
        )


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(f"{name}={value!r} must be a positive integer")


def _as_patterns(name: str, value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InvalidOptionError(
        f"{name}={value!r} must be a glob pattern on module paths or a list of them, "
        f"e.g. {name}=['blocks.*.attn']"
    )
