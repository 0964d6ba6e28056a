"""Text generation: KV caches and sampling."""

from .cache import DynamicKVCache, new_caches
from .sampling import generate, sample_next

__all__ = ["DynamicKVCache", "generate", "new_caches", "sample_next"]
