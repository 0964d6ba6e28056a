"""What a checkpoint holds and how it maps onto a live model: weights and optimizer state.

One format for every run, single-process or distributed. ``model.safetensors`` is the full (unsharded) model,
loadable by ``load_model_weights`` into a plain :class:`~diffv2.model.Transformer`; ``optimizer.pt`` is the full
optimizer state keyed by parameter name (FQN), as ``torch.distributed.checkpoint.state_dict`` (DCP) builds it.
Both are gathered from, and spread back onto, a plain, DDP or FSDP2-sharded model by the same calls (which are
collective under FSDP: every rank makes them), so a run saved with N processes resumes with M. A sharded model
goes through DCP (:mod:`.sharded`); a plain one is read and written here directly, with the same names and values,
so that loading a checkpoint for inference needs none of torch's distributed machinery. Wrapper prefixes
(``_orig_mod.`` of a compiled block, ``_checkpoint_wrapped_module.`` of activation checkpointing) never reach the
files.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from ..data import publish_mode
from ..errors import CheckpointError

ALIASES = "diffv2.aliases"  # safetensors metadata key: {alias key: stored key} for tied weights
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.")
_WHY = "the checkpoint was made with a different model config or optimizer setup"


def is_sharded(model: nn.Module) -> bool:
    """True for a model whose state lives in shards: wrapped by FSDP (whose parameters stay unsharded plain
    tensors between a forward and the next reshard, so the wrapper is what tells) or holding DTensors."""
    # Neither can exist before its torch module is loaded; looking only at loaded ones keeps plain loads light.
    fsdp, dtensor = sys.modules.get("torch.distributed.fsdp"), sys.modules.get("torch.distributed.tensor")
    if fsdp is not None:
        wrappers = (fsdp.FSDPModule, fsdp.FullyShardedDataParallel)
        if any(isinstance(m, wrappers) for m in model.modules()):
            return True
    if dtensor is not None:
        return any(isinstance(t, dtensor.DTensor) for t in itertools.chain(model.parameters(), model.buffers()))
    return False


def _sharded():
    from . import sharded  # torch.distributed.checkpoint (and FSDP with it): only for a model that needs them

    return sharded


def _gathers_here() -> bool:
    """Whether this process gets the gathered state: rank 0 alone writes files under torch.distributed."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _to_cpu(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.to("cpu")
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def canonical_name(name: str) -> str:
    """A parameter name without the prefixes compile / activation-checkpointing wrappers add."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own parameters and buffers by canonical name; a sharded one's report its global shape."""
    return {canonical_name(k): v for k, v in model.state_dict(keep_vars=True).items()}


