"""Parameter counts and parameter-matched configurations: the controls a fair comparison needs.

Counts come from the modules themselves, built on the meta device (no memory, no formulas to keep in step with
the code). Matching changes only ``ffn_hidden``: SwiGLU has 3·D weights per hidden unit, so two models match to
within 3·D·n_layers/2 parameters.
"""

from __future__ import annotations

import torch

from .attention import build_attention
from .config import ModelConfig
from .errors import ConfigError
from .model import Transformer


def _meta(build, *args):
    with torch.device("meta"):
        return build(*args)


def total_params(cfg: ModelConfig) -> int:
    """All parameters of a model with this config (tied weights once)."""
    return _meta(Transformer, cfg).num_params()["total"]


def total_params_fast(cfg: ModelConfig) -> int:
    """:func:`total_params` from a one- and a two-layer build (every layer has the same shapes), so a config of
    thousands of wide layers is counted at once."""
    one, two = total_params(cfg.replace(n_layers=1)), total_params(cfg.replace(n_layers=2))
    return one + (cfg.n_layers - 1) * (two - one)


def attention_params(cfg: ModelConfig) -> int:
    """The weights of one attention layer (its own norms included, the block's pre-norm not)."""
    return sum(p.numel() for p in _meta(build_attention, cfg, 0).parameters())


def ffn_matched(cfg: ModelConfig, target: ModelConfig) -> ModelConfig:
    """``cfg`` with ``ffn_hidden`` changed so that its total parameters match ``target``'s as closely as whole
    hidden units allow."""
    per_unit = 3 * cfg.d_model * cfg.n_layers
    hidden = cfg.ffn_hidden + round((total_params(target) - total_params(cfg)) / per_unit)
    if hidden < 1:
        raise ConfigError(f"ffn_hidden: matching {target.attention!r}'s parameters would need {hidden} hidden units")
    return cfg.replace(ffn_hidden=hidden)


def _as(cfg: ModelConfig, attention: str, **changes) -> ModelConfig:
    return cfg.replace(attention=attention, pairing="interleaved", lambda_mode="sigmoid", **changes)


def baseline_ffn_matched(cfg: ModelConfig) -> ModelConfig:
    """A same-h baseline whose SwiGLU is widened to DIFF V2's total parameters (DIFF V2 adds h·d·D for its second
    query half and h·D for ``lambda_proj`` per layer)."""
    return ffn_matched(_as(cfg, "baseline"), _as(cfg, "diff_v2"))


def baseline_1p5h(cfg: ModelConfig) -> ModelConfig:
    """The blog's ablation 4: a baseline with 1.5h heads, whose weights equal DIFF V2's minus ``lambda_proj``."""
    if (3 * cfg.n_heads) % 2:
        raise ConfigError(f"n_heads={cfg.n_heads}: must be even to build a 1.5h-head baseline")
    heads = 3 * cfg.n_heads // 2
    if heads % cfg.n_kv_heads:
        raise ConfigError(
            f"n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}: 1.5·n_heads={heads} is not divisible by "
            "n_kv_heads; pick n_kv_heads dividing 1.5·n_heads"
        )
    return _as(cfg, "baseline", n_heads=heads)


def baseline_2h_matched(cfg: ModelConfig) -> ModelConfig:
    """A baseline with DIFF V2's 2h query heads (the blog's "same query dimension" comparison; its W_O is 2h·d
    wide), SwiGLU shrunk to DIFF V2's total parameters."""
    return ffn_matched(_as(cfg, "baseline", n_heads=2 * cfg.n_heads), _as(cfg, "diff_v2"))


def gated_ffn_matched(cfg: ModelConfig) -> ModelConfig:
    """The gated-attention control with its SwiGLU widened to DIFF V2's total parameters."""
    return ffn_matched(_as(cfg, "gated"), _as(cfg, "diff_v2"))
