"""Softmax attention of Hq query heads over Hkv key/value heads, in plain PyTorch (the Triton kernels live beside).

Query head j reads KV head ``j // (Hq // Hkv)`` (contiguous groups: flash-attn, SDPA ``enable_gqa`` and HF
``repeat_kv`` all use it), which is what keeps a DIFF V2 pair (2i, 2i+1) inside one GQA group. Shapes: q
(B, Hq, T, d); k, v (B, Hkv, S, d) with S >= T; outputs (B, Hq, T, d). Which of these runs a model's call is
decided in :mod:`diffv2.attention.dispatch`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .masks import causal_mask

# cuDNN first: it is the fastest causal prefill kernel on Hopper (docs/benchmarks.md#sdpa-backends)
_FUSED = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
_fused_order: list[SDPBackend] = list(_FUSED)


def fused_sdpa_backends(order: list[SDPBackend] | None = None) -> list[SDPBackend]:
    """Get (and with ``order``, set) the fused SDPA kernels allowed for half-precision CUDA inputs."""
    global _fused_order
    if order is not None:
        if not order or SDPBackend.MATH in order:
            raise ValueError("fused_sdpa_backends: give at least one fused backend and not SDPBackend.MATH")
        _fused_order = list(order)
    return list(_fused_order)


def _fused_only(q: torch.Tensor) -> contextlib.AbstractContextManager:
    """For half-precision CUDA inputs, SDPA may pick only the fused kernels (in our order), never math: a shape
    no fused kernel takes fails loudly instead of silently running the slow, memory-hungry math path."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and not torch.compiler.is_compiling():
        return sdpa_kernel(_fused_order, set_priority=True)
    return contextlib.nullcontext()


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with ``enable_gqa`` (K/V never repeated); causal when ``mask`` is None."""
    t, s = q.shape[-2], k.shape[-2]
    causal = mask is None and t == s
    if mask is None and 1 < t < s:
        mask = causal_mask(t, s, q.device)  # bottom-right; a single query sees the whole cache unmasked
    try:
        with _fused_only(q):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]
            )
    except RuntimeError as err:
        if "No available kernel" not in str(err):
            raise
        raise RuntimeError(
            f"no fused SDPA kernel accepts q{tuple(q.shape)} k{tuple(k.shape)} {q.dtype} mask={mask is not None} "
            f"(allowed: {[b.name for b in _fused_order]}); refusing the slow math fallback. Use backend='eager' "
            "or change head_dim/dtype."
        ) from err


def masked_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A long masked CUDA call (a left-padded prompt): fused SDPA on K/V repeated to the query heads, since
    the fused kernels take a mask only without GQA. A padded query row, whose keys are all masked, attends to
    its own slot instead: its output is never read (no real row sees a padded key), and it stays finite
    rather than NaN, which would reach the cache and, through 0 · NaN, every row reading it."""
    t, s = q.shape[-2], k.shape[-2]
    own = torch.arange(s, device=q.device)[None, :] == torch.arange(s - t, s, device=q.device)[:, None]  # (T, S)
    mask = mask | (own & ~mask.any(dim=-1, keepdim=True))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    with _fused_only(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


LogitTransform = Callable[[torch.Tensor], torch.Tensor]


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    logit_transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit attention in fp32 (fp64 for fp64 inputs): (out, probs, logits), probs/logits (B, Hq, T, S) with
    masked logits at -inf. Queries are grouped per KV head, so K/V are read in place, never repeated.
    ``logit_transform`` maps the logits q·kᵀ/√d before the softmax (e.g. low-bit quantisation); masked positions
    reach it as -inf and must stay -inf."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[-2]
    if mask is None:
        mask = causal_mask(t, s, q.device)
    wide = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(wide).reshape(b, hkv, hq // hkv, t, d)
    logits = (torch.einsum("bhgtd,bhsd->bhgts", qg, k.to(wide)) * d**-0.5).reshape(b, hq, t, s)
    logits = logits.masked_fill(~mask, float("-inf"))
    if logit_transform is not None:
        logits = logit_transform(logits)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a fully masked row (padding) gives zeros
    out = torch.einsum("bhgts,bhsd->bhgtd", probs.reshape(b, hkv, hq // hkv, t, s), v.to(wide))
    return out.reshape(b, hq, t, v.shape[-1]).to(q.dtype), probs, logits


def masked_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Few queries over a (static) KV cache with an explicit mask (padding, unwritten slots).

    Broadcast-multiply + sum with fp32 accumulation, so that under ``torch.compile`` each becomes one fused
    reduction reading every cached K/V head once for its whole query group (no repeated K/V, no fp32 copy of
    the cache). A reference and a fallback, not a fast path: on CUDA the Triton split-KV kernel takes every
    shape it supports. Mask broadcastable to (B, 1, T, S).
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, t, 1, d).float()
    scores = (qg * k[:, :, None, None].float()).sum(-1) * d**-0.5  # (B, Hkv, G, T, S)
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = (probs[..., None] * v[:, :, None, None].float()).sum(-2)  # (B, Hkv, G, T, d)
    return out.reshape(b, hq, t, v.shape[-1]).to(q.dtype)
