"""Text generation: a KV cache holding only the n_kv_heads heads, batched sampling, streaming, and the rows of
continuous batching (:class:`RowDecoder`)."""

from .cache import KVCache
from .fusion import fused_projections
from .rows import RowDecoder, bucket_sizes
from .sampling import HostCopy, generate, generate_batch, sample_next, sample_rows, stream_batch
from .text import PLAIN_CHAT_ROLES, TextCodec, TextStream, plain_chat_text

__all__ = [
    "PLAIN_CHAT_ROLES",
    "HostCopy",
    "KVCache",
    "RowDecoder",
    "TextCodec",
    "TextStream",
    "bucket_sizes",
    "fused_projections",
    "generate",
    "generate_batch",
    "plain_chat_text",
    "sample_next",
    "sample_rows",
    "stream_batch",
]
