"""What every attention variant shares: the projections, RoPE, the KV cache, init, and its entry in the registry.

A variant is a subclass of :class:`Attention` that registers itself with :func:`register`. It owns its rules:
how many query heads it runs (``query_heads``), which config fields it accepts (``check_config``), its extra
weights and their init (``init_rules``), and, when its attention is not h·T² softmax work, its FLOPs.
Shapes: x (B, T, D); q (B, Hq, T, d); k, v (B, Hkv, S, d); the context before W_O is (B, T, h·d).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple, Protocol

import torch
from torch import nn

from ..config import ATTENTION_VARIANTS, ModelConfig
from ..errors import ConfigError
from ..kernels import Mask, apply_rope_qk, eager_attention, explicit_mask
from . import dispatch


class KVCacheLayer(Protocol):
    """One layer's KV cache: appends this step's K/V (B, Hkv, T, d) and returns the full K/V to attend to."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def register(name: str):
    """Class decorator: make a variant selectable as ``ModelConfig(attention=name)``."""

    def add(cls: type[Attention]) -> type[Attention]:
        cls.name = name
        ATTENTION_VARIANTS[name] = cls
        return cls

    return add


class Attention(nn.Module):
    """Bias-free ``q_proj``/``k_proj``/``v_proj``/``o_proj``, RoPE on q and k, an optional KV cache.

    Subclasses write ``forward`` (project, then hand q, k, v and their per-token input to
    :func:`~diffv2.attention.dispatch.attention_output`) and ``combine``: the definition of how the per-query-head
    outputs (B, Hq, T, d) become the (B, h, T, d) context that ``o_proj`` reads.
    """

    name: ClassVar[str]
    logit_transform = None  # a map of the logits before the softmax, eager path only (diffv2.diagnostics)
    kv_transform = None  # a map of the rotated keys and of the values before they are cached (diffv2.diagnostics)
    # linears that read the layer input x; generation fuses them into one matmul (diffv2.generate.fusion)
    input_projections: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj")
    # the linear whose output is ``combine``'s per-token input (diagnostics recompute it from x), if any
    mix_projection: ClassVar[str | None] = None

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_query_heads = self.query_heads(cfg)
        self.backend = cfg.backend
        d, dm = cfg.head_dim, cfg.d_model
        self.q_proj = nn.Linear(dm, self.n_query_heads * d, bias=False)
        self.k_proj = nn.Linear(dm, cfg.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(dm, cfg.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * d, dm, bias=False)

    # ------------------------------------------------------------------ rules of the variant
    @classmethod
    def query_heads(cls, cfg: ModelConfig) -> int:
        return cfg.n_heads

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        """Fields only DIFF V2 reads must stay at their defaults elsewhere, so a config says what runs."""
        if cfg.pairing != "interleaved" or cfg.lambda_mode != "sigmoid":
            raise ConfigError(
                f"pairing={cfg.pairing!r}, lambda_mode={cfg.lambda_mode!r}: these ablations apply only to "
                f"attention='diff_v2' (got attention={cfg.attention!r}); leave them at their defaults"
            )

    @classmethod
    def attention_flops(cls, cfg: ModelConfig, seq_len: int) -> float:
        """Forward FLOPs of the softmax attention per token and layer: QKᵀ and P·V over ``seq_len`` keys for every
        query head (no halving for causality, PaLM's MFU convention)."""
        return 2 * seq_len * 2 * cls.query_heads(cfg) * cfg.head_dim

    def init_rules(self, std: float, out_std: float) -> dict[nn.Module, float | None]:
        """Init std of each of this layer's linears (None: PyTorch's default); the model applies them."""
        rules: dict[nn.Module, float | None] = {m: std for m in (self.q_proj, self.k_proj, self.v_proj)}
        rules[self.o_proj] = out_std
        return rules

    def reset_extra_parameters(self) -> None:
        """Init of the variant's own parameters that are not linears (DIFF V1's λ vectors)."""

    # ------------------------------------------------------------------ shared steps of the forward
    def qkv(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCacheLayer | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, Hq, T, d) and k, v (B, Hkv, S, d): projected, rotated, and appended to the cache if given."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_query_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = (r.transpose(1, 2) for r in apply_rope_qk(q, k, *rope))
        if self.kv_transform is not None:
            k, v = self.kv_transform(k), self.kv_transform(v)
        if cache is not None:
            k, v = cache.update(k, v)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Softmax attention of the query heads, (B, Hq, T, d), through the dispatch table's softmax rows."""
        return dispatch.attend(self, q, k, v, mask)

    def combine(self, o: torch.Tensor, mix: torch.Tensor | None) -> torch.Tensor:
        """The context (B, h, T, d) from the per-query-head outputs o (B, Hq, T, d) and the per-token input
        ``mix`` (B, T, ·) the forward projected (None if the variant has none)."""
        raise NotImplementedError

    def maps(self, q: torch.Tensor, k: torch.Tensor, mix: torch.Tensor | None, mask: Mask) -> AttentionMaps:
        """Diagnostics: this layer's softmax maps per output head, computed eagerly from its q and k."""
        _, probs, logits = eager_attention(q, k, k, mask=explicit_mask(mask, q.shape[-2], k.shape[-2], q.device))
        return AttentionMaps(self.name, probs, None, None, logits)


class AttentionMaps(NamedTuple):
    """A layer's attention for diagnostics. ``kind``: the variant; ``a1`` (B, heads, T, S): the softmax map of
    each output head (the first of its pair for DIFF); ``a2``: the second map (DIFF) or None; ``weight`` (B, heads,
    T): the subtraction weight per query (σ(λ) for DIFF V2, V1's λ broadcast) or None; ``logits`` (B, Hq, T, S):
    q·kᵀ/√d of every query head (in the order the kernel ran them), masked keys at -inf."""

    kind: str
    a1: torch.Tensor
    a2: torch.Tensor | None
    weight: torch.Tensor | None
    logits: torch.Tensor

    @property
    def effective(self) -> torch.Tensor:
        """The map the context is built from: a¹ − weight·a² (a¹ alone without a second map)."""
        return self.a1 if self.a2 is None else self.a1 - self.weight[..., None] * self.a2
