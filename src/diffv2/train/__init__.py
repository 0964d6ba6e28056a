"""Pretraining: config, loop, diagnostics, checkpoints."""

from .checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from .config import TrainConfig, load_config_file
from .pretrained import Pretrained, load_pretrained
from .trainer import TrainingError, train

__all__ = [
    "Pretrained",
    "TrainConfig",
    "TrainingError",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config_file",
    "load_model_weights",
    "load_pretrained",
    "save_checkpoint",
    "train",
]
