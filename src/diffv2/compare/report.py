"""``report.md`` for a grid: setup, parameter matching, final numbers with significance, the blog's claims, figures.

Written from what the runs left on disk (see :mod:`.results`), so it can be regenerated at any time, also while
the grid is still running (unfinished runs are counted and left out of the statistics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import claims
from .grid import VARIANTS
from .probe import probe_run
from .results import Grid, accounting, load_grid, write_raw
from .stats import summarize, welch

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
    probes = _probes(grid) if probe else {}
    write_raw(grid, params, dest)
    try:
        figures = _figures(grid, params, probes, dest)
    except ImportError:
        figures = []
    lines = _header(grid) + _params_table(grid, params) + _final_tables(grid) + _best_lr_table(grid) + _claims(grid)
    lines += _figure_section(figures) + _runs_section(grid)
    path = dest / REPORT_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _probes(grid: Grid) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for run in grid.runs:
        model = grid.models[run.variant]
        if run.status == "finished" and model["attention"] == "diff_v2" and model["lambda_mode"] != "none":
            result = probe_run(run.run_dir)
            if result is not None:
                out.setdefault(f"{run.variant}@{run.lr!r}", []).append(result)
    return out


def _figures(grid: Grid, params: dict, probes: dict, dest: Path) -> list[tuple[str, Path]]:
    from . import plots  # matplotlib only when drawing

    def per_variant_spikes(variant: str, runs: list) -> str:
        counts = summarize([r.count("grad_spike") for r in runs])
        return f"{variant}, grad spikes {counts.mean:.1f}/run" if counts.mean is not None else variant

    return [
        ("Validation loss", plots.curve_figure(grid, dest / "val_loss.png", source="evals", name="val_loss",
                                               ylabel="validation loss (nats/token)", title="Validation loss",
                                               delta=True)),
        ("Training loss", plots.curve_figure(grid, dest / "train_loss.png", source="train", name="loss",
                                             ylabel="training loss (nats/token)", title="Training loss")),
        ("Gradient norm", plots.curve_figure(grid, dest / "grad_norm.png", source="train", name="grad_norm",
                                             ylabel="gradient norm before clipping", title="Gradient norm",
                                             log_y=True, label=per_variant_spikes)),
        ("Loss and gradient spikes", plots.spike_figure(grid, dest / "spikes.png")),
        ("Outliers", plots.layer_figure(grid, dest / "outliers.png", [
            ("hidden_max", "max |hidden state| (residual stream)", True),
            ("max_logit", "max |attention logit| (q·k/√d)", True)], "Activation and attention-logit outliers")),
        ("Context RMS", plots.context_rms_figure(grid, dest / "context_rms.png")),
        ("Attention sinks", plots.layer_figure(grid, dest / "sink_mass.png", [
            ("sink_mass", "weight on token 0 (effective map, mean)", False)], "Attention-sink mass per layer")),
        ("Subtraction weight σ(λ)", plots.lambda_figure(grid, dest / "lambda.png", probes)),
        ("Parameters and throughput", plots.params_speed_figure(grid, params, dest / "params_speed.png")),
    ]  # fmt: skip


# ---------------------------------------------------------------------- sections
def _header(grid: Grid) -> list[str]:
    b, m = grid.base, grid.models["diff_v2" if "diff_v2" in grid.models else grid.variants[0]]
    done = sum(r.status == "finished" for r in grid.runs)
    diverged = sum(r.status == "diverged" for r in grid.runs)
    budget = int(b["steps"]) * grid.tokens_per_step
    lines = [
        "# DIFF V2 comparison",
        "",
        f"Grid `{grid.out_dir}`: {len(grid.variants)} variants × {len(grid.lrs)} learning rates × {len(grid.seeds)} "
        f"seeds = {len(grid.runs)} runs; {done} finished, {diverged} diverged, "
        f"{len(grid.runs) - done - diverged} unfinished.",
        "",
        f"- **Model** (DIFF V2 form): d_model {m['d_model']}, {m['n_layers']} layers, h = {m['n_heads']} output "
        f"heads, h_kv = {m['n_kv_heads']}, head_dim {m['head_dim']}, SwiGLU {m['ffn_hidden']}, "
        f"vocab {m['vocab_size']}.",
        f"- **Budget**: {b['steps']} steps × {grid.tokens_per_step:,} tokens = {budget:,} tokens per run "
        f"(batch {b['batch_size']} × grad_accum {b['grad_accum']} × seq_len {b['seq_len']}); schedule {b['schedule']}, "
        f"warmup {b['warmup_steps']}, min lr ratio {b['min_lr_ratio']}, weight decay {b['weight_decay']}, "
        f"grad clip {b['grad_clip']}.",
        f"- **Learning rates** {', '.join(f'{lr:g}' for lr in grid.lrs)}; **seeds** "
        f"{', '.join(map(str, grid.seeds))} (a seed fixes the init and the batch order, the same for every variant).",
        f"- **Data**: {_data_line(grid)}",
        f"- **Spikes**: a step counts as a spike when its loss (grad norm) exceeds {b['spike_k']} × the median of "
        f"the previous {b['spike_window']} steps.",
        f"- **Environment**: {_environment_line(grid)}",
    ]
    for variant, why in grid.skipped.items():
        lines.append(f"- **Not run**: `{variant}`, which this model shape does not allow ({why}).")
    last = {r.diag["step"] for r in grid.runs if r.diag}
    if last and max(last) < int(b["steps"]):
        lines.append(f"- Per-layer diagnostics come from step {max(last)} (the last multiple of diag_every), not "
                     f"from the final step {b['steps']}.")  # fmt: skip
    return [*lines, ""]


def _data_line(grid: Grid) -> str:
    manifest_path = Path(grid.data_dir) / "manifest.json"
    if not manifest_path.is_file():
        return f"`{grid.data_dir}`"
    man = json.loads(manifest_path.read_text(encoding="utf-8"))
    split = man["splits"]
    return (f"{man['source'].get('resolved', man['source'].get('given'))}; {man['tokenizer_kind']} tokenizer, "
            f"{split['train']['n_tokens']:,} train / {split['val']['n_tokens']:,} val tokens "
            f"({split['train']['n_documents']} / {split['val']['n_documents']} documents); each run reads "
            f"{_epochs(grid, split['train']['n_tokens']):.2f} epochs of the train split.")  # fmt: skip


def _epochs(grid: Grid, train_tokens: int) -> float:
    return grid.tokens_per_step * int(grid.base["steps"]) / max(1, train_tokens)


def _environment_line(grid: Grid) -> str:
    for run in grid.runs:
        if env := run.environment:
            dirty = " (uncommitted changes)" if env.get("git_dirty") else ""
            return (f"torch {env.get('torch')}, {env.get('cuda') or 'CPU'} ({env.get('cpu_count')} CPU cores), "
                    f"git {str(env.get('git_commit'))[:10]}{dirty}")  # fmt: skip
    return "unknown (no run has started)"


def _params_table(grid: Grid, params: dict[str, dict[str, float]]) -> list[str]:
    ref = params.get("diff_v2", {}).get("total")
    lines = [
        "## Variants and parameter matching",
        "",
        "Baselines and DIFF V1 get DIFF V2's total parameters by widening their SwiGLU (3·D weights per hidden "
        "unit, so they match to within 1.5·D per layer); the 1.5h-head baseline equals DIFF V2 minus `lambda_proj`.",
        "",
        "| variant | what | attention | heads | SwiGLU | total params | vs diff_v2 | attention | MLP | GFLOP/token |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in grid.variants:
        m, p = grid.models[v], params[v]
        delta = f"{p['total'] - ref:+,}" if ref is not None else "–"
        cells = [v, VARIANTS[v][0], m["attention"], m["n_heads"], m["ffn_hidden"], f"{p['total']:,}", delta,
                 f"{p['attention']:,}", f"{p['mlp']:,}", f"{p['flops_per_token'] / 1e9:.4g}"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return [*lines, ""]


def _final_tables(grid: Grid) -> list[str]:
    refs = [grid.baseline] + (["diff_v2"] if "diff_v2" in grid.variants and grid.baseline != "diff_v2" else [])
    lines = [
        "## Final validation loss",
        "",
        "Mean ± sample std over seeds of the finished runs (diverged runs are counted, not averaged). Δ is the "
        "difference of means, its 95% confidence interval and p-value come from Welch's t-test over seeds "
        "(two-sided, unadjusted for the number of comparisons); with fewer than 2 finished seeds on either side "
        'there is no test ("n too small"). Lower loss is better.',
        "",
    ]
    shared = max((int(r.environment.get("runs_per_device", 1)) for r in grid.runs), default=1)
    if shared > 1:
        lines += [f"**tokens/s is not a speed comparison here**: up to {shared} runs trained on one device at "
                  "a time (`diffv2 compare --jobs`), so their speeds depend on what shared the device with them.",
                  ""]  # fmt: skip
    for lr in grid.lrs:
        head = "| variant | finished / diverged / total | val loss |"
        rule = "|---|---:|---:|"
        for ref in refs:
            head += f" Δ vs {ref} | 95% CI | p |"
            rule += "---:|---:|---:|"
        head += " loss spikes | grad spikes | non-finite steps | tokens/s |"
        rule += "---:|---:|---:|---:|"
        lines += [f"### lr = {lr:g}", "", head, rule]
        for v in grid.variants:
            runs = grid.select(v, lr)
            losses = _final_losses(grid, v, lr)
            finished, diverged = len(losses), sum(r.status == "diverged" for r in runs)
            row = f"| {v} | {finished} / {diverged} / {len(runs)} | {summarize(losses).fmt(4)} |"
            for ref in refs:
                if ref == v:
                    row += " (reference) | | |"
                    continue
                cmp = welch(losses, _final_losses(grid, ref, lr))
                row += f" {'–' if cmp.diff is None else f'{cmp.diff:+.4f}'} | {cmp.fmt_ci(4)} | {cmp.fmt_p()} |"
            started = [r for r in runs if r.train.get("step")]
            for flag in ("loss_spike", "grad_spike", "skipped"):
                row += f" {summarize([r.count(flag) for r in started]).fmt(1)} |"
            speed = summarize([r.median_tokens_per_s for r in started if r.median_tokens_per_s])
            row += f" {'–' if speed.mean is None else f'{speed.mean:,.0f}'} |"
            lines.append(row)
        lines.append("")
    return lines


def _final_losses(grid: Grid, variant: str, lr: float) -> list[float]:
    return [r.final_val_loss for r in grid.select(variant, lr) if r.final_val_loss is not None]


def _best_lr_table(grid: Grid) -> list[str]:
    """Each variant at its own best learning rate: one shared lr can favour whichever variant it happens to
    suit, so with several lrs the comparison is also made at each variant's best (lowest mean final loss)."""
    if len(grid.lrs) < 2:
        return []
    best: dict[str, tuple[float, list[float]]] = {}
    for v in grid.variants:
        tried = [(lr, _final_losses(grid, v, lr)) for lr in grid.lrs]
        tried = [(lr, losses) for lr, losses in tried if losses]
        if tried:
            best[v] = min(tried, key=lambda t: sum(t[1]) / len(t[1]))
    ref = best.get(grid.baseline)
    lines = [
        "## Each variant at its best learning rate",
        "",
        f"The lr (of {', '.join(f'{lr:g}' for lr in grid.lrs)}) with the lowest mean final validation loss, per "
        "variant. The same validation loss picks the lr and scores it, so these numbers are optimistic; Δ and p "
        f"are against {grid.baseline} at its own best lr.",
        "",
        f"| variant | best lr | val loss | Δ vs {grid.baseline} | 95% CI | p |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in grid.variants:
        if v not in best:
            lines.append(f"| {v} | – | no finished run | | | |")
            continue
        lr, losses = best[v]
        row = f"| {v} | {lr:g} | {summarize(losses).fmt(4)} |"
        if v == grid.baseline or ref is None:
            row += " (reference) | | |" if v == grid.baseline else " – | | |"
        else:
            cmp = welch(losses, ref[1])
            row += f" {'–' if cmp.diff is None else f'{cmp.diff:+.4f}'} | {cmp.fmt_ci(4)} | {cmp.fmt_p()} |"
        lines.append(row)
    return [*lines, ""]


def _claims(grid: Grid) -> list[str]:
    findings = claims.evaluate(grid)
    if not findings:
        return []
    lines = [
        "## The blog's claims, measured",
        "",
        "Each row is a claim of the DIFF V2 blog (our wording; the number is the claim's row in the spec's §3) turned "
        "into a contrast between two variants of this grid. A verdict holds for this model size, data and token "
        "budget only; the blog's own runs are production-scale and trained on trillions of tokens.",
        "",
        "| # | claim | lr | measured | verdict |",
        "|---|---|---:|---|---|",
    ]
    for f in findings:
        lines.append(f"| {f.check.ref} | {f.check.claim} | {f.lr:g} | {f.measured} | {f.verdict} |")
    return [*lines, ""]


def _figure_section(figures: list[tuple[str, Path]]) -> list[str]:
    if not figures:
        return ["## Figures", "", "Not drawn: matplotlib is not installed (`pip install 'diffv2[plots]'`).", ""]
    lines = ["## Figures", ""]
    for title, path in figures:
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    return lines


def _runs_section(grid: Grid) -> list[str]:
    lines = ["## Runs", "", "Raw numbers: `results.csv` (one row per run) and `results.json` (with downsampled "
             "curves and the last per-layer diagnostics).", ""]  # fmt: skip
    odd = [r for r in grid.runs if r.status != "finished"]
    for r in odd:
        why = f": {r.error}" if r.error else ""
        lines.append(f"- `{r.key}`: {r.status}{why}")
    return [*lines, ""] if odd else lines
