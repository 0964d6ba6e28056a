"""From the scheduler's tokens to OpenAI response bodies: one consumer per choice feeds the request's asyncio
queue from the scheduler's thread; the request's coroutine gathers the items into choices and formats them as
a whole response or as stream chunks."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from ..generate.text import TextCodec, TextStream
from .sequence import Sequence, TokenInfo


class _Mailbox:
    """Items from the scheduler's thread to the queues of one event loop, handed over in batches: a decode step
    yields a token for every running request, and one wake-up of the loop per step instead of one per token
    keeps the loop (and its hold on the interpreter lock, which the scheduler's thread needs) short."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.items = loop, collections.deque()
        self.lock, self.scheduled = threading.Lock(), False

    def put(self, queue: asyncio.Queue, item: tuple) -> None:
        self.items.append((queue, item))
        with self.lock:
            if self.scheduled:  # a drain is on its way and will take this item too
                return
            self.scheduled = True
        # the event loop may have closed (the server is shutting down): then nobody is listening
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            self.scheduled = False  # items appended from here on schedule the next drain
        while self.items:
            queue, item = self.items.popleft()
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()


class RequestOutputs:
    """The asyncio side of one request: items ``(choice index, kind, payload)`` arrive on :attr:`queue`, in
    the order :meth:`put` was called. Built on the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self._mailbox = _mailboxes.get(loop) or _mailboxes.setdefault(loop, _Mailbox(loop))

    def put(self, item: tuple) -> None:
        self._mailbox.put(self.queue, item)


class ChoiceConsumer:
    """A :class:`~diffv2.serve.sequence.Consumer` for one choice: detokenizes and watches stop strings on the
    scheduler's thread (so a stop string frees the row at once), and queues what the client will see."""

    def __init__(self, outputs: RequestOutputs, index: int, codec: TextCodec | None, stop: list[str]) -> None:
        self.outputs, self.index = outputs, index
        self.text = TextStream(codec, stop) if codec is not None else None

    def prompt(self, tokens: list[TokenInfo]) -> None:
        self.outputs.put((self.index, "prompt", tokens))

    def token(self, info: TokenInfo) -> bool:
        text = self.text.push(info.id) if self.text is not None else ""
        self.outputs.put((self.index, "token", (text, info)))
        return self.text is not None and self.text.stopped

    def finish(self, reason: str) -> None:
        tail = self.text.flush() if self.text is not None else ""
        self.outputs.put((self.index, "finish", (tail, reason)))

    def fail(self, message: str) -> None:
        self.outputs.put((self.index, "error", message))


@dataclass
class Choice:
    """One choice as it accumulates on the request's side."""

    seq: Sequence
    prefix: str = ""  # the prompt's text, with echo
    text: list[str] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)  # the logprob entries (echoed prompt first)
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, kind: str, payload: Any) -> str:
        """Take one queue item; returns the new text."""
        if kind == "prompt":
            self.tokens.extend(payload)
            return ""
        if kind == "token":
            text, info = payload
            self.ids.append(info.id)
            if info.logprob is not None:
                self.tokens.append(info)
        else:  # finish
            text, self.finish_reason = payload
        self.text.append(text)
        return text


class Formatter:
    """Log-probabilities and usage in OpenAI's shapes; token strings come from the tokenizer, or are
    ``token_id:N`` without one."""

    def __init__(self, codec: TextCodec | None) -> None:
        self.codec = codec

    def token_text(self, token: int) -> str:
        return self.codec.token_text(token) if self.codec is not None else f"token_id:{token}"

    def completion_logprobs(self, tokens: list[TokenInfo], offset: int = 0) -> dict[str, Any]:
        """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; a token without context (the
        prompt's first) has null log-probabilities."""
        texts = [self.token_text(t.id) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        tops = [None if t.top is None else self._top(t) for t in tokens]
        return {
            "tokens": texts,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _top(self, info: TokenInfo) -> dict[str, float]:
        top: dict[str, float] = {}
        for token, logprob in (*info.top, (info.id, info.logprob)):
            # tokens that read the same (bytes of an unfinished character) share a key: the likeliest keeps it;
            # the chosen token is always listed
            top.setdefault(self.token_text(token), logprob)
        return top

    def chat_logprobs(self, tokens: list[TokenInfo]) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top or ()]} for t in tokens
            ]
        }

    @staticmethod
    def usage(choices: list[Choice]) -> dict[str, int]:
        prompt = sum(len(c.seq.prompt) for c in choices)
        completion = sum(c.seq.generated for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
