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


def run(ctx: EvalContext) -> Result:
    rng = ctx.rng("lowbit")
    text = ctx.text()
    windows = np.stack([text.window(ctx.train_len, rng) for _ in range(ctx.count("lowbit_windows", 16, 2))])
    n = ctx.count("lowbit_needle_samples", 10, 1)
    cells = [
        {"length": ctx.train_len, "n_needles": nn, "n_queried": 1, "depth": d, "n": n} for nn in (1, 4) for d in DEPTHS
    ]
    inner = dataclasses.replace(ctx, progress=False)  # the needle runs inside this task's own bar
    widths: dict[str, dict] = {}
    with ctx.bar(1 + len(BITS), "lowbit") as bar:
        for bits in (None, *BITS):
            transform = identity if bits is None else partial(fake_quantize, bits=bits)
            with attention_logit_transform(ctx.model, transform):
                widths["full" if bits is None else f"{bits}-bit"] = measure(inner, windows, cells)
            bar.update()
    full = widths["full"]
    for w in widths.values():
        w["loss_increase"] = w["loss"] - full["loss"]
    return {
        "task": "lowbit",
        "windows": len(windows),
        "window_len": ctx.train_len,
        "needle_samples": n * len(cells),
        "widths": widths,
    }


def markdown(result: Result) -> str:
    lines = [
        f"Loss on {result['windows']} windows of {result['window_len']} tokens; needle on "
        f"{result['needle_samples']} samples (1 or 4 needles, one queried).",
        "",
        "| attention logits | loss (nats) | loss increase | needle exact match | needle LL top-1 |",
        "|---|---|---|---|---|",
    ]
    for name, w in result["widths"].items():
        lines.append(
            f"| {name} | {w['loss']:.4f} | {w['loss_increase']:+.4f} | {fmt(w['needle_em'])} | {fmt(w['needle_ll'])} |"
        )
    return "\n".join(lines)


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
