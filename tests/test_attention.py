"""The fused attention against a textbook reference, for every backend."""

from __future__ import annotations

import pytest
import torch

import lcaam_patch
from lcaam_patch import AttentionCall, BackendUnavailableError, lcaam_attention
from lcaam_patch.backends import choose, run


def reference(q, k, v, mask, fusion, scale, keep=None):
    """softmax((QKᵀ·scale ◇ M) masked where keep is False) V, in float64."""
    q, k, v, mask = (t.double() for t in (q, k, v, mask))
    scores = q @ k.transpose(-2, -1) * scale
    scores = scores * mask[:, None] if fusion == "mul" else scores + mask[:, None]
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return weights @ v, weights


def inputs(dtype=torch.float32, B=2, H=3, Nq=5, Nk=7, D=8):
    q = torch.randn(B, H, Nq, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, Nk, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, Nk, D, dtype=dtype, requires_grad=True)
    mask = (torch.randn(B, Nq, Nk) * 2).to(dtype).requires_grad_()
    return q, k, v, mask


def padding_keep(B=2, Nq=5, Nk=7):
    keep = torch.ones(B, 1, Nq, Nk, dtype=torch.bool)
    keep[0, ..., 4:] = False
    return keep


CASES = [("eager", "mul"), ("eager", "add"), ("sdpa", "add")]
"""The dense-mask backends that run on the CPU, with the fusions they compute."""


def run_named(backend, q, k, v, mask, **options):
    """Run `backend` by name and check it is the one that computed the call."""
    result = run(AttentionCall(q, k, v, mask, **options), backend)
    assert result.backend == backend
    return result.output, result.weights


@pytest.mark.parametrize("backend,fusion", CASES)
@pytest.mark.parametrize("masking", ["none", "padding-bool", "padding-float", "causal"])
def test_backends_match_reference_with_gradients(backend, fusion, masking):
    q, k, v, mask = inputs(Nq=6, Nk=6 if masking == "causal" else 7)
    Nk = k.shape[-2]
    keep, attn_mask, is_causal = None, None, False
    if masking.startswith("padding"):
        keep = padding_keep(Nq=6, Nk=Nk)
        attn_mask = keep if masking == "padding-bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    elif masking == "causal":
        keep, is_causal = torch.ones(6, 6, dtype=torch.bool).tril(), True
    out, _ = run_named(backend, q, k, v, mask, fusion=fusion, scale=0.3, attn_mask=attn_mask, is_causal=is_causal)
    expected, _ = reference(q, k, v, mask, fusion, 0.3, keep)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, mask))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v, mask))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend,fusion", CASES)
@pytest.mark.parametrize("masking", ["none", "padding-float", "causal"])
def test_inference_matches_reference_and_leaves_the_inputs_as_they_were(backend, fusion, masking):
    # outside autograd the eager backend scales its scores in place: nothing the caller holds may change
    q, k, v, mask = (t.detach() for t in inputs(Nq=6, Nk=6))
    keep, attn_mask, is_causal = None, None, masking == "causal"
    if masking == "padding-float":
        keep = padding_keep(Nq=6, Nk=6)
        attn_mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    elif is_causal:
        keep = torch.ones(6, 6, dtype=torch.bool).tril()
    before = [t.clone() for t in (q, k, v, mask)]
    options = dict(fusion=fusion, scale=0.3, attn_mask=attn_mask, is_causal=is_causal)
    with torch.no_grad():
        first, _ = run_named(backend, q, k, v, mask, **options)
        second, _ = run_named(backend, q, k, v, mask, **options)
    expected, _ = reference(q, k, v, mask, fusion, 0.3, keep)
    torch.testing.assert_close(first.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(first, second)
    assert all(torch.equal(t, b) for t, b in zip((q, k, v, mask), before))


@pytest.mark.parametrize("backend,fusion", CASES)
def test_bf16_close_to_fp32_reference(backend, fusion):
    q, k, v, mask = inputs(torch.bfloat16)
    out, _ = run_named(backend, q, k, v, mask, fusion=fusion, scale=0.3, attn_mask=padding_keep())
    assert out.dtype == torch.bfloat16
    expected, _ = reference(q, k, v, mask, fusion, 0.3, padding_keep())
    torch.testing.assert_close(out.double(), expected, atol=5e-2, rtol=5e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, mask))


