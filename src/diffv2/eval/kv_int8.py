"""kv_int8: what an int8 KV cache (``--kv-cache-dtype int8``) costs a model.

Every layer's rotated keys and values go through the int8 cache's round trip (per-vector absmax scale, values
rounded to [-127, 127], read back in the model's dtype: ``kernels.kv_int8``) before attention uses them, on the
model's usual attention path, so a forward over a whole window computes what decoding it from an int8 cache
computes. Reported against the model's own dtype: validation loss on windows of the training length and needle
accuracy (one queried needle among 1 or 4, five depths, at the training length). The DIFF papers argue that
subtracting two maps cancels noise that quantisation adds; this measures it for the cache.
"""

from __future__ import annotations

import contextlib
from functools import partial

from ..diagnostics import attention_kv_transform
from ..kernels.kv_int8 import int8_round_trip
from .context import EvalContext
from .lowbit import conditions_markdown, under_conditions
from .registry import Result, Score, Task, register


def run(ctx: EvalContext) -> Result:
    conditions = {
        "model dtype": contextlib.nullcontext,
        "int8": partial(attention_kv_transform, ctx.model, int8_round_trip),
    }
    return under_conditions(ctx, "kv_int8", conditions)


def markdown(result: Result) -> str:
    return conditions_markdown(result, "KV cache")


def headline(result: Result) -> list[Score]:
    w = result["widths"]["int8"]
    return [
        Score("kv_int8_loss_increase", w["loss_increase"], False, "kv_int8: loss increase with an int8 KV cache"),
        Score(
            "kv_int8_needle_rank", w["needle_ll"], True, "kv_int8: needle log-likelihood top-1 with an int8 KV cache"
        ),
    ]


register(
    Task(
        "kv_int8",
        "loss and needle accuracy with the KV cache stored in int8 (--kv-cache-dtype int8)",
        run,
        markdown,
        reads_text=True,
        headline=headline,
    )
)
