"""Side-by-side comparison of DIFF V2, its ablations and controls, DIFF V1 and parameter-matched baselines.

``expand_grid`` lays out the runs, ``run_grid`` trains them (resumably), ``write_report`` turns what they logged
into ``report.md`` + figures, with verdicts from decision rules fixed in the grid's config before the runs
(:mod:`.rules`), and ``capture_maps`` reads per-head attention maps out of a trained model. Plotting needs
matplotlib (``pip install 'diffv2[plots]'``); everything else does not.

Names are imported on first use, so reading a grid's results does not pull in the runner and, through it, the
trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OPT_IN": "grid",
    "VARIANTS": "grid",
    "CompareConfig": "grid",
    "RunSpec": "grid",
    "expand_grid": "grid",
    "load_compare_config": "grid",
    "variant_model": "grid",
    "LayerMaps": "maps",
    "capture_maps": "maps",
    "write_report": "report",
    "Grid": "results",
    "RunResult": "results",
    "load_grid": "results",
    "RunOutcome": "runner",
    "run_grid": "runner",
    "run_state": "runner",
    "holm": "stats",
    "paired": "stats",
    "summarize": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffv2.compare' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
