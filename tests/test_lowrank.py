"""generator="lowrank": M = A·Bᵀ, computed exactly through SDPA with widened heads."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_vit
from torch import nn

import lcaam_patch
from lcaam_patch import LowRankGenerator, LowRankMask, lcaam_attention


def factors(dtype, *, B=2, H=3, Nq=6, Nk=9, D=8, R=2):
    q = torch.randn(B, H, Nq, D).to(dtype).requires_grad_()
    k = torch.randn(B, H, Nk, D).to(dtype).requires_grad_()
    v = torch.randn(B, H, Nk, D).to(dtype).requires_grad_()
    a = torch.randn(B, Nq, R).to(dtype).requires_grad_()
    b = torch.randn(B, Nk, R).to(dtype).requires_grad_()
    return q, k, v, a, b


def upstream(masking, B, Nq, Nk):
    if masking == "none":
        return None, False
    if masking == "causal":
        return None, True
    keep = torch.ones(B, 1, Nq, Nk, dtype=torch.bool)
    keep[0, ..., Nk - 3 :] = False
    keep[1, :, 2] = False  # a row whose keys are all masked
    if masking == "padding-bool":
        return keep, False
    return torch.zeros(keep.shape).masked_fill(~keep, float("-inf")), False


def run(backend, tensors, fusion, attn_mask, is_causal, grad):
    q, k, v, a, b = tensors
    out, _ = lcaam_attention(
        q, k, v, LowRankMask(a, b), fusion=fusion, scale=0.4, attn_mask=attn_mask, is_causal=is_causal, backend=backend
    )
    return [out, *torch.autograd.grad(out, tensors, grad.to(out.dtype))]


@pytest.mark.parametrize("fusion", ["mul", "add"])
@pytest.mark.parametrize("masking", ["none", "padding-bool", "padding-float", "causal"])
@pytest.mark.parametrize("shape", ["self", "cross"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_widened_sdpa_matches_eager_on_the_dense_mask(fusion, masking, shape, dtype):
    Nq, Nk = (9, 9) if shape == "self" or masking == "causal" else (6, 9)
    tensors = factors(dtype, Nq=Nq, Nk=Nk, R=3)
    attn_mask, is_causal = upstream(masking, 2, Nq, Nk)
    grad = torch.randn(2, 3, Nq, 8, dtype=torch.float64)
    truth = run("eager", [t.detach().double().requires_grad_() for t in tensors], fusion, attn_mask, is_causal, grad)
    got = run("lowrank_sdpa", tensors, fusion, attn_mask, is_causal, grad)
    eager = run("eager", tensors, fusion, attn_mask, is_causal, grad)
    for name, g, e, t in zip(("out", "dq", "dk", "dv", "dA", "dB"), got, eager, truth):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        err = ((g.double() - t).norm() / t.norm().clamp_min(1e-12)).item()
        ref = ((e.double() - t).norm() / t.norm().clamp_min(1e-12)).item()
        assert err < (1e-5 if dtype == torch.float32 else max(2 * ref, 2e-2)), (name, err, ref)
    if masking.startswith("padding"):
        assert torch.equal(got[0][1, :, 2], torch.zeros_like(got[0][1, :, 2]))


@pytest.mark.parametrize("fusion", ["mul", "add"])
@pytest.mark.parametrize("rank", [1, 3])
def test_identity_init_reproduces_the_unpatched_vit(fusion, rank):
    model = tiny_vit().eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(images)
        lcaam_patch.apply(model, fusion=fusion, generator="lowrank", rank=rank)
        torch.testing.assert_close(model(images), expected, atol=1e-6, rtol=1e-6)
    assert [s.last_backend for _, _, s in lcaam_patch.patched_sites(model)] == ["lowrank_sdpa"] * 2


@pytest.mark.parametrize("fusion", ["mul", "add"])
def test_patched_vit_matches_eager_including_generator_gradients(fusion):
    options = dict(fusion=fusion, generator="lowrank", rank=2, depth=2, hidden=16, init="default")
    reference = lcaam_patch.apply(tiny_vit(), backend="eager", **options)
    model = lcaam_patch.apply(tiny_vit(), **options)
    model.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 16, 16)
    outputs = [m(images) for m in (reference, model)]
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for out in outputs:
        out.square().sum().backward()
    generator_params = 0
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)
        generator_params += "lcaam" in name
    assert generator_params == 2 * 2 * 4  # 2 blocks × (query, key) × 2 layers × (weight, bias)
    table = str(lcaam_patch.summary(model))
    assert "auto→lowrank_sdpa" in table and "lowrank r=2" in table
    assert "auto→eager" not in table


def test_cross_attention_reads_the_key_tokens_and_needs_no_token_bound():
    model = nn.Sequential(nn.MultiheadAttention(16, 2, kdim=12, vdim=10, batch_first=True))
    lcaam_patch.apply(model, fusion="mul", generator="lowrank", rank=2, init="default")
    mha = model[0]
    assert isinstance(mha.lcaam, LowRankGenerator) and mha.lcaam.key[0].in_features == 12
    for Nq, Nk in ((5, 7), (40, 3)):
        query, key, value = torch.randn(2, Nq, 16), torch.randn(2, Nk, 12), torch.randn(2, Nk, 10)
        padding = torch.zeros(2, Nk, dtype=torch.bool)
        padding[1, -1] = True
        with lcaam_patch.capture(model) as seen:
            out, _ = mha(query, key, value, key_padding_mask=padding, need_weights=False)
        assert out.shape == (2, Nq, 16)
        expected = mha.lcaam.query[0](query) @ mha.lcaam.key[0](key).transpose(1, 2)
        torch.testing.assert_close(seen.masks["0"][0], expected.detach())
        weights = mha(query, key, value, key_padding_mask=padding, need_weights=True)[1]
        assert torch.equal(weights[1, :, -1], torch.zeros_like(weights[1, :, -1]))


def test_reset_generators_restores_the_identity():
    model = tiny_vit().eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(images)
        lcaam_patch.apply(model, fusion="mul", generator="lowrank", rank=2, depth=2)
        for p in lcaam_patch.lcaam_state_dict(model).values():
            p.normal_()
        assert not torch.allclose(model(images), expected, atol=1e-3)
        lcaam_patch.reset_generators(model)
        torch.testing.assert_close(model(images), expected, atol=1e-6, rtol=1e-6)


def test_every_rank_component_gets_a_gradient_at_identity_init():
    model = lcaam_patch.apply(tiny_vit(), fusion="mul", generator="lowrank", rank=3)
    model(torch.randn(2, 3, 16, 16)).square().sum().backward()
    for _, module, _ in lcaam_patch.patched_sites(model):
        key_grad = module.lcaam.key[-1].weight.grad
        assert (key_grad.abs().sum(dim=1) > 0).all(), key_grad


def test_global_mode_and_state_dict_round_trip():
    options = dict(mode="global", fusion="add", generator="lowrank", rank=2, init="default")
    model = lcaam_patch.apply(tiny_vit(), **options)
    reference = lcaam_patch.apply(tiny_vit(), backend="eager", **options)
    lcaam_patch.load_lcaam_state_dict(reference, lcaam_patch.lcaam_state_dict(model))
    reference.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)
    owners = [
        s.path
        for _, m, s in lcaam_patch.patched_sites(model)
        if isinstance(getattr(m, "lcaam", None), LowRankGenerator)
    ]
    assert owners == ["blocks.0.attn"]
    assert "auto→lowrank_sdpa" in str(lcaam_patch.summary(model)).splitlines()[3]


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(rank=4), "rank=4 applies to generator='lowrank'"),
        (dict(generator="lowrank", rank=0), "rank=0 must be a positive integer"),
        (dict(generator="lowrank", activation="softplus"), "activation='softplus' would break"),
        (dict(generator="lowrank", backend="lowrank_sdpa", fusion="mul"), None),
        (dict(backend="lowrank_sdpa"), "backend='lowrank_sdpa' cannot compute fusion='mul' with generator='mlp'"),
    ],
)
def test_options_are_checked(options, message):
    if message is None:
        assert lcaam_patch.is_patched(lcaam_patch.apply(tiny_vit(), **options))
        return
    with pytest.raises(lcaam_patch.InvalidOptionError, match=message):
        lcaam_patch.apply(tiny_vit(), **options)