@pytest.mark.parametrize("fusion", ["mul", "add"])
def test_masked_keys_get_zero_weight_whatever_the_mask(fusion):
    q, k, v, _ = inputs()
    mask = torch.full((2, 5, 7), 1e4)
    keep = padding_keep()
    _, weights = lcaam_attention(q, k, v, mask, fusion=fusion, scale=1.0, attn_mask=keep, need_weights=True)
    assert torch.equal(weights[0, ..., 4:], torch.zeros_like(weights[0, ..., 4:]))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5))


@pytest.mark.parametrize("backend,fusion", CASES)
def test_row_with_every_key_masked_is_zero_not_nan(backend, fusion):
    q, k, v, mask = inputs()
    keep = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    keep[1, :, 2] = False
    out, _ = run_named(backend, q, k, v, mask, fusion=fusion, scale=1.0, attn_mask=keep)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1, :, 2], torch.zeros_like(out[1, :, 2]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, mask))


@pytest.mark.parametrize(
    "backend,options,reason",
    [
        ("sdpa", dict(fusion="mul"), "SDPA can add M"),
        ("sdpa", dict(fusion="add", need_weights=True), "does not return attention weights"),
        ("flex", dict(fusion="mul"), "FlexAttention runs on CUDA tensors only"),
        ("lowrank_sdpa", dict(fusion="mul"), "needs M as factors"),
    ],
)
def test_a_named_backend_that_cannot_compute_a_call_raises_instead_of_falling_back(backend, options, reason):
    q, k, v, mask = inputs()
    with pytest.raises(
        BackendUnavailableError,
        match=f"backend='{backend}' cannot compute this attention call: .*{reason}.*backend='auto'.*'eager'",
    ):
        lcaam_attention(q, k, v, mask, scale=0.5, backend=backend, **options)


@pytest.mark.parametrize("value", [None, "1", "0"])
def test_the_triton_context_follows_triton_interpret_as_set_now(monkeypatch, value):
    from lcaam_patch.backends.triton import TritonBackend

    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert TritonBackend().refusal_context() == value


def test_triton_is_refused_on_the_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, mask = inputs()
    with pytest.raises(BackendUnavailableError, match="backend='triton'.*TRITON_INTERPRET=1"):
        lcaam_attention(q, k, v, mask, fusion="mul", scale=0.5, backend="triton")


def test_auto_prefers_sdpa_for_add_and_eager_for_mul_or_weights():
    q, k, v, mask = inputs()
    assert choose("auto", AttentionCall(q, k, v, mask, fusion="add", scale=1.0)) == "sdpa"
    assert choose("auto", AttentionCall(q, k, v, mask, fusion="mul", scale=1.0)) == "eager"
    assert choose("auto", AttentionCall(q, k, v, mask, fusion="add", scale=1.0, need_weights=True)) == "eager"


def test_a_registered_backend_is_selectable_until_unregistered():
    from lcaam_patch.backends import EagerBackend

    q, k, v, mask = inputs()
    lcaam_patch.register_backend("reference_copy", EagerBackend(), priority=-1)
    try:
        out, _ = run_named("reference_copy", q, k, v, mask, fusion="mul", scale=0.5)
        torch.testing.assert_close(out, run_named("eager", q, k, v, mask, fusion="mul", scale=0.5)[0])
    finally:
        lcaam_patch.unregister_backend("reference_copy")
    with pytest.raises(lcaam_patch.InvalidOptionError, match="'reference_copy' is not registered"):
        lcaam_attention(q, k, v, mask, fusion="mul", scale=0.5, backend="reference_copy")


def test_register_backend_rejects_what_is_not_a_backend():
    for bad in (None, object(), lambda call: None):
        with pytest.raises(lcaam_patch.RegistrationError, match="not an AttentionBackend"):
            lcaam_patch.register_backend("broken", bad)
    assert "broken" not in lcaam_patch.backends.backend_names()


def test_dropout_drops_weights_in_training():
    q, k, v, mask = inputs()
    torch.manual_seed(1)
    _, weights = lcaam_attention(q, k, v, mask, fusion="add", scale=1.0, dropout_p=0.5, need_weights=True)
    assert (weights == 0).float().mean() > 0.3
