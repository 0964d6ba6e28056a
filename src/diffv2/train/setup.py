"""Building a run: process group, data, model, parallel wrapping, optimizer, and the state to resume from."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import (
    foreign_folder,
    latest_checkpoint,
    load_checkpoint,
    load_pretrained,
    model_config_of,
    read_checkpoint_meta,
)
from ..config import RUNTIME_FIELDS, ModelConfig, check_int, check_table
from ..data import Tokenizer, TokenLoader, describe_skipped, load_manifest, prepare_dataset, verify_dataset
from ..errors import CheckpointError, ConfigError, DataError, DiffV2Error
from ..model import Transformer
from ..sizing import total_params_fast
from .config import TrainConfig
from .distributed import DistEnv, Parallel, init_distributed, parallelize
from .monitor import environment

DATA_CHECK_FILE = "data_check.json"  # the dataset's shards as last verified (see verify_dataset)


class TrainingError(DiffV2Error):
    """Training cannot go on (e.g. too many non-finite steps in a row, or another rank died)."""


@dataclass
class Run:
    """Everything one training run holds; built by :func:`setup`, driven by :class:`~.trainer.Trainer`."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    run_dir: Path
    data_dir: Path
    tokenizer: Tokenizer
    par: Parallel  # the model and the forwards used to train and evaluate it
    optimizer: torch.optim.Optimizer
    loader: TokenLoader
    device: torch.device
    autocast_dtype: torch.dtype | None
    env: DistEnv
    micro_steps: int  # micro-steps per optimizer step on this rank: grad_accum / world_size
    # the step and loader window where this grad_accum began (a forced resume may change it): from there on, each
    # step reads grad_accum × batch_size windows, which lets a resume check the saved window against the step
    loader_origin: dict[str, int] = field(default_factory=lambda: {"step": 0, "window": 0})

    @property
    def model(self) -> nn.Module:
        """The model owning the parameters (plain, or sharded in place by FSDP2)."""
        return self.par.model


def resolve_data(
    cfg: TrainConfig, run_dir: Path, progress: bool, prepare: bool = True, tokenizer: str | None = None
) -> Path:
    """A prepared data dir as given, or the text source prepared (once, if ``prepare``) into ``<out_dir>/data``
    with ``cfg.tokenizer`` (or ``tokenizer``, a tokenizer.json path, when starting from a checkpoint)."""
    given = Path(cfg.data)
    if (given / "manifest.json").is_file():
        return given
    data_dir = run_dir / "data"
    if not (data_dir / "manifest.json").is_file():
        if not prepare:
            raise DataError(
                f"{data_dir}: rank 0 prepared the data there but this rank cannot see it; across nodes "
                "put --out_dir on a shared filesystem, or give every node a prepared --data"
            )
        tokenizer = tokenizer or cfg.tokenizer
        print(f"preparing {cfg.data!r} with the tokenizer {tokenizer} into {data_dir} ...")
        manifest = prepare_dataset(
            cfg.data,
            data_dir,
            tokenizer=tokenizer,
            vocab_size=cfg.tokenizer_vocab,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            progress=progress,
        )
        for line in describe_skipped(manifest):
            print(line)
    return data_dir


