"""``diffv2 serve``: a real uvicorn server on a free port (in a thread) over a float64 tiny model, driven by the
real ``openai`` client and httpx. Batched results must equal solo ``generate_batch`` token for token; scheduler
behaviour (admission mid-decode, a freed row, a full queue) is asserted on the scheduler's events, with the
scheduler's thread held at a decode step where a test needs a request to arrive at a known moment."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from diffv2 import ModelConfig, Transformer  # noqa: E402
from diffv2.data import Tokenizer  # noqa: E402
from diffv2.generate import generate_batch  # noqa: E402
from diffv2.serve import BackgroundServer, Scheduler, TextCodec, TextStream, create_app, plain_chat_text  # noqa: E402

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


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tests' requests run concurrently; one thread each keeps a loaded CPU responsive
    model = tiny_model()
    scheduler = Scheduler(model, max_batch=MAX_BATCH, max_queue=MAX_QUEUE, prefill_chunk=16, seed=0).start()
    events: list = []
    scheduler.observers.append(events.append)
    app = create_app(scheduler, TextCodec(Tokenizer.byte_level()), model_name=MODEL)
    with BackgroundServer(app) as srv:
        srv.model, srv.scheduler, srv.events = model, scheduler, events
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        yield srv
    scheduler.close()
    torch.set_num_threads(threads)


@pytest.fixture
def observe(server):
    """Adds scheduler observers for one test."""
    added = []

    def add(observer):
        server.scheduler.observers.append(observer)
        added.append(observer)
        return observer

    yield add
    for observer in added:
        server.scheduler.observers.remove(observer)


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


# ---------------------------------------------------------------------- errors, auth, health, metrics
BAD_REQUESTS = [
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 2], []]}, 400, "prompt[1]"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2], "max_tokens": 63}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2], "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2], "max_tokens": 0}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 300]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_k": -5}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "frequency_penalty": 1}, 400, "frequency_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "bogus": 1}, 400, "bogus"),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", "{not json", 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70}]}, 400, "max_tokens"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_every_error_is_one_openai_json_error(server, path, body, status, param):
    raw = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param and error["message"].startswith(param.split(".")[0])
    assert httpx.get(server.url + "/v1/completions").status_code == 405


def test_internal_errors_and_a_failed_scheduler_give_clean_errors(server):
    class BrokenCodec(TextCodec):
        def encode(self, text):
            raise RuntimeError("boom: a bug in the tokenizer")

    app = create_app(server.scheduler, BrokenCodec(Tokenizer.byte_level()), model_name=MODEL)
    with BackgroundServer(app) as broken:
        response = httpx.post(broken.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert "boom" not in response.text and "Traceback" not in response.text

    model = tiny_model()

    def fail_at_decode(module, args):
        if args[0].shape[1] == 1:  # a decode step
            raise RuntimeError("device lost")

    model.register_forward_pre_hook(fail_at_decode)
    scheduler = Scheduler(model, max_batch=2).start()
    with BackgroundServer(create_app(scheduler, None, model_name=MODEL)) as dying:
        response = httpx.post(dying.url + "/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 5})
        assert response.status_code == 500 and "generation engine stopped" in response.json()["error"]["message"]
        assert httpx.get(dying.url + "/health").status_code == 503
        again = httpx.post(dying.url + "/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 5})
        assert again.status_code == 503 and set(again.json()) == {"error"}
    scheduler.close()


def test_api_key(server):
    app = create_app(server.scheduler, None, model_name=MODEL, api_key="sesame")
    with BackgroundServer(app) as locked:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.get(locked.url + "/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=locked.url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=locked.url + "/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]
        out = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2, temperature=0)
        assert out.choices[0].text == ""  # no tokenizer: token ids only, no text
        assert httpx.get(locked.url + "/health").status_code == 200  # health and metrics stay open


def test_health_and_metrics(server):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, float]:
        text = httpx.get(server.url + "/metrics").text
        return {
            s.name + json.dumps(s.labels, sort_keys=True): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    before = scrape()
    out = server.client.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=9, temperature=0)
    after = scrape()

    def delta(name: str, **labels) -> float:
        key = name + json.dumps(labels, sort_keys=True)
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("diffv2_generation_tokens_total") == out.usage.completion_tokens
    assert delta("diffv2_prompt_tokens_total") == 3
    assert delta("diffv2_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("diffv2_time_to_first_token_seconds_count") == 1
    assert delta("diffv2_time_per_output_token_seconds_count") == out.usage.completion_tokens - 1
    assert delta("diffv2_batch_occupancy_count") == delta("diffv2_decode_steps_total") > 0
    assert after["diffv2_queue_depth{}"] == 0 and after["diffv2_batch_rows{}"] == MAX_BATCH


def test_the_readme_client_example_runs(server):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Serve") :]
    example = re.search(r"```py\n(.*?)```", section, flags=re.S).group(1)
    assert "http://127.0.0.1:8000/v1" in example
    scope: dict = {}
    exec(
        example.replace("http://127.0.0.1:8000/v1", server.url + "/v1").replace('model="v2"', f"model={MODEL!r}"), scope
    )
    assert scope["reply"].choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------------- the command and the checkpoint formats
def save_run(tmp_path: Path) -> tuple[Path, Transformer]:
    from diffv2.train.checkpoint import save_checkpoint

    model = tiny_model(seed=5).float()
    run = tmp_path / "run"
    save_checkpoint(
        run,
        0,
        model=model,
        state={"step": 0},
        config={"model": model.cfg.to_dict()},
        tokenizer_json=Tokenizer.byte_level().to_json_str(),
    )
    return run, model


@pytest.mark.slow
def test_the_serve_command_serves_a_run_dir(tmp_path):
    import socket
    import subprocess
    import sys

    run, model = save_run(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "diffv2",
        "serve",
        "--checkpoint",
        str(run),
        "--port",
        str(port),
        "--max-batch",
        "2",
        "--api-key",
        "sesame",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                threading.Event().wait(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in client.models.list()] == ["run"]
        out = client.completions.create(model="run", prompt="In the", max_tokens=8, temperature=0)
        want = generate_batch(model, [list(b"In the")], 8, temperature=0, eos_id=EOS)[0]
        assert out.choices[0].text == Tokenizer.byte_level().decode([t for t in want if t != EOS])
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "Traceback" not in output and "OpenAI API at http://127.0.0.1" in output


def test_serving_an_hf_folder_uses_its_tokenizer_and_chat_template(tmp_path):
    from diffv2.cli.serve import load_for_serving
    from diffv2.hf import export_hf

    run, model = save_run(tmp_path)
    folder = export_hf(run, tmp_path / "hf")
    served, tokenizer = load_for_serving(str(folder), torch.device("cpu"), torch.float64)
    assert torch.equal(served.lm_head.weight, model.lm_head.weight.double())
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    codec = TextCodec(tokenizer)
    assert codec.eos_id == EOS and codec.decode(codec.encode("naïve")) == "naïve"
    messages = [{"role": "user", "content": "Hi"}]
    assert codec.chat_prompt(messages) == list(b"<user>Hi<assistant>")
    scheduler = Scheduler(served, max_batch=2).start()
    with BackgroundServer(create_app(scheduler, codec, model_name="hf")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        out = client.chat.completions.create(
            model="hf", messages=messages, max_tokens=6, temperature=0, extra_body={"return_token_ids": True}
        )
    scheduler.close()
    assert ids_of(out.choices[0]) == solo(served, list(b"<user>Hi<assistant>"), 6, temperature=0)
    with pytest.raises(Exception, match="no such folder"):
        load_for_serving(str(tmp_path / "missing"), torch.device("cpu"), None)


def test_lm_eval_local_completions_scores_a_task_through_the_server(server, tmp_path):
    """lm-eval's ``local-completions`` model (echo + logprobs, max_tokens 1) on a small multiple-choice task: its
    log-likelihoods equal the model's own."""
    lm_eval = pytest.importorskip("lm_eval")
    from diffv2.hf import hf_tokenizer

    tokenizer_dir = tmp_path / "tokenizer"
    hf_tokenizer(Tokenizer.byte_level()).save_pretrained(str(tokenizer_dir))
    gen = torch.Generator().manual_seed(6)
    words = ["lamb", "light", "water", "bread", "stone", "river"]
    docs = []
    for i in range(4):
        picks = torch.randperm(len(words), generator=gen)[:3].tolist()
        docs.append({"question": f"Q{i}: the word is", "choices": [words[p] for p in picks], "answer": i % 3})
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    task = {
        "task": "diffv2_serve_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
    }
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "diffv2_serve_mc.yaml").write_text(json.dumps(task))
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": MODEL,
            "base_url": server.url + "/v1/completions",
            "tokenizer": str(tokenizer_dir),
            "tokenizer_backend": "huggingface",
            "max_length": 64,
            "num_concurrent": 1,
        },
        tasks=["diffv2_serve_mc"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        log_samples=True,
    )
    samples = results["samples"]["diffv2_serve_mc"]
    assert len(samples) == len(docs)
    for sample in samples:
        doc = sample["doc"]
        for choice, resp in zip(doc["choices"], sample["resps"], strict=True):
            # lm-eval puts its target delimiter, a space, before each choice
            context, continuation = list(doc["question"].encode()), list(f" {choice}".encode())
            seq = torch.tensor(context + continuation)
            with torch.no_grad():
                logprobs = torch.log_softmax(server.model(seq[None])[0], dim=-1)
            positions = torch.arange(len(context) - 1, len(seq) - 1)
            want = logprobs[positions, seq[positions + 1]]
            assert resp[0][0] == pytest.approx(want.sum().item(), abs=1e-7)
            assert resp[0][1] == bool((logprobs[positions].argmax(-1) == seq[positions + 1]).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["baseline", "diff_v1", "diff_v2"])
def test_gpu_served_batches_equal_eager_generation(variant):
    """On CUDA every decode step replays a captured graph (the Triton window kernel, head_dim 64) while rows join
    and leave; in fp32 each greedy result equals the eager loop's for its prompt alone."""
    cfg = ModelConfig(
        vocab_size=300,
        d_model=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=64,
        ffn_hidden=128,
        max_seq_len=64,
        attention=variant,
    )
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
