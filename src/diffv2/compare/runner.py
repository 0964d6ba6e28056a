"""Run a comparison grid: prepare the data once, then train every run that is not finished yet.

A run's state is read from its folder, so the grid can be stopped and restarted at any point:

- ``done``: ``summary.json`` exists (the trainer writes it only when a run reaches ``steps``), never redone;
- ``failed``: ``failed.json`` exists (the run diverged: too many non-finite steps), a result, not redone;
- ``resume``: a checkpoint but no summary, continued exactly from the checkpoint;
- ``new``: nothing to continue from, started from scratch.

Runs go one after another in this process, or ``jobs`` at a time as ``python -m diffv2.compare.worker``
subprocesses that share the CPU threads, or get one GPU per worker slot when several are visible.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import queue
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import latest_checkpoint
from ..data import load_manifest, prepare_dataset, split_documents
from ..errors import ConfigError, DiffV2Error
from ..train import TrainConfig
from .evaluation import NO_EVAL, EvalSpec
from .grid import CompareConfig, RunSpec, expand_grid, variant_model

GRID_FILE = "grid.json"
CONFIG_FILE = "compare_config.json"  # the full train config of one run, what the worker reads
FAILED_FILE = "failed.json"


@dataclass
class RunOutcome:
    key: str
    before: str  # the state found: done | failed | resume | new
    after: str  # done | failed | stopped (stop_after reached) | error (the worker crashed)
    seconds: float = 0.0
    message: str = ""

    @property
    def trained(self) -> bool:
        return self.before in ("new", "resume")


def run_state(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").is_file():
        return "done"
    if (run_dir / FAILED_FILE).is_file():
        return "failed"
    return "resume" if latest_checkpoint(run_dir) is not None else "new"


def prepare_shared_data(cfg: CompareConfig, progress: bool = False) -> Path:
    """Tokenize the base ``data`` once into ``<out>/data`` (unless it is a prepared folder already)."""
    data_dir = cfg.data_dir
    if not (data_dir / "manifest.json").is_file():
        print(f"preparing {cfg.base.data!r} with a {cfg.base.tokenizer} tokenizer into {data_dir} ...")
        # overwrite=True only ever replaces an unfinished prepare: a finished one has a manifest and is kept
        prepare_dataset(
            cfg.base.data,
            data_dir,
            tokenizer=cfg.base.tokenizer,
            vocab_size=cfg.base.tokenizer_vocab,
            val_fraction=cfg.base.val_fraction,
            seed=cfg.base.seed,
            progress=progress,
            overwrite=True,
        )
    return data_dir


def write_grid_file(cfg: CompareConfig, specs: list[RunSpec], data_dir: Path) -> Path:
    """``<out>/grid.json``: what the report needs to find and describe every run without the config file, and the
    history of the decision rules: each version with when it was first written and how many runs had finished."""
    vocab = int(load_manifest(data_dir)["vocab_size"])
    path = Path(cfg.out_dir) / GRID_FILE
    history = json.loads(path.read_text(encoding="utf-8")).get("rules_history", []) if path.is_file() else []
    sha = cfg.rule_set.sha256()
    if not history or history[-1]["sha256"] != sha:
        finished = sum((s.run_dir / "summary.json").is_file() for s in specs)
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        history.append({"sha256": sha, "written_at": now, "finished_runs": finished, "rules": cfg.rules})
    documents = split_documents(data_dir, "val")
    grid = {
        "compare": cfg.to_dict(),
        "data_dir": str(data_dir),
        "vocab_size": vocab,
        "tokens_per_step": cfg.base.batch_size * cfg.base.seq_len * cfg.base.grad_accum,
        "models": {v: variant_model(cfg.base, v, vocab).to_dict() for v in cfg.variants},
        "runs": [{"key": s.key, "variant": s.variant, "lr": s.lr, "seed": s.seed, "steps": s.steps} for s in specs],
        "rules_history": history,
        "val_split": documents.describe() if documents is not None else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(grid, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def execute(
    train_cfg: TrainConfig,
    *,
    stop_after: int | None = None,
    progress: bool = False,
    evals: EvalSpec = NO_EVAL,
) -> tuple[str, str, str]:
    """Start, resume or skip one run according to its folder, then score a finished run on the ``evals`` tasks its
    folder lacks; returns (state before, state after, a note: why the scoring failed, or "")."""
    run_dir = Path(train_cfg.out_dir)
    before = run_state(run_dir)
    after = before if before in ("done", "failed") else _train(train_cfg, before, stop_after, progress)
    if after != "done" or latest_checkpoint(run_dir) is None:
        return before, after, ""
    try:
        evals.run(run_dir)  # scores only the tasks the folder lacks: nothing when it has them all
    except (DiffV2Error, RuntimeError, OSError) as err:  # CUDA out of memory is a RuntimeError; the run stays done
        return before, after, f"(evaluation failed: {type(err).__name__}: {str(err).splitlines()[0][:200]})"
    return before, after, ""


def _train(train_cfg: TrainConfig, before: str, stop_after: int | None, progress: bool) -> str:
    from ..train import TrainingError, train  # the training stack only when a run is trained, not to read results

    run_dir = Path(train_cfg.out_dir)
    if before == "new":
        # A run killed before its first checkpoint left records the trainer would append to; start clean.
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    try:
        summary = train(
            train_cfg, resume=before == "resume", stop_after=stop_after, progress=progress, quiet=not progress
        )
    except TrainingError as err:  # divergence is an outcome of the experiment, recorded and reported
        # TrainingError also covers setup problems (e.g. no CUDA device); only the non-finite abort is a result
        if "non-finite" not in str(err):
            raise
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FAILED_FILE).write_text(json.dumps({"error": str(err)}, indent=2), encoding="utf-8")
        return "failed"
    if summary.get("signal"):  # Ctrl-C / SIGTERM: the run saved a checkpoint; the grid stops (a re-run resumes)
        raise KeyboardInterrupt
    return "done" if summary["finished"] else "stopped"


def run_grid(
    cfg: CompareConfig,
    *,
    jobs: int = 1,
    stop_after: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    train: bool = True,
) -> list[RunOutcome]:
    """Prepare the data, write ``grid.json``, then run every unfinished run; returns one outcome per run.

    ``stop_after`` stops each run after that step (with a checkpoint), as ``diffv2 train --stop-after`` does.
    ``train=False`` only scores finished runs that lack eval results (what a time-boxed call keeps time for).
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: must be >= 1")
    data_dir = prepare_shared_data(cfg, progress)
    specs = expand_grid(cfg, data_dir)
    for spec in specs:
        check_run_config(spec)
    write_grid_file(cfg, specs, data_dir)
    evals = EvalSpec.of(cfg.to_dict())
    states = {s.key: run_state(s.run_dir) for s in specs}
    finished = [s for s in specs if states[s.key] == "done" and not evals.done(s.run_dir)]
    unscored = [s for s in finished if latest_checkpoint(s.run_dir) is not None]
    todo = [s for s in specs if (train and states[s.key] in ("new", "resume")) or s in unscored]
    outcomes = {s.key: RunOutcome(s.key, states[s.key], states[s.key]) for s in specs}
    trained = len(todo) - len(unscored)
    log(
        f"compare: {len(specs)} runs, {len(specs) - trained} already finished, {trained} to train"
        + (f", {len(unscored)} to evaluate" if unscored else "")
        + (
            f"; {len(finished) - len(unscored)} finished without eval results cannot be scored (no checkpoint)"
            if len(finished) > len(unscored)
            else ""
        )
    )

    slots: queue.SimpleQueue[int] = queue.SimpleQueue()  # which worker slot (and GPU) is free
    for slot in range(jobs):
        slots.put(slot)

    def one(i: int, spec: RunSpec) -> None:
        start = time.perf_counter()
        if jobs == 1:
            before, after, message = execute(spec.train, stop_after=stop_after, progress=progress, evals=evals)
        else:
            slot = slots.get()
            try:
                before, after, message = _execute_in_subprocess(spec, slot, jobs, stop_after, evals)
            finally:
                slots.put(slot)
        outcome = RunOutcome(spec.key, before, after, time.perf_counter() - start, message)
        outcomes[spec.key] = outcome
        log(f"[{i + 1}/{len(todo)}] {spec.key}: {before} -> {after} in {outcome.seconds:.1f} s {message}".rstrip())

    if jobs == 1:
        for i, spec in enumerate(todo):
            one(i, spec)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for future in [pool.submit(one, i, s) for i, s in enumerate(todo)]:
                future.result()
    return [outcomes[s.key] for s in specs]


