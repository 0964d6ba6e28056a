"""Sampling a batch whose rows each have their own settings, and the log-probabilities clients ask for."""

from __future__ import annotations

import torch

from ..generate import sample_next, sample_rows
from .sequence import SamplingParams, TokenInfo


def sample_sequences(
    logits: torch.Tensor, rows: list[tuple[int, SamplingParams, torch.Generator | None]], shared: torch.Generator
) -> torch.Tensor:
    """Next tokens (B,) for logits (B, V); ``rows`` lists (row, settings, own generator or None) of the rows
    that matter (the others get the argmax). Greedy rows and rows without a generator of their own are drawn
    together in one :func:`~diffv2.generate.sample_rows` pass from ``shared``; a row with its own generator
    (a seeded request) is drawn alone with :func:`~diffv2.generate.sample_next`, exactly as ``generate_batch``
    draws a lone prompt with that seed, whatever else is in the batch."""
    pooled = [(row, p) for row, p, gen in rows if p.temperature > 0 and gen is None]
    if pooled:
        settings = [(0.0, 0, 1.0)] * logits.shape[0]
        for row, p in pooled:
            settings[row] = (p.temperature, p.top_k, p.top_p)
        temperature, top_k, top_p = (to_device(c, logits.device) for c in zip(*settings, strict=True))
        tokens = sample_rows(logits, temperature, top_k, top_p, generator=shared)
    else:
        tokens = logits.argmax(dim=-1)
    for row, p, gen in rows:
        if p.temperature > 0 and gen is not None:
            top_k, top_p = p.top_k or None, p.top_p if p.top_p < 1 else None
            one = logits[row : row + 1]
            tokens[row] = sample_next(one, temperature=p.temperature, top_k=top_k, top_p=top_p, generator=gen)[0]
    return tokens


def to_device(values, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the work queued there: an asynchronous copy
    (``torch.tensor(values, device=cuda)`` copies synchronously, after everything queued before it)."""
    return torch.tensor(values).to(device, non_blocking=True)


def logprob_tensors(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Log-softmax of the raw logits (B, V) (before any temperature; fp32 or wider): the chosen tokens' values
    (B,) and the k largest values and their ids (B, k)."""
    logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None].to(logits.device)).squeeze(-1)
    if k == 0:
        empty = logprobs.new_empty(logprobs.shape[0], 0)
        return chosen, empty, empty.long()
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return chosen, top.values, top.indices


def token_infos(logits: torch.Tensor, tokens: list[int], k: int | None) -> list[TokenInfo]:
    """The :class:`TokenInfo` of ``tokens`` at the positions of ``logits`` (one row each); waits for the
    device. ``k`` None: ids only."""
    if k is None or not tokens:
        return [TokenInfo(t) for t in tokens]
    chosen, values, ids = (t.tolist() for t in logprob_tensors(logits, torch.tensor(tokens), k))
    return [
        TokenInfo(t, c, tuple(zip(i, v, strict=True))) for t, c, i, v in zip(tokens, chosen, ids, values, strict=True)
    ]
