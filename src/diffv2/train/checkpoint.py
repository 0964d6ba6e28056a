"""Crash-safe training checkpoints: ``<run_dir>/checkpoints/step_XXXXXXXX/``, written atomically, verified on load.

A checkpoint holds ``model.safetensors``, ``optimizer.pt`` (optional), ``rng.pt``, ``state.json``, ``config.json``,
``tokenizer.json`` (optional) and, written last, ``checksums.json`` (sha256 + size of the others). It is built in
``.tmp-step_XXXXXXXX-<pid>``, renamed into place, then ``latest`` is replaced atomically, so a crash at any point
leaves the previous checkpoint loadable. One writer per run dir is assumed.

The weights and optimizer state are full (unsharded) and keyed by parameter name whatever the run's parallelism
(see :mod:`.checkpoint_state`): under torch.distributed every rank calls :func:`save_checkpoint` and
:func:`load_checkpoint` (an FSDP model is gathered and re-sharded collectively), and rank 0 alone writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from ..errors import CheckpointError
from .checkpoint_state import (
    ALIASES,
    apply_optimizer,
    apply_weights,
    check_optimizer,
    check_weights,
    gather_optimizer,
    gather_weights,
    get_rng,
    parse_rng,
    write_weights,
)

FORMAT = 2  # 2: optimizer.pt keyed by parameter name (1: by index; still loaded)
_STEP_RE = re.compile(r"step_(\d{8,})")
_ASIDE_RE = re.compile(r"\.old-(step_\d{8,})-\d+")  # a replaced checkpoint, deleted once its successor is in place
_REQUIRED = ("model.safetensors", "rng.pt", "state.json", "config.json")
PathLike = str | os.PathLike[str]


# ---------------------------------------------------------------------- saving
def save_checkpoint(
    run_dir: PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any],
    config: dict[str, Any],
    tokenizer_json: str | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, then prune; returns its directory.

    Under torch.distributed every rank must call it (the state of a sharded model is gathered collectively);
    rank 0 writes, the other ranks return at once (wait on a barrier if they need the files).
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step={step!r}: must be a non-negative integer")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last={keep_last!r}: must be a positive integer or None")
    if tokenizer_json is not None and not tokenizer_json.lstrip().startswith("{"):
        raise ValueError("tokenizer_json: must be the tokenizer's JSON text, not a path")
    # Serialise the small parts first so a value JSON cannot hold fails before anything touches the disk.
    texts = {"state.json": _dumps(state, "state"), "config.json": _dumps(config, "config")}
    texts.update({"tokenizer.json": tokenizer_json} if tokenizer_json is not None else {})
    weights = gather_weights(model)
    optimizer_state = gather_optimizer(model, optimizer) if optimizer is not None else None
    root, name, pid = Path(run_dir) / "checkpoints", f"step_{step:08d}", os.getpid()
    if dist.is_initialized() and dist.get_rank() != 0:
        return root / name
    root.mkdir(parents=True, exist_ok=True)
    _recover_asides(root)
    tmp, final, aside = root / f".tmp-{name}-{pid}", root / name, root / f".old-{name}-{pid}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_weights(tmp / "model.safetensors", model, weights)
        _fsync(tmp / "model.safetensors")
        if optimizer_state is not None:
            _write(tmp / "optimizer.pt", lambda f: torch.save(optimizer_state, f))
        _write(tmp / "rng.pt", lambda f: torch.save(get_rng(), f))
        for fname, text in texts.items():
            _write(tmp / fname, lambda f, text=text: f.write(text.encode("utf-8")))
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = json.dumps({"format": FORMAT, "step": step, "files": files}, indent=2)
        _write(tmp / "checksums.json", lambda f: f.write(manifest.encode("utf-8")))  # last: marks it complete
        _fsync(tmp)
        if final.exists():  # a dir cannot be renamed over a full one; the aside copy stays loadable meanwhile
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(tmp, final)
    except BaseException:
        if aside.exists() and not final.exists():
            os.rename(aside, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(root)
    shutil.rmtree(aside, ignore_errors=True)
    _write(root / f".tmp-latest-{pid}", lambda f: f.write(f"{name}\n".encode()))
    os.replace(root / f".tmp-latest-{pid}", root / "latest")
    _fsync(root)
    _prune(root, final, keep_last)
    return final


def _prune(root: Path, keep: Path, keep_last: int | None) -> None:
    doomed = [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # left by crashed saves
    doomed += [p for p in root.iterdir() if (m := _ASIDE_RE.fullmatch(p.name)) and (root / m.group(1)).exists()]
    older = [p for p in list_checkpoints(root.parent) if p != keep] if keep_last is not None else []
    for p in older[: max(0, len(older) + 1 - (keep_last or 0))]:
        # Rename first so a crash mid-delete leaves an ignored .tmp- dir, never a half-deleted checkpoint.
        doomed.append(root / f".tmp-delete-{p.name}-{os.getpid()}")
        os.rename(p, doomed[-1])
    for p in doomed:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _recover_asides(root: Path) -> None:
    """Put back a checkpoint moved aside by a save of the same step that died before its rename."""
    for p in root.iterdir():
        m = _ASIDE_RE.fullmatch(p.name)
        if m and not (root / m.group(1)).exists() and (p / "checksums.json").is_file():
            os.rename(p, root / m.group(1))


# ---------------------------------------------------------------------- finding
def list_checkpoints(run_dir: PathLike) -> list[Path]:
    """Complete checkpoints (those with ``checksums.json``) of a run, oldest step first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.iterdir() if _STEP_RE.fullmatch(p.name)] if root.is_dir() else []
    return sorted((p for p in found if (p / "checksums.json").is_file()), key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: PathLike) -> Path | None:
    """The newest complete checkpoint of a run (the one ``latest`` names, else the highest step), or None."""
    root = Path(run_dir) / "checkpoints"
    complete = {p.name: p for p in list_checkpoints(run_dir)}
    for p in root.iterdir() if root.is_dir() else ():  # an orphaned aside copy stands in for its step
        m = _ASIDE_RE.fullmatch(p.name)
        if m and m.group(1) not in complete and (p / "checksums.json").is_file():
            complete[m.group(1)] = p
    try:
        named = (root / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        named = ""
    if named in complete:
        return complete[named]
    return complete[max(complete, key=lambda n: int(n[5:]))] if complete else None


def _resolve(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    if _STEP_RE.fullmatch(p.name) or (p / "checksums.json").exists() or (p / "model.safetensors").exists():
        return p
    found = latest_checkpoint(p)
    if found is None:
        raise CheckpointError(f"{p}: no checkpoint found (no complete {p / 'checkpoints'}/step_*/)")
    return found


# ---------------------------------------------------------------------- verifying
def verify_checkpoint(path: PathLike) -> None:
    """Raise :class:`CheckpointError` naming the first file that is missing, truncated or corrupted.

    ``path`` is a checkpoint dir, or a run dir (its latest checkpoint is checked).
    """
    _verify(_resolve(path))


def _verify(ckpt: Path, only: tuple[str, ...] | None = None) -> dict[str, Any]:
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
    if missing := [n for n in _REQUIRED if n not in files]:
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
        if _sha256(f) != digest:
            raise CheckpointError(f"{f}: corrupted (sha256 mismatch)")
    return files


# ---------------------------------------------------------------------- loading
def read_checkpoint_meta(path: PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, config)`` of a checkpoint (or of a run dir's latest one), after verifying every checksum."""
    ckpt = _resolve(path)
    _verify(ckpt)
    return _read_json(ckpt / "state.json"), _read_json(ckpt / "config.json")


def read_tokenizer_json(path: PathLike) -> str | None:
    """The tokenizer JSON text saved with a checkpoint (checksum verified), or None if it has none."""
    ckpt = _resolve(path)
    if "tokenizer.json" not in _verify(ckpt, only=("tokenizer.json",)):
        return None
    return _read(ckpt / "tokenizer.json", lambda f: f.read_text(encoding="utf-8"))


def load_checkpoint(
    path: PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    map_location: Any = "cpu",
    strict: bool = True,
) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states bit-exactly from a checkpoint (or a run dir's latest).

    Returns the saved ``state``. Everything is read and checked before anything changes, so a failed load
    leaves the model, optimizer and RNGs as they were. ``map_location`` is where weights are read to before
    being copied into the model (its own device saves a host round trip).
    """
    ckpt = _resolve(path)
    files = _verify(ckpt)
    weights = _read_weights(ckpt / "model.safetensors", model, map_location, strict)
    if optimizer is not None:
        if "optimizer.pt" not in files:
            raise CheckpointError(f"{ckpt}: has no optimizer.pt (saved without optimizer state); pass optimizer=None")
        opt_file = ckpt / "optimizer.pt"
        # Read to CPU: the optimizer then puts each slot where its own policy wants it (moments next to their
        # parameter, a non-fused Adam's step count on CPU), which is exactly where it was when saved.
        opt_state = _read(opt_file, _load_cpu)
        opt_state = check_optimizer(opt_file, opt_state, model, optimizer)
    # Generator states must be CPU tensors whatever map_location says.
    set_rng = parse_rng(ckpt / "rng.pt", _read(ckpt / "rng.pt", _load_cpu)) if restore_rng else None
    state = _read_json(ckpt / "state.json")
    if optimizer is not None:  # first: it validates before changing anything, the model load cannot fail now
        _read(opt_file, lambda _: apply_optimizer(model, optimizer, opt_state), "does not fit the optimizer")
    apply_weights(model, weights, strict)
    if set_rng is not None:
        set_rng()
    return state


def load_model_weights(path: PathLike, model: nn.Module, map_location: Any = "cpu", strict: bool = True) -> Path:
    """Load only the weights (for inference), checksum verified; returns the checkpoint dir used."""
    ckpt = _resolve(path)
    _verify(ckpt, only=("model.safetensors",))
    apply_weights(model, _read_weights(ckpt / "model.safetensors", model, map_location, strict), strict)
    return ckpt


def _read_weights(file: Path, model: nn.Module, map_location: Any, strict: bool) -> dict[str, torch.Tensor]:
    device = str(map_location) if isinstance(map_location, str | torch.device) else "cpu"

    def read(f: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(f), framework="pt", device=device) as st:
            tensors = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118 (safe_open is not a dict)
            aliases = json.loads((st.metadata() or {}).get(ALIASES, "{}"))
        return tensors | {alias: tensors[stored] for alias, stored in aliases.items()}

    tensors = _read(file, read)
    check_weights(file, tensors, model, strict)
    return tensors


def _load_cpu(file: Path) -> Any:
    return torch.load(file, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------- small helpers
def _read(file: Path, reader: Callable[[Path], Any], what: str = "unreadable") -> Any:
    """Run ``reader`` on a file, turning any low-level failure into a one-line :class:`CheckpointError`."""
    try:
        return reader(file)
    except Exception as e:
        lines = str(e).strip().splitlines() or [""]
        raise CheckpointError(f"{file}: {what} ({type(e).__name__}: {lines[0][:200]})") from None


def _read_json(file: Path) -> dict[str, Any]:
    data = _read(file, lambda f: json.loads(f.read_text(encoding="utf-8")))
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: corrupted (expected a JSON object)")
    return data


def _dumps(data: dict[str, Any], what: str) -> str:
    try:
        return json.dumps(data, indent=2)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: must be JSON-serialisable ({e})") from None


def _write(path: Path, writer: Callable[[IO[bytes]], Any]) -> None:
    with open(path, "wb") as f:
        writer(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    if os.name == "nt" and path.is_dir():  # Windows cannot fsync a directory; NTFS journals renames anyway
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
