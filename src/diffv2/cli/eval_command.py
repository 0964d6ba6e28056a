"""``diffv2 eval``: the evaluation tasks on a checkpoint (see ``diffv2.eval`` and docs/eval.md).

diffv2 eval --checkpoint runs/v2 --quick                         # every attention-noise task, few samples
diffv2 eval --checkpoint hf/v2 --tasks needle,passkey --out eval/v2
diffv2 eval --checkpoint runs/v2 --tasks lm_eval:diffv2_val_ppl  # lm-evaluation-harness (diffv2[eval])
diffv2 eval --tasks mqar --variants baseline,diff_v2             # trains its own small models
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError, DataError
from .fields import path_arg


def default_tasks() -> str:
    """Every registered task that reads a checkpoint (mqar trains its own models; lm_eval tasks are named)."""
    from ..eval import TASKS, available

    return ",".join(n for n in available() if n in TASKS and TASKS[n].needs_model)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..eval import available

    p = sub.add_parser("eval", help="attention-noise tasks (needle, passkey, ...), MQAR and lm-eval on a checkpoint")
    p.add_argument(
        "--checkpoint",
        metavar="RUN|HF_DIR",
        help="a run folder (its latest checkpoint), a checkpoint "
        "folder or a Hugging Face diffv2 folder; not needed for mqar alone",
    )
    p.add_argument(
        "--tasks", default=None, help=f"comma-separated, from {', '.join(available())} (default: {default_tasks()})"
    )
    p.add_argument("--quick", action="store_true", help="a few samples per cell: minutes on a CPU, for a first look")
    p.add_argument("--out", type=path_arg, help="output folder (default: RUN/eval/STEP, HF_DIR/eval, or runs/eval)")
    p.add_argument("--seed", type=int, default=0, help="seed of every generated sample (default: 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto (cuda if present)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="model dtype (default: auto = bfloat16 on CUDA, float32 on the CPU)",
    )
    p.add_argument(
        "--data",
        type=path_arg,
        help="a prepared dataset whose val split gives the text (default: the run's own, if on "
        "disk; else the embedded corpus)",
    )
    p.add_argument(
        "--variants",
        default="baseline,diff_v1,diff_v2",
        help="mqar: the attention variants to train (default: baseline,diff_v1,diff_v2)",
    )
    p.add_argument("--include-path", action="append", default=[], help="lm_eval: folder of extra task yamls")
    p.add_argument("--limit", type=float, default=None, help="lm_eval: documents per task (or a fraction)")
    p.add_argument("--max-docs", type=int, default=200, help="lm_eval:diffv2_val_ppl: val documents (default: 200)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval import evaluate_checkpoint

    if args.checkpoint is None and args.tasks is None:
        raise ConfigError("--checkpoint: give a run or HF folder (only --tasks mqar runs without one)")
    variants = [v.strip() for v in args.variants.split(",")]
    if not all(variants):
        raise ConfigError(f"--variants={args.variants!r}: an empty variant name; e.g. baseline,diff_v1,diff_v2")
    if args.data is not None and not (args.data / "manifest.json").is_file():
        raise DataError(f"--data {args.data}: not a prepared dataset (no manifest.json); see diffv2 data prepare")
    options = {
        "variants": variants,
        "include_path": args.include_path,
        "limit": args.limit,
        "max_docs": args.max_docs,
    }
    out = args.out if args.out is not None or args.checkpoint is not None else Path("runs/eval")
    summary = evaluate_checkpoint(
        args.checkpoint,
        args.tasks if args.tasks is not None else default_tasks(),
        out=out,
        device=args.device,
        dtype=args.dtype,
        quick=args.quick,
        seed=args.seed,
        data_dir=args.data,
        options=options,
        progress=not args.no_progress,
    )
    files = [Path(f) for f in summary.get("files", [])]
    report = next((f for f in files if f.name == "eval.md"), None)
    if report is not None:
        text = report.read_text(encoding="utf-8")
        sys.stdout.write("\n".join(line for line in text.splitlines() if not line.startswith("![")) + "\n")
    for f in files:
        print(f)
    return 0
