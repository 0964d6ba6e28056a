"""Attention: the variants' definitions (:mod:`.variants`, :mod:`.diff_v1`), what they share (:mod:`.base`), and
the table of faster implementations (:mod:`.dispatch`). Importing this package registers every variant."""

from .base import Attention, AttentionMaps, KVCacheLayer, register
from .common import split_pairs, upcast
from .diff_v1 import DiffV1Attention, lambda_init_fn
from .dispatch import ROUTES, attention_output, forced_routes, traced_routes
from .variants import BaselineAttention, DiffV2Attention, GatedAttention, subtract_pairs


def build_attention(cfg, layer_idx: int) -> Attention:
    """The attention layer ``layer_idx`` of a model with config ``cfg``."""
    return cfg.variant(cfg, layer_idx)


__all__ = [
    "ROUTES",
    "Attention",
    "AttentionMaps",
    "BaselineAttention",
    "DiffV1Attention",
    "DiffV2Attention",
    "GatedAttention",
    "KVCacheLayer",
    "attention_output",
    "build_attention",
    "forced_routes",
    "lambda_init_fn",
    "register",
    "split_pairs",
    "subtract_pairs",
    "traced_routes",
    "upcast",
]
