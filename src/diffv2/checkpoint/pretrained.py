"""Load a trained model back from a run or checkpoint folder: the one loader behind generate, inspect,
compare reports and the Hugging Face export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import Tokenizer
from ..errors import CheckpointError, ConfigError
from ..model import Transformer
from .layout import resolve
from .load import load_model_weights, model_config_of, read_checkpoint_meta, read_tokenizer_json


@dataclass
class Pretrained:
    model: Transformer
    tokenizer: Tokenizer | None
    checkpoint: Path  # the checkpoint folder actually read
    config: dict[str, Any]  # its config.json: {"model": ..., "train": ...}


def load_pretrained(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> Pretrained:
    """The model of a run folder (its latest checkpoint) or a checkpoint folder, checksum-verified, in eval
    mode on ``device``; ``backend`` ("sdpa"/"eager") may differ from training's since it holds no weights."""
    device = pick_device(device)
    ckpt = resolve(path)
    state, config = read_checkpoint_meta(ckpt)
    model_cfg = model_config_of(ckpt, config)
    if backend is not None:
        model_cfg = model_cfg.replace(backend=backend)
    text = read_tokenizer_json(ckpt)
    tokenizer = Tokenizer.from_json_str(text, source=str(ckpt / "tokenizer.json")) if text is not None else None
    if tokenizer is not None and tokenizer.vocab_size > model_cfg.vocab_size:
        raise CheckpointError(
            f"{ckpt / 'tokenizer.json'}: {tokenizer.vocab_size} token ids, but the model's vocab_size is "
            f"{model_cfg.vocab_size} (config.json); the tokenizer belongs to another model"
        )
    recorded = state.get("tokenizer_sha256")
    if tokenizer is not None and isinstance(recorded, str) and tokenizer.sha256() != recorded:
        raise CheckpointError(
            f"{ckpt / 'tokenizer.json'}: not the tokenizer the model was trained with (state.json records another "
            "sha256); the file was replaced"
        )
    model = Transformer(model_cfg)
    load_model_weights(ckpt, model)  # into the CPU-built model, then moved once
    return Pretrained(model.to(device, dtype=dtype).eval(), tokenizer, ckpt, config)


def pick_device(name: str | torch.device) -> torch.device:
    """A ``--device`` flag as a device: "auto" is CUDA when there is one, else the CPU; "cuda" (or "cuda:N") on a
    machine without it is a one-line :class:`ConfigError` rather than an assertion deep in torch."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device={name!r}: not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(name)!r}: no CUDA device is available here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={str(name)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
