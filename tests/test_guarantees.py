"""Exact or refused: each case here once gave a wrong result without an error (issue 11).

Every test names the case; each either checks that the result is now exact, or that the
call is refused with an `LCAAMError` that says what to do instead.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_unchanged, snapshot, tiny_vit
from torch import nn

import lcaam_patch
from lcaam_patch import AttentionCall, LowRankMask
from lcaam_patch.backends import masking, run

# 1. Patching an already-wrapped model


def test_apply_refuses_a_model_inside_data_parallel():
    wrapped = nn.DataParallel(tiny_vit())
    before = snapshot(wrapped)
    with pytest.raises(lcaam_patch.WrappedModelError, match="nn.DataParallel.*apply.*on the bare model first"):
        lcaam_patch.apply(wrapped)
    assert_unchanged(wrapped, before)


def test_apply_refuses_a_compiled_model():
    compiled = torch.compile(tiny_vit())
    with pytest.raises(lcaam_patch.WrappedModelError, match="torch.compile.*then wrap it.*or compile it"):
        lcaam_patch.apply(compiled)


def test_apply_refuses_a_wrapper_nested_inside_the_model():
    model = nn.Sequential(nn.DataParallel(tiny_vit()))
    with pytest.raises(lcaam_patch.WrappedModelError, match="at '0'"):
        lcaam_patch.apply(model)


# 3. mode="global" on nn.Transformer: one stack per stack and attention kind


def _transformer() -> nn.Transformer:
    return nn.Transformer(
        d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, batch_first=True
    )


def test_global_mode_gives_decoder_self_and_cross_attention_separate_stacks():
    model = lcaam_patch.apply(_transformer(), mode="global", max_tokens=7, max_kv_tokens=9)
    stacks = {path: site.stack for path, _, site in lcaam_patch.patched_sites(model)}
    leaders = {stack.name: stack.leader for stack in stacks.values()}
    assert leaders == {
        "encoder.layers.*.self_attn": "encoder.layers.0.self_attn",
        "decoder.layers.*.self_attn": "decoder.layers.0.self_attn",
        "decoder.layers.*.multihead_attn": "decoder.layers.0.multihead_attn",
    }


@pytest.mark.parametrize("lengths", [(7, 7), (9, 7)])
def test_global_mode_cross_attention_reads_its_own_mask(lengths):
    src_len, tgt_len = lengths
    model = lcaam_patch.apply(_transformer().eval(), mode="global", init="default", max_tokens=9, max_kv_tokens=9)
    src, tgt = torch.randn(2, src_len, 16), torch.randn(2, tgt_len, 16)
    with lcaam_patch.capture(model) as seen, torch.no_grad():
        model(src, tgt)
    cross = model.decoder.layers[0].multihead_attn
    for layer in (0, 1):
        mask = seen.masks[f"decoder.layers.{layer}.multihead_attn"][0]
        assert mask.shape == (2, tgt_len, src_len)
        # the cross-attention stack's leader reads the decoder tokens entering that attention
        assert mask.shape[-1] == src_len
    assert torch.equal(
        seen.masks["decoder.layers.0.multihead_attn"][0], seen.masks["decoder.layers.1.multihead_attn"][0]
    )
    assert not torch.equal(
        seen.masks["decoder.layers.0.self_attn"][0][..., :tgt_len],
        seen.masks["decoder.layers.0.multihead_attn"][0][..., :tgt_len],
    )
    assert cross.lcaam.max_kv_tokens == 9


# 4. Masks: a masked key stays masked whatever M is


def _qkv(dtype=torch.float32, B=2, H=2, Nq=5, Nk=6, D=8):
    return [torch.randn(B, H, n, D).to(dtype).requires_grad_() for n in (Nq, Nk, Nk)]


def test_bert_style_finite_mask_is_hard_once_hardened():
    q, k, v = _qkv()
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[0, ..., 4:] = False
    bert = (1.0 - keep.float()) * -10000.0
    huge = torch.full((2, 5, 6), 1e6)
    soft = run(AttentionCall(q, k, v, huge, fusion="mul", scale=1.0, attn_mask=bert, need_weights=True), "eager")
    assert soft.weights is not None and soft.weights[0, ..., 4:].max() > 0.5  # soft: M can outweigh it
    hard_mask = masking.harden(bert, -10000.0)
    hard = run(AttentionCall(q, k, v, huge, fusion="mul", scale=1.0, attn_mask=hard_mask, need_weights=True), "eager")
    assert hard.weights is not None and torch.equal(
        hard.weights[0, ..., 4:], torch.zeros_like(hard.weights[0, ..., 4:])
    )


def test_fp16_multihead_attention_with_large_mask_and_padding_has_no_nan():
    mha = nn.MultiheadAttention(16, 2, batch_first=True).half()
    model = lcaam_patch.apply(nn.Sequential(mha), init="default", max_tokens=6)
    with torch.no_grad():
        mha.lcaam.layers[-1].bias.fill_(6e4)
    x = torch.randn(2, 6, 16).half()
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    out, weights = mha(x, x, x, key_padding_mask=padding)
    assert torch.isfinite(out).all()
    assert weights is not None and torch.equal(weights[1, :, 4:], torch.zeros_like(weights[1, :, 4:]))
    assert lcaam_patch.is_patched(model)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("kind", ["float", "bool"])
@pytest.mark.parametrize("fusion", ["mul", "add"])
def test_non_finite_mask_at_hard_masked_keys_has_no_effect(bad, kind, fusion):
    q, k, v = _qkv()
    keep = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    keep[..., 4:] = False
    attn_mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    m = torch.randn(2, 5, 6)
    m_bad = m.clone()
    m_bad[..., 4:] = bad
    m_bad.requires_grad_()
    backends = ["eager", "sdpa"] if fusion == "add" else ["eager"]
    for backend in backends:
        clean = run(AttentionCall(q, k, v, m, fusion=fusion, scale=0.5, attn_mask=attn_mask), backend).output
        out = run(AttentionCall(q, k, v, m_bad, fusion=fusion, scale=0.5, attn_mask=attn_mask), backend).output
        torch.testing.assert_close(out, clean)
        grads = torch.autograd.grad(out.sum(), (q, k, v, m_bad))
        assert all(torch.isfinite(g).all() for g in grads), backend
        assert torch.equal(grads[3][..., 4:], torch.zeros_like(grads[3][..., 4:]))


def test_large_factors_through_lowrank_sdpa_stay_finite_like_eager():
    q, k, v = _qkv(torch.float32)
    a = (torch.randn(2, 5, 2) * 3e4).requires_grad_()
    b = (torch.randn(2, 6, 2) * 3e4).requires_grad_()
    keep = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    keep[0, ..., 4:] = False
    for backend in ("eager", "lowrank_sdpa"):
        out = run(AttentionCall(q, k, v, LowRankMask(a, b), fusion="mul", scale=0.3, attn_mask=keep), backend).output
        grads = torch.autograd.grad(out.sum(), (q, k, v, a, b))
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads), backend


# 5. Precision: float64 is computed in float64


def test_eager_computes_float64_in_float64():
    q, k, v = (t.detach().double().requires_grad_() for t in _qkv())
    m = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    keep[1, ..., 5:] = False

    def attention(q, k, v, m):
        return run(AttentionCall(q, k, v, m, fusion="mul", scale=0.4, attn_mask=keep), "eager").output

    assert attention(q, k, v, m).dtype == torch.float64
    assert torch.autograd.gradcheck(attention, (q, k, v, m))


# 6. Atomicity and bad arguments


def test_an_adapter_whose_prepare_raises_leaves_the_model_unpatched(monkeypatch):
    model = tiny_vit()
    before = snapshot(model)
    adapter = lcaam_patch.get_adapter("timm")
    calls = []

    def failing_prepare(module, root):
        calls.append(module)
        if len(calls) == 2:
            raise lcaam_patch.UnsupportedModuleError("refused by this test")

    monkeypatch.setattr(adapter, "prepare", failing_prepare)
    with pytest.raises(lcaam_patch.UnsupportedModuleError, match="refused by this test"):
        lcaam_patch.apply(model)
    assert not lcaam_patch.is_patched(model)
    assert_unchanged(model, before)
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize(
    "bad,message",
    [
        (lambda v: v.numpy(), "holds a ndarray, not a torch.Tensor"),
        (lambda v: v.tolist(), "holds a list, not a torch.Tensor"),
        (lambda v: torch.empty_like(v, device="meta"), "meta tensor"),
        (lambda v: None, "holds a NoneType"),
        (lambda v: v.long(), "dtype torch.int64"),
    ],
)
def test_load_lcaam_state_dict_validates_every_value_before_copying(bad, message):
    model = lcaam_patch.apply(tiny_vit(), init="default")
    saved = lcaam_patch.lcaam_state_dict(model)
    other = lcaam_patch.apply(tiny_vit(), init="default")
    before = {k: v.clone() for k, v in lcaam_patch.lcaam_state_dict(other).items()}
    corrupt = dict(saved)
    last = sorted(corrupt)[-1]
    corrupt[last] = bad(corrupt[last].detach())
    with pytest.raises(lcaam_patch.StateDictError, match=message):
        lcaam_patch.load_lcaam_state_dict(other, corrupt)
    for key, value in lcaam_patch.lcaam_state_dict(other).items():
        assert torch.equal(value, before[key]), key


def test_load_lcaam_state_dict_refuses_what_is_not_a_mapping():
    model = lcaam_patch.apply(tiny_vit())
    with pytest.raises(lcaam_patch.StateDictError, match="mapping of key to tensor"):
        lcaam_patch.load_lcaam_state_dict(model, [1, 2])


@pytest.mark.parametrize("bad", [None, "vit_tiny", torch.zeros(2), (1, 2), nn.Linear])
@pytest.mark.parametrize(
    "call",
    [
        lambda m: lcaam_patch.apply(m),
        lambda m: lcaam_patch.remove(m),
        lambda m: lcaam_patch.summary(m),
        lambda m: lcaam_patch.survey(m),
        lambda m: lcaam_patch.capture(m).__enter__(),
        lambda m: lcaam_patch.cost(m, torch.zeros(1)),
        lambda m: lcaam_patch.lcaam_state_dict(m),
        lambda m: lcaam_patch.reset_generators(m),
        lambda m: lcaam_patch.is_patched(m),
    ],
)
def test_public_functions_given_something_other_than_a_module_say_so(bad, call):
    with pytest.raises(lcaam_patch.NotAModuleError, match=r"takes a torch.nn.Module, got .*call lcaam_patch\."):
        call(bad)


def test_register_adapter_rejects_what_is_not_an_adapter():
    with pytest.raises(lcaam_patch.RegistrationError, match="expects an lcaam_patch.Adapter instance"):
        lcaam_patch.register_adapter(None)  # type: ignore[arg-type]


def test_register_backend_none_leaves_apply_working():
    with pytest.raises(lcaam_patch.RegistrationError):
        lcaam_patch.register_backend("x", None)  # type: ignore[arg-type]
    lcaam_patch.apply(tiny_vit())


# 7. Partial patching


def test_patched_attention_inside_an_unpatched_encoder_refuses_nested_tensors():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2).eval()
    lcaam_patch.apply(encoder.layers[0].self_attn, max_tokens=6)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    with pytest.raises(lcaam_patch.UnsupportedModuleError, match="nested tensors.*Patch the enclosing model"):
        with torch.no_grad():
            encoder(torch.randn(2, 6, 16), src_key_padding_mask=padding)


def test_remove_refuses_to_delete_a_forward_installed_after_apply():
    model = lcaam_patch.apply(tiny_vit())
    attn = model.blocks[0].attn
    patched = attn.forward

    def user_forward(*args, **kwargs):
        return patched(*args, **kwargs)

    attn.forward = user_forward
    before = copy.copy(vars(model.blocks[1].attn))
    with pytest.raises(lcaam_patch.ForwardReplacedError, match="blocks.0.attn.*replaced after lcaam_patch.apply"):
        lcaam_patch.remove(model)
    assert attn.forward is user_forward
    assert lcaam_patch.is_patched(model) and vars(model.blocks[1].attn).keys() == before.keys()
    del attn.forward
    attn.forward = patched
    lcaam_patch.remove(model)
    assert not lcaam_patch.is_patched(model)


class _TunerWrapper(nn.Module):
    """What PEFT puts in place of a Linear: the original as `base_layer`, its `weight` exposed."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.weight, self.bias = base.weight, base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + 1.0