RUNS_PER_DEVICE_ENV = "DIFFV2_RUNS_PER_DEVICE"


def _child_env(slot: int, jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    # jobs processes share the cores; left alone, each would start one thread per core and thrash
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    visible = env.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g.strip()] if visible is not None else []
    if visible is None and torch.cuda.is_available():
        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if len(gpus) > 1:  # one GPU per worker slot; slots are reused only once their run has ended
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    # recorded in each run's environment.json: the report must not present shared-device speeds as a comparison
    env[RUNS_PER_DEVICE_ENV] = str(-(-jobs // max(1, len(gpus))))
    return env


# Fields that change what a run computes. A run folder made with other values is not this grid's run: resuming
# it would splice two schedules, and calling it "done" would put another experiment into the report.
_IGNORED_FIELDS = {
    "data",
    "out_dir",
    "device",
    "tensorboard",
    "sample_tokens",
    "sample_prompt",
    "keep_last",
    "save_every",
    "peak_flops",
    "log_every",
    "compile",
    "activation_checkpointing",
    "dist_timeout_s",
    "profile_steps",
    "profile_start",
}


def check_run_config(spec: RunSpec) -> None:
    """Raise :class:`ConfigError` if the run's folder was made with a different training config."""
    saved_path = spec.run_dir / "config.json"
    if not saved_path.is_file():
        return
    now = spec.train.to_dict()
    # a field added to TrainConfig after the run was made counts as its default there
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    saved = {**defaults, **json.loads(saved_path.read_text(encoding="utf-8"))["train"]}
    differ = sorted(k for k in set(saved) | set(now) if k not in _IGNORED_FIELDS and saved.get(k) != now.get(k))
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in differ)
        raise ConfigError(
            f"{spec.run_dir} was made with another config ({changes}); restore the config or "
            "use a new [compare] out_dir"
        )


def _execute_in_subprocess(
    spec: RunSpec, index: int, jobs: int, stop_after: int | None, evals: EvalSpec
) -> tuple[str, str, str]:
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    config_path = spec.run_dir / CONFIG_FILE
    config_path.write_text(json.dumps(spec.train.to_dict(), indent=2), encoding="utf-8")
    command = [sys.executable, "-m", "diffv2.compare.worker", str(config_path), *evals.to_args()]
    command += ["--stop-after", str(stop_after)] if stop_after is not None else []
    log_path = spec.run_dir / "train.log"
    before = run_state(spec.run_dir)
    with log_path.open("a", encoding="utf-8") as log_file:
        proc = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=_child_env(index, jobs))
    tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
    if proc.returncode != 0:
        return before, "error", f"(exit {proc.returncode}; see {log_path}: {tail[0] if tail else ''})"
    result: dict[str, Any] = json.loads(tail[0])  # the worker's last line
    return result["before"], result["after"], result.get("message", "")
