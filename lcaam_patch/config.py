"""The options of `lcaam_patch.apply`, validated in one place."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from .backends import NEUTRAL, backend_names
from .errors import InvalidOptionError

MODES = ("multilayer", "global")
FUSIONS = ("mul", "add")
ACTIVATIONS = ("none", "sigmoid", "softplus")
INITS = ("identity", "default")
GENERATORS = ("mlp", "lowrank")
GENERIC = ("auto", "on", "off")


def _option(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    """A field of `LCAAMConfig`: its default and the help text the CLI and docs show."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class LCAAMConfig:
    """Every option of `apply` except the model and the preset name.

    This class is the one declaration of the options: `apply`'s keyword arguments, the
    command-line flags (`lcaam_patch.cli.options`) and the README's options table follow
    its fields, and a test checks that they agree. Each field's help text is in its
    metadata (`dataclasses.fields(LCAAMConfig)`).
    """

    mode: str = _option(
        "multilayer", "'multilayer': a generator per attention layer; 'global': one per layer stack", MODES
    )
    fusion: str = _option("mul", "how M is fused into the scores: 'mul' (the paper's default) or 'add'", FUSIONS)
    depth: int = _option(1, "Linear layers in the generator (eq. 2-4); 1 is a single Linear")
    hidden: int | None = _option(None, "width of the generator's hidden layers; default: the attention's width")
    activation: str = _option("none", "applied to M: 'none', 'sigmoid' or 'softplus'", ACTIVATIONS)
    init: str = _option(
        "identity", "'identity': the patched model starts computing what the original does; 'default'", INITS
    )
    max_tokens: int | None = _option(None, "bound on the query tokens (and the keys of self-attention)")
    max_kv_tokens: int | None = _option(None, "bound on the key tokens: the generator's output width")
    targets: tuple[str, ...] | None = _option(None, "glob patterns on module paths: only these sites are patched")
    exclude: tuple[str, ...] | None = _option(None, "glob patterns on module paths: these sites are left alone")
    backend: str = _option("auto", "'auto' (per call), or a backend name: it computes every call or raises")
    generator: str = _option(
        "mlp", "'mlp' (the paper's, bounded by the token counts) or 'lowrank' (M = A·Bᵀ, no bound)", GENERATORS
    )
    rank: int = _option(1, "R of generator='lowrank'")
    verify: bool = _option(
        True, "sites whose claim is inferred (transformers) check themselves at their first call; False skips it"
    )
    generic: str = _option(
        "auto",
        "modules no adapter claims that call SDPA once per forward: 'auto' patches them in models where no "
        "adapter claims anything, 'on' in every model, 'off' never",
        GENERIC,
    )

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_choice("fusion", self.fusion, FUSIONS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("init", self.init, INITS)
        _check_choice("backend", self.backend, ("auto", *backend_names()))
        _check_choice("generator", self.generator, GENERATORS)
        _check_choice("generic", self.generic, GENERIC)
        _check_positive_int("depth", self.depth)
        _check_positive_int("rank", self.rank)
        if self.generator == "mlp" and self.rank != 1:
            raise InvalidOptionError(
                f"rank={self.rank} applies to generator='lowrank' only; pass generator='lowrank' or drop rank"
            )
        if self.generator == "lowrank" and self.activation != "none":
            raise InvalidOptionError(
                f"generator='lowrank' keeps M = A·Bᵀ factorized, which activation="
                f"{self.activation!r} would break; use activation='none' or generator='mlp'"
            )
        if not isinstance(self.verify, bool):
            raise InvalidOptionError(f"verify={self.verify!r} must be True or False")
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
            raise InvalidOptionError(f"unknown option(s) {unknown}; the options of apply are {sorted(known)}")
        values = dict(options)
        for name in ("targets", "exclude"):
            values[name] = _as_patterns(name, values.get(name))
        return cls(**values)


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
        raise InvalidOptionError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")


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
        f"{name}={value!r} must be a glob pattern on module paths or a list of them, e.g. {name}=['blocks.*.attn']"
    )
