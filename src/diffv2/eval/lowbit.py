"""lowbit: attention under low-bit logits (DIFF V1 paper §3.7).

The attention logits q·kᵀ/√d of every layer are fake-quantised before the softmax: per head and query row, the
largest finite |logit| sets the scale (dynamic absmax), values are rounded to 2^(b−1) − 1 signed steps and
scaled back; masked keys stay masked. The eager attention path runs at every width, full precision included,
so differences come from the rounding alone. Reported per width: validation loss on windows of the training
length and needle accuracy (one queried needle among 1 or 4, five depths, at the training length). Outlier
logits widen the step for the whole row, which is the failure the paper ties to attention noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from functools import partial

import numpy as np
import torch

from ..diagnostics import attention_logit_transform
from . import needle
from .context import EvalContext
from .registry import Result, Score, Task, register
from .retrieval import DEPTHS, fmt

BITS = (8, 6, 4)


def fake_quantize(logits: torch.Tensor, bits: int) -> torch.Tensor:
    """Round each row of ``logits`` (..., S) to ``bits``-bit signed integers times the row's absmax step;
    infinite entries (masked keys) pass through."""
    finite = torch.isfinite(logits)
    absmax = logits.masked_fill(~finite, 0.0).abs().amax(-1, keepdim=True)
    step = absmax.clamp_min(torch.finfo(logits.dtype).tiny) / (2 ** (bits - 1) - 1)
    return torch.where(finite, torch.round(logits / step) * step, logits)


def identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def measure(ctx: EvalContext, windows: np.ndarray, cells: list[dict]) -> dict:
    losses = ctx.token_losses(torch.from_numpy(windows)).double().mean(1)  # per window (token_losses batches)
    found = needle.run(ctx, cells_override=cells)["overall_within_train_len"]
    return {
        "loss": float(losses.mean()),
        "needle_em": found[0]["em"] if found else None,
        "needle_ll": found[0]["ll"] if found else None,
    }


def under_conditions(ctx: EvalContext, name: str, conditions: dict[str, Callable[[], ContextManager]]) -> Result:
    """Loss on windows of the training length and needle accuracy (1 or 4 needles, one queried, five depths) under
    each condition (a context manager changing how attention computes); every condition sees the same windows and
    needles, and ``loss_increase`` is against the first. Sample counts: options ``{name}_windows`` and
    ``{name}_needle_samples``."""
    rng = ctx.rng(name)
    text = ctx.text()
    windows = np.stack([text.window(ctx.train_len, rng) for _ in range(ctx.count(f"{name}_windows", 16, 2))])
    n = ctx.count(f"{name}_needle_samples", 10, 1)
    cells = [
        {"length": ctx.train_len, "n_needles": nn, "n_queried": 1, "depth": d, "n": n} for nn in (1, 4) for d in DEPTHS
    ]
    inner = dataclasses.replace(ctx, progress=False)  # the needle runs inside this task's own bar
    widths: dict[str, dict] = {}
    with ctx.bar(len(conditions), name) as bar:
        for label, condition in conditions.items():
            with condition():
                widths[label] = measure(inner, windows, cells)
            bar.update()
    first = next(iter(widths.values()))
    for w in widths.values():
        w["loss_increase"] = w["loss"] - first["loss"]
    return {
        "task": name,
        "windows": len(windows),
        "window_len": ctx.train_len,
        "needle_samples": n * len(cells),
        "widths": widths,
    }


def run(ctx: EvalContext) -> Result:
    # the eager path at every width, full precision included: differences come from the rounding alone
    conditions = {
        "full" if bits is None else f"{bits}-bit": partial(
            attention_logit_transform, ctx.model, identity if bits is None else partial(fake_quantize, bits=bits)
        )
        for bits in (None, *BITS)
    }
    return under_conditions(ctx, "lowbit", conditions)


def conditions_markdown(result: Result, condition: str) -> str:
    """The table of :func:`under_conditions`' result, its first column headed ``condition``."""
    lines = [
        f"Loss on {result['windows']} windows of {result['window_len']} tokens; needle on "
        f"{result['needle_samples']} samples (1 or 4 needles, one queried).",
        "",
        f"| {condition} | loss (nats) | loss increase | needle exact match | needle LL top-1 |",
        "|---|---|---|---|---|",
    ]
    for name, w in result["widths"].items():
        lines.append(
            f"| {name} | {w['loss']:.4f} | {w['loss_increase']:+.2e} | {fmt(w['needle_em'])} | {fmt(w['needle_ll'])} |"
        )
    return "\n".join(lines)


def markdown(result: Result) -> str:
    return conditions_markdown(result, "attention logits")


def headline(result: Result) -> list[Score]:
    bits = min(BITS)
    w = result["widths"][f"{bits}-bit"]
    return [
        Score(
            f"lowbit{bits}_loss_increase",
            w["loss_increase"],
            False,
            f"lowbit: loss increase with attention logits at {bits} bits",
        ),
        Score(
            f"lowbit{bits}_needle_rank",
            w["needle_ll"],
            True,
            f"lowbit: needle log-likelihood top-1 with attention logits at {bits} bits",
        ),
    ]


register(
    Task(
        "lowbit",
        "loss and needle accuracy with attention logits fake-quantised to 8/6/4 bits",
        run,
        markdown,
        reads_text=True,
        headline=headline,
    )
)
