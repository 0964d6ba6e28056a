"""``diffv2 compare CONFIG``: train the variant × lr × seed grid of a config file, then write the report.
``diffv2 report OUT_DIR``: (re)write the report of a grid from what its runs logged."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import check_positive_int
from ..errors import DataError
from .fields import path_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train DIFF V2, its ablations, DIFF V1 and matched baselines side by side",
        description="Runs every (variant, lr, seed) of CONFIG's [compare] table with identical data, "
        "budget and schedule under <out_dir>/<variant>/lr<lr>/seed<seed>, then writes "
        "<out_dir>/report/report.md. Finished runs are skipped, interrupted ones resumed.",
    )
    p.add_argument("config", type=path_arg, help="a diffv2 train config (.toml/.yaml/.json) with a [compare] table")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, as subprocesses (default: 1, in-process)")
    p.add_argument("--out-dir", type=path_arg, default=None, help="override [compare] out_dir")
    p.add_argument(
        "--data", type=path_arg, default=None, help="override the config's data (a text source or a prepared data dir)"
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEP",
        help="stop every run after this step (with a checkpoint); a later call resumes them",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the grid, parameter and FLOP counts and the decision rules; train nothing",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only (re)write the report of CONFIG's runs already made (grids may share an out_dir)",
    )
    p.add_argument(
        "--report-dir", type=path_arg, default=None, help="where to write the report (default: <out_dir>/report)"
    )
    p.add_argument("--no-report", action="store_true", help="train only")
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="only score finished runs that lack the [compare] eval_tasks results; train nothing",
    )
    p.add_argument("--no-probe", action="store_true", help="report without the per-token σ(λ) pass over checkpoints")
    p.add_argument("--progress", action="store_true", help="progress bars for in-process runs")
    p.set_defaults(func=run_compare)

    r = sub.add_parser("report", help="write report.md + figures for a grid made by `diffv2 compare`")
    r.add_argument("out_dir", type=path_arg, help="the grid's out_dir (holds grid.json)")
    r.add_argument("--report-dir", type=path_arg, default=None, help="where to write (default: OUT_DIR/report)")
    r.add_argument("--no-probe", action="store_true", help="skip the per-token σ(λ) pass over checkpoints")
    r.set_defaults(func=run_report)


def run_compare(args: argparse.Namespace) -> int:
    from ..compare import expand_grid, load_compare_config, run_grid, write_report

    check_positive_int("--jobs", args.jobs, maximum=1024)
    cfg = load_compare_config(args.config)
    if args.out_dir:
        cfg.out_dir = str(args.out_dir)
    if args.data:
        cfg.base = cfg.base.replace(data=str(args.data))
    if args.dry_run:
        _print_grid(cfg, expand_grid(cfg))
        return 0
    if args.report_only:
        # several configs may share an out_dir (e.g. an lr sweep and an ablation grid reusing its runs):
        # grid.json is rewritten so the report covers exactly this config's runs
        from ..compare.runner import write_grid_file

        if not Path(cfg.out_dir).is_dir():
            raise DataError(f"--report-only: {cfg.out_dir} does not exist; the grid's runs are made without the flag")
        write_grid_file(cfg, expand_grid(cfg, cfg.data_dir), cfg.data_dir)
    else:
        outcomes = run_grid(
            cfg, jobs=args.jobs, stop_after=args.stop_after, progress=args.progress, train=not args.eval_only
        )
        errors = [o for o in outcomes if o.after == "error"]
        for o in errors:
            print(f"run {o.key} crashed {o.message}")
        if errors:
            return 1
    if not args.no_report:
        report = write_report(cfg.out_dir, report_dir=args.report_dir, probe=not args.no_probe)
        print(f"report: {report}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from ..compare import write_report

    print(f"report: {write_report(Path(args.out_dir), report_dir=args.report_dir, probe=not args.no_probe)}")
    return 0


def _print_grid(cfg, specs) -> None:
    from ..compare.grid import variant_model
    from ..compare.results import accounting

    vocab = {"byte": 257}.get(cfg.base.tokenizer, cfg.base.tokenizer_vocab)  # the real value comes from the data
    horizons = ", ".join(f"{s:,} steps" for s in cfg.steps)
    print(f"{len(specs)} runs into {cfg.out_dir} ({horizons}); parameters at vocab ≈ {vocab}:")
    print(
        f"{'variant':<22}{'attention':>10}{'heads':>7}{'ffn':>7}{'total params':>15}{'vs diff_v2':>12}{'FLOPs/v2':>9}"
    )
    ref = accounting(variant_model(cfg.base, "diff_v2", vocab).to_dict(), cfg.base.seq_len)
    for variant in cfg.variants:
        m = variant_model(cfg.base, variant, vocab)
        acc = accounting(m.to_dict(), cfg.base.seq_len)
        flops = acc["flops_per_token"] / ref["flops_per_token"]
        print(
            f"{variant:<22}{m.attention:>10}{m.n_heads:>7}{m.ffn_hidden:>7}{acc['total']:>15,}"
            f"{acc['total'] - ref['total']:>+12,}{flops:>9.3f}"
        )
    rules = cfg.rule_set
    if rules.rules:
        print(f"decision rules (min_tokens {rules.min_tokens:,}, min_seeds {rules.min_seeds}, alpha {rules.alpha:g}):")
        for rule in rules.rules:
            print(f"  {rule.name}: {rule.describe().replace('**', '').replace('`', '')}")
    if cfg.eval_tasks:
        options = ", ".join(f"{k} {v}" for k, v in cfg.eval_options.items())
        print(
            f"evaluation of every finished run: {', '.join(cfg.eval_tasks)}"
            + (" (quick)" if cfg.eval_quick else "")
            + (f"; {options}" if options else "")
        )
    for spec in specs:
        print(f"  {spec.key}")
