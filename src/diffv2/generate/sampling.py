"""Generation with a KV cache: batched prompts of different lengths (left padding), greedy / temperature /
top-k / top-p sampling, stop tokens, streaming."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import ConfigError
from ..model import Transformer
from .cache import KVCache


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
def stream_batch(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of every prompt (``None`` once that prompt has hit ``eos_id``).

    Prompts are left-padded to a common length: each row gets its own RoPE positions (0 at its first real
    token) and a mask that hides the padding, so a padded row computes exactly what it would alone.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("prompts: give at least one prompt, each with at least one token")
    cfg, device = model.cfg, next(model.parameters()).device
    width = max(map(len, prompts))
    if width + max_new_tokens > cfg.max_seq_len:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens}: the prompt ({width} tokens) plus the new tokens exceed the model's "
            f"max_seq_len={cfg.max_seq_len}; ask for fewer new tokens or shorten the prompt"
        )
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ConfigError(
            f"temperature={temperature}, top_k={top_k}, top_p={top_p}: need temperature >= 0 (0 = greedy), "
            "top_k >= 1 and 0 < top_p <= 1"
        )
    batch = len(prompts)
    start = torch.tensor([width - len(p) for p in prompts], device=device)  # first real slot per row
    tokens = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
    padding = start if bool((start > 0).any()) else None
    cache = KVCache(cfg, batch, width + max_new_tokens, dtype=next(model.parameters()).dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    slots = torch.arange(width, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        cache.advance(slots, int(slots[-1]) + 1)
        mask = cache.mask(padding)
        positions = (slots[None, :] - start[:, None]).clamp(min=0)
        logits = model(tokens, positions=positions, mask=mask, caches=cache.layers)[:, -1]
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield [None if done else tok for tok, done in zip(nxt.tolist(), finished.tolist(), strict=True)]
        if eos_id is not None:
            finished |= nxt == eos_id
            if bool(finished.all()):
                return
        tokens, slots = nxt[:, None], slots[-1:] + 1


def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, **kwargs) -> list[list[int]]:
    """New tokens for each prompt (up to and including ``eos_id``); kwargs as for :func:`stream_batch`."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream_batch(model, prompts, max_new_tokens, **kwargs):
        for row, tok in zip(out, step, strict=True):
            if tok is not None:
                row.append(tok)
    return out


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, **kwargs) -> Iterator[int]:
    """Stream the new tokens of one prompt; stops after ``eos_id`` (which is yielded) or ``max_new_tokens``."""
    for (tok,) in stream_batch(model, [prompt], max_new_tokens, **kwargs):
        if tok is None:
            return
        yield tok
