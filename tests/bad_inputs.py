"""Helpers for tests/test_bad_inputs.py: running the real CLI in-process, tiny inputs to break, the ways to break
them, and the wrong values of every config field."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import struct
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

from diffv2.cli import main
from diffv2.config import SIZE_LIMITS, ModelConfig
from diffv2.data import default_corpus_documents, prepare_dataset
from diffv2.train.config import INT_FIELDS, NUMBER_FIELDS, TrainConfig

MODEL = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden=32)
MODEL_FLAGS = [x for k, v in MODEL.items() for x in (f"--{k}", str(v))]
QUIET = ["--no-progress", "--no-tensorboard", "--batch_size", "2", "--seq_len", "16"]
QUIET += [x for k in ("sample_tokens", "eval_every", "diag_every", "warmup_steps") for x in (f"--{k}", "0")]


def cli(argv: list) -> tuple[int, str, str]:
    """``diffv2 ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a library's deprecation notice is not an error line
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def refused(argv: list, *names: str) -> str:
    """Run ``argv`` and check it fails the way bad input must: a non-zero exit, one line on stderr, no traceback,
    not the last-resort "internal error", naming each of ``names``. Returns the line."""
    code, _, err = cli(argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), f"accepted: {argv}\n{err}"
    assert "Traceback" not in err and len(lines) == 1, f"{argv}:\n{err}"
    assert "internal error" not in lines[0], lines[0]
    missing = [n for n in names if n not in lines[0]]
    assert not missing, f"{lines[0]!r} does not name {missing}"
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``."""
    files = (p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------------- inputs to break
def make_dataset(root: Path) -> Path:
    """A byte-level dataset of two short books, in shards of 10k tokens."""
    (root / "text").mkdir(parents=True)
    for i, doc in enumerate(default_corpus_documents()[:2]):
        (root / "text" / f"book{i}.txt").write_text(doc[:20000], encoding="utf-8")
    prepare_dataset(root / "text", root / "data", tokenizer="byte", shard_tokens=10_000, progress=False)
    return root / "data"


def make_run(data: Path, out: Path) -> Path:
    """A two-step run of a tiny model with a checkpoint after each step."""
    code, _, err = cli(
        ["train", *QUIET, *MODEL_FLAGS, "--data", data, "--out_dir", out, "--steps", 2, "--save_every", 1]
    )
    assert code == 0, err
    return out


def make_llama(out: Path) -> Path:
    """A tiny Llama in the Hugging Face layout."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = LlamaConfig(**sizes, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


# ---------------------------------------------------------------------- ways to break them
Mutation = Callable[[Path], object]


def latest(folder: Path) -> Path:
    return max((folder / "checkpoints").glob("step_*"))


def _resolve(folder: Path, rel: str) -> Path:
    return latest(folder) / rel[len("CKPT/") :] if rel.startswith("CKPT/") else folder / rel


def _reseal(path: Path) -> None:
    """Rewrite a checkpoint's checksums.json for its files as they are now, so that only the contents are wrong."""
    ckpt = path.parent
    if (ckpt / "checksums.json").is_file() and path.name != "checksums.json":
        sums = json.loads((ckpt / "checksums.json").read_text())
        for name in sums["files"]:
            data = (ckpt / name).read_bytes()
            sums["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (ckpt / "checksums.json").write_text(json.dumps(sums))


def write(rel: str, data: bytes | str) -> Mutation:
    def mutate(folder: Path) -> None:
        path = _resolve(folder, rel)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        _reseal(path)

    return mutate


def edit(rel: str, change: Callable[[dict], object]) -> Mutation:
    """Change a JSON file: ``change`` edits the object in place (what it returns is ignored)."""

    def mutate(folder: Path) -> None:
        path = _resolve(folder, rel)
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
        _reseal(path)

    return mutate


def truncate(rel: str, size: int) -> Mutation:
    return lambda folder: _resolve(folder, rel).write_bytes(_resolve(folder, rel).read_bytes()[:size])


def flip(rel: str, offset: int) -> Mutation:
    def mutate(folder: Path) -> None:
        path = _resolve(folder, rel)
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))

    return mutate


def reseal_shard(rel: str) -> Mutation:
    """Record a shard's current sha256 in the manifest (a shard rewritten by someone who also fixed the hash)."""
    return edit("manifest.json", lambda m: _set_sha(m, rel, hashlib.sha256(Path(rel).read_bytes()).hexdigest()))


