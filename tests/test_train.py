"""Trainer: loss falls, exact resume across processes, non-finite steps, configs, and one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from diffv2.cli import main
from diffv2.data import default_corpus_documents, prepare_dataset
from diffv2.model import Transformer
from diffv2.train.config import TrainConfig
from diffv2.train.monitor import SpikeDetector
from diffv2.train.schedule import lr_at
from diffv2.train.trainer import TrainingError, train

SMALL_MODEL = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_hidden=64)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Genesis to Leviticus (real English), byte-level tokens."""
    root = tmp_path_factory.mktemp("data")
    (root / "text").mkdir()
    for i, doc in enumerate(default_corpus_documents()[:3]):
        (root / "text" / f"book{i}.txt").write_text(doc, encoding="utf-8")
    prepare_dataset(root / "text", root / "prepared", tokenizer="byte", progress=False)
    return root / "prepared"


def small_cfg(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data_dir),
        out_dir=str(out),
        model=dict(SMALL_MODEL),
        steps=8,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        eval_every=4,
        eval_batches=2,
        log_every=2,
        diag_every=4,
        save_every=4,
        tensorboard=False,
        sample_tokens=0,
    )
    return TrainConfig(**{**base, **kw})


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_training_lowers_the_loss_and_writes_a_run(data_dir, tmp_path):
    summary = train(
        small_cfg(data_dir, tmp_path / "run", steps=60, eval_every=30, save_every=30, sample_tokens=20), progress=False
    )
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 1.0  # byte-level loss starts near ln(257) ≈ 5.5
    evals = read_metrics(tmp_path / "run", "eval")
    assert [e["step"] for e in evals] == [30, 60] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert summary["finished"] and Path(summary["checkpoint"]).name == "step_00000060"
    assert isinstance(summary["sample"], str) and len(summary["sample"]) > len("And God said")
    for name in ("config.json", "environment.json", "summary.json"):
        assert (tmp_path / "run" / name).is_file()
    assert not (tmp_path / "run" / "profile").exists()  # profile_steps defaults to 0
    diag = read_metrics(tmp_path / "run", "diag")
    assert diag and len(diag[-1]["sink_mass"]) == 2 and all(0 < m < 1 for m in diag[-1]["lambda_mean"])
    assert all("tokens_per_s" in r for r in read_metrics(tmp_path / "run") if r["step"] % 2 == 0)


def test_profiled_steps_write_a_kernel_table_and_a_trace(data_dir, tmp_path):
    train(small_cfg(data_dir, tmp_path / "run", steps=4, profile_start=1, profile_steps=2), progress=False)
    table = (tmp_path / "run" / "profile" / "rank0.txt").read_text(encoding="utf-8")
    assert "aten::" in table and "Self CPU" in table
    trace = json.loads((tmp_path / "run" / "profile" / "rank0.trace.json").read_text(encoding="utf-8"))
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::mm") or n.startswith("aten::addmm") for n in names)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffv2", "train", "--no-progress", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("attention", ["diff_v2", "diff_v1"])
def test_resume_in_a_new_process_is_bit_identical(data_dir, tmp_path, attention):
    flags = [
        "--data",
        str(data_dir),
        "--steps",
        "8",
        "--batch_size",
        "4",
        "--seq_len",
        "32",
        "--warmup_steps",
        "2",
        "--eval_every",
        "4",
        "--eval_batches",
        "2",
        "--log_every",
        "2",
        "--diag_every",
        "4",
        "--save_every",
        "100",
        "--no-tensorboard",
        "--sample_tokens",
        "0",
        "--attention",
        attention,
    ]
    flags += [x for k, v in SMALL_MODEL.items() for x in (f"--{k}", str(v))]
    straight = _cli(*flags, "--out_dir", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr
    first = _cli(*flags, "--out_dir", str(tmp_path / "b"), "--stop-after", "4")
    assert first.returncode == 0, first.stderr
    assert not (tmp_path / "b" / "summary.json").exists()
    second = _cli(*flags, "--out_dir", str(tmp_path / "b"), "--resume")
    assert second.returncode == 0, second.stderr
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]  # bit-identical
    assert [e["val_loss"] for e in read_metrics(tmp_path / "a", "eval")] == [
        e["val_loss"] for e in read_metrics(tmp_path / "b", "eval")
    ]


