"""Where checkpoints live and whether one is whole: ``<run_dir>/checkpoints/step_XXXXXXXX/``, the ``latest``
pointer, and ``checksums.json`` (sha256 + size of every other file, written last, so its presence marks a
complete checkpoint)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .files import PathLike, sha256

FORMAT = 2  # 2: optimizer.pt keyed by parameter name (1: by index; still loaded)
STEP_RE = re.compile(r"step_(\d{8,})")
ASIDE_RE = re.compile(r"\.old-(step_\d{8,})-\d+")  # a replaced checkpoint, deleted once its successor is in place
REQUIRED = ("model.safetensors", "rng.pt", "state.json", "config.json")


# ---------------------------------------------------------------------- finding
def list_checkpoints(run_dir: PathLike) -> list[Path]:
    """Complete checkpoints (those with ``checksums.json``) of a run, oldest step first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.iterdir() if STEP_RE.fullmatch(p.name)] if root.is_dir() else []
    return sorted((p for p in found if (p / "checksums.json").is_file()), key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: PathLike) -> Path | None:
    """The newest complete checkpoint of a run (the one ``latest`` names, else the highest step), or None."""
    root = Path(run_dir) / "checkpoints"
    complete = {p.name: p for p in list_checkpoints(run_dir)}
    for p in root.iterdir() if root.is_dir() else ():  # an orphaned aside copy stands in for its step
        m = ASIDE_RE.fullmatch(p.name)
        if m and m.group(1) not in complete and (p / "checksums.json").is_file():
            complete[m.group(1)] = p
    try:  # a regular file only: a FIFO would block the read
        named = (root / "latest").read_text(encoding="utf-8").strip() if (root / "latest").is_file() else ""
    except (OSError, UnicodeDecodeError):
        named = ""
    if named in complete:
        return complete[named]
    return complete[max(complete, key=lambda n: int(n[5:]))] if complete else None


def resolve(path: PathLike) -> Path:
    """A checkpoint dir as given, or a run dir's latest checkpoint; :class:`CheckpointError` if there is none."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    if STEP_RE.fullmatch(p.name) or (p / "checksums.json").exists() or (p / "model.safetensors").exists():
        return p
    found = latest_checkpoint(p)
    if found is None:
        raise CheckpointError(f"{p}: no checkpoint found (no complete {p / 'checkpoints'}/step_*/)")
    return found


def foreign_folder(path: PathLike) -> str | None:
    """What ``path`` (or a folder above it) holds that a run must not be written into: a checkpoint, a run's
    checkpoints/ folder, a Hugging Face model folder or a prepared dataset; None when it is free for a run."""
    p = Path(path).absolute()
    for folder in (p, *p.parents):
        if (folder / "checksums.json").is_file() or STEP_RE.fullmatch(folder.name):
            return f"{folder} is a checkpoint"
        steps = folder.is_dir() and any(STEP_RE.fullmatch(c.name) for c in folder.iterdir())
        if folder.name == "checkpoints" and steps:
            return f"{folder} holds a run's checkpoints"
    if (p / "manifest.json").is_file():
        return f"{p} is a prepared dataset"
    if (p / "config.json").is_file() and not (p / "checkpoints").exists():
        try:  # a run dir's config.json has a "train" table; an HF folder's has model_type
            if "model_type" in json.loads((p / "config.json").read_text(encoding="utf-8")):
                return f"{p} is a Hugging Face model folder"
        except (OSError, ValueError, TypeError, RecursionError):
            return f"{p} holds a config.json that is not a run's"
    return None


# ---------------------------------------------------------------------- verifying
def verify_checkpoint(path: PathLike) -> None:
    """Raise :class:`CheckpointError` naming the first file that is missing, truncated or corrupted.

    ``path`` is a checkpoint dir, or a run dir (its latest checkpoint is checked).
    """
    verify(resolve(path))


def verify(ckpt: Path, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Check the files of ``checksums.json`` (or just those in ``only``); returns its file table."""
    manifest_path = ckpt / "checksums.json"
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a checkpoint directory")
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt}: incomplete checkpoint (no checksums.json); it was interrupted while saving")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in manifest["files"].items()}
        version = int(manifest.get("format", FORMAT))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        raise CheckpointError(f"{manifest_path}: corrupted (not a valid checksums manifest)") from None
    if version > FORMAT:
        raise CheckpointError(f"{manifest_path}: written by a newer diffv2 (format {version})")
    if missing := [n for n in REQUIRED if n not in files]:
        raise CheckpointError(f"{manifest_path}: does not list {', '.join(missing)}; not a diffv2 checkpoint")
    for name, (size, digest) in files.items():
        f = ckpt / name
        if Path(name).name != name:
            raise CheckpointError(f"{manifest_path}: corrupted (bad file name {name!r})")
        if only is not None and name not in only:
            continue
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if (actual := f.stat().st_size) < size:
            raise CheckpointError(f"{f}: truncated ({actual} of {size} bytes)")
        if actual > size:
            raise CheckpointError(f"{f}: corrupted ({actual} bytes, expected {size})")
        if sha256(f) != digest:
            raise CheckpointError(f"{f}: corrupted (sha256 mismatch)")
    return files


def manifest_json(ckpt: Path, step: int) -> str:
    """The ``checksums.json`` text for the files now in ``ckpt``."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(ckpt.iterdir())}
    return json.dumps({"format": FORMAT, "step": step, "files": files}, indent=2)
