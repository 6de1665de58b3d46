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


def record_launches(monkeypatch: pytest.MonkeyPatch) -> list:
    """Make every Triton launch append itself to the returned list before it runs."""
    from lcaam_patch.backends.triton import ops

    launches = []
    run = ops.Launch.run

    def recording_run(launch, interpret):
        launches.append(launch)
        run(launch, interpret)

    monkeypatch.setattr(ops.Launch, "run", recording_run)
    return launches


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_triton_pads_rows_of_m_and_dm_to_16_in_storage_and_masks_by_the_true_nk(monkeypatch):
    """Nk = 37: the kernels read M and write the fp32 dM with row stride 48, a batch-shared M stays
    shared (batch stride 0), rowsum(dO·O) is a kernel, and the results are still exact."""
    launches = record_launches(monkeypatch)
    q, k, v, _ = make_inputs(torch.float32, Nq=20, Nk=37)
    shared = (1 + torch.randn(1, 20, 37)).requires_grad_()
    errors, _, got = relative_errors("triton", q, k, v, shared, fusion="mul", attn_mask=None, is_causal=False)
    assert max(errors) < 1e-5, errors
    assert got[4].shape == shared.shape
    assert [launch.kernel for launch in launches] == ["_fwd", "_bwd_delta", "_bwd_dkdv_dm", "_bwd_dq"]
    fwd, _, dkdv, dq = launches
    for launch in (fwd, dkdv, dq):
        m = launch.args[3]
        assert m.shape == (2, 20, 37) and m.stride() == (0, 48, 1)
    dm = dkdv.args[10]
    assert dm.dtype == torch.float32 and dm.shape == (2, 20, 48)


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_triton_reads_an_aligned_m_in_place_and_never_its_padding(monkeypatch):
    """An M whose rows are already 16-aligned is not copied; NaN in its padding changes nothing."""
    launches = record_launches(monkeypatch)
    q, k, v, _ = make_inputs(torch.float32, Nq=20, Nk=37)
    storage = torch.full((2, 20, 48), float("nan"))
    storage[..., :37] = 1 + torch.randn(2, 20, 37)
    mask = storage[..., :37].requires_grad_()
    errors, _, got = relative_errors("triton", q, k, v, mask, fusion="add", attn_mask=None, is_causal=False)
    assert max(errors) < 1e-5, errors
    assert all(torch.isfinite(g).all() for g in got)
    assert launches[0].args[3].data_ptr() == storage.data_ptr()


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_triton_per_head_bias_offsets_past_2_to_the_31():
    """A bool upstream mask whose head stride times the head index passes 2³¹ elements (as a
    (1, H, N, N) bias does once H·N² > 2³¹) is read at the right place, not at a wrapped offset.
    The 2 GiB it spans are reserved, not written: only the 3 heads' 16×16 blocks are touched."""
    H, N, head_stride = 3, 16, 2**30
    storage = torch.empty(2 * head_stride + N * N, dtype=torch.bool)
    keep = storage.as_strided((1, H, N, N), (0, head_stride, N, 1))
    for h in range(H):
        keep[0, h] = torch.rand(N, N) < 0.6
        keep[0, h, :, h] = True  # every query keeps a key
    q, k, v, mask = make_inputs(torch.float32, B=1, H=H, Nq=N, Nk=N)
    errors, _, _ = relative_errors("triton", q, k, v, mask, fusion="mul", attn_mask=keep, is_causal=False)
    assert max(errors) < 1e-5, errors


