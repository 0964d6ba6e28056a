"""needle: multi-needle retrieval (DIFF V1 paper §3.4).

N needles "The magic number of {city} is {number}." sit in a haystack of the run's own text; the prompt ends
with "The magic number of {city} is" for the first of R queried cities, and each further one follows the
previous answer. The first queried needle sits at the cell's depth (0 = right after the start, 1 = right before
the query), the others at random depths. Cells: context length × (N, R) × depth.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .context import EvalContext
from .registry import Result, Score, Task, register
from .retrieval import DEPTHS, N_CANDIDATES, Numbers, Sample, fmt, heat_table, run_cells, summarize
from .text import insert_at_depths

CITY_NAMES = (
    "Lisbon Oslo Cairo Lima Dublin Vienna Prague Madrid Berlin Paris Rome Athens Tokyo Seoul Delhi Nairobi Sydney "
    "Toronto Chicago Boston Denver Havana Quito Bogota Santiago Warsaw Budapest Helsinki Stockholm Amsterdam "
    "Brussels Geneva Munich Milan Naples Venice Florence Porto Seville Valencia"
)
CITIES = tuple(CITY_NAMES.split())
NEEDLE_COUNTS = ((1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (6, 1), (6, 2))  # (N needles, R queried)
DIGITS = 5
NEEDLE = " The magic number of {city} is"
QUERY = "\nThe magic number of {city} is"


def make_sample(
    ctx: EvalContext,
    numbers: Numbers,
    length: int,
    n_needles: int,
    n_queried: int,
    depth: float,
    rng: np.random.Generator,
) -> Sample | None:
    """One sample of ``length`` prompt tokens, or None when the needles would fill more than half of it."""
    tok = ctx.tokenizer
    cities = [CITIES[i] for i in rng.choice(len(CITIES), n_needles, replace=False)]
    values = numbers.draw(n_needles)
    dot = tok.encode(".")
    heads = [tok.encode(NEEDLE.format(city=c)) for c in cities]
    needles = [np.array(h + numbers.encode(v) + dot) for h, v in zip(heads, values, strict=True)]
    queries = [tok.encode(QUERY.format(city=c)) for c in cities[:n_queried]]
    hay_len = length - 1 - sum(len(n) for n in needles) - len(queries[0])
    if hay_len < length // 2:
        return None
    depths = [depth, *rng.uniform(0, 1, n_needles - 1).tolist()]
    hay, at, where = insert_at_depths(ctx.text().window(hay_len, rng), needles, depths, tok)
    prompt = [tok.eot_id, *hay.tolist(), *queries[0]]
    afters = [dot + q for q in queries[1:]] + [dot]
    slots = [numbers.slot(values[r], values, afters[r]) for r in range(n_queried)]
    spans = [[1 + a + len(h), 1 + a + len(h) + numbers.n_tokens] for a, h in zip(at, heads, strict=True)]
    meta = {"needle_spans": spans, "actual_depth": where[0] / max(1, hay_len)}
    return Sample(prompt, slots, meta)


def cells(ctx: EvalContext, numbers: Numbers) -> list[dict[str, Any]]:
    """Every (length, N, R, depth); lengths start where one needle and its query fill at most half."""
    longest = max(CITIES, key=lambda c: len(ctx.tokenizer.encode(NEEDLE.format(city=c))))
    one = len(ctx.tokenizer.encode(NEEDLE.format(city=longest) + QUERY.format(city=longest))) + numbers.n_tokens + 1
    n = ctx.count("needle_samples", 50, 3)
    return [
        {"length": length, "n_needles": nn, "n_queried": r, "depth": d, "n": n}
        for length in ctx.context_lengths(2 * one)
        for nn, r in NEEDLE_COUNTS
        for d in DEPTHS
    ]


def run(ctx: EvalContext, cells_override: list[dict[str, Any]] | None = None) -> Result:
    numbers = Numbers(ctx.tokenizer, DIGITS, ctx.rng("needle/numbers"))
    grid = cells_override or cells(ctx, numbers)

    def build(cell: dict[str, Any], rng: np.random.Generator) -> Sample | None:
        return make_sample(ctx, numbers, cell["length"], cell["n_needles"], cell["n_queried"], cell["depth"], rng)

    records, skipped = run_cells(ctx, "needle", grid, build)
    inside = [r for r in records if r["length"] <= ctx.train_len]
    return {
        "task": "needle",
        "train_len": ctx.train_len,
        "haystack": ctx.text().source,
        "numbers": numbers.report,
        "candidates": N_CANDIDATES,
        "samples_per_cell": grid[0]["n"] if grid else 0,
        "skipped_cells": skipped,
        "overall_within_train_len": summarize([{**r, "all": 1} for r in inside], ("all",)),
        "by_needles": summarize(records, ("n_needles", "n_queried", "length")),
        "by_depth_length": summarize(records, ("length", "depth")),
        "cells": summarize(records, ("length", "n_needles", "n_queried", "depth")),
        "records": records,
    }


def markdown(result: Result) -> str:
    num = result["numbers"]
    lines = [
        f"Haystack: {result['haystack']}. Numbers: {num['digits']} digits, {num['tokens_per_number']} "
        f"token(s) each (e.g. {num['example']} → {num['example_pieces']}). {result['candidates']} candidates "
        f"per slot (chance 1/{result['candidates']}); {result['samples_per_cell']} samples per cell.",
        "",
        "| N | R | length | n | exact match | LL top-1 | LL top-1 among needles |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["by_needles"]:
        lines.append(
            f"| {r['n_needles']} | {r['n_queried']} | {r['length']} | {r['n']} | {fmt(r['em'])} | "
            f"{fmt(r['ll'])} | {fmt(r['ll_needles'])} |"
        )
    if result["skipped_cells"]:
        lines += ["", f"{len(result['skipped_cells'])} cells skipped: their needles would fill over half the context."]
    lines += [
        "",
        "Exact match by context length and depth of the queried needle (all N, R):",
        "",
        heat_table(result["by_depth_length"], "em", result["train_len"]),
    ]
    return "\n".join(lines)


def plot(result: Result, out) -> list:
    from .plots import depth_length_heatmaps

    return [depth_length_heatmaps(result["by_depth_length"], result["train_len"], "needle", out / "needle.png")]


def headline(result: Result) -> list[Score]:
    row = (result["overall_within_train_len"] or [{}])[0]
    within = "contexts up to the training length"
    return [
        Score(
            "needle_rank_top1",
            row.get("ll"),
            True,
            f"needle: the queried number ranked first of {result['candidates']} by log-likelihood, {within}",
        ),
        Score("needle_exact", row.get("em"), True, f"needle: greedy exact match, {within}"),
    ]


register(
    Task(
        "needle",
        "multi-needle retrieval by depth and context length (exact match, log-likelihood rank)",
        run,
        markdown,
        plot,
        reads_text=True,
        headline=headline,
    )
)
