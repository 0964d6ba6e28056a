"""KV cache. It holds only the n_kv_heads K/V heads: DIFF V2 caches exactly what the baseline caches
(DIFF V1 too: its 2d-wide values are two KV heads side by side)."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..kernels import KVWindow


class KVCache:
    """Pre-allocated K/V, one (B, n_kv_heads, max_len, head_dim) buffer per layer, written at slots.

    The generator calls :meth:`advance` before each forward with the buffer slots this step writes: (T,) slots
    shared by every row, or (B, T) slots of each row's own (rows at different lengths, as continuous batching
    keeps them; static mode only). In prefix mode (default) attention sees the filled prefix ``[:length]``
    (shapes grow: CPU, eager). In static mode it sees the whole buffer and unwritten slots are masked, so every
    decode step has the same shapes (CUDA graphs). The slots must be consecutive (they always are for a
    generator). :meth:`rows` gives a cache over some of the rows, sharing their memory.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        static: bool = False,
    ) -> None:
        # Separate buffers, not views of one (n_layers, ...) tensor: under torch.compile a write into a view
        # is functionalized into a scatter over its whole base, which inductor materialized as a copy of the
        # entire cache on every step (docs/design.md#kv-cache).
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self._bind(keys, values, static)

    def _bind(self, keys: list[torch.Tensor], values: list[torch.Tensor], static: bool) -> None:
        self.keys, self.values = keys, values
        self.batch, self.device = keys[0].shape[0], keys[0].device
        # the per-step state lives in a cursor that the layer views share: views pointing back at the cache would
        # make a reference cycle, and a dropped cache would hold its memory until the cyclic GC ran
        self._cursor = _Cursor(static, torch.zeros(0, dtype=torch.long, device=self.device))
        self.layers = [_LayerView(self._cursor, k, v) for k, v in zip(keys, values, strict=True)]

    def rows(self, start: int, stop: int, *, static: bool = False) -> KVCache:
        """A cache over rows ``[start, stop)`` of this one: the same memory (views, no copy), its own slots and
        mode. Continuous batching decodes the first n rows together and prefills one row alone this way."""
        if not 0 <= start < stop <= self.batch:
            raise ValueError(f"rows [{start}, {stop}) are not inside the cache's {self.batch} rows")
        view = KVCache.__new__(KVCache)
        view._bind([k[start:stop] for k in self.keys], [v[start:stop] for v in self.values], static)
        return view

    @property
    def static(self) -> bool:
        return self._cursor.static

    @static.setter
    def static(self, value: bool) -> None:
        self._cursor.static = value

    @property
    def slots(self) -> torch.Tensor:
        return self._cursor.slots

    @property
    def length(self) -> int:
        return self._cursor.length

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def advance(self, slots: torch.Tensor, length: int) -> None:
        """This step writes ``slots`` (T,), or each row its own ``slots`` (B, T) in static mode, and, in prefix
        mode, attends to the first ``length`` slots."""
        if length > self.max_len:
            raise ConfigError(f"KV cache full: {length} slots needed, {self.max_len} allocated")
        if slots.dim() == 2 and (slots.shape[0] != self.batch or not self.static):
            raise ValueError(f"per-row slots {tuple(slots.shape)}: need static mode and one row per cache row")
        self._cursor.slots, self._cursor.length = slots, length

    def window(self, start: torch.Tensor | None) -> KVWindow | None:
        """The valid slots of each row for the current step: ``[start[b], last slot written + 1)``, hiding each row's
        left padding (slots before ``start[b]``) and, in static mode, the slots not written yet; the step's
        queries see their own slots causally. ``None`` when the default causal rule is already exact (prefix
        mode, no padding). Built from tensors only (no host sync), so a CUDA graph can capture it."""
        if not self.static and start is None:
            return None
        begin = start if start is not None else torch.zeros(self.batch, dtype=torch.long, device=self.device)
        # contiguous here, once per step: the kernel reads element b at offset b, and every layer would copy it
        last = self.slots[..., -1:].reshape(-1)  # (1,) shared by every row, or (B,) with per-row slots
        return KVWindow(begin, (last + 1).expand(self.batch).contiguous())

    def mask(self, start: torch.Tensor | None) -> torch.Tensor | None:
        """:meth:`window` as a boolean (B, 1, T, S) mask."""
        window = self.window(start)
        t = self.slots.shape[-1]
        return None if window is None else window.to_mask(t, self.max_len if self.static else self.length)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class _Cursor:
    """What the current step writes (``slots``) and sees (``length`` in prefix mode; all slots when ``static``)."""

    def __init__(self, static: bool, slots: torch.Tensor) -> None:
        self.static, self.slots, self.length = static, slots, 0


class _LayerView:
    def __init__(self, cursor: _Cursor, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.cursor, self.keys, self.values = cursor, keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, keys, values = self.cursor, self.keys, self.values
        if c.slots.dim() == 2:  # each row writes its own slots: (B, T) -> an index per (row, head, slot, channel)
            keys.scatter_(2, c.slots[:, None, :, None].expand(k.shape), k.to(keys.dtype))
            values.scatter_(2, c.slots[:, None, :, None].expand(v.shape), v.to(values.dtype))
        else:
            keys.index_copy_(2, c.slots, k.to(keys.dtype))
            values.index_copy_(2, c.slots, v.to(values.dtype))
        if c.static:
            return keys, values
        return keys[:, :, : c.length], values[:, :, : c.length]
