"""``DiffV2ForCausalLM``: the diffv2 decoder LM (DIFF V2, DIFF V1 or baseline) as a transformers model.

Self-contained on purpose (imports torch, transformers and the config file beside it only): ``save_pretrained``
copies it next to the weights so a folder loads with ``trust_remote_code=True`` without the diffv2 package.

Module names equal the native ``diffv2.Transformer``'s (``tok_embeddings``, ``layers.{i}.attn.q_proj``,
``lambda_proj``, ``subln``, ``attn_norm``, ``mlp.gate_proj``, ``norm``, ``lm_head``...), so state dicts map 1:1.
The math is the native definition's: every block restated from ``diffv2`` carries a ``# Copied from
diffv2.<module>.<name>`` line (``with A->B`` names a rename), and ``tests/test_hf_copies.py`` fails when a copy
and its source differ. What differs on purpose: attention runs through transformers' attention interface
(eager, sdpa, flash, flex; ``eager_attention`` below is that interface's signature), the KV cache is a stock
``Cache`` holding only the h_kv K/V heads, DIFF V1 always makes two calls over regrouped queries, and init
follows transformers' ``_init_weights`` (the same distributions as the native ``Transformer.reset_parameters``).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_diffv2 import DiffV2Config

# transformers renamed the cache argument/output field `past_key_values` to `cache` during 5.x; use the one
# this installation's outputs and generate() speak.
_CACHE_FIELD = next(
    f.name for f in dataclasses.fields(CausalLMOutputWithPast) if f.name in ("cache", "past_key_values")
)


# Copied from diffv2.kernels.rope.rope_cos_sin
def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape ``positions.shape + (head_dim,)`` in ``dtype`` (fp32 or wider)."""
    exponent = torch.arange(0, head_dim, 2, dtype=dtype, device=positions.device) / head_dim
    freqs = positions.to(dtype)[..., None] * (1.0 / theta**exponent)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


# Copied from diffv2.kernels.rope.apply_rope
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape (B, T, H, d) with cos/sin of shape (B or 1, T, d); math in fp32 or wider."""
    half = x.shape[-1] // 2
    xf = x.to(cos.dtype)
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (xf * cos + rotated * sin).to(x.dtype)


# Copied from diffv2.attention.common.upcast
def upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to fp32; fp32/fp64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# Copied from diffv2.attention.common.split_pairs
def split_pairs(heads: torch.Tensor, interleaved: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2h, ...) → the two members of each pair, (B, h, ...) each (views): heads (2i, 2i+1), or (i, i+h)."""
    if interleaved:
        return heads[:, 0::2], heads[:, 1::2]
    return heads.chunk(2, dim=1)


# Copied from diffv2.attention.variants.subtract_pairs
def subtract_pairs(o: torch.Tensor, weight: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """DIFF V2's combine: o (B, 2h, T, d), weight (B, h, T) → o₂ᵢ − weightᵢ·o₂ᵢ₊₁ (B, h, T, d), in fp32 (both
    terms can be tiny for diffuse heads) and back in o's dtype."""
    o1, o2 = split_pairs(o, interleaved)
    return (upcast(o1) - weight[..., None] * upcast(o2)).to(o.dtype)


# Copied from diffv2.attention.diff_v1.lambda_init_fn
def lambda_init_fn(layer_idx: int) -> float:
    """λ_init with a 0-based layer index: layer 0 gets 0.2 (the paper's 1-based l − 1)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention in fp32 (fp64 for a float64 model). q (B, Hq, T, d), k/v (B, Hkv, S, d);
    query head j reads KV head j // (Hq/Hkv). Returns (B, T, Hq, d) and the probabilities (B, Hq, T, S)."""
    groups = query.shape[1] // key.shape[1]
    wide = torch.promote_types(query.dtype, torch.float32)
    k = key.to(wide).repeat_interleave(groups, dim=1)
    v = value.to(wide).repeat_interleave(groups, dim=1)
    logits = torch.matmul(query.to(wide), k.transpose(2, 3)) * scaling
    t, s = logits.shape[-2:]
    if attention_mask is None and t > 1:  # no mask given: causal, queries aligned to the last t keys
        attention_mask = (
            torch.arange(s, device=query.device)[None] <= torch.arange(s - t, s, device=query.device)[:, None]
        )
    if attention_mask is not None:
        attention_mask = attention_mask[..., :s]
        if attention_mask.dtype == torch.bool:
            # the dtype minimum rather than -inf: a fully masked (padding) row then stays finite
            logits = logits.masked_fill(~attention_mask, torch.finfo(wide).min)
        else:
            logits = logits + attention_mask.to(wide)
    probs = torch.softmax(logits, dim=-1)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), probs.to(query.dtype)