def setup(
    cfg: TrainConfig, *, resume: bool = False, progress: bool = True, stop_after: int | None = None
) -> tuple[Run, dict[str, Any]]:
    """Join the job (if distributed), build everything, and load the latest checkpoint when resuming.

    Every rank builds the same full model from ``cfg.seed`` before it is wrapped or sharded. Rank 0 alone
    prepares data and writes the run's metadata files.
    """
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device='cuda' but no CUDA device is available; use --device cpu")
    device_type = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    env, device = init_distributed(cfg.parallel, device_type, cfg.dist_timeout_s)
    micro_steps = cfg.micro_steps_per_rank(env.world_size)
    run_dir = Path(cfg.out_dir)
    if (taken := foreign_folder(run_dir)) is not None:  # a run writes config.json, checkpoints/, data/ there
        raise CheckpointError(f"--out_dir {run_dir}: {taken}; a run needs a folder of its own")
    run_dir.mkdir(parents=True, exist_ok=True)
    existing = latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise CheckpointError(
            f"{run_dir}: holds checkpoints already (latest {existing.name}); pass --resume to continue that run "
            "or choose another --out_dir"
        )
    if resume and existing is None:
        raise CheckpointError(f"{run_dir}: --resume given but there is no checkpoint to resume from")
    init = load_pretrained(cfg.init_from) if cfg.init_from and not resume else None  # resume: the run's own
    init_tokenizer = str(init.checkpoint / "tokenizer.json") if init is not None else None
    if env.is_main:
        data_dir = resolve_data(cfg, run_dir, progress, tokenizer=init_tokenizer)  # once; the others wait
        # checksums, token ids < vocabulary, tokenizer: read once per run (the record skips unchanged shards)
        verify_dataset(data_dir, record=run_dir / DATA_CHECK_FILE)
    env.barrier()
    data_dir = resolve_data(cfg, run_dir, progress, prepare=False)
    manifest = load_manifest(data_dir)
    tokenizer = Tokenizer.from_file(data_dir / manifest["tokenizer_file"])
    if init is None and resume and cfg.init_from:  # the architecture came from init_from: the checkpoint has it
        model_cfg = cfg.init_model_config(model_config_of(existing, read_checkpoint_meta(existing)[1]))
    elif init is None:
        model_cfg = cfg.model_config(tokenizer.vocab_size)
    else:
        if init.tokenizer is None or init.tokenizer.sha256() != tokenizer.sha256():
            raise CheckpointError(
                f"{init.checkpoint}: its tokenizer differs from {data_dir / 'tokenizer.json'}; prepare the data "
                "with the checkpoint's tokenizer.json (or give a text source)"
            )
        model_cfg = cfg.init_model_config(init.model.cfg)

    check_memory(model_cfg, device, env.world_size if cfg.parallel == "fsdp" else 1)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    if init is not None:
        model.load_state_dict(init.model.state_dict())
        del init
    model = model.to(device)
    fsdp_casts = use_bf16 and cfg.parallel == "fsdp" and cfg.fsdp_bf16_params  # else autocast does it
    par = parallelize(
        model,
        env,
        device,
        compile=cfg.compile,
        compile_scope=cfg.compile_scope,
        activation_checkpointing=cfg.activation_checkpointing,
        bf16=fsdp_casts,
        reshard_after_forward=cfg.fsdp_reshard_after_forward,
    )
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.adam_eps,
        fused=device.type == "cuda",
    )
    loader = TokenLoader(
        data_dir,
        "train",
        cfg.batch_size,
        cfg.seq_len,
        seed=cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
        vocab_size=model_cfg.vocab_size,
    )
    # FSDP with bf16 parameters casts them itself (MixedPrecisionPolicy); autocast serves everything else.
    autocast = torch.bfloat16 if use_bf16 and not fsdp_casts else None
    run = Run(cfg, model_cfg, run_dir, data_dir, tokenizer, par, optimizer, loader, device, autocast, env, micro_steps)
    state: dict[str, Any] = {"step": 0}
    if resume:
        state = _resume(run, existing)
    check_stop_after(stop_after, state["step"])  # before the run's files are rewritten
    if env.is_main:
        write_json(
            run_dir / "config.json",
            {
                "train": cfg.to_dict(),
                "model": model_cfg.to_dict(),
                "data": {"dir": str(data_dir), "manifest": manifest},
            },
        )
        write_json(run_dir / "environment.json", {**environment(), "world_size": env.world_size})
    return run, state


def _resume(run: Run, ckpt: Path) -> dict[str, Any]:
    saved_state, saved_cfg = read_checkpoint_meta(ckpt)
    check_resume_state(ckpt, saved_state, saved_cfg)
    # through ModelConfig: a field added since the checkpoint was written takes its default
    saved_model, now = model_config_of(ckpt, saved_cfg).to_dict(), run.model_cfg.to_dict()
    diff = sorted(k for k in saved_model if saved_model[k] != now[k] and k not in RUNTIME_FIELDS)
    if diff:  # the fields in RUNTIME_FIELDS choose how the model runs, and may change
        raise CheckpointError(f"{ckpt}: model config differs from this run's in {diff}; resume with the same model")
    if saved_state.get("tokenizer_sha256") != run.tokenizer.sha256():
        raise CheckpointError(f"{ckpt}: was trained with another tokenizer than {run.data_dir / 'tokenizer.json'}")
    for name in ("batch_size", "seq_len", "seed"):
        if saved_cfg["train"].get(name) != getattr(run.cfg, name):
            raise CheckpointError(
                f"{ckpt}: {name}={saved_cfg['train'].get(name)} there but "
                f"{getattr(run.cfg, name)} now; an exact resume needs the same value"
            )
    state = load_checkpoint(ckpt, model=run.model, optimizer=run.optimizer, map_location=run.device)
    run.loader.load_state_dict(state["loader"])  # a global position: any world size continues the same stream
    origin = saved_state.get("loader_origin")
    if origin is None or saved_cfg["train"].get("grad_accum") != run.cfg.grad_accum:
        origin = {"step": int(saved_state["step"]), "window": run.loader.window}
    run.loader_origin = {"step": int(origin["step"]), "window": int(origin["window"])}
    return state


