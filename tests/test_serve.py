"""``diffv2 serve`` behaviour: a real uvicorn server (``tests/serving.py``) driven by the real ``openai`` client and
httpx. Batched results must equal solo ``generate_batch`` token for token; scheduler behaviour (admission mid-decode,
a freed row, a full queue) is asserted on the scheduler's events, with the scheduler's thread held at a decode step
where a test needs a request to arrive at a known moment."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from diffv2 import Transformer  # noqa: E402
from diffv2.data import Tokenizer  # noqa: E402
from diffv2.generate import generate_batch  # noqa: E402
from diffv2.serve import BackgroundServer, Scheduler, TextCodec, TextStream, create_app, plain_chat_text  # noqa: E402

from .models import kernel_sized  # noqa: E402
from .serving import MAX_BATCH, MAX_QUEUE, MODEL, Gate, ids_of, random_prompt, solo, stream_all  # noqa: E402


# ---------------------------------------------------------------------- results equal the offline path
def test_greedy_completions_equal_generate_batch(server):
    gen = torch.Generator().manual_seed(1)
    prompts = [random_prompt(gen, 1, 40) for _ in range(3)]
    out = server.client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=20, temperature=0, extra_body={"return_token_ids": True}
    )
    for prompt, choice in zip(prompts, out.choices, strict=True):
        want = solo(server.model, prompt, 20, temperature=0)
        assert ids_of(choice) == want
        assert choice.text == Tokenizer.byte_level().decode(want)
        assert choice.finish_reason == ("length" if len(want) == 20 else "stop")
    assert out.usage.prompt_tokens == sum(map(len, prompts))
    # a text prompt is the byte tokenizer's encoding of it
    text = server.client.completions.create(
        model=MODEL, prompt="Hello, world", max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
    )
    assert ids_of(text.choices[0]) == solo(server.model, list(b"Hello, world"), 12, temperature=0)


def test_echo_and_logprobs_equal_the_models_log_softmax(server):
    gen = torch.Generator().manual_seed(2)
    prompt = random_prompt(gen, 35, 45)  # prefilled in chunks of 16
    out = server.client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=3,
        temperature=0,
        echo=True,
        logprobs=4,
        extra_body={"return_token_ids": True},
    )
    choice = out.choices[0]
    generated = ids_of(choice)
    seq = torch.tensor(prompt + generated)
    with torch.no_grad():
        logprobs = torch.log_softmax(server.model(seq[None])[0], dim=-1)
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(seq) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = logprobs[torch.arange(len(seq) - 1), seq[1:]]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:], dtype=torch.float64), want, rtol=0, atol=1e-9)
    for position, top in enumerate(lp.top_logprobs[1:]):
        best = logprobs[position].topk(4).values
        assert max(top.values()) == pytest.approx(best[0].item(), abs=1e-9)
        assert all(any(abs(v - b) < 1e-9 for b in [*best.tolist(), want[position].item()]) for v in top.values())
    assert choice.text == Tokenizer.byte_level().decode(prompt + generated)
    assert generated == solo(server.model, prompt, 3, temperature=0)
    # scoring only: max_tokens 0 with echo gives the prompt's log-probabilities and generates nothing
    scored = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    scores = scored.choices[0].logprobs.token_logprobs
    assert scores[0] is None and scores[1:] == pytest.approx(lp.token_logprobs[1 : len(prompt)], abs=1e-12)
    assert scored.usage.completion_tokens == 0
    echoed = server.client.completions.create(model=MODEL, prompt="Amen.", max_tokens=0, echo=True)
    assert echoed.choices[0].text == "Amen." and echoed.usage.completion_tokens == 0


def test_concurrent_streams_each_equal_their_solo_result(server, observe):
    """16 streaming requests, 8 rows: the later ones wait, then join a running batch as rows free up."""
    gen = torch.Generator().manual_seed(3)
    settings = [
        dict(temperature=0),
        dict(temperature=0.8, seed=11),
        dict(temperature=1.0, top_k=5, seed=12),
        dict(temperature=1.2, top_p=0.7, seed=13),
    ]
    requests = []
    for i in range(16):
        prompt = random_prompt(gen, 1, 30)
        requests.append((prompt, int(torch.randint(1, 64 - len(prompt), (1,), generator=gen)), settings[i % 4]))
    log: list = []
    observe(log.append)
    results = stream_all(server.url, requests)
    for (prompt, n, sampling), (ids, text) in zip(requests, results, strict=True):
        assert ids == solo(server.model, prompt, n, **sampling), sampling
        assert text == Tokenizer.byte_level().decode(ids)
    steps = [e for e in log if e.kind == "step"]
    assert max(e.active for e in steps) == MAX_BATCH  # the batch filled up
    first_finish = next(i for i, e in enumerate(log) if e.kind == "finished")
    late = [e for e in log[first_finish:] if e.kind == "admitted"]
    assert late and all(e.running >= 2 for e in late[:1])  # queued requests took freed rows beside running ones


def test_a_request_arriving_mid_decode_joins_the_running_batch(server, observe):
    gen = torch.Generator().manual_seed(4)
    first, second = random_prompt(gen, 5, 10), random_prompt(gen, 5, 10)
    log: list = []
    observe(log.append)
    gate = observe(Gate(lambda e: e.kind == "queued" and e.seq.prompt == second))
    results = {}

    def ask(name, prompt, n):
        out = server.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=n, temperature=0, extra_body={"return_token_ids": True}
        )
        results[name] = ids_of(out.choices[0])

    a = threading.Thread(target=ask, args=("first", first, 40))
    a.start()
    assert gate.held.wait(20)  # the first request is decoding; its first step is being launched
    ask("second", second, 6)
    a.join(30)
    mine = {
        e.seq.id: name
        for e in log
        if e.kind == "admitted"
        for name, p in (("first", first), ("second", second))
        if e.seq.prompt == p
    }
    admitted = {mine[e.seq.id]: e for e in log if e.kind == "admitted"}
    finished = {mine[e.seq.id]: e for e in log if e.kind == "finished" and e.seq.id in mine}
    assert admitted["second"].step > admitted["first"].step  # it came while the first was decoding
    assert admitted["second"].running == 2 and finished["first"].step > admitted["second"].step
    assert any(e.kind == "step" and e.active == 2 for e in log)  # one decode step served both
    assert results["first"] == solo(server.model, first, 40, temperature=0)
    assert results["second"] == solo(server.model, second, 6, temperature=0)


def test_a_client_that_disconnects_frees_its_row(server, observe):
    log: list = []
    observe(log.append)
    observe(Gate(lambda e: e.kind == "cancel"))  # hold the batch until the server has seen the disconnect
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 50, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    for _ in range(200):  # the cancellation lands on the scheduler's next turn
        done = [e for e in log if e.kind == "finished"]
        if done:
            break
        threading.Event().wait(0.05)
    assert done and done[0].reason == "cancelled" and done[0].seq.generated < 50
    assert done[0].running == 0 and server.scheduler.running == 0


def test_a_full_queue_answers_429(server, observe):
    gate = observe(Gate(lambda e: False))
    full = threading.Event()
    observe(lambda e: full.set() if e.kind == "queued" and e.waiting == MAX_QUEUE else None)
    threads = [
        threading.Thread(
            target=server.client.completions.create,
            kwargs=dict(model=MODEL, prompt=[5, 6], max_tokens=3, temperature=0),
        )
    ]
    threads[0].start()
    assert gate.held.wait(20)  # one sequence decoding, the scheduler held
    queued = [[i, i + 1] for i in range(MAX_QUEUE)]
    threads.append(
        threading.Thread(target=server.client.completions.create, kwargs=dict(model=MODEL, prompt=queued, max_tokens=1))
    )
    threads[1].start()
    assert full.wait(20)
    response = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 1})
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):
        server.client.completions.create(model=MODEL, prompt=[1], max_tokens=1)
    gate.opened.set()
    for t in threads:
        t.join(30)
    assert server.scheduler.waiting == 0


# ---------------------------------------------------------------------- chat, stop strings, text
def test_chat_uses_the_plain_template_and_streams_what_it_returns(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = list(plain_chat_text(messages).encode())
    assert plain_chat_text(messages) == "System: Be brief.\n\nUser: Hi there\n\nAssistant:"
    out = server.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body={"return_token_ids": True}
    )
    want = solo(server.model, prompt, 10, temperature=0)
    assert ids_of(out.choices[0]) == want and out.usage.prompt_tokens == len(prompt)
    assert out.choices[0].message.role == "assistant"
    stream = server.client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_stop_strings_end_the_text_before_them(server):
    prompt = list(b"The quick brown fox")
    full = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    k = next(i for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2] and full[i : i + 2] not in full[:i])
    stop = full[k : k + 2]
    out = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "@@"])
    assert out.choices[0].text == full[:k] and out.choices[0].finish_reason == "stop"
    streamed = server.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == full[:k]


def test_text_stream_waits_for_whole_characters_and_possible_stop_strings():
    codec = TextCodec(Tokenizer.byte_level())
    ids = list("naïve ☃ done".encode())
    stream = TextStream(codec)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) + stream.flush() == "naïve ☃ done"
    assert "\ufffd" not in "".join(pieces) and pieces[ids.index(0xC3)] == ""  # the first byte of ï waits
    stop = TextStream(codec, stop=["☃ d"])
    pieces = [stop.push(t) for t in ids]
    assert "".join(pieces) == "naïve " and stop.stopped and stop.flush() == ""
    held = TextStream(codec, stop=["vex"])  # "ve" might begin "vex": held until "vey" rules it out
    assert [held.push(t) for t in b"ave"] == ["a", "", ""] and held.push(ord("y")) == "vey"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["baseline", "diff_v1", "diff_v2"])
def test_gpu_served_batches_equal_eager_generation(variant):
    """On CUDA every decode step replays a captured graph (the Triton window kernel, head_dim 64) while rows join
    and leave; in fp32 each greedy result equals the eager loop's for its prompt alone."""
    cfg = kernel_sized(vocab_size=300, max_seq_len=64, attention=variant)
    torch.manual_seed(7)
    model = Transformer(cfg).cuda().eval()
    gen = torch.Generator().manual_seed(8)
    requests = []
    for _ in range(16):
        prompt = random_prompt(gen, 1, 40)
        requests.append((prompt, int(torch.randint(1, 64 - len(prompt), (1,), generator=gen)), {"temperature": 0}))
    scheduler = Scheduler(model, max_batch=8, prefill_chunk=16).start()
    assert all(step.graph is not None for step in scheduler._decoder.steps.values())
    with BackgroundServer(create_app(scheduler, None, model_name=MODEL)) as srv:
        results = stream_all(srv.url, requests)
    scheduler.close()
    for (prompt, n, _), (ids, _) in zip(requests, results, strict=True):
        assert ids == generate_batch(model, [prompt], n, temperature=0, cuda_graph=False)[0]


