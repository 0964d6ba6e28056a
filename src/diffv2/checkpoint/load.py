"""Reading a checkpoint back: its metadata and tokenizer, the weights alone (inference), or the whole training
state (weights, optimizer, RNGs) for an exact resume. Every read is checksum-verified first."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..config import ModelConfig, check_int
from ..errors import CheckpointError, ConfigError
from .files import PathLike, read_checked, read_json
from .layout import STEP_RE, resolve, verify
from .rng import parse_rng
from .state import ALIASES, apply_optimizer, apply_weights, check_optimizer, check_weights

MAX_STEP = 10**12


def read_checkpoint_meta(path: PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, config)`` of a checkpoint (or of a run dir's latest one), after verifying every checksum.

    Checksums only say the files are as written; the fields every reader needs are checked here too: ``step``
    in state.json, and config.json's ``model`` table when it has one."""
    ckpt = resolve(path)
    verify(ckpt)
    state, config = read_json(ckpt / "state.json"), read_json(ckpt / "config.json")
    step = check_int(f"{ckpt / 'state.json'}: step", state.get("step"), maximum=MAX_STEP, error=CheckpointError)
    named = STEP_RE.search(ckpt.name)  # step_N, or the aside copy .old-step_N-PID of one
    if named and int(named.group(1)) != step:
        raise CheckpointError(
            f"{ckpt / 'state.json'}: step={step}, but the folder is {ckpt.name}; the checkpoint was altered"
        )
    if "world_size" in state:
        check_int(f"{ckpt / 'state.json'}: world_size", state["world_size"], minimum=1, error=CheckpointError)
    return state, config


def model_config_of(ckpt: Path, config: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` in a checkpoint's config.json (as :func:`read_checkpoint_meta` returns it); a
    missing or invalid table is a one-line :class:`CheckpointError` naming the file."""
    file = ckpt / "config.json"
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{file}: has no 'model' table of ModelConfig fields; not a diffv2 training checkpoint")
    try:
        return ModelConfig.from_dict(config["model"])
    except ConfigError as err:
        raise CheckpointError(f"{file}: model: {err}") from None


def read_tokenizer_json(path: PathLike) -> str | None:
    """The tokenizer JSON text saved with a checkpoint (checksum verified), or None if it has none."""
    ckpt = resolve(path)
    if "tokenizer.json" not in verify(ckpt, only=("tokenizer.json",)):
        return None
    return read_checked(ckpt / "tokenizer.json", lambda f: f.read_text(encoding="utf-8"))


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
    being copied into the model (its own device saves a host round trip). Under torch.distributed every rank
    calls it (a sharded model is re-sharded collectively).
    """
    ckpt = resolve(path)
    files = verify(ckpt)
    weights = _read_weights(ckpt / "model.safetensors", model, map_location, strict)
    if optimizer is not None:
        if "optimizer.pt" not in files:
            raise CheckpointError(f"{ckpt}: has no optimizer.pt (saved without optimizer state); pass optimizer=None")
        opt_file = ckpt / "optimizer.pt"
        # Read to CPU: the optimizer then puts each slot where its own policy wants it (moments next to their
        # parameter, a non-fused Adam's step count on CPU), which is exactly where it was when saved.
        opt_state = read_checked(opt_file, _load_cpu)
        opt_state = check_optimizer(opt_file, opt_state, model, optimizer)
    # Generator states must be CPU tensors whatever map_location says.
    set_rng = parse_rng(ckpt / "rng.pt", read_checked(ckpt / "rng.pt", _load_cpu)) if restore_rng else None
    state = read_json(ckpt / "state.json")
    if optimizer is not None:  # first: it validates before changing anything, the model load cannot fail now
        read_checked(opt_file, lambda _: apply_optimizer(model, optimizer, opt_state), "does not fit the optimizer")
    apply_weights(model, weights, strict)
    if set_rng is not None:
        set_rng()
    return state


def load_model_weights(path: PathLike, model: nn.Module, map_location: Any = "cpu", strict: bool = True) -> Path:
    """Load only the weights (for inference), checksum verified; returns the checkpoint dir used."""
    ckpt = resolve(path)
    verify(ckpt, only=("model.safetensors",))
    apply_weights(model, _read_weights(ckpt / "model.safetensors", model, map_location, strict), strict)
    return ckpt


def _read_weights(file: Path, model: nn.Module, map_location: Any, strict: bool) -> dict[str, torch.Tensor]:
    device = str(map_location) if isinstance(map_location, str | torch.device) else "cpu"

    def read(f: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(f), framework="pt", device=device) as st:
            tensors = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118 (safe_open is not a dict)
            aliases = json.loads((st.metadata() or {}).get(ALIASES, "{}"))
        return tensors | {alias: tensors[stored] for alias, stored in aliases.items()}

    tensors = read_checked(file, read)
    check_weights(file, tensors, model, strict)
    return tensors


def _load_cpu(file: Path) -> Any:
    # weights_only refuses a pickle that would run code; the warnings torch adds to that refusal (several lines
    # about protocols and the weights_only default) would bury the one-line error it becomes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(file, map_location="cpu", weights_only=True)
