"""attention_split: where the attention goes at the query (DIFF V1 paper, Table 3).

On needle samples (4 needles, one queried, at five depths, at the training length up to 1024 tokens), the row of
the last prompt token (the one that predicts the answer) of each head's attention map is split into the mass on
the queried needle's number tokens (the answer) and the mass on everything else (the noise). A baseline has one
softmax map per head; DIFF has two per output head, a¹ and a², and the effective map a¹ − w·a² with w = σ(λ)
(DIFF V2, per token) or λ (V1), which sums to 1 − w: it is divided by 1 − w so that it sums to 1 as a softmax
map does. A uniform map would put ``answer_tokens / context`` on the answer. The best retrieval head is the
(layer, head) with the most answer mass on its effective map, averaged over samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..diagnostics import attention_maps
from .context import EvalContext
from .needle import make_sample
from .registry import Result, Score, Task, register
from .retrieval import DEPTHS, Numbers

MAX_CONTEXT = 1024  # every layer's (B, heads, T, T) maps are held at once
N_NEEDLES = 4
MIN_NORM = 1e-3  # 1 − w below this: the effective map is not normalised (the sample is left out of that head)


def split_at_query(row: torch.Tensor, span: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass of a query row (heads, S) on keys [span) and on the other keys: (heads,) each."""
    inside = torch.zeros(row.shape[-1], dtype=torch.bool, device=row.device)
    inside[span[0] : span[1]] = True
    return row[:, inside].sum(-1), row[:, ~inside].sum(-1)


def layer_rows(maps) -> dict[str, torch.Tensor]:
    """The last query's row of each map of one layer, (heads, S) in fp64; ``effective`` normalised by 1 − w."""
    rows = {"a1": maps.a1[0, :, -1].double()}
    if maps.a2 is not None:
        rows["a2"] = maps.a2[0, :, -1].double()
        norm = 1.0 - maps.weight[0, :, -1].double()  # (heads,)
        eff = maps.effective[0, :, -1].double()
        rows["effective"] = torch.where(norm.abs()[:, None] > MIN_NORM, eff / norm[:, None], torch.nan)
    return rows


def split_sample(model, tokens: list[int], span: tuple[int, int]) -> dict[str, np.ndarray]:
    """Per map: (layers, heads, 2) answer and rest mass at the query, for one sample."""
    per_map: dict[str, list[np.ndarray]] = {}
    for maps in attention_maps(model, torch.tensor([tokens], device=next(model.parameters()).device)):
        for name, row in layer_rows(maps).items():
            answer, rest = split_at_query(row, span)
            per_map.setdefault(name, []).append(torch.stack((answer, rest), -1).cpu().numpy())
    return {name: np.stack(layers) for name, layers in per_map.items()}


def summarize(splits: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in splits[0]:
        stacked = np.stack([s[name] for s in splits])  # (samples, layers, heads, 2)
        per_head = np.nanmean(stacked, axis=0)  # (layers, heads, 2)
        out[name] = {
            "answer": float(np.nanmean(per_head[..., 0])),
            "rest": float(np.nanmean(per_head[..., 1])),
            "answer_per_head": per_head[..., 0].tolist(),
            "answer_per_layer": np.nanmean(per_head[..., 0], axis=1).tolist(),
            "max_sum_error": float(np.nanmax(np.abs(stacked.sum(-1) - 1.0))),
        }
    key = "effective" if "effective" in out else "a1"
    heads = np.array(out[key]["answer_per_head"])
    layer, head = np.unravel_index(np.nanargmax(heads), heads.shape)
    out["best_head"] = {"map": key, "layer": int(layer), "head": int(head), "answer": float(heads[layer, head])}
    return out


def run(ctx: EvalContext) -> Result:
    length = min(ctx.train_len, MAX_CONTEXT)
    numbers = Numbers(ctx.tokenizer, 5, ctx.rng("attention_split/numbers"))
    rng = ctx.rng("attention_split")
    per_depth = ctx.count("attention_split_samples", 10, 2)
    splits, answer_tokens = [], 0
    with ctx.bar(per_depth * len(DEPTHS), "attention_split") as bar:
        for depth in DEPTHS:
            for _ in range(per_depth):
                sample = make_sample(ctx, numbers, length, N_NEEDLES, 1, depth, rng)
                sample = sample or make_sample(ctx, numbers, length, 1, 1, depth, rng)
                bar.update()
                if sample is None:
                    continue
                span = tuple(sample.meta["needle_spans"][0])
                answer_tokens = span[1] - span[0]
                splits.append(split_sample(ctx.model, sample.prompt, span))
    base = {"task": "attention_split", "context": length, "samples": len(splits), "kind": ctx.model.cfg.attention}
    if not splits:
        return {**base, "skipped": f"no needle fits in {length} tokens"}
    return {**base, "answer_tokens": answer_tokens, "uniform_answer": answer_tokens / length, **summarize(splits)}


MAP_NAMES = {"a1": "first softmax map a¹", "a2": "second softmax map a²", "effective": "effective (a¹ − w·a²)/(1 − w)"}


def markdown(result: Result) -> str:
    if "skipped" in result:
        return f"Skipped: {result['skipped']}."
    lines = [
        f"{result['samples']} needle samples of {result['context']} tokens ({result['kind']}); the answer is "
        f"{result['answer_tokens']} tokens, so a uniform map puts {result['uniform_answer']:.4f} on it.",
        "",
        "| map | attention on the answer | on the rest (noise) | max error of the sum |",
        "|---|---|---|---|",
    ]
    for name, label in MAP_NAMES.items():
        if name in result:
            m = result[name]
            lines.append(f"| {label} | {m['answer']:.4f} | {m['rest']:.4f} | {m['max_sum_error']:.1e} |")
    b = result["best_head"]
    lines += [
        "",
        f"Best retrieval head ({MAP_NAMES[b['map']]}): layer {b['layer']}, head {b['head']}, "
        f"{b['answer']:.4f} on the answer.",
    ]
    return "\n".join(lines)


def plot(result: Result, out) -> list:
    if "skipped" in result:
        return []
    from .plots import grouped_bars

    names = [n for n in MAP_NAMES if n in result]
    layers = [f"layer {i}" for i in range(len(result[names[0]]["answer_per_layer"]))]
    series = {MAP_NAMES[n]: result[n]["answer_per_layer"] for n in names}
    title = f"Attention on the answer at the query, mean over heads ({result['kind']})"
    return [grouped_bars(layers, series, "attention mass on the answer", title, out / "attention_split.png")]


def headline(result: Result) -> list[Score]:
    key = result["best_head"]["map"]
    return [
        Score(
            "answer_attention",
            result[key]["answer"],
            True,
            "attention_split: attention on the answer at the query, mean over layers and heads (a Transformer's "
            "softmax map; DIFF's effective map divided by 1 − w; uniform attention gives "
            f"{result['uniform_answer']:.3g})",
        )
    ]


register(
    Task(
        "attention_split",
        "attention on the answer vs the rest of the context at the query, per head and map",
        run,
        markdown,
        plot,
        reads_text=True,
        headline=headline,
    )
)
