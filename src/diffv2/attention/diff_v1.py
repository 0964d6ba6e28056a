"""DIFF V1 (the ICLR 2025 paper and its official flash code), as a baseline for DIFF V2.

h/2 differential heads. Head i pairs query heads (2i, 2i+1) with K heads (2g, 2g+1) of its KV group g (rather
than one shared K head as DIFF V2 does) and reads a 2d-wide value [v_2g, v_2g+1]; one λ per layer,
λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init; then a per-head RMSNorm over 2d channels and × (1 − λ_init).
Its cache is the baseline's: the wide value is two KV heads side by side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..kernels import Mask, eager_attention, explicit_mask, plain_kv
from .base import Attention, AttentionMaps, KVCacheLayer, register
from .common import split_pairs, upcast
from .dispatch import attention_output
from .variants import Rope


def lambda_init_fn(layer_idx: int) -> float:
    """λ_init with a 0-based layer index: layer 0 gets 0.2 (the paper's 1-based l − 1)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


@register("diff_v1")
class DiffV1Attention(Attention):
    """``combine`` reads o (B, h, T, 2d): query head j's map (over K head 2g + j % 2) applied to [v_2g, v_2g+1]."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        d = cfg.head_dim
        self.lambda_init = lambda_init_fn(layer_idx)
        self.lambda_q1 = nn.Parameter(torch.empty(d))
        self.lambda_k1 = nn.Parameter(torch.empty(d))
        self.lambda_q2 = nn.Parameter(torch.empty(d))
        self.lambda_k2 = nn.Parameter(torch.empty(d))
        self.subln = nn.RMSNorm(2 * d, eps=1e-5, elementwise_affine=True)  # the latest official code: affine
        self.reset_extra_parameters()

    def forward(self, x: torch.Tensor, rope: Rope, *, mask: Mask = None, cache: KVCacheLayer | None = None):
        q, k, v = self.qkv(x, rope, cache)
        return attention_output(self, q, k, v, None, mask)

    def attend(self, q, k, v, mask):
        """o (B, h, T, 2d) with stock kernels: two GQA calls over regrouped queries, the second with each pair's
        value heads swapped; a one-token step runs four calls on strided views of the cache instead (no copy).
        Either way V is read twice: the decode cost the DIFF V2 blog points at."""
        if q.shape[-2] == 1:
            (q1, q2), (k1, k2), (v1, v2) = split_pairs(q), split_pairs(k), split_pairs(v)
            o1 = torch.cat((super().attend(q1, k1, v1, mask), super().attend(q1, k1, v2, mask)), dim=-1)
            o2 = torch.cat((super().attend(q2, k2, v1, mask), super().attend(q2, k2, v2, mask)), dim=-1)
        else:
            k, v = plain_kv(k), plain_kv(v)  # an int8 cache's K/V, dequantised: the regrouping below reshapes them
            qg = self.grouped(q)
            swapped = v.view(v.shape[0], self.n_kv_heads // 2, 2, *v.shape[2:]).flip(2).reshape(v.shape)
            a0, a1 = self.ungrouped(super().attend(qg, k, v, mask))  # a_s @ v_2g+s
            b0, b1 = self.ungrouped(super().attend(qg, k, swapped, mask))  # a_s @ v_2g+1-s
            o1, o2 = torch.cat((a0, b0), dim=-1), torch.cat((b1, a1), dim=-1)  # a_s @ [v_2g, v_2g+1]
        return torch.stack((o1, o2), dim=2).flatten(1, 2)

    def combine(self, o, mix):
        o1, o2 = split_pairs(o)
        diff = upcast(o1) - self.lambda_full() * upcast(o2)  # (B, h/2, T, 2d)
        normed = F.rms_norm(diff, (diff.shape[-1],), self.subln.weight.to(diff.dtype), self.subln.eps)
        return (normed * (1.0 - self.lambda_init)).to(o.dtype)

    def lambda_full(self) -> torch.Tensor:
        lam1 = torch.exp((upcast(self.lambda_q1) * upcast(self.lambda_k1)).sum())
        lam2 = torch.exp((upcast(self.lambda_q2) * upcast(self.lambda_k2)).sum())
        return lam1 - lam2 + self.lambda_init

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        if cfg.n_heads % 2 or cfg.n_kv_heads % 2:
            raise ConfigError(
                f"n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}: attention='diff_v1' needs both even "
                "(V1 runs n_heads/2 differential heads on n_kv_heads/2 KV groups with 2·head_dim values)"
            )

    @classmethod
    def attention_flops(cls, cfg, seq_len):
        return 2 * seq_len * (cls.query_heads(cfg) * cfg.head_dim) * 3  # QKᵀ over d, P·V over 2d-wide values

    def reset_extra_parameters(self) -> None:
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, mean=0.0, std=0.1)

    def grouped(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, h, T, d) reordered (g, s, r): differential head i = g·r_n + r uses query heads 2i (s=0) and 2i+1
        (s=1), so in GQA order query head (g, s, r) reads K head 2g + s, the K head of its map."""
        b, hq, t, d = q.shape
        groups, rep = self.n_kv_heads // 2, self.n_heads // self.n_kv_heads
        return q.view(b, groups, rep, 2, t, d).transpose(2, 3).reshape(b, hq, t, d)

    def ungrouped(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h, T, ·) in (g, s, r) order → the s=0 and s=1 halves, (B, h/2, T, ·) each, in head order."""
        b, hq = x.shape[:2]
        x = x.view(b, self.n_kv_heads // 2, 2, hq // self.n_kv_heads, *x.shape[2:])
        return x[:, :, 0].flatten(1, 2), x[:, :, 1].flatten(1, 2)

    def maps(self, q, k, mix, mask):
        mask = explicit_mask(mask, q.shape[-2], k.shape[-2], q.device)
        _, probs, logits = eager_attention(self.grouped(q), k, k, mask=mask)
        a1, a2 = self.ungrouped(probs)
        lam = self.lambda_full().to(a1.dtype).expand(a1.shape[:3])
        return AttentionMaps(self.name, a1, a2, lam, logits)
