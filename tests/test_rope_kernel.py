"""The one-launch Triton RoPE for q and k (inference) against the PyTorch ``apply_rope``.

Three tiers, as for the other kernels: the dispatcher on plain CPU (always the PyTorch path), the kernel in
Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``), and the kernel on a GPU (skipped without one).
"""

from __future__ import annotations

import os

import pytest
import torch

from diffv2.kernels import apply_rope, apply_rope_qk, rope_cos_sin
from diffv2.kernels import rope_triton as rt

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and rt.HAS_TRITON
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1")
requires_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and rt.HAS_TRITON), reason="needs CUDA and triton")
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}


def make(b, t, hq, hk, d, dtype, device="cpu", per_row=True, seed=0):
    """q as a view of a wider projection output (strided heads), k contiguous, positions per row or shared."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(b, t, hq + 3, d, generator=gen).to(device, dtype)
    q = wide[:, :, 2 : 2 + hq]
    k = torch.randn(b, t, hk, d, generator=gen).to(device, dtype)
    pos = torch.randint(0, 5000, (b if per_row else 1, t), generator=gen).to(device)
    cos, sin = rope_cos_sin(pos, d, 10000.0)
    return q, k, cos, sin


def expect_close(got, want, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_dispatcher_uses_pytorch_off_device_and_with_gradients():
    q, k, cos, sin = make(2, 5, 4, 2, 16, torch.float32)
    q.requires_grad_(True)
    got_q, got_k = apply_rope_qk(q, k, cos, sin)
    assert got_q.requires_grad  # the PyTorch path: autograd intact
    expect_close(got_q, apply_rope(q, cos, sin), torch.float32)
    expect_close(got_k, apply_rope(k, cos, sin), torch.float32)
    assert not rt.rope_triton_supported(q, k, cos)  # a gradient is wanted: never the kernel


@interpreter_only
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("b", "t", "hq", "hk", "d", "per_row"), [(2, 3, 8, 2, 16, True), (1, 1, 32, 4, 64, False), (3, 2, 6, 3, 32, True)]
)
def test_interpreter_matches_pytorch(b, t, hq, hk, d, per_row, dtype):
    q, k, cos, sin = make(b, t, hq, hk, d, dtype, per_row=per_row, seed=t)
    with torch.no_grad():
        assert rt.rope_triton_supported(q, k, cos)
        got_q, got_k = rt.rope_qk_triton(q, k, cos, sin)
    assert got_q.is_contiguous() and got_q.dtype == dtype
    expect_close(got_q, apply_rope(q, cos, sin), dtype)
    expect_close(got_k, apply_rope(k, cos, sin), dtype)


@interpreter_only
@pytest.mark.usefixtures("interpreter")
def test_interpreter_reads_q_and_k_as_views_of_one_fused_projection():
    """Generation's fused q/k/v(/λ) matmul gives q and k as column blocks of one (B, T, W) output: their rows
    are W apart, wider than the heads themselves."""
    b, t, hq, hk, d, lam = 2, 3, 8, 2, 16, 4
    fused = torch.randn(b, t, (hq + 2 * hk) * d + lam)
    q = fused[..., : hq * d].view(b, t, hq, d)
    k = fused[..., hq * d : (hq + hk) * d].view(b, t, hk, d)
    cos, sin = rope_cos_sin(torch.randint(0, 5000, (b, t)), d, 10000.0)
    with torch.no_grad():
        assert rt.rope_triton_supported(q, k, cos)
        got_q, got_k = rt.rope_qk_triton(q, k, cos, sin)
    expect_close(got_q, apply_rope(q, cos, sin), torch.float32)
    expect_close(got_k, apply_rope(k, cos, sin), torch.float32)


@interpreter_only
def test_interpreter_mismatched_shapes_take_the_pytorch_path():
    """The kernel indexes q, k and the tables by q's (B, T, d): anything else must not reach it."""
    q, k, cos, _ = make(2, 3, 4, 2, 16, torch.float32)
    with torch.no_grad():
        assert rt.rope_triton_supported(q, k, cos)
        assert not rt.rope_triton_supported(q, k[:1], cos)  # another batch
        assert not rt.rope_triton_supported(q, k[:, :2], cos)  # another length
        assert not rt.rope_triton_supported(q, k, cos[:, :2])  # tables for another length
        assert not rt.rope_triton_supported(q[..., :8], k[..., :8], cos)  # another head_dim


@interpreter_only
@pytest.mark.usefixtures("interpreter")
def test_interpreter_compile_keeps_the_pytorch_path():
    """Under torch.compile the dispatcher leaves RoPE to inductor (which fuses it with the cache write)."""
    q, k, cos, sin = make(2, 3, 4, 2, 16, torch.float32)
    calls = []
    original = rt.rope_qk_triton

    def spy(*args):
        calls.append(1)
        return original(*args)

    rt_module = __import__("diffv2.kernels.rope", fromlist=["rope_qk_triton"])
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(rt_module, "rope_qk_triton", spy)
        eager = apply_rope_qk(q, k, cos, sin)
        assert calls == [1]
        compiled = torch.compile(apply_rope_qk, backend="eager", fullgraph=True)(q, k, cos, sin)
        assert calls == [1]
    for a, b in zip(eager, compiled, strict=True):
        expect_close(a, b, torch.float32)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("b", "t", "hq", "hk", "d"), [(1, 1, 32, 4, 128), (4, 7, 16, 4, 64), (2, 300, 8, 8, 128)])
def test_gpu_matches_pytorch(b, t, hq, hk, d, dtype):
    q, k, cos, sin = make(b, t, hq, hk, d, dtype, device="cuda", seed=b)
    with torch.no_grad():
        got_q, got_k = apply_rope_qk(q, k, cos, sin)
    expect_close(got_q, apply_rope(q, cos, sin), dtype)
    expect_close(got_k, apply_rope(k, cos, sin), dtype)
