"""Text generation: a KV cache holding only the n_kv_heads heads, batched sampling, streaming."""

from .cache import KVCache
from .fusion import fused_projections
from .sampling import generate, generate_batch, sample_next, stream_batch

__all__ = ["KVCache", "fused_projections", "generate", "generate_batch", "sample_next", "stream_batch"]
