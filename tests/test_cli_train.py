"""`diffv2 train` as a user drives it: resume from the run's own config, stop on a signal and resume exactly,
plain log lines without a progress bar, and help text that shows the defaults a default run really uses."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffv2.cli import build_parser, main
from diffv2.cli.train import default_model
from diffv2.config import ModelConfig
from diffv2.data import default_corpus_documents, prepare_dataset
from diffv2.train.config import TrainConfig

SMALL = [
    "--d_model",
    "32",
    "--n_layers",
    "2",
    "--n_heads",
    "4",
    "--n_kv_heads",
    "2",
    "--head_dim",
    "8",
    "--ffn_hidden",
    "64",
]
QUIET = ["--no-progress", "--no-tensorboard", "--sample_tokens", "0", "--diag_every", "0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "text").mkdir()
    for i, doc in enumerate(default_corpus_documents()[:2]):
        (root / "text" / f"book{i}.txt").write_text(doc, encoding="utf-8")
    prepare_dataset(root / "text", root / "prepared", tokenizer="byte", progress=False)
    return root / "prepared"


def flags(data_dir: Path, out: Path, **kw) -> list[str]:
    values = dict(
        data=data_dir,
        out_dir=out,
        steps=6,
        batch_size=4,
        seq_len=32,
        warmup_steps=1,
        eval_every=3,
        eval_batches=2,
        log_every=1,
        save_every=100,
        lr=0.004,
        seed=3,
    )
    values.update(kw)
    return ["train", *QUIET, *SMALL, *(x for k, v in values.items() for x in (f"--{k}", str(v)))]


def train_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_bare_resume_continues_with_the_runs_own_config(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*flags(data_dir, run), "--stop-after", "3"]) == 0
    before = json.loads((run / "config.json").read_text())
    capsys.readouterr()
    # only the run folder: steps, lr, seed, the model and the data all come from its config.json
    assert main(["train", "--out_dir", str(run), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "preparing" not in out and not (run / "data").exists()  # no corpus was tokenised into the run
    after = json.loads((run / "config.json").read_text())
    assert after["train"] == before["train"] and after["model"] == before["model"]
    assert len(train_losses(run)) == 6 and "step 6:" in out
    straight = tmp_path / "straight"
    assert main(flags(data_dir, straight)) == 0
    assert train_losses(run) == train_losses(straight)


def test_resume_refuses_trajectory_changes_unless_forced(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*flags(data_dir, run, steps=4), "--stop-after", "2"]) == 0
    capsys.readouterr()
    resume = ["train", "--out_dir", str(run), "--resume", "--no-progress"]
    err = error_line(capsys, [*resume, "--lr", "0.01", "--batch_size", "2", "--schedule", "wsd"])
    assert all(s in err for s in ("lr 0.004→0.01", "batch_size 4→2", "schedule 'cosine'→'wsd'", "--force"))
    err = error_line(capsys, [*resume, "--steps", "8"])
    assert "steps 4→8" in err and "--force" in err and "schedule" in err  # extending needs --force, and says why
    err = error_line(capsys, [*resume, "--n_layers", "3", "--force"])  # the weights would not fit: never
    assert "n_layers 2→3" in err and "new --out_dir" in err
    err = error_line(capsys, ["train", "--out_dir", str(tmp_path / "none"), "--resume"])
    assert "holds no run to resume" in err
    # cadence flags change nothing the model sees: they pass, and say so
    assert main([*resume, "--eval_every", "1", "--log_every", "2", "--stop-after", "3"]) == 0
    assert "eval_every 3→1" in capsys.readouterr().out
    # forced, the new values are the run's from now on
    assert main([*resume, "--steps", "5", "--force"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 5
    assert len(train_losses(run)) == 5


def test_a_forced_grad_accum_change_keeps_the_saved_loader_window_checkable(data_dir, tmp_path, capsys):
    """Each step reads grad_accum × batch_size windows from the step where that grad_accum began: a run whose
    grad_accum changed on a forced resume resumes again, and its saved window is what its steps read."""
    run = tmp_path / "run"
    assert main([*flags(data_dir, run, steps=6, eval_every=0), "--stop-after", "2"]) == 0
    resume = ["train", "--out_dir", str(run), "--resume", "--no-progress"]
    assert main([*resume, "--grad_accum", "2", "--force", "--stop-after", "4"]) == 0
    assert main(resume) == 0  # a resume with no change after the forced one
    state = json.loads((run / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["loader_origin"] == {"step": 2, "window": 2 * 4}
    assert state["loader"]["window"] == 2 * 4 + 4 * 2 * 4
    capsys.readouterr()


def _wait_for_steps(run: Path, proc: subprocess.Popen, n: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(train_losses(run)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {n}: {proc.poll()=}")


def _cli(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "diffv2", *argv]


@pytest.mark.slow
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(data_dir, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run, straight = tmp_path / "run", tmp_path / "straight"
    steps = dict(steps=3000, warmup_steps=20, eval_every=7)
    stopped_at = []
    for sig, code, argv in (
        (signal.SIGINT, 130, flags(data_dir, run, **steps)),
        (signal.SIGTERM, 143, ["train", "--out_dir", str(run), "--resume", "--no-progress"]),
    ):
        proc = subprocess.Popen(_cli(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        _wait_for_steps(run, proc, (stopped_at[-1] if stopped_at else 0) + 3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err
        line = err.strip().splitlines()[-1]
        match = re.fullmatch(
            rf"{sig.name} at step (\d+): saved (\S+); resume with: diffv2 train --out_dir \S+ --resume", line
        )
        assert match, err
        stopped_at.append(int(match.group(1)))
        assert Path(match.group(2)).name == f"step_{stopped_at[-1]:08d}" and Path(match.group(2)).is_dir()
        assert len(train_losses(run)) == stopped_at[-1]
    end = stopped_at[-1] + 4
    resumed = subprocess.run(
        _cli(["train", "--out_dir", str(run), "--resume", "--stop-after", str(end)]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run(
        _cli([*flags(data_dir, straight, **steps), "--stop-after", str(end)]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert whole.returncode == 0, whole.stderr
    assert len(train_losses(run)) == end
    assert train_losses(run) == train_losses(straight)  # bit-identical through two stops


def test_no_progress_prints_plain_log_and_eval_lines(data_dir, tmp_path, capsys):
    assert main(flags(data_dir, tmp_path / "run", steps=4, log_every=2, eval_every=2)) == 0
    out = capsys.readouterr().out.splitlines()
    logs = [line for line in out if line.startswith("step ") and "/4" in line]
    assert len(logs) == 2
    assert re.fullmatch(r"step 2/4  loss \d+\.\d{4}  lr [\d.]+e-0\d  [\d,]+ tok/s  ETA \d+:\d\d", logs[0])
    assert re.search(r"step 4/4  loss \d+\.\d{4}  val \d+\.\d{4}  lr", logs[1])  # the last evaluation's loss
    assert [line for line in out if re.fullmatch(r"step [24]: train loss \d+\.\d{4}  val loss \d+\.\d{4}", line)]


def _help_entries(text: str) -> dict[str, str]:
    """flag name -> its help text, from ``--help`` output."""
    entries, name = {}, None
    for line in text.splitlines():
        m = re.match(r"  --(\w+)", line)
        if m:
            name = m.group(1)
            entries[name] = line.split("  ", 2)[-1] if re.search(r"\S\s{2,}\S", line.strip()) else ""
        elif name and line.startswith(" " * 10):
            entries[name] += " " + line.strip()
        else:
            name = None
    return entries


def test_every_field_has_help_and_train_help_shows_the_default_runs_values(capsys, monkeypatch):
    for cls in (TrainConfig, ModelConfig):
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 8, f"{cls.__name__}.{f.name} has no help text"
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    entries = _help_entries(capsys.readouterr().out)
    defaults = {**TrainConfig().to_dict(), **default_model().to_dict()}
    for name, value in defaults.items():
        if name in ("model", "vocab_size"):
            continue
        shown = re.search(r"\(default: (.*?)(, from the tiny preset)?\)$", entries[name])
        assert shown, f"--{name}: {entries[name]!r}"
        assert shown.group(1) == ("''" if value == "" else str(value)), name
    assert "(default: 128, from the tiny preset)" in entries["d_model"]  # not ModelConfig's 768
    # the defaults shown are what a default run builds
    assert default_model() == TrainConfig().model_config(TrainConfig().tokenizer_vocab)
    assert default_model().d_model == 128 and default_model().n_layers == 4


def test_enum_like_fields_list_their_choices(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for flag, choices in (
        ("attention", "baseline,gated,diff_v2,diff_v1"),
        ("pairing", "interleaved,split"),
        ("lambda_mode", "sigmoid,none,linear,const"),
        ("backend", "sdpa,eager,triton"),
        ("schedule", "cosine,wsd,constant"),
        ("preset", "tiny,small,125m,350m,1b"),
    ):
        assert f"--{flag} {{{choices}}}" in text
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--schedule", "linear"])  # a value outside the choices is refused by name
    assert exit_.value.code == 2 and "--schedule" in capsys.readouterr().err
