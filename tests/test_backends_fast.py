"""The fast backends against the eager reference: Triton (on the CPU through Triton's
interpreter), FlexAttention, and `auto` dispatch. GPU-only checks skip without CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import tiny_vit
from torch import nn

import lcaam_patch
from lcaam_patch import AttentionCall, lcaam_attention

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the triton backend serve CPU tensors through Triton's interpreter, for one test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_inputs(dtype, *, B=2, H=2, Nq=20, Nk=37, D=32, Dv=None, device="cpu"):
    """q, k, v, M with gradients; lengths that are not multiples of the kernel's blocks."""
    Dv = Dv or D
    q = torch.randn(B, H, Nq, D, device=device).to(dtype).requires_grad_()
    k = torch.randn(B, H, Nk, D, device=device).to(dtype).requires_grad_()
    v = torch.randn(B, H, Nk, Dv, device=device).to(dtype).requires_grad_()
    mask = (1 + torch.randn(B, Nq, Nk, device=device)).to(dtype).requires_grad_()
    return q, k, v, mask


def upstream_mask(masking: str, B: int, Nq: int, Nk: int, device="cpu"):
    """(attn_mask, is_causal): padding masks carry a row whose keys are all masked."""
    if masking == "none":
        return None, False
    if masking == "causal":
        return None, True
    keep = torch.ones(B, 1, Nq, Nk, dtype=torch.bool, device=device)
    keep[0, ..., Nk - 5 :] = False  # key padding of the first sample
    keep[1, :, 3] = False  # query 3 of the second sample sees nothing
    if masking == "padding-bool":
        return keep, False
    return torch.zeros(keep.shape, device=device).masked_fill(~keep, float("-inf")), False


def relative_errors(backend, q, k, v, mask, *, fusion, attn_mask, is_causal, scale=0.3):
    """Relative L2 errors of the backend's output and gradients (q, k, v, M) against eager
    in float64, next to those of eager itself in the inputs' dtype."""
    grad = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=torch.float64, device=q.device)

    def run(name, tensors):
        q, k, v, m = tensors
        call = AttentionCall(q, k, v, m, fusion=fusion, scale=scale, attn_mask=attn_mask, is_causal=is_causal)
        out, _, ran = lcaam_patch.backends.run(call, name)
        assert ran == name
        grads = torch.autograd.grad(out, tensors, grad.to(out.dtype))
        return [out, *grads]

    truth = run("eager", [t.detach().double().requires_grad_() for t in (q, k, v, mask)])
    got = run(backend, [q, k, v, mask])
    same_dtype = run("eager", [q, k, v, mask])

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm().clamp_min(1e-12)).item()

    return [rel(g, t) for g, t in zip(got, truth)], [rel(e, t) for e, t in zip(same_dtype, truth)], got


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("fusion", ["mul", "add"])
@pytest.mark.parametrize(
    "masking,shape",
    [("none", "cross"), ("padding-bool", "cross"), ("padding-float", "self"), ("causal", "self")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_eager_with_gradients(fusion, masking, shape, dtype):
    Nq, Nk = (20, 37) if shape == "cross" else (33, 33)
    q, k, v, mask = make_inputs(dtype, Nq=Nq, Nk=Nk)
    attn_mask, is_causal = upstream_mask(masking, 2, Nq, Nk)
    errors, eager_errors, got = relative_errors(
        "triton", q, k, v, mask, fusion=fusion, attn_mask=attn_mask, is_causal=is_causal
    )
    assert got[0].dtype == dtype
    if dtype == torch.float32:
        assert max(errors) < 1e-5, errors
    else:  # no worse than eager in bf16 (whose scores are rounded to bf16 before the softmax)
        for name, err, ref in zip(["out", "dq", "dk", "dv", "dM"], errors, eager_errors):
            assert err < max(2 * ref, 2e-2), (name, err, ref)
    if masking.startswith("padding"):
        dead = got[0][1, :, 3]
        assert torch.equal(dead, torch.zeros_like(dead))
        assert all(torch.isfinite(g).all() for g in got[1:])


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("D,Dv", [(64, 64), (128, 128), (40, 24)])
def test_triton_head_dims(D, Dv):
    q, k, v, mask = make_inputs(torch.float32, B=2, H=1, Nq=17, Nk=19, D=D, Dv=Dv)
    attn_mask, _ = upstream_mask("padding-bool", 2, 17, 19)
    errors, _, _ = relative_errors("triton", q, k, v, mask, fusion="mul", attn_mask=attn_mask, is_causal=False)
    assert max(errors) < 1e-5, errors


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_triton_fp16_and_broadcast_head_mask():
    q, k, v, mask = make_inputs(torch.float16, B=2, H=3, Nq=18, Nk=18)
    per_head = torch.randn(1, 3, 18, 18).to(torch.float16)  # e.g. a relative-position bias
    errors, eager_errors, _ = relative_errors("triton", q, k, v, mask, fusion="mul", attn_mask=per_head, is_causal=True)
    for err, ref in zip(errors, eager_errors):
        assert err < max(2 * ref, 1e-2), (errors, eager_errors)


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_triton_with_one_key_head_shared_by_all_query_heads():
    q, _, _, mask = make_inputs(torch.float32, B=2, H=3, Nq=17, Nk=18)
    _, k, v, _ = make_inputs(torch.float32, B=2, H=1, Nq=17, Nk=18)
    errors, _, _ = relative_errors("triton", q, k, v, mask, fusion="add", attn_mask=None, is_causal=False)
    assert max(errors) < 1e-5, errors


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_triton_in_a_patched_vit_matches_eager_including_generator_gradients():
    torch.manual_seed(0)
    reference = lcaam_patch.apply(tiny_vit(), fusion="mul", init="default", backend="eager")
    model = lcaam_patch.apply(tiny_vit(), fusion="mul", init="default", backend="triton")
    model.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 16, 16)
    expected, got = reference(images), model(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    expected.square().sum().backward()
    got.square().sum().backward()
    checked = 0
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)
        checked += "lcaam" in name
    assert checked == 4  # weight and bias of both blocks' generators
    assert [s.last_backend for _, _, s in lcaam_patch.patched_sites(model)] == ["triton", "triton"]


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_triton_cross_attention_through_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 2, batch_first=True)
    reference = lcaam_patch.apply(
        nn.Sequential(mha), fusion="add", init="default", max_tokens=20, max_kv_tokens=21, backend="eager"
    )
    model = lcaam_patch.apply(
        nn.Sequential(nn.MultiheadAttention(32, 2, batch_first=True)),
        fusion="add",
        init="default",
        max_tokens=20,
        max_kv_tokens=21,
        backend="auto",
    )
    model.load_state_dict(reference.state_dict())
    query, memory = torch.randn(2, 20, 32), torch.randn(2, 21, 32)
    padding = torch.zeros(2, 21, dtype=torch.bool)
    padding[1, 15:] = True
    outputs = [m[0](query, memory, memory, key_padding_mask=padding, need_weights=False)[0] for m in (reference, model)]
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for out in outputs:
        out.sum().backward()
    for p, p_ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4)
    assert "auto→triton" in str(lcaam_patch.summary(model))


