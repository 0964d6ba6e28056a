"""Data parallelism on the CPU (gloo, two ranks): DDP and FSDP2 follow the single-process loss trajectory,
checkpoints move between world sizes, and a failing or hanging rank ends the job with a clear message."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from diffv2.checkpoint import load_model_weights
from diffv2.errors import ConfigError
from diffv2.model import Transformer
from diffv2.train.config import TrainConfig
from diffv2.train.trainer import Trainer, train

from .test_train import SMALL_MODEL, data_dir, read_metrics, small_cfg  # noqa: F401 (data_dir: a fixture)

WORLD = 2
PROBE = (torch.arange(2 * 16).reshape(2, 16) * 7) % 257  # byte-level token ids


def config(data: Path, out: Path, **kw) -> TrainConfig:
    # grad_accum 4 = 2 micro-steps per rank, so gradients also accumulate unsynchronised; 3 eval batches do
    # not split evenly over 2 ranks, so the sharded model runs a padding batch.
    return small_cfg(
        data,
        out,
        **{"steps": 10, "grad_accum": 4, "eval_every": 5, "eval_batches": 3, "diag_every": 5, "save_every": 5, **kw},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    """Set up what torchrun would for a spawned rank (spawn targets must be importable module functions)."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)  # the ranks share the machine's cores


def _rank_main(rank: int, port: int, cfg: dict, probe_file: str) -> None:
    _join(rank, port)
    trainer = Trainer(TrainConfig.from_dict(cfg), progress=False)
    trainer.fit()
    with torch.no_grad():
        logits = trainer.run.model(PROBE)  # every rank takes part in a sharded model's forward
    if rank == 0:
        torch.save(logits, probe_file)
    trainer.env.close()


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("single") / "run"
    train(config(data_dir, out), progress=False)
    return out


@pytest.fixture(scope="module")
def launched(data_dir, tmp_path_factory):  # noqa: F811
    """``launched(parallel)``: the run dir of a two-rank run with that parallelism (run once per module)."""
    runs: dict[str, Path] = {}

    def launch(mode: str) -> Path:
        """``mode``: "ddp", "fsdp" or "fsdp-<reshard policy>"."""
        if mode not in runs:
            out = tmp_path_factory.mktemp(mode) / "run"
            parallel, _, reshard = mode.partition("-")
            # activation checkpointing must not change the numbers either
            cfg = config(
                data_dir,
                out,
                parallel=parallel,
                activation_checkpointing=mode == "fsdp",
                fsdp_reshard_after_forward=reshard or "default",
            )
            mp.spawn(_rank_main, args=(free_port(), cfg.to_dict(), str(out / "probe.pt")), nprocs=WORLD)
            runs[mode] = out
        return runs[mode]

    return launch


def trajectory(run_dir: Path) -> list[tuple[str, int, float, float | None]]:
    return [
        (r["kind"], r["step"], r.get("loss", r.get("val_loss")), r.get("grad_norm"))
        for kind in ("train", "eval")
        for r in read_metrics(run_dir, kind)
    ]


def assert_same_trajectory(got: Path, want: Path) -> None:
    a, b = trajectory(got), trajectory(want)
    assert [r[:2] for r in a] == [r[:2] for r in b]
    for (kind, step, loss, norm), (*_, loss_ref, norm_ref) in zip(a, b, strict=True):
        assert loss == pytest.approx(loss_ref, rel=1e-5), (kind, step)
        if norm_ref is None:  # eval records carry no gradient norm
            assert norm is None, (kind, step)
        else:
            assert norm == pytest.approx(norm_ref, rel=1e-5), (kind, step)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "fsdp-never"])  # never: ZeRO-2, gathered once per step
def test_two_ranks_follow_the_single_process_trajectory(reference, launched, parallel):
    run = launched(parallel)
    assert_same_trajectory(run, reference)
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 11))  # rank 0 alone logs
    assert records[1]["tokens_per_s"] == pytest.approx(WORLD * records[1]["tokens_per_s_per_device"])
    diag, diag_ref = read_metrics(run, "diag")[-1], read_metrics(reference, "diag")[-1]
    assert diag["max_logit"] == pytest.approx(diag_ref["max_logit"], rel=1e-4)  # rank 0's, on the same batch


