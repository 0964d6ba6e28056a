"""The variants every model-level test runs, and small models to run them on."""

from __future__ import annotations

import pytest
import torch

from diffv2 import ModelConfig, Transformer

# every registered variant and every DIFF V2 ablation: (id, config fields)
VARIANTS: dict[str, dict] = {
    "baseline": dict(attention="baseline"),
    "gated": dict(attention="gated"),
    "diff_v1": dict(attention="diff_v1"),
    "diff_v2": dict(attention="diff_v2"),
    "v2_split": dict(attention="diff_v2", pairing="split"),
    "v2_no_lambda": dict(attention="diff_v2", lambda_mode="none"),
    "v2_linear": dict(attention="diff_v2", lambda_mode="linear"),
    "v2_const": dict(attention="diff_v2", lambda_mode="const"),
}
VARIANT_PARAMS = [pytest.param(kw, id=name) for name, kw in VARIANTS.items()]
TINY = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=64)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def kernel_sized(**kw) -> ModelConfig:
    """Small, but with head_dim 64: the smallest the Triton kernels take, so the GPU paths are the real ones."""
    return tiny(**{**dict(d_model=128, head_dim=64, ffn_hidden=128), **kw})


def randomize(model: Transformer, seed: int) -> Transformer:
    """Give every weight (norm gains included) a random value, so no term can hide behind an init of 1 or 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model
