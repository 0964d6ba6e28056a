"""The ``lm_eval:TASK`` family: EleutherAI's lm-evaluation-harness run in-process, offline (``diffv2[eval]``).

``lm_eval:diffv2_val_ppl`` is written at run time from the val split of the run's dataset (word/byte perplexity,
bits per byte); any other name is an lm-eval task, found among lm-eval's own or in ``--include-path`` folders.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ..errors import ConfigError, DiffV2Error
from .context import EvalContext
from .registry import Result, Task, register_family


def lm_eval_results(
    model: Any,
    tasks: list[str],
    *,
    tokenizer: Any = None,
    data_dir: str | os.PathLike[str] | None = None,
    max_docs: int = 200,
    include_path: list[str] | None = None,
    batch_size: int = 1,
    limit: float | None = None,
) -> dict[str, Any]:
    """lm-eval's results table ({task: {metric: value}}) for a model object or a checkpoint / HF folder path."""
    try:
        from ..hf.lmeval import TASK_NAME, evaluate_lm, val_documents, write_perplexity_task
    except ImportError as e:
        raise DiffV2Error(f"lm-eval tasks need transformers and lm-eval: pip install 'diffv2[eval]' ({e})") from None
    with tempfile.TemporaryDirectory(prefix="diffv2-eval-") as tmp:
        include = list(include_path or [])
        if TASK_NAME in tasks:
            if data_dir is None:
                raise ConfigError(f"--data: needed for {TASK_NAME} (the checkpoint records no dataset)")
            include.append(str(write_perplexity_task(tmp, val_documents(data_dir, max_docs=max_docs))))
        limit = int(limit) if limit is not None and limit >= 1 else limit
        return evaluate_lm(
            model, tasks, tokenizer=tokenizer, include_path=include or None, batch_size=batch_size, limit=limit
        )


def metric_line(task: str, metrics: dict[str, Any]) -> str:
    shown = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, float)}
    return f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())


def build(name: str) -> Task:
    def run(ctx: EvalContext) -> Result:
        o = ctx.options
        results = lm_eval_results(
            ctx.model,
            [name],
            tokenizer=ctx.tokenizer,
            data_dir=o.get("data") or ctx.data_dir,
            max_docs=o.get("max_docs", 200),
            include_path=o.get("include_path"),
            batch_size=o.get("lm_eval_batch_size", 1),
            limit=o.get("limit"),
        )
        return {"task": f"lm_eval:{name}", "results": results}

    def markdown(result: Result) -> str:
        lines = ["| lm-eval task | metric | value |", "|---|---|---|"]
        for task, metrics in result["results"].items():
            for key, value in metrics.items():
                if isinstance(value, float):
                    lines.append(f"| {task} | {key.split(',')[0]} | {value:.4f} |")
        return "\n".join(lines)

    return Task(f"lm_eval:{name}", f"lm-evaluation-harness task {name}", run, markdown)


register_family("lm_eval", build)
