"""Text generation: a KV cache holding only the n_kv_heads heads, batched sampling, streaming, and the rows of
continuous batching (:class:`RowDecoder`)."""

from .cache import KVCache
from .fusion import fused_projections
from .rows import RowDecoder, bucket_sizes
from .sampling import HostCopy, generate, generate_batch, sample_next, sample_rows, stream_batch

__all__ = [
    "HostCopy",
    "KVCache",
    "RowDecoder",
    "bucket_sizes",
    "fused_projections",
    "generate",
    "generate_batch",
    "sample_next",
    "sample_rows",
    "stream_batch",
]
