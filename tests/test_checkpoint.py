"""Checkpoints: bit-exact round trip, tied weights, pruning, crash safety (exceptions and SIGKILL), corruption."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffv2 import CheckpointError, ModelConfig, Transformer
from diffv2.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    read_checkpoint_meta,
    read_tokenizer_json,
    save_checkpoint,
    verify_checkpoint,
)
from diffv2.checkpoint import save as save_module
from diffv2.checkpoint import state as state_module

TINY = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_hidden=64)
TOKENIZER = '{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}'


def make(**overrides) -> tuple[Transformer, torch.optim.AdamW]:
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model: Transformer, opt: torch.optim.Optimizer, steps: int = 2, tokens: torch.Tensor | None = None) -> None:
    for _ in range(steps):
        batch = torch.randint(0, model.cfg.vocab_size, (2, 9)) if tokens is None else tokens
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()


def save(run_dir: Path, step: int, model: Transformer, opt: torch.optim.Optimizer | None = None, **kw) -> Path:
    kw.setdefault("state", {"step": step})
    return save_checkpoint(run_dir, step, model=model, optimizer=opt, config={"model": model.cfg.to_dict()}, **kw)


def params(model: Transformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model: Transformer, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def assert_same_optimizer(opt: torch.optim.Optimizer, expected: dict) -> None:
    got = opt.state_dict()
    assert got["param_groups"] == expected["param_groups"]
    assert got["state"].keys() == expected["state"].keys()
    for pid, slots in expected["state"].items():
        for name, value in slots.items():
            assert torch.equal(got["state"][pid][name], value), (pid, name)


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """A safetensors file as (header, tensor bytes): the header's JSON order varies from one write to the next."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------- round trip
def test_round_trip_is_bit_exact_and_restores_rng(tmp_path):
    model, opt = make()
    train(model, opt)
    weights, opt_state = params(model), copy.deepcopy(opt.state_dict())
    reference = copy.deepcopy((model, opt))
    state = {"step": 2, "loader": {"shard": 1, "pos": 17}, "loss": 3.25, "spikes": [1, 2]}
    config = {"model": model.cfg.to_dict(), "train": {"lr": 1e-2}}
    path = save_checkpoint(
        tmp_path, 2, model=model, optimizer=opt, state=state, config=config, tokenizer_json=TOKENIZER
    )
    assert path == tmp_path / "checkpoints" / "step_00000002"
    draws = torch.rand(5), random.random(), np.random.rand(3)

    train(model, opt, steps=3)  # moves weights, optimizer moments and all RNGs away from the saved point
    assert not torch.equal(model.tok_embeddings.weight, weights["tok_embeddings.weight"])
    loaded_state = load_checkpoint(tmp_path, model=model, optimizer=opt)  # a run dir resolves to its latest

    assert loaded_state == state
    assert_same_weights(model, weights)
    assert_same_optimizer(opt, opt_state)
    assert torch.equal(torch.rand(5), draws[0])
    assert random.random() == draws[1]
    assert np.array_equal(np.random.rand(3), draws[2])
    assert read_checkpoint_meta(path) == (state, config)
    assert read_tokenizer_json(path) == TOKENIZER
    # Training continues exactly as it would have without the interruption.
    tokens = torch.randint(0, 50, (2, 9))
    train(model, opt, 1, tokens)
    train(reference[0], reference[1], 1, tokens)
    assert_same_weights(model, params(reference[0]))


