"""The device side of continuous batching: a KV cache whose rows each hold one sequence at its own length.

A sequence joins by taking a free row and prefilling its prompt there alone (in chunks if long); from then on it
decodes together with every other row in one-token steps, each row writing at its own slot and reading its own
window ``[0, length)``, with its own RoPE positions. Leaving frees the row at once; nothing is moved or cleared,
since a row's window never reaches past what it wrote itself.

A step runs over the first n rows, n the smallest of a few bucket sizes that covers the highest row in use, so
a half-empty cache costs half a full one (rows are handed out lowest first). On CUDA each bucket's step is one
captured CUDA graph (:class:`~diffv2.generate.step.DecodeStep`). A row that takes no part in a step writes at
the scratch slot ``max_len - 1``, which no window ever includes: the longest sequence a row holds, ``max_len``
tokens, feeds all but its last (sampled) token back, so it writes slots ``[0, max_len - 2]`` at most.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..model import Transformer
from .cache import KVCache, check_kv_dtype
from .step import DecodeStep


def bucket_sizes(rows: int) -> list[int]:
    """Powers of two below ``rows``, then ``rows``: a step pays for at most twice the rows it needs."""
    sizes = [1]
    while sizes[-1] * 2 < rows:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, rows})


class RowDecoder:
    """``rows`` independent sequences of up to ``max_len`` tokens each (default: the model's ``max_seq_len``),
    prompt and generated tokens together, in one pre-allocated KV cache.

    :meth:`prefill` writes a chunk of one row's tokens and returns their logits; :meth:`step` feeds one token
    to each of the first n rows at per-row slots and returns the next-token logits. The model should run with
    its input projections fused for the decoder's lifetime (the captured graphs read the fused weights).
    ``cuda_graph`` (default: on CUDA) captures each bucket's step once, at construction. ``kv_cache_dtype``: the
    cache's format, ``"auto"`` (the model's dtype) or ``"int8"`` (:class:`~diffv2.generate.KVCache`).
    """

    def __init__(
        self,
        model: Transformer,
        rows: int,
        max_len: int | None = None,
        *,
        buckets: list[int] | None = None,
        cuda_graph: bool | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        param = next(model.parameters())
        self.model, self.device = model, param.device
        max_len = model.cfg.max_seq_len if max_len is None else max_len
        if rows < 1 or max_len < 2:
            raise ConfigError(f"rows={rows}, max_len={max_len}: need at least one row and two slots")
        self.buckets = sorted(set(buckets or bucket_sizes(rows)))
        if self.buckets[0] < 1 or self.buckets[-1] != rows:
            raise ConfigError(f"buckets={self.buckets}: sizes must be positive and the largest must be rows={rows}")
        self.rows, self.max_len = rows, max_len
        kv_dtype = check_kv_dtype("kv_cache_dtype", kv_cache_dtype)
        self.cache = KVCache(model.cfg, rows, max_len, dtype=param.dtype, device=self.device, kv_dtype=kv_dtype)
        cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        start = torch.zeros(rows, dtype=torch.long, device=self.device)  # no left padding: rows start at slot 0
        self.steps = {
            n: DecodeStep(model, self.cache.rows(0, n), start[:n], per_row_slots=True, cuda_graph=cuda_graph)
            for n in self.buckets
        }
        self._row_caches: dict[int, KVCache] = {}

    @property
    def scratch_slot(self) -> int:
        """Where rows that take no part in a step write: no window ever includes it."""
        return self.max_len - 1

    def bucket(self, rows_needed: int) -> int:
        """The smallest step size covering rows ``[0, rows_needed)``."""
        for n in self.buckets:
            if n >= rows_needed:
                return n
        raise ValueError(f"{rows_needed} rows: the decoder has {self.rows}")

    @torch.no_grad()
    def prefill(self, row: int, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Feed ``tokens`` (T,) to ``row`` at slots ``[start, start + T)``, after the ``start`` tokens already
        there; returns their logits (T, V). The chunk's queries see the row's earlier slots and, causally, each
        other: a prompt fed in chunks computes what it would in one forward."""
        end = start + tokens.shape[0]
        if end > self.scratch_slot:
            raise ConfigError(f"row {row}: {end} tokens leave no room to generate in {self.max_len} slots a row")
        cache = self._row_caches.get(row)
        if cache is None:
            cache = self._row_caches[row] = self.cache.rows(row, row + 1)
        slots = torch.arange(start, end, device=self.device)
        cache.advance(slots, end)  # prefix mode: attention over the row's slots [0, end), causal for the chunk
        return self.model(tokens.to(self.device)[None], positions=slots[None], caches=cache.layers)[0]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One token for each of the first n rows (n a bucket size: ``tokens`` and ``slots`` are (n,)), written at
        the row's slot and attending to its slots ``[0, slot]``; returns logits (n, V). A graphed step returns a
        buffer that the next step of the same size overwrites: consume the logits first."""
        return self.steps[tokens.shape[0]](tokens, slots)
