"""What needle and passkey share: numbers of a fixed token count, samples with answer slots, and the scorer.

A sample is a prompt that ends where the first answer goes, then one slot per queried item: the candidate
answers (the right one, the other needles' numbers, decoys that appear nowhere; all of the same token count, so
a model that cannot tell them apart scores exactly chance) and the template tokens that follow the answer.

Scoring is teacher-forced, in one batch per sample:
- ``em``, greedy exact match: at every answer position of every slot the model's top token is the right one,
  and after each number its top token does not start with a digit (so "12345" is not greedily "123456");
  this is what greedy decoding would produce, computed without decoding;
- ``ll``: the right number has the highest log-likelihood among all candidates (tie-aware; chance 1/C);
- ``ll_needles``: the same among the needles' numbers only (chance 1/N; None with one needle).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.tokenizer import Tokenizer
from ..errors import DataError
from .context import EvalContext, log_probs, tie_aware_top1
from .text import starts_with_digit

N_CANDIDATES = 8
SAMPLES_PER_BATCH = 16  # a cell's samples share their prompt length: scored together, this many at a time
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Slot:
    candidates: list[list[int]]  # token ids of each candidate answer, all the same length
    correct: int  # index of the right one
    needles: list[int]  # indices of the candidates that are needles' numbers
    after: list[int]  # template tokens after the answer (up to the next slot's answer, or a final ".")


@dataclass
class Sample:
    prompt: list[int]
    slots: list[Slot]
    meta: dict[str, Any] = field(default_factory=dict)  # length, depth, needle spans, ...

    def continuation(self, fill: dict[int, int] | None = None) -> list[int]:
        """The tokens after the prompt with each slot's right answer, or ``fill[slot]``'s candidate instead."""
        out: list[int] = []
        for r, slot in enumerate(self.slots):
            out += slot.candidates[(fill or {}).get(r, slot.correct)] + slot.after
        return out

    def full(self) -> list[int]:
        """Prompt and right answers: what an oracle would read."""
        return self.prompt + self.continuation()


class Numbers:
    """Random numbers of ``digits`` digits whose text " N" encodes to the most common token count for such
    numbers; also records how the tokenizer splits them."""

    def __init__(self, tokenizer: Tokenizer, digits: int, rng: np.random.Generator) -> None:
        self.tokenizer, self.digits, self.rng = tokenizer, digits, rng
        lo = 10 ** (digits - 1)
        probe = rng.integers(lo, 10 * lo, size=200)
        counts = Counter(len(self.encode(int(n))) for n in probe)
        self.n_tokens = counts.most_common(1)[0][0]
        example = int(probe[0])
        self.report = {
            "digits": digits,
            "tokens_per_number": self.n_tokens,
            "token_count_histogram": {str(k): v for k, v in sorted(counts.items())},
            "example": str(example),
            "example_pieces": [tokenizer.decode([t]) for t in self.encode(example)],
            "single_digit_tokens": all(len(tokenizer.decode([t]).strip()) <= 1 for t in self.encode(example)),
        }

    def encode(self, n: int) -> list[int]:
        return self.tokenizer.encode(f" {n}")

    def draw(self, k: int, exclude: set[int] = frozenset()) -> list[int]:
        """``k`` distinct numbers, none in ``exclude``, each of ``n_tokens`` tokens."""
        lo, out = 10 ** (self.digits - 1), []
        for _ in range(10_000 * k):
            n = int(self.rng.integers(lo, 10 * lo))
            if n not in exclude and n not in out and len(self.encode(n)) == self.n_tokens:
                out.append(n)
                if len(out) == k:
                    return out
        raise DataError(f"the tokenizer gives too few {self.digits}-digit numbers of {self.n_tokens} tokens")

    def slot(self, right: int, needles: list[int], after: list[int]) -> Slot:
        """Candidates: the needles' numbers, then decoys up to ``N_CANDIDATES``."""
        decoys = self.draw(max(0, N_CANDIDATES - len(needles)), exclude=set(needles))
        numbers = list(needles) + decoys
        return Slot([self.encode(n) for n in numbers], numbers.index(right), list(range(len(needles))), after)


def _candidate_rows(sample: Sample) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Every continuation with one slot's candidate swapped in, and (slot, candidate) of each."""
    rows: list[list[int]] = []
    index: list[tuple[int, int]] = []
    for r, slot in enumerate(sample.slots):
        for j in range(len(slot.candidates)):
            rows.append(sample.continuation({r: j}))
            index.append((r, j))
    return rows, index


