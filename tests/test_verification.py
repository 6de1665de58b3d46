"""Claimed means verified: sites whose claim is inferred check themselves at their first call."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import lcaam_patch
from lcaam_patch import UnsupportedModuleError

transformers = pytest.importorskip("transformers")
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

WIDTH, HEADS = 16, 2


def plain_eager(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention as transformers writes it."""
    scores = query @ key.transpose(-2, -1) * (scaling or query.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(dim=-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def tempered_eager(module: nn.Module, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """An eager attention LCAAM does not know: it halves the scores."""
    return plain_eager(module, query / 2, key, *args, **kwargs)


class InterfaceAttention(nn.Module):
    """A self-attention written the way transformers writes them."""

    def __init__(self, config: Any, query_width: int = WIDTH) -> None:
        super().__init__()
        self.config = config
        self.is_causal = False
        self.q_proj = nn.Linear(query_width, WIDTH)
        self.k_proj = nn.Linear(query_width, WIDTH)
        self.v_proj = nn.Linear(query_width, WIDTH)
        self.o_proj = nn.Linear(WIDTH, query_width)

    def heads(self, hidden_states: torch.Tensor, chunks: int = 1) -> tuple[torch.Tensor, ...]:
        """q, k, v (B·chunks, H, N/chunks, D)."""
        b, n, _ = hidden_states.shape
        return tuple(
            p(hidden_states).view(b * chunks, n // chunks, HEADS, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        q, k, v = self.heads(hidden_states)
        attention_interface: Callable[..., Any] = plain_eager
        if self.config._attn_implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = attention_interface(self, q, k, v, attention_mask, scaling=None, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:2], -1)), weights


class TemperedAttention(InterfaceAttention):
    """Dispatches through the interface, but its eager attention is not plain attention."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        q, k, v = self.heads(hidden_states)
        attention_interface: Callable[..., Any] = tempered_eager
        if self.config._attn_implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = attention_interface(self, q, k, v, attention_mask, scaling=None, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:2], -1)), weights


class BypassingAttention(InterfaceAttention):
    """Names the attention interface in its source but never calls it."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if self.training and not self.training:
            attention_interface: Callable[..., Any] = plain_eager
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
            attention_interface(self, *self.heads(hidden_states), attention_mask)
        return self.o_proj(self.v_proj(hidden_states)), None


class Model(nn.Module):
    """One attention layer and its input projection."""

    def __init__(self, attention: type[InterfaceAttention], implementation: str = "eager", query_width: int = WIDTH):
        super().__init__()
        config = transformers.PretrainedConfig(hidden_size=WIDTH, max_position_embeddings=12)
        config._attn_implementation = implementation
        self.attn = attention(config, query_width)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out: torch.Tensor = self.attn(x, attention_mask)[0]
        return out


def _x(width: int = WIDTH) -> torch.Tensor:
    return torch.randn(2, 6, width, generator=torch.Generator().manual_seed(0))


def test_a_plain_class_passes_and_is_checked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Model(InterfaceAttention)
    reference = copy.deepcopy(model)
    lcaam_patch.apply(model)
    site = lcaam_patch.patched_sites(model)[0][2]
    assert not site.verified
    x = _x()
    expected = reference(x)
    calls = []
    original = plain_eager
    monkeypatch.setitem(globals(), "plain_eager", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.testing.assert_close(model(x), expected)
    assert site.verified and len(calls) == 1
    model(x)
    assert len(calls) == 1


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_class_that_computes_something_else_is_refused_at_its_first_call(implementation: str) -> None:
    model = Model(TemperedAttention, implementation)
    lcaam_patch.apply(model)
    if implementation == "sdpa":  # its sdpa path is plain attention: nothing to refuse
        model(_x())
        return
    with pytest.raises(UnsupportedModuleError, match=r"TemperedAttention at 'attn'.*other than the upstream") as error:
        model(_x())
    assert "exclude=['attn']" in str(error.value) and "verify=False" in str(error.value)


def test_a_class_that_never_calls_the_interface_is_refused() -> None:
    model = Model(BypassingAttention)
    lcaam_patch.apply(model)
    with pytest.raises(UnsupportedModuleError, match=r"BypassingAttention at 'attn'.*ran without calling it"):
        model(_x())


def test_verify_false_skips_the_check() -> None:
    for attention in (TemperedAttention, BypassingAttention):
        model = Model(attention)
        lcaam_patch.apply(model, verify=False)
        assert model(_x()).isfinite().all()
        assert not lcaam_patch.patched_sites(model)[0][2].verified


def test_the_generator_reads_the_width_of_the_query_projection() -> None:
    """MobileBERT-like: the attention reads a bottleneck narrower than config.hidden_size."""
    model = Model(InterfaceAttention, query_width=8)
    reference = copy.deepcopy(model)
    lcaam_patch.apply(model)
    generator = model.attn.lcaam
    assert next(generator.parameters()).shape[-1] == 8
    x = _x(8)
    torch.testing.assert_close(model(x), reference(x))


def test_finite_mask_dead_rows_are_averaged_as_upstream_does() -> None:
    """A query whose keys are all masked with finfo.min gets upstream's uniform average at
    identity (not 0), and a perturbed M does not change it."""
    model = Model(InterfaceAttention)
    reference = copy.deepcopy(model)
    lcaam_patch.apply(model)
    mask = torch.zeros(2, 1, 6, 6)
    mask[1, :, :, 4:] = torch.finfo(torch.float32).min
    mask[1, :, 4:, :] = torch.finfo(torch.float32).min  # padded queries: dead rows
    x = _x()
    expected = reference(x, mask)
    torch.testing.assert_close(model(x, mask), expected)
    with torch.no_grad():
        for parameter in model.attn.lcaam.parameters():
            parameter.add_(torch.randn_like(parameter))
    perturbed = model(x, mask)
    torch.testing.assert_close(perturbed[1, 4:], expected[1, 4:])
    assert not torch.allclose(perturbed[0], expected[0])


def test_a_query_length_other_than_the_input_is_refused_with_the_reason() -> None:
    class Chunked(InterfaceAttention):
        def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs: Any) -> Any:
            q, k, v = self.heads(hidden_states, chunks=2)
            attention_interface: Callable[..., Any] = plain_eager
            if self.config._attn_implementation != "eager":
                attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
            out, _ = attention_interface(self, q, k, v, None, **kwargs)
            return self.o_proj(out.reshape(*hidden_states.shape[:2], -1)), None

    model = Model(Chunked)
    lcaam_patch.apply(model)
    with pytest.raises(UnsupportedModuleError, match=r"not the queries' tokens"):
        model(_x())


def test_a_class_that_passes_sinks_is_refused_at_apply() -> None:
    """Sinks computed per token in the forward (Inkling 2) are seen in the source, at apply."""

    class Sinking(InterfaceAttention):
        def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs: Any) -> Any:
            q, k, v = self.heads(hidden_states)
            sinks = q.mean(dim=-1, keepdim=True)
            attention_interface: Callable[..., Any] = plain_eager
            if self.config._attn_implementation != "eager":
                attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
            out, _ = attention_interface(self, q, k, v, attention_mask, sinks=sinks, **kwargs)
            return self.o_proj(out.reshape(*hidden_states.shape[:2], -1)), None

    model = Model(Sinking)
    with pytest.raises(UnsupportedModuleError, match=r"Sinking at 'attn' uses attention sinks"):
        lcaam_patch.apply(model)
    assert not lcaam_patch.is_patched(model)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_class_that_branches_on_the_implementation_name_is_refused_at_apply(implementation: str) -> None:
    """DeepSeek-V3.2-style: a top-k index applied as a mask only under eager/sdpa, passed on
    to the attention function otherwise; LCAAM's switch would take the other branch."""

    class Indexed(InterfaceAttention):
        def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs: Any) -> Any:
            q, k, v = self.heads(hidden_states)
            sparse_indices = None
            if self.config._attn_implementation in ("eager", "sdpa"):
                attention_mask = torch.zeros(1, 1, q.shape[-2], k.shape[-2]).tril().log()
            else:
                sparse_indices = torch.arange(q.shape[-2])
            attention_interface: Callable[..., Any] = plain_eager
            if self.config._attn_implementation != "eager":
                attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
            out, _ = attention_interface(self, q, k, v, attention_mask, sparse_indices=sparse_indices, **kwargs)
            return self.o_proj(out.reshape(*hidden_states.shape[:2], -1)), None

    model = Model(Indexed, implementation)
    with pytest.raises(UnsupportedModuleError, match=r"Indexed at 'attn' builds what it hands its attention"):
        lcaam_patch.apply(model)
    assert not lcaam_patch.is_patched(model)
