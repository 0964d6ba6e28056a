"""Per-head attention maps of one sequence, for ``diffv2 inspect`` (from :func:`diffv2.diagnostics.diagnose`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..diagnostics import diagnose
from ..model import Transformer


@dataclass
class LayerMaps:
    """Attention maps of one layer for the first sequence of the batch, one entry per output head.

    Baseline: ``a1`` is the map and ``effective`` equals it. DIFF V2: ``a1``/``a2`` are query heads 2i / 2i+1
    (or i / i+h with split pairing), ``weight`` σ(λ) per (head, query token), ``effective`` = a¹ − σ(λ)·a².
    DIFF V1: the two maps of each differential head, ``weight`` the layer's scalar λ.
    """

    kind: str  # the attention variant
    a1: torch.Tensor  # (heads, T, S)
    a2: torch.Tensor | None
    weight: torch.Tensor | None  # (heads, T) for DIFF V2, a 0-dim tensor for DIFF V1
    effective: torch.Tensor  # (heads, T, S)
    stats: dict[str, Any]  # the layer's diagnostics from the same pass (context_rms per head, sink_mass, ...)


@torch.no_grad()
def capture_maps(model: Transformer, tokens: torch.Tensor) -> list[LayerMaps]:
    """Per-layer maps for ``tokens`` (B, T); B should be 1 (only the first sequence is kept)."""
    out = []
    for stats in diagnose(model, tokens, keep_maps=True):
        maps = stats.pop("maps")
        weight = maps.weight
        if weight is not None:
            weight = weight[0].float() if maps.kind == "diff_v2" else weight[0, 0, 0].float()  # V1: one λ
        a2 = None if maps.a2 is None else maps.a2[0].float()
        out.append(LayerMaps(maps.kind, maps.a1[0].float(), a2, weight, maps.effective[0].float(), stats))
    return out
