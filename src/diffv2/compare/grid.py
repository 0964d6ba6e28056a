"""The comparison grid: which variants, learning rates and seeds, and where each run lives.

Everything here is pure (no training, no files written): a :class:`CompareConfig` comes from a config file, and
:func:`expand_grid` turns it into one :class:`RunSpec` per run. Every run of a grid shares the base training
config (data, schedule, evaluation) and differs only in the model variant, ``lr``, ``seed`` and, when the grid
has several ``horizons``, its number of steps. The seed fixes the batch order, identically across variants, and
each variant's initialisation (which weights of two variants start equal is measured, not assumed: see
:func:`.seeding.shared_init`). ``[compare.rules]`` holds the decision rules (:mod:`.rules`), parsed and checked
against the grid's variants here, before any run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig, check_int
from ..errors import ConfigError
from ..sizing import baseline_1p5h, baseline_ffn_matched, ffn_matched
from ..train.config import TrainConfig, load_config_file
from .rules import RuleSet, parse_rules


def _diff_v1_matched(v2: ModelConfig) -> ModelConfig:
    """DIFF V1 at DIFF V2's total size: V1 has a same-h baseline's attention weights, so its SwiGLU is widened
    by the same rule as ``baseline_ffn_matched``."""
    return ffn_matched(v2.replace(attention="diff_v1"), v2)


# name -> (what it is, how to derive it from the DIFF V2 model). Order = the order of tables and legends.
VARIANTS: dict[str, tuple[str, Callable[[ModelConfig], ModelConfig]]] = {
    "baseline_matched": ("same-h baseline, SwiGLU widened to DIFF V2's total parameters", baseline_ffn_matched),
    "baseline_1p5h": ("baseline with 1.5h heads (blog ablation 4): DIFF V2 minus lambda_proj", baseline_1p5h),
    "diff_v1": ("DIFF V1, SwiGLU widened to DIFF V2's total parameters", _diff_v1_matched),
    "diff_v2": ("DIFF V2", lambda v2: v2),
    "v2_split": ("DIFF V2 pairing heads i and i+h (blog ablation 1)", lambda v2: v2.replace(pairing="split")),
    "v2_no_lambda": ("DIFF V2 with weight 1, no σ(λ) (blog ablation 2)", lambda v2: v2.replace(lambda_mode="none")),
    "v2_linear": ("DIFF V2 with λ, no sigmoid (blog ablation 3)", lambda v2: v2.replace(lambda_mode="linear")),
    "baseline_small_out": (
        "baseline_matched with o_proj initialised ×0.5: DIFF V2's smaller attention output at "
        "init (σ(λ) ≈ 0.5), without the subtraction",
        lambda v2: baseline_ffn_matched(v2).replace(o_proj_init_scale=0.5),
    ),
    "baseline_zero_out": (
        "baseline_matched with o_proj initialised at 0: every attention branch starts silent",
        lambda v2: baseline_ffn_matched(v2).replace(o_proj_init_scale=0.0),
    ),
    "diff_v2_zero_out": (
        "DIFF V2 with o_proj initialised at 0: its output scale at init no longer differs from baseline_zero_out's",
        lambda v2: v2.replace(o_proj_init_scale=0.0),
    ),
    "baseline_gated": (
        "baseline with a per-head sigmoid gate σ(x·g_iᵀ)·o_i (Gated Attention), SwiGLU matched to "
        "DIFF V2's total parameters",
        lambda v2: ffn_matched(v2.replace(attention="gated"), v2),
    ),
    "diff_v2_const": ("DIFF V2 with σ fixed at 0.5, no lambda_proj", lambda v2: v2.replace(lambda_mode="const")),
    "baseline_2h_matched": (
        "baseline with 2h heads (DIFF V2's query heads), SwiGLU shrunk to DIFF V2's total "
        "parameters: the blog's same-query-dimension comparison",
        lambda v2: ffn_matched(v2.replace(attention="baseline", n_heads=2 * v2.n_heads), v2),
    ),
}
# listed only when a grid names them: controls for a question, not part of the blog's comparison
OPT_IN = (
    "baseline_small_out",
    "baseline_zero_out",
    "diff_v2_zero_out",
    "baseline_gated",
    "diff_v2_const",
    "baseline_2h_matched",
)
DEFAULT_BASELINE = "baseline_matched"
_COMPARE_KEYS = (
    "variants",
    "seeds",
    "lrs",
    "out_dir",
    "baseline",
    "horizons",
    "rules",
    "eval_tasks",
    "eval_quick",
    "eval_options",
)


@dataclass
class CompareConfig:
    """A base training config plus the grid to run over it (the ``[compare]`` table of a config file)."""

    base: TrainConfig
    variants: list[str] | None = None  # None = every variant the model shape allows (see ``skipped``)
    seeds: list[int] = field(default_factory=list)  # empty = the base config's seed
    lrs: list[float] = field(default_factory=list)  # empty = the base config's lr
    out_dir: str = "runs/compare"
    baseline: str | None = None  # the variant the report compares against (default: the FFN-matched baseline)
    horizons: list[int] = field(default_factory=list)  # run lengths in steps; empty = the base config's steps
    rules: dict[str, Any] = field(default_factory=dict)  # the [compare.rules] table, as written (see .rules)
    # evaluation tasks (``diffv2 eval`` names) scored on every run's final checkpoint, all with seed 0 so every run
    # sees the same samples; ``eval_options`` sets sample counts (eval.registry.SAMPLE_OPTIONS)
    eval_tasks: list[str] = field(default_factory=list)
    eval_quick: bool = False
    eval_options: dict[str, int] = field(default_factory=dict)

    skipped: dict[str, str] = field(default_factory=dict, init=False)  # default variants left out, and why
    rule_set: RuleSet = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.variants is None:
            # e.g. 1.5·12 = 18 heads cannot share 4 KV heads: the default grid leaves such a variant out (and the
            # report says so) instead of refusing the whole grid; a variant listed explicitly must build
            self.variants = []
            for name in (v for v in VARIANTS if v not in OPT_IN):
                try:
                    variant_model(self.base, name, vocab_size=2)
                    self.variants.append(name)
                except ConfigError as err:
                    self.skipped[name] = str(err)
        if self.baseline is None:  # the matched baseline if present, else the first baseline, else the first variant
            fallback = [v for v in self.variants if v.startswith("baseline")] + self.variants
            self.baseline = DEFAULT_BASELINE if DEFAULT_BASELINE in self.variants else fallback[0] if fallback else ""
        self.seeds = [int(s) for s in self.seeds] if self.seeds else [self.base.seed]
        self.lrs = [float(x) for x in self.lrs] if self.lrs else [float(self.base.lr)]
        self.validate()
        self.rule_set = parse_rules(self.rules, self.variants)

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ConfigError(f"compare.variants={self.variants!r}: choose from {list(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"compare.variants={self.variants!r}: a variant is listed twice")
        if self.baseline not in self.variants:
            raise ConfigError(f"compare.baseline={self.baseline!r}: must be one of the variants {self.variants}")
        for name, values in (("seeds", self.seeds), ("lrs", self.lrs), ("horizons", self.horizons)):
            if len(set(values)) != len(values):
                raise ConfigError(f"compare.{name}={values!r}: has duplicates")
        if any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in self.horizons):
            raise ConfigError(f"compare.horizons={self.horizons!r}: run lengths in steps, positive integers")
        if any(s < 0 for s in self.seeds):
            raise ConfigError(f"compare.seeds={self.seeds!r}: seeds must be >= 0")
        if any(not lr > 0 for lr in self.lrs):
            raise ConfigError(f"compare.lrs={self.lrs!r}: learning rates must be positive")
        for name in self.variants:  # fail now, not hours into the grid, on a shape a variant cannot take
            variant_model(self.base, name, vocab_size=2)
        self._validate_eval()

    def _validate_eval(self) -> None:
        from ..eval.registry import SAMPLE_OPTIONS, resolve_tasks

        if not isinstance(self.eval_tasks, list) or not all(isinstance(t, str) for t in self.eval_tasks):
            raise ConfigError(f"compare.eval_tasks={self.eval_tasks!r}: a list of task names, e.g. ['needle']")
        if self.eval_tasks and (trains := [t.name for t in resolve_tasks(self.eval_tasks) if not t.needs_model]):
            raise ConfigError(
                f"compare.eval_tasks: {', '.join(trains)} train(s) their own models and score no run; run them with "
                "`diffv2 eval --tasks` instead"
            )
        if not isinstance(self.eval_quick, bool):
            raise ConfigError(f"compare.eval_quick={self.eval_quick!r}: must be true or false")
        if not isinstance(self.eval_options, dict):
            raise ConfigError(f"compare.eval_options={self.eval_options!r}: must be a table of sample counts")
        for key, value in self.eval_options.items():
            if key not in SAMPLE_OPTIONS:
                raise ConfigError(f"compare.eval_options: unknown {key!r}; choose from {', '.join(SAMPLE_OPTIONS)}")
            check_int(f"compare.eval_options.{key}", value, minimum=1, maximum=100_000)

    @property
    def steps(self) -> list[int]:
        """The run lengths of the grid, shortest first."""
        return sorted(self.horizons) if self.horizons else [self.base.steps]

    @property
    def data_dir(self) -> Path:
        """Where the shared, tokenized data lives: the base ``data`` if already prepared, else ``<out>/data``."""
        given = Path(self.base.data)
        return given if (given / "manifest.json").is_file() else Path(self.out_dir) / "data"

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), **{k: getattr(self, k) for k in _COMPARE_KEYS}, "skipped": self.skipped}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareConfig:
        """Training fields at the top level, ``model`` for the model, ``compare`` for the grid."""
        data = dict(data)
        table = data.pop("compare", None) or {}  # no table: every default variant at the base lr and seed
        if not isinstance(table, dict):
            raise ConfigError(f"compare={table!r}: must be a table ([compare] in TOML)")
        table = dict(table)
        if "out_dir" in data:  # a top-level out_dir (the train config's) holds the grid unless [compare] says
            table.setdefault("out_dir", data["out_dir"])
        if unknown := sorted(set(table) - set(_COMPARE_KEYS)):
            raise ConfigError(f"unknown [compare] field(s) {unknown}; valid fields: {list(_COMPARE_KEYS)}")
        for key in ("variants", "seeds", "lrs", "horizons"):
            if key in table and not isinstance(table[key], list):
                raise ConfigError(f"compare.{key}={table[key]!r}: must be a list")
            if key in table and not table[key]:  # an empty grid would run nothing and report nothing
                raise ConfigError(f"compare.{key}=[]: list at least one, or leave the field out for the default")
        if "rules" in table and not isinstance(table["rules"], dict):
            raise ConfigError(f"compare.rules={table['rules']!r}: must be a table of rule tables")
        return cls(base=TrainConfig.from_dict(data), **table)


def load_compare_config(path: str | Path) -> CompareConfig:
    """Read a TOML/YAML/JSON file in ``diffv2 train --config`` format with an extra ``[compare]`` table."""
    return CompareConfig.from_dict(load_config_file(path))


def variant_model(base: TrainConfig, variant: str, vocab_size: int) -> ModelConfig:
    """The model of ``variant``, derived from the base model turned into DIFF V2 (so the base ``attention``,
    ``pairing`` and ``lambda_mode`` do not matter)."""
    v2 = base.model_config(vocab_size).replace(attention="diff_v2", pairing="interleaved", lambda_mode="sigmoid")
    try:
        return VARIANTS[variant][1](v2)
    except ConfigError as err:
        raise ConfigError(
            f"variant {variant!r} cannot be built from this model: {err}; drop it from "
            "compare.variants or change the model shape"
        ) from None


@dataclass
class RunSpec:
    """One training run of the grid."""

    variant: str
    lr: float
    seed: int
    run_dir: Path
    train: TrainConfig  # the full config handed to ``train()``: base + variant model + lr + seed + steps + out_dir
    key: str  # the run's folder relative to the grid's out_dir (see :func:`run_key`)

    @property
    def steps(self) -> int:
        return self.train.steps


def run_key(variant: str, lr: float, seed: int, steps: int | None = None) -> str:
    """``<variant>/lr<lr>/seed<seed>``, or ``<variant>/steps<steps>/lr<lr>/seed<seed>`` in a grid of horizons."""
    # repr gives the shortest string that round-trips, so two different learning rates never share a folder
    horizon = f"steps{int(steps)}/" if steps is not None else ""
    return f"{variant}/{horizon}lr{float(lr)!r}/seed{int(seed)}"


def expand_grid(cfg: CompareConfig, data_dir: str | Path | None = None) -> list[RunSpec]:
    """Every (horizon, variant, lr, seed) of the grid, with identical data and schedule at each horizon.

    Horizon-major (shortest first), then seed, lr and variant: a grid cut short holds every variant at the same
    seeds and lrs, which is what a fair comparison needs. ``data_dir`` (default :attr:`CompareConfig.data_dir`)
    is the data every run reads.
    """
    data = str(data_dir if data_dir is not None else cfg.data_dir)
    out = Path(cfg.out_dir)
    # vocab_size is set by the tokenizer at train time; every other field is pinned here
    models = {
        v: {k: x for k, x in variant_model(cfg.base, v, 2).to_dict().items() if k != "vocab_size"} for v in cfg.variants
    }
    specs = []
    for steps in cfg.steps:
        for seed in cfg.seeds:
            for lr in cfg.lrs:
                for variant in cfg.variants:
                    key = run_key(variant, lr, seed, steps if cfg.horizons else None)
                    train = dataclasses.replace(
                        cfg.base,
                        data=data,
                        out_dir=str(out / key),
                        lr=lr,
                        seed=seed,
                        steps=steps,
                        model=models[variant],
                    )
                    specs.append(RunSpec(variant, lr, seed, out / key, train, key))
    return specs
