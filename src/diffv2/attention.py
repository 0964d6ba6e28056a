"""The three attention variants, side by side: baseline GQA, DIFF V1, DIFF V2.

All share :class:`AttentionBase`: bias-free ``q_proj``/``k_proj``/``v_proj``/``o_proj``, RoPE, an optional
KV cache and one call of the attention primitive. A variant only says how many query heads it has and how it
turns the per-query-head outputs into the h·d context that ``o_proj`` reads (``mix``); DIFF V2 takes over the
step through ``o_proj`` too (``mix_and_project``), so that training need not keep its h·d difference.

Shapes: x (B, T, D); q (B, Hq, T, d); k, v (B, Hkv, S, d); the context before W_O is (B, T, h·d).
Passing a ``stats`` dict runs the eager path and records diagnostics (max logit, context RMS, sink mass, λ).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fused import FusableInputs, plain_linear
from .kernels import (
    Mask,
    apply_rope_qk,
    as_mask,
    attend,
    decode_attention_triton,
    eager_attention,
    fused_decode_applies,
)
from .kernels.diff_attn_triton import diff_attention, diff_attention_supported
from .kernels.pair_subtract import PairSubtract, pair_subtract_project, split_pairs, upcast


class KVCacheLayer(Protocol):
    """One layer's KV cache: appends this step's K/V (B, Hkv, T, d) and returns the full K/V to attend to."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class AttentionBase(FusableInputs):
    kind: str  # "baseline" | "diff_v1" | "diff_v2"
    n_query_heads: int

    def __init__(self, cfg: ModelConfig, layer_idx: int, n_query_heads: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_query_heads = n_query_heads
        self.backend = cfg.backend
        d, dm = cfg.head_dim, cfg.d_model
        self.q_proj = nn.Linear(dm, n_query_heads * d, bias=False)
        self.k_proj = nn.Linear(dm, cfg.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(dm, cfg.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * d, dm, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        *,
        mask: Mask = None,
        cache: KVCacheLayer | None = None,
        stats: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = rope
        q, k, v, *lam = self.project_inputs(x)  # lam: DIFF V2's λ (B, T, h), before the sigmoid
        q = q.view(b, t, self.n_query_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        q, k = (r.transpose(1, 2) for r in apply_rope_qk(q, k, cos, sin))
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v)
        return self.mix_and_project(q, k, v, lam[0] if lam else None, mask, stats)

    def input_linears(self) -> list[nn.Linear]:
        """The projections of the layer input (one matmul once fused, see ``diffv2.fused``)."""
        return [self.q_proj, self.k_proj, self.v_proj]

    def mix_and_project(self, q, k, v, lam, mask, stats) -> torch.Tensor:
        """The layer's output (B, T, D): ``o_proj`` of the context that ``mix`` makes."""
        return self.project(self.mix(q, k, v, mask, stats), stats)

    def project(self, ctx: torch.Tensor, stats: dict[str, Any] | None) -> torch.Tensor:
        """``o_proj`` of a context (B, T, h_out, d_out) with h_out·d_out = h·d."""
        if stats is not None:
            stats["context_rms"] = ctx.float().pow(2).mean(dim=(0, 1, 3)).sqrt().tolist()  # per output head
        return self.o_proj(ctx.flatten(2))

    def attend(self, q, k, v, mask, stats) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, Hq, T, d) outputs and, in diagnostic mode, the probabilities (B, Hq, T, S)."""
        if stats is None:
            return attend(q, k, v, backend=self.backend, mask=mask), None
        out, probs, logits = eager_attention(q, k, v, mask=as_mask(mask, q.shape[-2], k.shape[-2]))
        stats["max_logit"] = logits.masked_fill(logits.isinf(), 0.0).abs().amax().item()
        return out, probs

    def mix(self, q, k, v, mask, stats) -> torch.Tensor:
        raise NotImplementedError


def _record_maps(stats: dict[str, Any], a1: torch.Tensor, a2: torch.Tensor | None = None, weight=None) -> None:
    """Diagnostics of the effective attention weights a1 − weight·a2 (a1 alone for the baseline), (B, h, T, S):
    the sink mass = mean weight on key 0 over queries t >= 1 (query 0 can only see key 0), per output head.
    With ``stats["keep_maps"]`` the maps themselves are kept too (for ``diffv2 inspect``)."""
    effective = a1 if a2 is None else a1 - weight * a2
    if effective.shape[-2] > 1:
        stats["sink_mass"] = effective[..., 1:, 0].float().mean(dim=(0, 2)).tolist()
    if stats.get("keep_maps"):
        stats["maps"] = {"a1": a1, "a2": a2, "weight": weight, "effective": effective}


class BaselineAttention(AttentionBase):
    """Standard GQA attention with h query heads."""

    kind = "baseline"

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx, n_query_heads=cfg.n_heads)

    def mix(self, q, k, v, mask, stats):
        out, probs = self.attend(q, k, v, mask, stats)
        if stats is not None:
            _record_maps(stats, probs)
        return out.transpose(1, 2)


class DiffV2Attention(AttentionBase):
    """DIFF V2: 2h query heads, one attention call, head i = head 2i − σ(λ_i)·head 2i+1, λ = x W_λᵀ per token.

    Ablations: ``pairing="split"`` pairs head i with head i+h (different GQA groups: the blog's wrong
    implementation); ``lambda_mode="none"`` uses weight 1 and has no ``lambda_proj``; ``"linear"`` drops the
    sigmoid.
    """

    kind = "diff_v2"

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx, n_query_heads=2 * cfg.n_heads)
        self.pairing, self.lambda_mode = cfg.pairing, cfg.lambda_mode
        self.recompute_difference = cfg.recompute_pair_difference
        if cfg.lambda_mode != "none":
            self.lambda_proj = nn.Linear(cfg.d_model, cfg.n_heads, bias=False)

    def split_pairs(self, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2h, ...) → the two members of each pair, (B, h, ...) each."""
        return split_pairs(heads, self.pairing == "interleaved")

    def input_linears(self) -> list[nn.Linear]:
        return super().input_linears() + ([self.lambda_proj] if self.lambda_mode != "none" else [])

    def subtraction_weight(self, x: torch.Tensor) -> torch.Tensor:
        """σ(λ) per token and head, (B, T, h), in fp32."""
        return self._weight_of(self.lambda_proj(x) if self.lambda_mode != "none" else None, x)

    def _weight_of(self, lam: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The subtraction weight (B, T, h), fp32, from λ = x W_λᵀ (None without ``lambda_proj``); ``like``
        is the layer input (B, T, D)."""
        if lam is None:
            return torch.ones(*like.shape[:2], self.n_heads, device=like.device, dtype=upcast(like).dtype)
        return torch.sigmoid(upcast(lam)) if self.lambda_mode == "sigmoid" else upcast(lam)

    def mix_and_project(self, q, k, v, lam, mask, stats):
        like = q.transpose(1, 2)  # (B, T, Hq, d): batch, length, device and dtype of the layer input
        if stats is None and self.pairing == "interleaved" and fused_decode_applies(q, k, v, mask, self.backend):
            # decode over a KV window: the kernel subtracts each pair in its epilogue (the 2h head outputs are
            # never written) and, for σ(λ), takes λ as it is (the cast and the sigmoid are two launches less)
            sigmoid = self.lambda_mode == "sigmoid"
            w = (lam if sigmoid else self._weight_of(lam, like)).transpose(1, 2)  # (B, h, T)
            ctx = decode_attention_triton(q, k, v, mask.start, mask.end, pair_weight=w, pair_sigmoid=sigmoid)
            return self.project(ctx.transpose(1, 2), None)
        s = self._weight_of(lam, like).transpose(1, 2)  # (B, h, T)
        fused_training = self.backend == "triton" and mask is None and q.shape[-2] == k.shape[-2]
        if stats is None and self.pairing == "interleaved" and fused_training and diff_attention_supported(q, k, v):
            # the fused training / prefill kernel (causal, T == S) also subtracts in its epilogue
            return self.project(diff_attention(q, k, v, s).transpose(1, 2), None)
        out, probs = self.attend(q, k, v, mask, stats)
        s = s[..., None]  # (B, h, T, 1)
        if stats is None and self.recompute_difference and plain_linear(self.o_proj):
            return pair_subtract_project(out, s, self.o_proj.weight, self.pairing == "interleaved")
        o1, o2 = self.split_pairs(out)
        if stats is not None:
            a1, a2 = self.split_pairs(probs)
            _record_maps(stats, a1, a2, s)
            stats["lambda_mean"], stats["lambda_std"] = s.mean().item(), s.std().item()
        return self.project(PairSubtract.apply(o1, o2, s).transpose(1, 2), stats)


def lambda_init_fn(layer_idx: int) -> float:
    """DIFF V1's depth-dependent λ_init with a 0-based layer index: layer 0 gets 0.2 (spec §2, Q12)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DiffV1Attention(AttentionBase):
    """DIFF V1 (paper + official flash code): h/2 differential heads, each with q heads (2i, 2i+1), K heads
    (2g, 2g+1) of its KV group g and a 2d-wide value [v_2g, v_2g+1]; one λ per layer, per-head RMSNorm over
    2d channels, then × (1 − λ_init).

    With stock kernels (value width d) training/prefill runs two GQA calls: queries are regrouped so q1 of
    group g reads KV head 2g and q2 reads 2g+1; the second call swaps the value heads of each pair. A decode
    step instead runs four calls on strided views (no copy of the cache). Either way V is read twice: the
    decode cost the V2 blog points at.
    """

    kind = "diff_v1"

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx, n_query_heads=cfg.n_heads)
        d = cfg.head_dim
        self.lambda_init = lambda_init_fn(layer_idx)
        self.lambda_q1 = nn.Parameter(torch.empty(d))
        self.lambda_k1 = nn.Parameter(torch.empty(d))
        self.lambda_q2 = nn.Parameter(torch.empty(d))
        self.lambda_k2 = nn.Parameter(torch.empty(d))
        self.subln = nn.RMSNorm(2 * d, eps=1e-5, elementwise_affine=True)  # official latest code: affine (Q9)
        self.reset_lambda()

    def reset_lambda(self) -> None:
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, mean=0.0, std=0.1)

    def lambda_full(self) -> torch.Tensor:
        lam1 = torch.exp((upcast(self.lambda_q1) * upcast(self.lambda_k1)).sum())
        lam2 = torch.exp((upcast(self.lambda_q2) * upcast(self.lambda_k2)).sum())
        return lam1 - lam2 + self.lambda_init

    def two_maps(self, q, k, v, mask, stats):
        """attn1 = a1 @ [v_2g, v_2g+1] and attn2 = a2 @ [...], each (B, h/2, T, 2d), plus a1/a2 probabilities
        in (g, s, r) order when diagnosing."""
        b, hq, t, d = q.shape
        if t == 1 and stats is None:
            # decode: four calls on strided head views (the official flash2 scheme); no copy of the V cache
            k1, k2, v1, v2 = k[:, 0::2], k[:, 1::2], v[:, 0::2], v[:, 1::2]
            q1, q2 = q[:, 0::2], q[:, 1::2]
            attn1 = torch.cat((self.attend(q1, k1, v1, mask, None)[0], self.attend(q1, k1, v2, mask, None)[0]), -1)
            attn2 = torch.cat((self.attend(q2, k2, v1, mask, None)[0], self.attend(q2, k2, v2, mask, None)[0]), -1)
            return attn1, attn2, None
        groups, rep = self.n_kv_heads // 2, self.n_heads // self.n_kv_heads
        # differential head i = g*rep + r uses q heads 2i (s=0) and 2i+1 (s=1); order them (g, s, r)
        q_grouped = q.view(b, groups, rep, 2, t, d).transpose(2, 3).reshape(b, hq, t, d)
        v_swapped = v.view(b, groups, 2, -1, d).flip(2).reshape(v.shape)
        out_a, probs = self.attend(q_grouped, k, v, mask, stats)  # a_s @ v_{2g+s}
        out_b, _ = self.attend(q_grouped, k, v_swapped, mask, None)  # a_s @ v_{2g+1-s}
        out_a, out_b = (o.view(b, groups, 2, rep, t, d) for o in (out_a, out_b))
        attn1 = torch.cat((out_a[:, :, 0], out_b[:, :, 0]), dim=-1)  # a1 @ [v_2g, v_2g+1]
        attn2 = torch.cat((out_b[:, :, 1], out_a[:, :, 1]), dim=-1)  # a2 @ [v_2g, v_2g+1]
        return attn1.reshape(b, hq // 2, t, 2 * d), attn2.reshape(b, hq // 2, t, 2 * d), probs

    def mix(self, q, k, v, mask, stats):
        b, hq, t, d = q.shape
        attn1, attn2, probs = self.two_maps(q, k, v, mask, stats)
        lam = self.lambda_full()
        diff = upcast(attn1) - lam * upcast(attn2)  # (B, h/2, T, 2d)
        normed = F.rms_norm(diff, (2 * d,), self.subln.weight.to(diff.dtype), self.subln.eps)
        ctx = (normed * (1.0 - self.lambda_init)).to(q.dtype)
        if stats is not None:
            p = probs.view(b, self.n_kv_heads // 2, 2, self.n_heads // self.n_kv_heads, t, -1)
            a1, a2 = (p[:, :, m].reshape(b, hq // 2, t, -1) for m in (0, 1))
            _record_maps(stats, a1, a2, lam)
            stats["lambda_mean"], stats["lambda_std"] = lam.item(), 0.0
        return ctx.transpose(1, 2)


ATTENTION_CLASSES: dict[str, type[AttentionBase]] = {
    "baseline": BaselineAttention,
    "diff_v1": DiffV1Attention,
    "diff_v2": DiffV2Attention,
}


def build_attention(cfg: ModelConfig, layer_idx: int) -> AttentionBase:
    return ATTENTION_CLASSES[cfg.attention](cfg, layer_idx)