def test_load_without_optimizer_or_rng_and_missing_optimizer(tmp_path):
    model, opt = make()
    train(model, opt)
    save(tmp_path, 1, model)  # no optimizer state
    other, other_opt = make()
    draw = torch.rand(3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_checkpoint(tmp_path, model=other, restore_rng=False)
    assert torch.equal(torch.rand(3), expected) and not torch.equal(expected, draw)
    assert_same_weights(other, params(model))
    with pytest.raises(CheckpointError, match="optimizer"):
        load_checkpoint(tmp_path, model=other, optimizer=other_opt)
    fresh, _ = make()
    assert load_model_weights(tmp_path, fresh) == tmp_path / "checkpoints" / "step_00000001"
    assert_same_weights(fresh, params(model))


def test_tied_embeddings_are_stored_once_and_stay_tied(tmp_path):
    model, opt = make(tie_embeddings=True)
    train(model, opt)
    path = save(tmp_path, 3, model, opt)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert len([k for k in f.keys() if k in ("lm_head.weight", "tok_embeddings.weight")]) == 1  # noqa: SIM118
    torch.manual_seed(7)
    other, other_opt = make(tie_embeddings=True)
    load_checkpoint(path, model=other, optimizer=other_opt)
    assert other.lm_head.weight is other.tok_embeddings.weight
    assert_same_weights(other, params(model))
    assert_same_optimizer(other_opt, opt.state_dict())
    # An untied checkpoint cannot be squeezed into one tied tensor without losing one of the two matrices.
    untied, _ = make()
    save(tmp_path / "untied", 1, untied)
    with pytest.raises(CheckpointError, match="tied") as excinfo:
        load_model_weights(tmp_path / "untied", other)
    assert "model config" in one_line_error(excinfo)


def test_optimizer_state_is_keyed_by_parameter_name_and_index_keyed_files_still_load(tmp_path, monkeypatch):
    model, opt = make(tie_embeddings=True)
    train(model, opt)
    path = save(tmp_path, 1, model, opt)
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    names = [n for n, _ in model.named_parameters()]  # the tied matrix once, under its first name
    assert saved["param_groups"][0]["params"] == names and set(saved["state"]) == set(names)
    # Checkpoints of format 1 held torch's own index-keyed optimizer state dict.
    monkeypatch.setattr(save_module, "gather_optimizer", lambda _, optimizer: optimizer.state_dict())
    legacy = save(tmp_path / "legacy", 1, model, opt)
    assert isinstance(torch.load(legacy / "optimizer.pt", weights_only=True)["param_groups"][0]["params"][0], int)
    other, other_opt = make(tie_embeddings=True)
    load_checkpoint(legacy, model=other, optimizer=other_opt)
    assert_same_optimizer(other_opt, opt.state_dict())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports (torch.jit) warn
def test_wrapped_blocks_save_plain_names(tmp_path):
    """Activation-checkpointing and compile wrappers (as under FSDP) add no prefixes to a checkpoint."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model, opt = make()
    train(model, opt)
    model.layers[0] = checkpoint_wrapper(model.layers[0])
    model.layers[1] = torch.compile(model.layers[1])  # compiles lazily: never called here
    path = save(tmp_path, 1, model, opt)
    plain, plain_opt = make()
    load_checkpoint(path, model=plain, optimizer=plain_opt)
    assert_same_weights(plain, {k.replace("_orig_mod.", ""): v for k, v in params(model).items()})
    assert_same_optimizer(plain_opt, opt.state_dict())
    torch.manual_seed(5)
    again, again_opt = make()
    again.layers[1] = torch.compile(again.layers[1])
    load_checkpoint(path, model=again, optimizer=again_opt)
    assert torch.equal(again.layers[1].mlp.up_proj.weight, plain.layers[1].mlp.up_proj.weight)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports (torch.jit) warn
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_plain_models_skip_dcp_yet_write_and_load_the_same_state(tmp_path, monkeypatch, tie):
    """A plain model's state is gathered and applied without torch.distributed.checkpoint (DCP, which a sharded
    model goes through); both ways write byte-identical files and load into identical models and optimizers."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    def wrapped() -> tuple[Transformer, torch.optim.AdamW]:
        model, opt = make(tie_embeddings=tie)
        train(model, opt)  # a stepped state, different for every call
        model.layers[0] = checkpoint_wrapper(model.layers[0])
        model.layers[1] = torch.compile(model.layers[1])  # compiles lazily: never called here
        return model, opt

    model, opt = wrapped()
    assert not state_module.is_sharded(model)
    written, loaded = [], []
    for through_dcp in (False, True):
        with monkeypatch.context() as patch:
            if through_dcp:
                patch.setattr(state_module, "is_sharded", lambda _: True)
            written.append(save(tmp_path / str(through_dcp), 1, model, opt))
            other, other_opt = wrapped()
            load_checkpoint(written[0], model=other, optimizer=other_opt)  # the same file, either way
            loaded.append((other, other_opt))
    safetensors = [safetensors_parts(path / "model.safetensors") for path in written]
    assert safetensors[0] == safetensors[1]
    assert (written[0] / "optimizer.pt").read_bytes() == (written[1] / "optimizer.pt").read_bytes()
    for other, other_opt in loaded:
        assert_same_weights(other, params(model))
        assert_same_optimizer(other_opt, opt.state_dict())