def test_checkpoint_of_two_fsdp_ranks_loads_in_one_process(launched):
    run = launched("fsdp")
    model = Transformer(config(Path(), run).model_config(vocab_size=257))
    assert load_model_weights(run, model).name == "step_00000010"  # a plain single-file model
    with torch.no_grad():
        torch.testing.assert_close(model(PROBE), torch.load(run / "probe.pt"), rtol=1e-6, atol=1e-6)


def test_resume_on_another_world_size_continues_the_trajectory(data_dir, reference, launched, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(launched("fsdp"), out)
    shutil.rmtree(out / "checkpoints" / "step_00000010")  # back to step 5, written by two FSDP ranks
    (out / "checkpoints" / "latest").write_text("step_00000005\n")
    summary = train(config(data_dir, out), resume=True, progress=False)  # one process, no process group
    assert summary["step"] == 10
    assert_same_trajectory(out, reference)


def _nan_on_rank1_main(rank: int, port: int, cfg: dict, out: str) -> None:
    _join(rank, port)
    forward, calls = Transformer.forward, [0]

    def nan_on_third_step(self, tokens, targets=None, **kw):
        logits, loss = forward(self, tokens, targets, **kw)
        calls[0] += self.training
        return logits, loss * float("nan") if rank == 1 and calls[0] == 3 else loss

    Transformer.forward = nan_on_third_step
    summary = train(TrainConfig.from_dict(cfg), progress=False)
    Path(out, f"summary{rank}.json").write_text(json.dumps(summary))


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_all(data_dir, tmp_path):  # noqa: F811
    cfg = config(data_dir, tmp_path / "run", parallel="fsdp", steps=6, grad_accum=2, eval_every=0, diag_every=0)
    mp.spawn(_nan_on_rank1_main, args=(free_port(), cfg.to_dict(), str(tmp_path)), nprocs=WORLD)
    assert [r["skipped"] for r in read_metrics(tmp_path / "run")] == [False, False, True, False, False, False]
    summaries = [json.loads((tmp_path / f"summary{r}.json").read_text()) for r in range(WORLD)]
    assert summaries[0]["nonfinite"] == summaries[1]["nonfinite"] == 1
    assert summaries[0]["train_loss"] == summaries[1]["train_loss"]


def test_launch_errors_name_the_fix(data_dir, tmp_path, monkeypatch):  # noqa: F811
    with pytest.raises(ConfigError, match=r"grad_accum=3 is not divisible by the world size 2.*batch_size=4"):
        config(data_dir, tmp_path, grad_accum=3).micro_steps_per_rank(2)
    with pytest.raises(ConfigError, match="parallel='zero'"):
        config(data_dir, tmp_path, parallel="zero")
    with pytest.raises(ConfigError, match="dist_timeout_s"):
        config(data_dir, tmp_path, dist_timeout_s=0)
    with pytest.raises(ConfigError, match="torchrun"):  # ddp without torchrun's environment
        train(config(data_dir, tmp_path / "a", parallel="ddp"), progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--parallel ddp"):  # two processes that would each train alone
        train(config(data_dir, tmp_path / "b"), progress=False)


FAULTY_RANK = """
import os, sys, time
from diffv2.cli import main
from diffv2.model import Transformer

forward, how, calls = Transformer.forward, sys.argv[1], [0]

def faulty(self, *args, **kwargs):
    if self.training and os.environ["RANK"] == "1":
        calls[0] += 1
        if calls[0] == 3 and how == "raise":
            raise RuntimeError("injected failure on rank 1")
        if calls[0] == 3:
            time.sleep(300)  # a rank that hangs: the others must give up after dist_timeout_s
    return forward(self, *args, **kwargs)

Transformer.forward = faulty
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(("parallel", "how"), [("ddp", "raise"), ("fsdp", "hang")])
def test_a_failing_rank_ends_the_job_with_a_clear_message(data_dir, tmp_path, parallel, how):  # noqa: F811
    script = tmp_path / "faulty_rank.py"
    script.write_text(textwrap.dedent(FAULTY_RANK))
    flags = [
        "train",
        "--data",
        str(data_dir),
        "--out_dir",
        str(tmp_path / "run"),
        "--parallel",
        parallel,
        "--dist_timeout_s",
        "8",
        "--steps",
        "6",
        "--batch_size",
        "4",
        "--grad_accum",
        "2",
        "--seq_len",
        "32",
        "--eval_every",
        "0",
        "--diag_every",
        "0",
        "--sample_tokens",
        "0",
        "--no-tensorboard",
        "--no-progress",
    ]
    flags += [x for k, v in SMALL_MODEL.items() for x in (f"--{k}", str(v))]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        str(script),
        how,
        *flags,
    ]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the job hung: {proc.communicate()[0][-3000:]}")
    assert proc.returncode != 0, output[-3000:]
    if how == "raise":
        assert "injected failure on rank 1" in output, output[-3000:]
    else:  # rank 0 explains itself, then torchrun stops the hanging rank
        assert "diffv2: error: rank 0 of 2: a collective operation failed" in output, output[-3000:]
        assert "dist_timeout_s=8" in output
    assert time.monotonic() - start < 100


def test_compile_scope_picks_what_is_compiled():
    """ "model": one graph around the whole model; "block": each transformer block (what FSDP2 needs, and the
    same code on one rank as on N). torch.compile is lazy, so nothing compiles here."""
    from torch._dynamo.eval_frame import OptimizedModule

    from diffv2 import ModelConfig
    from diffv2.train.distributed import DistEnv, parallelize

    cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden=32)
    cpu = torch.device("cpu")
    for scope, whole in (("auto", True), ("model", True), ("block", False)):
        model = Transformer(cfg)
        par = parallelize(
            model, DistEnv(), cpu, compile=True, compile_scope=scope, activation_checkpointing=False, bf16=False
        )
        assert isinstance(par.train_fn, OptimizedModule) == whole, scope
        assert all(isinstance(block, OptimizedModule) for block in model.layers) == (not whole), scope
    with pytest.raises(ConfigError, match="compile_scope"):
        TrainConfig(parallel="fsdp", compile_scope="model")
    with pytest.raises(ConfigError, match="compile_scope"):
        TrainConfig(compile_scope="graph")


FSDP_CHILD = """
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from diffv2 import ModelConfig, Transformer
from diffv2.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from diffv2.checkpoint.state import is_sharded

dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=0, world_size=1)
torch.manual_seed(int(sys.argv[3]))
cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden=32)
model = Transformer(cfg)
for block in model.layers:
    fully_shard(block, reshard_after_forward=False)
