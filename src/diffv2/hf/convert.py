"""Native ↔ Hugging Face conversion: configs, models, tokenizers and whole checkpoints.

The HF model's state dict has exactly the native ``Transformer``'s keys, so weights move with one
``load_state_dict`` and conversion is exact; the configs map field by field (see ``configuration_diffv2``).
A native checkpoint is a trainer run dir or checkpoint dir (``diffv2.checkpoint`` layout); an HF folder
is what ``save_pretrained`` writes: config.json (with ``auto_map``), model.safetensors, the two Python files
that make it loadable with ``trust_remote_code=True``, generation_config.json and the tokenizer files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from ..checkpoint import load_pretrained, save_checkpoint
from ..checkpoint.state import check_weights
from ..config import ModelConfig, check_bool, read_json_file, show
from ..data import publish_mode
from ..data.tokenizer import Tokenizer
from ..errors import CheckpointError, ConfigError, DataError
from ..model import Transformer
from .configuration_diffv2 import DiffV2Config
from .modeling_diffv2 import DiffV2ForCausalLM
from .upcycle import read_hf_folder

PathLike = str | os.PathLike[str]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HF_EXTRA = ("bos_token_id", "eos_token_id", "pad_token_id")  # HF-only config fields a loaded model keeps


# ---------------------------------------------------------------------- configs
def to_hf_config(cfg: ModelConfig, **extra: Any) -> DiffV2Config:
    """The ``DiffV2Config`` of a native config; ``extra`` sets HF-only fields (eos_token_id, ...).

    ``cfg.backend`` becomes the attention implementation ("sdpa" or "eager"; our "triton" kernels are not part of
    the self-contained HF code, so it becomes "sdpa"), a runtime choice HF does not save.
    """
    config = DiffV2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.ffn_hidden,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention=cfg.attention,
        pairing=cfg.pairing,
        lambda_mode=cfg.lambda_mode,
        o_proj_init_scale=cfg.o_proj_init_scale,
        **extra,
    )
    config._attn_implementation = "eager" if cfg.backend == "eager" else "sdpa"
    return config


def from_hf_config(config: Any) -> ModelConfig:
    """The native ``ModelConfig`` of a ``DiffV2Config`` (or its dict); raises ``ConfigError`` naming a bad field."""
    data = config if isinstance(config, dict) else config.to_dict()
    if data.get("model_type") not in (None, DiffV2Config.model_type):
        raise ConfigError(f"model_type={data.get('model_type')!r}: not a diffv2 model (expected 'diffv2')")
    rope = data.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"rope_parameters.rope_type={rope_type!r}: only plain RoPE ('default') is supported")
    impl = getattr(config, "_attn_implementation", None) if not isinstance(config, dict) else None
    tie = check_bool("tie_word_embeddings", data.get("tie_word_embeddings", False))
    for key in ("dtype", "torch_dtype"):  # transformers reads it as a torch dtype name
        if data.get(key) is not None and data[key] not in (*DTYPES, "float64"):
            raise ConfigError(f"{key}={show(data[key])}: must be one of {', '.join(DTYPES)}, float64")
    return ModelConfig(
        vocab_size=data["vocab_size"],
        d_model=data["hidden_size"],
        n_layers=data["num_hidden_layers"],
        n_heads=data["num_attention_heads"],
        n_kv_heads=data.get("num_key_value_heads"),
        head_dim=data.get("head_dim"),
        ffn_hidden=data.get("intermediate_size"),
        rope_theta=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
        max_seq_len=data["max_position_embeddings"],
        norm_eps=data["rms_norm_eps"],
        tie_embeddings=tie,
        attention=data.get("attention", "diff_v2"),
        pairing=data.get("pairing", "interleaved"),
        lambda_mode=data.get("lambda_mode", "sigmoid"),
        backend="eager" if impl == "eager" else "sdpa",
        init_std=data.get("initializer_range", 0.02),
        o_proj_init_scale=data.get("o_proj_init_scale", 1.0),
    )


# ---------------------------------------------------------------------- models
def to_hf(model: Transformer, **extra: Any) -> DiffV2ForCausalLM:
    """A ``DiffV2ForCausalLM`` with a copy of ``model``'s weights (same dtype and device)."""
    param = next(model.parameters())
    hf = DiffV2ForCausalLM(to_hf_config(model.cfg, **extra)).to(device=param.device, dtype=param.dtype)
    hf.load_state_dict(model.state_dict(), strict=True)  # same keys by construction: exact
    return hf.train(model.training)


