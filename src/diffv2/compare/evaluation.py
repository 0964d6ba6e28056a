"""The evaluation tasks a grid scores its finished runs on (``[compare] eval_tasks``): which results a run folder
already holds, scoring the missing ones into ``RUN/eval/``, and reading their headline scores back."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EVAL_DIR = "eval"  # <run>/eval: eval.json, eval.md and figures of the evaluation tasks on the final checkpoint
SEED = 0  # every run of every grid sees the same samples, so scores pair up by sample as well as by seed


@dataclass(frozen=True)
class EvalSpec:
    tasks: tuple[str, ...] = ()
    quick: bool = False
    options: tuple[tuple[str, int], ...] = ()  # sample counts (eval.registry.SAMPLE_OPTIONS), sorted

    @classmethod
    def of(cls, table: dict[str, Any]) -> EvalSpec:
        """From a ``[compare]`` table (a CompareConfig's ``to_dict()`` or grid.json's ``compare``)."""
        options = table.get("eval_options") or {}
        return cls(tuple(table.get("eval_tasks") or ()), bool(table.get("eval_quick")), tuple(sorted(options.items())))

    def to_args(self) -> list[str]:
        """The worker's command-line flags for this spec."""
        if not self.tasks:
            return []
        args = ["--eval-tasks", ",".join(self.tasks), "--eval-options", json.dumps(dict(self.options))]
        return [*args, "--eval-quick"] if self.quick else args

    def saved(self, run_dir: Path) -> dict[str, Any] | None:
        """The run's eval.json if it was written with these settings (quick, sample counts, the seed), else None."""
        try:
            saved = json.loads((run_dir / EVAL_DIR / "eval.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        settings = saved.get("settings") if isinstance(saved, dict) else None
        if not isinstance(settings, dict) or not isinstance(saved.get("tasks"), dict):
            return None
        same = settings.get("quick") == self.quick and settings.get("seed") == SEED
        return saved if same and settings.get("sample_options", {}) == dict(self.options) else None

    def run(self, run_dir: Path) -> None:
        """Score the run's final checkpoint on the missing tasks and merge them into eval.json: results already
        there are kept, and eval.json is replaced only once the new ones exist."""
        from ..eval import evaluate_checkpoint, resolve_tasks
        from ..eval.report import write_outputs

        saved = self.saved(run_dir)
        missing = [t for t in self.tasks if saved is None or t not in saved["tasks"]]
        if not missing:
            return
        partial = run_dir / EVAL_DIR / ".partial"
        new = evaluate_checkpoint(
            run_dir, missing, out=partial, quick=self.quick, seed=SEED, options=dict(self.options), progress=False
        )
        tasks = {**(saved["tasks"] if saved else {}), **new["tasks"]}
        order = [t for t in self.tasks if t in tasks] + [t for t in tasks if t not in self.tasks]
        summary = {"settings": new["settings"], "tasks": {t: tasks[t] for t in order}}
        write_outputs(summary, resolve_tasks(order), run_dir / EVAL_DIR)
        shutil.rmtree(partial, ignore_errors=True)

    def done(self, run_dir: Path) -> bool:
        saved = self.saved(run_dir)
        return all(saved is not None and t in saved["tasks"] for t in self.tasks)

    def scores(self, run_dir: Path) -> tuple[dict[str, Any], str]:
        """The headline scores of this spec's tasks in the run's eval.json, and what kept any from being read."""
        from ..eval.registry import headline_scores

        if not self.tasks or not (run_dir / EVAL_DIR / "eval.json").is_file():
            return {}, ""
        saved = self.saved(run_dir)
        if saved is None:
            return {}, f"{run_dir / EVAL_DIR / 'eval.json'}: unreadable or written with other settings"
        try:
            return headline_scores({t: saved["tasks"][t] for t in self.tasks if t in saved["tasks"]}), ""
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            return {}, f"{run_dir / EVAL_DIR / 'eval.json'}: a result of another layout ({type(err).__name__}: {err})"


NO_EVAL = EvalSpec()  # a grid without eval_tasks
