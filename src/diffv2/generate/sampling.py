"""Sampling from a :class:`~diffv2.Transformer` with a KV cache: greedy, temperature, top-k, top-p, EOS."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..model import Transformer
from .cache import new_caches


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). ``temperature`` 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one by one (streaming) for one prompt; stops at ``eos_id`` or ``max_new_tokens``."""
    if not prompt:
        raise ValueError("prompt: give at least one token")
    device = next(model.parameters()).device
    limit = model.cfg.max_seq_len
    if len(prompt) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={limit}")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    caches = new_caches(model)
    tokens = torch.tensor([prompt], device=device)
    positions = torch.arange(len(prompt), device=device)[None]
    for _ in range(max_new_tokens):
        logits = model(tokens, positions=positions, caches=caches)[:, -1]
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        token = int(nxt.item())
        yield token
        if token == eos_id:
            return
        tokens, positions = nxt[:, None], positions[:, -1:] + 1
