"""Property tests of the mask guarantee for every backend that runs on the CPU.

For random shapes (lengths that are not multiples of any block size), fusions, dtypes,
masks M of any sign and magnitude, bool and float upstream masks of every broadcast shape,
and causality, each backend must: give hard-masked keys no influence (perturbing their keys
and values changes nothing, and they get no gradient), produce no NaN in outputs or
gradients, and agree with the eager reference.

The number of examples per property is small by default, to keep CI fast; set
`LCAAM_HYPOTHESIS_EXAMPLES` (e.g. 500) for a longer hunt.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lcaam_patch import AttentionCall, LowRankMask
from lcaam_patch.backends import masking, run

EXAMPLES = int(os.environ.get("LCAAM_HYPOTHESIS_EXAMPLES", "30"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("LCAAM_HYPOTHESIS_EXAMPLES") is None,
)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK_SHAPES = ("key-padding", "full", "per-query", "2d", "batch-query")


@dataclasses.dataclass
class Case:
    """One random attention call and what it hides."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    m: torch.Tensor
    factors: tuple[torch.Tensor, torch.Tensor]
    fusion: str
    attn_mask: torch.Tensor | None
    is_causal: bool
    magnitude: float

    def call(self, lowrank: bool = False, **changes: object) -> AttentionCall:
        mask = LowRankMask(*self.factors) if lowrank else self.m
        base = AttentionCall(
            self.q,
            self.k,
            self.v,
            mask,
            fusion=self.fusion,
            scale=self.q.shape[-1] ** -0.5,
            attn_mask=self.attn_mask,
            is_causal=self.is_causal,
        )
        return dataclasses.replace(base, **changes)

    def hidden_keys(self) -> torch.Tensor:
        """bool (B, Nk): keys hard-masked for every query and head of their sample."""
        upstream = masking.upstream_mask(self.call())
        keep = upstream.full_keep()
        B, Nk = self.q.shape[0], self.k.shape[-2]
        if keep is None:
            return torch.zeros(B, Nk, dtype=torch.bool)
        keep = keep.expand(B, -1, -1, Nk)
        return ~keep.any(dim=-2).any(dim=-2)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    B = draw(st.integers(1, 3))
    H = draw(st.integers(1, 3))
    Nq = draw(st.integers(1, 19))
    Nk = draw(st.integers(1, 21))
    D = draw(st.sampled_from([4, 8, 12]))
    dtype = draw(st.sampled_from(DTYPES))
    fusion = draw(st.sampled_from(["mul", "add"]))
    magnitude = 10.0 ** draw(st.integers(-2, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    q, k, v = randn(B, H, Nq, D), randn(B, H, Nk, D), randn(B, H, Nk, D)
    m = randn(B, Nq, Nk) * magnitude + (1.0 if fusion == "mul" else 0.0)
    rank = draw(st.integers(1, 3))
    factors = (randn(B, Nq, rank) * magnitude**0.5, randn(B, Nk, rank) * magnitude**0.5)
    kind = draw(st.sampled_from(["none", "bool", "float-inf", "float-soft"]))
    attn_mask = None
    if kind != "none":
        shape = {
            "key-padding": (B, 1, 1, Nk),
            "full": (B, H, Nq, Nk),
            "per-query": (1, 1, Nq, Nk),
            "2d": (Nq, Nk),
            "batch-query": (B, 1, Nq, Nk),
        }[draw(st.sampled_from(MASK_SHAPES))]
        keep = torch.rand(*shape, generator=generator) < draw(st.sampled_from([0.3, 0.7, 1.0]))
        if draw(st.booleans()):
            keep[..., -1, :] = False  # a query (or every query) that sees nothing
        if kind == "bool":
            attn_mask = keep
        else:
            soft = torch.randn(*shape, generator=generator) if kind == "float-soft" else torch.zeros(shape)
            attn_mask = soft.masked_fill(~keep, float("-inf"))
    is_causal = draw(st.booleans())
    # a finite M in the model's dtype: values beyond its range saturate, as a generator's would
    tensors = [masking.saturating_cast(t, dtype).requires_grad_() for t in (q, k, v, m)]
    factors = tuple(masking.saturating_cast(f, dtype).requires_grad_() for f in factors)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(dtype)
    return Case(*tensors, factors=factors, fusion=fusion, attn_mask=attn_mask, is_causal=is_causal, magnitude=magnitude)  # type: ignore[arg-type]


def _outputs_and_grads(call: AttentionCall, backend: str, inputs: list[torch.Tensor]):
    result = run(call, backend)
    assert result.backend == backend
    weights = torch.linspace(-1, 1, result.output.numel()).reshape(result.output.shape).to(result.output.dtype)
    grads = torch.autograd.grad((result.output * weights).sum(), inputs, allow_unused=True)
    return result.output, grads


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1.0)).item()