# ---------------------------------------------------------------------- the scheduler thread → event loop hand-over
def test_outputs_reach_each_request_in_order_with_one_loop_wake_up_per_burst():
    """Items put from another thread while the loop is busy arrive in order per request, after one wake-up."""
    import asyncio

    from diffv2.serve.outputs import RequestOutputs

    async def main() -> tuple[list[list[tuple]], int, list[list[tuple]]]:
        loop = asyncio.get_running_loop()
        wake_ups = 0
        plain = loop.call_soon_threadsafe

        def counted(*args):
            nonlocal wake_ups
            wake_ups += 1
            return plain(*args)

        loop.call_soon_threadsafe = counted
        outputs = [RequestOutputs(loop) for _ in range(3)]
        sent = [[(i, "token", n) for n in torch.randperm(50).tolist()] for i in range(3)]

        def produce() -> None:
            for n in range(50):
                for i in range(3):
                    outputs[i].put(sent[i][n])

        producer = threading.Thread(target=produce)
        producer.start()
        producer.join()  # the loop is blocked meanwhile: every item waits for one drain
        got = [[await o.queue.get() for _ in range(50)] for o in outputs]
        assert all(o.queue.empty() for o in outputs)
        return got, wake_ups, sent

    got, wake_ups, sent = asyncio.run(main())
    assert got == sent
    assert wake_ups == 1