def _set_sha(manifest: dict, path: str, sha: str) -> None:
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if shard["file"] == Path(path).name:
                shard["sha256"] = sha


def token_out_of_vocab(folder: Path) -> None:
    """The first token of val_000000.bin becomes 300 (the byte vocabulary has 257 ids); the manifest's hash is
    updated, so only the id check can see it."""
    path = folder / "val_000000.bin"
    data = bytearray(path.read_bytes())
    data[1024:1026] = (300).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    edit("manifest.json", lambda m: _set_sha(m, "val_000000.bin", hashlib.sha256(bytes(data)).hexdigest()))(folder)


def tensors(rel: str, change: Callable[[dict], object]) -> Mutation:
    """The tensors of a safetensors file (``CKPT/...`` in the latest checkpoint), changed in place by ``change``
    (a dict name → tensor) and written back with the same metadata; a checkpoint's checksums are resealed."""

    def mutate(folder: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        path = _resolve(folder, rel)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        weights = load_file(str(path))
        change(weights)
        save_file(weights, str(path), metadata=meta)
        _reseal(path)

    return mutate


def nonfinite_weight(value: float, rel: str = "CKPT/model.safetensors") -> Mutation:
    def change(weights: dict) -> None:
        name = sorted(weights)[-1]
        weights[name] = weights[name].clone()
        weights[name].view(-1)[0] = value

    return tensors(rel, change)


def as_dtype(dtype) -> Callable[[dict], None]:
    return lambda weights: weights.update({k: v.to(dtype) for k, v in weights.items()})


def larger_tokenizer_at(rel: str) -> Mutation:
    """A byte-level tokenizer with 50 more ids than the model's vocabulary of 257."""

    def mutate(folder: Path) -> None:
        from diffv2.data import Tokenizer

        tok = Tokenizer.byte_level().hf_tokenizer
        tok.add_tokens([f"extra{i}" for i in range(50)])
        write(rel, tok.to_str())(folder)

    return mutate


larger_tokenizer = larger_tokenizer_at("CKPT/tokenizer.json")


def lying_header(rel: str) -> Mutation:
    """A safetensors header whose first tensor claims a million more bytes than the file holds."""

    def mutate(folder: Path) -> None:
        path = folder / rel
        data = path.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        key = next(k for k in header if k != "__metadata__")
        header[key]["data_offsets"][1] += 1 << 20
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])

    return mutate


def pickle_only(folder: Path) -> None:
    """model.safetensors replaced by a pickle that would run a shell command if unpickled."""
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch PWNED'\ntR.")


def fifo(name: str):
    return lambda folder: os.mkfifo(folder / name)


def without(key: str):
    return lambda d: d.pop(key)


def fewer_tokens(manifest: dict) -> None:
    """The first train shard's count says 9000 (it holds 10000), the split's total agrees with the lie."""
    manifest["splits"]["train"]["shards"][0]["n_tokens"] = 9000
    manifest["splits"]["train"]["n_tokens"] -= 1000


def first_shard(**changes):
    return edit("manifest.json", lambda m: m["splits"]["train"]["shards"][0].update(changes))


# ---------------------------------------------------------------------- wrong values of every config field
def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


_ANY_WRONG = ([1], {"a": 1}, None)  # a list, a table and null are no field's type


def wrong_values(kind: str, minimum: int = 0, maximum: float | None = None) -> list[object]:
    """Values that must be refused for a field of ``kind``: wrong types first, then right types out of range."""
    if kind == "bool":
        return ["yes", "true", 1, 0, 1.0, *_ANY_WRONG]
    if kind == "str":
        return [5, 1.5, True, *_ANY_WRONG]
    if kind == "path":
        return [5, 1.5, True, "", "a\x00b", *_ANY_WRONG]
    if kind == "choice":
        return ["nope", "", 5, True, *_ANY_WRONG]
    if kind == "int":
        values = ["5", 2.0, 1.5, True, math.nan, math.inf, minimum - 1, 10**30, *_ANY_WRONG]
        return values + ([maximum + 1] if maximum is not None else [])
    if kind in ("float", "positive", "fraction", "fraction<1"):
        values = ["0.1", True, math.nan, math.inf, -math.inf, -1.0, *_ANY_WRONG]
        values += [0.0] if kind == "positive" else []
        values += [1.5] if kind.startswith("fraction") else []
        values += [1.0] if kind == "fraction<1" else []
        return values + ([maximum * 10] if maximum is not None else [])
    raise ValueError(kind)


