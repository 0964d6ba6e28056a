"""A decoder-only LM: embedding → n_layers × (pre-RMSNorm attention + pre-RMSNorm SwiGLU) → RMSNorm → LM head.

The attention variant comes from ``cfg.attention``; everything else is identical across variants so a
comparison isolates the attention change. Parallelism, caching policy and training live elsewhere.

Init (GPT-2/Megatron style): embeddings and linear weights N(0, init_std); the two residual-branch outputs
(``o_proj``, ``down_proj``) N(0, init_std/√(2·n_layers)), o_proj's times ``o_proj_init_scale`` (default 1);
``lambda_proj`` keeps the PyTorch default U(±1/√D) of the reference code so σ(λ) starts near 0.5 (spec §6 Q2);
DIFF V1's λ vectors N(0, 0.1); norms 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBase, DiffV1Attention, KVCacheLayer, build_attention
from .config import ModelConfig
from .errors import ConfigError
from .fused import FusableInputs
from .kernels import Mask, rope_cos_sin


class SwiGLU(FusableInputs):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def input_linears(self) -> list[nn.Linear]:
        return [self.gate_proj, self.up_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project_inputs(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn: AttentionBase = build_attention(cfg, layer_idx)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, h, rope, mask=None, cache=None, stats=None):
        h = h + self.attn(self.attn_norm(h), rope, mask=mask, cache=cache, stats=stats)
        return h + self.mlp(self.mlp_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, nn.Linear):
                if name.endswith("lambda_proj"):
                    module.reset_parameters()  # PyTorch default, as in the reference code
                elif name.endswith("o_proj"):
                    nn.init.normal_(module.weight, 0.0, out_std * self.cfg.o_proj_init_scale)
                elif name.endswith("down_proj"):
                    nn.init.normal_(module.weight, 0.0, out_std)
                elif not (self.cfg.tie_embeddings and module is self.lm_head):
                    nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, nn.RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
            if isinstance(module, DiffV1Attention):
                module.reset_lambda()

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        mask: Mask = None,
        caches: list[KVCacheLayer] | None = None,
        stats: list[dict[str, Any]] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab); with ``targets`` (B, T, -100 = ignore) also the mean cross-entropy.

        ``positions`` (B or 1, T) default to 0..T-1; ``mask`` (bool, broadcastable to (B, 1, T, S), or a
        :class:`~diffv2.kernels.KVWindow` of valid cache slots per row) replaces the causal rule; ``caches``
        holds one KV cache per layer; ``stats`` (one dict per layer) switches on the eager diagnostic path and
        receives per-layer measurements.
        """
        t = tokens.shape[1]
        if positions is None:
            if t > self.cfg.max_seq_len:
                raise ConfigError(f"sequence length {t} exceeds max_seq_len={self.cfg.max_seq_len}")
            positions = torch.arange(t, device=tokens.device)[None]
        h = self.tok_embeddings(tokens)
        rope_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        rope = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, rope_dtype)
        for i, layer in enumerate(self.layers):
            layer_stats = stats[i] if stats is not None else None
            h = layer(h, rope, mask, caches[i] if caches is not None else None, layer_stats)
            if layer_stats is not None:
                top = h.detach().float().abs().flatten().topk(min(8, h.numel())).values
                layer_stats["hidden_max"], layer_stats["hidden_topk"] = top[0].item(), top.tolist()
        logits = self.lm_head(self.norm(h))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def diagnose(self, tokens: torch.Tensor, keep_maps: bool = False) -> list[dict[str, Any]]:
        """Per-layer diagnostics on one batch via the eager path (see :class:`~diffv2.attention.AttentionBase`);
        with ``keep_maps`` each layer's dict also holds its attention maps under ``"maps"``."""
        stats: list[dict[str, Any]] = [{"keep_maps": keep_maps} for _ in self.layers]
        self(tokens, stats=stats)
        return stats

    @contextmanager
    def fused_projections(self) -> Iterator[None]:
        """Within this block, without autograd, each layer runs q/k/v(/λ) as one matmul and SwiGLU's gate/up as
        another (see ``diffv2.fused``; generation uses it). Same results, fewer launches; parameters unchanged."""
        fusable = [m for m in self.modules() if isinstance(m, FusableInputs)]
        for m in fusable:
            m.fuse_inputs()
        try:
            yield
        finally:
            for m in fusable:
                m.unfuse_inputs()

    # ------------------------------------------------------------------ accounting
    def num_params(self) -> dict[str, int]:
        """Parameter counts by component; ``total`` counts tied weights once."""

        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        counts = {
            "embedding": self.tok_embeddings.weight.numel(),
            "attention": sum(count(layer.attn) for layer in self.layers),
            "mlp": sum(count(layer.mlp) for layer in self.layers),
            "norm": sum(count(layer.attn_norm) + count(layer.mlp_norm) for layer in self.layers) + count(self.norm),
            "lm_head": 0 if self.cfg.tie_embeddings else self.lm_head.weight.numel(),
        }
        counts["total"] = sum(p.numel() for p in self.parameters())
        counts["non_embedding"] = counts["total"] - counts["embedding"]
        return counts

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6·(matmul weights) + attention score/value work.

        Attention counts every query head the kernel runs (2h for DIFF V2, V1's second value call) over the
        full ``seq_len`` without halving for causality, as in PaLM's MFU convention.
        """
        cfg, t = self.cfg, seq_len or self.cfg.max_seq_len
        n = self.num_params()
        matmul = n["attention"] + n["mlp"] + self.lm_head.weight.numel()
        d, hq = cfg.head_dim, cfg.n_query_heads
        value_width = 2 * hq * d if cfg.attention == "diff_v1" else hq * d  # V1: 2d-wide values
        attn = 2 * t * (hq * d + value_width) * cfg.n_layers  # forward: QKᵀ and P·V
        return 6 * matmul + 3 * attn
