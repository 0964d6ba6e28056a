"""File primitives of the checkpoint format: synced writes, checksums, and reads that fail in one line."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ..errors import CheckpointError

PathLike = str | os.PathLike[str]


def read_checked(file: Path, reader: Callable[[Path], Any], what: str = "unreadable") -> Any:
    """Run ``reader`` on a file, turning any low-level failure into a one-line :class:`CheckpointError`."""
    try:
        return reader(file)
    except Exception as e:
        lines = str(e).strip().splitlines() or [""]
        raise CheckpointError(f"{file}: {what} ({type(e).__name__}: {lines[0][:200]})") from None


def read_json(file: Path) -> dict[str, Any]:
    data = read_checked(file, lambda f: json.loads(f.read_text(encoding="utf-8")))
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: corrupted (expected a JSON object)")
    return data


def dumps(data: dict[str, Any], what: str) -> str:
    try:
        return json.dumps(data, indent=2)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: must be JSON-serialisable ({e})") from None


def write_synced(path: Path, writer: Callable[[IO[bytes]], Any]) -> None:
    """Write a file through ``writer`` and fsync it, so a rename that follows publishes complete contents."""
    with open(path, "wb") as f:
        writer(f)
        f.flush()
        os.fsync(f.fileno())


def fsync(path: Path) -> None:
    if os.name == "nt" and path.is_dir():  # Windows cannot fsync a directory; NTFS journals renames anyway
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
