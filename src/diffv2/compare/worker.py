"""One run of a comparison grid in its own process: ``python -m diffv2.compare.worker CONFIG_JSON``.

Used by ``diffv2 compare --jobs N``; it runs exactly what the in-process path runs (:func:`runner.execute`) and
prints the outcome as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..train import TrainConfig, load_config_file
from .evaluation import EvalSpec
from .runner import execute


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffv2.compare.worker")
    parser.add_argument("config", help="the run's full training config (JSON)")
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--eval-tasks", default="", help="comma-separated evaluation tasks for the finished run")
    parser.add_argument("--eval-quick", action="store_true")
    parser.add_argument("--eval-options", default="{}", help="sample counts, as JSON")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_dict(load_config_file(args.config))
    tasks = tuple(t for t in args.eval_tasks.split(",") if t)
    evals = EvalSpec(tasks, args.eval_quick, tuple(sorted(json.loads(args.eval_options).items())))
    before, after, message = execute(cfg, stop_after=args.stop_after, progress=False, evals=evals)
    print(json.dumps({"before": before, "after": after, "message": message}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
