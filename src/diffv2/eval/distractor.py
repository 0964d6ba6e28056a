"""distractor: how much unrelated context hurts. The loss on a document's last ``target`` tokens is measured after
nothing, after k tokens of the document's own preceding text, and after k tokens of an unrelated document
(k = 1, 2, 3 × target; target = 256 tokens, or a quarter of a shorter training length), so the longest row is the
training length. Every condition scores the target's tokens after its first (which has no context without a
prefix). A model that ignores noise loses nothing to the unrelated prefix; differences are paired per sample,
mean ± standard error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .context import EvalContext
from .registry import Result, Score, Task, register

SAMPLES_PER_BATCH = 16  # samples scored together: the rows of one condition have one length


def lengths(train_len: int) -> tuple[int, list[int]]:
    target = min(256, train_len // 4)
    return target, [target, 2 * target, 3 * target]


def make_samples(docs: list[np.ndarray], target: int, ks: list[int], n: int, rng: np.random.Generator):
    """``n`` (true prefix, target, unrelated prefix) triples, each prefix ``max(ks)`` long, and where the unrelated
    text came from: another document, or, when only one is long enough (a val split of one book), a part of it
    at least two sample lengths away. No samples when no document is long enough for that."""
    need = max(ks) + target
    long = [i for i, d in enumerate(docs) if len(d) >= need]
    same = len(long) == 1
    if not long or (same and len(docs[long[0]]) < 5 * need):
        return [], None
    out = []
    for _ in range(n):
        i, j = (long[0], long[0]) if same else rng.choice(long, 2, replace=False)
        o = int(rng.integers(0, len(docs[i]) - need + 1))
        far = [
            u
            for u in (int(rng.integers(0, len(docs[j]) - max(ks) + 1)) for _ in range(100))
            if not same or abs(u - o) >= 2 * need
        ]
        u = far[0] if far else (o + 2 * need if o + 3 * need <= len(docs[i]) else o - 2 * need)
        doc = docs[i][o : o + need]
        out.append((doc[: max(ks)], doc[max(ks) :], docs[j][u : u + max(ks)]))
    return out, "a distant part of the same document" if same else "another document"


def conditions(true_prefix: np.ndarray, unrelated: np.ndarray, ks: list[int]) -> dict[str, np.ndarray]:
    """The prefix of each condition (its last k tokens: the text right before the target)."""
    out = {"none": true_prefix[:0]}
    out.update({f"true_{k}": true_prefix[-k:] for k in ks})
    out.update({f"unrelated_{k}": unrelated[-k:] for k in ks})
    return out


def run(ctx: EvalContext) -> Result:
    target, ks = lengths(ctx.train_len)
    text = ctx.text()
    n = ctx.count("distractor_samples", 64, 6)
    samples, unrelated_from = make_samples(text.documents, target, ks, n, ctx.rng("distractor"))
    base = {
        "task": "distractor",
        "text": text.source,
        "target": target,
        "ks": ks,
        "samples": len(samples),
        "unrelated_from": unrelated_from,
    }
    if not samples:
        return {**base, "skipped": f"no document of ≥ {max(ks) + target} tokens (two, or one of 5×) in {text.source}"}
    per: dict[str, list[float]] = {}
    with ctx.bar(len(samples), "distractor") as bar:
        for i in range(0, len(samples), SAMPLES_PER_BATCH):  # a condition's rows have one length: one batch
            part = samples[i : i + SAMPLES_PER_BATCH]
            prefixes = [conditions(true_prefix, unrelated, ks) for true_prefix, _, unrelated in part]
            for name in prefixes[0]:
                rows = np.stack([np.concatenate([p[name], tgt]) for p, (_, tgt, _) in zip(prefixes, part, strict=True)])
                # the target's first token has no context without a prefix: every condition scores the rest
                losses = ctx.token_losses(torch.from_numpy(rows))[:, 1 - target :].double().mean(1)
                per.setdefault(name, []).extend(float(x) for x in losses)
            bar.update(len(part))
    return {**base, **score(per), "per_sample": per}


def score(per: dict[str, list[float]]) -> dict[str, Any]:
    """Mean loss per condition, and each condition minus "none", paired over samples."""
    loss = {k: float(np.mean(v)) for k, v in per.items()}
    none = np.array(per["none"])
    diff = {}
    for k, v in per.items():
        if k != "none":
            d = np.array(v) - none
            diff[k] = {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None}
    return {"loss": loss, "minus_none": diff}


def markdown(result: Result) -> str:
    if "skipped" in result:
        return f"Skipped: {result['skipped']}."
    lines = [
        f"{result['samples']} samples from {result['text']}; loss on the last {result['target'] - 1} tokens; "
        f"unrelated text from {result['unrelated_from']}.",
        "",
        "| prefix | loss (nats) | minus no prefix (± s.e.) |",
        "|---|---|---|",
    ]
    for name, value in result["loss"].items():
        d = result["minus_none"].get(name)
        shown = "–" if d is None else f"{d['mean']:+.3f}" + ("" if d["se"] is None else f" ± {d['se']:.3f}")
        lines.append(f"| {name.replace('_', ' ')} | {value:.3f} | {shown} |")
    return "\n".join(lines)


def headline(result: Result) -> list[Score]:
    k = max(result["ks"])
    return [
        Score(
            "distractor_unrelated",
            result["minus_none"][f"unrelated_{k}"]["mean"],
            False,
            f"distractor: loss after {k} tokens of unrelated text minus loss after none",
        ),
        Score(
            "distractor_true",
            result["minus_none"][f"true_{k}"]["mean"],
            False,
            f"distractor: loss after the true {k}-token prefix minus loss after none",
        ),
    ]


register(
    Task(
        "distractor",
        "loss after the true prefix, after unrelated text and after nothing",
        run,
        markdown,
        reads_text=True,
        headline=headline,
    )
)
