"""RoPE on q and k in one Triton launch, for inference (no autograd).

Why: in eager PyTorch :func:`~diffv2.kernels.rope.apply_rope` is seven elementwise kernels per tensor (upcast,
negate, concatenate, two products, a sum, the downcast), fourteen per layer for q and k. A batch-1 decode
step is bound by kernel launches more than by bytes (docs/benchmarks.md#batch-1-decode), so each launch saved
counts. Here one program rotates every head of one token of q and of k, in fp32, and writes both in the inputs' dtype.

Training and ``torch.compile`` keep the PyTorch version: it has autograd, and inductor fuses it (with the KV
cache write) on its own. Off CUDA (and without ``TRITON_INTERPRET=1``) nothing here runs.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

HAS_TRITON = triton is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by Triton at import, so read once here too


def rope_triton_supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether :func:`rope_qk_triton` takes these (B, T, H, d) tensors: a device Triton runs on, half or single
    precision, fp32 tables, a power-of-two head_dim, no gradient wanted."""
    if not HAS_TRITON or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        return False
    d = q.shape[-1]
    return (
        (q.is_cuda or (_INTERPRET and q.device.type == "cpu"))
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and k.dtype == q.dtype
        and cos.dtype == torch.float32
        and k.shape[:2] == q.shape[:2]
        and k.shape[-1] == d
        and cos.shape[-2:] == (q.shape[1], d)
        and cos.shape[0] in (1, q.shape[0])
        and 4 <= d <= 256
        and d & (d - 1) == 0
        and q.stride(-1) == 1
        and k.stride(-1) == 1
    )


def rope_qk_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(apply_rope(q, cos, sin), apply_rope(k, cos, sin))``: q (B, T, Hq, d), k (B, T, Hk, d), cos/sin
    (B or 1, T, d) in fp32; returns new contiguous tensors. Check :func:`rope_triton_supported` first."""
    b, t = q.shape[:2]
    cos = cos.expand(b, t, q.shape[-1])
    sin = sin.expand(b, t, q.shape[-1])
    return torch.ops.diffv2.rope_qk(q, k, cos, sin)


if HAS_TRITON:

    @triton.jit
    def _rotate(
        X,
        OUT,
        stride_xb,
        stride_xt,
        stride_xh,
        b,
        t,
        cos1,
        cos2,
        sin1,
        sin2,
        n_heads,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """out = x·cos + rotate_half(x)·sin for every head of token (b, t); rotate_half(x) = [−x2, x1]."""
        hh = tl.arange(0, BLOCK_H)
        dd = tl.arange(0, HALF)
        ok = (hh < n_heads)[:, None]
        src = X + b.to(tl.int64) * stride_xb + t * stride_xt + hh[:, None] * stride_xh + dd[None, :]
        x1 = tl.load(src, mask=ok).to(tl.float32)
        x2 = tl.load(src + HALF, mask=ok).to(tl.float32)
        dst = OUT + (b.to(tl.int64) * tl.num_programs(0) + t) * n_heads * 2 * HALF + hh[:, None] * 2 * HALF
        dst += dd[None, :]
        tl.store(dst, (x1 * cos1[None, :] - x2 * sin1[None, :]).to(OUT.dtype.element_ty), mask=ok)
        tl.store(dst + HALF, (x2 * cos2[None, :] + x1 * sin2[None, :]).to(OUT.dtype.element_ty), mask=ok)

    # A kernel's signature keeps its layout (fmt: skip), one line per role: the tensors, each tensor's strides,
    # the sizes, the compile-time constants; the launches pass them in the same order.
    @triton.jit
    def _rope_qk_kernel(
        Q, K, COS, SIN, QOUT, KOUT,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_cb, stride_ct, stride_cd,
        n_q_heads, n_k_heads,
        HALF: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        t, b = tl.program_id(0), tl.program_id(1)
        dd = tl.arange(0, HALF)
        table = b.to(tl.int64) * stride_cb + t * stride_ct
        cos1 = tl.load(COS + table + dd * stride_cd)
        cos2 = tl.load(COS + table + (dd + HALF) * stride_cd)
        sin1 = tl.load(SIN + table + dd * stride_cd)
        sin2 = tl.load(SIN + table + (dd + HALF) * stride_cd)
        _rotate(Q, QOUT, stride_qb, stride_qt, stride_qh, b, t, cos1, cos2, sin1, sin2, n_q_heads, HALF, BLOCK_Q)
        _rotate(K, KOUT, stride_kb, stride_kt, stride_kh, b, t, cos1, cos2, sin1, sin2, n_k_heads, HALF, BLOCK_K)

    @torch.library.custom_op("diffv2::rope_qk", mutates_args=())
    def _rope_qk(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, hq, d = q.shape
        hk = k.shape[2]
        q_out = torch.empty((b, t, hq, d), dtype=q.dtype, device=q.device)
        k_out = torch.empty((b, t, hk, d), dtype=k.dtype, device=k.device)
        if q_out.numel() == 0:
            return q_out, k_out
        _rope_qk_kernel[(t, b)](
            q,
            k,
            cos,
            sin,
            q_out,
            k_out,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            cos.stride(0),
            cos.stride(1),
            cos.stride(2),
            hq,
            hk,
            HALF=d // 2,
            BLOCK_Q=triton.next_power_of_2(hq),
            BLOCK_K=triton.next_power_of_2(hk),
            num_warps=4 if hq * d <= 4096 else 8,
        )
        return q_out, k_out

    @_rope_qk.register_fake
    def _(q, k, cos, sin):
        return q.new_empty(q.shape), k.new_empty(k.shape)
