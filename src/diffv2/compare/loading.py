"""Where a run's checkpoint is, for analysis passes (the loading itself is :func:`diffv2.train.load_pretrained`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..train import latest_checkpoint


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder as given, or the latest complete checkpoint of a run folder."""
    path = Path(path)
    if (path / "checksums.json").is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"{path}: neither a checkpoint nor a run folder with a complete checkpoint")
    return found