@needs_triton
@pytest.mark.slow
def test_triton_kernels_compile_for_hopper_without_a_gpu():
    """The compiled (not interpreted) kernels lower to sm_90 machine code within its shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lcaam_patch.backends.triton.ops import kernels

    module = kernels(interpret=False)
    pointers = {"LSE": "*fp32", "DELTA": "*fp32", "DM": "*fp32", "Bias": "*i1"}
    scalars = {"H", "NQ", "NK", "D", "DV"}
    for kernel in (module._fwd, module._bwd_dkdv_dm, module._bwd_dq):
        config = kernel.configs[0]
        constants = dict(
            FUSION_MUL=True,
            BIAS_KIND=2,
            CAUSAL=True,
            BLOCK_D=64,
            BLOCK_DV=64,
            UPCAST=False,
            PREC="tf32",
            **config.kwargs,
        )
        signature = {}
        for name in kernel.fn.arg_names:
            if name in constants:
                signature[name] = "constexpr"
            elif name == "scale":
                signature[name] = "fp32"
            elif name[0].isupper() and name not in scalars:
                signature[name] = pointers.get(name, "*bf16")
            else:
                signature[name] = "i32"
        try:
            compiled = triton.compile(
                ASTSource(kernel.fn, signature, constants),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": config.num_warps, "num_stages": config.num_stages},
            )
        except RuntimeError as error:  # a Triton build without the NVIDIA toolchain
            if "ptxas" in str(error).lower():
                pytest.skip(f"Triton cannot assemble for sm_90 here: {error}")
            raise
        assert 0 < compiled.metadata.shared <= 228 * 1024, kernel.fn.__name__


def test_explicit_backend_that_cannot_run_here_is_refused_at_apply():
    if torch.cuda.is_available():
        pytest.skip("with CUDA present, triton and flex are valid choices for a model moved there later")
    for backend in ("triton", "flex"):
        with pytest.raises(lcaam_patch.InvalidOptionError, match=f"backend='{backend}'.*backend='auto'"):
            lcaam_patch.apply(tiny_vit(), backend=backend)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("fusion", ["mul", "add"])
@pytest.mark.parametrize("masking", ["padding-bool", "padding-float", "causal"])
def test_flex_score_mod_forward_on_cpu(fusion, masking):
    """FlexAttention has no CPU backward, so only the score_mod's forward is checked here."""
    from torch.nn.attention.flex_attention import flex_attention

    from lcaam_patch.backends.flex import _score_mod

    q, k, v, mask = (t.detach() for t in make_inputs(torch.float32, Nq=16, Nk=16 if masking == "causal" else 24))
    B, H, Nq, Nk = 2, 2, q.shape[-2], k.shape[-2]
    attn_mask, is_causal = upstream_mask(masking, B, Nq, Nk)
    keep = bias = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = attn_mask.expand(B, H, Nq, Nk)
    elif attn_mask is not None:
        bias = attn_mask.expand(B, H, Nq, Nk)
    out = flex_attention(q, k, v, score_mod=_score_mod(mask, fusion, bias, keep, is_causal), scale=0.3)
    expected, _ = lcaam_attention(
        q, k, v, mask, fusion=fusion, scale=0.3, attn_mask=attn_mask, is_causal=is_causal, backend="eager"
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@needs_cuda
@pytest.mark.parametrize("backend", ["flex", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("fusion", ["mul", "add"])
@pytest.mark.parametrize("masking", ["none", "padding-bool", "causal"])
def test_gpu_backends_match_eager(backend, fusion, masking):
    q, k, v, mask = make_inputs(torch.bfloat16, B=4, H=12, Nq=197, Nk=197, D=64, device="cuda")
    attn_mask, is_causal = upstream_mask(masking, 4, 197, 197, device="cuda")
    errors, eager_errors, _ = relative_errors(
        backend, q, k, v, mask, fusion=fusion, attn_mask=attn_mask, is_causal=is_causal
    )
    for name, err, ref in zip(["out", "dq", "dk", "dv", "dM"], errors, eager_errors):
        assert err < max(2 * ref, 2e-2), (name, err, ref)
