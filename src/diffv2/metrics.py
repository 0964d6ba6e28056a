"""Per-layer diagnostic metrics as pure functions over tensors: attention sinks, activation and logit outliers.

Inputs are what an eager diagnostic pass can hand over without touching the model: softmax probability maps
(B, H, T, S) with T == S (causal self-attention over one window, masked keys at probability 0), DIFF subtraction
weights (B, H, T) (or a 0-dim λ for DIFF V1), residual-stream hidden states (B, T, D) and pre-softmax attention
logits (B, H, T, S) with masked entries at -inf. Nothing here hooks into a model; ``diffv2.diagnostics`` calls
these during a diagnostic pass and the trainer logs their results under the key names below (the report reads
those names).

Why these and not the simpler ones: the effective DIFF map a¹ − σ·a² sums to 1 − σ per query, so its mass on
key 0 shrinks by construction; each softmax map (a¹, a²) sums to 1 and is compared as it is, and the effective
map is renormalised by 1 − σ. A key-0 mass means little without the value uniform attention would give
(:func:`uniform_key0_reference`). max|h| grows with the stream's scale; max|h| / RMS(h) and the kurtosis do not.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SINK_THRESHOLD = 0.3  # a head whose mean mass on key 0 exceeds this is counted as a sink head

# The per-layer keys :func:`attention_layer_metrics` and :func:`hidden_metrics` return (and the trainer logs).
KEY0_A1 = "key0_a1"  # per output head: mean mass on key 0 of the first (or only) softmax map
KEY0_A2 = "key0_a2"  # per output head: the same for the second map of a DIFF pair
KEY0_EFFECTIVE = "key0_effective"  # per output head: key-0 mass of (a¹ − w·a²) / (1 − w); the map itself for one map
SINK_SHARE = "sink_share"  # share of softmax maps (all query heads) whose key-0 mass exceeds SINK_THRESHOLD
KEY0_UNIFORM = "key0_uniform"  # what uniform causal attention would put on key 0, for the same length
LOGIT_TOP1 = "logit_top1"  # the largest attention logit of the layer
LOGIT_MEDIAN = "logit_median"  # the median attention logit over valid (query, key) entries
HIDDEN_OUTLIER_RATIO = "hidden_outlier_ratio"  # max|h| / RMS(h) of the residual stream after the layer
HIDDEN_KURTOSIS = "hidden_kurtosis"  # kurtosis of the residual stream's entries (3 for a Gaussian)


def _check_maps(probs: torch.Tensor, name: str = "probs") -> None:
    if probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"{name}: expected (B, H, T, T) causal self-attention maps, got {tuple(probs.shape)}")
    if probs.shape[-1] < 2:
        raise ValueError(f"{name}: needs T >= 2 (query 0 can only attend to key 0)")


def key0_mass(probs: torch.Tensor) -> torch.Tensor:
    """Mean weight on key 0 per head, (H,): over the batch and the queries t >= 1 (query 0 sees only key 0)."""
    _check_maps(probs)
    return probs[:, :, 1:, 0].double().mean(dim=(0, 2))


def uniform_key0_reference(seq_len: int) -> float:
    """Key-0 mass of uniform causal attention: the mean over queries t = 1..T-1 of 1/(t+1)."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: needs at least 2")
    return sum(1.0 / (t + 1) for t in range(1, seq_len)) / (seq_len - 1)


def _per_query(weight: torch.Tensor | float) -> torch.Tensor:
    """A subtraction weight broadcastable to (B, H, T, S): (B, H, T) per query, or a 0-dim/float λ."""
    weight = torch.as_tensor(weight)
    return weight[..., None] if weight.dim() == 3 else weight


def normalized_difference(
    a1: torch.Tensor, a2: torch.Tensor, weight: torch.Tensor | float, eps: float = 1e-6
) -> torch.Tensor:
    """(a¹ − w·a²) / (1 − w): the DIFF effective map rescaled to sum to 1 per query (NaN where |1 − w| < eps)."""
    _check_maps(a1, "a1")
    _check_maps(a2, "a2")
    w = _per_query(weight).to(device=a1.device, dtype=torch.float64)
    scale = 1.0 - w
    scale = torch.where(scale.abs() < eps, torch.full_like(scale, math.nan), scale)
    return (a1.double() - w * a2.double()) / scale