# ---------------------------------------------------------------------- layout and pruning
def test_keep_last_prunes_oldest_and_latest_points_at_newest(tmp_path):
    model, opt = make()
    for step in range(1, 6):
        save(tmp_path, step, model, opt, keep_last=2)
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert sorted(os.listdir(root)) == ["latest", "step_00000004", "step_00000005"]
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert latest_checkpoint(tmp_path) == root / "step_00000005"
    for step in (6, 7):
        save(tmp_path, step, model, keep_last=None)
    assert len(list_checkpoints(tmp_path)) == 4


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model, opt = make()
    save(tmp_path, 4, model, opt, state={"v": 1})
    train(model, opt)
    save(tmp_path, 4, model, opt, state={"v": 2})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000004"]
    other, _ = make()
    assert load_checkpoint(tmp_path, model=other) == {"v": 2}
    assert_same_weights(other, params(model))


def test_latest_falls_back_to_highest_complete_step(tmp_path):
    model, _ = make()
    for step in (1, 2):
        save(tmp_path, step, model)
    root = tmp_path / "checkpoints"
    (root / "latest").unlink()
    assert latest_checkpoint(tmp_path) == root / "step_00000002"
    (root / "latest").write_text("garbage")
    (root / "step_00000009").mkdir()  # copied in by hand, never completed
    (root / "step_00000009" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == root / "step_00000002"
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(root / "step_00000009", model=model)


# ---------------------------------------------------------------------- crashes
def _fail_on_call(n: int, real):
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise OSError(28, "No space left on device (simulated)")
        return real(*args, **kwargs)

    return fake


@pytest.mark.parametrize(
    ("target", "call", "step"),
    [("torch.save", 1, 2), ("os.rename", 1, 2), ("os.replace", 1, 2), ("os.rename", 2, 1)],
    ids=["optimizer-save", "final-rename", "latest-replace", "replace-same-step"],
)
def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch, target, call, step):
    model, opt = make()
    train(model, opt)
    first = save(tmp_path, 1, model, opt)
    weights, opt_state = params(model), copy.deepcopy(opt.state_dict())
    train(model, opt)
    module, name = target.split(".")
    owner = torch if module == "torch" else os
    monkeypatch.setattr(owner, name, _fail_on_call(call, getattr(owner, name)))
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path, step, model, opt)
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path) == first
    other, other_opt = make()
    load_checkpoint(tmp_path, model=other, optimizer=other_opt)
    assert_same_weights(other, weights)
    assert_same_optimizer(other_opt, opt_state)
    save(tmp_path, 5, model, opt)  # the next good save clears whatever the failed one left behind
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".")]


def test_stale_temp_dirs_are_ignored_then_cleaned(tmp_path):
    model, _ = make()
    first = save(tmp_path, 1, model)
    root = tmp_path / "checkpoints"
    stale = root / ".tmp-step_00000002-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (root / ".tmp-latest-999999").write_text("step_00000002")
    assert latest_checkpoint(tmp_path) == first
    assert list_checkpoints(tmp_path) == [first]
    save(tmp_path, 2, model)
    assert sorted(os.listdir(root)) == ["latest", "step_00000001", "step_00000002"]


def test_checkpoint_moved_aside_by_a_dead_save_still_counts(tmp_path):
    model, _ = make()
    save(tmp_path, 1, model)
    save(tmp_path, 2, model, state={"v": "two"})
    root = tmp_path / "checkpoints"
    # What a kill leaves between moving step 2 aside and renaming its replacement into place.
    os.rename(root / "step_00000002", root / ".old-step_00000002-4242")
    assert latest_checkpoint(tmp_path) == root / ".old-step_00000002-4242"
    assert load_checkpoint(tmp_path, model=model) == {"v": "two"}
    save(tmp_path, 3, model)  # puts it back under its own name
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002", "step_00000003"]
    assert not [n for n in os.listdir(root) if n.startswith(".")]