def _check(case: Case, backend: str, lowrank: bool) -> None:
    call = case.call(lowrank)
    inputs = [case.q, case.k, case.v, *(case.factors if lowrank else (case.m,))]
    out, grads = _outputs_and_grads(call, backend, inputs)
    assert out.dtype == case.q.dtype
    assert torch.isfinite(out).all(), "NaN or inf in the output"
    for grad in grads:
        assert grad is None or torch.isfinite(grad).all(), "NaN or inf in a gradient"
    hidden = case.hidden_keys()
    if hidden.any():
        # masked keys have no influence: perturb their keys and values wildly
        where = hidden[:, None, :, None]
        k2 = torch.where(where, case.k.detach() * 1e3 + 7.0, case.k.detach())
        v2 = torch.where(where, case.v.detach() * -1e3 + 3.0, case.v.detach())
        perturbed = run(dataclasses.replace(call, k=k2, v=v2), backend).output
        torch.testing.assert_close(perturbed, out.detach(), atol=0, rtol=0)
        dk, dv = grads[1], grads[2]
        assert dk is not None and dv is not None
        assert torch.equal(dk.masked_select(where.expand_as(dk)), torch.zeros(int(where.expand_as(dk).sum())))
        assert torch.equal(dv.masked_select(where.expand_as(dv)), torch.zeros(int(where.expand_as(dv).sum())))
    # agreement is checked where the dtype can hold the fused scores to a few digits: bf16
    # and fp16 round logits of size |S·M| ~ 30 by ~0.1, whatever the backend
    agreement_limit = 10.0 if case.q.dtype == torch.float32 else 1.0
    if backend != "eager" and case.magnitude <= agreement_limit:
        reference = [t.detach().double().requires_grad_() for t in inputs]
        ref_call = dataclasses.replace(
            call,
            q=reference[0],
            k=reference[1],
            v=reference[2],
            mask=LowRankMask(reference[3], reference[4]) if lowrank else reference[3],
            attn_mask=call.attn_mask.double() if call.upstream_mask_kind == "float" else call.attn_mask,
        )
        truth, truth_grads = _outputs_and_grads(ref_call, "eager", reference)
        same_dtype, same_grads = _outputs_and_grads(call, "eager", inputs)
        floor = 1e-4 if case.q.dtype == torch.float32 else 3e-2
        for got, want, eager in zip((out, *grads), (truth, *truth_grads), (same_dtype, *same_grads)):
            if got is None or want is None or eager is None:
                continue
            assert _relative_error(got, want) <= max(2 * _relative_error(eager, want), floor)


@PROPERTY
@given(case=cases())
def test_eager_keeps_hard_masks_and_stays_finite(case: Case) -> None:
    _check(case, "eager", lowrank=False)


@PROPERTY
@given(case=cases())
def test_sdpa_matches_eager_and_keeps_hard_masks(case: Case) -> None:
    case.fusion = "add"
    _check(case, "sdpa", lowrank=False)


@PROPERTY
@given(case=cases())
def test_lowrank_sdpa_matches_eager_and_keeps_hard_masks(case: Case) -> None:
    _check(case, "lowrank_sdpa", lowrank=True)


@PROPERTY
@given(case=cases(), bad=st.sampled_from([float("inf"), float("-inf"), float("nan")]))
def test_non_finite_mask_at_hidden_keys_changes_nothing(case: Case, bad: float) -> None:
    hidden = case.hidden_keys()
    if not hidden.any():
        return
    m_bad = case.m.detach().clone()
    m_bad.masked_fill_(hidden[:, None, :].expand_as(m_bad), bad)
    m_bad.requires_grad_()
    for backend in ("eager", "sdpa") if case.fusion == "add" else ("eager",):
        clean = run(case.call(), backend).output
        out = run(case.call(mask=m_bad), backend).output
        torch.testing.assert_close(out, clean, atol=0, rtol=0)
        grads = torch.autograd.grad(out.float().sum(), (case.q, case.k, case.v, m_bad))
        assert all(torch.isfinite(g).all() for g in grads)


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@needs_triton
@settings(PROPERTY, max_examples=max(EXAMPLES // 3, 5))
@given(case=cases())
def test_triton_under_the_interpreter_matches_eager_and_keeps_hard_masks(case: Case) -> None:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _check(case, "triton", lowrank=False)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
