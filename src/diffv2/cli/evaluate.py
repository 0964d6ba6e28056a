"""``diffv2 evaluate``: lm-evaluation-harness on a checkpoint, offline.

    diffv2 evaluate runs/default                                 # perplexity on the run's own val split
    diffv2 evaluate hf/default --data data/kjv --max-docs 50     # an HF folder on a prepared dataset's val split
    diffv2 evaluate runs/default --tasks mytask --include-path my_tasks/

The built-in task ``diffv2_val_ppl`` (word/byte perplexity, bits per byte) is written at run time from the val
split of ``--data`` (default: the dataset recorded in the run dir's config.json). Needs the ``eval`` extra.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ..errors import ConfigError, DiffV2Error


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint with lm-evaluation-harness (offline, local tasks)")
    p.add_argument("src", help="a native run/checkpoint dir or an HF diffv2 folder")
    p.add_argument("--tasks", default="diffv2_val_ppl", help="comma-separated lm-eval task names")
    p.add_argument("--data", help="prepared dataset whose val split makes diffv2_val_ppl (default: the run's)")
    p.add_argument("--max-docs", type=int, default=200, help="val documents in diffv2_val_ppl")
    p.add_argument("--include-path", action="append", default=[], help="folder of extra task yamls (repeatable)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction)")
    p.add_argument("--output", help="write the results table here as JSON")
    p.set_defaults(func=run)


def _run_data_dir(src: str) -> str | None:
    """The dataset a run dir trained on (its config.json written by the trainer), if recorded."""
    for folder in (Path(src), *list(Path(src).parents)[:2]):  # run dir, or checkpoints/step_X inside it
        try:
            return json.loads((folder / "config.json").read_text(encoding="utf-8"))["data"]["dir"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def run(args: argparse.Namespace) -> int:
    try:
        from ..hf.lmeval import TASK_NAME, evaluate_lm, val_documents, write_perplexity_task
    except ImportError as e:
        raise DiffV2Error(f"evaluate needs transformers and lm-eval: pip install 'diffv2[eval]' ({e})") from None

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one task name")
    with tempfile.TemporaryDirectory(prefix="diffv2-eval-") as tmp:
        include = list(args.include_path)
        if TASK_NAME in tasks:
            data = args.data or _run_data_dir(args.src)
            if data is None:
                raise ConfigError(f"--data: needed for {TASK_NAME} ({args.src} records no dataset)")
            include.append(str(write_perplexity_task(tmp, val_documents(data, max_docs=args.max_docs))))
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        results = evaluate_lm(args.src, tasks, include_path=include or None, batch_size=args.batch_size, limit=limit)
    for task, metrics in results.items():
        shown = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, float)}
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return 0
