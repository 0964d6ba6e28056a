"""A decoder-only LM: embedding → n_layers × (pre-RMSNorm attention + pre-RMSNorm SwiGLU) → RMSNorm → LM head.

The attention variant comes from ``cfg.attention``; everything else is identical across variants so a
comparison isolates the attention change. Parallelism, caching policy and training live elsewhere.

Init (GPT-2/Megatron style): embeddings and linear weights N(0, init_std); the two residual-branch outputs
(``o_proj``, ``down_proj``) N(0, init_std/√(2·n_layers)), o_proj's times ``o_proj_init_scale`` (default 1);
norms 1. A variant may ask for other rules for its own weights (``Attention.init_rules``): DIFF V2's
``lambda_proj`` keeps PyTorch's default U(±1/√D), as the reference code, so σ(λ) starts near 0.5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, KVCacheLayer, build_attention
from .config import ModelConfig
from .errors import ConfigError
from .kernels import Mask, rope_cos_sin


class SwiGLU(nn.Module):
    input_projections = ("gate_proj", "up_proj")  # read the same input: generation fuses them into one matmul

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn: Attention = build_attention(cfg, layer_idx)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, h, rope, mask=None, cache=None):
        h = h + self.attn(self.attn_norm(h), rope, mask=mask, cache=cache)
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
        rules: dict[nn.Module, float | None] = {}  # linear -> init std (None: PyTorch's default)
        for layer in self.layers:
            rules.update(layer.attn.init_rules(std, out_std * self.cfg.o_proj_init_scale))
            rules.update({layer.mlp.gate_proj: std, layer.mlp.up_proj: std, layer.mlp.down_proj: out_std})
        for module in self.modules():  # in registration order, so a seed gives the same weights as it always has
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, nn.Linear) and not (self.cfg.tie_embeddings and module is self.lm_head):
                rule = rules.get(module, std)
                if rule is None:
                    module.reset_parameters()
                else:
                    nn.init.normal_(module.weight, 0.0, rule)
            elif isinstance(module, nn.RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
            if isinstance(module, Attention):
                module.reset_extra_parameters()

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        mask: Mask = None,
        caches: list[KVCacheLayer] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab); with ``targets`` (B, T, -100 = ignore) also the mean cross-entropy.

        ``positions`` (B or 1, T) default to 0..T-1; ``mask`` (bool, broadcastable to (B, 1, T, S), or a
        :class:`~diffv2.kernels.KVWindow` of valid cache slots per row) replaces the causal rule; ``caches``
        holds one KV cache per layer. Diagnostics hook in from outside (:mod:`diffv2.diagnostics`).
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
            h = layer(h, rope, mask, caches[i] if caches is not None else None)
        logits = self.lm_head(self.norm(h))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

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

        Attention counts every query head the kernel runs (2h for DIFF V2, V1's 2d-wide values) over the full
        ``seq_len`` without halving for causality, as in PaLM's MFU convention (``Attention.attention_flops``).
        """
        cfg, t = self.cfg, seq_len or self.cfg.max_seq_len
        n = self.num_params()
        matmul = n["attention"] + n["mlp"] + self.lm_head.weight.numel()
        return 6 * matmul + 3 * cfg.variant.attention_flops(cfg, t) * cfg.n_layers
