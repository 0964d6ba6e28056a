"""Which keys each query may read: the causal rule, boolean masks, and a KV cache's per-row key window.

Query i of T sits at key position S − T + i (queries aligned to the last T keys: the KV-cache convention,
unlike SDPA's top-left ``is_causal`` when T != S).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class KVWindow(NamedTuple):
    """The valid keys of each row of a KV cache: ``[start[b], end[b])``, (B,) integer tensors on its device.

    For T > 1 queries the last T window slots are the queries' own keys: query t sees keys < end − (T−1) + t.
    """

    start: torch.Tensor
    end: torch.Tensor

    def to_mask(self, t: int, s: int) -> torch.Tensor:
        return window_mask(self.start, self.end, t, s)


Mask = torch.Tensor | KVWindow | None


def causal_mask(t: int, s: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, S) mask, True = may attend, aligned bottom-right."""
    q_pos = torch.arange(s - t, s, device=device)[:, None]
    return torch.arange(s, device=device)[None, :] <= q_pos


def window_mask(kv_start: torch.Tensor, kv_end: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """The boolean (B, 1, T, S) mask (True = may attend) equivalent to a key window and the causal rule."""
    keys = torch.arange(s, device=kv_end.device)
    last = kv_end[:, None] - (t - 1) + torch.arange(t, device=kv_end.device)[None, :]  # (B, T), exclusive
    mask = (keys >= kv_start[:, None, None]) & (keys < last[..., None])
    return mask[:, None]


def as_mask(mask: Mask, t: int, s: int) -> torch.Tensor | None:
    """A boolean mask broadcastable to (B, 1, T, S), or None for the plain causal rule over T == S."""
    return mask.to_mask(t, s) if isinstance(mask, KVWindow) else mask


def explicit_mask(mask: Mask, t: int, s: int, device: torch.device) -> torch.Tensor:
    """Any mask form as a boolean mask broadcastable to (B, 1, T, S), the causal rule included (as (1, 1, T, S):
    a kernel that inserts the query-group axis at dim 2 reads every form alike)."""
    mask = as_mask(mask, t, s)
    return causal_mask(t, s, device)[None, None] if mask is None else mask
