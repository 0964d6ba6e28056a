"""KV caches. They hold only the n_kv_heads K/V heads: DIFF V2 caches exactly what the baseline caches."""

from __future__ import annotations

import torch

from ..model import Transformer


class DynamicKVCache:
    """One layer's cache that grows by concatenation (simple; for CPU and short generations)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


def new_caches(model: Transformer) -> list[DynamicKVCache]:
    return [DynamicKVCache() for _ in model.layers]
