"""``diffv2 evaluate``: an alias of ``diffv2 eval --tasks lm_eval:TASK`` kept for existing scripts.

diffv2 evaluate runs/default          # = diffv2 eval --checkpoint runs/default --tasks lm_eval:diffv2_val_ppl
diffv2 evaluate hf/default --data data/kjv --max-docs 50
"""

from __future__ import annotations

import argparse
import json

from ..data.shards import atomic_write_bytes
from ..errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="alias of `diffv2 eval --tasks lm_eval:TASK` (lm-evaluation-harness)")
    p.add_argument("src", help="a native run/checkpoint dir or an HF diffv2 folder")
    p.add_argument("--tasks", default="diffv2_val_ppl", help="comma-separated lm-eval task names")
    p.add_argument("--data", help="prepared dataset whose val split makes diffv2_val_ppl (default: the run's)")
    p.add_argument("--max-docs", type=int, default=200, help="val documents in diffv2_val_ppl")
    p.add_argument("--include-path", action="append", default=[], help="folder of extra task yamls (repeatable)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction)")
    p.add_argument("--output", help="write the results table here as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.lm_eval import lm_eval_results, metric_line
    from ..eval.runner import run_data_dir

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one task name")
    print(
        f"diffv2 evaluate is an alias of: diffv2 eval --checkpoint {args.src} --tasks "
        + ",".join(f"lm_eval:{t}" for t in tasks)
    )  # on stdout: a notice, and stderr keeps to the one error line when the run fails
    results = lm_eval_results(
        args.src,
        tasks,
        data_dir=args.data or run_data_dir(args.src),
        max_docs=args.max_docs,
        include_path=args.include_path,
        batch_size=args.batch_size,
        limit=args.limit,
    )
    for task, metrics in results.items():
        print(metric_line(task, metrics))
    if args.output:
        atomic_write_bytes(args.output, (json.dumps(results, indent=2, default=str) + "\n").encode("utf-8"))
    return 0
