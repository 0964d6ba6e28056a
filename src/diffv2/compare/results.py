"""Read a grid's runs back from disk (metrics.jsonl, summary.json, failed.json) and write the compact raw numbers.

Nothing here trains or plots: :func:`load_grid` gives one :class:`RunResult` per run, curves are aligned over
seeds by step, and :func:`write_raw` leaves ``results.csv`` (final numbers, one row per run) and ``results.json``
(the same plus downsampled curves and the last diagnostics) next to the report. A run's final validation loss
comes in three flavours: over the whole scored split (``val``), its *select* half (where learning rates are
chosen) and its *test* half (where results are reported); runs logged before the halves existed have only the
first, and stand in for both with the report saying so.
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

from ..config import ModelConfig, read_json_file
from ..errors import DataError
from ..eval.registry import Score
from ..model import Transformer
from .curves import grad_growth, spikes_after_warmup
from .evaluation import NO_EVAL, EvalSpec
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
    steps: int = 0  # the run's length (its horizon)
    warmup: int = 0  # warmup steps, left out of the stability measures
    summary: dict[str, Any] = field(default_factory=dict)
    train: dict[str, list[float]] = field(default_factory=dict)  # step, loss, grad_norm, loss_spike, grad_spike
    evals: dict[str, list] = field(default_factory=dict)  # step, val_loss, val_loss_select, val_loss_test
    last_eval: dict[str, Any] = field(default_factory=dict)  # the last "eval" record (val_by_group per source)
    tokens_per_s: list[float] = field(default_factory=list)
    diag: dict[str, Any] | None = None  # the last "diag" record
    first_diag: dict[str, Any] | None = None  # the first one (step 1: the model almost at init)
    environment: dict[str, Any] = field(default_factory=dict)  # environment.json: versions, device, sharing
    error: str = ""
    scores: dict[str, Score] = field(default_factory=dict)  # the evaluation tasks' headline numbers (eval/eval.json)
    eval_problem: str = ""  # why an eval.json could not be read

    @property
    def final_val_loss(self) -> float | None:
        return self.summary.get("val_loss") if self.status == "finished" else None

    def final_loss(self, half: str = "test") -> float | None:
        """The final loss on the ``half`` ("select" / "test") of the validation split; the whole scored split for
        runs logged before the halves existed (see :attr:`has_halves`)."""
        if self.status != "finished":
            return None
        # a half without documents has no loss (None): it never falls back to the other half's tokens
        return self.summary.get(f"val_loss_{half}") if self.has_halves else self.summary.get("val_loss")

    @property
    def has_halves(self) -> bool:
        return "val_loss_test" in self.summary

    def count(self, flag: str) -> int:
        """Loss or grad spikes (``flag`` = "loss_spike" / "grad_spike") or skipped steps seen so far."""
        return int(sum(self.train.get(flag, [])))

    def spikes_after_warmup(self, flag: str) -> int | None:
        """Loss or grad spikes (``flag``) after the warmup; None for a run that logged no step."""
        if not self.train.get("step"):
            return None
        return spikes_after_warmup(self.train["step"], self.train.get(flag, []), self.warmup)

    def grad_growth(self):
        """:class:`~.curves.Growth` of the gradient norm after the warmup (None if unfinished or too short)."""
        if self.status != "finished":
            return None
        return grad_growth(self.train.get("step", []), self.train.get("grad_norm", []), self.warmup)

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
    horizons: list[int] = field(default_factory=list)  # run lengths in steps, shortest first
    rules: dict[str, Any] = field(default_factory=dict)  # the [compare.rules] table as written
    rules_history: list[dict[str, Any]] = field(default_factory=list)  # when the rules were written (runner)
    val_split: dict[str, Any] | None = None  # how the validation split is halved (data.documents)

    def select(self, variant: str, lr: float, steps: int | None = None) -> list[RunResult]:
        return [r for r in self.runs if r.variant == variant and r.lr == lr and steps in (None, r.steps)]

    def tokens(self, steps: int) -> int:
        return steps * self.tokens_per_step

    @property
    def shared_devices(self) -> int:
        """The most runs that trained on one device at a time (> 1: their tokens/s are no speed comparison)."""
        return max((int(r.environment.get("runs_per_device", 1)) for r in self.runs), default=1)


def load_run(
    run_dir: Path,
    variant: str,
    lr: float,
    seed: int,
    key: str,
    steps: int = 0,
    warmup: int = 0,
    evals: EvalSpec = NO_EVAL,
) -> RunResult:
    result = RunResult(key, variant, lr, seed, run_dir, "missing", steps, warmup)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        result.status = "incomplete"
        train_cols: dict[str, list[float]] = {
            k: [] for k in ("step", "loss", "grad_norm", "loss_spike", "grad_spike", "skipped")
        }
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
                for k in ("step", "val_loss", "val_loss_select", "val_loss_test"):
                    result.evals.setdefault(k, []).append(rec.get(k))
                result.last_eval = rec
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
    if result.status == "finished":
        result.scores, result.eval_problem = evals.scores(run_dir)
    return result


def load_grid(out_dir: str | Path) -> Grid:
    """The runs of a grid, as listed in ``<out>/grid.json`` (written by ``diffv2 compare``)."""
    out = Path(out_dir)
    path = out / GRID_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found; run `diffv2 compare CONFIG` (it writes grid.json) first")
    try:
        return _grid(out, read_json_file(path, DataError))
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a field missing or of the wrong type
        raise DataError(
            f"{path}: not a grid file of `diffv2 compare` ({type(e).__name__}: {str(e)[:100]}); "
            "`diffv2 compare CONFIG --report-only` writes it again"
        ) from None


def _grid(out: Path, grid: dict[str, Any]) -> Grid:
    cmp = grid["compare"]
    base_steps, warmup = int(cmp["base"]["steps"]), int(cmp["base"]["warmup_steps"])
    evals = EvalSpec.of(cmp)
    runs = [
        load_run(
            out / r["key"], r["variant"], r["lr"], r["seed"], r["key"], int(r.get("steps", base_steps)), warmup, evals
        )
        for r in grid["runs"]
    ]
    horizons = sorted(cmp.get("horizons") or [base_steps])
    return Grid(
        out,
        cmp["variants"],
        cmp["lrs"],
        cmp["seeds"],
        cmp["baseline"],
        runs,
        grid["models"],
        cmp["base"],
        grid["tokens_per_step"],
        grid.get("data_dir", ""),
        cmp.get("skipped", {}),
        horizons,
        cmp.get("rules", {}),
        grid.get("rules_history", []),
        grid.get("val_split"),
    )


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


def seed_band(
    runs: list[RunResult], source: str, name: str, max_points: int = MAX_POINTS, log: bool = False
) -> dict[str, list]:
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


def paired_band(
    runs: list[RunResult], reference: list[RunResult], source: str, name: str, max_points: int = MAX_POINTS
) -> dict[str, list]:
    """Mean over seeds of (run − reference run of the same seed) at each step, with its standard error
    (sd of the per-seed differences / √n): the two share their batch order, so the difference is paired."""
    ref = {r.seed: r for r in reference}
    by_step: dict[float, list[float]] = {}
    for run in runs:
        other = ref.get(run.seed)
        if other is None:
            continue
        mine = dict(
            zip(
                *downsample(getattr(run, source).get("step", []), getattr(run, source).get(name, []), max_points),
                strict=True,
            )
        )
        theirs = dict(
            zip(
                *downsample(getattr(other, source).get("step", []), getattr(other, source).get(name, []), max_points),
                strict=True,
            )
        )
        for step in mine.keys() & theirs.keys():
            by_step.setdefault(step, []).append(mine[step] - theirs[step])
    steps = sorted(by_step)
    means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    ses = [statistics.stdev(by_step[s]) / math.sqrt(len(by_step[s])) if len(by_step[s]) > 1 else 0.0 for s in steps]
    return {"step": steps, "mean": means, "std": ses, "n": [len(by_step[s]) for s in steps]}


# ---------------------------------------------------------------------- raw output
_DIAG_KEYS = (
    "hidden_max",
    "max_logit",
    "context_rms",
    "context_rms_per_head",
    "sink_mass",
    "lambda_mean",
    "lambda_std",
    "key0_a1",
    "key0_a2",
    "key0_effective",
    "sink_share",
    "key0_uniform",
    "logit_top1",
    "logit_median",
    "hidden_outlier_ratio",
    "hidden_kurtosis",
)


def final_row(run: RunResult) -> dict[str, Any]:
    growth = run.grad_growth()
    return {
        "variant": run.variant,
        "steps": run.steps,
        "lr": run.lr,
        "seed": run.seed,
        "status": run.status,
        "steps_done": int(run.train["step"][-1]) if run.train.get("step") else 0,
        "final_val_loss": run.final_val_loss,
        "final_val_loss_select": run.summary.get("val_loss_select"),
        "final_val_loss_test": run.summary.get("val_loss_test"),
        "final_train_loss": run.summary.get("train_loss"),
        "loss_spikes_after_warmup": run.spikes_after_warmup("loss_spike"),
        "grad_spikes_after_warmup": run.spikes_after_warmup("grad_spike"),
        "grad_norm_late_over_early": growth.ratio if growth else None,
        "grad_norm_log10_slope_per_1k_steps": growth.slope if growth else None,
        "nonfinite_steps": run.count("skipped"),
        "tokens_per_s": run.median_tokens_per_s,
        "runs_per_device": int(run.environment.get("runs_per_device", 1)) if run.environment else None,
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
        steps = run.evals.get("step", [])
        curves = {
            "train_loss": downsample(run.train.get("step", []), run.train.get("loss", [])),
            "grad_norm": downsample(run.train.get("step", []), run.train.get("grad_norm", [])),
            **{k: (steps, run.evals.get(k, [])) for k in ("val_loss", "val_loss_select", "val_loss_test")},
        }
        diag = {k: run.diag[k] for k in _DIAG_KEYS if run.diag and k in run.diag}
        points = {k: {"step": s, "value": v} for k, (s, v) in curves.items()}
        diag_step = run.diag["step"] if run.diag else None
        runs_json.append(
            {
                **row,
                "key": run.key,
                "error": run.error,
                "diag_step": diag_step,
                "diag": diag,
                "val_by_group": run.last_eval.get("val_by_group"),
                "curves": points,
            }
        )
    payload = {
        "variants": {v: VARIANTS[v][0] for v in grid.variants},
        "baseline": grid.baseline,
        "lrs": grid.lrs,
        "seeds": grid.seeds,
        "horizons": grid.horizons,
        "tokens_per_step": grid.tokens_per_step,
        "params": params,
        "rules": grid.rules,
        "val_split": grid.val_split,
        "runs": runs_json,
    }
    json_path = report_dir / "results.json"
    json_path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return csv_path, json_path


__all__ = ["Grid", "RunResult", "accounting", "downsample", "load_grid", "paired_band", "seed_band", "write_raw"]