@pytest.mark.parametrize("options", [{}, {"generator": "lowrank"}])
def test_a_generator_linear_wrapped_by_another_tuner_is_refused_in_any_adapter(options):
    # LCAAM reads the last layer's weights directly: a tuner's update on it would be skipped silently
    model = lcaam_patch.apply(tiny_vit(), **options)
    generator = model.blocks[0].attn.lcaam
    stack = generator.layers if not options else generator.query
    stack[-1] = _TunerWrapper(stack[-1])
    with pytest.raises(lcaam_patch.UnsupportedModuleError, match=r"wrapped by another tuner.*exclude_modules"):
        model(torch.randn(1, 3, 16, 16))


# The reverse load: a patched state dict into an unpatched model


def test_patched_state_dict_into_unpatched_model_fails_in_pytorchs_words_and_the_filter_works():
    patched = lcaam_patch.apply(tiny_vit(), init="default")
    state = patched.state_dict()
    plain = tiny_vit()
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*lcaam"):
        plain.load_state_dict(state, strict=True)
    plain.load_state_dict({k: v for k, v in state.items() if not lcaam_patch.is_lcaam_key(k)}, strict=True)


# gradcheck of whole patched models in float64: eager and lowrank routes, both modes


@pytest.mark.parametrize("mode", ["multilayer", "global"])
@pytest.mark.parametrize(
    "options",
    [dict(backend="eager"), dict(generator="lowrank", rank=2, backend="lowrank_sdpa")],
    ids=["eager", "lowrank"],
)
def test_gradcheck_of_a_patched_vit_in_float64(mode, options):
    model = tiny_vit(img_size=8, patch_size=4, embed_dim=8, num_heads=2, num_classes=3).double()
    lcaam_patch.apply(model, mode=mode, init="default", **options)
    padding = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    padding[..., -1] = False
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)

    def forward(x: torch.Tensor) -> torch.Tensor:
        tokens = model.patch_embed(x)
        tokens = model._pos_embed(tokens)
        for block in model.blocks:
            tokens = tokens + block.attn(block.norm1(tokens), attn_mask=padding)
        return tokens

    assert torch.autograd.gradcheck(forward, (x,))
    ran = {site.last_backend for _, _, site in lcaam_patch.patched_sites(model)}
    assert ran == {options["backend"]}


# 2. mode="global" with two forwards before one backward (multi-view training)


def test_global_mode_two_forwards_then_one_backward_is_exact():
    model = lcaam_patch.apply(tiny_vit(), mode="global", init="default")
    views = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    separate = []
    for view in views:
        model.zero_grad()
        model(view).square().sum().backward()
        separate.append({n: p.grad.clone() for n, p in model.named_parameters() if ".lcaam." in n})
    model.zero_grad()
    (model(views[0]).square().sum() + model(views[1]).square().sum()).backward()
    for name, parameter in model.named_parameters():
        if ".lcaam." in name:
            torch.testing.assert_close(parameter.grad, separate[0][name] + separate[1][name])


def test_causal_masks_are_built_on_the_device_of_the_call():
    q = torch.zeros(1, 1, 3, 4, device="meta")
    call = AttentionCall(q, q, q, torch.zeros(1, 3, 3, device="meta"), fusion="mul", scale=1.0, is_causal=True)
    keep = masking.upstream_mask(call).full_keep()
    assert keep is not None and keep.device.type == "meta"
    assert masking.lcaam_mask(call, masking.upstream_mask(call), torch.float32).device.type == "meta"
