"""Malformed inputs through the real ``diffv2`` entry point, in-process: config files and their every field, flags,
dataset shards, manifests and tokenizers, checkpoints, run folders, Hugging Face folders and upcycling sources.

Each must end with a non-zero exit and exactly one line on stderr that names the field or file (no traceback, not
the last-resort "internal error"), and leave the files it was given as they were. A few inputs that look wrong
but are fine (a tiny temperature, a torn metrics line on resume) must work and say what they did.
"""

from __future__ import annotations

import gzip
import json
import os

import pytest
import torch

from .bad_inputs import (
    MODEL_FLAGS,
    QUIET,
    cli,
    config_field_cases,
    config_file,
    copy_input,
    edit,
    flip,
    larger_tokenizer,
    lying_header,
    make_dataset,
    make_llama,
    make_run,
    nonfinite_weight,
    pickle_only,
    refused,
    snapshot,
    token_out_of_vocab,
    truncate,
    write,
)

TRAIN = ["train", *QUIET, *MODEL_FLAGS]
ON_DATA = [*TRAIN, "--data", "IN", "--out_dir", "TMP/run", "--steps", 1]  # a broken dataset
RESUME = [*TRAIN, "--data", "DATA", "--out_dir", "IN", "--steps", 3, "--resume"]  # a broken run folder
GEN = ["generate", "--checkpoint", "IN", "--prompt", "And", "--max-new-tokens", 2]
GEN_OK = ["generate", "--checkpoint", "RUN", "--prompt", "And", "--max-new-tokens", 2, "--seed", 0]
PREP = ["data", "prepare", "--out", "TMP/prepared", "--no-progress", "--tokenizer", "byte"]
UP = ["convert", "--from-llama", "IN", "--out", "TMP/out"]
IMPORT = ["convert", "IN", "--out", "TMP/out"]
NESTED = "[" * 100_000 + "]" * 100_000
BINARY = bytes(range(256)) * 8


def _fifo(name: str):
    return lambda folder: os.mkfifo(folder / name)


def _without(key: str):
    return lambda d: d.pop(key)


def _fewer_tokens(manifest: dict) -> None:
    """The first train shard's count says 9000 (it holds 10000), the split's total agrees with the lie."""
    manifest["splits"]["train"]["shards"][0]["n_tokens"] = 9000
    manifest["splits"]["train"]["n_tokens"] -= 1000


def _shard0(**changes):
    return edit("manifest.json", lambda m: m["splits"]["train"]["shards"][0].update(changes))


