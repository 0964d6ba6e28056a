"""Where a run's checkpoint is, for analysis passes (loading it is :func:`diffv2.checkpoint.load_pretrained`)."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import latest_checkpoint
from ..errors import CheckpointError


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder as given, or the latest complete checkpoint of a run folder."""
    path = Path(path)
    if (path / "checksums.json").is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"{path}: neither a checkpoint nor a run folder with a complete checkpoint")
    return found