def key0_mass_normalized(a1: torch.Tensor, a2: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """``key0_mass(normalized_difference(a1, a2, weight))``, from the maps' key-0 column only: the same values
    without materialising (B, H, T, T) in float64, which at diagnostic sizes costs seconds and gigabytes."""
    _check_maps(a1, "a1")
    _check_maps(a2, "a2")
    w = _per_query(weight).to(device=a1.device, dtype=torch.float64)
    scale = 1.0 - w
    scale = torch.where(scale.abs() < 1e-6, torch.full_like(scale, math.nan), scale)
    return ((a1[..., :1].double() - w * a2[..., :1].double()) / scale)[:, :, 1:, 0].mean(dim=(0, 2))


def sink_head_share(mass: torch.Tensor, threshold: float = SINK_THRESHOLD) -> float:
    """Share of heads whose mean key-0 mass exceeds ``threshold``."""
    return (mass > threshold).double().mean().item()


def outlier_ratio(hidden: torch.Tensor) -> float:
    """max|h| / RMS(h) over all entries: how far the largest activation stands out, whatever the stream's scale."""
    h = hidden.double()
    rms = h.pow(2).mean().sqrt()
    return (h.abs().amax() / rms).item() if rms > 0 else math.nan


def kurtosis(hidden: torch.Tensor) -> float:
    """E[(h − μ)⁴] / Var(h)² over all entries (3 for a Gaussian; heavy tails make it large). Scale-free."""
    h = hidden.double().flatten()
    centred = h - h.mean()
    var = centred.pow(2).mean()
    return (centred.pow(4).mean() / var.pow(2)).item() if var > 0 else math.nan


MEDIAN_SAMPLE = 1 << 20  # logits the median is estimated from when there are more (a seeded uniform sample)


def logit_summary(logits: torch.Tensor) -> tuple[float, float]:
    """(top-1, median) of the finite attention logits (masked entries are -inf and left out). The median is exact
    up to ``MEDIAN_SAMPLE`` finite entries and estimated beyond from a seeded uniform sample of about that many:
    an exact median of a diagnostic batch's ~10⁹ logits takes seconds, and the sample's error (~1/√N of the
    spread) is far below the digits reported."""
    flat = logits.reshape(-1)
    finite = torch.isfinite(flat)
    n_finite = int(finite.sum())
    if n_finite == 0:
        return math.nan, math.nan
    if n_finite <= MEDIAN_SAMPLE:
        valid = flat[finite]
    else:  # uniform indices over all entries; the finite ones among them are uniform over the finite entries
        gen = torch.Generator(device=flat.device).manual_seed(0)
        draws = math.ceil(MEDIAN_SAMPLE * flat.numel() / n_finite)
        picked = flat[torch.randint(flat.numel(), (draws,), generator=gen, device=flat.device)]
        valid = picked[torch.isfinite(picked)]
    top = logits.amax()  # masked entries are -inf: they never win; +inf or NaN only in a broken model
    if not torch.isfinite(top):
        top = flat.masked_fill(~finite, -math.inf).amax()
    return top.float().item(), valid.float().median().item()


def attention_layer_metrics(
    a1: torch.Tensor,
    a2: torch.Tensor | None = None,
    weight: torch.Tensor | float | None = None,
    logits: torch.Tensor | None = None,
    threshold: float = SINK_THRESHOLD,
) -> dict[str, Any]:
    """One layer's sink and logit metrics.

    ``a1`` (B, h, T, T): the baseline's maps, or the first map of each DIFF pair; ``a2`` the second (same shape)
    and ``weight`` its subtraction weight (B, h, T) for DIFF V2, a 0-dim λ for DIFF V1. ``logits``: the layer's
    pre-softmax logits (B, Hq, T, T), optional.
    """
    m1 = key0_mass(a1)
    out: dict[str, Any] = {KEY0_A1: m1.tolist(), KEY0_UNIFORM: uniform_key0_reference(a1.shape[-1])}
    if a2 is None:
        out[KEY0_EFFECTIVE] = m1.tolist()
        out[SINK_SHARE] = sink_head_share(m1, threshold)
    else:
        if weight is None:
            raise ValueError("a2 given without the subtraction weight")
        m2 = key0_mass(a2)
        out[KEY0_A2] = m2.tolist()
        out[KEY0_EFFECTIVE] = key0_mass_normalized(a1, a2, weight).tolist()
        out[SINK_SHARE] = sink_head_share(torch.cat([m1, m2]), threshold)  # every softmax map counts once
    if logits is not None:
        out[LOGIT_TOP1], out[LOGIT_MEDIAN] = logit_summary(logits)
    return out


def hidden_metrics(hidden: torch.Tensor) -> dict[str, float]:
    """One layer's residual-stream outlier metrics, (B, T, D) in."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected (B, T, D), got {tuple(hidden.shape)}")
    return {HIDDEN_OUTLIER_RATIO: outlier_ratio(hidden), HIDDEN_KURTOSIS: kurtosis(hidden)}