def check_memory(model_cfg: ModelConfig, device: torch.device, shards: int) -> None:
    """Refuse at once a model whose weights and AdamW moments alone (12 bytes a parameter, split over ``shards``
    FSDP ranks) exceed the device's memory: building it would only fail later, or be killed by the OS."""
    n = total_params_fast(model_cfg)
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows): the allocator will say it
            return
    if 12 * n / shards > memory:
        raise ConfigError(
            f"model: {n:,} parameters need at least {12 * n / shards / 2**30:,.0f} GiB for weights and AdamW state "
            f"per {device.type} device, which has {memory / 2**30:,.0f} GiB; make it smaller (d_model, n_layers, "
            "ffn_hidden, vocabulary) or shard it over more GPUs (parallel='fsdp')"
        )


def check_stop_after(stop_after: int | None, step: int) -> None:
    if stop_after is not None and stop_after <= step:
        raise ConfigError(f"stop_after={stop_after}: the run is already at step {step}; give a later step")


def check_resume_state(ckpt: Path, state: dict[str, Any], config: dict[str, Any]) -> None:
    """Raise a one-line :class:`CheckpointError` unless state.json and config.json hold what a resume reads (their
    checksums only say they are as written, not that a training run wrote them)."""
    if not isinstance(config.get("train"), dict):
        raise CheckpointError(
            f"{ckpt / 'config.json'}: has no 'train' table, so no training run wrote it (a converted model?); start a "
            "new run from it with --init_from instead of --resume"
        )
    file = ckpt / "state.json"
    loader = check_table(f"{file}: loader", state.get("loader"), CheckpointError)
    for key in ("window", "seed", "seq_len", "n_tokens", "epoch", "position", "world_size"):
        if key in loader:
            check_int(f"{file}: loader.{key}", loader[key], maximum=2**63 - 1, error=CheckpointError)
    if "window" not in loader and not {"epoch", "position"} <= set(loader):
        raise CheckpointError(f"{file}: loader has no 'window' (nor 'epoch' and 'position'); not a diffv2 state")
    if "loader_origin" in state and "window" in loader:
        _check_loader_window(file, state, config["train"])
    for name in ("loss_spikes", "grad_spikes") if "loss_spikes" in state or "grad_spikes" in state else ():
        spikes = check_table(f"{file}: {name}", state.get(name), CheckpointError)
        check_int(f"{file}: {name}.count", spikes.get("count"), error=CheckpointError)
        history = spikes.get("history")
        if not isinstance(history, list) or not all(_finite_number(v) for v in history):
            raise CheckpointError(f"{file}: {name}.history must be a list of finite numbers")
    if "nonfinite" in state:  # steps skipped for a non-finite loss: at most every step taken so far
        check_int(f"{file}: nonfinite", state["nonfinite"], maximum=int(state["step"]), error=CheckpointError)


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's summary.json; None when there is none (or it is not one, so it is written again)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return summary if isinstance(summary, dict) and summary.get("finished") is True else None


def _check_loader_window(file: Path, state: dict[str, Any], train: dict[str, Any]) -> None:
    """The saved loader window must be where training leaves it: every step since ``loader_origin`` read
    grad_accum × batch_size windows (a tampered window would silently skip or repeat data)."""
    origin = check_table(f"{file}: loader_origin", state["loader_origin"], CheckpointError)
    step = int(state["step"])
    check_int(f"{file}: loader_origin.step", origin.get("step"), maximum=step, error=CheckpointError)
    check_int(f"{file}: loader_origin.window", origin.get("window"), maximum=2**63 - 1, error=CheckpointError)
    per_step = int(train.get("grad_accum") or 1) * int(train.get("batch_size") or 0)
    expect = origin["window"] + (step - origin["step"]) * per_step
    if state["loader"]["window"] != expect:
        raise CheckpointError(
            f"{file}: loader.window={state['loader']['window']} but {step - origin['step']} steps of {per_step} "
            f"windows from loader_origin give {expect}; the state was not written by this run's training"
        )
