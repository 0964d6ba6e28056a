"""``diffv2 train``: every TrainConfig and ModelConfig field is a flag (``--lr``, ``--attention``...).

Data-parallel: ``torchrun --nproc_per_node=N -m diffv2 train --parallel ddp|fsdp ...`` runs this on every rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any

from ..config import ModelConfig
from ..train.config import TrainConfig, load_config_file

# vocab_size follows the tokenizer; the model table itself is not a flag
_SKIP = {"model", "vocab_size"}


def _add_field_flags(parser: argparse.ArgumentParser, cls: type, group_title: str) -> list[str]:
    group = parser.add_argument_group(group_title)
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in _SKIP:
            continue
        hint = hints[f.name]
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kwargs: dict[str, Any] = {"dest": f.name, "default": None}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            kwargs["type"] = base if base in (int, float) else str
            kwargs["metavar"] = f.name.upper()
        default = f.default if f.default is not dataclasses.MISSING else None
        group.add_argument(*flags, help=f"(default: {default})", **kwargs)
        names.append(f.name)
    return names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a model (defaults: a tiny DIFF V2 on the embedded corpus, CPU-sized)")
    p.add_argument("--config", help="a .toml/.yaml/.json file with training fields and a [model] table")
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its latest checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop (with a checkpoint) after this step; the schedule still spans --steps")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    train_fields = _add_field_flags(p, TrainConfig, "training fields")
    model_fields = _add_field_flags(p, ModelConfig, "model fields (override the preset)")
    p.set_defaults(func=run, _train_fields=train_fields, _model_fields=model_fields)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults ← config file ← flags."""
    data = load_config_file(args.config) if args.config else {}
    data = dict(data)
    model = TrainConfig.model_table(data.pop("model", None))
    for name in args._train_fields:
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    for name in args._model_fields:
        if getattr(args, name) is not None:
            model[name] = getattr(args, name)
    return TrainConfig.from_dict({**data, "model": model})


def run(args: argparse.Namespace) -> int:
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:  # not launched by torchrun
        return _run(args)
    # Recorded, the first failing rank's error heads torchrun's failure report instead of a bare exit code.
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_run)(args)


def _run(args: argparse.Namespace) -> int:
    from ..train.trainer import train  # heavy imports only when training

    cfg = config_from_args(args)
    summary = train(cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports for all
        return 0
    print(f"\nstep {summary['step']}: train loss {summary['train_loss']}, val loss {summary['val_loss']}, "
          f"loss spikes {summary['loss_spikes']}, grad spikes {summary['grad_spikes']}, "
          f"non-finite steps {summary['nonfinite']}")  # fmt: skip
    print(f"checkpoint: {summary['checkpoint']}")
    if "sample" in summary:
        print(f"sample:\n{summary['sample']}")
    return 0
