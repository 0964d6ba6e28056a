"""What every task is given: the model, its tokenizer, the text to build on, seeded randomness, and the two
forward passes the scorers need (log-probabilities of continuations of a shared prompt; per-token losses).

The model is a :class:`~diffv2.model.Transformer` or any callable ``model(tokens, positions=...) -> logits``
(the tests' oracle and uniform stubs). Positions are always passed, so a context may run past the model's
``max_seq_len``: RoPE has no table to run out of, and that is how the tasks test extrapolation.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.tokenizer import Tokenizer
from ..model import Transformer
from .text import TextSource, load_text

# On CUDA, a masked call with at most 16 queries goes to the broadcast-and-sum ``masked_decode``
# (kernels/softmax_attention.py), which holds a (B, Hkv, G, T, S) product; continuations are padded past it.
_MIN_CONTINUATION = 17


@dataclass
class EvalContext:
    model: Any
    tokenizer: Tokenizer
    train_len: int  # the context length the model was trained at; longer contexts test extrapolation
    vocab_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    quick: bool = False
    data_dir: str | Path | None = None  # a prepared dataset whose val split gives the text
    text_source: TextSource | None = None  # text given directly (tests); else loaded from data_dir / the corpus
    options: dict[str, Any] = field(default_factory=dict)  # per-task settings (mqar variants, lm-eval paths)
    progress: bool = True
    max_tokens: int = 1 << 17  # tokens per forward call (rows × length)
    max_logits: int = 1 << 26  # logits materialised per forward call when every position is scored

    def rng(self, name: str) -> np.random.Generator:
        """A generator seeded by the run's seed and the task's name: tasks do not shift each other's samples."""
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def count(self, option: str, full: int, quick: int) -> int:
        """How many samples: ``options[option]`` when the caller set it, else ``quick`` or ``full``."""
        return int(self.options[option]) if option in self.options else quick if self.quick else full

    def text(self) -> TextSource:
        if self.text_source is None:
            self.text_source = load_text(self.tokenizer, self.data_dir, min_tokens=16 * self.train_len)
        return self.text_source

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="sample", disable=not self.progress, dynamic_ncols=True)

    def context_lengths(self, minimum: int) -> list[int]:
        """¼, ½, 1 and 2 × the training length (the last past it), none shorter than ``minimum``."""
        t = self.train_len
        return sorted({max(minimum, n) for n in (t // 4, t // 2, t, 2 * t)})

    # ------------------------------------------------------------------ forward passes
    def _call(self, tokens: torch.Tensor, start: int = 0, caches: list | None = None) -> torch.Tensor:
        positions = torch.arange(start, start + tokens.shape[1], device=self.device)[None]
        if caches is None:
            return self.model(tokens, positions=positions)
        return self.model(tokens, positions=positions, caches=caches)

    @torch.no_grad()
    def continuation_logits(self, prompt: Sequence[int], continuations: Sequence[Sequence[int]]) -> torch.Tensor:
        """fp32 logits (B, t, V), t = the longest continuation: row b, step i predicts ``continuations[b][i]``
        after ``prompt + continuations[b][:i]``. Steps past a row's own length are padding.

        A :class:`Transformer` runs the prompt once and the continuations against its cached keys and values;
        any other model runs each whole row.
        """
        return self.continuation_logits_many([prompt], [continuations])[0]

    @torch.no_grad()
    def continuation_logits_many(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]]
    ) -> list[torch.Tensor]:
        """:meth:`continuation_logits` of each prompt and its continuations. On a :class:`Transformer`, prompts of
        one length run as one batch (the samples of a needle cell), their continuations as batches against it."""
        if not isinstance(self.model, Transformer) or len({len(p) for p in prompts}) != 1 or len(prompts[0]) < 2:
            if len(prompts) > 1:
                return [self.continuation_logits_many([p], [c])[0] for p, c in zip(prompts, continuations, strict=True)]
            width = max(len(c) for c in continuations[0])
            pad = self.tokenizer.eot_id
            rows = [[*prompts[0], *c, *[pad] * (width - len(c))] for c in continuations[0]]
            return [self._rows(torch.tensor(rows, device=self.device), len(prompts[0]) - 1, width)]
        length, pad = len(prompts[0]), self.tokenizer.eot_id
        width = max(len(c) for cs in continuations for c in cs)
        # the last prompt token and the continuations run together; causal attention: padding after a row's tokens
        # changes nothing before them
        width_run = max(width, _MIN_CONTINUATION)
        pairs = zip(prompts, continuations, strict=True)
        tail = [[p[-1], *c[:-1], *[pad] * (width_run - len(c))] for p, cs in pairs for c in cs]
        owner = torch.tensor([i for i, cs in enumerate(continuations) for _ in cs], device=self.device)
        caches = [_SharedPrefix() for _ in self.model.layers]
        heads = torch.tensor([list(p[:-1]) for p in prompts], device=self.device)
        step = max(1, self.max_tokens // length)
        with _no_logits(self.model):
            for i in range(0, len(prompts), step):
                self._call(heads[i : i + step], 0, caches)
        out = []
        per_call = max(1, self.max_tokens // (length + width_run))
        for i in range(0, len(tail), per_call):
            for cache in caches:
                cache.rows = owner[i : i + per_call]
            chunk = torch.tensor(tail[i : i + per_call], device=self.device)
            out.append(self._call(chunk, length - 1, caches)[:, :width].float())
        logits = torch.cat(out)
        counts = [len(cs) for cs in continuations]
        return [
            part[:, : max(len(c) for c in cs)] for part, cs in zip(logits.split(counts), continuations, strict=True)
        ]

    def _rows(self, rows: torch.Tensor, first: int, width: int) -> torch.Tensor:
        per_call = max(1, self.max_tokens // rows.shape[1])
        parts = [
            self._call(rows[i : i + per_call])[:, first : first + width].float() for i in range(0, len(rows), per_call)
        ]
        return torch.cat(parts)

    @torch.no_grad()
    def token_losses(self, rows: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (nats) of every next token, (B, T-1), for rows (B, T) of token ids (the forward runs over all
        T tokens, so a window of ``train_len + 1`` tokens runs one position past the training length)."""
        rows = rows.to(self.device)
        per_call = max(1, self.max_logits // (rows.shape[1] * self.vocab_size))
        out = []
        for i in range(0, len(rows), per_call):
            chunk = rows[i : i + per_call]
            logits = self._call(chunk)[:, :-1].float()
            out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none"))
        return torch.cat(out).cpu()


class _SharedPrefix:
    """One layer's cache for scoring many continuations of some prompts of one length: the calls made while
    ``rows`` is None (the prompts) keep their keys and values; each later call (continuations, B rows) attends to
    those of its rows' prompts (``rows``: B prompt indices) and to its own."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rows is None:  # a batch of prompts
            self.k = k if self.k is None else torch.cat((self.k, k))
            self.v = v if self.v is None else torch.cat((self.v, v))
            return k, v
        b = k.shape[0]
        if self.k.shape[0] == 1:  # one prompt: a view, no copy
            return torch.cat((self.k.expand(b, -1, -1, -1), k), 2), torch.cat((self.v.expand(b, -1, -1, -1), v), 2)
        return torch.cat((self.k[self.rows], k), 2), torch.cat((self.v[self.rows], v), 2)


@contextlib.contextmanager
def _no_logits(model: Transformer) -> Iterator[None]:
    """Within this block the LM head sees no positions: a prompt run only to fill caches costs no (T, V) logits."""
    handle = model.norm.register_forward_hook(lambda _m, _args, out: out[:, :0])
    try:
        yield
    finally:
        handle.remove()


def log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position: logits (..., V), targets (...) → (...)."""
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)


def tie_aware_top1(scores: torch.Tensor, correct: int) -> float:
    """1/k when the correct entry is among the k highest-scoring (tied) entries, else 0: a model that cannot tell
    the entries apart scores exactly chance."""
    best = scores.max()
    if scores[correct] < best:
        return 0.0
    return 1.0 / int((scores == best).sum())