_CHOICES = {"preset", "schedule", "dtype", "device", "parallel", "compile_scope", "fsdp_reshard_after_forward"}
_CHOICES |= {"attention", "pairing", "lambda_mode", "backend"}
_PATHS = {"data", "tokenizer", "out_dir"}
MODEL_FLOAT_LIMITS = {"rope_theta": (True, 1e12), "norm_eps": (True, 1.0), "init_std": (True, 10.0)}
MODEL_FLOAT_LIMITS["o_proj_init_scale"] = (False, 1e3)


def _kind(name: str, hint: object) -> tuple[str, int, float | None]:
    if name in INT_FIELDS:
        minimum, maximum, _ = INT_FIELDS[name]
        return "int", minimum, maximum
    if name == "seed":
        return "int", 0, 2**63 - 1
    if name in NUMBER_FIELDS:
        positive, maximum = NUMBER_FIELDS[name]
        return ("positive" if positive else "float"), 0, maximum
    if name in ("min_lr_ratio", "wsd_decay_frac"):
        return "fraction", 0, None
    if name in ("val_fraction", "beta1", "beta2"):
        return "fraction<1", 0, None
    if name in _CHOICES:
        return "choice", 0, None
    if name in SIZE_LIMITS:
        return "int", 1, SIZE_LIMITS[name]
    if name in MODEL_FLOAT_LIMITS:
        positive, maximum = MODEL_FLOAT_LIMITS[name]
        return ("positive" if positive else "float"), 0, maximum
    if name in _PATHS:
        return "path", 0, None
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    kind = {bool: "bool", int: "int", float: "positive", str: "str"}[base]
    return kind, 1, None


def config_field_cases() -> Iterator[tuple[str, str, list[object]]]:
    """(table, field, wrong values) for every TrainConfig field and, in the model table, every ModelConfig field."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "model":
            yield "", "model", ["tiny", 5, [1], True]
            continue
        yield "", f.name, wrong_values(*_kind(f.name, hints[f.name]))
    hints = typing.get_type_hints(ModelConfig)
    for f in fields(ModelConfig):
        values = wrong_values(*_kind(f.name, hints[f.name]))
        if f.default is None:  # null means "derive it"
            values = [v for v in values if v is not None]
        yield "model", f.name, values


def config_file(folder: Path, table: str, name: str, value: object) -> Path:
    """A config file setting ``name`` (in ``table``) to ``value``, with data and out_dir inside ``folder`` so an
    input that wrongly passed could not train on anything or write outside it. TOML, or JSON for null."""
    top = {"data": str(folder / "no-data"), "out_dir": str(folder / "run")}
    model: dict[str, object] = {}
    (model if table == "model" else top)[name] = value
    if model:
        top["model"] = model
    if value is None:
        path = folder / "config.json"
        path.write_text(json.dumps(top))
        return path
    lines = [f"{k} = {_toml(v)}" for k, v in top.items() if not (k == "model" and model)]
    if model:
        lines += ["[model]", *(f"{k} = {_toml(v)}" for k, v in model.items())]
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def copy_input(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


# ---------------------------------------------------------------------- random damage to a JSON file
DAMAGE = [None, True, -1, 0, 2**70, 1.5, math.nan, "x", "", "../../etc/passwd", [], {}, [1, 2], {"a": 1}, "\x00"]


def _leaves(data: object, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(data, dict | list) and data:
        for key in data if isinstance(data, dict) else range(len(data)):
            yield from _leaves(data[key], (*path, key))
    if path:
        yield path


def damage_json(rng, rel: str) -> tuple[Mutation, str]:
    """A mutation replacing (or deleting) one random node of a JSON file with a random value, and what it did."""
    plan: list = []

    def change(data: dict) -> None:
        path = rng.choice(list(_leaves(data)))
        *parents, last = path
        node = data
        for key in parents:
            node = node[key]
        if isinstance(node, dict) and rng.random() < 0.2:
            del node[last]
            plan.append(f"deleted {path}")
        else:
            node[last] = rng.choice(DAMAGE)
            plan.append(f"{path} = {node[last]!r}")

    return edit(rel, change), plan
