"""The mask generators F of the paper (eq. 2-4), behind one protocol.

- `MaskGenerator` (`generator="mlp"`): a Linear-ReLU stack from each query token to its
  mask row, M (B, Nq, Nk) with Nk bounded by the generator's output width.
- `LowRankGenerator` (`generator="lowrank"`): M = A·Bᵀ with A = F_A(X_q) (B, Nq, R) from
  the query tokens and B = F_B(X_k) (B, Nk, R) from the key tokens, kept factorized, with
  no bound on the number of tokens.

Both are called as `generator(x, num_kv_tokens, kv_tokens)` and say what they are through
`LCAAMGenerator`'s attributes, so no caller needs to know which one it holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from typing import Protocol, cast, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .backends.call import NEUTRAL, LowRankMask
from .config import neutral_bias
from .errors import InvalidOptionError, SequenceTooLongError, UnsupportedModuleError


@runtime_checkable
class LCAAMGenerator(Protocol):
    """What every mask generator offers.

    Attributes:
        kind: "mlp" or "lowrank", the value of `apply`'s `generator` option.
        reads_key_tokens: whether the generator reads the key tokens (else only the
            query tokens); sites whose keys come from a cache must keep those tokens.
        max_kv_tokens: the largest key count it can place, None for no bound.
    """

    @property
    def kind(self) -> str:
        """ "mlp" or "lowrank"."""
        ...

    @property
    def reads_key_tokens(self) -> bool:
        """Whether the key tokens are read."""
        ...

    @property
    def max_kv_tokens(self) -> int | None:
        """The key bound, None for none."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The generator's parameters (it is an `nn.Module`)."""
        ...

    def __call__(
        self, x: torch.Tensor, num_kv_tokens: int, kv_tokens: torch.Tensor | None = None
    ) -> torch.Tensor | LowRankMask:
        """M (or its factors) for query tokens `x` (B, Nq, D) and `num_kv_tokens` keys."""
        ...

    def reset_parameters(self) -> None:
        """Re-initialise as configured (identity by default)."""
        ...

    def reset_to_identity(self) -> None:
        """Make M the fusion's neutral value for every input."""
        ...

    def describe(self) -> str:
        """A short description for tables, e.g. "1×Linear→197"."""
        ...


