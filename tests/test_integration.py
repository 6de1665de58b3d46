"""A patched model keeps working with the PyTorch machinery users wrap around it."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import tiny_vit
from torch import nn

import lcaam_patch


def patched_vit(**options: object) -> nn.Module:
    """A tiny ViT patched with a random (non-identity) generator."""
    return lcaam_patch.apply(tiny_vit(), init="default", **options)


def test_deepcopy_gives_an_independent_patched_model():
    model = patched_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), model(x))
    assert clone.blocks[0].attn.forward.args[0] is clone.blocks[0].attn
    with torch.no_grad():
        clone.blocks[0].attn.lcaam.layers[0].bias.add_(1.0)
    assert not torch.allclose(clone(x), model(x))
    lcaam_patch.remove(clone)
    assert lcaam_patch.is_patched(model)


@pytest.mark.parametrize("mode", ["multilayer", "global"])
def test_torch_save_and_load_of_the_whole_model(mode):
    model = patched_vit(mode=mode).eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), expected)
    assert lcaam_patch.is_patched(loaded)
    lcaam_patch.remove(loaded)
    assert not lcaam_patch.is_patched(loaded)


def test_state_dict_round_trip_and_lcaam_only_round_trip():
    model = patched_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = lcaam_patch.apply(tiny_vit()).eval()
    fresh.load_state_dict(torch.load(buffer), strict=True)
    torch.testing.assert_close(fresh(x), model(x))
    only = lcaam_patch.lcaam_state_dict(model)
    assert only and all(".lcaam." in k for k in only)
    other = lcaam_patch.apply(tiny_vit()).eval()
    other.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for name, param in other.named_parameters():
            if ".lcaam." in name:
                param.zero_()
    lcaam_patch.load_lcaam_state_dict(other, only)
    torch.testing.assert_close(other(x), model(x))


@pytest.mark.slow
def test_torch_compile_after_apply_matches_eager():
    model = patched_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_timm_gradient_checkpointing_gives_the_same_gradients():
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = patched_vit()
        model.set_grad_checkpointing(checkpointing)
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_multilayer_mode_with_gradient_checkpointing_is_exact():
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = patched_vit(mode="multilayer")
        model.set_grad_checkpointing(checkpointing)
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append([p.grad for n, p in model.named_parameters() if ".lcaam." in n])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_global_mode_refuses_activation_checkpointing_in_backward(use_reentrant):
    """Recomputed layers would read the mask of whichever forward ran last (or one made
    under no_grad): refused with a message, never a silently wrong gradient."""
    model = patched_vit(mode="global")
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    tokens = model.patch_embed(x)
    out = torch.utils.checkpoint.checkpoint(model.blocks, tokens, use_reentrant=use_reentrant)
    with pytest.raises(lcaam_patch.GlobalModeError, match="activation checkpointing.*mode='multilayer'"):
        out.sum().backward()


def test_global_mode_gives_each_thread_its_own_mask():
    import threading

    model = patched_vit(mode="global").eval()
    inputs = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(20):
                barrier.wait()
                results[i] = model(inputs[i])
                torch.testing.assert_close(results[i], expected[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(results) == {0, 1}


@pytest.mark.parametrize("fusion", ["mul", "add"])
def test_bf16_autocast_trains(fusion):
    model = patched_vit(fusion=fusion)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), model(x), atol=0.1, rtol=0.1)
    nn.functional.cross_entropy(logits.float(), y).backward()
    lcaam = [p for n, p in model.named_parameters() if ".lcaam." in n]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lcaam)


def test_patch_on_meta_then_materialise_and_reset_keeps_identity():
    real = tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    expected = real(x)
    with torch.device("meta"):
        model = tiny_vit()
    with pytest.warns(UserWarning, match="reset_generators"):
        lcaam_patch.apply(model)
    assert model.blocks[0].attn.lcaam.layers[0].weight.is_meta
    model = model.to_empty(device="cpu").eval()
    lcaam_patch.reset_generators(model)
    model.load_state_dict(real.state_dict(), strict=True)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