# (id, what is broken: "data" / "run" / "hf" / "llama" / "empty" folder or None, how, argv, names in the message)
CASES = [
    # ---- train flags
    ("seed-2**70", None, None, [*TRAIN, "--seed", 2**70], ["seed"]),
    ("seed-negative", None, None, [*TRAIN, "--seed", -1], ["seed"]),
    ("lr-nan", None, None, [*TRAIN, "--lr", "nan"], ["lr"]),
    ("lr-inf", None, None, [*TRAIN, "--lr", "inf"], ["lr"]),
    ("weight-decay--inf", None, None, [*TRAIN, "--weight_decay", "-inf"], ["weight_decay"]),
    ("batch-size-10**12", None, None, [*TRAIN, "--batch_size", 10**12], ["batch_size"]),
    ("tokens-per-step", None, None, [*TRAIN, "--batch_size", 2**20, "--seq_len", 2**12], ["batch_size", "seq_len"]),
    ("d-model-10**9", None, None, [*TRAIN, "--d_model", 10**9], ["d_model"]),
    ("n-layers-10**9", None, None, [*TRAIN, "--n_layers", 10**9], ["n_layers"]),
    ("head-dim-10**9", None, None, [*TRAIN, "--head_dim", 10**9], ["head_dim"]),
    (
        "model-beyond-memory",
        None,
        None,
        [
            *TRAIN,
            "--data",
            "DATA",
            "--out_dir",
            "TMP/run",
            "--d_model",
            65536,
            "--n_layers",
            4096,
            "--n_heads",
            512,
            "--n_kv_heads",
            512,
            "--head_dim",
            128,
            "--ffn_hidden",
            262144,
        ],
        ["parameters", "GiB"],
    ),
    ("beta1-1", None, None, [*TRAIN, "--beta1", 1], ["beta1"]),
    ("timeout-1e300", None, None, [*TRAIN, "--dist_timeout_s", 1e300], ["dist_timeout_s"]),
    ("out-dir-empty", None, None, [*TRAIN, "--out_dir", ""], ["out_dir"]),
    ("stop-after--1", None, None, [*TRAIN, "--stop-after", -1], ["stop_after"]),
    ("stop-after-0", None, None, [*TRAIN, "--stop-after", 0], ["stop_after"]),
    ("steps-abc", None, None, [*TRAIN, "--steps", "abc"], ["--steps"]),
    ("attention-nope", None, None, [*TRAIN, "--attention", "nope"], ["attention"]),
    ("unknown-flag", None, None, [*TRAIN, "--no-such-flag"], ["--no-such-flag"]),
    ("unknown-command", None, None, ["trian"], ["trian"]),
    ("resume-nothing", "empty", None, [*TRAIN, "--out_dir", "IN", "--resume"], ["--resume"]),
    ("stop-after-done", "run", None, [*RESUME, "--stop-after", 2], ["stop_after"]),
    # ---- config files
    ("config-missing", None, None, [*TRAIN, "--config", "TMP/none.toml"], ["none.toml"]),
    ("config-suffix", "empty", write("c.txt", "steps = 3"), [*TRAIN, "--config", "IN/c.txt"], ["c.txt"]),
    ("config-fifo", "empty", _fifo("c.toml"), [*TRAIN, "--config", "IN/c.toml"], ["c.toml", "regular"]),
    ("config-binary-toml", "empty", write("c.toml", BINARY), [*TRAIN, "--config", "IN/c.toml"], ["c.toml"]),
    ("config-binary-yaml", "empty", write("c.yaml", BINARY), [*TRAIN, "--config", "IN/c.yaml"], ["c.yaml"]),
    ("config-binary-json", "empty", write("c.json", BINARY), [*TRAIN, "--config", "IN/c.json"], ["c.json"]),
    ("config-nested-json", "empty", write("c.json", NESTED), [*TRAIN, "--config", "IN/c.json"], ["c.json"]),
    ("config-nested-toml", "empty", write("c.toml", "a = " + NESTED), [*TRAIN, "--config", "IN/c.toml"], ["c.toml"]),
    ("config-nested-yaml", "empty", write("c.yaml", "a: " + NESTED), [*TRAIN, "--config", "IN/c.yaml"], ["c.yaml"]),
    ("yaml-syntax", "empty", write("c.yaml", "a:\n  - b\n c: d\n"), [*TRAIN, "--config", "IN/c.yaml"], ["line 3"]),
    ("toml-syntax", "empty", write("c.toml", "steps = = 3"), [*TRAIN, "--config", "IN/c.toml"], ["c.toml"]),
    ("json-syntax", "empty", write("c.json", '{"steps": 3,}'), [*TRAIN, "--config", "IN/c.json"], ["c.json"]),
    ("yaml-list", "empty", write("c.yaml", "- 1\n- 2\n"), [*TRAIN, "--config", "IN/c.yaml"], ["top level"]),
    ("json-string", "empty", write("c.json", '"steps"'), [*TRAIN, "--config", "IN/c.json"], ["top level"]),
    ("yaml-int-key", "empty", write("c.yaml", "1: 2\n"), [*TRAIN, "--config", "IN/c.yaml"], ["c.yaml", "names"]),
    (
        "json-long-int",
        "empty",
        write("c.json", '{"steps": ' + "1" * 5000 + "}"),
        [*TRAIN, "--config", "IN/c.json"],
        ["c.json"],
    ),
    ("unknown-field", "empty", write("c.toml", "stepz = 3"), [*TRAIN, "--config", "IN/c.toml"], ["stepz"]),
    (
        "model-vocab",
        "empty",
        write("c.toml", "[model]\nvocab_size = 9"),
        [*TRAIN, "--config", "IN/c.toml"],
        ["vocab_size"],
    ),
    # ---- datasets, as train reads them
    ("shard-flipped-byte", "data", flip("train_000001.bin", 3000), ON_DATA, ["train_000001.bin", "sha256"]),
    ("token-id-beyond-vocab", "data", token_out_of_vocab, ON_DATA, ["val_000000.bin", "token id 300"]),
    (
        "vocab-smaller",
        "data",
        edit("manifest.json", lambda m: m.update(vocab_size=100, eot_id=99)),
        ON_DATA,
        ["train_000000.bin", "token id"],
    ),
    ("splits-list", "data", edit("manifest.json", lambda m: m.update(splits=[])), ON_DATA, ["manifest.json", "splits"]),
    (
        "split-missing",
        "data",
        edit("manifest.json", lambda m: m["splits"].pop("val")),
        ON_DATA,
        ["manifest.json", "val"],
    ),
    ("shard-file-int", "data", _shard0(file=123), ON_DATA, ["manifest.json", "file"]),
    ("shard-file-null", "data", _shard0(file=None), ON_DATA, ["manifest.json", "file"]),
    ("shard-file-escapes", "data", _shard0(file="../data/train_000000.bin"), ON_DATA, ["manifest.json", "file"]),
    ("shard-file-absolute", "data", _shard0(file="/etc/passwd"), ON_DATA, ["manifest.json", "file"]),
    ("shard-file-dotdot", "data", _shard0(file=".."), ON_DATA, ["manifest.json", "file"]),
    ("shard-n-tokens-str", "data", _shard0(n_tokens="10"), ON_DATA, ["manifest.json", "n_tokens"]),
    ("shard-n-tokens-lie", "data", edit("manifest.json", _fewer_tokens), ON_DATA, ["train_000000.bin", "9000"]),
    (
        "split-n-tokens-lie",
        "data",
        edit("manifest.json", lambda m: m["splits"]["val"].update(n_tokens=5)),
        ON_DATA,
        ["manifest.json", "n_tokens"],
    ),
    ("shard-sha-not-hex", "data", _shard0(sha256="xyz"), ON_DATA, ["manifest.json", "sha256"]),
    (
        "shard-missing-field",
        "data",
        edit("manifest.json", lambda m: m["splits"]["train"]["shards"][0].pop("sha256")),
        ON_DATA,
        ["manifest.json", "sha256"],
    ),
    (
        "shard-entry-list",
        "data",
        edit("manifest.json", lambda m: m["splits"]["train"]["shards"].append([1])),
        ON_DATA,
        ["manifest.json", "shards[3]"],
    ),
    ("shard-truncated", "data", truncate("train_000000.bin", 2000), ON_DATA, ["train_000000.bin", "truncated"]),
    ("shard-magic", "data", flip("train_000000.bin", 0), ON_DATA, ["train_000000.bin", "magic"]),
    ("shard-gone", "data", lambda d: (d / "val_000001.bin").unlink(), ON_DATA, ["val_000001.bin"]),
    (
        "tokenizer-sha",
        "data",
        edit("manifest.json", lambda m: m.update(tokenizer_sha256="0" * 64)),
        ON_DATA,
        ["tokenizer.json", "sha256"],
    ),
    ("vocab-str", "data", edit("manifest.json", lambda m: m.update(vocab_size="257")), ON_DATA, ["vocab_size"]),
    ("eot-beyond-vocab", "data", edit("manifest.json", lambda m: m.update(eot_id=1000)), ON_DATA, ["eot_id"]),
    (
        "tokenizer-file-escapes",
        "data",
        edit("manifest.json", lambda m: m.update(tokenizer_file="../tokenizer.json")),
        ON_DATA,
        ["tokenizer_file"],
    ),
    ("tokenizer-binary", "data", write("tokenizer.json", BINARY), ON_DATA, ["tokenizer.json"]),
    ("tokenizer-garbage", "data", write("tokenizer.json", '{"model": 5}'), ON_DATA, ["tokenizer.json"]),
    (
        "tokenizer-no-eot",
        "data",
        edit("tokenizer.json", lambda t: t.update(added_tokens=[])),
        ON_DATA,
        ["tokenizer.json", "end-of-text"],
    ),
    ("manifest-binary", "data", write("manifest.json", BINARY), ON_DATA, ["manifest.json"]),
    ("manifest-list", "data", write("manifest.json", "[]"), ON_DATA, ["manifest.json"]),
    ("manifest-nested", "data", write("manifest.json", NESTED), ON_DATA, ["manifest.json"]),
    ("manifest-version", "data", edit("manifest.json", lambda m: m.update(format_version=99)), ON_DATA, ["99"]),
    ("manifest-no-source", "data", edit("manifest.json", lambda m: m.pop("source")), ON_DATA, ["source"]),
    (
        "near-dups-garbage",
        "data",
        edit("manifest.json", lambda m: m.update(val_near_duplicates=5)),
        ON_DATA,
        ["val_near_duplicates"],
    ),
    ("val-documents-garbage", "data", write("val_documents.json", '{"documents": 5}'), ON_DATA, ["val_documents.json"]),
    ("val-documents-binary", "data", write("val_documents.json", BINARY), ON_DATA, ["val_documents.json"]),
    (
        "val-documents-lie",
        "data",
        edit("val_documents.json", lambda r: r["documents"][0].__setitem__(0, 3)),
        ON_DATA,
        ["val_documents.json"],
    ),
    ("info-flipped-byte", "data", flip("val_000000.bin", 2000), ["data", "info", "--data", "IN"], ["val_000000.bin"]),
    (
        "info-no-source",
        "data",
        edit("manifest.json", lambda m: m.pop("source")),
        ["data", "info", "--data", "IN"],
        ["source"],
    ),
    # ---- data prepare
    ("source-fifo", "empty", _fifo("a.txt"), [*PREP, "--source", "IN/a.txt"], ["a.txt", "regular file"]),
    ("source-binary", "empty", write("a.txt", BINARY), [*PREP, "--source", "IN/a.txt"], ["a.txt", "UTF-8"]),
    (
        "source-jsonl-line",
        "empty",
        write("a.jsonl", '{"text": "a"}\n{"txt": 1}\n'),
        [*PREP, "--source", "IN/a.jsonl"],
        ["a.jsonl:2"],
    ),
    ("source-gzip-garbage", "empty", write("a.txt.gz", BINARY), [*PREP, "--source", "IN/a.txt.gz"], ["a.txt.gz"]),
    (
        "source-gzip-truncated",
        "empty",
        write("a.txt.gz", gzip.compress(b"hello " * 999)[:40]),
        [*PREP, "--source", "IN/a.txt.gz"],
        ["a.txt.gz"],
    ),
    ("source-missing", None, None, [*PREP, "--source", "TMP/none.txt"], ["none.txt"]),
    ("source-unsupported", "empty", write("a.bin", BINARY), [*PREP, "--source", "IN/a.bin"], ["a.bin"]),
    ("source-empty-folder", "empty", None, [*PREP, "--source", "IN"], ["IN"]),
    ("prepare-vocab-10**12", None, None, [*PREP, "--tokenizer", "bpe", "--vocab-size", 10**12], ["vocab_size"]),
    ("prepare-seed-2**70", None, None, [*PREP, "--seed", 2**70], ["seed"]),
    ("prepare-val-nan", None, None, [*PREP, "--val-fraction", "nan"], ["val_fraction"]),
    ("prepare-shard-0", None, None, [*PREP, "--shard-tokens", 0], ["shard_tokens"]),
    ("prepare-shard-2**40", None, None, [*PREP, "--shard-tokens", 2**40], ["shard_tokens"]),
    ("prepare-near-dups-nan", None, None, [*PREP, "--drop-val-near-dups", "nan"], ["val_near_dup_threshold"]),
    ("prepare-text-field-empty", None, None, [*PREP, "--text-field", ""], ["text_field"]),
    ("prepare-tokenizer-binary", "empty", write("t.json", BINARY), [*PREP, "--tokenizer", "IN/t.json"], ["t.json"]),
    ("prepare-out-is-file", "empty", write("f", "x"), [*PREP[:2], "--out", "IN/f"], ["IN/f"]),
    ("prepare-over-dataset", "data", None, [*PREP[:2], "--out", "IN", "--tokenizer", "byte"], ["--overwrite"]),
    # ---- checkpoints whose checksums match but whose contents are wrong
    (
        "state-step-str-resume",
        "run",
        edit("CKPT/state.json", lambda s: s.update(step="abc")),
        RESUME,
        ["state.json", "step"],
    ),
    ("state-step-negative", "run", edit("CKPT/state.json", lambda s: s.update(step=-5)), GEN, ["state.json", "step"]),
    ("state-list", "run", write("CKPT/state.json", "[1]"), GEN, ["state.json"]),
    ("state-loader-str", "run", edit("CKPT/state.json", lambda s: s.update(loader="x")), RESUME, ["loader"]),
    (
        "state-loader-window",
        "run",
        edit("CKPT/state.json", lambda s: s["loader"].update(window="x")),
        RESUME,
        ["loader.window"],
    ),
    ("state-loader-empty", "run", edit("CKPT/state.json", lambda s: s.update(loader={})), RESUME, ["loader"]),
    (
        "state-spikes",
        "run",
        edit("CKPT/state.json", lambda s: s.update(loss_spikes={"history": "x", "count": 1})),
        RESUME,
        ["loss_spikes"],
    ),
    ("state-nonfinite-str", "run", edit("CKPT/state.json", lambda s: s.update(nonfinite="x")), RESUME, ["nonfinite"]),
    ("config-model-list", "run", edit("CKPT/config.json", lambda c: c.update(model=[])), GEN, ["config.json", "model"]),
    (
        "config-model-list-resume",
        "run",
        edit("CKPT/config.json", lambda c: c.update(model=[])),
        RESUME,
        ["config.json", "model"],
    ),
    ("config-no-train", "run", edit("CKPT/config.json", _without("train")), RESUME, ["config.json", "train"]),
    (
        "config-model-field",
        "run",
        edit("CKPT/config.json", lambda c: c["model"].update(d_model="big")),
        GEN,
        ["config.json", "d_model"],
    ),
    ("config-binary", "run", write("CKPT/config.json", BINARY), GEN, ["config.json"]),
    ("weights-nan", "run", nonfinite_weight(float("nan")), GEN, ["model.safetensors", "non-finite"]),
    ("weights-nan-resume", "run", nonfinite_weight(float("nan")), RESUME, ["model.safetensors", "non-finite"]),
    (
        "weights-inf-init-from",
        "run",
        nonfinite_weight(float("inf")),
        [*TRAIN, "--data", "DATA", "--out_dir", "TMP/run", "--init_from", "IN"],
        ["model.safetensors", "non-finite"],
    ),
    ("tokenizer-beyond-vocab", "run", larger_tokenizer, GEN, ["tokenizer.json", "vocab_size"]),
    ("weights-truncated", "run", truncate("CKPT/model.safetensors", 100), GEN, ["model.safetensors"]),
    ("checksums-garbage", "run", write("CKPT/checksums.json", "{}"), GEN, ["checksums.json"]),
    # ---- generate, serve, eval and other flags
    ("temperature-nan", None, None, [*GEN_OK, "--temperature", "nan"], ["temperature"]),
    ("temperature-inf", None, None, [*GEN_OK, "--temperature", "inf"], ["temperature"]),
    ("temperature-negative", None, None, [*GEN_OK, "--temperature", -1], ["temperature"]),
    ("generate-seed-2**70", None, None, [*GEN_OK, "--seed", 2**70], ["seed"]),
    ("generate-seed-negative", None, None, [*GEN_OK, "--seed", -1], ["seed"]),
    ("top-k-negative", None, None, [*GEN_OK, "--top-k", -1], ["top", "-1"]),
    ("top-p-0", None, None, [*GEN_OK, "--top-p", 0], ["top_p"]),
    ("top-p-nan", None, None, [*GEN_OK, "--top-p", "nan"], ["top_p"]),
    ("max-new-tokens-0", None, None, [*GEN_OK, "--max-new-tokens", 0], ["max_new_tokens"]),
    ("max-new-tokens-10**6", None, None, [*GEN_OK, "--max-new-tokens", 10**6], ["max_new_tokens"]),
    ("prompt-invalid-utf8", None, None, ["generate", "--checkpoint", "RUN", "--prompt", "And \udcff"], ["--prompt"]),
    ("prompt-empty", None, None, ["generate", "--checkpoint", "RUN", "--prompt", ""], ["--prompt"]),
    ("checkpoint-missing", None, None, ["generate", "--checkpoint", "TMP/none", "--prompt", "a"], ["none"]),
    ("serve-port", None, None, ["serve", "--checkpoint", "RUN", "--port", 99999], ["--port"]),
    ("serve-max-batch-0", None, None, ["serve", "--checkpoint", "RUN", "--max-batch", 0], ["--max-batch"]),
    ("serve-max-batch-10**9", None, None, ["serve", "--checkpoint", "RUN", "--max-batch", 10**9], ["--max-batch"]),
    ("serve-seed-2**70", None, None, ["serve", "--checkpoint", "RUN", "--seed", 2**70], ["--seed"]),
    ("eval-seed-2**70", None, None, ["eval", "--checkpoint", "RUN", "--tasks", "needle", "--seed", 2**70], ["seed"]),
    ("eval-unknown-task", None, None, ["eval", "--checkpoint", "RUN", "--tasks", "nope"], ["nope"]),
    ("models-batch-negative", None, None, ["models", "--batch-size", -1, "--no-run"], ["--batch-size"]),
    ("models-vocab-0", None, None, ["models", "--vocab-size", 0, "--no-run"], ["vocab_size"]),
    ("inspect-layer", None, None, ["inspect", "--checkpoint", "RUN", "--layer", 99, "--out", "TMP/i"], ["--layer"]),
    ("convert-nothing", None, None, ["convert", "--out", "TMP/o"], ["--from-llama"]),
]
if not torch.cuda.is_available():
    CASES += [
        ("generate-cuda", None, None, [*GEN_OK, "--device", "cuda"], ["cuda"]),
        ("serve-cuda", None, None, ["serve", "--checkpoint", "RUN", "--device", "cuda"], ["cuda"]),
        ("eval-cuda", None, None, ["eval", "--checkpoint", "RUN", "--tasks", "needle", "--device", "cuda"], ["cuda"]),
        ("train-cuda", None, None, [*TRAIN, "--data", "DATA", "--out_dir", "TMP/run", "--device", "cuda"], ["cuda"]),
    ]
