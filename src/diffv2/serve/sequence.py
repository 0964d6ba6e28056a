"""What the scheduler serves: a sequence (one prompt of one request), its sampling settings, what it hands back
per token, and the events the scheduler reports (metrics and tests watch them)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off. ``seed`` gives the sequence a random
    generator of its own, so what it samples does not depend on what else is in the batch. ``logprobs``: the
    number of most likely alternatives reported per token (None: no log-probabilities); ``prompt_logprobs``
    reports them for the prompt's tokens too. A token in ``stop_ids`` (end of text) ends the sequence."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False
    stop_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ConfigError(f"max_tokens={self.max_tokens}: must be >= 0 (0: the prompt only, e.g. to score it)")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(
                f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}: need temperature >= 0, "
                "top_k >= 0 (0 = off) and 0 < top_p <= 1"
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise ConfigError(f"logprobs={self.logprobs}: must be >= 0")


@dataclass(frozen=True)
class TokenInfo:
    """One token and, when asked for, its log-probability under the model and the ``logprobs`` most likely
    tokens at its position as (id, log-probability) pairs."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] | None = None


class Consumer(Protocol):
    """Receives a sequence's output, on the scheduler's thread; must not block."""

    def prompt(self, tokens: list[TokenInfo]) -> None:
        """The prompt's tokens with their log-probabilities (the first has none), when asked for."""

    def token(self, info: TokenInfo) -> bool:
        """A generated token (not an end-of-text one); True ends the sequence (a stop string appeared)."""

    def finish(self, reason: str) -> None:
        """The end: "stop" (end of text or a stop string), "length" (max_tokens) or "cancelled"."""

    def fail(self, message: str) -> None:
        """The scheduler could not finish the sequence (an internal error, already logged)."""


_ids = itertools.count()

WAITING, PREFILL, DECODE, DONE = "waiting", "prefill", "decode", "done"


@dataclass(eq=False)
class Sequence:
    """One prompt on its way through the scheduler. The fields below ``consumer`` are the scheduler's."""

    prompt: list[int]
    params: SamplingParams
    consumer: Consumer
    id: int = field(default_factory=lambda: next(_ids))
    state: str = WAITING
    row: int | None = None
    prefilled: int = 0  # prompt tokens in the cache
    generated: int = 0  # tokens handed back (an end-of-text token included)
    launched: int = 0  # tokens sampled, including those of a step still on the device
    cancelled: bool = False
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.perf_counter)
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ConfigError("prompt: empty; give at least one token")

    @property
    def next_slot(self) -> int:
        """The cache slot of the token the next decode step feeds: the last one sampled."""
        return len(self.prompt) + self.launched - 1


@dataclass(frozen=True)
class SchedulerEvent:
    """``kind``: "queued", "admitted", "first_token", "step" (a decode step launched), "step_done" (its tokens
    handed out), "cancel" (asked for, by the client's side) or "finished". ``step`` counts the decode steps
    launched so far; ``running`` the rows in use and ``waiting`` the queue after the event. "step" has the
    step's row count (``rows``, the bucket) and how many rows took part (``active``); "step_done" the gaps in
    seconds between each token handed out and its sequence's previous one (``gaps``); "first_token" the wait
    since arrival (``ttft``); "finished" the ``reason``. Events reach observers before the client sees what
    they describe."""

    kind: str
    step: int
    running: int
    waiting: int
    seq: Sequence | None = None
    rows: int = 0
    active: int = 0
    gaps: tuple[float, ...] = ()
    ttft: float | None = None
    reason: str | None = None