def test_non_finite_steps_are_skipped_then_abort(data_dir, tmp_path, monkeypatch):
    real_forward = Transformer.forward
    calls, bad = [0], {3, 4}  # training forward calls that return a NaN loss

    def flaky(self, tokens, targets=None, **kw):
        out = real_forward(self, tokens, targets, **kw)
        if targets is None or not self.training:
            return out
        calls[0] += 1
        return (out[0], out[1] * float("nan")) if calls[0] in bad else out

    monkeypatch.setattr(Transformer, "forward", flaky)
    summary = train(small_cfg(data_dir, tmp_path / "run", eval_every=0, diag_every=0), progress=False)
    records = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in records] == [False, False, True, True, False, False, False, False]
    assert summary["nonfinite"] == 2 and math.isfinite(records[-1]["loss"])

    calls[0], bad = 0, set(range(1, 100))  # every step is NaN from now on
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        train(small_cfg(data_dir, tmp_path / "run2", max_nonfinite=3, eval_every=0, diag_every=0), progress=False)


def test_config_file_and_flags(data_dir, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('steps = 5\nlr = 0.01\n[model]\npreset = "tiny"\nattention = "baseline"\nn_layers = 3\n')
    yaml = tmp_path / "c.yaml"
    yaml.write_text("steps: 5\nlr: 0.01\nmodel:\n  attention: baseline\n  n_layers: 3\n")
    from diffv2.cli import build_parser
    from diffv2.cli.train import config_from_args

    for path in (toml, yaml):
        cfg = config_from_args(
            build_parser().parse_args(["train", "--config", str(path), "--lr", "0.02", "--n-layers", "5", "--compile"])
        )
        assert (cfg.steps, cfg.lr, cfg.compile) == (5, 0.02, True)
        mc = cfg.model_config(vocab_size=300)
        assert (mc.attention, mc.n_layers, mc.vocab_size) == ("baseline", 5, 300)


def test_schedules():
    kw = dict(lr=1.0, steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(55, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(99, schedule="cosine", **kw) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(50, schedule="wsd", **kw) == 1.0 and lr_at(99, schedule="wsd", **kw) == pytest.approx(0.1)
    assert lr_at(90, schedule="wsd", **kw) == pytest.approx(1 - 0.9 * 11 / 20)
    assert lr_at(70, schedule="constant", **kw) == 1.0


def test_spike_detector_counts_outliers_and_round_trips():
    det = SpikeDetector(k=3.0, window=20)
    values = [1.0 + 0.01 * i for i in range(15)] + [10.0] + [1.1] * 3 + [5.0]
    flags = [det.update(v) for v in values]
    assert flags.count(True) == 2 and flags[15] and flags[-1]
    clone = SpikeDetector(k=3.0, window=20)
    clone.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert clone.update(4.0) == det.update(4.0) and clone.count == det.count


def _error_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_bad_inputs_give_one_line_errors(data_dir, tmp_path, capsys):
    base = [
        "train",
        "--data",
        str(data_dir),
        "--no-progress",
        "--no-tensorboard",
        "--sample_tokens",
        "0",
        "--eval_every",
        "0",
        "--diag_every",
        "0",
        "--batch_size",
        "4",
        "--seq_len",
        "32",
    ]
    base += ["--warmup_steps", "1"]
    base += [x for k, v in SMALL_MODEL.items() for x in (f"--{k}", str(v))]
    out = str(tmp_path / "run")
    assert "n_kv_heads" in _error_line(capsys, [*base, "--out_dir", out, "--n_kv_heads", "3"])
    assert "lr" in _error_line(capsys, [*base, "--out_dir", out, "--lr", "-1"])
    assert "--resume" in _error_line(capsys, [*base, "--out_dir", out, "--resume"])
    assert main([*base, "--out_dir", out, "--steps", "2"]) == 0
    capsys.readouterr()
    assert "--resume" in _error_line(capsys, [*base, "--out_dir", out, "--steps", "2"])  # would overwrite
    assert "n_layers" in _error_line(capsys, [*base, "--out_dir", out, "--steps", "4", "--resume", "--n_layers", "3"])
    assert "seq_len" in _error_line(capsys, [*base, "--out_dir", out, "--steps", "4", "--resume", "--seq_len", "16"])
    # a corrupted checkpoint names the file and nothing is overwritten
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002" / "model.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    assert "model.safetensors" in _error_line(capsys, [*base, "--out_dir", out, "--steps", "4", "--resume", "--force"])
    assert ckpt.is_file() and not (tmp_path / "run" / "checkpoints" / "step_00000004").exists()
    # a truncated shard names the shard
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in data_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = next(bad.glob("train_*.bin"))
    shard.write_bytes(shard.read_bytes()[:2000])
    args = [a if a != str(data_dir) else str(bad) for a in base]
    assert shard.name in _error_line(capsys, [*args, "--out_dir", str(tmp_path / "run3")])
    # an unknown field in a config file
    conf = tmp_path / "c.toml"
    conf.write_text("stepz = 3\n")
    assert "stepz" in _error_line(capsys, ["train", "--config", str(conf)])
    conf.write_text('compile = "yes"\n')  # a string where a switch belongs is refused, not taken as true
    assert "compile='yes': must be true or false" in _error_line(capsys, ["train", "--config", str(conf)])


def test_init_from_continues_a_trained_model_with_its_tokenizer(data_dir, tmp_path):
    first = train(small_cfg(data_dir, tmp_path / "first", steps=40, eval_every=0, diag_every=0), progress=False)
    # a fresh run from that model: its weights and architecture; the data is a text source prepared with the
    # checkpoint's tokenizer (byte-level here), and the optimizer and schedule start over
    text = tmp_path / "more.txt"
    text.write_text("\n".join(default_corpus_documents()[3:5]), encoding="utf-8")
    cfg = small_cfg(
        text, tmp_path / "second", model={}, steps=4, eval_every=0, diag_every=0, init_from=str(tmp_path / "first")
    )
    train(cfg, progress=False)
    starts = [read_metrics(tmp_path / run)[0]["loss"] for run in ("first", "second")]
    assert starts[1] < starts[0] - 1.0 and starts[1] < first["train_loss"] + 0.5
    saved = json.loads((tmp_path / "second" / "config.json").read_text())
    assert saved["train"]["init_from"] == str(tmp_path / "first") and saved["model"]["d_model"] == 32
    # the architecture is the checkpoint's: overriding it is refused, naming the field
    with pytest.raises(ValueError, match="n_layers"):
        train(small_cfg(data_dir, tmp_path / "third", init_from=str(tmp_path / "first")), progress=False)


def test_resume_from_a_checkpoint_written_before_a_model_field_existed(data_dir, tmp_path, monkeypatch):
    """A checkpoint's config lacks the model fields added since it was written: they take their defaults, so
    the run resumes; a field that really differs is still refused, by name."""
    import diffv2.train.setup as setup

    cfg = small_cfg(data_dir, tmp_path / "run", steps=6, save_every=2, eval_every=0, diag_every=0)
    train(cfg, stop_after=4, progress=False)
    real = setup.read_checkpoint_meta

    def written_before(path):
        state, cfg = real(path)
        cfg["model"].pop("recompute_pair_difference")
        return state, cfg

    monkeypatch.setattr(setup, "read_checkpoint_meta", written_before)
    train(cfg, resume=True, progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    other = cfg.replace(model={**SMALL_MODEL, "n_layers": 3})
    with pytest.raises(ValueError, match=r"model config differs .* \['n_layers'\]"):
        train(other, resume=True, progress=False)


def test_resuming_a_finished_run_keeps_its_results(data_dir, tmp_path):
    """A run killed after its final checkpoint is resumed to nothing more to train: the summary it reports (and
    writes again when the kill came before summary.json) has the run's own losses, not empty ones."""
    cfg = small_cfg(data_dir, tmp_path / "run", steps=4)
    first = train(cfg, progress=False)
    summary = tmp_path / "run" / "summary.json"
    written = summary.read_bytes()
    again = train(cfg, resume=True, progress=False)
    assert summary.read_bytes() == written and again["val_loss"] == first["val_loss"]
    summary.unlink()  # killed between the final checkpoint and the summary
    rebuilt = train(cfg, resume=True, progress=False)
    for key in ("step", "finished", "train_loss", "val_loss", "loss_spikes", "nonfinite"):
        assert rebuilt[key] == first[key], key
    assert json.loads(summary.read_text())["val_loss"] == first["val_loss"]


def test_a_new_run_replaces_the_records_of_an_attempt_that_saved_nothing(data_dir, tmp_path):
    """An attempt stopped before its first checkpoint leaves records no checkpoint continues; the next run in that
    folder starts the log anew instead of appending a second trajectory to it."""
    cfg = small_cfg(data_dir, tmp_path / "run", steps=3, save_every=0, eval_every=0, diag_every=0)
    (tmp_path / "run").mkdir()
    stale = [{"kind": "train", "step": s, "loss": 9.0} for s in (1, 2)]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    train(cfg, progress=False)
    steps = [r["step"] for r in read_metrics(tmp_path / "run")]
    assert steps == [1, 2, 3] and all(r["loss"] != 9.0 for r in read_metrics(tmp_path / "run"))
