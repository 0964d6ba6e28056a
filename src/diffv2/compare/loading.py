"""Load a trained model back from a run (or checkpoint) folder for analysis: weights, config and tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..data import Tokenizer
from ..errors import CheckpointError
from ..model import Transformer
from ..train import latest_checkpoint, load_model_weights
from ..train.checkpoint import read_tokenizer_json


@dataclass
class Trained:
    model: Transformer
    tokenizer: Tokenizer | None
    checkpoint: Path
    config: dict[str, Any]  # the checkpoint's config.json: {"train": ..., "model": ...}


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder as given, or the latest complete checkpoint of a run folder."""
    path = Path(path)
    if (path / "checksums.json").is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"{path}: neither a checkpoint nor a run folder with a complete checkpoint")
    return found


def load_trained(path: str | Path, *, backend: str = "eager", device: str = "cpu") -> Trained:
    """The model of a run or checkpoint in eval mode, switched to ``backend`` ("eager" gives attention maps)."""
    ckpt = checkpoint_dir(path)
    config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    model_cfg = ModelConfig.from_dict(config["model"]).replace(backend=backend)  # the backend holds no weights
    model = Transformer(model_cfg)
    load_model_weights(ckpt, model)  # into the CPU-built model, then moved once
    text = read_tokenizer_json(ckpt)
    tokenizer = Tokenizer.from_json_str(text, source=str(ckpt)) if text else None
    return Trained(model.to(device).eval(), tokenizer, ckpt, config)
