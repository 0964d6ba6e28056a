"""Low-level ops with no model knowledge: masks, RoPE, softmax attention (SDPA, eager, masked fallbacks) and the
Triton kernels (split-KV decode with an optional DIFF V2 pair epilogue; DIFF V2's fused training attention).
:mod:`diffv2.attention.dispatch` decides which of them runs a model's call."""

from .decode_triton import decode_attention_triton, triton_supported
from .diff_attn_triton import diff_attention, diff_attention_supported
from .kv_int8 import QuantizedKV, plain_kv, quantize_int8
from .masks import KVWindow, Mask, as_mask, causal_mask, explicit_mask, window_mask
from .rope import apply_rope, apply_rope_qk, rope_cos_sin
from .softmax_attention import eager_attention, fused_sdpa_backends, masked_decode, masked_prefill, sdpa_attention

__all__ = [
    "KVWindow",
    "Mask",
    "QuantizedKV",
    "apply_rope",
    "apply_rope_qk",
    "as_mask",
    "causal_mask",
    "decode_attention_triton",
    "diff_attention",
    "diff_attention_supported",
    "eager_attention",
    "explicit_mask",
    "fused_sdpa_backends",
    "masked_decode",
    "masked_prefill",
    "plain_kv",
    "quantize_int8",
    "rope_cos_sin",
    "sdpa_attention",
    "triton_supported",
    "window_mask",
]
