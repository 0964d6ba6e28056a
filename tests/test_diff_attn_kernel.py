"""The fused DIFF V2 training kernel (``diffv2.kernels.diff_attn_triton``) against a float64 head-by-head reference.

Three tiers, so that CI without a GPU stays green and fast:
- always: the argument checks;
- ``TRITON_INTERPRET=1`` with triton installed: the Triton kernels themselves on CPU tensors (fp32, fp16, bf16;
  the fixture below makes the 3.6 interpreter compute bf16 dots on values rather than on the raw uint16 bits);
- CUDA: bf16 at training shapes, fp32, and torch.compile(fullgraph=True) with the backward.
"""

from __future__ import annotations

import os

import pytest
import torch

from diffv2.kernels import diff_attn_triton as da

from . import reference as ref64

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and da.HAS_TRITON
CUDA = torch.cuda.is_available() and da.HAS_TRITON
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1")
requires_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and triton")


# |err| <= atol + rtol·max|ref| per tensor: a DIFF V2 difference and the gradients can cancel, so rtol is taken
# against the largest reference value. Half precision: measured ~1 unit in the last place of the largest value
# (probabilities and dS enter the products in that dtype, results are rounded to it), so rtol ~2.5x that. The
# atol covers T = 1, where dq and dk are exactly zero but delta = Σ dout·o comes from the rounded outputs.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 2e-5),
    torch.float16: (3e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def reference(q, k, v, w, scale=None):
    """The float64 head-by-head reference (differentiable): causal attention, then the pair subtraction."""
    return ref64.subtract_pairs(ref64.gqa_attention(q, k, v, None, scale), w)


def make_leaves(b, hq, hkv, t, d, dtype, device="cpu", seed=0):
    """Leaf tensors in the model's layouts: q/k/v (B, T, H, d), λ (B, T, h); fp32 σ(λ) weights."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=gen)
    k = torch.randn(b, t, hkv, d, generator=gen)
    v = torch.randn(b, t, hkv, d, generator=gen)
    lam = torch.randn(b, t, hq // 2, generator=gen)
    return [x.to(device, dtype if x is not lam else torch.float32).requires_grad_() for x in (q, k, v, lam)]


def run(fn, leaves, seed=1, **kwargs):
    """Output and gradients w.r.t. the leaves of ``fn`` on head-major views (strided, as in the model)."""
    q, k, v, lam = leaves
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), torch.sigmoid(lam).transpose(1, 2), **kwargs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    return out, torch.autograd.grad(out, leaves, dout)


def check(got, ref, dtype, what="out"):
    atol, rtol = TOL[dtype]
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double().cpu() - ref.double().cpu()).abs().max().item()  # the reference's output is on the CPU
    bound = atol + rtol * ref.abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e} ({dtype})"


def check_all(fn, leaves, dtype, scale=None):
    out, grads = run(fn, leaves, scale=scale)
    ref, ref_grads = run(reference, leaves, scale=scale)
    assert out.dtype == leaves[0].dtype
    check(out, ref, dtype)
    for name, g, r in zip(("dq", "dk", "dv", "dλ"), grads, ref_grads, strict=True):
        check(g, r, dtype, name)


# ---------------------------------------------------------------- always


@pytest.mark.skipif(INTERPRET or CUDA, reason="here Triton can run the kernel")
def test_refuses_inputs_triton_cannot_run():
    q, k, v, lam = make_leaves(1, 4, 2, 8, 16, torch.float32)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), torch.sigmoid(lam).transpose(1, 2))
    assert not da.diff_attention_supported(*args[:3])
    with pytest.raises(ValueError, match="diff_attention_supported"):
        da.diff_attention(*args)


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        ({"q": (2, 5, 8, 16)}, "q must be"),  # odd head count
        ({"q": (2, 8, 16)}, "q must be"),
        ({"k": (2, 3, 8, 16), "v": (2, 3, 8, 16)}, "k must be"),  # 8 heads over 3 KV heads
        ({"k": (2, 8, 8, 16), "v": (2, 8, 8, 16)}, "k must be"),  # odd group size: a pair would straddle groups
        ({"k": (2, 2, 9, 16), "v": (2, 2, 9, 16)}, "k must be"),  # S != T
        ({"v": (2, 2, 8, 32)}, "v must"),
        ({"w": (2, 8, 8)}, "w must be"),
        ({"w": (2, 8, 4)}, "w must be"),
    ],
)
def test_rejects_bad_shapes(shapes, match):
    sizes = {"q": (2, 8, 8, 16), "k": (2, 2, 8, 16), "v": (2, 2, 8, 16), "w": (2, 4, 8)} | shapes
    args = [torch.zeros(sizes[name]) for name in ("q", "k", "v", "w")]
    with pytest.raises(ValueError, match=match):
        da.diff_attention(*args)


def test_supported():
    q, k, v = torch.zeros(1, 4, 8, 32), torch.zeros(1, 2, 8, 32), torch.zeros(1, 2, 8, 32)
    assert da.diff_attention_supported(q, k, v) == INTERPRET  # plain CPU: never the kernel
    assert not da.diff_attention_supported(q.double(), k.double(), v.double())
    assert not da.diff_attention_supported(q[..., :24], k[..., :24], v[..., :24])  # not a power of two
    q256, kv256 = torch.zeros(1, 4, 8, 256), torch.zeros(1, 2, 8, 256)
    assert not da.diff_attention_supported(q256, kv256, kv256)


# ---------------------------------------------------------------- Triton interpreter (CPU)

CASES = [  # (B, 2h, h_kv, T, d): 1 and 2 pairs per group; T = 1, below, across and on the 16-token blocks
    (2, 4, 2, 17, 16),
    (1, 8, 2, 64, 32),
    (2, 8, 4, 1, 16),
    (1, 8, 1, 23, 16),
]


@interpreter_only
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_interpreter_matches_reference(case, dtype):
    b, hq, hkv, t, d = case
    leaves = make_leaves(b, hq, hkv, t, d, dtype, seed=t)
    assert da.diff_attention_supported(*(x.transpose(1, 2) for x in leaves[:3]))
    check_all(da.diff_attention, leaves, dtype)


@interpreter_only
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize(("fwd", "dkdv", "dq"), [((32, 16), (16, 32), (32, 16)), ((16, 32), (32, 16), (16, 32))])
def test_interpreter_unequal_blocks_and_scale(monkeypatch, fwd, dkdv, dq):
    """Query and key blocks of different sizes: the masked diagonal spans several blocks of one kind."""
    monkeypatch.setattr(da, "INTERPRET_BLOCKS", {"fwd": fwd, "dkdv": dkdv, "dq": dq})
    check_all(da.diff_attention, make_leaves(2, 8, 2, 50, 16, torch.float32, seed=5), torch.float32, scale=0.3)


@interpreter_only
@pytest.mark.usefixtures("interpreter")
def test_interpreter_layouts_and_determinism():
    """out is a transposed (B, T, h, d) buffer; gradients keep their inputs' layouts; reruns are bitwise equal."""
    leaves = make_leaves(2, 8, 2, 40, 16, torch.float32, seed=6)
    out, grads = run(da.diff_attention, leaves)
    assert out.transpose(1, 2).is_contiguous()
    for g, leaf in zip(grads, leaves, strict=True):
        assert g.stride() == leaf.stride()
    out2, grads2 = run(da.diff_attention, leaves)
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))


