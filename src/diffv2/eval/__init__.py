"""Evaluation tasks on a trained model: how much attention noise there is, and what it costs (``diffv2 eval``).

Each task generates its samples from a seed, scores them and returns a JSON-able result: ``needle``, ``passkey``,
``attention_split``, ``ar_hit``, ``distractor``, ``icl``, ``lowbit``, ``kv_int8``, ``mqar`` (trains its own small
models) and the ``lm_eval:TASK`` family. Importing the package registers them.
``run_tasks(model, tokenizer, tasks, quick=..., seed=..., out=...)`` runs them on a model in memory;
``evaluate_checkpoint(path, tasks, ...)`` on a run, checkpoint or Hugging Face folder.
"""

from . import ar_hit, attention_split, distractor, icl, kv_int8, lm_eval, lowbit, mqar, needle, passkey  # noqa: F401
from .context import EvalContext
from .registry import FAMILIES, TASKS, Task, available, resolve_tasks
from .runner import evaluate_checkpoint, load_for_eval, run_data_dir, run_tasks

__all__ = [
    "FAMILIES",
    "TASKS",
    "EvalContext",
    "Task",
    "available",
    "evaluate_checkpoint",
    "load_for_eval",
    "resolve_tasks",
    "run_data_dir",
    "run_tasks",
]
