"""Perplexity of a model on any text: the text's tokens scored in overlapping windows of the model's context,
each token once, with as much preceding context as a window allows (at least ``window - stride`` tokens for
all but the first window's tokens)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..model import Transformer


@torch.no_grad()
def token_losses(model: Transformer, ids: list[int], window: int, stride: int) -> torch.Tensor:
    """The negative log-likelihood (nats, float64) of every token of ``ids`` after the first, given the tokens
    before it within a ``window``-token context; windows start every ``stride`` tokens."""
    if not 1 <= stride <= window - 1:
        raise ConfigError(f"stride={stride}: must lie in [1, window - 1 = {window - 1}]")
    if window > model.cfg.max_seq_len:
        raise ConfigError(f"window={window}: the model's context is max_seq_len={model.cfg.max_seq_len}")
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, device=device)
    out = torch.empty(max(0, len(ids) - 1), dtype=torch.float64)
    scored = 1  # tokens[0] has no context: it is never scored
    begin = 0
    while scored < len(ids):
        end = min(begin + window, len(ids))
        logits = model(tokens[None, begin : end - 1])[0].float()
        losses = F.cross_entropy(logits, tokens[begin + 1 : end], reduction="none").double().cpu()
        new = end - scored  # targets at positions scored..end-1 are the last `new` of this window
        out[scored - 1 : end - 1] = losses[-new:]
        scored = end
        begin += stride
    return out


def perplexity(model: Transformer, ids: list[int], n_bytes: int, *, window: int, stride: int) -> dict[str, Any]:
    """Mean loss per token, perplexity, and bits per byte (comparable across tokenizers) of one text."""
    model.eval()
    losses = token_losses(model, ids, window, stride)
    if losses.numel() == 0:
        raise ConfigError("the text encodes to fewer than 2 tokens: nothing to score")
    total = float(losses.sum())
    return {
        "tokens_scored": int(losses.numel()),
        "loss": total / losses.numel(),
        "perplexity": math.exp(min(total / losses.numel(), 50.0)),
        "bits_per_byte": total / math.log(2) / max(1, n_bytes),
        "window": window,
        "stride": stride,
    }
