"""Low-level ops shared by every attention variant: RoPE (PyTorch, or one Triton launch for q and k at
inference) and the attention primitive (SDPA, eager, or the Triton split-KV decode kernel)."""

from .attention import (
    Mask,
    as_mask,
    attend,
    decode_attention,
    eager_attention,
    fused_decode_applies,
    fused_sdpa_backends,
)
from .decode_triton import KVWindow, decode_attention_triton, triton_supported
from .rope import apply_rope, apply_rope_qk, rope_cos_sin

__all__ = [
    "KVWindow",
    "Mask",
    "apply_rope",
    "apply_rope_qk",
    "as_mask",
    "attend",
    "decode_attention",
    "decode_attention_triton",
    "eager_attention",
    "fused_decode_applies",
    "fused_sdpa_backends",
    "rope_cos_sin",
    "triton_supported",
]
