"""Decision rules, written into a grid's config before its runs: what result gives which verdict.

A ``[compare.rules]`` table holds settings (``min_tokens``, ``min_seeds``, ``alpha``) and one sub-table per rule.
Two kinds of rule exist, evaluated by :mod:`.verdicts` on each variant at its best learning rate (chosen on the
validation *select* half, scored on the *test* half), paired by seed:

``gap_ratio``
    ``pair = [a, b]`` and ``reference = [a0, b0]``; a gap is ``loss(b) − loss(a)`` (mean over seeds of the paired
    differences), so it is positive when the first variant is better. The rule holds when
    gap(pair) / gap(reference) is ``at_most`` (or ``at_least``) the given fraction, at ``horizon`` ("each": at
    every horizon of the grid; "shortest"; "longest"). ``reference_horizon`` measures the reference elsewhere
    (e.g. the shortest horizon against the longest), and ``relative = true`` divides each gap by loss(b) first.
    It needs gap(reference) > 0: with no gap there is nothing to explain.
``beats``
    ``variant`` beats each of ``against`` at ``horizon`` when its paired difference is below 0 in every seed and
    the Holm-adjusted paired p-value (over the report's whole family of tests) is below ``alpha``.

A rule's ``min_tokens`` is the token budget its horizon needs for the question to be askable at all ("not
testable at this scale" below it); the settings' ``min_tokens`` is the budget under which no verdict of the grid
means anything ("not meaningful at this budget"). Any other outcome is the rule's ``otherwise`` (default
"not shown").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

KINDS = ("gap_ratio", "beats")
HORIZONS = ("each", "shortest", "longest")
NOT_SHOWN = "not shown"
NOT_MEANINGFUL = "not meaningful at this budget"
NOT_TESTABLE = "not testable at this scale"


@dataclass
class Rule:
    name: str
    kind: str
    verdict: str
    otherwise: str = NOT_SHOWN
    horizon: str = "each"
    min_tokens: int = 0
    # gap_ratio
    pair: tuple[str, str] | None = None
    reference: tuple[str, str] | None = None
    reference_horizon: str | None = None  # None: the same horizon as the pair
    relative: bool = False
    at_most: float | None = None
    at_least: float | None = None
    # beats
    variant: str | None = None
    against: tuple[str, ...] = ()

    def variants(self) -> list[str]:
        names = [*(self.pair or ()), *(self.reference or ()), *([self.variant] if self.variant else []), *self.against]
        return list(dict.fromkeys(names))

    def describe(self) -> str:
        """The rule in words, as the report prints it (before any result)."""
        where = {"each": "at every horizon", "shortest": "at the shortest horizon", "longest": "at the longest horizon"}
        budget = f" (needs a horizon of >= {self.min_tokens:,} tokens)" if self.min_tokens else ""
        if self.kind == "beats":
            return (
                f"**{self.verdict}** if `{self.variant}` has a lower test loss than each of "
                f"{', '.join(f'`{a}`' for a in self.against)} {where[self.horizon]}{budget}, in every seed, "
                f"with a Holm-adjusted paired p below alpha; otherwise **{self.otherwise}**."
            )
        a, b = self.pair
        a0, b0 = self.reference
        gap = "relative gap" if self.relative else "gap"
        bound = f"<= {self.at_most:.4g}" if self.at_most is not None else f">= {self.at_least:.4g}"
        ref_where = where[self.reference_horizon] if self.reference_horizon else "at the same horizon"
        norm = f" (a relative gap is the gap divided by `{b}`'s loss)" if self.relative else ""
        return (
            f"**{self.verdict}** if {gap}(`{b}` − `{a}`) {where[self.horizon]}{budget} is {bound} × "
            f"{gap}(`{b0}` − `{a0}`) {ref_where}{norm}; needs {gap}(`{b0}` − `{a0}`) > 0; otherwise "
            f"**{self.otherwise}**."
        )


@dataclass
class RuleSet:
    min_tokens: int = 0
    min_seeds: int = 2
    alpha: float = 0.05
    rules: list[Rule] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def sha256(self) -> str:
        """A fingerprint of the rules as written, to tell whether they changed after runs had finished."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode("utf-8")).hexdigest()


