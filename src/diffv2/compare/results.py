"""Read a grid's runs back from disk (metrics.jsonl, summary.json, failed.json) and write the compact raw numbers.

Nothing here trains or plots: :func:`load_grid` gives one :class:`RunResult` per run, curves are aligned over
seeds by step, and :func:`write_raw` leaves ``results.csv`` (final numbers, one row per run) and ``results.json``
(the same plus downsampled curves and the last diagnostics) next to the report.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..model import Transformer
from .grid import VARIANTS
from .runner import FAILED_FILE, GRID_FILE

MAX_POINTS = 200  # points per downsampled curve


@dataclass
class RunResult:
    key: str
    variant: str
    lr: float
    seed: int
    run_dir: Path
    status: str  # finished | diverged | incomplete | missing
    summary: dict[str, Any] = field(default_factory=dict)
    train: dict[str, list[float]] = field(default_factory=dict)  # step, loss, grad_norm, loss_spike, grad_spike
    evals: dict[str, list[float]] = field(default_factory=dict)  # step, val_loss
    tokens_per_s: list[float] = field(default_factory=list)
    diag: dict[str, Any] | None = None  # the last "diag" record
    first_diag: dict[str, Any] | None = None  # the first one (step 1: the model almost at init)
    environment: dict[str, Any] = field(default_factory=dict)  # environment.json: versions, device, sharing
    error: str = ""

    @property
    def final_val_loss(self) -> float | None:
        return self.summary.get("val_loss") if self.status == "finished" else None

    def count(self, flag: str) -> int:
        """Loss or grad spikes (``flag`` = "loss_spike" / "grad_spike") or skipped steps seen so far."""
        return int(sum(self.train.get(flag, [])))

    @property
    def median_tokens_per_s(self) -> float | None:
        # the median skips the first window, which includes warm-up (allocations, kernel selection)
        speeds = self.tokens_per_s[1:] or self.tokens_per_s
        return statistics.median(speeds) if speeds else None


@dataclass
class Grid:
    out_dir: Path
    variants: list[str]
    lrs: list[float]
    seeds: list[int]
    baseline: str
    runs: list[RunResult]
    models: dict[str, dict[str, Any]]  # variant -> ModelConfig fields
    base: dict[str, Any]  # the base TrainConfig fields
    tokens_per_step: int
    data_dir: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # default variants the model shape does not allow

    def select(self, variant: str, lr: float) -> list[RunResult]:
        return [r for r in self.runs if r.variant == variant and r.lr == lr]


def load_run(run_dir: Path, variant: str, lr: float, seed: int, key: str) -> RunResult:
    result = RunResult(key, variant, lr, seed, run_dir, "missing")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        result.status = "incomplete"
        train_cols: dict[str, list[float]] = {k: [] for k in ("step", "loss", "grad_norm", "loss_spike", "grad_spike",
                                                               "skipped")}  # fmt: skip
        for line in metrics.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec["kind"] == "train":
                for k in train_cols:  # a skipped (non-finite) step has no spike flags
                    train_cols[k].append(float(rec.get(k, False) if k.endswith(("spike", "skipped")) else rec[k]))
                if "tokens_per_s" in rec:
                    result.tokens_per_s.append(rec["tokens_per_s"])
            elif rec["kind"] == "eval":
                result.evals.setdefault("step", []).append(rec["step"])
                result.evals.setdefault("val_loss", []).append(rec["val_loss"])
            elif rec["kind"] == "diag":
                result.first_diag = result.first_diag or rec
                result.diag = rec
        result.train = train_cols
    if (run_dir / "environment.json").is_file():
        result.environment = json.loads((run_dir / "environment.json").read_text(encoding="utf-8"))
    if (run_dir / "summary.json").is_file():
        result.status = "finished"
        result.summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    elif (run_dir / FAILED_FILE).is_file():
        result.status = "diverged"
        result.error = json.loads((run_dir / FAILED_FILE).read_text(encoding="utf-8")).get("error", "")
    return result


def load_grid(out_dir: str | Path) -> Grid:
    """The runs of a grid, as listed in ``<out>/grid.json`` (written by ``diffv2 compare``)."""
    out = Path(out_dir)
    path = out / GRID_FILE
    if not path.is_file():
        from ..errors import DataError

        raise DataError(f"{path}: not found; run `diffv2 compare CONFIG` (it writes grid.json) first")
    grid = json.loads(path.read_text(encoding="utf-8"))
    cmp = grid["compare"]
    runs = [load_run(out / r["key"], r["variant"], r["lr"], r["seed"], r["key"]) for r in grid["runs"]]
    return Grid(out, cmp["variants"], cmp["lrs"], cmp["seeds"], cmp["baseline"], runs, grid["models"], cmp["base"],
                grid["tokens_per_step"], grid.get("data_dir", ""), cmp.get("skipped", {}))  # fmt: skip


# ---------------------------------------------------------------------- accounting
def accounting(model: dict[str, Any], seq_len: int) -> dict[str, float]:
    """Parameter counts by component and training FLOPs/token of a model config (built on the meta device)."""
    with torch.device("meta"):
        net = Transformer(ModelConfig.from_dict(model))
    return {**net.num_params(), "flops_per_token": net.flops_per_token(seq_len)}


# ---------------------------------------------------------------------- curves
def downsample(steps: list[float], values: list[float], max_points: int = MAX_POINTS) -> tuple[list, list]:
    """Bucket means, so a 100k-step curve stays a few hundred points; non-finite values are dropped."""
    pairs = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None and math.isfinite(v)]
    if len(pairs) <= max_points:
        return [p[0] for p in pairs], [p[1] for p in pairs]
    size = math.ceil(len(pairs) / max_points)
    buckets = [pairs[i : i + size] for i in range(0, len(pairs), size)]
    return [b[-1][0] for b in buckets], [sum(v for _, v in b) / len(b) for b in buckets]


def seed_band(runs: list[RunResult], source: str, name: str, max_points: int = MAX_POINTS,
              log: bool = False) -> dict[str, list]:  # fmt: skip
    """Mean, std and count over seeds at each step of one curve (``source`` "train" or "evals").

    Steps are aligned exactly (every run of a grid logs the same steps); a diverged run simply stops contributing.
    With ``log`` the statistics are of log10(value) (for curves drawn on a log axis, such as the grad norm).
    """
    by_step: dict[float, list[float]] = {}
    for run in runs:
        cols = getattr(run, source)
        values = cols.get(name, [])
        if log:
            values = [math.log10(v) if v > 0 else float("nan") for v in values]
        steps, values = downsample(cols.get("step", []), values, max_points)
        for s, v in zip(steps, values, strict=True):
            by_step.setdefault(s, []).append(v)
    steps = sorted(by_step)
    means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    stds = [statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps]
    return {"step": steps, "mean": means, "std": stds, "n": [len(by_step[s]) for s in steps]}


# ---------------------------------------------------------------------- raw output
_DIAG_KEYS = ("hidden_max", "max_logit", "context_rms", "context_rms_per_head", "sink_mass", "lambda_mean",
              "lambda_std")  # fmt: skip


def final_row(run: RunResult) -> dict[str, Any]:
    return {
        "variant": run.variant,
        "lr": run.lr,
        "seed": run.seed,
        "status": run.status,
        "steps_done": int(run.train["step"][-1]) if run.train.get("step") else 0,
        "final_val_loss": run.final_val_loss,
        "final_train_loss": run.summary.get("train_loss"),
        "loss_spikes": run.count("loss_spike"),
        "grad_spikes": run.count("grad_spike"),
        "nonfinite_steps": run.count("skipped"),
        "tokens_per_s": run.median_tokens_per_s,
        "max_hidden_last_layer": run.diag["hidden_max"][-1] if run.diag else None,
        "max_logit_max_layer": max(run.diag["max_logit"]) if run.diag else None,
    }


def write_raw(grid: Grid, params: dict[str, dict[str, float]], report_dir: Path) -> tuple[Path, Path]:
    """``results.csv`` and ``results.json`` in ``report_dir``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = [final_row(r) for r in grid.runs]
    csv_path = report_dir / "results.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "params_total"] if rows else ["variant"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "params_total": params.get(row["variant"], {}).get("total")})
    runs_json = []
    for run, row in zip(grid.runs, rows, strict=True):
        curves = {
            "train_loss": downsample(run.train.get("step", []), run.train.get("loss", [])),
            "grad_norm": downsample(run.train.get("step", []), run.train.get("grad_norm", [])),
            "val_loss": (run.evals.get("step", []), run.evals.get("val_loss", [])),
        }
        diag = {k: run.diag[k] for k in _DIAG_KEYS if run.diag and k in run.diag}
        points = {k: {"step": s, "value": v} for k, (s, v) in curves.items()}
        diag_step = run.diag["step"] if run.diag else None
        runs_json.append({**row, "key": run.key, "error": run.error, "diag_step": diag_step, "diag": diag,
                          "curves": points})  # fmt: skip
    payload = {
        "variants": {v: VARIANTS[v][0] for v in grid.variants},
        "baseline": grid.baseline,
        "lrs": grid.lrs,
        "seeds": grid.seeds,
        "tokens_per_step": grid.tokens_per_step,
        "params": params,
        "runs": runs_json,
    }
    json_path = report_dir / "results.json"
    json_path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return csv_path, json_path


__all__ = ["Grid", "RunResult", "accounting", "downsample", "load_grid", "seed_band", "write_raw"]
