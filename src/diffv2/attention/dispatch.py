"""Which implementation runs an attention call: one table, read top to bottom, the first matching row wins.

A row matches on (variant, phase, device, backend) and on its implementation's own limits (``supports``: shapes,
dtypes, config). Variant rows compute a layer's whole output (B, T, D) faster than its definition, which is what
runs when no variant row matches: ``o_proj(combine(attend(q, k, v), mix))`` with the variant's ``combine`` (see
:mod:`.variants`). Softmax rows ("*") compute ``attend``: softmax attention of the Hq query heads over the Hkv
K/V heads, (B, Hq, T, d). ``tests/test_conformance.py`` runs every row against the float64 reference.

Phases: ``full`` = causal over the whole sequence (T == S, no mask: training, an unpadded prompt); ``decode`` = at
most 16 queries per row over a KV cache window (generation's steps); ``masked`` = everything else (a padded
prompt, a chunk against a cache). Device ``cuda``: a CUDA tensor, or Triton's CPU interpreter (tests).

An int8 KV cache hands its K/V over as :class:`~diffv2.kernels.QuantizedKV`. Rows marked ``int8`` read them as they
are (int8 tiles and scales); every other row gets them dequantised (``q·s`` in the model's dtype), which is the
definition of attention over such a cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..kernels import (
    KVWindow,
    Mask,
    QuantizedKV,
    as_mask,
    decode_attention_triton,
    diff_attention,
    diff_attention_supported,
    eager_attention,
    explicit_mask,
    masked_decode,
    masked_prefill,
    plain_kv,
    sdpa_attention,
    triton_supported,
)
from .common import plain_linear, split_pairs
from .diff_v2_ops import PairSubtract, pair_subtract_project

if TYPE_CHECKING:
    from .base import Attention

DECODE_QUERIES = 16  # the split-KV kernel keeps G·T query rows of a group in one tile
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def project(layer: Attention, ctx: torch.Tensor) -> torch.Tensor:
    """``o_proj`` of a context (B, heads, T, width) with heads·width = h·d."""
    return layer.o_proj(ctx.transpose(1, 2).flatten(2))


# ---------------------------------------------------------------------- DIFF V2's fast paths (variant rows)
def diff_v2_decode_kernel(layer, q, k, v, lam, mask):
    """The split-KV kernel subtracts each pair in its epilogue (the 2h head outputs are never written) and, for
    σ(λ), takes λ as it is: the cast and the sigmoid are two launches less per layer."""
    sigmoid = layer.lambda_mode == "sigmoid"
    w = lam.transpose(1, 2) if sigmoid else layer.weight(lam, like=q)
    return project(layer, decode_attention_triton(q, k, v, mask.start, mask.end, pair_weight=w, pair_sigmoid=sigmoid))


def diff_v2_decode_int8(layer, q, k, v, lam, mask):
    """:func:`diff_v2_decode_kernel` over an int8 cache: the kernel loads int8 K/V tiles and their scales."""
    return diff_v2_decode_kernel(layer, q, k, v, lam, mask)


def diff_v2_fused_kernel(layer, q, k, v, lam, mask):
    return project(layer, diff_attention(q, k, v, layer.weight(lam, like=q)))


def diff_v2_recompute(layer, q, k, v, lam, mask):
    w = layer.weight(lam, like=q)[..., None]
    o = layer.attend(q, k, v, mask)
    return pair_subtract_project(o, w, layer.o_proj.weight, layer.pairing == "interleaved")


def diff_v2_keep(layer, q, k, v, lam, mask):
    o1, o2 = split_pairs(layer.attend(q, k, v, mask), layer.pairing == "interleaved")
    return project(layer, PairSubtract.apply(o1, o2, layer.weight(lam, like=q)[..., None]))


# ---------------------------------------------------------------------- softmax attention ("*" rows)
def split_kv_decode(layer, q, k, v, mask):
    return decode_attention_triton(q, k, v, mask.start, mask.end)


def split_kv_decode_int8(layer, q, k, v, mask):
    """:func:`split_kv_decode` over an int8 cache: the kernel loads int8 K/V tiles and their scales."""
    return decode_attention_triton(q, k, v, mask.start, mask.end)


def masked_cuda(layer, q, k, v, mask):
    """No fused CUDA kernel takes GQA together with an explicit mask (padding, static-cache slots)."""
    mask = explicit_mask(mask, q.shape[-2], k.shape[-2], q.device)
    return masked_decode(q, k, v, mask) if q.shape[-2] <= DECODE_QUERIES else masked_prefill(q, k, v, mask)


def eager(layer, q, k, v, mask):
    mask = as_mask(mask, q.shape[-2], k.shape[-2])
    return eager_attention(q, k, v, mask=mask, logit_transform=layer.logit_transform)[0]


def sdpa(layer, q, k, v, mask):
    return sdpa_attention(q, k, v, as_mask(mask, q.shape[-2], k.shape[-2]))


# ---------------------------------------------------------------- what an implementation needs beyond its row
def always(layer, q, k, v, mask) -> bool:
    return True


def pairs_fit_decode(layer, q, k, v, mask) -> bool:
    return layer.pairing == "interleaved" and triton_supported(q, k, v)


def pairs_fit_fused(layer, q, k, v, mask) -> bool:
    return layer.pairing == "interleaved" and diff_attention_supported(q, k, v)


def recomputable(layer, q, k, v, mask) -> bool:
    return layer.recompute_difference and plain_linear(layer.o_proj)


def fits_decode(layer, q, k, v, mask) -> bool:
    return triton_supported(q, k, v)


def pairs_fit_decode_int8(layer, q, k, v, mask) -> bool:
    return layer.pairing == "interleaved" and fits_decode_int8(layer, q, k, v, mask)


def fits_decode_int8(layer, q, k, v, mask) -> bool:
    return triton_supported(q, k.data, v.data)


def has_mask(layer, q, k, v, mask) -> bool:
    return mask is not None or q.shape[-2] > 1  # (a lone query over the cache needs none)


@dataclass(frozen=True)
class Route:
    variant: str  # a registered variant, or "*": the softmax attention every variant's definition reads
    phases: tuple[str, ...]  # of "full", "masked", "decode"; empty = any
    device: str  # "cuda" or "*"
    backends: tuple[str, ...]  # the ModelConfig.backend values it serves
    impl: Callable[..., torch.Tensor]
    supports: Callable[..., bool] = always
    int8: bool = False  # reads an int8 cache's K/V as they are; matches only such K/V. Other rows get them dequantised

    @property
    def name(self) -> str:
        return self.impl.__name__


FUSED = ("sdpa", "triton")
ROUTES: tuple[Route, ...] = (
    #     variant    phases               device  backends     implementation         also needs
    Route("diff_v2", ("decode",),         "cuda", FUSED,       diff_v2_decode_int8,   pairs_fit_decode_int8, int8=True),
    Route("diff_v2", ("decode",),         "cuda", FUSED,       diff_v2_decode_kernel, pairs_fit_decode),
    Route("diff_v2", ("full",),           "cuda", ("triton",), diff_v2_fused_kernel,  pairs_fit_fused),
    Route("diff_v2", (),                  "*",    FUSED,       diff_v2_recompute,     recomputable),
    Route("diff_v2", (),                  "*",    FUSED,       diff_v2_keep),
    # no variant row matched: the variant's definition, o_proj(combine(attend(q, k, v))), reading these rows
    Route("*",       ("decode",),         "cuda", FUSED,       split_kv_decode_int8,  fits_decode_int8, int8=True),
    Route("*",       ("decode",),         "cuda", FUSED,       split_kv_decode,       fits_decode),
    Route("*",       ("masked", "decode"), "cuda", FUSED,      masked_cuda,           has_mask),
    Route("*",       (),                  "*",    ("eager",),  eager),
    Route("*",       (),                  "*",    FUSED,       sdpa),
)  # fmt: skip


def phase(q: torch.Tensor, k: torch.Tensor, mask: Mask) -> str:
    t, s = q.shape[-2], k.shape[-2]
    if isinstance(mask, KVWindow) and t <= DECODE_QUERIES:
        return "decode"
    return "full" if mask is None and t == s else "masked"


def _route(variant: str, layer: Attention, q, k, v, mask: Mask) -> Route | None:
    call_phase = phase(q, k, mask)
    quantized = isinstance(k, QuantizedKV)
    device = "cuda" if q.is_cuda or _INTERPRET else q.device.type
    for route in _forced or ROUTES:
        if (
            route.variant == variant
            and (not route.phases or call_phase in route.phases)
            and route.device in ("*", device)
            and layer.backend in route.backends
            and (quantized or not route.int8)
            and route.supports(layer, q, k, v, mask)
        ):
            if _taken is not None:
                _taken.append(route.name)
            return route
    return None


def attention_output(layer: Attention, q, k, v, mix: torch.Tensor | None, mask: Mask) -> torch.Tensor:
    """The layer's output (B, T, D) from q (B, Hq, T, d), k/v (B, Hkv, S, d) and ``mix``, the per-token input of
    its ``combine`` (λ for DIFF V2, the gate logits for gated attention; None for others)."""
    route = _route(layer.name, layer, q, k, v, mask)
    if route is not None:
        return route.impl(layer, q, *_kv_for(route, k, v), mix, mask)
    return project(layer, layer.combine(layer.attend(q, k, v, mask), mix))


def attend(layer: Attention, q, k, v, mask: Mask) -> torch.Tensor:
    """Softmax attention (B, Hq, T, d) through the first matching "*" row."""
    route = _route("*", layer, q, k, v, mask)
    if route is None:
        raise RuntimeError(f"no softmax-attention route takes this call (forced to {[r.name for r in _forced]})")
    return route.impl(layer, q, *_kv_for(route, k, v), mask)


def _kv_for(route: Route, k, v) -> tuple:
    """K/V as the row reads them: an int8 cache's as they are for an ``int8`` row, dequantised for any other."""
    return (k, v) if route.int8 else (plain_kv(k), plain_kv(v))


# ---------------------------------------------------------------------- for tests: force and trace routes
_forced: tuple[Route, ...] = ()
_taken: list[str] | None = None


@contextmanager
def forced_routes(*names: str) -> Iterator[None]:
    """Within the block only the named rows exist (a variant row not named falls through to the definition)."""
    global _forced
    unknown = set(names) - {r.name for r in ROUTES}
    if unknown:
        raise ValueError(f"unknown routes {sorted(unknown)}; known: {[r.name for r in ROUTES]}")
    previous, _forced = _forced, tuple(r for r in ROUTES if r.name in names)
    try:
        yield
    finally:
        _forced = previous


@contextmanager
def traced_routes() -> Iterator[list[str]]:
    """Collects the name of every row taken within the block, in order."""
    global _taken
    previous, _taken = _taken, []
    try:
        yield _taken
    finally:
        _taken = previous
