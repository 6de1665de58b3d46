"""nn.MultiheadAttention patched: the same arguments and outputs as upstream."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lcaam_patch

E, H = 16, 4


def patched_pair(**kwargs: object) -> tuple[nn.MultiheadAttention, nn.MultiheadAttention]:
    """An upstream MHA and a patched copy with the same weights, both in eval mode."""
    upstream = nn.MultiheadAttention(E, H, **kwargs).eval()
    patched = nn.MultiheadAttention(E, H, **kwargs).eval()
    patched.load_state_dict(upstream.state_dict())
    lcaam_patch.apply(patched, max_tokens=6, max_kv_tokens=9)
    return upstream, patched


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    if a[1] is None:
        assert b[1] is None
    else:
        torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_self_and_cross_attention_match_upstream(batch_first, need_weights, average):
    upstream, patched = patched_pair(batch_first=batch_first)
    shape = (lambda n: (2, n, E)) if batch_first else (lambda n: (n, 2, E))
    q, kv = torch.randn(shape(6)), torch.randn(shape(9))
    for key in (q, kv):
        args = dict(need_weights=need_weights, average_attn_weights=average)
        assert_same(upstream(q, key, key, **args), patched(q, key, key, **args))


def test_kdim_vdim_cross_attention():
    upstream, patched = patched_pair(kdim=5, vdim=7, batch_first=True)
    q, k, v = torch.randn(2, 6, E), torch.randn(2, 9, 5), torch.randn(2, 9, 7)
    assert_same(upstream(q, k, v), patched(q, k, v))
    assert lcaam_patch.summary(patched).sites[0].kind == "cross"


@pytest.mark.parametrize("kind", ["bool", "float", "bool-3d"])
def test_attn_mask_and_key_padding_mask(kind):
    upstream, patched = patched_pair(batch_first=True)
    q, kv = torch.randn(2, 6, E), torch.randn(2, 9, E)
    blocked = torch.rand(6, 9) > 0.7
    blocked[:, 0] = False
    if kind == "bool":
        attn_mask = blocked
    elif kind == "float":
        attn_mask = torch.randn(6, 9)
    else:
        attn_mask = blocked.expand(2 * H, 6, 9).clone()
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    args = dict(attn_mask=attn_mask, key_padding_mask=padding)
    assert_same(upstream(q, kv, kv, **args), patched(q, kv, kv, **args))


def test_padded_keys_stay_masked_whatever_the_generator_says():
    _, patched = patched_pair(batch_first=True)
    with torch.no_grad():
        patched.lcaam.layers[0].bias.fill_(-50.0)
        patched.lcaam.layers[0].weight.normal_()
    q, kv = torch.randn(2, 6, E), torch.randn(2, 9, E)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[:, 7:] = True
    _, weights = patched(q, kv, kv, key_padding_mask=padding)
    assert torch.equal(weights[..., 7:], torch.zeros_like(weights[..., 7:]))
    assert torch.isfinite(weights).all()


def test_unbatched_inputs():
    upstream, patched = patched_pair()
    q, kv = torch.randn(6, E), torch.randn(9, E)
    assert_same(upstream(q, kv, kv), patched(q, kv, kv))


def test_causal_mask_with_hint():
    upstream, patched = patched_pair(batch_first=True)
    q = torch.randn(2, 6, E)
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    args = dict(attn_mask=mask, is_causal=True, need_weights=False)
    assert_same(upstream(q, q, q, **args), patched(q, q, q, **args))
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        patched(q, q, q, is_causal=True)


def test_dropout_applies_in_training_only():
    _, patched = patched_pair(batch_first=True, dropout=0.5)
    q = torch.randn(2, 6, E)
    eval_out = patched(q, q, q)[0]
    assert torch.equal(eval_out, patched(q, q, q)[0])
    patched.train()
    _, weights = patched(q, q, q, average_attn_weights=False)
    assert (weights == 0).float().mean() > 0.2


def test_generator_reads_query_tokens_and_outputs_one_column_per_key():
    _, patched = patched_pair(batch_first=True)
    seen = []
    patched.lcaam.register_forward_hook(lambda m, args, out: seen.append((args[0].shape, out.shape)))
    q, kv = torch.randn(2, 6, E), torch.randn(2, 9, E)
    patched(q, kv, kv)
    assert seen == [(torch.Size([2, 6, E]), torch.Size([2, 6, 9]))]


def test_transformer_encoder_fast_paths_do_not_bypass_the_patch():
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    reference = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    reference.load_state_dict(encoder.state_dict())
    lcaam_patch.apply(encoder, max_tokens=6, init="default")
    x = torch.randn(2, 6, E)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    calls = []
    for _, module, _ in lcaam_patch.patched_sites(encoder):
        module.lcaam.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        patched_out = encoder(x, src_key_padding_mask=padding)
        unpatched_out = reference(x, src_key_padding_mask=padding)
    assert len(calls) == 2
    assert not torch.allclose(patched_out[0], unpatched_out[0])
    lcaam_patch.remove(encoder)
    assert encoder.use_nested_tensor
    assert all(not m._forward_pre_hooks for m in encoder.modules())


def test_transformer_encoder_identity_in_training():
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0)
    upstream = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    patched = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    patched.load_state_dict(upstream.state_dict())
    lcaam_patch.apply(patched, max_tokens=6)
    x = torch.randn(6, 2, E)
    torch.testing.assert_close(patched(x), upstream(x), atol=1e-5, rtol=1e-5)
