"""Malformed inputs through the real ``diffv2`` entry point, in-process: config files and their every field, flags,
dataset shards, manifests and tokenizers, checkpoints, run folders, Hugging Face folders and upcycling sources.

Each must end with a non-zero exit and exactly one line on stderr that names the field or file (no traceback, not
the last-resort "internal error"), and leave the files it was given as they were. A few inputs that look wrong
but are fine (a tiny temperature, a torn metrics line on resume) must work and say what they did.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from .bad_input_cases import CASES, CONFIG_CASES, HF_CASES, TRAIN
from .bad_inputs import (
    cli,
    config_file,
    copy_input,
    damage_json,
    flip,
    make_dataset,
    make_llama,
    make_run,
    refused,
    snapshot,
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Well-formed inputs, built once; every case breaks a copy."""
    root = tmp_path_factory.mktemp("inputs")
    data = make_dataset(root)
    return {"data": data, "run": make_run(data, root / "run"), "root": root}


@pytest.fixture(scope="module")
def hf_inputs(inputs) -> dict:
    pytest.importorskip("transformers")
    root = inputs["root"]
    assert cli(["convert", inputs["run"], "--out", root / "hf"])[0] == 0
    return {**inputs, "hf": root / "hf", "llama": make_llama(root / "llama")}


def _place(arg: object, places: dict[str, str]) -> object:
    """An argument with IN, TMP, DATA, RUN (alone or before a "/") replaced by its folder."""
    if not isinstance(arg, str):
        return arg
    head, sep, rest = arg.partition("/")
    return places[head] + sep + rest if head in places else arg


def _check(case, given: dict, tmp_path) -> None:
    _, base, mutate, argv, names = case
    folder = tmp_path / "in"
    if base == "empty":
        folder.mkdir()
    elif base is not None:
        copy_input(given[base], folder)
    if mutate is not None:
        mutate(folder)
    before = snapshot(folder) if folder.is_dir() else {}
    places = {"IN": str(folder), "TMP": str(tmp_path), "DATA": str(given["data"]), "RUN": str(given["run"])}
    refused([_place(a, places) for a in argv], *(_place(n, places) for n in names))
    after = snapshot(folder) if folder.is_dir() else {}
    assert {k: after.get(k) for k in before} == before, "a file given as input was changed"
    assert not (tmp_path / "PWNED").exists() and not (folder / "PWNED").exists()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_refused_in_one_line(case, inputs, tmp_path):
    _check(case, inputs, tmp_path)


