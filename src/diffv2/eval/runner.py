"""Run evaluation tasks on a model (``run_tasks``, the Python API) or on a checkpoint (``evaluate_checkpoint``,
what ``diffv2 eval`` calls), and load a run folder or a Hugging Face folder for it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_pretrained, pick_device
from ..config import check_seed
from ..data.tokenizer import Tokenizer
from ..errors import CheckpointError, ConfigError
from ..model import Transformer
from .context import EvalContext
from .registry import SAMPLE_OPTIONS, Task, resolve_tasks
from .report import write_outputs

PathLike = str | os.PathLike[str]


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    info: dict[str, Any]  # checkpoint, format, train_len, data_dir


def run_data_dir(path: PathLike, train_config: dict[str, Any] | None = None) -> str | None:
    """The prepared dataset a run trained on: its run folder's config.json (checked in the folder and the two
    above it, for a checkpoint folder inside a run), or the training config's ``data`` when that is a prepared
    dataset."""
    for folder in (Path(path), *list(Path(path).parents)[:2]):
        try:
            return json.loads((folder / "config.json").read_text(encoding="utf-8"))["data"]["dir"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    data = (train_config or {}).get("data")
    return data if isinstance(data, str) and (Path(data) / "manifest.json").is_file() else None


def load_for_eval(path: PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Loaded:
    """A native run / checkpoint folder or an HF diffv2 folder, with its tokenizer, in eval mode."""
    path = Path(path)
    # a native checkpoint folder has checksums.json and a run folder checkpoints/; an HF folder has neither
    if (
        (path / "config.json").is_file()
        and not (path / "checksums.json").is_file()
        and not (path / "checkpoints").is_dir()
    ):
        from ..hf.convert import load_hf_native, read_hf_config, read_tokenizer_json

        cfg = read_hf_config(path)  # the config first: a bad field is named before anything else reads the folder
        text = read_tokenizer_json(path)  # first: a broken tokenizer fails before the weights load
        if text is None:
            raise CheckpointError(f"{path}: holds no tokenizer.json, so text tasks cannot be built")
        tok = Tokenizer.from_json_str(text, source=str(path / "tokenizer.json"))
        if tok.vocab_size > cfg.vocab_size:
            raise CheckpointError(
                f"{path}: the tokenizer has {tok.vocab_size} ids but the model's vocabulary {cfg.vocab_size}; the "
                "tokenizer belongs to another model"
            )
        model = load_hf_native(path, cfg).to(device, dtype=dtype).eval()
        info = {"checkpoint": str(path), "format": "hf", "train_len": model.cfg.max_seq_len, "data_dir": None}
        return Loaded(model, tok, info)
    loaded = load_pretrained(path, device=device, dtype=dtype)
    if loaded.tokenizer is None:
        raise CheckpointError(f"{loaded.checkpoint}: holds no tokenizer.json, so text tasks cannot be built")
    train = loaded.config.get("train") or {}
    info = {
        "checkpoint": str(loaded.checkpoint),
        "format": "native",
        "train_len": int(train.get("seq_len") or loaded.model.cfg.max_seq_len),
        "data_dir": run_data_dir(path, train),
    }
    return Loaded(loaded.model, loaded.tokenizer, info)


def run_tasks(
    model: Any,
    tokenizer: Tokenizer | None,
    tasks: str | list[str],
    *,
    quick: bool = False,
    seed: int = 0,
    out: PathLike | None = None,
    train_len: int | None = None,
    data_dir: PathLike | None = None,
    options: dict[str, Any] | None = None,
    progress: bool = True,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``tasks`` (names, comma-separated or a list; see ``diffv2.eval.TASKS``) on ``model`` and return
    ``{"settings": ..., "tasks": {name: result}}``; with ``out``, also write eval.json, eval.md and figures there.

    ``model``: a :class:`Transformer` (or None when only model-free tasks such as ``mqar`` run); ``tokenizer``:
    its tokenizer; ``train_len``: the context length it was trained at (default: ``model.cfg.max_seq_len``);
    ``data_dir``: a prepared dataset whose val split gives the text (default: the embedded corpus).
    """
    check_seed("seed", seed)
    resolved = resolve_tasks(tasks)
    needing = [t.name for t in resolved if t.needs_model]
    if needing and (model is None or tokenizer is None):
        raise ConfigError(f"--checkpoint: {', '.join(needing)} need(s) a model and its tokenizer")
    ctx = _context(model, tokenizer, quick, seed, train_len, data_dir, options or {}, progress)
    if any(t.reads_text for t in resolved):
        ctx.text()  # a damaged dataset is reported before any task starts its progress bar
    results: dict[str, Any] = {}
    for task in resolved:
        results[task.name] = _timed(task, ctx)
    settings = {"seed": seed, "quick": quick, "train_len": ctx.train_len, "device": str(ctx.device), **(info or {})}
    settings["sample_options"] = {k: v for k, v in ctx.options.items() if k in SAMPLE_OPTIONS}
    if model is not None:
        settings["model"] = model.cfg.to_dict() if isinstance(model, Transformer) else type(model).__name__
    summary = {"settings": settings, "tasks": results}
    if out is not None:
        summary["files"] = [str(p) for p in write_outputs(summary, resolved, Path(out))]
    return summary


def _context(model, tokenizer, quick, seed, train_len, data_dir, options, progress) -> EvalContext:
    if isinstance(model, Transformer):
        model.eval()
        device = next(model.parameters()).device
        vocab, train_len = model.cfg.vocab_size, train_len or model.cfg.max_seq_len
    else:
        device = torch.device(options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        vocab = options.get("vocab_size") or (tokenizer.vocab_size if tokenizer is not None else 0)
        train_len = train_len or options.get("train_len") or 0
    return EvalContext(
        model,
        tokenizer,
        train_len,
        vocab,
        device=device,
        seed=seed,
        quick=quick,
        data_dir=data_dir,
        options=options,
        progress=progress,
        text_source=options.get("text_source"),
    )


def _timed(task: Task, ctx: EvalContext) -> dict[str, Any]:
    start = time.perf_counter()
    result = task.run(ctx)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def evaluate_checkpoint(
    checkpoint: PathLike | None,
    tasks: str | list[str],
    *,
    out: PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    **kwargs: Any,
) -> dict[str, Any]:
    """``run_tasks`` on a run / checkpoint / HF folder (None for model-free tasks only); ``out`` defaults to
    ``<run>/eval`` beside the checkpoints (an HF folder: ``<folder>/eval``)."""
    dev = pick_device(device)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": None}
    if dtype not in dtypes:
        raise ConfigError(f"--dtype {dtype}: choose from {', '.join(dtypes)}")
    torch_dtype = dtypes[dtype] or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    options = dict(kwargs.pop("options", None) or {}, device=str(dev))
    if checkpoint is None:
        return run_tasks(None, None, tasks, out=out, options=options, **kwargs)
    loaded = load_for_eval(checkpoint, device=dev, dtype=torch_dtype)
    if out is None:
        ckpt = Path(loaded.info["checkpoint"])
        out = ckpt / "eval" if loaded.info["format"] == "hf" else ckpt.parent.parent / "eval" / ckpt.name
    info = {**loaded.info, "dtype": str(torch_dtype).replace("torch.", "")}
    return run_tasks(
        loaded.model,
        loaded.tokenizer,
        tasks,
        out=out,
        train_len=loaded.info["train_len"],
        data_dir=kwargs.pop("data_dir", None) or loaded.info["data_dir"],
        options=options,
        info=info,
        **kwargs,
    )