def to_native(model: DiffV2ForCausalLM) -> Transformer:
    """A native ``Transformer`` with a copy of an HF model's weights (same dtype and device)."""
    param = next(model.parameters())
    native = Transformer(from_hf_config(model.config)).to(device=param.device, dtype=param.dtype)
    native.load_state_dict(model.state_dict(), strict=True)
    return native.train(model.training)


# ---------------------------------------------------------------------- tokenizers
def hf_tokenizer(tokenizer: Tokenizer | str, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` from our tokenizer (or its JSON text); eos (and pad) = our end-of-text token.

    ``split_special_tokens`` mirrors our encoder: a literal "<|endoftext|>" in a text is encoded as text, so it
    can never fake a document boundary.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_json_str(tokenizer)
    extra = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok.hf_tokenizer,
        eos_token=tok.eot_token,
        pad_token=tok.eot_token,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        **extra,
    )


def native_tokenizer_json(text: str) -> str:
    """tokenizer.json text as our tokenizer wrote it: transformers adds a post-processor that adds nothing
    (single = [A], pair = [A, B], no special tokens); dropping it restores the original sha256, which the
    trainer compares with its dataset's tokenizer."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return text  # not JSON: Tokenizer.from_json_str says so in one line
    post = data.get("post_processor") if isinstance(data, dict) else None
    if not isinstance(post, dict) or post.get("type") != "TemplateProcessing" or post.get("special_tokens"):
        return text
    single, pair = post.get("single"), post.get("pair")
    if not (isinstance(single, list) and isinstance(pair, list) and all(isinstance(p, dict) for p in single + pair)):
        return text
    if [next(iter(p), None) for p in single] == ["Sequence"] and [next(iter(p), None) for p in pair] == [
        "Sequence",
        "Sequence",
    ]:
        data["post_processor"] = None
        return json.dumps(data, ensure_ascii=False)
    return text


def read_hf_tokenizer(folder: PathLike, vocab_size: int | None) -> PreTrainedTokenizerFast | None:
    """The folder's tokenizer through ``AutoTokenizer`` (its chat template included), or None when it has none;
    a one-line ``CheckpointError`` when it cannot be read or has ids past the model's ``vocab_size``."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers warns in several lines about what we then refuse in one
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # tokenizer classes raise many kinds of errors for a broken file
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        raise CheckpointError(f"{folder}: its tokenizer cannot be loaded ({why})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {len(tokenizer)} ids but the model's vocabulary {vocab_size}; the tokenizer "
            "belongs to another model"
        )
    return tokenizer


def read_tokenizer_json(folder: PathLike) -> str | None:
    """The text of an HF folder's tokenizer.json as :func:`native_tokenizer_json` gives it, or None without one;
    a file that is not text is a one-line :class:`DataError`."""
    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        return native_tokenizer_json(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not a tokenizer.json (not UTF-8 text at byte {e.start})") from None


# ---------------------------------------------------------------------- whole checkpoints
def is_hf_folder(path: PathLike) -> bool:
    """Whether ``path`` is an HF folder of a diffv2 model (config.json with model_type 'diffv2')."""
    file = Path(path) / "config.json"
    try:  # a regular file only: a FIFO would block the read
        return file.is_file() and json.loads(file.read_text(encoding="utf-8")).get("model_type") == "diffv2"
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def load_native(path: PathLike) -> tuple[Transformer, Tokenizer | None, Path]:
    """A native checkpoint (run dir or checkpoint dir): the model (checksum-verified weights), its tokenizer
    (or None) and the checkpoint dir used."""
    loaded = load_pretrained(path)
    return loaded.model, loaded.tokenizer, loaded.checkpoint


def read_hf_config(path: PathLike) -> ModelConfig:
    """The validated native config of an HF diffv2 folder's config.json; one-line ``CheckpointError`` otherwise.
    Read before anything else touches the folder (transformers' own readers warn at length on a bad field)."""
    if not is_hf_folder(path):
        raise CheckpointError(f"{path}: not a Hugging Face diffv2 folder (no config.json with model_type 'diffv2')")
    file = Path(path) / "config.json"
    try:
        return from_hf_config(read_json_file(file, CheckpointError))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a field missing or of the wrong type
        what = e if isinstance(e, ConfigError) else f"a field is missing or malformed ({type(e).__name__}: {e})"
        raise CheckpointError(f"{file}: {what}") from None


def load_hf_native(path: PathLike, cfg: ModelConfig | None = None) -> Transformer:
    """The native ``Transformer`` (fp32, CPU, eval mode) of an HF diffv2 folder, read strictly: every weight the
    config implies present (``lm_head.weight`` may be left out only when the embeddings are tied), nothing
    else, each of its shape, floating point and finite. Exact: the state dicts share their keys. ``cfg``: the
    folder's config when the caller has read it already (:func:`read_hf_config`)."""
    cfg = cfg if cfg is not None else read_hf_config(path)
    folder = Path(path)
    _, tensors = read_hf_folder(folder)  # refuses pickle weights; every header and tensor must read
    if cfg.tie_embeddings and "lm_head.weight" not in tensors and "tok_embeddings.weight" in tensors:
        tensors["lm_head.weight"] = tensors["tok_embeddings.weight"]  # save_pretrained stores a tied weight once
    model = Transformer(cfg)
    check_weights(folder, tensors, model, strict=True, from_run=False)
    model.load_state_dict({k: t.float() for k, t in tensors.items()}, strict=True)
    return model.eval()


def load_hf(path: PathLike, *, dtype: torch.dtype | None = None) -> DiffV2ForCausalLM:
    """A ``DiffV2ForCausalLM`` of an HF diffv2 folder, read as strictly as :func:`load_hf_native` (which does the
    reading), with the folder's other config fields (token ids, ...) kept; in ``dtype`` if given."""
    folder = Path(path)
    native = load_hf_native(folder)
    config = read_json_file(folder / "config.json", CheckpointError)
    extra = {k: v for k, v in config.items() if k in _HF_EXTRA and v is not None}
    hf = to_hf(native, **extra)
    return (hf.to(dtype) if dtype is not None else hf).eval()


def check_out_dir(out: PathLike, force: bool, src: PathLike | None = None) -> Path:
    """``out`` as a Path when a conversion may write there: empty or new (or ``force``), and never the source
    folder, inside it or around it (``--force`` would write over what is being read)."""
    out = Path(out)
    if src is not None:
        a, b = out.resolve(), Path(src).resolve()
        if a == b or b in a.parents or a in b.parents:
            raise CheckpointError(f"--out {out}: overlaps the source {src}; write the conversion somewhere else")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CheckpointError(f"--out {out}: exists and is not empty; choose another folder or pass --force")
    return out


def save_hf(
    model: DiffV2ForCausalLM, out: PathLike, tokenizer: PreTrainedTokenizerFast | None = None, dtype: str | None = None
) -> Path:
    """``save_pretrained`` (safetensors, plus the modeling/config files for ``trust_remote_code``) + tokenizer."""
    out = Path(out)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
        model = model.to(DTYPES[dtype])
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    for file in out.iterdir():  # safetensors writes its shards 0o600
        if file.is_file():
            publish_mode(file)
    return out


def export_hf(src: PathLike, out: PathLike, *, dtype: str | None = None, force: bool = False) -> Path:
    """Native checkpoint (run dir or checkpoint dir) → HF folder, tokenizer included; returns ``out``."""
    out = check_out_dir(out, force, src)
    native, tok, _ = load_native(src)
    extra = {"eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id} if tok is not None else {}
    hf = to_hf(native, **extra)
    save_hf(hf, out, hf_tokenizer(tok, native.cfg.max_seq_len) if tok is not None else None, dtype)
    return out


def save_native(
    model: Transformer, out: PathLike, *, tokenizer_json: str | None = None, source: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` as step 0 of a native run dir ``out`` (for ``diffv2 train --init-from``); returns the
    checkpoint dir. Saved in fp32 without optimizer state; ``state.json`` records the tokenizer's sha256."""
    model = model.float() if next(model.parameters()).dtype != torch.float32 else model
    state: dict[str, Any] = {"step": 0}
    if tokenizer_json is not None:
        state["tokenizer_sha256"] = Tokenizer.from_json_str(tokenizer_json).sha256()
    config = {"model": model.cfg.to_dict(), "converted_from": source or {}}
    return save_checkpoint(out, 0, model=model, state=state, config=config, tokenizer_json=tokenizer_json)


def import_hf(src: PathLike, out: PathLike, *, force: bool = False) -> Path:
    """HF diffv2 folder → native run dir (step 0 checkpoint); returns the checkpoint dir."""
    out = check_out_dir(out, force, src)
    text = read_tokenizer_json(src)
    if text is not None:  # fail before loading or writing anything when it is broken or lacks an end-of-text token
        Tokenizer.from_json_str(text, source=str(Path(src) / "tokenizer.json"))
    return save_native(load_hf_native(src), out, tokenizer_json=text, source={"format": "hf", "path": str(src)})