@needs_triton
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_triton_backward_is_bitwise_deterministic(device, monkeypatch):
    """dM is summed over heads by read-modify-write in the kernel: two identical backward passes
    must give bitwise-identical dM (and dQ, dK, dV); on the CPU under the interpreter."""
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    B, H, N, D = (2, 3, 37, 32) if device == "cpu" else (8, 12, 197, 64)
    q, k, v, mask = make_inputs(torch.bfloat16, B=B, H=H, Nq=N, Nk=N, D=D, device=device)
    attn_mask, _ = upstream_mask("padding-bool", B, N, N, device=device)
    grad = torch.randn(B, H, N, D, device=device).to(torch.bfloat16)

    def gradients():
        out, _ = lcaam_attention(q, k, v, mask, fusion="mul", scale=D**-0.5, attn_mask=attn_mask, backend="triton")
        return torch.autograd.grad(out, (q, k, v, mask), grad)

    first, second = gradients(), gradients()
    assert first[3].abs().sum() > 0
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_triton_refusal_needs_no_lookup_and_compiles_as_one_graph(monkeypatch):
    """`refusal` looks nothing up per call (Triton's presence is read once, at import), so a
    patched ViT compiles as one graph (fullgraph: a graph break raises) with the kernel's op
    once per block, and its compiled forward and backward (the ops' fake implementations
    traced by AOTAutograd) match eager."""
    import importlib.util

    def no_lookup(*args, **kwargs):
        raise AssertionError("a filesystem lookup per call")

    q, k, v, mask = make_inputs(torch.float32)
    call = AttentionCall(q, k, v, mask, fusion="mul", scale=1.0)
    with monkeypatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", no_lookup)
        assert lcaam_patch.backends.get_backend("triton").refusal(call) is None

    reference = lcaam_patch.apply(tiny_vit(), fusion="mul", init="default", backend="eager")
    model = lcaam_patch.apply(tiny_vit(), fusion="mul", init="default", backend="triton")
    model.load_state_dict(reference.state_dict())
    graphs = []

    def recording_aot_eager(graph, example_inputs):
        graphs.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    torch._dynamo.reset()
    images = torch.randn(2, 3, 16, 16)
    got = torch.compile(model, backend=recording_aot_eager, fullgraph=True)(images)
    expected = reference(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)
    (graph,) = graphs
    ops = [n for n in graph.graph.nodes if "lcaam.fused_attention_fwd" in str(n.target)]
    assert len(ops) == 2  # one per block
    assert [s.last_backend for _, _, s in lcaam_patch.patched_sites(model)] == ["triton", "triton"]


def test_triton_refuses_a_triton_older_than_declared():
    from lcaam_patch.backends.triton import triton_refusal

    assert "not installed" in triton_refusal(False, None)
    assert ">= 3.4, and 3.2.0 is installed" in triton_refusal(True, "3.2.0")
    assert triton_refusal(True, "3.4.0+git5389ed79") is None
    assert triton_refusal(True, "3.8.0") is None
    assert triton_refusal(True, None) is None


@needs_triton
@pytest.mark.slow
def test_triton_kernels_compile_for_hopper_as_a_real_launch_specialises_them():
    """Every kernel and autotune configuration lowers to sm_90 machine code within H100's shared
    memory, compiled from the arguments the host passes at ViT-B/16 shapes (bf16, N = 197, timm's
    qkv views, bool mask) with Triton's own JIT specialisation: stride-1 arguments become
    constants, 16-divisible ones and aligned pointers get divisibility hints, as on a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from lcaam_patch.backends.triton import ops

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    B, H, N, D = 2, 12, 197, 64
    q, k, v = torch.randn(B, N, 3, H, D).to(torch.bfloat16).permute(2, 0, 3, 1, 4).unbind(0)
    mask = torch.randn(B, N, N).to(torch.bfloat16)
    keep = torch.ones(B, 1, N, N, dtype=torch.bool).expand(B, H, N, N)
    m = ops.kernel_mask(mask, mask.new_empty(ops.mask_store_shape(mask)))
    scale = D**-0.5
    fwd, out, lse = ops.forward_launch(q, k, v, m, keep, True, False, scale, interpret=False)
    grad = torch.randn_like(out)
    bwd, _ = ops.backward_launches(grad, q, k, v, m, keep, out, lse, True, False, scale, interpret=False)
    module = ops.kernels(interpret=False)
    compiled_count = 0
    for launch in [fwd, *bwd]:
        kernel = getattr(module, launch.kernel)
        autotuned = isinstance(kernel, triton.runtime.Autotuner)
        fn = kernel.fn if autotuned else kernel
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        for config in kernel.configs if autotuned else [triton.Config({})]:
            kwargs = {**launch.kwargs, **config.all_kwargs()}
            bound, specialization, options = binder(*launch.args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            index = {name: (i,) for i, name in enumerate(fn.arg_names)}
            unit = {"sqd", "skd", "svd", "sod", "sdod", "smn", "sbn", "sdkd", "sdvd", "sdqd"} & set(index)
            assert all(constexprs[index[name]] == 1 for name in unit), launch.kernel
            aligned = {"smm", "smb", "sdmm", "sdmb"} & set(index)
            assert all(attrs[index[name]] == [["tt.divisibility", 16]] for name in aligned), launch.kernel
            try:
                compiled = triton.compile(
                    ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
                )
            except RuntimeError as error:  # a Triton build without the NVIDIA toolchain
                if "ptxas" in str(error).lower():
                    pytest.skip(f"Triton cannot assemble for sm_90 here: {error}")
                raise
            assert 0 < compiled.metadata.shared <= 228 * 1024, (launch.kernel, config)
            compiled_count += 1
    assert compiled_count == 1 + sum(len(getattr(module, n).configs) for n in ("_fwd", "_bwd_dkdv_dm", "_bwd_dq"))


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
