"""Stub language models for the evaluation scorers' tests: an oracle that knows the right continuation of every
sample, and a uniform model. A scorer that gives the oracle 1.0 and the uniform model chance sees what it claims.
"""

from __future__ import annotations

import torch


class SequenceOracle:
    """Knows a set of right sequences; for a row, takes the one sharing the longest prefix with it and puts that
    sequence's next token first at every position (so at an answer slot, the right answer, whatever the row holds)."""

    def __init__(self, sequences: list[list[int]], vocab_size: int) -> None:
        width = max(map(len, sequences))
        self.seqs = torch.full((len(sequences), width), -1, dtype=torch.long)
        for i, s in enumerate(sequences):
            self.seqs[i, : len(s)] = torch.tensor(s)
        self.vocab_size = vocab_size

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        b, t = tokens.shape
        logits = torch.zeros(b, t, self.vocab_size)
        width = min(t, self.seqs.shape[1])
        for r in range(b):
            same = (self.seqs[:, :width] == tokens[r, :width]).long().cumprod(1).sum(1)  # common prefix lengths
            seq = self.seqs[int(same.argmax())]
            nxt = seq[1 : t + 1]
            valid = nxt >= 0
            logits[r, torch.arange(len(nxt))[valid], nxt[valid]] = 30.0
        return logits


class Uniform:
    """Every token equally likely at every position."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(*tokens.shape, self.vocab_size)


class Lookahead:
    """Puts each row's own next token first: the oracle of a loss on given text (loss ≈ 0 everywhere)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        logits[:, :-1].scatter_(-1, tokens[:, 1:, None], 30.0)
        return logits
