"""``report.md`` for a grid: setup, decision rules and their verdicts, final numbers with paired statistics, the
blog's claims, diagnostics, figures.

Written from what the runs left on disk (see :mod:`.results`), so it can be regenerated at any time, also while
the grid is still running (unfinished runs are counted and left out of the statistics).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from . import claims, report_diagnostics, report_eval, report_tables
from .grid import VARIANTS
from .probe import probe_run
from .results import Grid, accounting, load_grid, write_raw
from .rules import parse_rules
from .seeding import shared_init
from .stats import summarize
from .verdicts import evaluate_rules

REPORT_FILE = "report.md"


def write_report(out_dir: str | Path, *, report_dir: str | Path | None = None, probe: bool = True) -> Path:
    """Write ``report.md``, the PNG figures and ``results.csv``/``results.json``; returns the report's path.

    ``report_dir`` defaults to ``<out_dir>/report``. ``probe`` loads each finished DIFF V2-family checkpoint
    to histogram its per-token σ(λ) (cached per run). Without matplotlib the figures are skipped, with a note.
    """
    grid = load_grid(out_dir)
    dest = Path(report_dir) if report_dir is not None else grid.out_dir / "report"
    dest.mkdir(parents=True, exist_ok=True)
    seq_len = int(grid.base["seq_len"])
    params = {v: accounting(grid.models[v], seq_len) for v in grid.variants}
    rule_set = parse_rules(grid.rules, grid.variants)
    findings = claims.evaluate(grid, rule_set)
    verdicts = evaluate_rules(grid, rule_set, findings)
    probes = _probes(grid) if probe else {}
    write_raw(grid, params, dest)
    try:
        figures = _figures(grid, params, probes, dest)
    except ImportError:
        figures = []
    lines = _header(grid) + report_tables.rules_section(grid, rule_set, verdicts) + _params_table(grid, params)
    lines += report_tables.final_loss_sections(grid, params) + report_tables.lr_section(grid)
    lines += report_tables.source_section(grid) + report_tables.claims_section(findings, grid, rule_set)
    lines += report_eval.eval_section(grid)
    lines += report_diagnostics.diagnostics_sections(grid) + report_diagnostics.stability_section(grid)
    lines += _figure_section(figures) + _runs_section(grid)
    path = dest / REPORT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _probes(grid: Grid) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """σ(λ) probes per horizon (steps), then per "variant@lr"."""
    out: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for run in grid.runs:
        model = grid.models[run.variant]
        if (
            run.status == "finished"
            and model["attention"] == "diff_v2"
            and model["lambda_mode"] in ("sigmoid", "linear")
        ):
            result = probe_run(run.run_dir)
            if result is not None:
                out.setdefault(run.steps, {}).setdefault(f"{run.variant}@{run.lr!r}", []).append(result)
    return out


def _figures(grid: Grid, params: dict, probes: dict, dest: Path) -> list[tuple[str, Path]]:
    from . import plots  # matplotlib only when drawing

    figures = []
    for steps in grid.horizons:
        # one set of curves per horizon: runs of different lengths have different schedules
        view = dataclasses.replace(grid, runs=[r for r in grid.runs if r.steps == steps], horizons=[steps])
        suffix = f"_{steps}steps" if len(grid.horizons) > 1 else ""
        where = f" ({report_tables.short_tokens(grid.tokens(steps))} tokens)" if suffix else ""
        figures += _horizon_figures(plots, view, probes.get(steps, {}), dest, suffix, where)
    if len(grid.lrs) > 1:
        figures.append(("Loss against learning rate", plots.lr_figure(grid, dest / "loss_vs_lr.png")))
    figures.append(("Parameters and throughput", plots.params_speed_figure(grid, params, dest / "params_speed.png")))
    return figures


def _horizon_figures(plots, grid: Grid, probes: dict, dest: Path, suffix: str, where: str) -> list[tuple[str, Path]]:
    def per_variant_spikes(variant: str, runs: list) -> str:
        counts = summarize([r.spikes_after_warmup("grad_spike") for r in runs])
        return f"{variant}, grad spikes {counts.mean:.1f}/run after warmup" if counts.mean is not None else variant

    has = {k for r in grid.runs if r.diag for k in r.diag}
    outliers = (
        [
            ("hidden_outlier_ratio", "max|h| / RMS(h) (residual stream)", False),
            ("logit_top1", "largest attention logit", False),
        ]
        if "hidden_outlier_ratio" in has
        else [
            ("hidden_max", "max |hidden state| (residual stream)", True),
            ("max_logit", "max |attention logit| (q·k/√d)", True),
        ]
    )
    sinks = (
        [
            ("key0_a1", "key-0 mass, softmax map a¹ (mean over heads)", False),
            ("key0_effective", "key-0 mass, effective / (1 − σ)", False),
        ]
        if "key0_a1" in has
        else [("sink_mass", "weight on token 0 (effective map, mean)", False)]
    )
    return [
        (
            f"Validation loss{where}",
            plots.curve_figure(
                grid,
                dest / f"val_loss{suffix}.png",
                source="evals",
                name="val_loss",
                ylabel="validation loss (nats/token)",
                title="Validation loss",
                delta=True,
            ),
        ),
        (
            f"Training loss{where}",
            plots.curve_figure(
                grid,
                dest / f"train_loss{suffix}.png",
                source="train",
                name="loss",
                ylabel="training loss (nats/token)",
                title="Training loss",
                delta=True,
            ),
        ),
        (
            f"Gradient norm{where}",
            plots.curve_figure(
                grid,
                dest / f"grad_norm{suffix}.png",
                source="train",
                name="grad_norm",
                ylabel="gradient norm before clipping",
                title="Gradient norm",
                log_y=True,
                label=per_variant_spikes,
            ),
        ),
        (f"Loss and gradient spikes{where}", plots.spike_figure(grid, dest / f"spikes{suffix}.png")),
        (
            f"Outliers{where}",
            plots.layer_figure(
                grid, dest / f"outliers{suffix}.png", outliers, "Activation and attention-logit outliers"
            ),
        ),
        (f"Context RMS{where}", plots.context_rms_figure(grid, dest / f"context_rms{suffix}.png")),
        (
            f"Attention sinks{where}",
            plots.layer_figure(grid, dest / f"sink_mass{suffix}.png", sinks, "Attention-sink mass per layer"),
        ),
        (f"Subtraction weight σ(λ){where}", plots.lambda_figure(grid, dest / f"lambda{suffix}.png", probes)),
    ]


# ---------------------------------------------------------------------- sections
def _header(grid: Grid) -> list[str]:
    b, m = grid.base, grid.models["diff_v2" if "diff_v2" in grid.models else grid.variants[0]]
    done = sum(r.status == "finished" for r in grid.runs)
    diverged = sum(r.status == "diverged" for r in grid.runs)
    budgets = ", ".join(f"{s:,} steps × {grid.tokens_per_step:,} = {grid.tokens(s):,} tokens" for s in grid.horizons)
    horizons = f" × {len(grid.horizons)} horizons" if len(grid.horizons) > 1 else ""
    lines = [
        "# DIFF V2 comparison",
        "",
        f"Grid `{grid.out_dir}`: {len(grid.variants)} variants × {len(grid.lrs)} learning rates × {len(grid.seeds)} "
        f"seeds{horizons} = {len(grid.runs)} runs; {done} finished, {diverged} diverged, "
        f"{len(grid.runs) - done - diverged} unfinished.",
        "",
        f"- **Model** (DIFF V2 form): d_model {m['d_model']}, {m['n_layers']} layers, h = {m['n_heads']} output "
        f"heads, h_kv = {m['n_kv_heads']}, head_dim {m['head_dim']}, SwiGLU {m['ffn_hidden']}, "
        f"vocab {m['vocab_size']}.",
        f"- **Budget** per run: {budgets} (batch {b['batch_size']} × grad_accum {b['grad_accum']} × seq_len "
        f"{b['seq_len']}); schedule {b['schedule']}, warmup {b['warmup_steps']}, min lr ratio {b['min_lr_ratio']}, "
        f"weight decay {b['weight_decay']}, grad clip {b['grad_clip']}.",
        f"- **Learning rates** {', '.join(f'{lr:g}' for lr in grid.lrs)}; **seeds** {', '.join(map(str, grid.seeds))}.",
        f"- **What a seed fixes**: {_seed_line(grid)}",
        f"- **Data**: {_data_line(grid)}",
        f"- **Validation halves**: {_halves_line(grid)}",
        f"- **Diagnostics**: {_diag_line(grid)}",
        f"- **Environment**: {_environment_line(grid)}",
    ]
    for variant, why in grid.skipped.items():
        lines.append(f"- **Not run**: `{variant}`, which this model shape does not allow ({why}).")
    last = {r.diag["step"] for r in grid.runs if r.diag and r.status == "finished"}
    final = {r.steps for r in grid.runs if r.status == "finished"}
    if last and not last & final:
        lines.append(
            f"- Per-layer diagnostics come from step(s) {sorted(last)} (the last multiples of diag_every), "
            f"not from the final step(s) {sorted(final)}."
        )
    return [*lines, ""]


def _seed_line(grid: Grid) -> str:
    """The batch order, always; the initial weights shared with the baseline, measured by building both models."""
    text = (
        "the batch order, identical for every variant (runs at one seed see the same batches in the same "
        "order, so variants are compared per seed)"
    )
    base = grid.baseline
    parts = []
    for v in grid.variants:
        if v == base:
            continue
        same = shared_init(grid.models[v], grid.models[base], seed=grid.seeds[0])
        listed = [f"{comp} {state}" for comp, state in same.items() if state != "absent"]
        parts.append(f"`{v}`: {', '.join(listed)}")
    if parts:
        text += (
            f". Initial weights against `{base}` at the same seed (same-named weights; measured by building "
            f"both models): {'; '.join(parts)}"
        )
    return text + "."


def _diag_line(grid: Grid) -> str:
    b = grid.base
    dense = f", after every step up to step {b['diag_dense_until']}" if b.get("diag_dense_until") else ""
    return (
        f"per-layer statistics on {b['diag_batch']} validation windows of {b['seq_len']} tokens spread over the "
        f"split, every {b['diag_every']} steps{dense}; the tables read each run's last ones."
    )


def _halves_line(grid: Grid) -> str:
    split = grid.val_split
    if not split:
        return "not recorded (a bare folder of shards, or a grid written before the halves existed)."
    sel, test = split["select"], split["test"]
    text = (
        f"{split['rule']}; select {sel['documents']} documents / {sel['tokens']:,} tokens, test "
        f"{test['documents']} / {test['tokens']:,} (assignment sha256 {split['assignment_sha256'][:12]}). "
        "Each variant's lr is chosen on the select half and reported on the test half."
    )
    scored = {r.last_eval.get("val_tokens") for r in grid.runs if r.last_eval.get("val_tokens")}
    total = sel["tokens"] + test["tokens"]
    if scored:
        text += f" Each evaluation scored {', '.join(f'{n:,}' for n in sorted(scored))} of the {total:,} tokens."
    if not split.get("labeled_sources"):
        text += " Sources were not recorded when the data was prepared, so there is no per-source table."
    return text


def _data_line(grid: Grid) -> str:
    manifest_path = Path(grid.data_dir) / "manifest.json"
    if not manifest_path.is_file():
        return f"`{grid.data_dir}`"
    man = json.loads(manifest_path.read_text(encoding="utf-8"))
    split = man["splits"]
    return (
        f"{man['source'].get('resolved', man['source'].get('given'))}; {man['tokenizer_kind']} tokenizer, "
        f"{split['train']['n_tokens']:,} train / {split['val']['n_tokens']:,} val tokens "
        f"({split['train']['n_documents']} / {split['val']['n_documents']} documents); each run reads "
        f"{_epochs(grid, split['train']['n_tokens'])} of the train split.{_near_dup_line(man)}"
    )


def _epochs(grid: Grid, train_tokens: int) -> str:
    return " / ".join(f"{grid.tokens(s) / max(1, train_tokens):.2f}" for s in grid.horizons) + " epochs"


def _near_dup_line(manifest: dict[str, Any]) -> str:
    near = manifest.get("val_near_duplicates")
    if near is None:
        return (
            " Validation was not checked against train for near-duplicates at prepare time "
            "(`diffv2 data dedup-check` measures it)."
        )
    return (
        f" {near['dropped_documents']} validation documents ({near['dropped_tokens']:,} tokens) with >= "
        f"{near['threshold']:g} of their word {near['ngram']}-grams in train were dropped at prepare time."
    )


def _environment_line(grid: Grid) -> str:
    for run in grid.runs:
        if env := run.environment:
            dirty = " (uncommitted changes)" if env.get("git_dirty") else ""
            return (
                f"torch {env.get('torch')}, {env.get('cuda') or 'CPU'} ({env.get('cpu_count')} CPU cores), "
                f"git {str(env.get('git_commit'))[:10]}{dirty}"
            )
    return "unknown (no run has started)"


def _params_table(grid: Grid, params: dict[str, dict[str, float]]) -> list[str]:
    ref = params.get("diff_v2", {}).get("total")
    base_flops = params[grid.baseline]["flops_per_token"]
    lines = [
        "## Variants and parameter matching",
        "",
        "Baselines, the gated baseline and DIFF V1 get DIFF V2's total parameters by resizing their SwiGLU (3·D "
        "weights per hidden unit, so they match to within 1.5·D per layer); the 1.5h-head baseline equals DIFF V2 "
        "minus `lambda_proj`. Equal parameters are not equal compute: the FLOPs column (training, per token, "
        "from `Transformer.flops_per_token`) is why the final-loss tables also read the losses at equal FLOPs.",
        "",
        f"| variant | what | attention | heads | SwiGLU | total params | vs diff_v2 | attention | MLP | GFLOP/token "
        f"| FLOPs vs {grid.baseline} |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in grid.variants:
        m, p = grid.models[v], params[v]
        delta = f"{p['total'] - ref:+,}" if ref is not None else "–"
        cells = [
            v,
            VARIANTS[v][0],
            m["attention"],
            m["n_heads"],
            m["ffn_hidden"],
            f"{p['total']:,}",
            delta,
            f"{p['attention']:,}",
            f"{p['mlp']:,}",
            f"{p['flops_per_token'] / 1e9:.4g}",
            f"{p['flops_per_token'] / base_flops:.3f}",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return [*lines, ""]


def _figure_section(figures: list[tuple[str, Path]]) -> list[str]:
    if not figures:
        return ["## Figures", "", "Not drawn: matplotlib is not installed (`pip install 'diffv2[plots]'`).", ""]
    lines = ["## Figures", ""]
    for title, path in figures:
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    return lines


def _runs_section(grid: Grid) -> list[str]:
    lines = [
        "## Runs",
        "",
        "Raw numbers: `results.csv` (one row per run) and `results.json` (with downsampled "
        "curves and the last per-layer diagnostics).",
        "",
    ]
    odd = [r for r in grid.runs if r.status != "finished"]
    for r in odd:
        why = f": {r.error}" if r.error else ""
        lines.append(f"- `{r.key}`: {r.status}{why}")
    return [*lines, ""] if odd else lines