@pytest.mark.parametrize("case", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_malformed_hf_folder_is_refused_in_one_line(case, hf_inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a pickle that ran would leave PWNED here
    _check(case, hf_inputs, tmp_path)


CONFIG_IDS = [f"{t + '.' if t else ''}{n}={v!r}"[:60] for t, n, v in CONFIG_CASES]


@pytest.mark.parametrize(("table", "name", "value"), CONFIG_CASES, ids=CONFIG_IDS)
def test_every_config_field_refuses_wrong_values(table, name, value, tmp_path):
    """Each field of TrainConfig and of its model table, set to values of the wrong type or out of range, in a
    config file: refused before anything is read or written, naming the field."""
    path = config_file(tmp_path, table, name, value)
    refused(["train", "--config", path], f"{name}=")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("rel", "argv"),
    [
        ("manifest.json", ["data", "info", "--data", "IN"]),
        ("val_documents.json", ["data", "info", "--data", "IN"]),
        ("CKPT/config.json", ["generate", "--checkpoint", "IN", "--prompt", "A", "--max-new-tokens", 2, "--seed", 0]),
        ("CKPT/state.json", [*TRAIN, "--data", "DATA", "--out_dir", "IN", "--steps", 2, "--resume"]),
    ],
    ids=["manifest", "val-documents", "checkpoint-config", "checkpoint-state"],
)
def test_random_damage_to_a_json_file_is_refused_in_one_line_or_harmless(rel, argv, inputs, tmp_path):
    """One node of the file replaced by a random value (or deleted), many times: the command either works (the
    node did not matter) or fails in one line, never with a traceback or the last-resort error."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    base = "run" if rel.startswith("CKPT/") else "data"
    for i in range(12):
        folder = copy_input(inputs[base], tmp_path / f"in{i}")
        mutate, plan = damage_json(rng, rel)
        mutate(folder)
        places = {"IN": str(folder), "TMP": str(tmp_path), "DATA": str(inputs["data"]), "RUN": str(inputs["run"])}
        code, _, err = cli([_place(a, places) for a in argv])
        lines = [line for line in err.splitlines() if line.strip()]
        what = f"seed {seed}, {rel}: {plan}"
        assert code == 0 or (len(lines) == 1 and "internal error" not in err and "Traceback" not in err), (what, err)


def test_the_generated_inputs_cover_every_field_many_times():
    names = {(t, n) for t, n, _ in CONFIG_CASES}
    assert len(names) > 60 and len(CONFIG_CASES) + len(CASES) + len(HF_CASES) >= 300


# ---- inputs that look wrong but must work, and say what they did
def test_a_flipped_byte_anywhere_in_a_shard_is_detected(inputs, tmp_path):
    """Nothing is accepted silently: a single bit flipped at a random place in a random shard stops training."""
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    folder = copy_input(inputs["data"], tmp_path / "in")
    shard = sorted(folder.glob("*.bin"))[int(torch.randint(6, (1,), generator=gen))]
    offset = int(torch.randint(1024, shard.stat().st_size, (1,), generator=gen))  # a token, not the header
    flip(shard.name, offset)(folder)
    refused([*TRAIN, "--data", folder, "--out_dir", tmp_path / "run", "--steps", 1], shard.name, "sha256")


def test_a_verified_dataset_is_not_read_again_on_resume(inputs, tmp_path):
    run = copy_input(inputs["run"], tmp_path / "run")
    record = json.loads((run / "data_check.json").read_text())
    assert sorted(record) == sorted(p.name for p in inputs["data"].glob("*.bin"))
    code, _, err = cli([*TRAIN, "--data", inputs["data"], "--out_dir", run, "--steps", 3, "--resume", "--force"])
    assert code == 0, err
    assert json.loads((run / "data_check.json").read_text()) == record


@pytest.mark.parametrize("tail", [b'{"kind": "train", "st', bytes(range(256))], ids=["torn", "binary"])
def test_resume_drops_a_torn_last_metrics_line_and_says_so(inputs, tmp_path, tail):
    run = copy_input(inputs["run"], tmp_path / "run")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(tail)
    code, out, err = cli([*TRAIN, "--data", inputs["data"], "--out_dir", run, "--steps", 3, "--resume", "--force"])
    assert code == 0, err
    assert "metrics.jsonl: dropped" in out and "not JSON records" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]


def test_a_tiny_temperature_or_top_p_decodes_greedily(inputs):
    """1e-45 is a valid temperature and 1e-300 a valid top-p: they must give the greedy tokens, not a NaN
    probability error."""
    args = ["generate", "--checkpoint", inputs["run"], "--prompt", "And God", "--max-new-tokens", 8]
    greedy = cli([*args, "--temperature", 0])
    tiny = cli([*args, "--temperature", 1e-45])
    nucleus = cli([*args, "--top-p", 1e-300, "--seed", 1])  # 0 in float32: only the most likely token is left
    assert greedy[0] == tiny[0] == nucleus[0] == 0, (tiny[2], nucleus[2])
    assert tiny[1] == greedy[1] == nucleus[1]


def test_a_long_sample_prompt_is_cut_to_fit(inputs, tmp_path):
    """A sample_prompt longer than the context no longer fails after the whole run."""
    out = tmp_path / "run"
    args = [*TRAIN, "--data", inputs["data"], "--out_dir", out, "--steps", 1, "--sample_tokens", 5]
    code, stdout, err = cli([*args, "--sample_prompt", "And God said " * 200])
    assert code == 0, err
    assert "sample:" in stdout


def test_an_error_after_the_prompt_starts_a_new_line(inputs, tmp_path, monkeypatch):
    """generate prints the prompt before the first token; an error raised then must not continue that line."""
    import diffv2.cli.generate as generate_cli
    from diffv2.errors import ConfigError

    def failing(*args, **kwargs):
        yield [1]
        raise ConfigError("decode failed")

    monkeypatch.setattr(generate_cli, "stream_batch", failing)
    code, out, err = cli(["generate", "--checkpoint", inputs["run"], "--prompt", "And", "--seed", 0])
    assert code == 2 and out.endswith("\n") and err == "diffv2: error: decode failed\n"


def test_debug_shows_the_traceback(inputs, tmp_path):
    (tmp_path / "c.toml").write_text('lr = "x"\n')
    with pytest.raises(ValueError, match="lr='x'"):
        cli(["--debug", "train", "--config", tmp_path / "c.toml"])


@pytest.mark.parametrize("field", [{"seed": 2**64}, {"seed": -(2**63) - 1}, {"top_k": 2**40}])
def test_serve_requests_refuse_values_no_generator_takes(field):
    """A request's seed or top_k beyond what torch can hold is a 400 for that request, not a failed decode loop."""
    pydantic = pytest.importorskip("pydantic")
    from diffv2.serve.protocol import CompletionRequest

    with pytest.raises(pydantic.ValidationError, match=next(iter(field))):
        CompletionRequest(model="m", prompt="x", **field)
    CompletionRequest(model="m", prompt="x", seed=2**64 - 1, top_k=2**31 - 1)