fully_shard(model, reshard_after_forward=False)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
tokens = torch.randint(0, cfg.vocab_size, (2, 9))
model(tokens[:, :-1], tokens[:, 1:])[1].backward()
opt.step()
with torch.no_grad():
    logits = model(tokens)  # leaves the parameters unsharded: plain tensors, no DTensor in sight
assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
assert is_sharded(model)
path = save_checkpoint(sys.argv[1], 1, model=model, optimizer=opt, state={}, config={})
plain = Transformer(cfg)
load_model_weights(path, plain)
with torch.no_grad():
    torch.testing.assert_close(plain(tokens), logits, rtol=1e-6, atol=1e-6)
plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
load_checkpoint(path, model=plain, optimizer=plain_opt)
assert plain_opt.state_dict()["state"].keys() == set(range(len(list(plain.parameters()))))
load_checkpoint(path, model=model, optimizer=opt)  # back onto the sharded model, collectively
dist.destroy_process_group()
print("ok")
"""


def test_an_fsdp_model_between_forward_and_reshard_is_saved_through_its_shards(tmp_path):
    """With reshard_after_forward=False FSDP2 leaves plain, unsharded parameters registered after a forward; the
    checkpoint must still take the sharded (collective) path, or ranks would gather different things."""
    seed = int.from_bytes(os.urandom(4), "little")
    args = [sys.executable, "-c", FSDP_CHILD, str(tmp_path), str(free_port()), str(seed)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
