"""KV cache. It holds only the n_kv_heads K/V heads: DIFF V2 caches exactly what the baseline caches
(DIFF V1 too: its 2d-wide values are two KV heads side by side). Stored in the model's dtype, or as int8 with one
fp32 scale per cached vector (``kv_dtype="int8"``, docs/design.md#kv-cache)."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..kernels import KVWindow, QuantizedKV, quantize_int8

KV_DTYPES = ("auto", "int8")  # auto: the dtype the cache is built with (the model's)


def check_kv_dtype(name: str, value: str) -> str:
    """``value`` if it names a KV cache format, else a one-line ConfigError naming ``name`` (the caller's flag)."""
    if value not in KV_DTYPES:
        raise ConfigError(f"{name}={value!r}: must be one of {', '.join(KV_DTYPES)}")
    return value


class KVCache:
    """Pre-allocated K/V, one (B, n_kv_heads, max_len, head_dim) buffer per layer, written at slots.

    The generator calls :meth:`advance` before each forward with the buffer slots this step writes: (T,) slots
    shared by every row, or (B, T) slots of each row's own (rows at different lengths, as continuous batching
    keeps them; static mode only). In prefix mode (default) attention sees the filled prefix ``[:length]``
    (shapes grow: CPU, eager). In static mode it sees the whole buffer and unwritten slots are masked, so every
    decode step has the same shapes (CUDA graphs). The slots must be consecutive (they always are for a
    generator). :meth:`rows` gives a cache over some of the rows, sharing their memory.

    ``kv_dtype="int8"`` stores K/V as int8 with one fp32 scale per (layer, row, head, slot), quantised on write
    (symmetric absmax, round to nearest); attention then reads a :class:`~diffv2.kernels.QuantizedKV` in ``dtype``.
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
        kv_dtype: str = "auto",
    ) -> None:
        # Separate buffers, not views of one (n_layers, ...) tensor: under torch.compile a write into a view
        # is functionalized into a scatter over its whole base, which inductor materialized as a copy of the
        # entire cache on every step (docs/design.md#kv-cache).
        int8 = check_kv_dtype("kv_dtype", kv_dtype) == "int8"
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)

        def buffers(shape, dtype) -> list[torch.Tensor]:
            return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

        keys, values = buffers(shape, torch.int8 if int8 else dtype), buffers(shape, torch.int8 if int8 else dtype)
        scales = (buffers(shape[:3], torch.float32), buffers(shape[:3], torch.float32)) if int8 else (None, None)
        self._bind(keys, values, *scales, dtype, static)

    def _bind(self, keys, values, key_scales, value_scales, dtype: torch.dtype, static: bool) -> None:
        self.keys, self.values, self.dtype = keys, values, dtype
        self.key_scales, self.value_scales = key_scales, value_scales  # None unless int8: (B, Hkv, S) fp32 each
        self.batch, self.device = keys[0].shape[0], keys[0].device
        # the per-step state lives in a cursor that the layer views share: views pointing back at the cache would
        # make a reference cycle, and a dropped cache would hold its memory until the cyclic GC ran
        self._cursor = _Cursor(static, torch.zeros(0, dtype=torch.long, device=self.device))
        no_scales = [None] * len(keys)
        self.layers = [
            _LayerView(self._cursor, *layer, dtype)
            for layer in zip(keys, values, key_scales or no_scales, value_scales or no_scales, strict=True)
        ]

    @property
    def kv_dtype(self) -> str:
        return "auto" if self.key_scales is None else "int8"

    def rows(self, start: int, stop: int, *, static: bool = False) -> KVCache:
        """A cache over rows ``[start, stop)`` of this one: the same memory (views, no copy), its own slots and
        mode. Continuous batching decodes the first n rows together and prefills one row alone this way."""
        if not 0 <= start < stop <= self.batch:
            raise ValueError(f"rows [{start}, {stop}) are not inside the cache's {self.batch} rows")
        view = KVCache.__new__(KVCache)
        rows = [None if ts is None else [t[start:stop] for t in ts] for ts in self._buffers()]
        view._bind(*rows, self.dtype, static)
        return view

    def _buffers(self) -> tuple[list[torch.Tensor] | None, ...]:
        return self.keys, self.values, self.key_scales, self.value_scales

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
        """Bytes of every buffer: ``2·L·B·Hkv·S·d·e`` at ``e`` bytes an element, or for int8
        ``2·L·B·Hkv·S·(d + 4)`` (a byte an element and an fp32 scale per vector)."""
        return sum(t.numel() * t.element_size() for ts in self._buffers() if ts is not None for t in ts)


class _Cursor:
    """What the current step writes (``slots``) and sees (``length`` in prefix mode; all slots when ``static``)."""

    def __init__(self, static: bool, slots: torch.Tensor) -> None:
        self.static, self.slots, self.length = static, slots, 0


class _LayerView:
    def __init__(self, cursor: _Cursor, keys, values, key_scales, value_scales, dtype: torch.dtype) -> None:
        self.cursor, self.dtype = cursor, dtype
        self.buffers = (keys, values) if key_scales is None else (keys, values, key_scales, value_scales)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """Writes this step's K/V at the cursor's slots; returns what attention reads: the K/V tensors, or for
        an int8 cache the two :class:`~diffv2.kernels.QuantizedKV` (quantised on write, read in ``dtype``)."""
        c, buffers = self.cursor, self.buffers
        new = (k, v) if len(buffers) == 2 else (*quantize_int8(k), *quantize_int8(v))
        new = (new[0], new[2], new[1], new[3]) if len(buffers) == 4 else new  # keys, values, then their scales
        for buffer, x in zip(buffers, new, strict=True):
            if c.slots.dim() == 2:  # each row writes its own slots: (B, T) -> an index per (row, head, slot, ...)
                index = c.slots[:, None, :, None] if x.dim() == 4 else c.slots[:, None, :]
                buffer.scatter_(2, index.expand(x.shape), x.to(buffer.dtype))
            else:
                buffer.index_copy_(2, c.slots, x.to(buffer.dtype))
        read = buffers if c.static else [t[:, :, : c.length] for t in buffers]
        if len(read) == 2:
            return read[0], read[1]
        return QuantizedKV(read[0], read[2], self.dtype), QuantizedKV(read[1], read[3], self.dtype)