def _tied_groups(live: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names sharing one parameter object (tied weights), in state-dict order; with keep_vars a tied
    parameter appears under each name as the very same object, sharded or not."""
    groups: dict[int, list[str]] = {}
    for key, value in live.items():
        groups.setdefault(id(value), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# ---------------------------------------------------------------------- weights
def gather_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights on the CPU by canonical name (empty on ranks other than 0 under torch.distributed)."""
    if is_sharded(model):
        return _sharded().gather_weights(model)
    if not _gathers_here():
        return {}
    return {canonical_name(k): v.to("cpu") for k, v in model.state_dict().items()}


def write_weights(path: Path, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Write gathered ``weights`` as one safetensors file; a tied weight is stored once plus an alias."""
    aliases = {key: keys[0] for keys in _tied_groups(live_tensors(model)) for key in keys[1:]}
    tensors = {k: v.detach() for k, v in weights.items() if k not in aliases}
    # safetensors refuses tensors sharing storage; an unsharded model's state can hold such views.
    ptrs = Counter(t.untyped_storage().data_ptr() for t in tensors.values() if t.numel())
    for key, t in tensors.items():
        shared = t.numel() and ptrs[t.untyped_storage().data_ptr()] > 1
        tensors[key] = t.clone() if shared else t.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", ALIASES: json.dumps(aliases)})
    publish_mode(path)  # safetensors writes 0o600


def check_weights(
    file: Path, tensors: dict[str, torch.Tensor], model: nn.Module, strict: bool, *, from_run: bool = True
) -> None:
    """Raise a one-line :class:`CheckpointError` unless ``tensors`` (aliases resolved) fit ``model``.
    ``from_run``: the weights are a training run's checkpoint (the advice names the run's earlier ones)."""
    expected = live_tensors(model)
    shapes = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in expected.items() if k in tensors]
    problems = {
        "missing": [k for k in expected if k not in tensors] if strict else [],
        "unexpected": [k for k in tensors if k not in expected] if strict else [],
        "shape mismatch": [f"{k} {old} vs model {new}" for k, old, new in shapes if old != new],
        # Loading differing values into one tied tensor would silently keep whichever came last.
        "tied in the model but different here": [
            " = ".join(keys)
            for keys in _tied_groups(expected)
            if all(k in tensors for k in keys) and any(not torch.equal(tensors[keys[0]], tensors[k]) for k in keys)
        ],
    }
    if found := [f"{what}: {few(keys)}" for what, keys in problems.items() if keys]:
        raise CheckpointError(
            f"{file}: weights do not fit the model ({'; '.join(found)}); the checkpoint was made with a different "
            f"model config (see its config.json)"
        )
    if integral := [k for k, t in tensors.items() if not t.is_floating_point()]:
        raise CheckpointError(f"{file}: {few(integral)} not floating point; weights are floats: the file was altered")
    # a diverged run's NaN/inf weights would only show up as garbage tokens or NaN losses much later
    nonfinite = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if nonfinite:
        advice = (
            "the run diverged before this step: use an earlier checkpoint (a folder under checkpoints/)"
            if from_run
            else "the model is broken: export it again from a checkpoint saved before its training diverged"
        )
        raise CheckpointError(f"{file}: non-finite weights (NaN or inf) in {few(nonfinite)}; {advice}")


def apply_weights(model: nn.Module, weights: dict[str, torch.Tensor], strict: bool) -> None:
    """Copy full weights into the model in place (tied weights stay tied), sharding them under FSDP."""
    if is_sharded(model):
        _sharded().apply_weights(model, weights, strict)
        return
    # the model's own keys: compiled blocks want their prefix back, checkpoint wrappers add theirs in a hook
    keys = {canonical_name(k): k for k in model.state_dict(keep_vars=True)}
    model.load_state_dict({keys[name]: t for name, t in weights.items() if name in keys}, strict=strict)


# ---------------------------------------------------------------------- optimizer
def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The canonical name of every parameter of each optimizer group, in group order."""
    by_id = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    try:
        return [[by_id[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not in the model") from None


def _by_name(saved: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """torch's index-keyed optimizer state dict (indices count through the groups in order) keyed by name."""
    flat = [name for group in names for name in group]
    return {
        "state": {flat[int(i)]: slots for i, slots in saved["state"].items()},
        "param_groups": [{**g, "params": [flat[int(i)] for i in g["params"]]} for g in saved["param_groups"]],
    }


def gather_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state keyed by parameter name, on the CPU (empty on ranks other than 0)."""
    if not optimizer.state:  # DCP would create the state with a zero-lr step; a fresh optimizer is saved as it is
        return _by_name(optimizer.state_dict(), _param_names(model, optimizer))
    if is_sharded(model):
        return _sharded().gather_optimizer(model, optimizer)
    if not _gathers_here():
        return {}
    return _to_cpu(_by_name(optimizer.state_dict(), _param_names(model, optimizer)))


def check_optimizer(file: Path, saved: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Validate a saved optimizer state against ``optimizer``; returns it keyed by name (older index-keyed
    files, written before checkpoint format 2 by single-process runs, are converted)."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not (
        isinstance(groups, list)
        and isinstance(saved.get("state"), dict)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    ):
        raise CheckpointError(f"{file}: corrupted (not an optimizer state dict)")
    names = _param_names(model, optimizer)
    sizes = [len(g["params"]) for g in groups], [len(g) for g in names]
    if sizes[0] != sizes[1]:
        raise CheckpointError(f"{file}: parameters per group {sizes[0]}, the optimizer has {sizes[1]}; {_WHY}")
    if all(isinstance(i, int) for g in groups for i in g["params"]):
        saved = _by_name(saved, names)
    for old, new in zip(saved["param_groups"], names, strict=True):
        if old["params"] != new:
            other = [f"{a} (optimizer: {b})" for a, b in zip(old["params"], new, strict=True) if a != b]
            raise CheckpointError(f"{file}: optimizer groups hold other parameters: {few(other)}; {_WHY}")
    params = live_tensors(model)
    if unknown := [name for name in saved["state"] if name not in params]:
        raise CheckpointError(f"{file}: optimizer state for parameters the model lacks: {few(unknown)}; {_WHY}")
    for name, slots in saved["state"].items():
        for slot, v in slots.items():
            if torch.is_tensor(v) and v.dim() and v.shape != params[name].shape:
                shapes = f"{tuple(v.shape)} for a parameter of shape {tuple(params[name].shape)}"
                raise CheckpointError(f"{file}: optimizer state {slot!r} of {name} has shape {shapes}; {_WHY}")
    return saved


def apply_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a checked, name-keyed optimizer state (sharding it under FSDP)."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]]
    if not saved["state"]:  # never stepped (saved as it was, see gather_optimizer): only hyperparameters to restore
        optimizer.state.clear()
    elif is_sharded(model):
        _sharded().apply_optimizer(model, optimizer, saved)
    else:  # torch's own index-keyed form; check_optimizer made sure the groups hold these very names
        index = {name: i for i, name in enumerate(itertools.chain(*_param_names(model, optimizer)))}
        groups = [{**g, "params": [index[name] for name in g["params"]]} for g in saved["param_groups"]]
        optimizer.load_state_dict({"state": {index[n]: s for n, s in saved["state"].items()}, "param_groups": groups})
    # DCP's flattening turns tuples (AdamW's betas) into lists; put the saved values back as they were.
    for group, values in zip(optimizer.param_groups, hyper, strict=True):
        group.update(values)