CHILD = """
import sys, torch
from diffv2 import ModelConfig, Transformer
from diffv2.checkpoint import save_checkpoint
run_dir, start = sys.argv[1], int(sys.argv[2])
cfg = ModelConfig(vocab_size=4096, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden=256)
model = Transformer(cfg)
opt = torch.optim.AdamW(model.parameters())
for p in model.parameters():
    p.grad = torch.randn_like(p)
opt.step()
for i in range(10**6):
    step = start + i // 2  # every step is saved twice, so kills also land inside a same-step replacement
    save_checkpoint(run_dir, step, model=model, optimizer=opt, state={"step": step}, config=cfg.to_dict(),
                    tokenizer_json="{}", keep_last=2)
    print(step, flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_during_saves_never_breaks_latest(tmp_path):
    rng = random.Random()
    cfg = dict(vocab_size=4096, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden=256)
    start = 1
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(start)], stdout=subprocess.PIPE)
        assert proc.stdout.readline(), "child died before its first save"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        found = latest_checkpoint(tmp_path)
        assert found is not None
        verify_checkpoint(found)
        model, opt = make(**cfg)
        state = load_checkpoint(found, model=model, optimizer=opt)
        assert state["step"] >= start
        start = state["step"] + rng.choice([0, 1])  # sometimes re-save the very step that was latest
    save(tmp_path, start + 1, make()[0])
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".")]


# ---------------------------------------------------------------------- corruption and mismatches
@pytest.fixture
def saved(tmp_path) -> Path:
    model, opt = make()
    train(model, opt, steps=1)
    return save(tmp_path, 1, model, opt)


def test_truncated_weights_are_named(saved):
    file = saved / "model.safetensors"
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    model, opt = make()
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(saved, model=model, optimizer=opt)
    message = one_line_error(excinfo)
    assert "model.safetensors" in message and "truncated" in message and f"{size // 2} of {size}" in message
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(saved)


def test_flipped_byte_in_optimizer_is_named(saved):
    file = saved / "optimizer.pt"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    model, opt = make()
    before = params(model)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(saved, model=model, optimizer=opt)
    message = one_line_error(excinfo)
    assert "optimizer.pt" in message and "sha256" in message
    assert_same_weights(model, before)  # nothing is applied unless everything checks out


def test_missing_checksums_means_incomplete(saved):
    (saved / "checksums.json").unlink()
    model, _ = make()
    with pytest.raises(CheckpointError, match="incomplete") as excinfo:
        load_checkpoint(saved, model=model)
    one_line_error(excinfo)
    assert latest_checkpoint(saved.parent.parent) is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(saved.parent.parent, model=model)


def test_missing_file_is_named(saved):
    (saved / "rng.pt").unlink()
    with pytest.raises(CheckpointError, match=r"rng\.pt: missing"):
        read_checkpoint_meta(saved)


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        (dict(d_model=48, head_dim=12), "shape mismatch"),
        (dict(n_layers=3), "missing"),
        (dict(n_layers=1), "unexpected"),
    ],
)
def test_other_model_config_is_a_checkpoint_error(saved, overrides, detail):
    model, opt = make(**overrides)
    before = params(model)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(saved, model=model, optimizer=opt)
    message = one_line_error(excinfo)
    assert "model.safetensors" in message and "model config" in message and detail in message
    assert_same_weights(model, before)


def test_other_optimizer_setup_is_a_checkpoint_error(saved):
    model, _ = make()
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    before = params(model)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt") as excinfo:
        load_checkpoint(saved, model=model, optimizer=opt)
    assert "optimizer setup" in one_line_error(excinfo)
    assert_same_weights(model, before)


def test_run_dir_without_checkpoints(tmp_path):
    model, _ = make()
    assert latest_checkpoint(tmp_path) is None and list_checkpoints(tmp_path) == []
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path, model=model)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "nope", model=model)
    with pytest.raises(CheckpointError):
        read_checkpoint_meta(tmp_path)
