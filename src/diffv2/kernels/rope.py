"""Rotary position embedding in the Hugging Face Llama layout (``rotate_half``), used by all variants.

The official DIFF code rotates interleaved channel pairs (GPT-J); from scratch the two layouts are equivalent
up to a fixed permutation of q/k channels that the projections absorb (docs/design.md#rope). We use rotate_half so
checkpoints map onto Llama-style models without permuting weights.
"""

from __future__ import annotations

import torch

from .rope_triton import rope_qk_triton, rope_triton_supported


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape ``positions.shape + (head_dim,)`` in ``dtype`` (fp32 or wider)."""
    exponent = torch.arange(0, head_dim, 2, dtype=dtype, device=positions.device) / head_dim
    freqs = positions.to(dtype)[..., None] * (1.0 / theta**exponent)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape (B, T, H, d) with cos/sin of shape (B or 1, T, d); math in fp32 or wider."""
    half = x.shape[-1] // 2
    xf = x.to(cos.dtype)
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (xf * cos + rotated * sin).to(x.dtype)


def apply_rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rope` on q (B, T, Hq, d) and k (B, T, Hk, d). At inference on CUDA, outside
    ``torch.compile``, one Triton launch does both (fourteen eager kernels otherwise: decode is launch-bound)."""
    if not torch.compiler.is_compiling() and rope_triton_supported(q, k, cos):
        return rope_qk_triton(q, k, cos, sin)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
