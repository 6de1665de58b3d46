"""The generic SDPA adapter on code nobody here wrote: a user-style attention written here,
diffusers' `Attention` with `AttnProcessor2_0`, and the facts about torch it relies on."""

from __future__ import annotations

import copy
import os
import socket
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, snapshot
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

import lcaam_patch
from lcaam_patch.adapters.base import Adapter
from lcaam_patch.site import SiteGeometry


class UserAttention(nn.Module):
    """What a researcher writes: a qkv Linear, a reshape, SDPA with the caller's mask."""

    def __init__(self, dim: int = 32, heads: int = 4, causal: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class UserModel(nn.Module):
    """A padded-self-attention layer, then a causal one."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder = UserAttention(), UserAttention(causal=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(self.encoder(x, mask))


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 5, 32)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False  # the second sample is padded after 3 tokens
    return x, mask


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lcaam." in f".{name}":
                parameter.normal_(0, 0.5)


def _lcaam_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lcaam." in f".{n}"]


@pytest.fixture
def user() -> UserModel:
    torch.manual_seed(0)
    return UserModel()


# the facts about torch the adapter relies on (torch 2.14)


class _Counter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_a_mode_sees_both_spellings_of_sdpa_and_helpers_in_other_files_but_not_the_aten_op() -> None:
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert torch.ops.aten.scaled_dot_product_attention is not F.scaled_dot_product_attention
    q = torch.randn(1, 2, 3, 4)
    counter = _Counter()
    with counter:
        F.scaled_dot_product_attention(q, q, q)
        torch._C._nn.scaled_dot_product_attention(q, q, q)
        Attention(8, heads=2, dim_head=4, processor=AttnProcessor2_0())(torch.randn(1, 3, 8))  # a helper elsewhere
        torch.ops.aten.scaled_dot_product_attention(q, q, q)
    assert counter.calls == 3


def test_a_mode_is_per_thread_and_multihead_attention_hides_its_call() -> None:
    q = torch.randn(1, 2, 3, 4)
    counter = _Counter()
    with counter:
        thread = threading.Thread(target=F.scaled_dot_product_attention, args=(q, q, q))
        thread.start()
        thread.join()
        tokens = torch.randn(1, 3, 8)
        nn.MultiheadAttention(8, 2, batch_first=True).eval()(tokens, tokens, tokens)
    assert counter.calls == 0


def test_an_enclosing_mode_catches_an_inner_call_unless_torch_functions_are_disabled() -> None:
    q = torch.randn(1, 2, 3, 4)
    outer = _Counter()
    with outer:
        F.scaled_dot_product_attention(q, q, q)
        with torch._C.DisableTorchFunction():
            F.scaled_dot_product_attention(q, q, q)
    assert outer.calls == 1


# the user-written attention


def test_without_a_bound_apply_names_the_fix_and_leaves_the_model_alone(user: UserModel) -> None:
    before = snapshot(user)
    with pytest.raises(lcaam_patch.MissingBoundError, match="max_kv_tokens=N.*example_inputs"):
        lcaam_patch.apply(user)
    assert_unchanged(user, before)
    entries = {e.path: e for e in lcaam_patch.survey(user)}
    assert entries["encoder"].status == "error" and entries["encoder"].adapter == "sdpa"


def test_user_attention_identity_exact_mask_in_path_remove_exact(user: UserModel) -> None:
    x, mask = _inputs()
    expected = user(x, mask)
    keys = set(user.state_dict())
    lcaam_patch.apply(user, max_kv_tokens=8)
    assert {path for path, _, _ in lcaam_patch.patched_sites(user)} == {"encoder", "decoder"}
    assert all(site.verified for _, _, site in lcaam_patch.patched_sites(user)) is False
    torch.testing.assert_close(user(x, mask), expected, rtol=0, atol=1e-6)
    assert all(site.verified for _, _, site in lcaam_patch.patched_sites(user))
    assert {k for k in user.state_dict() if ".lcaam." not in f".{k}"} == keys
    _perturb(user)
    moved = user(x, mask)
    assert not torch.allclose(moved, expected, atol=1e-3)
    moved.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _lcaam_parameters(user))
    lcaam_patch.remove(user)
    assert torch.equal(user(x, mask), expected)
    assert set(user.state_dict()) == keys
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in user.modules())


def test_masks_apply_after_fusion_padded_keys_and_future_keys_get_no_weight(user: UserModel) -> None:
    x, mask = _inputs()
    lcaam_patch.apply(user, max_kv_tokens=8, backend="eager")
    _perturb(user)
    base = user(x, mask)
    changed = x.clone()
    changed[1, 3:] += 5.0  # padded keys of sample 1: must not change its first 3 outputs of the encoder
    assert torch.allclose(user.encoder(changed, mask)[1, :3], user.encoder(x, mask)[1, :3], atol=1e-5)
    later = x.clone()
    later[:, 4] += 5.0  # a future key of the causal layer: earlier queries do not see it
    assert torch.allclose(user.decoder(later)[:, :4], user.decoder(x)[:, :4], atol=1e-5)
    assert base.isfinite().all()


def test_example_inputs_give_the_bound_and_survey_says_so(user: UserModel) -> None:
    x, mask = _inputs()
    entries = {e.path: e for e in lcaam_patch.survey(user, example_inputs=(x, mask))}
    assert entries["encoder"].status == "patch" and "5×5" in entries["encoder"].detail
    lcaam_patch.apply(user, example_inputs=(x, mask))
    geometries = {path: site.geometry for path, _, site in lcaam_patch.patched_sites(user)}
    assert geometries["encoder"] == SiteGeometry(32, 5, 5, "self")


def test_dropout_runs_as_the_call_asked() -> None:
    torch.manual_seed(0)
    module = UserAttention(dropout=0.5)
    x = torch.randn(2, 5, 32)
    lcaam_patch.apply(module, max_kv_tokens=8)
    module.eval()
    module(x)  # verified in eval mode, without dropout
    module.train()
    first, second = module(x), module(x)
    assert not torch.allclose(first, second)
    module.eval()
    assert torch.equal(module(x), module(x))


def test_patched_per_instance_the_class_is_untouched(user: UserModel) -> None:
    x, _ = _inputs()
    decoder_before = user.decoder(x)
    lcaam_patch.apply(user, max_kv_tokens=8, exclude=["decoder"])
    assert "forward" not in vars(user.decoder) and "forward" in vars(user.encoder)
    _perturb(user)
    assert torch.equal(user.decoder(x), decoder_before)
    assert not lcaam_patch.is_patched(UserAttention())


def test_an_unpatched_child_gets_the_original_sdpa_and_a_patched_child_its_own() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.child = nn.Linear(32, 96), UserAttention()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
            return self.child(out)

    torch.manual_seed(0)
    model = nn.Sequential(Outer())
    x = torch.randn(2, 5, 32)
    expected = model(x)
    lcaam_patch.apply(model, max_kv_tokens=8, exclude=["0.child"])
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)  # the child's call is not a second one
    _perturb(model)
    child_alone = model[0].child(torch.randn(2, 5, 32))
    assert child_alone.shape == (2, 5, 32)
    lcaam_patch.remove(model)
    lcaam_patch.apply(model, max_kv_tokens=8)
    assert {p for p, _, _ in lcaam_patch.patched_sites(model)} == {"0", "0.child"}
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    assert all(site.verified for _, _, site in lcaam_patch.patched_sites(model))


def test_compile_fullgraph_matches_eager(user: UserModel) -> None:
    x, mask = _inputs()
    lcaam_patch.apply(user, max_kv_tokens=8, backend="eager")
    _perturb(user)
    eager = user(x, mask)
    torch._dynamo.reset()
    compiled = torch.compile(user, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, mask), eager, rtol=0, atol=1e-6)


def test_activation_checkpointing_in_multilayer_mode(user: UserModel) -> None:
    x, mask = _inputs()
    lcaam_patch.apply(user, max_kv_tokens=8, mode="multilayer")
    _perturb(user)
    user(x, mask)
    user(x, mask).sum().backward()
    plain = [p.grad.clone() for p in _lcaam_parameters(user)]
    user.zero_grad()
    checkpoint(user, x, mask, use_reentrant=False).sum().backward()
    for grad, parameter in zip(plain, _lcaam_parameters(user)):
        torch.testing.assert_close(parameter.grad, grad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_after_apply(user: UserModel) -> None:
    import torch.distributed as dist

    x, mask = _inputs()
    lcaam_patch.apply(user, max_kv_tokens=8)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(user)
        wrapped(x, mask).sum().backward()
        assert all(p.grad is not None for p in _lcaam_parameters(user))
        with pytest.raises(lcaam_patch.WrappedModelError):
            lcaam_patch.apply(nn.Sequential(nn.parallel.DistributedDataParallel(UserModel())), max_kv_tokens=8)
    finally:
        dist.destroy_process_group()


def test_save_and_from_pretrained(user: UserModel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    x, mask = _inputs()
    fresh = copy.deepcopy(user)
    lcaam_patch.apply(user, max_kv_tokens=8)
    _perturb(user)
    expected = user(x, mask)
    lcaam_patch.save_pretrained(user, tmp_path)
    loaded = lcaam_patch.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(loaded(x, mask), expected)


def test_generic_auto_stays_out_of_models_other_adapters_claim() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha, self.mine = nn.MultiheadAttention(32, 4, batch_first=True), UserAttention()

    model = Mixed()
    lcaam_patch.apply(model, max_tokens=8)
    assert {p for p, _, _ in lcaam_patch.patched_sites(model)} == {"mha"}
    lcaam_patch.remove(model)
    lcaam_patch.apply(model, max_tokens=8, generic="on")
    assert {p for p, _, _ in lcaam_patch.patched_sites(model)} == {"mha", "mine"}
    with pytest.raises(lcaam_patch.NoAttentionFoundError):
        lcaam_patch.apply(UserModel(), max_kv_tokens=8, generic="off")


# refused at apply


class TwoCalls(UserAttention):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(super().forward(x))


class PackedHeads(UserAttention):
    """Heads packed into the batch: q (B·H, 1, N, D)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = (t.reshape(B * self.heads, 1, N, C // self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).reshape(B, self.heads, N, C // self.heads)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class FeatureMapAttention(nn.Module):
    """A UNet-style attention block on a (B, C, H, W) feature map."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)
        return F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W)


class JointAttention(UserAttention):
    """Text tokens joined to the image tokens before attention (MM-DiT style)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(torch.cat([x, x[:, :2]], dim=1))[:, : x.shape[1]]


@pytest.mark.parametrize(
    ("module", "inputs", "match"),
    [
        (TwoCalls(), (torch.randn(2, 5, 32),), "2 times per forward"),
        (PackedHeads(), (torch.randn(2, 5, 32),), "packed into the batch"),
        (FeatureMapAttention(), (torch.randn(2, 32, 3, 3),), "4-D feature map"),
        (JointAttention(), (torch.randn(2, 5, 32),), "tokens are joined"),
    ],
    ids=["two-calls", "packed-heads", "feature-map", "joint-tokens"],
)
def test_refused_at_apply_naming_the_fix(module: nn.Module, inputs: tuple[torch.Tensor, ...], match: str) -> None:
    model = nn.Sequential(module)
    before = snapshot(model)
    with pytest.raises(lcaam_patch.UnsupportedModuleError, match=f"{match}.*exclude=\\['0'\\]"):
        lcaam_patch.apply(model, example_inputs=inputs)
    assert_unchanged(model, before)


def test_refused_at_call_time_a_second_call_and_another_shape() -> None:
    class SometimesTwiceAttention(UserAttention):
        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, twice: bool = False) -> torch.Tensor:
            out = super().forward(x)
            return super().forward(out) if twice else out

    model = nn.Sequential(SometimesTwiceAttention())
    x = torch.randn(2, 5, 32)
    lcaam_patch.apply(model, max_kv_tokens=8)
    model(x)
    with pytest.raises(lcaam_patch.UnsupportedModuleError, match="a second time"):
        model[0](x, twice=True)
    model[0].heads = 2
    with pytest.raises(lcaam_patch.UnsupportedModuleError, match="apply saw q"):
        model(x)


def test_a_failing_prepare_leaves_the_model_as_it_was(user: UserModel) -> None:
    class Failing(Adapter):
        name, priority = "failing_prepare", 50

        def attention_types(self) -> tuple[type[nn.Module], ...]:
            return (UserAttention,)

        def geometry(self, module, path, root, config):  # type: ignore[no-untyped-def]
            return SiteGeometry(32, 8, 8, "self")

        def forward(self, module, site, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise AssertionError("never called")

        def prepare(self, module: nn.Module, root: nn.Module) -> None:
            module.qkv.register_forward_hook(lambda *args: None)
            root.marker = True
            if module is root.decoder:
                raise RuntimeError("prepare failed")

    adapter = lcaam_patch.register_adapter(Failing())
    try:
        before = snapshot(user)
        with pytest.raises(RuntimeError, match="prepare failed"):
            lcaam_patch.apply(user)
        assert_unchanged(user, before)
        assert not hasattr(user, "marker")
    finally:
        lcaam_patch.unregister_adapter(adapter.name)


# diffusers


def _diffusers_block() -> nn.Module:
    pytest.importorskip("diffusers")
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    return BasicTransformerBlock(32, 4, 8, cross_attention_dim=16)


def test_diffusers_attention_self_and_cross_with_only_a_bound() -> None:
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor2_0

    block = _diffusers_block()
    assert all(isinstance(block.get_submodule(p).processor, AttnProcessor2_0) for p in ("attn1", "attn2"))
    x, context = torch.randn(2, 6, 32), torch.randn(2, 9, 16)
    padding = torch.ones(2, 9)
    padding[0, 7:] = 0
    expected = block(x, encoder_hidden_states=context, encoder_attention_mask=padding)
    keys = set(block.state_dict())
    lcaam_patch.apply(block, max_kv_tokens=16)
    sites = {path: site for path, _, site in lcaam_patch.patched_sites(block)}
    assert set(sites) == {"attn1", "attn2"} and sites["attn2"].geometry.kind == "cross"
    assert sites["attn2"].geometry.kv_embed_dim == 16
    out = block(x, encoder_hidden_states=context, encoder_attention_mask=padding)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert all(site.verified for site in sites.values())
    assert {k for k in block.state_dict() if ".lcaam." not in f".{k}"} == keys
    _perturb(block)
    moved = block(x, encoder_hidden_states=context, encoder_attention_mask=padding)
    assert not torch.allclose(moved, expected, atol=1e-3)
    moved.sum().backward()
    assert all(p.grad is not None for p in _lcaam_parameters(block))
    lcaam_patch.remove(block)
    assert torch.equal(block(x, encoder_hidden_states=context, encoder_attention_mask=padding), expected)


def test_diffusers_lowrank_reads_the_key_tokens_and_example_inputs_bound_it() -> None:
    block = _diffusers_block()
    x, context = torch.randn(2, 6, 32), torch.randn(2, 9, 16)
    expected = block(x, encoder_hidden_states=context)
    lcaam_patch.apply(block, generator="lowrank")
    torch.testing.assert_close(block(x, encoder_hidden_states=context), expected, rtol=0, atol=1e-5)
    lcaam_patch.remove(block)
    lcaam_patch.apply(block, example_inputs={"hidden_states": x, "encoder_hidden_states": context})
    bounds = {p: (s.geometry.max_q_tokens, s.geometry.max_kv_tokens) for p, _, s in lcaam_patch.patched_sites(block)}
    assert bounds == {"attn1": (6, 6), "attn2": (6, 9)}


def test_diffusers_compile_checkpoint_and_pretrained(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attention = nn.Sequential(Attention(32, heads=4, dim_head=8, processor=AttnProcessor2_0()))
    fresh = copy.deepcopy(attention)
    x = torch.randn(2, 6, 32)
    lcaam_patch.apply(attention, max_kv_tokens=8, backend="eager")
    _perturb(attention)
    eager = attention(x)
    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager, rtol=0, atol=1e-6)
    checkpoint(attention, x, use_reentrant=False).sum().backward()
    assert all(p.grad is not None for p in _lcaam_parameters(attention))
    lcaam_patch.save_pretrained(attention, tmp_path)
    torch.testing.assert_close(lcaam_patch.from_pretrained(fresh, tmp_path)(x), eager)


# timm models whose attention no adapter claims but which call SDPA (15 in timm 1.0.31's census)


@pytest.mark.parametrize(
    ("name", "outcome"),
    [
        ("gemma4_vit_167m", "Gemma4Attention"),
        ("samvit_base_patch16_224", "4-D feature map"),
        ("sam2_hiera_tiny", "4-D feature map"),
        ("vit_dwee_patch16_reg1_gap_256", "2 times per forward"),
    ],
)
def test_unclaimed_timm_models_that_call_sdpa(name: str, outcome: str) -> None:
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model(name)
    if name.startswith("gemma4"):
        with pytest.warns(UserWarning, match="meta device"):
            lcaam_patch.apply(model)
        sites = lcaam_patch.patched_sites(model)
        assert sites and {type(m).__name__ for _, m, _ in sites} == {outcome}
        assert all(s.adapter.name == "sdpa" and s.geometry.max_kv_tokens for _, _, s in sites)
        return
    with pytest.raises(lcaam_patch.UnsupportedModuleError, match=outcome):
        lcaam_patch.apply(model)
