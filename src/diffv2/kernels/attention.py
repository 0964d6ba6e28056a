"""The attention primitive: causal GQA attention of Hq query heads over Hkv key/value heads.

Query head j reads KV head ``j // (Hq // Hkv)`` (contiguous groups: flash-attn, SDPA ``enable_gqa`` and HF
``repeat_kv`` all use it), which is what keeps a DIFF V2 pair (2i, 2i+1) inside one GQA group.

Two backends:
- ``sdpa``: ``F.scaled_dot_product_attention(..., enable_gqa=True)``; never materialises repeated K/V. On a
  CUDA device with bf16/fp16 inputs the math kernel is excluded, so a shape no fused kernel supports fails
  loudly instead of silently running the slow, memory-hungry math path.
- ``eager``: explicit fp32 softmax over grouped queries (no repeated K/V either); can return the attention
  probabilities and logits for diagnostics.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .decode_triton import KVWindow, decode_attention_triton, triton_supported

# cuDNN first: on the H200 it ran causal prefill at ~590 TFLOP/s against ~320 for flash (DEVELOPERS.md).
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
    """For half-precision CUDA inputs, SDPA may pick only the fused kernels (in our order), never math."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and not torch.compiler.is_compiling():
        return sdpa_kernel(_fused_order, set_priority=True)
    return contextlib.nullcontext()


def _causal_mask(t: int, s: int, device: torch.device) -> torch.Tensor:
    """Boolean (t, s) mask, True = may attend, aligned bottom-right: query i sits at key position s - t + i."""
    q_pos = torch.arange(s - t, s, device=device)[:, None]
    return torch.arange(s, device=device)[None, :] <= q_pos


Mask = torch.Tensor | KVWindow | None


def as_mask(mask: Mask, t: int, s: int) -> torch.Tensor | None:
    """A boolean (B, 1, T, S) mask (or None) for any mask form, for the paths that need one."""
    return mask.to_mask(t, s) if isinstance(mask, KVWindow) else mask


def fused_decode_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, backend: str) -> bool:
    """Whether a call goes to the Triton split-KV decode kernel: a key window, few queries, a CUDA tensor."""
    return isinstance(mask, KVWindow) and backend != "eager" and q.shape[-2] <= 16 and triton_supported(q, k, v)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "sdpa",
    mask: Mask = None,
) -> torch.Tensor:
    """Causal attention. q: (B, Hq, T, d); k, v: (B, Hkv, S, d) with S >= T; returns (B, Hq, T, d).

    ``mask`` replaces the causal rule: a boolean tensor broadcastable to (B, 1, T, S) (True = may attend) or a
    :class:`KVWindow` (each row's valid key range, as a KV cache gives it). Without it queries are aligned to
    the last T key positions (the KV-cache convention), unlike SDPA's top-left ``is_causal`` when T != S.
    On CUDA a window with few queries runs the Triton split-KV kernel (each K/V head read once per GQA group);
    other masked calls run :func:`decode_attention` (few queries) or the eager path (long prompts with
    padding), since SDPA's fused kernels do not combine GQA with a mask.
    """
    t, s = q.shape[-2], k.shape[-2]
    if fused_decode_applies(q, k, v, mask, backend):
        return decode_attention_triton(q, k, v, mask.start, mask.end)
    mask = as_mask(mask, t, s)
    if backend == "eager":
        return eager_attention(q, k, v, mask=mask)[0]
    causal = mask is None
    if causal and t != s:
        causal = False  # a single query sees the whole cache; otherwise align bottom-right explicitly
        mask = None if t == 1 else _causal_mask(t, s, q.device)
    if mask is not None and q.is_cuda:
        # no fused CUDA kernel takes GQA together with an explicit mask (padding, static-cache slots)
        return decode_attention(q, k, v, mask) if t <= 16 else _masked_prefill(q, k, v, mask)
    gqa = q.shape[1] != k.shape[1]
    try:
        with _fused_only(q):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    except RuntimeError as err:
        if "No available kernel" not in str(err):
            raise
        raise RuntimeError(
            f"no fused SDPA kernel accepts q{tuple(q.shape)} k{tuple(k.shape)} {q.dtype} mask={mask is not None} "
            f"(allowed: {[b.name for b in _fused_order]}); refusing the slow math fallback. Use backend='eager' "
            "or change head_dim/dtype."
        ) from err


def _masked_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference attention in fp32 (or fp64). Returns (out, probs, logits); probs/logits: (B, Hq, T, S), masked
    logits are -inf. Queries are grouped per KV head, so K/V are read in place, never repeated."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[-2]
    if mask is None:
        mask = _causal_mask(t, s, q.device)
    wide = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for a float64 model
    qg = q.to(wide).reshape(b, hkv, hq // hkv, t, d)
    logits = torch.einsum("bhgtd,bhsd->bhgts", qg, k.to(wide)) * d**-0.5
    logits = logits.reshape(b, hq, t, s).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a fully masked row (padding) gives zeros
    out = torch.einsum("bhgts,bhsd->bhgtd", probs.reshape(b, hkv, hq // hkv, t, s), v.to(wide))
    return out.reshape(b, hq, t, v.shape[-1]).to(q.dtype), probs, logits


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Few queries over a (static) KV cache with an explicit mask (padding, unwritten slots).

    Written as broadcast-multiply + sum with fp32 accumulation so that, under ``torch.compile``, each becomes
    one fused reduction that reads every cached K/V head once for its whole query group (no repeated K/V, no
    fp32 copy of the cache). It is the reference and the CPU path, not a fast one: compiled on the H200 it read
    the cache at 2–3% of copy bandwidth (inductor split the reduction; 2026-11-30), so CUDA calls go to the
    Triton kernel whenever it takes the shapes. q: (B, Hq, T, d); k, v: (B, Hkv, S, d); mask broadcastable to
    (B, 1, T, S).
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, t, 1, d).float()
    scores = (qg * k[:, :, None, None].float()).sum(-1) * d**-0.5  # (B, Hkv, G, T, S)
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = (probs[..., None] * v[:, :, None, None].float()).sum(-2)  # (B, Hkv, G, T, d)
    return out.reshape(b, hq, t, v.shape[-1]).to(q.dtype)
