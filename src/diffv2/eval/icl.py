"""icl: in-context learning of a synthetic k-class label mapping, and how much the order of the demonstrations
matters (DIFF V1 paper §3.6 measures the same robustness on real classification sets).

An input is a class word followed by a random word ("mobe tirazu"); its label is one of k label tokens, a
mapping drawn at random, so only the demonstrations can teach it. Demonstrations "{input} ={label}" fill the
training length. Queries use random words the demonstrations never showed, so the class word alone decides.
Accuracy: the label tokens' logits at the label position, the right one on top (tie-aware; chance 1/k).

The same demonstrations and queries are scored under ≥ 10 permutation seeds in two orders: random, and
alternating by class (A B C A B C ...). The best-minus-worst accuracy over seeds is the order sensitivity.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data.tokenizer import Tokenizer
from ..errors import DataError
from .context import EvalContext, tie_aware_top1
from .registry import Result, Score, Task, register

CLASS_COUNTS = (2, 4)
LABEL_WORDS = (
    " red",
    " blue",
    " green",
    " gold",
    " black",
    " white",
    " good",
    " bad",
    " yes",
    " no",
    " up",
    " down",
    " left",
    " right",
    " cold",
    " hot",
)
LETTERS = tuple("ABCDEFGHIJKLMNOP")
SEP = " ="
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


def label_tokens(tokenizer: Tokenizer, k: int, rng: np.random.Generator) -> list[int]:
    """k distinct single-token labels: words if the tokenizer has them as single tokens, else capital letters."""
    for pool in (LABEL_WORDS, LETTERS):
        ids = [ids[0] for ids in map(tokenizer.encode, pool) if len(ids) == 1]
        if len(set(ids)) >= k:
            return [int(i) for i in rng.choice(sorted(set(ids)), k, replace=False)]
    raise DataError(f"the tokenizer has fewer than {k} single-token labels (words or capital letters)")


def pseudo_word(rng: np.random.Generator, syllables: int) -> str:
    return "".join(str(rng.choice(list(CONSONANTS))) + str(rng.choice(list(VOWELS))) for _ in range(syllables))


def make_task(tokenizer: Tokenizer, k: int, context: int, n_queries: int, rng: np.random.Generator) -> dict[str, Any]:
    """Demonstrations (a balanced set as token lists with their class), queries and the label of each class."""
    labels = label_tokens(tokenizer, k, rng)
    class_words: list[str] = []
    while len(class_words) < k:
        word = pseudo_word(rng, 2)
        if word not in class_words:
            class_words.append(word)
    sep, newline = tokenizer.encode(SEP), tokenizer.encode("\n")

    def item(c: int) -> list[int]:
        return tokenizer.encode(f" {class_words[c]} {pseudo_word(rng, 3)}") + sep

    queries = [(item(c), c) for c in rng.integers(0, k, n_queries).tolist()]
    query_room = max(len(q) for q, _ in queries) + 1
    demos: list[tuple[list[int], int]] = []
    used = 1 + query_room
    while True:
        batch = [([*item(c), labels[c], *newline], c) for c in range(k)]
        size = sum(len(d) for d, _ in batch)
        if used + size > context:
            break
        demos += batch
        used += size
    return {"labels": labels, "demos": demos, "queries": queries, "class_words": class_words}


def order(demos: list[tuple[list[int], int]], k: int, alternating: bool, rng: np.random.Generator) -> list[int]:
    """Demonstration indices: a random permutation, or classes in turn with a random order inside each class."""
    if not alternating:
        return rng.permutation(len(demos)).tolist()
    per_class = [rng.permutation([i for i, (_, c) in enumerate(demos) if c == cls]).tolist() for cls in range(k)]
    return [per_class[cls][j] for j in range(min(map(len, per_class))) for cls in range(k)]


def prompts(task: dict[str, Any], k: int, alternating: bool, rng: np.random.Generator, eot: int):
    """The shared prompt and the query continuations (each ending in its right label) of one ordering."""
    idx = order(task["demos"], k, alternating, rng)
    prompt = [eot] + [t for i in idx for t in task["demos"][i][0]]
    return prompt, [[*q, task["labels"][c]] for q, c in task["queries"]]


@torch.no_grad()
def accuracy(ctx: EvalContext, prompt: list[int], conts: list[list[int]], labels: list[int], classes: list[int]):
    logits = ctx.continuation_logits(prompt, conts)
    at = torch.tensor([len(c) - 1 for c in conts], device=logits.device)
    label_logits = logits[torch.arange(len(conts), device=logits.device), at][:, labels].double().cpu()
    return float(np.mean([tie_aware_top1(row, c) for row, c in zip(label_logits, classes, strict=True)]))


def run(ctx: EvalContext) -> Result:
    seeds = ctx.options.get("icl_seeds", 10)
    n_queries = ctx.count("icl_queries", 32, 8)
    rng = ctx.rng("icl")
    results = []
    with ctx.bar(len(CLASS_COUNTS) * 2 * seeds, "icl") as bar:
        for k in CLASS_COUNTS:
            task = make_task(ctx.tokenizer, k, ctx.train_len, n_queries, rng)
            classes = [c for _, c in task["queries"]]
            row: dict[str, Any] = {"k": k, "demos": len(task["demos"]), "queries": n_queries}
            for name in ("random", "alternating"):
                accs = []
                for seed in range(seeds):
                    perm_rng = np.random.default_rng([ctx.seed, k, seed])
                    prompt, conts = prompts(task, k, name == "alternating", perm_rng, ctx.tokenizer.eot_id)
                    accs.append(accuracy(ctx, prompt, conts, task["labels"], classes))
                    bar.update()
                row[name] = {
                    "accuracy": accs,
                    "mean": float(np.mean(accs)),
                    "std": float(np.std(accs, ddof=1)),
                    "margin": float(max(accs) - min(accs)),
                }
            results.append(row)
    return {"task": "icl", "seeds": seeds, "context": ctx.train_len, "by_k": results}


def markdown(result: Result) -> str:
    lines = [
        f"{result['seeds']} permutation seeds; demonstrations fill {result['context']} tokens.",
        "",
        "| k | demos | queries | order | mean accuracy | std | best − worst | chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["by_k"]:
        for name in ("random", "alternating"):
            a = r[name]
            lines.append(
                f"| {r['k']} | {r['demos']} | {r['queries']} | {name} | {a['mean']:.3f} | {a['std']:.3f} | "
                f"{a['margin']:.3f} | {1 / r['k']:.3f} |"
            )
    return "\n".join(lines)


def headline(result: Result) -> list[Score]:
    row = max(result["by_k"], key=lambda r: r["k"])
    return [
        Score("icl_accuracy", row["random"]["mean"], True, f"icl: accuracy at k = {row['k']}, random order"),
        Score(
            "icl_margin",
            row["random"]["margin"],
            False,
            f"icl: best − worst accuracy over {result['seeds']} demonstration orders at k = {row['k']}",
        ),
    ]


register(
    Task(
        "icl",
        "in-context k-class label mapping: accuracy and its spread over demonstration orders",
        run,
        markdown,
        headline=headline,
    )
)
