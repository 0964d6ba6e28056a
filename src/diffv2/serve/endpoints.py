"""The two generation endpoints, ``/v1/completions`` and ``/v1/chat/completions``: request → sequences for the
scheduler → a JSON response or a stream of server-sent events. A client that goes away cancels its sequences
(their rows are freed before the next decode step)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import ConfigError
from ..generate.text import TextCodec
from .outputs import Choice, ChoiceConsumer, Formatter, RequestOutputs
from .protocol import ApiError, ChatRequest, CompletionRequest
from .scheduler import QueueFull, Scheduler, SchedulerDown
from .sequence import SamplingParams, Sequence


class Endpoints:
    def __init__(self, scheduler: Scheduler, codec: TextCodec | None, model_name: str) -> None:
        self.scheduler, self.codec, self.model_name = scheduler, codec, model_name
        self.fmt = Formatter(codec)

    # ------------------------------------------------------------------ /v1/completions
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        raw = body.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise ApiError(400, "prompt: empty; give a string, token ids, or a list of them", param="prompt")
        prompts, texts = [], []
        for i, p in enumerate(raw):
            name = "prompt" if len(raw) == 1 else f"prompt[{i}]"
            ids = self._check_ids(self._encode(p, name) if isinstance(p, str) else list(p), name)
            prompts.append(ids)
            texts.append(p if isinstance(p, str) else self.codec.decode(ids) if self.codec is not None else "")
        scoring = body.echo and body.logprobs is not None
        sampling = [self._params(body, self._max_new(p, body.max_tokens), body.logprobs, scoring) for p in prompts]
        outputs = RequestOutputs(asyncio.get_running_loop())
        choices = self._submit(outputs, prompts, sampling, body.stop_list, texts if body.echo else [""] * len(prompts))
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }

        def choice_body(i: int, text: str, tokens: list, finish: str | None, ids: list[int]) -> dict[str, Any]:
            logprobs = self.fmt.completion_logprobs(tokens) if body.logprobs is not None else None
            out = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
            if body.return_token_ids:
                out["token_ids"] = ids
            return out

        if body.stream:

            def chunk(i: int, kind: str, payload: Any, choice: Choice) -> dict[str, Any]:
                text = choice.add(kind, payload)
                info = payload[1] if kind == "token" else None
                scored = [info] if info is not None and info.logprob is not None else []
                tokens = payload if kind == "prompt" else scored
                ids = [info.id] if info is not None else []
                return {**head, "choices": [choice_body(i, text, tokens, choice.finish_reason, ids)]}

            # the echoed prompt's text first; its log-probabilities follow in a chunk of their own
            first = [{**head, "choices": [choice_body(i, c.prefix, [], None, [])]} for i, c in enumerate(choices)]
            return self._stream(request, outputs, choices, first if body.echo else [], chunk, head, body.include_usage)
        await self._gather(request, outputs, choices)
        bodies = [
            choice_body(i, c.prefix + "".join(c.text), c.tokens, c.finish_reason, c.ids) for i, c in enumerate(choices)
        ]
        return JSONResponse({**head, "choices": bodies, "usage": self.fmt.usage(choices)})

    # ------------------------------------------------------------------ /v1/chat/completions
    async def chat(self, body: ChatRequest, request: Request) -> Response:
        self._check_model(body.model)
        if self.codec is None:
            raise ApiError(
                400,
                "messages: this server has no tokenizer, hence no chat; send token ids to /v1/completions",
                param="messages",
            )
        try:
            prompt = self.codec.chat_prompt([{"role": m.role, "content": m.text} for m in body.messages])
        except ConfigError as err:
            raise ApiError(400, str(err), param="messages") from None
        prompt = self._check_ids(prompt, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        sampling = self._params(body, self._max_new(prompt, body.max_new), logprobs)
        outputs = RequestOutputs(asyncio.get_running_loop())
        choices = self._submit(outputs, [prompt], [sampling], body.stop_list, [""])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def extras(out: dict[str, Any], tokens: list, ids: list[int]) -> dict[str, Any]:
            out["logprobs"] = self.fmt.chat_logprobs(tokens) if logprobs is not None and tokens else None
            if body.return_token_ids:
                out["token_ids"] = ids
            return out

        if body.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}

            def chunk(i: int, kind: str, payload: Any, choice: Choice) -> dict[str, Any]:
                text = choice.add(kind, payload)
                info = payload[1] if kind == "token" else None
                delta = {"content": text} if kind == "token" or text else {}
                out = {"index": i, "delta": delta, "finish_reason": choice.finish_reason}
                tokens = [info] if info is not None and info.logprob is not None else []
                return {**head, "choices": [extras(out, tokens, [info.id] if info is not None else [])]}

            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
            first = [{**head, "choices": [role]}]
            return self._stream(request, outputs, choices, first, chunk, head, body.include_usage)
        await self._gather(request, outputs, choices)
        c = choices[0]
        message = {"role": "assistant", "content": "".join(c.text)}
        out = extras({"index": 0, "message": message, "finish_reason": c.finish_reason}, c.tokens, c.ids)
        head = {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name}
        return JSONResponse({**head, "choices": [out], "usage": self.fmt.usage(choices)})

    # ------------------------------------------------------------------ checks shared by both
    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(
                404,
                f"model '{name}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
                kind="not_found_error",
            )

    def _encode(self, text: str, param: str) -> list[int]:
        if self.codec is None:
            raise ApiError(400, f"{param}: this server has no tokenizer; send token ids", param=param)
        return self.codec.encode(text)

    def _check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ApiError(400, f"{param}: empty; give at least one token", param=param)
        vocab = self.scheduler.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"{param}: token ids must lie in [0, {vocab})", param=param)
        return ids

    def _max_new(self, prompt: list[int], asked: int | None) -> int:
        """``max_tokens``, by default all the room the context leaves; the prompt plus at least one token must
        fit (a prompt scored with ``max_tokens`` 0 included)."""
        limit = self.scheduler.max_len
        asked = limit - len(prompt) if asked is None else asked
        if len(prompt) + max(asked, 1) > limit:
            raise ApiError(
                400,
                f"max_tokens: the prompt ({len(prompt)} tokens) plus {max(asked, 1)} new tokens "
                f"exceed the model's context of {limit} tokens",
                param="max_tokens",
            )
        return asked

    def _params(self, body, max_tokens: int, logprobs: int | None, prompt_logprobs: bool = False) -> SamplingParams:
        eos = self.codec.eos_id if self.codec is not None else None
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k_value,
            top_p=body.top_p,
            seed=body.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            stop_ids=frozenset() if eos is None else frozenset([eos]),
        )

    def _submit(
        self,
        outputs: RequestOutputs,
        prompts: list[list[int]],
        sampling: list[SamplingParams],
        stop: list[str],
        prefixes: list[str],
    ) -> list[Choice]:
        if len(prompts) > self.scheduler.max_queue:
            raise ApiError(400, f"prompt: at most {self.scheduler.max_queue} prompts in one request", param="prompt")
        choices = [
            Choice(Sequence(p, s, ChoiceConsumer(outputs, i, self.codec, stop)), prefix)
            for i, (p, s, prefix) in enumerate(zip(prompts, sampling, prefixes, strict=True))
        ]
        try:
            self.scheduler.submit([c.seq for c in choices])
        except QueueFull as err:
            raise ApiError(
                429,
                f"server busy: {err}; retry shortly",
                code="rate_limit_exceeded",
                kind="rate_limit_error",
                headers={"Retry-After": "1"},
            ) from None
        except SchedulerDown as err:
            raise ApiError(503, str(err), kind="server_error") from None
        return choices

    # ------------------------------------------------------------------ delivery
    async def _gather(self, request: Request, outputs: RequestOutputs, choices: list[Choice]) -> None:
        """Wait for every choice to finish (or the client to leave)."""
        watch = asyncio.create_task(self._watch_disconnect(request, choices))
        try:
            async for index, kind, payload in _items(outputs, choices):
                choices[index].add(kind, payload)
        finally:
            watch.cancel()
            self._cancel(choices)

    def _stream(
        self,
        request: Request,
        outputs: RequestOutputs,
        choices: list[Choice],
        first: list[dict],
        chunk: Callable,
        head: dict,
        include_usage: bool,
    ) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            watch = asyncio.create_task(self._watch_disconnect(request, choices))
            try:
                for item in first:
                    yield _data(item)
                async for index, kind, payload in _items(outputs, choices):
                    yield _data(chunk(index, kind, payload, choices[index]))
                if include_usage:
                    yield _data({**head, "choices": [], "usage": self.fmt.usage(choices)})
            except ApiError as err:
                yield _data(err.body)
            finally:
                watch.cancel()
                self._cancel(choices)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _watch_disconnect(self, request: Request, choices: list[Choice]) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self._cancel(choices)

    def _cancel(self, choices: list[Choice]) -> None:
        for c in choices:  # a no-op for a finished sequence
            self.scheduler.cancel(c.seq)


async def _items(outputs: RequestOutputs, choices: list[Choice]) -> AsyncIterator[tuple[int, str, Any]]:
    """The request's queue items until every choice has finished; an "error" item raises."""
    open_choices = len(choices)
    while open_choices:
        index, kind, payload = await outputs.queue.get()
        if kind == "error":
            raise ApiError(500, payload, kind="server_error")
        open_choices -= kind == "finish"
        yield index, kind, payload


def _data(item: dict[str, Any]) -> str:
    return f"data: {json.dumps(item, separators=(',', ':'))}\n\n"
