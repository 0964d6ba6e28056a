"""Writing a checkpoint so that a crash at any point leaves the previous one loadable.

It is built in ``.tmp-step_XXXXXXXX-<pid>``, ``checksums.json`` written last, renamed into place, then
``latest`` is replaced atomically and older checkpoints beyond ``keep_last`` are pruned. One writer per run
dir is assumed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .files import PathLike, dumps, fsync, write_synced
from .layout import ASIDE_RE, list_checkpoints, manifest_json
from .rng import get_rng
from .state import gather_optimizer, gather_weights, write_weights


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
    texts = {"state.json": dumps(state, "state"), "config.json": dumps(config, "config")}
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
        fsync(tmp / "model.safetensors")
        if optimizer_state is not None:
            write_synced(tmp / "optimizer.pt", lambda f: torch.save(optimizer_state, f))
        write_synced(tmp / "rng.pt", lambda f: torch.save(get_rng(), f))
        for fname, text in texts.items():
            write_synced(tmp / fname, lambda f, text=text: f.write(text.encode("utf-8")))
        manifest = manifest_json(tmp, step)
        write_synced(tmp / "checksums.json", lambda f: f.write(manifest.encode("utf-8")))  # last: marks it complete
        fsync(tmp)
        if final.exists():  # a dir cannot be renamed over a full one; the aside copy stays loadable meanwhile
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(tmp, final)
    except BaseException:
        if aside.exists() and not final.exists():
            os.rename(aside, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync(root)
    shutil.rmtree(aside, ignore_errors=True)
    write_synced(root / f".tmp-latest-{pid}", lambda f: f.write(f"{name}\n".encode()))
    os.replace(root / f".tmp-latest-{pid}", root / "latest")
    fsync(root)
    _prune(root, final, keep_last)
    return final


def _prune(root: Path, keep: Path, keep_last: int | None) -> None:
    doomed = [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # left by crashed saves
    doomed += [p for p in root.iterdir() if (m := ASIDE_RE.fullmatch(p.name)) and (root / m.group(1)).exists()]
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
        m = ASIDE_RE.fullmatch(p.name)
        if m and not (root / m.group(1)).exists() and (p / "checksums.json").is_file():
            os.rename(p, root / m.group(1))