HF_CASES = [
    # ---- upcycling a Llama-style folder
    ("up-truncated", "llama", truncate("model.safetensors", 500), UP, ["model.safetensors"]),
    ("up-lying-header", "llama", lying_header("model.safetensors"), UP, ["model.safetensors"]),
    ("up-pickle", "llama", pickle_only, UP, ["pytorch_model.bin", "safetensors"]),
    ("up-config-list", "llama", write("config.json", "[1, 2]"), UP, ["config.json"]),
    ("up-config-binary", "llama", write("config.json", BINARY), UP, ["config.json"]),
    ("up-no-hidden-size", "llama", edit("config.json", _without("hidden_size")), UP, ["config.json", "hidden_size"]),
    ("up-hidden-size-str", "llama", edit("config.json", lambda c: c.update(hidden_size="32")), UP, ["hidden_size"]),
    (
        "up-layers-float",
        "llama",
        edit("config.json", lambda c: c.update(num_hidden_layers=1.5)),
        UP,
        ["num_hidden_layers"],
    ),
    ("up-shapes", "llama", edit("config.json", lambda c: c.update(intermediate_size=96)), UP, ["down_proj", "shape"]),
    (
        "up-index-escapes",
        "llama",
        write("model.safetensors.index.json", '{"weight_map": {"a": "../../x"}}'),
        UP,
        ["weight_map"],
    ),
    ("up-index-list", "llama", write("model.safetensors.index.json", '{"weight_map": ["a"]}'), UP, ["weight_map"]),
    ("up-rope-list", "llama", edit("config.json", lambda c: c.update(rope_parameters=[1])), UP, ["rope_parameters"]),
    ("up-eps-str", "llama", edit("config.json", lambda c: c.update(rms_norm_eps="x")), UP, ["rms_norm_eps"]),
    (
        "up-tie-yes",
        "llama",
        edit("config.json", lambda c: c.update(tie_word_embeddings="yes")),
        UP,
        ["tie_word_embeddings"],
    ),
    ("up-model-type", "llama", edit("config.json", lambda c: c.update(model_type="gpt2")), UP, ["model_type"]),
    ("up-layer-types", "llama", edit("config.json", lambda c: c.update(layer_types=5)), UP, ["layer_types"]),
    ("up-max-seq-len", "llama", None, [*UP, "--max-seq-len", -3], ["max_seq_len"]),
    # ---- Hugging Face diffv2 folders
    ("hf-truncated", "hf", truncate("model.safetensors", 500), IMPORT, ["model.safetensors"]),
    ("hf-lying-header", "hf", lying_header("model.safetensors"), IMPORT, ["model.safetensors"]),
    ("hf-pickle", "hf", pickle_only, IMPORT, ["pytorch_model.bin"]),
    ("hf-shapes", "hf", edit("config.json", lambda c: c.update(intermediate_size=96)), IMPORT, ["down_proj", "shape"]),
    ("hf-vocab-str", "hf", edit("config.json", lambda c: c.update(vocab_size="abc")), IMPORT, ["vocab_size"]),
    (
        "hf-index-escapes",
        "hf",
        write("model.safetensors.index.json", '{"weight_map": {"a": "/etc/passwd"}}'),
        IMPORT,
        ["weight_map"],
    ),
    ("hf-tokenizer-binary", "hf", write("tokenizer.json", BINARY), IMPORT, ["tokenizer.json"]),
    ("hf-tokenizer-garbage", "hf", write("tokenizer.json", '{"model": 5}'), IMPORT, ["tokenizer.json"]),
    (
        "hf-eval-tokenizer",
        "hf",
        write("tokenizer.json", "{"),
        ["eval", "--checkpoint", "IN", "--tasks", "needle"],
        ["tokenizer.json"],
    ),
    ("hf-serve-tokenizer", "hf", write("tokenizer.json", "{"), ["serve", "--checkpoint", "IN"], ["tokenizer"]),
]
CONFIG_CASES = [(table, name, v) for table, name, values in config_field_cases() for v in values]


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
    code, _, err = cli([*TRAIN, "--data", inputs["data"], "--out_dir", run, "--steps", 3, "--resume"])
    assert code == 0, err
    assert json.loads((run / "data_check.json").read_text()) == record