@interpreter_only
@pytest.mark.usefixtures("interpreter")
def test_interpreter_ops_take_strided_head_dim():
    """The ops themselves (as inductor may call them) accept q/k/v/dout whose head dim is not unit-stride."""
    q, k, v, lam = (x.detach() for x in make_leaves(1, 4, 2, 19, 16, torch.float32, seed=9))
    w = torch.sigmoid(lam).transpose(1, 2)
    q, k, v = (x.permute(0, 2, 3, 1).contiguous().mT for x in (q, k, v))  # (B, H, T, d) stored as (B, H, d, T)
    assert q.stride(-1) == 19
    out, o2, lse = torch.ops.diffv2.diff_attn_fwd(q, k, v, w, 0.25)
    check(out, reference(q, k, v, w, scale=0.25), torch.float32)
    dout = torch.randn(1, 2, 16, 19).mT  # (B, h, T, d) with d strided
    grads = torch.ops.diffv2.diff_attn_bwd(dout, q, k, v, w, out, o2, lse, 0.25)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, w)]
    ref_grads = torch.autograd.grad(reference(*leaves, scale=0.25), leaves, dout)
    for name, g, r in zip(("dq", "dk", "dv", "dw"), grads, ref_grads, strict=True):
        check(g, r, torch.float32, name)


