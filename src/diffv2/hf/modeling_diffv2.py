"""``DiffV2ForCausalLM``: the diffv2 decoder LM (DIFF V2, DIFF V1 or baseline) as a transformers model.

Self-contained on purpose (imports torch, transformers and the config file beside it only): ``save_pretrained``
copies it next to the weights so a folder loads with ``trust_remote_code=True`` without the diffv2 package.

Module names equal the native ``diffv2.Transformer``'s (``tok_embeddings``, ``layers.{i}.attn.q_proj``,
``lambda_proj``, ``subln``, ``attn_norm``, ``mlp.gate_proj``, ``norm``, ``lm_head``...), so state dicts map 1:1.
The math mirrors ``diffv2.attention``: RoPE (rotate_half) in fp32, one attention call with 2h query heads for
DIFF V2 whose query head j reads KV head j // (2h/h_kv), then head i = head 2i − σ(λ_i)·head 2i+1 in fp32;
DIFF V1 as two calls over regrouped queries with the value heads of each pair swapped. Attention runs through
transformers' attention interface (eager, sdpa, flash, flex), the KV cache is a stock ``Cache`` holding only
the h_kv K/V heads.
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


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos/sin tables (positions.shape + (head_dim,)) in fp32 or wider, the rotate_half layout."""
    exponent = torch.arange(0, head_dim, 2, dtype=dtype, device=positions.device) / head_dim
    freqs = positions.to(dtype)[..., None] * (1.0 / theta**exponent)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, d) with cos/sin (B or 1, T, d); the math runs in the tables' (wide) dtype."""
    half = x.shape[-1] // 2
    xf = x.to(cos.dtype)
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to fp32; leave fp32/fp64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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
        if self.kind == "diff_v2" and config.lambda_mode != "none":
            self.lambda_proj = nn.Linear(dm, self.n_heads, bias=False)
            self.lambda_proj.diffv2_lambda = True  # init: PyTorch's default U(±1/√D), σ(λ) near 0.5
        if self.kind == "diff_v1":
            self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_idx)
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
        q = apply_rope(self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2), cos, sin)
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
            ctx, weights = self._mix_v1(q, v, attend)
        else:
            out, weights = attend(q, v)
            ctx = self._mix_v2(out, x) if self.kind == "diff_v2" else out
        return self.o_proj(ctx.transpose(1, 2).reshape(b, t, -1)), weights

    def _mix_v2(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, 2h, T, d) → (B, h, T, d): o_2i − σ(λ_i)·o_2i+1 (or the split pairing), in fp32."""
        if self.config.pairing == "interleaved":
            o1, o2 = out[:, 0::2], out[:, 1::2]
        else:
            o1, o2 = out[:, : self.n_heads], out[:, self.n_heads :]
        if self.config.lambda_mode == "none":
            s = torch.ones(*x.shape[:2], self.n_heads, device=x.device, dtype=_wide(x).dtype)
        else:
            lam = _wide(self.lambda_proj(x))
            s = torch.sigmoid(lam) if self.config.lambda_mode == "sigmoid" else lam
        s = s.transpose(1, 2)[..., None]  # (B, h, T, 1)
        return (_wide(o1) - s * _wide(o2)).to(out.dtype)  # fp32: both terms can be tiny for diffuse heads

    def lambda_full(self) -> torch.Tensor:
        lam1 = torch.exp((_wide(self.lambda_q1) * _wide(self.lambda_k1)).sum())
        lam2 = torch.exp((_wide(self.lambda_q2) * _wide(self.lambda_k2)).sum())
        return lam1 - lam2 + self.lambda_init

    def _mix_v1(self, q: torch.Tensor, v: torch.Tensor, attend: Callable) -> tuple[torch.Tensor, Any]:
        """Differential head i = g·rep + r uses q heads 2i, 2i+1, K heads 2g, 2g+1 and the value [v_2g, v_2g+1]."""
        b, hq, t, d = q.shape
        groups, rep = self.n_kv_heads // 2, self.n_heads // self.n_kv_heads
        # order the q heads (group, member of the pair, r) so q1 of group g reads KV head 2g and q2 reads 2g+1
        q_grouped = q.view(b, groups, rep, 2, t, d).transpose(2, 3).reshape(b, hq, t, d)
        v_swapped = v.view(b, groups, 2, -1, d).flip(2).reshape(v.shape)
        out_a, weights = attend(q_grouped, v)  # a_s @ v_{2g+s}
        out_b, _ = attend(q_grouped, v_swapped)  # a_s @ v_{2g+1-s}
        out_a, out_b = (o.reshape(b, groups, 2, rep, t, d) for o in (out_a, out_b))
        attn1 = torch.cat((out_a[:, :, 0], out_b[:, :, 0]), dim=-1)
        attn2 = torch.cat((out_b[:, :, 1], out_a[:, :, 1]), dim=-1)
        diff = _wide(attn1) - self.lambda_full() * _wide(attn2)
        normed = F.rms_norm(diff, (2 * d,), self.subln.weight.to(diff.dtype), self.subln.eps)
        ctx = (normed * (1.0 - self.lambda_init)).to(q.dtype).reshape(b, hq // 2, t, 2 * d)
        return ctx, weights


class DiffV2MLP(nn.Module):
    def __init__(self, config: DiffV2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj.diffv2_residual = True

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
