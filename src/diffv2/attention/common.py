"""Small tensor helpers every attention module and implementation shares."""

from __future__ import annotations

import torch
from torch import nn


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to fp32; fp32/fp64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def split_pairs(heads: torch.Tensor, interleaved: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2h, ...) → the two members of each pair, (B, h, ...) each (views): heads (2i, 2i+1), or (i, i+h)."""
    if interleaved:
        return heads[:, 0::2], heads[:, 1::2]
    return heads.chunk(2, dim=1)


def plain_linear(module: nn.Module) -> bool:
    """A bias-free ``nn.Linear`` with no hooks: its output is exactly ``x @ weight.T``, so another op may compute
    it (fused with its neighbours); a wrapped or hooked one (an adapter, a probe) must see its input."""
    hooked = module._forward_hooks or module._forward_pre_hooks
    return type(module) is nn.Linear and module.bias is None and not hooked
