"""Low-level ops shared by every attention variant: RoPE and the attention primitive (SDPA or eager)."""

from .attention import attend, decode_attention, eager_attention, fused_sdpa_backends
from .rope import apply_rope, rope_cos_sin

__all__ = ["apply_rope", "attend", "decode_attention", "eager_attention", "fused_sdpa_backends", "rope_cos_sin"]
