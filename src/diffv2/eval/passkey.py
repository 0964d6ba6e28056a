"""passkey: one pass key in repetitive filler text, at five depths (the pass-key test of Mohtashami & Jaggi,
2023). The filler carries no information, so every token but the key line is noise; the prompt ends with
"The pass key is" and the key follows."""

from __future__ import annotations

from typing import Any

import numpy as np

from .context import EvalContext
from .registry import Result, Score, Task, register
from .retrieval import DEPTHS, N_CANDIDATES, Numbers, Sample, fmt, heat_table, run_cells, summarize, weighted_mean
from .text import insert_at_depths

INTRO = "A pass key is hidden in this text. Remember it.\n"
FILLER = " The river runs to the sea. The hills are quiet. The morning comes and goes. Here it is again."
KEY = (" The pass key is", ". Remember it.", " is the pass key.")  # the key goes after the first and second part
QUERY = "\nWhat is the pass key? The pass key is"
DIGITS = 5


def make_sample(ctx: EvalContext, numbers: Numbers, length: int, depth: float) -> Sample | None:
    tok = ctx.tokenizer
    key = numbers.draw(1)[0]
    intro, query, dot = tok.encode(INTRO), tok.encode(QUERY), tok.encode(".")
    first, second, third = (tok.encode(part) for part in KEY)
    line = np.array(first + numbers.encode(key) + second + numbers.encode(key) + third)
    filler_len = length - 1 - len(intro) - len(line) - len(query)
    if filler_len < length // 2:
        return None
    unit = tok.encode(FILLER)
    filler = np.tile(np.array(unit), filler_len // len(unit) + 1)[:filler_len]
    body, at, where = insert_at_depths(filler, [line], [depth], tok)
    prompt = [tok.eot_id, *intro, *body.tolist(), *query]
    start = 1 + len(intro) + at[0] + len(first)
    meta = {"key_span": [start, start + numbers.n_tokens], "actual_depth": where[0] / max(1, filler_len)}
    return Sample(prompt, [numbers.slot(key, [key], dot)], meta)


def run(ctx: EvalContext, cells_override: list[dict[str, Any]] | None = None) -> Result:
    numbers = Numbers(ctx.tokenizer, DIGITS, ctx.rng("passkey/numbers"))
    # the shortest context: intro, key line and query fill half of it, filler the rest
    fixed = len(ctx.tokenizer.encode(INTRO + "".join(KEY) + QUERY)) + 2 * numbers.n_tokens + 1
    n = ctx.count("passkey_samples", 20, 3)
    grid = cells_override or [
        {"length": length, "depth": d, "n": n} for length in ctx.context_lengths(2 * fixed) for d in DEPTHS
    ]
    records, skipped = run_cells(
        ctx, "passkey", grid, lambda c, _rng: make_sample(ctx, numbers, c["length"], c["depth"])
    )
    return {
        "task": "passkey",
        "train_len": ctx.train_len,
        "numbers": numbers.report,
        "candidates": N_CANDIDATES,
        "samples_per_cell": grid[0]["n"] if grid else 0,
        "skipped_cells": skipped,
        "by_length": summarize(records, ("length",)),
        "by_depth_length": summarize(records, ("length", "depth")),
        "records": records,
    }


def markdown(result: Result) -> str:
    lines = [
        f"{result['samples_per_cell']} samples per cell; {result['candidates']} candidates (chance "
        f"1/{result['candidates']}).",
        "",
        "| length | n | exact match | LL top-1 |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['length']} | {r['n']} | {fmt(r['em'])} | {fmt(r['ll'])} |" for r in result["by_length"]]
    lines += [
        "",
        "Exact match by context length and depth:",
        "",
        heat_table(result["by_depth_length"], "em", result["train_len"]),
    ]
    return "\n".join(lines)


def plot(result: Result, out) -> list:
    from .plots import depth_length_heatmaps

    return [depth_length_heatmaps(result["by_depth_length"], result["train_len"], "passkey", out / "passkey.png")]


def headline(result: Result) -> list[Score]:
    rows = [r for r in result["by_length"] if r["length"] <= result["train_len"]]
    return [
        Score(
            "passkey_rank_top1",
            weighted_mean(rows, "ll"),
            True,
            f"passkey: the key ranked first of {result['candidates']} by log-likelihood, contexts up to the training "
            "length",
        )
    ]


register(
    Task(
        "passkey",
        "a pass key in filler text at five depths (exact match, log-likelihood rank)",
        run,
        markdown,
        plot,
        headline=headline,
    )
)
