"""Pretraining: config, loop, schedule, diagnostics, data-parallel wrapping (checkpoints: :mod:`diffv2.checkpoint`).

Importing this package is cheap: the config comes at once, the training loop (FSDP, tqdm and the rest) on first
use of ``train``, ``Trainer`` or ``TrainingError``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .config import TrainConfig, load_config_file

if TYPE_CHECKING:
    from .setup import TrainingError
    from .trainer import Trainer, train

_LAZY = {"train": "trainer", "Trainer": "trainer", "TrainingError": "setup"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainConfig", "Trainer", "TrainingError", "load_config_file", "train"]
