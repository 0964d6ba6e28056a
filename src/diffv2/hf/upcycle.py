"""Upcycling: a Llama / Mistral / Qwen2-style GQA checkpoint (HF format) → DIFF V2, starting at the same function.

Each Llama query head i becomes both heads (2i, 2i+1) of DIFF V2 pair i; both read Llama's KV head
i // (H/H_kv), because DIFF V2's query head j reads KV head j // (2H/H_kv). With ``lambda_proj`` = 0,
σ(λ) = 0.5, so the pair gives o_i − 0.5·o_i = 0.5·o_i (exact in floating point), and W_O × 2 restores o_i:
the converted model computes the original function, and training moves the two heads of a pair apart
(their gradients differ: +1 against −σ(λ)). ``attention="baseline"`` copies the weights as they are.

Anything the native model cannot express is refused with a one-line ``ConfigError`` (config field) or
``CheckpointError`` (weight name): biases (Qwen2's q/k/v biases included: our projections are bias-free),
RoPE scaling, partial rotary, sliding windows shorter than the context, non-SiLU MLPs, quantized weights,
and any weight the Llama layout does not have (e.g. Qwen3's q_norm).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..config import (
    ModelConfig,
    check_bool,
    check_file_name,
    check_int,
    check_number,
    check_positive_int,
    check_table,
    read_json_file,
    show,
)
from ..errors import CheckpointError, ConfigError
from ..model import Transformer

PathLike = str | os.PathLike[str]
MODEL_TYPES = ("llama", "mistral", "qwen2")
_REQUIRED_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Llama names → native names, inside one layer
_LAYER_KEYS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def safetensors_files(folder: Path) -> list[str]:
    """The weight files of an HF folder (``model.safetensors``, or the shards its index names), each a plain name
    inside ``folder`` whose header reads; pickle files (``pytorch_model.bin``) are refused, never opened."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_file(index, CheckpointError).get("weight_map")
        check_table(f"{index}: weight_map", weight_map, CheckpointError)
        if not weight_map:
            raise CheckpointError(f"{index}: weight_map is empty; it must name the shard of every weight")
        files = sorted(
            {check_file_name(f"{index}: weight_map[{k!r}]", v, CheckpointError) for k, v in weight_map.items()}
        )
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise CheckpointError(
            f"{folder}: holds only pickle weights (pytorch_model.bin); only model.safetensors is read, since loading "
            "a pickle can run code. Convert it with transformers (save_pretrained(..., safe_serialization=True))"
        )
    else:
        raise CheckpointError(f"{folder}: no model.safetensors")
    for name in files:
        try:
            with safe_open(str(folder / name), framework="pt", device="cpu") as f:
                f.keys()
        except Exception as e:  # SafetensorError, OSError: a missing, truncated or lying file
            raise CheckpointError(f"{folder / name}: unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    return files


def read_hf_folder(path: PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the safetensors weights (single file or sharded with an index) of an HF folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    config = read_json_file(folder / "config.json", CheckpointError)
    weights: dict[str, torch.Tensor] = {}
    for name in safetensors_files(folder):
        try:
            with safe_open(str(folder / name), framework="pt", device="cpu") as f:
                weights.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
        except Exception as e:
            raise CheckpointError(f"{folder / name}: unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    return config, weights


def llama_model_config(
    config: dict[str, Any], *, attention: str = "diff_v2", max_seq_len: int | None = None
) -> ModelConfig:
    """The native config of an upcycled Llama-style config (config.json as a dict); refuses what cannot map."""
    check_table("config", config)
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"model_type={show(model_type)}: upcycling reads Llama-style models ({', '.join(MODEL_TYPES)})"
        )
    if attention not in ("diff_v2", "baseline"):
        raise ConfigError(
            f"attention={attention!r}: upcycling makes 'diff_v2' (or a 'baseline' copy), not {attention!r}"
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r}: the native SwiGLU uses 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConfigError(
                f"{flag}=True: the native projections are bias-free; biased checkpoints cannot be converted"
            )
    if config.get("quantization_config"):
        raise ConfigError("quantization_config: quantized checkpoints cannot be converted; use a full-precision one")
    sizes = {k: check_positive_int(k, config.get(k)) for k in _REQUIRED_SIZES}
    optional = {k: check_positive_int(k, config[k]) for k in _OPTIONAL_SIZES if config.get(k) is not None}
    if max_seq_len is not None:
        check_positive_int("max_seq_len", max_seq_len)
    theta = _rope_theta(config)
    context = max_seq_len or optional.get("max_position_embeddings", 2048)
    window = _sliding_window(config)
    if window is not None and window < context:
        raise ConfigError(
            f"sliding_window={window}: the native model attends to the whole context ({context} tokens); pass "
            f"--max-seq-len {window} (or less) to keep the conversion exact"
        )
    layer_types = config.get("layer_types") or ["full_attention"]
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise ConfigError(f"layer_types={show(layer_types)}: must be a list of strings")
    layer_types = set(layer_types)
    if layer_types - {"full_attention"} and window is None:
        raise ConfigError(f"layer_types={sorted(layer_types)}: only 'full_attention' layers can be converted")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # copied into the converted config
        ids = config.get(name)
        for token in ids if isinstance(ids, list) and name == "eos_token_id" else [ids]:
            if token is not None:
                check_int(name, token, minimum=-1, maximum=sizes["vocab_size"] - 1)  # -1: none, in old configs
    n_heads = sizes["num_attention_heads"]
    return ModelConfig(
        vocab_size=sizes["vocab_size"],
        d_model=sizes["hidden_size"],
        n_layers=sizes["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=optional.get("num_key_value_heads", n_heads),
        head_dim=optional.get("head_dim", sizes["hidden_size"] // n_heads),
        ffn_hidden=sizes["intermediate_size"],
        rope_theta=theta,
        max_seq_len=context,
        norm_eps=check_number("rms_norm_eps", config.get("rms_norm_eps", 1e-6), positive=True),
        tie_embeddings=check_bool("tie_word_embeddings", config.get("tie_word_embeddings", False)),
        attention=attention,
        init_std=check_number("initializer_range", config.get("initializer_range", 0.02), positive=True),
    )


def _rope_theta(config: dict[str, Any]) -> float:
    # transformers 5 saves `rope_parameters`; 4.x saved `rope_theta` + `rope_scaling` at the top level
    if config.get("rope_parameters") and config.get("rope_scaling"):  # reading one would silently drop the other
        raise ConfigError("rope_parameters and rope_scaling: both given; keep the one your transformers version wrote")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    check_table("rope_parameters", rope)
    if any(isinstance(v, dict) for v in rope.values()):
        raise ConfigError(f"rope_parameters={rope!r}: per-layer-type RoPE cannot be converted")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"rope_scaling.rope_type={rope_type!r}: only plain RoPE (none/'default') can be converted")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"partial_rotary_factor={partial}: the native model rotates every channel")
    return check_number("rope_theta", rope.get("rope_theta", config.get("rope_theta", 10000.0)), positive=True)


def _sliding_window(config: dict[str, Any]) -> int | None:
    """The window that is in effect, or None (Qwen2 stores one that applies only with use_sliding_window)."""
    window = config.get("sliding_window")
    if config.get("model_type") == "qwen2" and not config.get("use_sliding_window", False):
        return None
    return check_positive_int("sliding_window", window) if window else None


def upcycle_state_dict(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Native state dict (fp32) from Llama-layout weights, with the DIFF V2 head duplication when asked."""
    biases = sorted(k for k in weights if k.endswith(".bias"))
    if biases:
        more = f" (+{len(biases) - 1} more)" if len(biases) > 1 else ""
        raise CheckpointError(
            f"{biases[0]}{more}: the native projections are bias-free; biased checkpoints cannot be converted"
        )
    _check_shapes(weights, cfg)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints saved; RoPE is recomputed
            continue
        m = _LAYER.fullmatch(key)
        if key == "model.embed_tokens.weight":
            name = "tok_embeddings.weight"
        elif key == "model.norm.weight":
            name = "norm.weight"
        elif key == "lm_head.weight":
            name = "lm_head.weight"
        elif m and m.group(2) in _LAYER_KEYS and int(m.group(1)) < cfg.n_layers:
            name = f"layers.{m.group(1)}.{_LAYER_KEYS[m.group(2)]}"
        else:
            raise CheckpointError(f"{key}: not part of a Llama-style model; this checkpoint cannot be converted")
        out[name] = tensor.detach().to(torch.float32)
    if cfg.tie_embeddings or "lm_head.weight" not in out:
        if not cfg.tie_embeddings:
            raise CheckpointError("lm_head.weight: missing and tie_word_embeddings is false")
        out["lm_head.weight"] = out["tok_embeddings.weight"]
    if cfg.attention == "diff_v2":
        d = cfg.head_dim
        for i in range(cfg.n_layers):
            q = out.get(f"layers.{i}.attn.q_proj.weight")
            if q is None:
                raise CheckpointError(f"model.layers.{i}.self_attn.q_proj.weight: missing")
            # head i → heads (2i, 2i+1): both read KV head i // (H/H_kv), the same as Llama's head i
            out[f"layers.{i}.attn.q_proj.weight"] = q.view(cfg.n_heads, d, -1).repeat_interleave(2, dim=0).flatten(0, 1)
            out[f"layers.{i}.attn.o_proj.weight"] = out[f"layers.{i}.attn.o_proj.weight"] * 2  # undoes the 0.5
            out[f"layers.{i}.attn.lambda_proj.weight"] = torch.zeros(cfg.n_heads, cfg.d_model)  # σ(0) = 0.5
    return out


def _check_shapes(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Every Llama weight has the shape its config gives, so nothing fails (or reshapes silently) later."""
    d, q, kv, v, ffn = (
        cfg.d_model,
        cfg.n_heads * cfg.head_dim,
        cfg.n_kv_heads * cfg.head_dim,
        cfg.vocab_size,
        cfg.ffn_hidden,
    )
    top = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (ffn, d),
        "mlp.up_proj.weight": (ffn, d),
        "mlp.down_proj.weight": (d, ffn),
    }
    for key, tensor in weights.items():
        m = _LAYER.fullmatch(key)
        want = top.get(key) or (layer.get(m.group(2)) if m else None)
        if not tensor.is_floating_point():  # casting int weights to fp32 would "convert" a quantised or broken file
            raise CheckpointError(f"{key}: {tensor.dtype} weights; only floating-point checkpoints can be converted")
        if want is not None and tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{key}: shape {tuple(tensor.shape)}, but the config gives {want}; the weights and config.json "
                "belong to different models"
            )


def upcycle(
    source: PathLike | Any, *, attention: str = "diff_v2", max_seq_len: int | None = None
) -> tuple[Transformer, dict[str, Any]]:
    """A native ``Transformer`` (fp32, eval mode) from an HF Llama-style folder or an in-memory HF model
    (e.g. ``LlamaForCausalLM``); also returns the source config dict (its eos/bos ids, ...)."""
    if isinstance(source, str | os.PathLike):
        config, weights = read_hf_folder(source)
        try:
            cfg = llama_model_config(config, attention=attention, max_seq_len=max_seq_len)
        except ConfigError as err:  # name the file the field came from
            raise ConfigError(f"{Path(source) / 'config.json'}: {err}") from None
    else:
        config, weights = source.config.to_dict(), dict(source.state_dict())
        cfg = llama_model_config(config, attention=attention, max_seq_len=max_seq_len)
    try:
        state = upcycle_state_dict(weights, cfg)
    except CheckpointError as err:  # a folder's weights: name the folder
        if not isinstance(source, str | os.PathLike):
            raise
        raise CheckpointError(f"{source}: {err}") from None
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"{missing[0]}: missing from the checkpoint (needed by the converted model)")
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight  # assign=True replaced the tied Parameter; tie again
    return model.eval(), config
