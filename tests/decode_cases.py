"""Inputs and the float64 reference shared by the decode-kernel tests (``test_decode_kernel.py``, ``test_kv_int8.py``):
ragged per-row windows over strided head views of a wider cache buffer, as the model's KV cache hands them over."""

from __future__ import annotations

import torch

from diffv2.kernels.kv_int8 import QuantizedKV, quantize_int8

from . import reference as ref64

TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (5e-4, 5e-3), torch.bfloat16: (4e-3, 2e-2)}  # (atol, rtol)


def explicit_mask(kv_start: torch.Tensor, kv_end: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """(B, 1, T, S), written element by element from the rule, independently of ``dt.window_mask``."""
    b = kv_start.shape[0]
    mask = torch.zeros(b, 1, t, s, dtype=torch.bool)
    for row in range(b):
        for query in range(t):
            last = int(kv_end[row]) - (t - 1) + query  # exclusive
            mask[row, 0, query, int(kv_start[row]) : max(last, int(kv_start[row]))] = True
    return mask.to(kv_end.device)


def reference(q, k, v, kv_start, kv_end, pair_weight=None, scale=None):
    """The float64 head-by-head reference with the explicit mask; the DIFF V2 heads from its pair subtraction."""
    mask = explicit_mask(kv_start.cpu(), kv_end.cpu(), q.shape[-2], k.shape[-2])
    out = ref64.gqa_attention(q.cpu(), k.cpu(), v.cpu(), mask, scale)
    return out if pair_weight is None else ref64.subtract_pairs(out, pair_weight.cpu())


def windows(b: int, s: int, t: int, gen: torch.Generator, dtype=torch.int64, device="cpu"):
    """Ragged per-row windows: row 0 the whole cache, row 1 shorter than T (some queries see nothing, so
    zeros), the rest random (left padding and an unwritten tail)."""
    start = torch.randint(0, s // 3, (b,), generator=gen)
    end = torch.randint(s // 2, s + 1, (b,), generator=gen)
    start[0], end[0] = 0, s
    if b > 1:
        start[1], end[1] = 5, 5 + max(t - 2, 0)
    return start.to(device, dtype), end.to(device, dtype)


def make_inputs(b, hq, hkv, d, t, s, dtype, device="cpu", seed=0):
    """q in the model's layout (a transposed view), k/v as strided head views of a wider cache buffer."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=gen).to(device, dtype).transpose(1, 2)
    cache_k = torch.randn(b, 2 * hkv, s + 7, d, generator=gen).to(device, dtype)
    cache_v = torch.randn(b, 2 * hkv, s + 7, d, generator=gen).to(device, dtype)
    k, v = cache_k[:, 0::2, :s], cache_v[:, 1::2, :s]
    pair_weight = torch.rand(b, hq // 2, t, generator=gen).to(device)
    return q, k, v, *windows(b, s, t, gen, device=device), pair_weight


def as_lambda(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """λ in the model's dtype (what lambda_proj gives) for a kernel that applies σ itself (pair_sigmoid)."""
    return torch.logit(w.clamp(0.02, 0.98)).to(dtype)


def check(out, ref, dtype, *, pair=False):
    """|out − ref| <= atol + rtol·|ref| with the rounding of the input dtype (probabilities enter the second
    product in it, the result is cast to it); a DIFF V2 difference can cancel, so there rtol applies to the
    largest |ref| instead."""
    atol, rtol = TOL[dtype]
    assert out.shape == ref.shape and out.dtype == dtype
    err = (out.double().cpu() - ref).abs()
    bound = atol + rtol * (ref.abs().max() if pair else ref.abs())
    worst = (err - bound).argmax()
    assert (err <= bound).all(), f"error {err.flatten()[worst]:.3e} > bound {bound.flatten()[worst]:.3e}"


def int8_inputs(b, hq, hkv, d, t, s, dtype, device="cpu", seed=0):
    """:func:`make_inputs` with K/V in an int8 cache: strided head views of a wider quantised buffer (fresh random
    values), and their float64 dequantisation ``q·s``, the definition the kernel must compute."""
    q, _, _, start, end, w = make_inputs(b, hq, hkv, d, t, s, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    raw = [torch.randn(b, 2 * hkv, s + 7, d, generator=gen).to(device) for _ in "kv"]
    kv = [QuantizedKV(*quantize_int8(x), dtype) for x in raw]  # quantised where the kernel reads it
    k, v = kv[0][:, 0::2, :s], kv[1][:, 1::2, :s]
    exact = [x.data.double().cpu() * x.scale.double().cpu()[..., None] for x in (k, v)]
    return q, k, v, *exact, start, end, w
