"""Generation with a KV cache: batched prompts of different lengths (left padding), greedy / temperature /
top-k / top-p sampling, stop tokens, streaming."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..config import MAX_SEED, check_int, check_number
from ..errors import ConfigError
from ..model import Transformer
from .cache import KVCache, check_kv_dtype
from .fusion import fused_projections
from .step import DecodeStep

# Temperatures below this decode greedily (argmax). Sampling at such a temperature differs from argmax only where
# logits lie within ~1e-4 of the largest, and much lower ones overflow float32 when the logits are divided by them.
GREEDY_BELOW = 1e-5


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). ``temperature`` 0 (or below :data:`GREEDY_BELOW`)
    means greedy."""
    if temperature < GREEDY_BELOW:
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
        drop[..., 0] = False  # the most likely token always stays, however small top_p is (1e-300 is 0 in fp32)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`sample_next` with settings of each row's own, in one pass over the batch: ``temperature`` (B,)
    (0 = greedy), ``top_k`` (B,) integers (0 = off), ``top_p`` (B,) (1 = off), all on the logits' device. Each
    row is drawn from the distribution :func:`sample_next` would draw it from (the random draws differ: one
    generator serves the whole batch)."""
    vocab = logits.shape[-1]
    sampled = temperature >= GREEDY_BELOW
    scaled = logits.float() / torch.where(sampled, temperature, 1.0).float()[:, None]
    ranked, order = torch.sort(scaled, dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    kth = ranked.gather(-1, (k - 1)[:, None])  # ties with the k-th logit stay in, as in sample_next
    ranked = ranked.masked_fill(ranked < kth, float("-inf"))
    probs = torch.softmax(ranked, dim=-1)
    drop = (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p < 1)[:, None]
    drop[:, 0] = False  # as in sample_next: the most likely token always stays
    probs = torch.softmax(ranked.masked_fill(drop, float("-inf")), dim=-1)
    drawn = order.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)
    return torch.where(sampled, drawn, logits.argmax(dim=-1))


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
    static: bool | None = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
    kv_cache_dtype: str = "auto",
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of every prompt (``None`` once that prompt has hit ``eos_id``).

    Prompts are left-padded to a common length: each row gets its own RoPE positions (0 at its first real
    token) and a key window that hides the padding, so a padded row computes exactly what it would alone.

    ``static`` (default: on CUDA or with ``compile``) decodes against the cache's whole pre-allocated buffer so
    every step has the same shapes; ``cuda_graph`` (default: ``static`` on CUDA) then replays each step from one
    CUDA graph, and ``compile`` runs it through ``torch.compile``. Without ``static`` the cache grows (the CPU
    default). ``kv_cache_dtype="int8"`` stores the cache as int8 with a scale per cached vector (about half the
    bytes of bf16; docs/design.md#kv-cache), ``"auto"`` in the model's dtype. The
    loop never waits for the GPU except to read tokens: step i+1 is queued before step i's tokens are read.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("prompts: give at least one prompt, each with at least one token")
    cfg = model.cfg
    width = max(map(len, prompts))
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    if width + max_new_tokens > cfg.max_seq_len:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens}: the prompt ({width} tokens) plus the new tokens exceed the model's "
            f"max_seq_len={cfg.max_seq_len}; ask for fewer new tokens or shorten the prompt"
        )
    if bad := [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]:
        raise ConfigError(f"prompts: token id {bad[0]} is outside the model's vocabulary of {cfg.vocab_size}")
    check_number("temperature", temperature, positive=False)  # 0 = greedy
    if top_k is not None:
        check_int("top_k", top_k, minimum=1)
    if top_p is not None and not 0 < check_number("top_p", top_p, positive=True) <= 1:
        raise ConfigError(f"top_p={top_p}: must lie in (0, 1]")
    if seed is not None:
        check_int("seed", seed, maximum=MAX_SEED)
    check_kv_dtype("kv_cache_dtype", kv_cache_dtype)
    device = next(model.parameters()).device
    static = (device.type == "cuda" or compile) if static is None else static
    if compile and not static:
        raise ConfigError("compile=True compiles the fixed-shape decode step: it needs static=True (or unset)")
    cuda_graph = static and device.type == "cuda" if cuda_graph is None else cuda_graph
    if cuda_graph and not (static and device.type == "cuda"):
        raise ConfigError(f"cuda_graph=True: needs static=True and a model on a CUDA device (it is on {device})")
    # the checks above run now, not at the first token: a caller that prints before iterating sees them first
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, kv_cache_dtype=kv_cache_dtype)
    return _stream(model, prompts, max_new_tokens, eos_id, sampling, static, cuda_graph, compile)


@torch.no_grad()
def _stream(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int | None,
    sampling: dict,
    static: bool,
    cuda_graph: bool,
    compile: bool,
) -> Iterator[list[int | None]]:
    temperature, top_k, top_p, seed = (sampling[k] for k in ("temperature", "top_k", "top_p", "seed"))
    cfg, device = model.cfg, next(model.parameters()).device
    width = max(map(len, prompts))
    with fused_projections(model):  # per layer one matmul for q/k/v(/λ), one for gate/up: fewer launches
        batch = len(prompts)
        start = torch.tensor([width - len(p) for p in prompts], device=device)  # first real slot per row
        tokens = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
        padding = start if any(len(p) < width for p in prompts) else None
        dtype, kv_dtype = next(model.parameters()).dtype, sampling["kv_cache_dtype"]
        cache = KVCache(cfg, batch, width + max_new_tokens, dtype=dtype, device=device, kv_dtype=kv_dtype)
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

        def sample(logits: torch.Tensor) -> torch.Tensor:
            return sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

        # prefill: the prompt in one forward over the cache's filled prefix
        slots = torch.arange(width, device=device)
        cache.advance(slots, width)
        positions = (slots[None, :] - start[:, None]).clamp(min=0)
        nxt = sample(model(tokens, positions=positions, mask=cache.window(padding), caches=cache.layers)[:, -1])
        if static:
            step = DecodeStep(model, cache, start, cuda_graph=cuda_graph, compile=compile)
        else:
            step = _GrowingStep(model, cache, start, padding)
        finished = [False] * batch
        for i in range(max_new_tokens):
            host = HostCopy(nxt)
            if i + 1 < max_new_tokens:
                following = sample(step(nxt, width + i))  # queued before this step's tokens are read
            values = host.get()
            yield [None if done else tok for tok, done in zip(values, finished, strict=True)]
            if eos_id is not None:
                finished = [done or tok == eos_id for tok, done in zip(values, finished, strict=True)]
                if all(finished):
                    return
            if i + 1 < max_new_tokens:
                nxt = following


class _GrowingStep:
    """The dynamic (CPU) decode step: the cache's filled prefix grows by one slot per step."""

    def __init__(self, model: Transformer, cache: KVCache, start: torch.Tensor, padding: torch.Tensor | None):
        self.model, self.cache, self.start, self.padding = model, cache, start, padding

    def __call__(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        slots = torch.full((1,), slot, device=tokens.device)
        self.cache.advance(slots, slot + 1)
        positions = (slots[None, :] - self.start[:, None]).clamp(min=0)
        window = self.cache.window(self.padding)
        return self.model(tokens[:, None], positions=positions, mask=window, caches=self.cache.layers)[:, -1]


class HostCopy:
    """A step's results (tokens) on their way to the host: an async copy into pinned memory, so reading them
    waits for that step only, not for the work queued after it."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.event = None
        if tokens.is_cuda:
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tokens

    def get(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


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
