"""What the attention does, measured from outside the forward: per-layer statistics and attention maps.

Forward hooks on a model's blocks and attention modules record the layer inputs of one ordinary forward pass; the
attention of each layer is then recomputed eagerly from them (``Attention.maps``: softmax probabilities and
logits; ``combine`` of the definition: the context before W_O). The model's code carries no diagnostic argument,
and a hook inside a block runs while that block's parameters are gathered, so this works on FSDP-sharded models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .attention import Attention, AttentionMaps, DiffV2Attention
from .metrics import attention_layer_metrics, hidden_metrics
from .model import Block


def _attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def _mix(layer: Attention, x: torch.Tensor) -> torch.Tensor | None:
    projection = getattr(layer, layer.mix_projection, None) if layer.mix_projection else None
    return projection(x) if projection is not None else None


@torch.no_grad()
def diagnose(model: nn.Module, tokens: torch.Tensor, *, keep_maps: bool = False) -> list[dict[str, Any]]:
    """Per layer: ``max_logit``, ``context_rms`` (per output head, before W_O), ``sink_mass`` (per output head:
    the effective map's mean weight on key 0 over queries t >= 1), ``lambda_mean``/``lambda_std`` (the
    subtraction weight, DIFF only), ``hidden_max`` and ``hidden_topk`` (the block's output), and the
    scale-free sink, logit and outlier metrics of :mod:`diffv2.metrics` (``key0_a1``, ``sink_share``,
    ``hidden_outlier_ratio``, ...). With
    ``keep_maps`` each dict also holds the layer's :class:`~diffv2.attention.AttentionMaps` under ``"maps"``."""
    layers = _attention_layers(model)
    stats: dict[Attention, dict[str, Any]] = {layer: {} for layer in layers}

    def on_attention(layer: Attention, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        x, rope, mask = args[0], args[1], kwargs.get("mask")
        q, k, v = layer.qkv(x, rope, None)
        mix = _mix(layer, x)
        maps = layer.maps(q, k, mix, mask)
        ctx = layer.combine(layer.attend(q, k, v, mask), mix)  # (B, heads, T, width)
        record = stats[layer]
        record["max_logit"] = maps.logits.masked_fill(maps.logits.isinf(), 0.0).abs().amax().item()
        record["context_rms"] = ctx.float().pow(2).mean(dim=(0, 2, 3)).sqrt().tolist()
        if maps.a1.shape[-2] > 1:  # query 0 can only see key 0
            record["sink_mass"] = maps.effective[..., 1:, 0].float().mean(dim=(0, 2)).tolist()
        if maps.weight is not None:
            weight = maps.weight.float()
            record["lambda_mean"] = weight.mean().item()
            record["lambda_std"] = weight.std().item() if weight.amax() > weight.amin() else 0.0
        if maps.a1.shape[-1] == maps.a1.shape[-2] > 1:  # the sink and logit metrics of diffv2.metrics
            record.update(attention_layer_metrics(maps.a1, maps.a2, maps.weight, maps.logits))
        if keep_maps:
            record["maps"] = maps

    hidden: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(on_attention, with_kwargs=True) for layer in layers]
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    hooks += [block.register_forward_hook(lambda m, a, out: hidden.append(out)) for block in blocks]
    try:
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    out = [stats[layer] for layer in layers]
    for record, h in zip(out, hidden, strict=True):
        top = h.float().abs().flatten().topk(min(8, h.numel())).values
        record["hidden_max"], record["hidden_topk"] = top[0].item(), top.tolist()
        record.update(hidden_metrics(h))
    return out


@torch.no_grad()
def attention_maps(model: nn.Module, tokens: torch.Tensor) -> list[AttentionMaps]:
    """The attention maps of every layer for ``tokens`` (B, T); see :class:`~diffv2.attention.AttentionMaps`."""
    return [record["maps"] for record in diagnose(model, tokens, keep_maps=True)]


@torch.no_grad()
def subtraction_weights(model: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """DIFF V2's subtraction weight σ(λ) (or its ablation's) of every layer, (B, h, T) each, from one ordinary
    forward pass (empty for other variants)."""
    out: list[torch.Tensor] = []

    def record(layer: DiffV2Attention, args: tuple) -> None:
        out.append(layer.weight(_mix(layer, args[0]), like=args[0]).float())

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, DiffV2Attention)]
    try:
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return out


@contextmanager
def attention_logit_transform(model: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block every attention layer runs the eager path and maps its logits q·kᵀ/√d (fp32, (B, Hq, T, S),
    masked positions at -inf, which must stay -inf) through ``transform`` before the softmax: e.g. low-bit
    fake quantisation. DIFF V1 applies it to each of its calls."""
    layers = _attention_layers(model)
    saved = [(layer.backend, layer.logit_transform) for layer in layers]
    try:
        for layer in layers:
            layer.backend, layer.logit_transform = "eager", transform
        yield
    finally:
        for layer, (backend, previous) in zip(layers, saved, strict=True):
            layer.backend, layer.logit_transform = backend, previous


@contextmanager
def attention_kv_transform(model: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block every attention layer maps its rotated keys and its values (B, Hkv, S, d) through
    ``transform`` before caching or attending to them, on whatever path it runs: e.g. the int8 KV cache's round
    trip (``kernels.kv_int8.int8_round_trip``), to score a model as if it decoded from that cache."""
    layers = _attention_layers(model)
    saved = [layer.kv_transform for layer in layers]
    try:
        for layer in layers:
            layer.kv_transform = transform
        yield
    finally:
        for layer, previous in zip(layers, saved, strict=True):
            layer.kv_transform = previous


__all__ = [
    "AttentionMaps",
    "attention_kv_transform",
    "attention_logit_transform",
    "attention_maps",
    "diagnose",
    "subtraction_weights",
]