@pytest.mark.parametrize("tail", [b'{"kind": "train", "st', bytes(range(256))], ids=["torn", "binary"])
def test_resume_drops_a_torn_last_metrics_line_and_says_so(inputs, tmp_path, tail):
    run = copy_input(inputs["run"], tmp_path / "run")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(tail)
    code, out, err = cli([*TRAIN, "--data", inputs["data"], "--out_dir", run, "--steps", 3, "--resume"])
    assert code == 0, err
    assert "metrics.jsonl: dropped" in out and "not JSON records" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]


def test_a_tiny_temperature_decodes_greedily(inputs):
    """1e-45 is a valid temperature: it must give the greedy tokens, not a NaN probability error."""
    args = ["generate", "--checkpoint", inputs["run"], "--prompt", "And God", "--max-new-tokens", 8]
    greedy = cli([*args, "--temperature", 0])
    tiny = cli([*args, "--temperature", 1e-45])
    assert greedy[0] == tiny[0] == 0, tiny[2]
    assert tiny[1] == greedy[1]


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

    def failing(*args, **kwargs):
        yield [1]
        raise generate_cli.ConfigError("decode failed")

    monkeypatch.setattr(generate_cli, "stream_batch", failing)
    code, out, err = cli(["generate", "--checkpoint", inputs["run"], "--prompt", "And"])
    assert code == 2 and out.endswith("\n") and err == "diffv2: error: decode failed\n"


def test_debug_shows_the_traceback(inputs, tmp_path):
    (tmp_path / "c.toml").write_text('lr = "x"\n')
    with pytest.raises(ValueError, match="lr='x'"):
        cli(["--debug", "train", "--config", tmp_path / "c.toml"])
