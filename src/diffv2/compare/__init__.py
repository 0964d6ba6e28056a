"""Side-by-side comparison of DIFF V2, its ablations, DIFF V1 and parameter-matched baselines.

``expand_grid`` lays out the runs, ``run_grid`` trains them (resumably), ``write_report`` turns what they logged
into ``report.md`` + figures, and ``capture_maps`` reads per-head attention maps out of a trained model.
Plotting needs matplotlib (``pip install 'diffv2[plots]'``); everything else does not.
"""

from .grid import OPT_IN, VARIANTS, CompareConfig, RunSpec, expand_grid, load_compare_config, variant_model
from .maps import LayerMaps, capture_maps
from .report import write_report
from .results import Grid, RunResult, load_grid
from .runner import RunOutcome, run_grid, run_state
from .stats import summarize, welch

__all__ = [
    "OPT_IN",
    "VARIANTS",
    "CompareConfig",
    "Grid",
    "LayerMaps",
    "RunOutcome",
    "RunResult",
    "RunSpec",
    "capture_maps",
    "expand_grid",
    "load_compare_config",
    "load_grid",
    "run_grid",
    "run_state",
    "summarize",
    "variant_model",
    "welch",
    "write_report",
]
