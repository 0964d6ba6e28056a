"""The evaluation tasks by name. A task is a generator of samples, a scorer and a JSON-able result; the registry
also knows how to present a result (a markdown section, optional figures) and families of tasks named at run
time (``lm_eval:hellaswag``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from .context import EvalContext

Result = dict[str, Any]
# per-task sample counts a caller may set in ``options`` (each task's default is in its module); the rest of
# ``options`` is internal (device, text source, mqar's settings)
SAMPLE_OPTIONS = (
    "needle_samples",
    "passkey_samples",
    "attention_split_samples",
    "ar_hit_windows",
    "distractor_samples",
    "icl_seeds",
    "icl_queries",
    "lowbit_windows",
    "lowbit_needle_samples",
    "kv_int8_windows",
    "kv_int8_needle_samples",
)


@dataclass(frozen=True)
class Score:
    """One number a task's result is summarised by, which ``diffv2 compare`` compares across variants."""

    name: str
    value: float | None
    higher_is_better: bool
    what: str  # what it measures, for the report


@dataclass(frozen=True)
class Task:
    name: str
    summary: str  # one line: what it measures
    run: Callable[[EvalContext], Result]  # generate the samples, score them, return the result
    markdown: Callable[[Result], str]  # the result as a markdown section (no heading)
    plot: Callable[[Result, Path], list[Path]] | None = None  # figures into a folder (needs matplotlib)
    needs_model: bool = True  # False: the task trains its own models (mqar)
    reads_text: bool = False  # builds on the run's val split / the corpus (loaded and verified before any task)
    headline: Callable[[Result], list[Score]] | None = None  # the result's summary numbers (see Score)


TASKS: dict[str, Task] = {}
# the order of listings and of the default run
ORDER = ("needle", "passkey", "attention_split", "ar_hit", "distractor", "icl", "lowbit", "kv_int8", "mqar")
# family name -> builder of the task named after the colon ("lm_eval:hellaswag" -> FAMILIES["lm_eval"]("hellaswag"))
FAMILIES: dict[str, Callable[[str], Task]] = {}


def register(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    TASKS[task.name] = task
    return task


def register_family(name: str, build: Callable[[str], Task]) -> None:
    FAMILIES[name] = build


def resolve_tasks(names: str | Iterable[str]) -> list[Task]:
    """Tasks from a comma-separated list (or a list) of names; ``family:member`` builds a family's task."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
    if not all(items):  # "needle,,passkey" or "": a name was left out, not meant to be skipped
        raise ConfigError(f"--tasks={names!r}: an empty task name; choose from {', '.join(available())}")
    tasks = []
    for item in dict.fromkeys(items):
        family, _, member = item.partition(":")
        if member and family in FAMILIES:
            tasks.append(FAMILIES[family](member))
        elif item in TASKS:
            tasks.append(TASKS[item])
        else:
            raise ConfigError(f"--tasks: unknown task {item!r}; choose from {', '.join(available())}")
    return tasks


def available() -> list[str]:
    named = sorted(TASKS, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return [*named, *(f"{family}:TASK" for family in FAMILIES)]


def headline_scores(results: dict[str, Result]) -> dict[str, Score]:
    """Every registered task's summary numbers from ``{task name: result}`` (an eval.json's ``tasks``), by score
    name; tasks without a headline (lm-eval families, mqar) and skipped results give none."""
    out: dict[str, Score] = {}
    for name, result in results.items():
        task = TASKS.get(name)
        if task is None or task.headline is None or not isinstance(result, dict) or "skipped" in result:
            continue
        out.update((s.name, s) for s in task.headline(result))
    return out
