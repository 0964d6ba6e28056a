"""The int8 KV cache's number format (docs/design.md#kv-cache): symmetric absmax quantisation with one fp32 scale
per cached vector, i.e. per (layer, row, K/V head, slot) over its ``head_dim`` channels.

``x ≈ q·s`` with ``s = max|x| / 127`` and ``q = round(x / s)`` in [-127, 127] (round half to even), so every
element is off by at most ``s/2`` (plus ``127·2⁻²⁴·s`` from the fp32 rounding of ``x / s``). The definition of
attention over such a cache is attention over :meth:`QuantizedKV.dequantize`; the split-KV decode kernel computes
the same from the int8 tiles and their scales.
"""

from __future__ import annotations

import torch

QMAX = 127  # symmetric: -128 is never produced, so negating a quantised vector stays exact


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (..., d) → int8 values (..., d) and fp32 scales (...): the absmax of each last-dim vector over 127. An
    all-zero vector gets scale 0 and values 0."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / QMAX
    q = torch.round(xf / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp_(-QMAX, QMAX)
    return q.to(torch.int8), scale


class QuantizedKV:
    """Cached keys or values (B, Hkv, S, d) as int8 ``data`` with fp32 ``scale`` (B, Hkv, S), to be read in
    ``dtype``. ``shape``, ``dtype`` and ``device`` describe the dequantised tensor, so that a dispatch rule asking
    about shapes sees what it would see with a full-precision cache; indexing the leading (not the channel) dims
    gives a view of both (DIFF V1 takes every other head this way)."""

    __slots__ = ("data", "dtype", "scale")

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self.data, self.scale, self.dtype = data, scale, dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def is_cuda(self) -> bool:
        return self.data.is_cuda

    def __getitem__(self, index) -> QuantizedKV:
        return QuantizedKV(self.data[index], self.scale[index], self.dtype)

    def dequantize(self) -> torch.Tensor:
        """The definition: ``q·s`` in fp32, then cast to ``dtype``."""
        return (self.data.float() * self.scale[..., None]).to(self.dtype)


def int8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """``x`` as an int8 cache stores and reads it back: attention over the result is attention over that cache."""
    return QuantizedKV(*quantize_int8(x), x.dtype).dequantize()


def plain_kv(x: torch.Tensor | QuantizedKV) -> torch.Tensor:
    """``x`` as an ordinary tensor: dequantised if it is a :class:`QuantizedKV`, else as it is."""
    return x.dequantize() if isinstance(x, QuantizedKV) else x
