"""Shared by the server tests: a real uvicorn server on a free port (in a thread) over a float64 tiny model with
the byte tokenizer, observers of the scheduler's events, and what ``generate_batch`` gives a prompt alone."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import openai
import torch

from diffv2 import ModelConfig, Transformer
from diffv2.data import Tokenizer
from diffv2.generate import generate_batch
from diffv2.serve import BackgroundServer, Scheduler, TextCodec, create_app

MODEL = "tiny-v2"
EOS = 256  # the byte tokenizer's end of text
MAX_BATCH, MAX_QUEUE = 8, 24


def tiny_model(seed: int = 0) -> Transformer:
    cfg = ModelConfig(
        vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=128, max_seq_len=64
    )
    torch.manual_seed(seed)
    return Transformer(cfg).double().eval()  # float64: batched and solo runs agree to the last bit that matters


class Gate:
    """A scheduler observer that holds the scheduler's thread at its next decode step until an event matching
    ``release`` arrives (from any thread), so a test controls what happens while a batch is mid-decode."""

    def __init__(self, release) -> None:
        self.release, self.opened, self.held = release, threading.Event(), threading.Event()
        self.armed = True

    def __call__(self, event) -> None:
        if self.release(event):
            self.opened.set()
        if event.kind == "step" and self.armed:
            self.armed = False
            self.held.set()
            self.opened.wait(20)


@contextlib.contextmanager
def tiny_server():
    """The server of the ``server`` fixture (conftest.py): a started scheduler and uvicorn on a free port, with
    ``.model``, ``.scheduler``, ``.events`` (every scheduler event) and an ``openai`` ``.client``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tests' requests run concurrently; one thread each keeps a loaded CPU responsive
    model = tiny_model()
    scheduler = Scheduler(model, max_batch=MAX_BATCH, max_queue=MAX_QUEUE, prefill_chunk=16, seed=0).start()
    events: list = []
    scheduler.observers.append(events.append)
    app = create_app(scheduler, TextCodec(Tokenizer.byte_level()), model_name=MODEL)
    try:
        with BackgroundServer(app) as srv:
            srv.model, srv.scheduler, srv.events = model, scheduler, events
            srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
            yield srv
    finally:
        scheduler.close()
        torch.set_num_threads(threads)


def solo(model, prompt, n, **sampling) -> list[int]:
    """What generate_batch gives for this prompt alone, without the end-of-text token the server strips."""
    out = generate_batch(model, [prompt], n, eos_id=EOS, **sampling)[0]
    return out[:-1] if out and out[-1] == EOS else out


def random_prompt(gen: torch.Generator, low: int, high: int) -> list[int]:
    return torch.randint(0, 256, (int(torch.randint(low, high, (1,), generator=gen)),), generator=gen).tolist()


def ids_of(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def stream_all(url: str, requests: list[tuple[list[int], int, dict]]) -> list[tuple[list[int], str]]:
    """Send every (prompt, max_tokens, sampling) request at once, streaming; (token ids, text) of each."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    async def one(prompt, n, sampling):
        extra = {"return_token_ids": True, **({"top_k": sampling["top_k"]} if "top_k" in sampling else {})}
        args = {k: v for k, v in sampling.items() if k != "top_k"}
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=n, stream=True, extra_body=extra, **args
        )
        ids, text = [], []
        async for chunk in stream:
            ids += ids_of(chunk.choices[0])
            text.append(chunk.choices[0].text)
        return ids, "".join(text)

    async def run_all():
        return await asyncio.gather(*(one(*r) for r in requests))

    return asyncio.run(run_all())