@interpreter_only
@pytest.mark.usefixtures("interpreter")
def test_interpreter_opcheck():
    """Schema, fake impls, autograd registration and AOT dispatch of both custom ops."""
    q, k, v, lam = (x.detach() for x in make_leaves(1, 4, 2, 9, 16, torch.float32, seed=7))
    q, k, v, w = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), torch.sigmoid(lam).transpose(1, 2)
    args = [x.requires_grad_() for x in (q, k, v, w)]
    torch.library.opcheck(torch.ops.diffv2.diff_attn_fwd.default, (*args, 0.25))
    out, o2, lse = torch.ops.diffv2.diff_attn_fwd(q.detach(), k.detach(), v.detach(), w.detach(), 0.25)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), w.detach(), out, o2, lse, 0.25)
    torch.library.opcheck(torch.ops.diffv2.diff_attn_bwd.default, bwd_args)


@interpreter_only
@pytest.mark.usefixtures("interpreter")
def test_interpreter_dynamo_fullgraph():
    """The custom ops trace without a graph break, forward and backward (AOT autograd)."""
    leaves = make_leaves(2, 8, 2, 20, 16, torch.float32, seed=8)

    def fn(q, k, v, w):
        return da.diff_attention(q, k, v, w) * 2

    out, grads = run(torch.compile(fn, backend="aot_eager", fullgraph=True), leaves)
    ref, ref_grads = run(fn, leaves)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def _model_pair(device: str, dtype: torch.dtype, d: int, max_seq_len: int = 64):
    """The same DIFF V2 weights with backend "sdpa" and backend "triton" (the fused kernel where it applies)."""
    from diffv2 import ModelConfig, Transformer

    cfg = ModelConfig(
        vocab_size=64,
        d_model=4 * d,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=d,
        ffn_hidden=64,
        max_seq_len=max_seq_len,
    )
    torch.manual_seed(0)
    sdpa = Transformer(cfg).to(device, dtype)
    fused = Transformer(cfg.replace(backend="triton")).to(device, dtype)
    fused.load_state_dict(sdpa.state_dict())
    return sdpa, fused


def _loss_and_grads(model, tokens):
    model.zero_grad()
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}


@interpreter_only
@pytest.mark.usefixtures("interpreter")
def test_interpreter_model_trains_through_the_kernel():
    """backend="triton" routes DIFF V2's training attention through the kernel: same loss and gradients
    (including lambda_proj's, through dw) as the SDPA path."""
    from diffv2.attention import traced_routes

    sdpa, fused = _model_pair("cpu", torch.float32, 16)
    tokens = torch.randint(0, 64, (2, 21))
    loss_a, grads_a = _loss_and_grads(sdpa, tokens)
    with traced_routes() as taken:
        loss_b, grads_b = _loss_and_grads(fused, tokens)
    assert taken == ["diff_v2_fused_kernel"] * 2  # one per layer
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("t", [128, 1000, 2048])
def test_gpu_bf16_matches_reference(t, d):
    leaves = make_leaves(2, 16, 4, t, d, torch.bfloat16, device="cuda", seed=t + d)
    check_all(da.diff_attention, leaves, torch.bfloat16)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize(("hq", "hkv", "t", "d"), [(8, 2, 300, 64), (4, 2, 77, 128), (32, 8, 65, 64)])
def test_gpu_fp32_and_fp16_match_reference(hq, hkv, t, d):
    for dtype in (torch.float32, torch.float16):
        check_all(da.diff_attention, make_leaves(2, hq, hkv, t, d, dtype, device="cuda", seed=t), dtype, scale=0.1)


@pytest.mark.gpu
@requires_gpu
def test_gpu_compile_fullgraph():
    leaves = make_leaves(2, 16, 4, 1000, 128, torch.bfloat16, device="cuda", seed=3)

    def fn(q, k, v, w):
        return da.diff_attention(q, k, v, w).float().square()

    out, grads = run(torch.compile(fn, fullgraph=True), leaves)
    ref, ref_grads = run(lambda q, k, v, w: reference(q, k, v, w).square(), leaves)
    check(out, ref, torch.bfloat16)
    for name, g, r in zip(("dq", "dk", "dv", "dλ"), grads, ref_grads, strict=True):
        check(g, r, torch.bfloat16, name)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_model_training_step_matches_sdpa(d):
    sdpa, fused = _model_pair("cuda", torch.bfloat16, d, max_seq_len=256)
    tokens = torch.randint(0, 64, (4, 257), device="cuda")
    (loss_a, grads_a), (loss_b, grads_b) = _loss_and_grads(sdpa, tokens), _loss_and_grads(fused, tokens)
    torch.testing.assert_close(loss_b.float(), loss_a.float(), rtol=2e-2, atol=2e-2)
    for name, g in grads_a.items():
        scale = g.abs().max().clamp(min=1e-6)
        assert (grads_b[name] - g).abs().max() / scale < 5e-2, name
