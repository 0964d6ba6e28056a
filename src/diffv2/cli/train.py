"""``diffv2 train``: every TrainConfig and ModelConfig field is a flag (``--lr``, ``--attention``...).

``--resume`` continues the run in ``--out_dir`` from its own ``config.json``: flags override it, and a change
that would make the run train differently from how it began (``trajectory`` fields, the model) is refused
unless ``--force``. Data-parallel: ``torchrun --nproc_per_node=N -m diffv2 train --parallel ddp|fsdp ...`` runs
this on every rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..config import PRESETS, RUNTIME_FIELDS, ModelConfig
from ..errors import ConfigError
from ..train.config import TrainConfig, load_config_file
from .fields import add_field_flags, path_arg

# vocab_size follows the tokenizer; the model table itself is not a flag (its fields are)
_SKIP = {"model", "vocab_size"}


def default_model() -> ModelConfig:
    """The model a bare ``diffv2 train`` builds (its vocabulary follows the tokenizer it trains)."""
    cfg = TrainConfig()
    return cfg.model_config(vocab_size=cfg.tokenizer_vocab)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain a model (defaults: a tiny DIFF V2 on the embedded corpus, CPU-sized)",
        description="Pretrain a language model. Defaults: the tiny preset, DIFF V2, the embedded corpus, CPU-sized. "
        "Precedence: field defaults <- --config file <- flags; with --resume, the run's config.json <- file <- flags.",
    )
    p.add_argument("--config", type=path_arg, help="a .toml/.yaml/.json file with training fields and a [model] table")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out_dir from its latest checkpoint, with the run's own config.json",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: accept flags that change the run's trajectory (steps, lr, schedule, batch, data, seed)",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEP",
        help="stop (with a checkpoint) after this step; the schedule still spans --steps",
    )
    p.add_argument("--no-progress", action="store_true", help="plain log lines every log_every steps, no progress bar")
    train_defaults = TrainConfig().to_dict()
    train_fields = add_field_flags(p, TrainConfig, "training fields", train_defaults, skip=_SKIP)
    model = default_model()
    preset = PRESETS[train_defaults["preset"]]
    note = {name: f"from the {train_defaults['preset']} preset" for name in preset}
    title = f"model fields (override the preset; defaults: the {train_defaults['preset']} preset's)"
    model_fields = add_field_flags(p, ModelConfig, title, model.to_dict(), skip=_SKIP, note=note)
    p.set_defaults(func=run, _train_fields=train_fields, _model_fields=model_fields)


def _overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The training and model fields the config file and the flags set (flags win)."""
    data = dict(load_config_file(args.config)) if args.config is not None else {}
    model = TrainConfig.model_table(data.pop("model", None))
    if "preset" in model:
        data.setdefault("preset", model.pop("preset"))
    data.update({name: getattr(args, name) for name in args._train_fields if getattr(args, name) is not None})
    model.update({name: getattr(args, name) for name in args._model_fields if getattr(args, name) is not None})
    return data, model


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults ← config file ← flags; with ``--resume``, the run's ``config.json`` ← config file ← flags."""
    data, model = _overrides(args)
    if not getattr(args, "resume", False):
        return TrainConfig.from_dict({**data, "model": model})
    run_dir = Path(data.get("out_dir", TrainConfig.out_dir))
    saved_train, saved_model = read_run_config(run_dir)
    merged = {**saved_train.to_dict(), **data, "out_dir": str(run_dir)}
    merged["model"] = {**saved_train.model, **model}
    if "preset" in data and data["preset"] != saved_train.preset:  # a new preset: the old overrides go with it
        merged["model"] = model
    cfg = TrainConfig.from_dict(merged)
    check_resume(run_dir, saved_train, saved_model, cfg, force=args.force)
    return cfg


