"""ar_hit: validation loss on associative-recall hits vs the rest (Zoology; DIFF V1 paper §3.8).

A token is an AR hit when the bigram it ends (previous token, this token) already occurred earlier in the
window: a model that recalls what followed the previous token last time can predict it. Its distance is how
far back the most recent earlier occurrence is. Hits sit later in the window on average, where every token is
easier, so the loss is also given per quarter of the window, hits and the rest side by side.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from .context import EvalContext
from .registry import Result, Score, Task, register
from .retrieval import fmt

DISTANCE_EDGES = (1, 4, 16, 64, 256, 1024, 4096)


def hit_distances(tokens: np.ndarray) -> np.ndarray:
    """Per position t ≥ 1: t minus the position of the most recent earlier end of the bigram
    (tokens[t-1], tokens[t]), or 0 when it did not occur before. Position 0 ends no bigram (0)."""
    last: dict[tuple[int, int], int] = {}
    out = np.zeros(len(tokens), dtype=np.int64)
    for t in range(1, len(tokens)):
        key = (int(tokens[t - 1]), int(tokens[t]))
        if key in last:
            out[t] = t - last[key]
        last[key] = t
    return out


def bin_label(lo: int, hi: int | None) -> str:
    return f"{lo}-{hi - 1}" if hi is not None else f"≥{lo}"


def score(windows: np.ndarray, losses: torch.Tensor) -> dict[str, Any]:
    """Loss of hits by distance bin, of the rest, and both by quarter of the window. ``losses[b, t]`` is the
    loss of predicting ``windows[b, t + 1]`` (B, T - 1)."""
    dist = np.stack([hit_distances(w) for w in windows])[:, 1:]
    loss = losses.double().numpy()
    hit = dist > 0

    def mean(mask: np.ndarray) -> dict[str, Any]:
        return {"n": int(mask.sum()), "loss": float(loss[mask].mean()) if mask.any() else None}

    edges = [*DISTANCE_EDGES, None]
    bins = [
        {"distance": bin_label(lo, hi), **mean(hit & (dist >= lo) & (dist < (hi or np.iinfo(np.int64).max)))}
        for lo, hi in itertools.pairwise(edges)
    ]
    quarter = np.minimum(4 * np.arange(dist.shape[1]) // dist.shape[1], 3)[None].repeat(len(dist), 0)
    quarters = [
        {"quarter": q + 1, "hit": mean(hit & (quarter == q)), "other": mean(~hit & (quarter == q))} for q in range(4)
    ]
    return {"hit": mean(hit), "other": mean(~hit), "by_distance": bins, "by_quarter": quarters}


def run(ctx: EvalContext) -> Result:
    n = ctx.count("ar_hit_windows", 64, 4)
    rng = ctx.rng("ar_hit")
    text = ctx.text()
    windows = np.stack([text.window(ctx.train_len, rng) for _ in range(n)])
    with ctx.bar(n, "ar_hit") as bar:
        losses = []
        for w in windows:
            losses.append(ctx.token_losses(torch.from_numpy(w)[None]))
            bar.update()
    return {
        "task": "ar_hit",
        "text": text.source,
        "windows": n,
        "window_len": ctx.train_len,
        **score(windows, torch.cat(losses)),
    }


def markdown(result: Result) -> str:
    hit, other = result["hit"], result["other"]
    lines = [
        f"{result['windows']} windows of {result['window_len']} tokens from {result['text']}.",
        "",
        "| tokens | n | loss (nats) |",
        "|---|---|---|",
        f"| AR hits | {hit['n']} | {fmt(hit['loss'])} |",
        f"| the rest | {other['n']} | {fmt(other['loss'])} |",
        "",
        "| hit distance | n | loss |",
        "|---|---|---|",
    ]
    lines += [f"| {b['distance']} | {b['n']} | {fmt(b['loss'])} |" for b in result["by_distance"] if b["n"]]
    lines += ["", "| quarter of the window | hits: loss | the rest: loss |", "|---|---|---|"]
    lines += [f"| {q['quarter']} | {fmt(q['hit']['loss'])} | {fmt(q['other']['loss'])} |" for q in result["by_quarter"]]
    return "\n".join(lines)


def headline(result: Result) -> list[Score]:
    return [
        Score("ar_hit_loss", result["hit"]["loss"], False, "ar_hit: loss on tokens whose bigram occurred earlier"),
        Score("ar_other_loss", result["other"]["loss"], False, "ar_hit: loss on the other tokens"),
    ]


register(
    Task(
        "ar_hit",
        "loss on tokens whose bigram occurred earlier in the window vs the rest, by distance",
        run,
        markdown,
        reads_text=True,
        headline=headline,
    )
)