def _linear_stack(
    in_features: int,
    out_features: int,
    depth: int,
    hidden: int | None,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> nn.ModuleList:
    """`depth` Linear layers from `in_features` to `out_features` (hidden width `hidden`,
    default `in_features`)."""
    widths = [in_features] + [hidden or in_features] * (depth - 1) + [out_features]
    return nn.ModuleList(nn.Linear(i, o, device=device, dtype=dtype) for i, o in pairwise(widths))


def _linears(stack: nn.ModuleList) -> list[nn.Linear]:
    return cast(list[nn.Linear], list(stack._modules.values()))


def _computing_layers(stack: nn.ModuleList) -> list[nn.Linear]:
    """The stack's layers for a forward, refusing layers another tuner wrapped (PEFT's
    `target_modules="all-linear"`): the last layer's weights are read directly, so the
    tuner's update would be silently skipped."""
    layers = _linears(stack)
    for layer in layers:
        if type(layer) is not nn.Linear and hasattr(layer, "base_layer"):
            raise UnsupportedModuleError(
                f"an LCAAM generator had its Linear layers wrapped by another tuner "
                f"({type(layer).__name__}, e.g. LoRA with target_modules='all-linear'), whose update "
                f"LCAAM's directly read weights would silently skip; leave the generators out "
                f"(LoraConfig(..., exclude_modules=r'.*\\.lcaam\\..*')) and train them as they are "
                f"(modules_to_save=['lcaam'])"
            )
    return layers


def _run_hidden(layers: list[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """`layers` up to (not including) the last, ReLU after each."""
    for layer in layers[:-1]:
        x = F.relu(layer(x))
    return x


def _run_last(stack: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """The whole stack: ReLU after each layer but the last (whose weights are read directly,
    as `MaskGenerator` reads its sliced ones)."""
    layers = _computing_layers(stack)
    last = layers[-1]
    return F.linear(_run_hidden(layers, x), last.weight, last.bias)


def _he_init_hidden(stack: nn.ModuleList) -> None:
    """He (Kaiming) init for the layers followed by ReLU, biases at 0.

    PyTorch's default Linear init shrinks the signal by about √3 per ReLU layer, so a
    deep generator (the paper uses depth 16 and 32) would start blind to its input.
    """
    with torch.no_grad():
        for layer in _linears(stack)[:-1]:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            layer.bias.zero_()


class MaskGenerator(nn.Module):
    """Maps tokens X (B, Nq, D) to a mask M (B, Nq, Nk) with Nk <= `max_kv_tokens`.

    `depth` Linear layers with ReLU between them; the last one outputs `max_kv_tokens`
    columns, sliced to the key length of each call. With `init="identity"` the last layer
    starts at weight 0 and a bias whose activation is the fusion's neutral value, so the
    patched attention computes exactly what the original computes.
    """

    kind = "mlp"
    reads_key_tokens = False

    def __init__(
        self,
        in_features: int,
        max_kv_tokens: int,
        *,
        depth: int = 1,
        hidden: int | None = None,
        activation: str = "none",
        fusion: str = "mul",
        init: str = "identity",
        site: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layers = _linear_stack(in_features, max_kv_tokens, depth, hidden, device=device, dtype=dtype)
        self.activation = activation
        self.fusion = fusion
        self.max_kv_tokens = max_kv_tokens
        self.site = site
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise as configured: He init for hidden layers, identity (or PyTorch's
        default) for the last. Call it after `to_empty()` when the model was patched on
        the `meta` device (`lcaam_patch.reset_generators(model)` does every site)."""
        if self.init == "default":
            _linears(self.layers)[-1].reset_parameters()
        _he_init_hidden(self.layers)
        if self.init == "identity":
            self.reset_to_identity()

    def reset_to_identity(self) -> None:
        """Set the last layer so that M equals the fusion's neutral value everywhere."""
        bias = neutral_bias(self.fusion, self.activation)
        if bias is None:
            raise InvalidOptionError(
                f"activation={self.activation!r} has no identity for fusion={self.fusion!r}; use init='default'"
            )
        last = _linears(self.layers)[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(bias)

    def forward(
        self, x: torch.Tensor, num_kv_tokens: int | None = None, kv_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return M for tokens `x` (..., Nq, D), sliced to `num_kv_tokens` columns (the key
        tokens themselves are not read)."""
        num_kv_tokens = self.max_kv_tokens if num_kv_tokens is None else num_kv_tokens
        if num_kv_tokens > self.max_kv_tokens:
            raise SequenceTooLongError(
                f"the attention at {self.site or 'this site'!r} got {num_kv_tokens} key tokens "
                f"but its LCAAM generator outputs at most {self.max_kv_tokens}; pass "
                f"max_kv_tokens={num_kv_tokens} (max_tokens for self-attention) or larger "
                f"to lcaam_patch.apply"
            )
        layers = _computing_layers(self.layers)
        h = _run_hidden(layers, x)
        last = layers[-1]
        if num_kv_tokens < self.max_kv_tokens:
            m = F.linear(h, last.weight[:num_kv_tokens], last.bias[:num_kv_tokens])
        else:
            m = last(h)
        if self.activation == "sigmoid":
            m = torch.sigmoid(m)
        elif self.activation == "softplus":
            m = F.softplus(m)
        return m

    def describe(self) -> str:
        """ "DEPTH×Linear→WIDTH"."""
        return f"{len(self.layers)}×Linear→{self.max_kv_tokens}"

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, fusion={self.fusion!r}"


class LowRankGenerator(nn.Module):
    """Maps query tokens (B, Nq, D) and key tokens (B, Nk, Dk) to the factors of M = A·Bᵀ.

    `query` and `key` are Linear-ReLU stacks of `depth` layers ending in `rank` outputs.
    With `init="identity"` the key stack's last layer starts at weight 0 and bias e₀
    (mul) or 0 (add), and the query stack's first output at weight 0 and bias 1, so M is
    the fusion's neutral value; the other query outputs keep PyTorch's random init, which
    gives every rank component a gradient from the first step.
    """

    kind = "lowrank"
    reads_key_tokens = True
    max_kv_tokens = None

    def __init__(
        self,
        in_features: int,
        kv_in_features: int,
        rank: int,
        *,
        depth: int = 1,
        hidden: int | None = None,
        fusion: str = "mul",
        init: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.query = _linear_stack(in_features, rank, depth, hidden, device=device, dtype=dtype)
        self.key = _linear_stack(kv_in_features, rank, depth, hidden, device=device, dtype=dtype)
        self.rank = rank
        self.fusion = fusion
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise as configured: He init for the hidden layers (as `MaskGenerator`),
        PyTorch's default for the last ones, then identity if asked. Call it after
        `to_empty()` for a model patched on `meta` (`lcaam_patch.reset_generators`)."""
        for stack in (self.query, self.key):
            _he_init_hidden(stack)
            _linears(stack)[-1].reset_parameters()
        if self.init == "identity":
            self.reset_to_identity()

    def reset_to_identity(self) -> None:
        """Make M the fusion's neutral value (1 for mul, 0 for add) for every input."""
        neutral = NEUTRAL[self.fusion]
        with torch.no_grad():
            key, query = _linears(self.key)[-1], _linears(self.query)[-1]
            key.weight.zero_()
            key.bias.zero_()
            if neutral != 0.0:
                key.bias[0] = 1.0
                query.weight[0].zero_()
                query.bias[0] = neutral

    def forward(
        self, x: torch.Tensor, num_kv_tokens: int | None = None, kv_tokens: torch.Tensor | None = None
    ) -> LowRankMask:
        """The factors of M for query tokens `x` and key tokens `kv_tokens` (default: `x`,
        self-attention); `num_kv_tokens` needs no bound here."""
        return LowRankMask(self.query_factor(x), self.key_factor(x if kv_tokens is None else kv_tokens))

    def query_factor(self, x: torch.Tensor) -> torch.Tensor:
        """A = F_A(x) (B, Nq, R) of query tokens `x` (B, Nq, D)."""
        return _run_last(self.query, x)

    def key_factor(self, kv_tokens: torch.Tensor) -> torch.Tensor:
        """B = F_B(kv_tokens) (B, Nk, R) of key tokens (B, Nk, Dk), one row per token: the rows
        of tokens seen before may be kept while `key_weights` are unchanged."""
        return _run_last(self.key, kv_tokens)

    def key_weights(self) -> tuple[torch.Tensor, ...]:
        """The parameters `key_factor` reads: a kept key factor is stale once one of them is
        replaced or changed in place (its `_version` moves)."""
        return tuple(p for layer in _linears(self.key) for p in (layer.weight, layer.bias) if p is not None)

    def describe(self) -> str:
        """ "lowrank r=R, 2×DEPTH×Linear"."""
        return f"lowrank r={self.rank}, 2×{len(self.query)}×Linear"

    def extra_repr(self) -> str:
        return f"rank={self.rank}, fusion={self.fusion!r}"