def read_run_config(run_dir: Path) -> tuple[TrainConfig, ModelConfig]:
    """The training and model config a run was started (or last resumed) with, from ``RUN/config.json``."""
    path = run_dir / "config.json"
    if not path.is_file():
        what = "no such folder" if not run_dir.is_dir() else "no config.json in it"
        raise ConfigError(
            f"--resume: {run_dir} holds no run to resume ({what}); give --out_dir of a run that "
            "`diffv2 train` started, or drop --resume to start one"
        )
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return TrainConfig.from_dict(saved["train"]), ModelConfig.from_dict(saved["model"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:  # ValueError: not JSON, not UTF-8
        raise ConfigError(f"{path}: not a run config ({type(err).__name__}: {err}); resume cannot read it") from None


def trajectory_changes(old: TrainConfig, new: TrainConfig, old_model: ModelConfig) -> list[tuple[str, Any, Any]]:
    """``(field, old, new)`` for every change that makes training go differently: the training fields marked
    ``trajectory`` and the model's architecture (fields in ``RUNTIME_FIELDS`` only choose how it runs)."""
    changes = [
        (f.name, getattr(old, f.name), getattr(new, f.name))
        for f in dataclasses.fields(TrainConfig)
        if f.metadata.get("trajectory")
        and f.name not in ("model", "preset")  # both: through the model below
        and getattr(old, f.name) != getattr(new, f.name)
    ]
    now = new.init_model_config(old_model) if new.init_from else new.model_config(old_model.vocab_size)
    before, after = old_model.to_dict(), now.to_dict()
    changes += [(k, before[k], after[k]) for k in before if before[k] != after[k] and k not in RUNTIME_FIELDS]
    return changes


def check_resume(run_dir: Path, old: TrainConfig, old_model: ModelConfig, new: TrainConfig, *, force: bool) -> None:
    """Refuse a resume whose flags change the trajectory (unless ``force``) or the architecture (always: the
    checkpoint's weights would not fit); say what changed otherwise."""
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    changes = trajectory_changes(old, new, old_model)
    arch = [c for c in changes if c[0] in model_names]
    if arch:
        raise ConfigError(
            f"--resume: {_listed(arch)} would change the model of {run_dir}, whose checkpoints hold "
            "the old shapes; drop those flags, or start a new --out_dir (--init_from to reuse it)"
        )
    if changes and not force:
        extend = any(name == "steps" and b > a for name, a, b in changes)
        why = " (a longer run follows another lr schedule from here on)" if extend else ""
        raise ConfigError(
            f"--resume: {_listed(changes)} would change how {run_dir} trains{why}; drop those flags "
            f"to continue it as it began (its config.json), or pass --force to continue with them"
        )
    harmless = [
        (f.name, getattr(old, f.name), getattr(new, f.name))
        for f in dataclasses.fields(TrainConfig)
        if not f.metadata.get("trajectory") and f.name != "out_dir" and getattr(old, f.name) != getattr(new, f.name)
    ]
    if changes or harmless:
        print(f"resuming {run_dir} with {_listed(changes + harmless)}")


def _listed(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{name} {old!r}→{new!r}" for name, old, new in changes)


def run(args: argparse.Namespace) -> int:
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:  # not launched by torchrun
        return _run(args)
    # Recorded, the first failing rank's error heads torchrun's failure report instead of a bare exit code.
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_run)(args)


def _run(args: argparse.Namespace) -> int:
    from ..train.trainer import train  # heavy imports only when training

    cfg = config_from_args(args)
    if cfg.warmup_steps >= cfg.steps:
        print(
            f"warning: warmup_steps={cfg.warmup_steps} >= steps={cfg.steps}: the learning rate never leaves "
            "its warmup ramp",
            file=sys.stderr,
        )
    summary = train(cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports for all
        return 128 + summary["signal"] if summary.get("signal") else 0
    if summary.get("signal"):  # the trainer saved a checkpoint and printed how to resume
        return 128 + summary["signal"]
    print(
        f"\nstep {summary['step']}: train loss {_num(summary['train_loss'])}, val loss "
        f"{_num(summary['val_loss'])}, loss spikes {summary['loss_spikes']}, grad spikes {summary['grad_spikes']}, "
        f"non-finite steps {summary['nonfinite']}"
    )
    print(f"checkpoint: {summary['checkpoint']}")
    if "sample" in summary:
        print(f"sample:\n{summary['sample']}")
    return 0


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
