"""``diffv2 serve``'s surface: every error path, the API key, health and metrics, the README's example, the command
on a run dir, an HF folder with its tokenizer's chat template, and lm-eval's ``local-completions`` client."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from diffv2 import Transformer  # noqa: E402
from diffv2.data import Tokenizer  # noqa: E402
from diffv2.generate import generate_batch  # noqa: E402
from diffv2.serve import BackgroundServer, Scheduler, TextCodec, create_app  # noqa: E402

from .serving import EOS, MAX_BATCH, MODEL, ids_of, solo, tiny_model  # noqa: E402

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
    # the request's prefill and its decode steps took host time in each part of the loop
    assert delta("diffv2_scheduler_busy_seconds", part="prefill") > 0
    assert delta("diffv2_scheduler_busy_seconds", part="launch") > 0
    assert delta("diffv2_scheduler_busy_seconds", part="collect") > 0


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
    from diffv2.checkpoint import save_checkpoint

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
