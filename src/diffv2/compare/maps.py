"""Capture per-head attention maps and DIFF subtraction weights from a model's eager diagnostic pass.

The attention modules already compute the probabilities in diagnostic mode (``stats`` given → eager softmax) but
only keep summaries of them. :func:`capture_maps` shadows each module's ``attend`` method on the instance for the
duration of one pass, so the maps are exactly the ones the forward used, and a forward pre-hook keeps the module
input x, from which DIFF V2's σ(λ) is recomputed with the module's own ``subtraction_weight``. Nothing in
attention.py changes and the model is left as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import BaselineAttention, DiffV1Attention, DiffV2Attention
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


@contextlib.contextmanager
def _recording(model: Transformer) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    seen: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.layers):
        attn, slot = layer.attn, seen.setdefault(i, {})
        original = attn.attend  # the bound class method; the instance attribute below shadows it

        def attend(q, k, v, mask, stats, original=original, slot=slot):
            out, probs = original(q, k, v, mask, stats)
            if probs is not None and "probs" not in slot:  # V1's second call (swapped values) has no stats
                slot["probs"] = probs.detach()
            return out, probs

        attn.attend = attend
        handles.append(attn.register_forward_pre_hook(lambda _m, args, slot=slot: slot.update(x=args[0].detach())))
    try:
        yield seen
    finally:
        for layer in model.layers:
            vars(layer.attn).pop("attend", None)
        for handle in handles:
            handle.remove()


@torch.no_grad()
def capture_maps(model: Transformer, tokens: torch.Tensor) -> list[LayerMaps]:
    """Per-layer maps for ``tokens`` (B, T); B should be 1 (only the first sequence is kept)."""
    with _recording(model) as seen:
        stats = model.diagnose(tokens)
    return [_layer_maps(layer.attn, seen[i], stats[i]) for i, layer in enumerate(model.layers)]


def _layer_maps(attn: torch.nn.Module, seen: dict[str, torch.Tensor], stats: dict[str, Any]) -> LayerMaps:
    probs = seen["probs"].float()
    if isinstance(attn, DiffV2Attention):
        a1, a2 = attn.split_pairs(probs)
        weight = attn.subtraction_weight(seen["x"]).transpose(1, 2).float()  # (B, h, T)
        return LayerMaps("diff_v2", a1[0], a2[0], weight[0], (a1 - weight[..., None] * a2)[0], stats)
    if isinstance(attn, DiffV1Attention):
        # The module regroups its queries as (KV group g, member s, head r in group) before attending; undo it
        # so differential head i = g·rep + r gets its pair of maps (s = 0, 1), as DiffV1Attention.mix does.
        b, _, t, s = probs.shape
        groups, rep = attn.n_kv_heads // 2, attn.n_heads // attn.n_kv_heads
        p = probs.view(b, groups, 2, rep, t, s)
        a1, a2 = (p[:, :, m].reshape(b, groups * rep, t, s)[0] for m in (0, 1))
        lam = attn.lambda_full().float()
        return LayerMaps("diff_v1", a1, a2, lam, a1 - lam * a2, stats)
    if isinstance(attn, BaselineAttention):
        return LayerMaps("baseline", probs[0], None, None, probs[0], stats)
    raise TypeError(f"no attention-map reader for {type(attn).__name__}")


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