_SETTINGS = ("min_tokens", "min_seeds", "alpha")
_FIELDS = {
    "gap_ratio": {
        "kind",
        "verdict",
        "otherwise",
        "horizon",
        "min_tokens",
        "pair",
        "reference",
        "reference_horizon",
        "relative",
        "at_most",
        "at_least",
    },
    "beats": {"kind", "verdict", "otherwise", "horizon", "min_tokens", "variant", "against"},
}


def parse_rules(table: dict[str, Any], variants: list[str]) -> RuleSet:
    """A :class:`RuleSet` from a ``[compare.rules]`` table; every rule must name variants of the grid."""
    rule_set = RuleSet(raw=dict(table))
    for key in _SETTINGS:
        if key in table:
            setattr(rule_set, key, _number(f"compare.rules.{key}", table[key], integer=key != "alpha"))
    if not 0 < rule_set.alpha < 1 or rule_set.min_seeds < 1 or rule_set.min_tokens < 0:
        raise ConfigError(
            f"compare.rules: need 0 < alpha < 1, min_seeds >= 1, min_tokens >= 0 (got alpha="
            f"{rule_set.alpha}, min_seeds={rule_set.min_seeds}, min_tokens={rule_set.min_tokens})"
        )
    for name, spec in table.items():
        if name in _SETTINGS:
            continue
        if not isinstance(spec, dict):
            raise ConfigError(f"compare.rules.{name}={spec!r}: a rule is a table; settings are {list(_SETTINGS)}")
        rule_set.rules.append(_parse_rule(name, spec, variants))
    return rule_set


def _parse_rule(name: str, spec: dict[str, Any], variants: list[str]) -> Rule:
    where = f"compare.rules.{name}"
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind={kind!r}: must be one of {list(KINDS)}")
    if unknown := sorted(set(spec) - _FIELDS[kind]):
        raise ConfigError(f"{where}: unknown field(s) {unknown} for kind {kind!r}; valid: {sorted(_FIELDS[kind])}")
    if not isinstance(spec.get("verdict"), str) or not spec["verdict"]:
        raise ConfigError(f"{where}.verdict: required, the verdict's text when the rule holds")
    rule = Rule(name, kind, spec["verdict"], str(spec.get("otherwise", NOT_SHOWN)))
    rule.horizon = _horizon(f"{where}.horizon", spec.get("horizon", "each"))
    rule.min_tokens = _number(f"{where}.min_tokens", spec.get("min_tokens", 0), integer=True)
    if kind == "gap_ratio":
        rule.pair = _pair(f"{where}.pair", spec.get("pair"))
        rule.reference = _pair(f"{where}.reference", spec.get("reference", spec.get("pair")))
        if "reference_horizon" in spec:
            rule.reference_horizon = _horizon(f"{where}.reference_horizon", spec["reference_horizon"])
        rule.relative = bool(spec.get("relative", False))
        bounds = [k for k in ("at_most", "at_least") if k in spec]
        if len(bounds) != 1:
            raise ConfigError(f"{where}: give exactly one of at_most / at_least (the fraction of the reference gap)")
        setattr(rule, bounds[0], _number(f"{where}.{bounds[0]}", spec[bounds[0]]))
        if rule.pair == rule.reference and rule.reference_horizon in (None, rule.horizon):
            raise ConfigError(
                f"{where}: the pair is its own reference at the same horizon; set reference or reference_horizon"
            )
    else:
        rule.variant = spec.get("variant")
        against = spec.get("against")
        if not isinstance(rule.variant, str) or not isinstance(against, list) or not against:
            raise ConfigError(f'{where}: needs variant = "..." and against = ["...", ...]')
        rule.against = tuple(against)
    if missing := [v for v in rule.variants() if v not in variants]:
        raise ConfigError(f"{where}: names variant(s) {missing} that are not in compare.variants {variants}")
    return rule


def _pair(where: str, value: Any) -> tuple[str, str]:
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}={value!r}: must be two variant names [a, b] (gap = loss(b) − loss(a))")
    return value[0], value[1]


def _horizon(where: str, value: Any) -> str:
    if value not in HORIZONS:
        raise ConfigError(f"{where}={value!r}: must be one of {list(HORIZONS)}")
    return value


def _number(where: str, value: Any, integer: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or value < 0:
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise ConfigError(f"{where}={value!r}: must be {kind}")
    return value
