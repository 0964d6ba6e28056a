"""Load a trained model back from a run or checkpoint folder: the one loader behind generate, inspect,
compare reports and the Hugging Face export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..data import Tokenizer
from ..errors import CheckpointError
from ..model import Transformer
from .load import load_model_weights, read_checkpoint_meta, read_tokenizer_json


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
    _, config = read_checkpoint_meta(path)
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path}: config.json has no 'model' table; not a diffv2 training checkpoint")
    model_cfg = ModelConfig.from_dict(config["model"])
    if backend is not None:
        model_cfg = model_cfg.replace(backend=backend)
    model = Transformer(model_cfg)
    ckpt = load_model_weights(path, model)  # into the CPU-built model, then moved once
    text = read_tokenizer_json(ckpt)
    tokenizer = Tokenizer.from_json_str(text, source=str(ckpt / "tokenizer.json")) if text is not None else None
    return Pretrained(model.to(device, dtype=dtype).eval(), tokenizer, ckpt, config)