class DiffV2Attention(nn.Module):
    """Baseline GQA, DIFF V1 or DIFF V2 attention (``config.attention``), parameter-for-parameter the native one."""

    def __init__(self, config: DiffV2Config, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx, self.kind = config, layer_idx, config.attention
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.pairing, self.lambda_mode = config.pairing, config.lambda_mode
        self.n_query_heads = config.n_query_heads
        self.num_key_value_groups = self.n_query_heads // self.n_kv_heads  # read by the sdpa/flex interfaces
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        d, dm = self.head_dim, config.hidden_size
        self.q_proj = nn.Linear(dm, self.n_query_heads * d, bias=False)
        self.k_proj = nn.Linear(dm, self.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(dm, self.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, dm, bias=False)
        self.o_proj.diffv2_residual = True  # init: N(0, std/√(2L)) like the native model
        self.lambda_proj = None
        if self.kind == "diff_v2" and config.lambda_mode in ("sigmoid", "linear"):
            self.lambda_proj = nn.Linear(dm, self.n_heads, bias=False)
            self.lambda_proj.diffv2_lambda = True  # init: PyTorch's default U(±1/√D), σ(λ) near 0.5
        if self.kind == "diff_v1":
            self.lambda_init = lambda_init_fn(layer_idx)
            self.lambda_q1 = nn.Parameter(torch.zeros(d))
            self.lambda_k1 = nn.Parameter(torch.zeros(d))
            self.lambda_q2 = nn.Parameter(torch.zeros(d))
            self.lambda_k2 = nn.Parameter(torch.zeros(d))
            self.subln = nn.RMSNorm(2 * d, eps=1e-5, elementwise_affine=True)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, _ = x.shape
        cos, sin = rope
        q = apply_rope(self.q_proj(x).view(b, t, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(b, t, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)

        def attend(query: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            dropout = 0.0  # the native model has no attention dropout
            out, weights = interface(
                self, query, k, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
            )
            return out.transpose(1, 2), weights  # (B, Hq, T, d), as the native mixing code expects

        if self.kind == "diff_v1":
            o, weights = self._attend_v1(q, v, attend)
            ctx = self.combine_v1(o, None)
        else:
            o, weights = attend(q, v)
            ctx = o
            if self.kind == "diff_v2":
                lam = self.lambda_proj(x) if self.lambda_proj is not None else None  # (B, T, h): λ per token, head
                ctx = self.combine_v2(o, lam)
        return self.o_proj(ctx.transpose(1, 2).reshape(b, t, -1)), weights

    # Copied from diffv2.attention.variants.DiffV2Attention.combine with combine->combine_v2
    def combine_v2(self, o, lam):
        return subtract_pairs(o, self.weight(lam, like=o), self.pairing == "interleaved")

    # Copied from diffv2.attention.variants.DiffV2Attention.weight
    def weight(self, lam: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The subtraction weight (B, h, T), fp32: σ(λ), or the ablation's. ``like``: any (B, ·, T, ·) tensor."""
        if self.lambda_mode == "sigmoid":
            return torch.sigmoid(upcast(lam)).transpose(1, 2)
        if self.lambda_mode == "linear":
            return upcast(lam).transpose(1, 2)
        b, t = like.shape[0], like.shape[-2]
        value = 1.0 if self.lambda_mode == "none" else 0.5
        return torch.full((b, self.n_heads, t), value, dtype=upcast(like).dtype, device=like.device)

    def _attend_v1(self, q: torch.Tensor, v: torch.Tensor, attend: Callable) -> tuple[torch.Tensor, Any]:
        """o (B, h, T, 2d) as the native ``DiffV1Attention.attend`` lays it out (pairs of query heads with their
        2d-wide values), from two calls over regrouped queries, the second with each pair's value heads swapped."""
        qg = self.grouped(q)
        swapped = v.view(v.shape[0], self.n_kv_heads // 2, 2, *v.shape[2:]).flip(2).reshape(v.shape)
        out_a, weights = attend(qg, v)
        a0, a1 = self.ungrouped(out_a)  # a_s @ v_2g+s
        b0, b1 = self.ungrouped(attend(qg, swapped)[0])  # a_s @ v_2g+1-s
        o1, o2 = torch.cat((a0, b0), dim=-1), torch.cat((b1, a1), dim=-1)  # a_s @ [v_2g, v_2g+1]
        return torch.stack((o1, o2), dim=2).flatten(1, 2), weights

    # Copied from diffv2.attention.diff_v1.DiffV1Attention.combine with combine->combine_v1
    def combine_v1(self, o, mix):
        o1, o2 = split_pairs(o)
        diff = upcast(o1) - self.lambda_full() * upcast(o2)  # (B, h/2, T, 2d)
        normed = F.rms_norm(diff, (diff.shape[-1],), self.subln.weight.to(diff.dtype), self.subln.eps)
        return (normed * (1.0 - self.lambda_init)).to(o.dtype)

    # Copied from diffv2.attention.diff_v1.DiffV1Attention.lambda_full
    def lambda_full(self) -> torch.Tensor:
        lam1 = torch.exp((upcast(self.lambda_q1) * upcast(self.lambda_k1)).sum())
        lam2 = torch.exp((upcast(self.lambda_q2) * upcast(self.lambda_k2)).sum())
        return lam1 - lam2 + self.lambda_init

    # Copied from diffv2.attention.diff_v1.DiffV1Attention.grouped
    def grouped(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, h, T, d) reordered (g, s, r): differential head i = g·r_n + r uses query heads 2i (s=0) and 2i+1
        (s=1), so in GQA order query head (g, s, r) reads K head 2g + s, the K head of its map."""
        b, hq, t, d = q.shape
        groups, rep = self.n_kv_heads // 2, self.n_heads // self.n_kv_heads
        return q.view(b, groups, rep, 2, t, d).transpose(2, 3).reshape(b, hq, t, d)

    # Copied from diffv2.attention.diff_v1.DiffV1Attention.ungrouped
    def ungrouped(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h, T, ·) in (g, s, r) order → the s=0 and s=1 halves, (B, h/2, T, ·) each, in head order."""
        b, hq = x.shape[:2]
        x = x.view(b, self.n_kv_heads // 2, 2, hq // self.n_kv_heads, *x.shape[2:])
        return x[:, :, 0].flatten(1, 2), x[:, :, 1].flatten(1, 2)


class DiffV2MLP(nn.Module):
    def __init__(self, config: DiffV2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj.diffv2_residual = True

    # Copied from diffv2.model.SwiGLU.forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DiffV2Block(GradientCheckpointingLayer):
    def __init__(self, config: DiffV2Config, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = DiffV2Attention(config, layer_idx)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = DiffV2MLP(config)

    def forward(self, h, rope, attention_mask=None, cache=None, **kwargs) -> tuple[torch.Tensor, Any]:
        a, weights = self.attn(self.attn_norm(h), rope, attention_mask=attention_mask, cache=cache, **kwargs)
        h = h + a
        return h + self.mlp(self.mlp_norm(h)), weights


class DiffV2PreTrainedModel(PreTrainedModel):
    config_class = DiffV2Config
    base_model_prefix = ""  # flat layout: the weight names are the native model's
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["DiffV2Block"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The native init: N(0, std); residual outputs N(0, std/√(2L)); ``lambda_proj`` PyTorch's U(±1/√D);
        DIFF V1's λ vectors N(0, 0.1); norm gains 1."""
        std = self.config.initializer_range
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, 0.0, std)
        elif isinstance(module, nn.Linear):
            if getattr(module, "diffv2_lambda", False):
                bound = 1.0 / math.sqrt(module.in_features)
                init.uniform_(module.weight, -bound, bound)
            elif getattr(module, "diffv2_residual", False):
                init.normal_(module.weight, 0.0, std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                init.normal_(module.weight, 0.0, std)
        elif isinstance(module, nn.RMSNorm) and module.weight is not None:
            init.ones_(module.weight)
        if isinstance(module, DiffV2Attention) and module.kind == "diff_v1":
            for p in (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2):
                init.normal_(p, 0.0, 0.1)


class DiffV2ForCausalLM(DiffV2PreTrainedModel, GenerationMixin):
    """Embedding → L × (pre-RMSNorm attention + pre-RMSNorm SwiGLU) → RMSNorm → LM head, with HF generation."""

    # tied only when config.tie_word_embeddings
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "tok_embeddings.weight"}

    def __init__(self, config: DiffV2Config) -> None:
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DiffV2Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """``labels`` follow the transformers convention (aligned with ``input_ids``, shifted inside the loss).
        The cache comes as ``cache`` (newer transformers) or ``past_key_values`` (older) and goes back under the
        name this installation uses."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        h = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(h.shape[1], device=h.device) + past)[None]
        # positional: the cache parameter of create_causal_mask is named differently across 5.x releases
        mask = create_causal_mask(self.config, h, attention_mask, cache, position_ids=position_ids)
        rope_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, rope_dtype)
        hidden_states, attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(h)
            h, weights = layer(h, rope, mask, cache, position_ids=position_ids, **kwargs)
            if output_attentions:
                attentions.append(weights)
        h = self.norm(h)
        if output_hidden_states:
            hidden_states.append(h)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            **{_CACHE_FIELD: cache if use_cache else None},
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()


# save_pretrained writes auto_map into config.json and copies this file and the config file next to the weights
DiffV2Config.register_for_auto_class()
DiffV2ForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["DiffV2Attention", "DiffV2Block", "DiffV2Config", "DiffV2ForCausalLM", "DiffV2PreTrainedModel"]
