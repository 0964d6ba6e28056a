"""The attention variants, side by side. Each ``forward`` says what the layer computes; each ``combine`` is the
definition of its head mixing, in plain PyTorch. Faster implementations of the same math are registered in
:mod:`diffv2.attention.dispatch` and held to these definitions by ``tests/test_conformance.py``.

DIFF V2 in one screen: 2h query heads over the usual h_kv K/V heads, one softmax-attention call, then output
head i = o₂ᵢ − σ(λᵢ)·o₂ᵢ₊₁ with λ = x W_λᵀ per token and head. Heads 2i and 2i+1 read the same K/V head
(query head j reads K/V head j // (2h/h_kv)), and W_O stays h·d wide.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..kernels import Mask
from .base import Attention, AttentionMaps, KVCacheLayer, register
from .common import split_pairs, upcast
from .dispatch import attention_output

Rope = tuple[torch.Tensor, torch.Tensor]


@register("baseline")
class BaselineAttention(Attention):
    """Standard GQA attention: h query heads, h_kv K/V heads."""

    def forward(self, x: torch.Tensor, rope: Rope, *, mask: Mask = None, cache: KVCacheLayer | None = None):
        q, k, v = self.qkv(x, rope, cache)
        return attention_output(self, q, k, v, None, mask)

    def combine(self, o, mix):
        return o


@register("gated")
class GatedAttention(Attention):
    """The baseline with a per-token, per-head sigmoid gate on each head's output, c_i = σ(x·g_iᵀ)·o_i (Gated
    Attention, arXiv 2505.06708): DIFF V2's input-dependent ≈0.5 scale at init, without the subtraction."""

    input_projections = (*Attention.input_projections, "gate_proj")
    mix_projection = "gate_proj"

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.gate_proj = nn.Linear(cfg.d_model, cfg.n_heads, bias=False)

    def forward(self, x: torch.Tensor, rope: Rope, *, mask: Mask = None, cache: KVCacheLayer | None = None):
        q, k, v = self.qkv(x, rope, cache)
        gate = self.gate_proj(x)  # (B, T, h): one gate logit per token and head
        return attention_output(self, q, k, v, gate, mask)

    def combine(self, o, gate):
        return (torch.sigmoid(upcast(gate)).transpose(1, 2)[..., None] * upcast(o)).to(o.dtype)

    def init_rules(self, std, out_std):
        return {**super().init_rules(std, out_std), self.gate_proj: None}  # as lambda_proj: PyTorch's default


@register("diff_v2")
class DiffV2Attention(Attention):
    """DIFF V2. Ablations (config): ``pairing="split"`` subtracts head i+h from head i (different GQA groups: the
    blog's wrong implementation); ``lambda_mode`` "none" (weight 1), "const" (weight 0.5), "linear" (λ without
    the sigmoid). The first two have no ``lambda_proj``."""

    input_projections = (*Attention.input_projections, "lambda_proj")
    mix_projection = "lambda_proj"

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.pairing, self.lambda_mode = cfg.pairing, cfg.lambda_mode
        self.recompute_difference = cfg.recompute_pair_difference
        projected = cfg.lambda_mode in ("sigmoid", "linear")
        self.lambda_proj = nn.Linear(cfg.d_model, cfg.n_heads, bias=False) if projected else None

    def forward(self, x: torch.Tensor, rope: Rope, *, mask: Mask = None, cache: KVCacheLayer | None = None):
        q, k, v = self.qkv(x, rope, cache)  # q: 2h query heads; k, v: h_kv heads
        lam = self.lambda_proj(x) if self.lambda_proj is not None else None  # (B, T, h): λ per token and head
        return attention_output(self, q, k, v, lam, mask)

    def combine(self, o, lam):
        return subtract_pairs(o, self.weight(lam, like=o), self.pairing == "interleaved")

    def weight(self, lam: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The subtraction weight (B, h, T), fp32: σ(λ), or the ablation's. ``like``: any (B, ·, T, ·) tensor."""
        if self.lambda_mode == "sigmoid":
            return torch.sigmoid(upcast(lam)).transpose(1, 2)
        if self.lambda_mode == "linear":
            return upcast(lam).transpose(1, 2)
        b, t = like.shape[0], like.shape[-2]
        value = 1.0 if self.lambda_mode == "none" else 0.5
        return torch.full((b, self.n_heads, t), value, dtype=upcast(like).dtype, device=like.device)

    @classmethod
    def query_heads(cls, cfg):
        return 2 * cfg.n_heads

    @classmethod
    def check_config(cls, cfg):
        pass  # every pairing and lambda_mode applies

    def init_rules(self, std, out_std):
        rules = super().init_rules(std, out_std)
        if self.lambda_proj is not None:
            rules[self.lambda_proj] = None  # PyTorch's default U(±1/√D), as the reference code: σ(λ) near 0.5
        return rules

    def maps(self, q, k, lam, mask):
        _, probs, _, _, logits = super().maps(q, k, lam, mask)
        a1, a2 = split_pairs(probs, self.pairing == "interleaved")
        return AttentionMaps(self.name, a1, a2, self.weight(lam, like=a1), logits)


def subtract_pairs(o: torch.Tensor, weight: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """DIFF V2's combine: o (B, 2h, T, d), weight (B, h, T) → o₂ᵢ − weightᵢ·o₂ᵢ₊₁ (B, h, T, d), in fp32 (both
    terms can be tiny for diffuse heads) and back in o's dtype."""
    o1, o2 = split_pairs(o, interleaved)
    return (upcast(o1) - weight[..., None] * upcast(o2)).to(o.dtype)