@torch.no_grad()
def score_samples(ctx: EvalContext, samples: list[Sample]) -> list[dict[str, Any]]:
    """:func:`score_sample` of each; prompts of one length (a cell's samples) run as one batch."""
    built = [_candidate_rows(s) for s in samples]
    logits = ctx.continuation_logits_many([s.prompt for s in samples], [rows for rows, _ in built])
    return [_score(ctx, s, rows, index, lg) for s, (rows, index), lg in zip(samples, built, logits, strict=True)]


@torch.no_grad()
def score_sample(ctx: EvalContext, sample: Sample) -> dict[str, Any]:
    """em / ll / ll_needles of one sample (see the module docstring)."""
    return score_samples(ctx, [sample])[0]


def _score(
    ctx: EvalContext, sample: Sample, rows: list[list[int]], index: list[tuple[int, int]], logits: torch.Tensor
) -> dict[str, Any]:
    targets = torch.tensor(rows, device=logits.device)
    lp = log_probs(logits, targets).cpu()
    top = logits.argmax(-1).cpu()
    digit = starts_with_digit(ctx.tokenizer)
    truth_row = next(i for i, (r, j) in enumerate(index) if j == sample.slots[r].correct)
    em, ll, ll_needles, offset = True, [], [], 0
    for r, slot in enumerate(sample.slots):
        width = len(slot.candidates[0])
        span = slice(offset, offset + width)
        em &= bool((top[truth_row, span] == targets[truth_row, span].cpu()).all())
        nxt = int(top[truth_row, offset + width])
        em &= not (nxt < len(digit) and digit[nxt])
        scores = torch.stack([lp[i, span].sum() for i, (rr, _) in enumerate(index) if rr == r]).double()
        ll.append(tie_aware_top1(scores, slot.correct))
        if len(slot.needles) > 1:
            ll_needles.append(tie_aware_top1(scores[slot.needles], slot.needles.index(slot.correct)))
        offset += width + len(slot.after)
    return {"em": float(em), "ll": float(np.mean(ll)), "ll_needles": float(np.mean(ll_needles)) if ll_needles else None}


def summarize(records: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Mean em / ll / ll_needles over the records that share ``keys``, one row per combination, sorted."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[tuple(rec[k] for k in keys)].append(rec)
    rows = []
    for key in sorted(groups):
        recs = groups[key]
        row = dict(zip(keys, key, strict=True))
        row["n"] = len(recs)
        for metric in ("em", "ll", "ll_needles"):
            values = [r[metric] for r in recs if r.get(metric) is not None]
            row[metric] = float(np.mean(values)) if values else None
        rows.append(row)
    return rows


def weighted_mean(rows: list[dict[str, Any]], metric: str) -> float | None:
    """The mean of ``metric`` over summary rows, each weighted by its sample count ``n`` (None: no values)."""
    rows = [r for r in rows if r.get(metric) is not None and r.get("n")]
    total = sum(r["n"] for r in rows)
    return sum(r[metric] * r["n"] for r in rows) / total if total else None


def run_cells(ctx: EvalContext, name: str, cells: list[dict[str, Any]], build):
    """Build and score the samples of every cell (``build(cell, rng) -> Sample | None``); returns the per-sample
    records (the same seed gives the same samples, so records of two checkpoints pair up) and the cells skipped
    because their items would fill more than half of the context."""
    rng = ctx.rng(name)
    records, skipped = [], []
    with ctx.bar(sum(c["n"] for c in cells), name) as bar:
        for cell in cells:
            settings = {k: v for k, v in cell.items() if k != "n"}
            samples = []
            for _ in range(cell["n"]):  # building draws from rng, scoring does not: the samples of a seed stay
                sample = build(cell, rng)
                if sample is None:
                    skipped.append(settings)
                    break
                samples.append(sample)
            for first in range(0, len(samples), SAMPLES_PER_BATCH):
                part = samples[first : first + SAMPLES_PER_BATCH]
                for i, (sample, score) in enumerate(zip(part, score_samples(ctx, part), strict=True), first):
                    depth = {"actual_depth": round(sample.meta["actual_depth"], 4)}
                    records.append({**settings, "sample": i, **depth, **score})
                bar.update(len(part))
            bar.update(cell["n"] - len(samples))
    return records, skipped


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def heat_table(rows: list[dict[str, Any]], metric: str, train_len: int) -> str:
    """Markdown table of ``metric`` by context length (rows) and depth (columns)."""
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    at = {(r["length"], r["depth"]): r[metric] for r in rows}
    lines = ["| length | " + " | ".join(f"depth {d:.0%}" for d in depths) + " |", "|---" * (len(depths) + 1) + "|"]
    for n in lengths:
        label = f"{n}" + (" (past training length)" if n > train_len else "")
        lines.append(f"| {label} | " + " | ".join(fmt(at.get((n, d))) for d in depths) + " |")
    return "\n".join(lines)
