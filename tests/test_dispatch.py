"""The per-call path of the dispatch: decisions cached per CallSpec, one upstream mask per call,
a factorized M made dense at most once, third-party backends asked per call as before."""

from __future__ import annotations

import math

import pytest
import torch

import lcaam_patch
from lcaam_patch.backends import (
    AttentionCall,
    CallSpec,
    EagerBackend,
    LowRankMask,
    choose,
    dispatch,
    lcaam_attention,
    masking,
    refusal_for,
)


def inputs(B=2, H=2, Nq=5, Nk=7, D=8):
    q = torch.randn(B, H, Nq, D, requires_grad=True)
    k = torch.randn(B, H, Nk, D, requires_grad=True)
    v = torch.randn(B, H, Nk, D, requires_grad=True)
    a = torch.randn(B, Nq, 1, requires_grad=True)
    b = torch.randn(B, Nk, 1, requires_grad=True)
    return q, k, v, a, b


def padding(B=2, Nq=5, Nk=7):
    keep = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
    keep[0, ..., -2:] = False
    return keep


class CountingRefusal:
    """Refuses every call, decided by spec; counts how often it is asked."""

    def __init__(self) -> None:
        self.asked = 0

    def refusal_for(self, spec: CallSpec) -> str | None:
        self.asked += 1
        return "it computes nothing"

    def refusal(self, call: AttentionCall) -> str | None:
        return self.refusal_for(call.spec)

    def __call__(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise AssertionError("never chosen")


class PerCallEager(EagerBackend):
    """A third-party backend with only `refusal(call)`, which reads the call's tensors."""

    refusal_for = None  # type: ignore[assignment]

    def __init__(self) -> None:
        self.seen: list[AttentionCall] = []

    def refusal(self, call: AttentionCall) -> str | None:
        self.seen.append(call)
        return "M has a negative entry" if bool((call.dense_mask() < 0).any()) else None


@pytest.fixture
def registered():
    names = []

    def register(name, backend, priority):
        lcaam_patch.register_backend(name, backend, priority)
        names.append(name)
        return backend

    yield register
    for name in names:
        lcaam_patch.unregister_backend(name)


def test_a_spec_decision_is_asked_once_for_many_calls(registered):
    counting = registered("counting", CountingRefusal(), 100)
    q, k, v, a, b = inputs()
    mask = a @ b.transpose(-2, -1)
    for _ in range(10):
        lcaam_attention(q, k, v, mask, fusion="mul", scale=1.0)
    assert counting.asked == 1
    lcaam_attention(q, k, v, mask, fusion="add", scale=1.0)  # another spec, asked again
    assert counting.asked == 2


def test_registering_or_unregistering_a_backend_forgets_the_cached_decisions(registered):
    q, k, v, a, b = inputs()
    call = AttentionCall(q, k, v, a @ b.transpose(-2, -1), fusion="mul", scale=1.0)
    assert choose("auto", call) == "eager"
    registered("first", EagerBackend(), 100)
    assert choose("auto", call) == "first"
    lcaam_patch.unregister_backend("first")
    assert choose("auto", call) == "eager"


def test_a_backend_with_only_refusal_of_a_call_is_asked_at_every_call_with_a_dense_mask(registered):
    legacy = registered("legacy", PerCallEager(), 100)
    q, k, v, a, b = inputs()
    factors = LowRankMask(a.abs(), b.abs())
    for _ in range(3):
        out, _ = lcaam_attention(q, k, v, factors, fusion="mul", scale=0.5, backend="auto")
        expected, _ = lcaam_attention(q, k, v, factors, fusion="mul", scale=0.5, backend="eager")
        torch.testing.assert_close(out, expected)
    assert len(legacy.seen) == 3
    assert all(isinstance(call.mask, torch.Tensor) for call in legacy.seen)
    negative = LowRankMask(a.abs(), -b.abs())  # it refuses this one: auto takes the next
    call = AttentionCall(q, k, v, negative, fusion="mul", scale=0.5)
    assert choose("auto", call) == "lowrank_sdpa"
    with pytest.raises(lcaam_patch.BackendUnavailableError, match="backend='legacy'.*negative entry"):
        lcaam_attention(q, k, v, negative, fusion="mul", scale=0.5, backend="legacy")
    assert refusal_for("legacy", call.spec) is None  # it can only be asked with a call


def test_apply_accepts_a_backend_that_decides_per_call(registered):
    registered("legacy", PerCallEager(), -1)
    model = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    lcaam_patch.apply(model, max_tokens=6, backend="legacy")
    x = torch.randn(2, 6, 16)
    out, _ = model(x, x, x, need_weights=False)
    assert out.isfinite().all()
    assert lcaam_patch.patched_sites(model)[0][2].last_backend == "legacy"


@pytest.mark.parametrize(
    "backend, need_weights, dense_builds",
    [("auto", False, 0), ("lowrank_sdpa", False, 0), ("auto", True, 1), ("eager", False, 1), ("sdpa", False, 1)],
)
def test_a_factorized_mask_is_made_dense_at_most_once_per_call(monkeypatch, backend, need_weights, dense_builds):
    builds = []
    dense = LowRankMask.dense
    monkeypatch.setattr(LowRankMask, "dense", lambda self: builds.append(1) or dense(self))
    q, k, v, a, b = inputs()
    fusion = "add" if backend == "sdpa" else "mul"
    lcaam_attention(
        q,
        k,
        v,
        LowRankMask(a, b),
        fusion=fusion,
        scale=0.5,
        attn_mask=padding(),
        need_weights=need_weights,
        backend=backend,
    )
    assert len(builds) == dense_builds


def test_a_refusing_per_call_backend_and_the_chosen_one_share_one_dense_mask(monkeypatch, registered):
    registered("legacy", PerCallEager(), 100)
    builds = []
    dense = LowRankMask.dense
    monkeypatch.setattr(LowRankMask, "dense", lambda self: builds.append(1) or dense(self))
    q, k, v, a, b = inputs()
    lcaam_attention(q, k, v, LowRankMask(a.abs(), -b.abs()), fusion="mul", scale=0.5, need_weights=True)
    assert len(builds) == 1


@pytest.mark.parametrize("backend, fusion", [("eager", "mul"), ("sdpa", "add"), ("lowrank_sdpa", "mul")])
@pytest.mark.parametrize("attn_mask", ["bool", "float"])
def test_the_upstream_mask_is_split_once_per_call(monkeypatch, backend, fusion, attn_mask):
    splits = []
    split = masking._split
    monkeypatch.setattr(masking, "_split", lambda call: splits.append(1) or split(call))
    q, k, v, a, b = inputs()
    upstream = padding()
    if attn_mask == "float":
        upstream = torch.zeros(upstream.shape).masked_fill(~upstream, float("-inf")) + torch.randn(2, 1, 5, 7)
    mask = LowRankMask(a, b) if backend == "lowrank_sdpa" else a @ b.transpose(-2, -1)
    out, _ = lcaam_attention(q, k, v, mask, fusion=fusion, scale=0.5, attn_mask=upstream, backend=backend)
    assert len(splits) == 1
    out.sum().backward()


def test_a_refusal_context_change_is_decided_afresh(registered):
    class Switch(EagerBackend):
        """Serves calls only while `on` is set: a decision that depends on the process."""

        on = False

        def refusal_context(self) -> bool:
            return self.on

        def refusal_for(self, spec: CallSpec) -> str | None:
            return None if self.on else "switched off"

    switch = registered("switch", Switch(), 100)
    q, k, v, a, b = inputs()
    call = AttentionCall(q, k, v, a @ b.transpose(-2, -1), fusion="mul", scale=1.0)
    assert choose("auto", call) == "eager"
    switch.on = True
    assert choose("auto", call) == "switch"
    switch.on = False
    assert choose("auto", call) == "eager"


def test_backends_are_asked_with_a_spec_and_no_tensor():
    spec = CallSpec("cpu", torch.float32, "mul", False, "none", False, False, 0.0, 8, 8, False)
    assert refusal_for("sdpa", spec) is not None and "fusion='mul'" in refusal_for("sdpa", spec)
    assert refusal_for("eager", spec) is None
    assert choose("auto", spec) == "eager"
    assert choose("auto", spec._replace(is_lowrank=True)) == "lowrank_sdpa"
    assert choose("auto", spec._replace(fusion="add")) == "sdpa"


def test_the_cache_keys_hold_specs_only():
    q, k, v, a, b = inputs()
    lcaam_attention(q, k, v, a @ b.transpose(-2, -1), fusion="mul", scale=1.0)
    keys = [*dispatch._DECISIONS, *dispatch._CHOICES]
    assert keys and all(isinstance(spec, CallSpec) for _, spec, _ in keys)


@pytest.mark.parametrize("magnitude", [1e10, 1e12, 1e15, 1e19])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("upstream", ["none", "bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lowrank_backward_stays_finite_where_eager_does_at_huge_masks(magnitude, is_causal, upstream, dtype):
    """Factors giving |M| ≈ 1e10 … 1e19 at attended keys (mul, B=H=1, Nq=2, Nk=12): the
    softmax saturates, eager's gradients are 0, and a fused kernel's backward would multiply
    its rounding by |M| (1e3 … 1e13 in float32 on torch 2.14)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 8, dtype=dtype) for n in (2, 12, 12))
    a = (torch.full((1, 2, 1), magnitude**0.5) * torch.tensor([1.0, -1.0]).view(1, 2, 1)).to(dtype)
    b = (torch.full((1, 12, 1), magnitude**0.5) * torch.linspace(0.5, 1.0, 12).view(1, 12, 1)).to(dtype)
    keep = torch.ones(1, 1, 2, 12, dtype=torch.bool)
    keep[..., 3] = False
    keep[..., 0, 7:] = False
    attn_mask = {
        "none": None,
        "bool": keep,
        "float": torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, -math.inf),
    }
    grads = {}
    for backend in ("eager", "lowrank_sdpa"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, a, b)]
        out, _ = lcaam_attention(
            *leaves[:3],
            LowRankMask(*leaves[3:]),
            fusion="mul",
            scale=8**-0.5,
            is_causal=is_causal,
            attn_mask=attn_mask[upstream],
            backend=backend,
        )
        grads[backend] = torch.autograd.grad(out.square().sum(), leaves)
    for eager, lowrank in zip(grads["eager"], grads["lowrank_sdpa"]):
        assert eager.isfinite().all()
        assert lowrank.isfinite().all()
        torch.testing.assert_close(lowrank, eager, rtol=1e-3, atol=1e-3 * max(1.0, eager.abs().max().item()))


def decode_upstream(kind: str, B: int, Nk: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """An upstream mask of one query: none, bool or -inf padding, one sample with every key hidden."""
    if kind == "none":
        return None
    keep = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
    keep[0, ..., -3:] = False
    keep[-1] = False  # a dead row
    return keep if kind == "bool" else torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize("upstream", ["none", "bool", "float"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sdpa_multiplies_one_query_by_scaling_the_keys_exactly_with_gradients(upstream, kv_heads):
    """Decoding (Nq = 1): (q·kⱼ)·Mⱼ = q·(Mⱼkⱼ), through SDPA, also with grouped key heads."""
    torch.manual_seed(0)
    B, Nk = 3, 9
    q = torch.randn(B, 4, 1, 8)
    k, v = torch.randn(B, kv_heads, Nk, 8), torch.randn(B, kv_heads, Nk, 8)
    m = torch.rand(B, 1, Nk) * 3
    m[0, 0, -1] = float("inf")  # at a hidden key: no effect
    attn_mask = decode_upstream(upstream, B, Nk)
    if attn_mask is None:
        m[0, 0, -1] = 2.0
    call = AttentionCall(q, k, v, m, fusion="mul", scale=0.4, attn_mask=attn_mask)
    assert call.spec.single_query and call.spec.grouped_heads == (kv_heads != 4)
    assert choose("auto", call) == "sdpa"
    results = {}
    for backend in ("sdpa", "eager"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, m)]
        out, _ = lcaam_attention(*leaves, fusion="mul", scale=0.4, attn_mask=attn_mask, backend=backend)
        results[backend] = (out, *torch.autograd.grad(out.square().sum(), leaves))
    for got, expected in zip(results["sdpa"], results["eager"]):
        assert got.isfinite().all()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if upstream != "none":
        assert (results["sdpa"][0][-1] == 0).all()  # the dead row


def test_sdpa_refuses_mul_with_several_queries_or_in_float16():
    q, k, v, a, b = inputs()
    with pytest.raises(lcaam_patch.BackendUnavailableError, match="not multiply them.*one query"):
        lcaam_attention(q, k, v, a @ b.transpose(-2, -1), fusion="mul", scale=0.5, backend="sdpa")
    spec = AttentionCall(q[:, :, :1], k, v, (a @ b.transpose(-2, -1))[:, :1], fusion="mul", scale=0.5).spec
    assert refusal_for("sdpa", spec) is None
    assert "float16" in str(refusal_for("sdpa", spec._replace(dtype=torch.float16)))
    assert choose("auto", spec._replace(dtype=torch.float16)) == "eager"


@pytest.mark.parametrize("backend", ["eager", "lowrank_sdpa", "sdpa"])
def test_grouped_key_heads_equal_repeated_ones_and_are_repeated_once_for_backends_that_need_it(monkeypatch, backend):
    repeats = []
    repeat = AttentionCall.with_repeated_heads
    monkeypatch.setattr(AttentionCall, "with_repeated_heads", lambda self: repeats.append(1) or repeat(self))
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    a, b = torch.rand(2, 5, 1), torch.rand(2, 7, 1)
    fusion = "add" if backend == "sdpa" else "mul"
    mask = LowRankMask(a, b) if backend == "lowrank_sdpa" else a @ b.transpose(-2, -1)
    kwargs = dict(fusion=fusion, scale=0.3, attn_mask=padding(Nk=7), backend=backend)
    out, _ = lcaam_attention(q, k, v, mask, **kwargs)
    assert len(repeats) == (1 if backend == "eager" else 0)
    expected, _ = lcaam_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_finfo_min_mask_is_read_once_and_dropped_on_the_cpu_when_it_hides_nothing():
    zeros = torch.zeros(2, 1, 1, 6)
    assert masking.finite_hard_mask(zeros) == (None, None)
    soft = torch.randn(2, 1, 1, 6)
    hardened, dead = masking.finite_hard_mask(soft)
    assert hardened is soft and dead is None
    padded = soft.clone()
    padded[0, ..., -2:] = torch.finfo(torch.float32).min
    padded[1] = torch.finfo(torch.float32).min
    hardened, dead = masking.finite_hard_mask(padded)
    assert hardened is not None and dead is not None
    assert torch.isneginf(hardened).sum() == 2 + 6 and dead.flatten().tolist() == [False, True]
    needs_grad = zeros.clone().requires_grad_()
    assert masking.finite_hard_mask(needs_grad)[0] is not None  # its gradient is kept
