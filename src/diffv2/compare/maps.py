"""Capture per-head attention maps and DIFF subtraction weights from a model's eager diagnostic pass.

The attention modules compute the probabilities in diagnostic mode (``Transformer.diagnose``: eager softmax) and,
asked with ``keep_maps``, keep the pair maps a¹, a², the subtraction weight and the effective map they used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..attention import DiffV2Attention
from ..model import Transformer


@dataclass
class LayerMaps:
    """Attention maps of one layer for the first sequence of the batch, one entry per output head.

    Baseline: ``a1`` is the map and ``effective`` equals it. DIFF V2: ``a1``/``a2`` are query heads 2i / 2i+1
    (or i / i+h with split pairing), ``weight`` σ(λ) per (head, query token), ``effective`` = a¹ − σ(λ)·a².
    DIFF V1: the two maps of each differential head, ``weight`` the layer's scalar λ.
    """

    kind: str  # baseline | diff_v1 | diff_v2
    a1: torch.Tensor  # (heads, T, S)
    a2: torch.Tensor | None
    weight: torch.Tensor | None  # (heads, T) for DIFF V2, a 0-dim tensor for DIFF V1
    effective: torch.Tensor  # (heads, T, S)
    stats: dict[str, Any]  # the layer's diagnostics from the same pass (context_rms per head, sink_mass, ...)


@torch.no_grad()
def capture_maps(model: Transformer, tokens: torch.Tensor) -> list[LayerMaps]:
    """Per-layer maps for ``tokens`` (B, T); B should be 1 (only the first sequence is kept)."""
    out = []
    for layer, stats in zip(model.layers, model.diagnose(tokens, keep_maps=True), strict=True):
        maps = stats.pop("maps")
        kind = layer.attn.kind
        a2, weight = maps["a2"], maps["weight"]
        if kind == "diff_v2":
            weight = weight[0, ..., 0].float()  # (h, T, 1) per-token σ(λ) → (h, T)
        elif weight is not None:
            weight = weight.float()  # V1: the layer's scalar λ
        out.append(LayerMaps(kind, maps["a1"][0].float(), None if a2 is None else a2[0].float(), weight,
                             maps["effective"][0].float(), stats))  # fmt: skip
    return out


@torch.no_grad()
def sigma_lambda(model: Transformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """DIFF V2's subtraction weight σ(λ) of every layer, (B, T, h) each (empty list for other variants).

    Runs the normal (fused) forward; a pre-hook on each DIFF V2 attention module evaluates its own
    ``subtraction_weight`` on the module input, so "linear" and "none" modes come out as the model uses them.
    """
    out: list[torch.Tensor] = []
    hooks = [
        layer.attn.register_forward_pre_hook(lambda m, args: out.append(m.subtraction_weight(args[0]).float()))
        for layer in model.layers
        if isinstance(layer.attn, DiffV2Attention)
    ]
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return out
