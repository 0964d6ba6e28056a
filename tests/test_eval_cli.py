"""diffv2.eval around the tasks: MQAR (generator, scorer, training grid), ``diffv2 eval`` on a checkpoint (files,
determinism by seed, one-line errors) and loading a Hugging Face folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffv2 import ModelConfig, Transformer
from diffv2.checkpoint import save_checkpoint
from diffv2.cli import main
from diffv2.data import Tokenizer, prepare_dataset
from diffv2.errors import ConfigError
from diffv2.eval import evaluate_checkpoint, load_for_eval, mqar

from .eval_stubs import Lookahead, Uniform

SMALL = dict(
    vocab_size=64,
    seq_len=40,
    n_pairs=5,
    noise=2,
    d_model=32,
    n_layers=1,
    n_heads=2,
    steps=2,
    batch_size=4,
    lrs=[1e-3],
    seeds=[0],
    eval_size=8,
)


@pytest.mark.parametrize("noise", [0, 3])
def test_mqar_answers_are_recoverable_from_inputs(noise: int) -> None:
    cfg = mqar.MQARConfig(**SMALL)
    inputs, targets = mqar.generate(cfg, 16, noise, torch.Generator().manual_seed(noise))
    keys, values, noise_ids = mqar.token_ranges(cfg.vocab_size)
    assert (targets != -100).sum(1).tolist() == [cfg.n_pairs] * 16
    for x, y in zip(inputs.tolist(), targets.tolist(), strict=True):
        for p, answer in enumerate(y):
            if answer == -100:
                continue
            assert x[p] in keys and answer in values
            first = x.index(x[p])  # the key's first occurrence: its value follows it there
            assert first < p and x[first + 1] == answer
        context = x[: cfg.n_pairs * (2 + noise)]
        assert sum(t in noise_ids for t in context) == noise * cfg.n_pairs
    again, _ = mqar.generate(cfg, 16, noise, torch.Generator().manual_seed(noise))
    assert torch.equal(inputs, again)


def test_mqar_scorer_oracle_and_uniform() -> None:
    cfg = mqar.MQARConfig(**SMALL)
    inputs, targets = mqar.generate(cfg, 12, 2, torch.Generator().manual_seed(1))
    assert mqar.accuracy(Lookahead(cfg.vocab_size), inputs, targets) == 1.0
    assert mqar.accuracy(Uniform(cfg.vocab_size), inputs, targets) == pytest.approx(1 / cfg.vocab_size)


def test_mqar_grid_trains_matched_variants() -> None:
    cfg = mqar.MQARConfig(**SMALL)
    out = mqar.run_grid(cfg, list(mqar.VARIANTS), torch.device("cpu"))
    params = out["params"]
    for name in ("baseline", "diff_v1"):  # matched to DIFF V2 within one SwiGLU unit per layer
        assert abs(params[name] - params["diff_v2"]) <= 3 * cfg.d_model * cfg.n_layers
    for mode in ("clean", "noisy"):
        runs = out["modes"][mode]["runs"]
        assert len(runs) == 3 and all(0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["train_loss"]) for r in runs)
        assert set(out["modes"][mode]["best"]) == set(mqar.VARIANTS)
    with pytest.raises(ValueError, match="--variants: unknown"):
        mqar.variant_configs(cfg, ["diff_v3"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny run as the trainer leaves it: a checkpoint, and config.json naming its prepared dataset."""
    root = tmp_path_factory.mktemp("evalrun")
    rng = np.random.default_rng(0)
    (root / "text").mkdir()
    for i in range(12):
        words = ["".join(rng.choice(list("abcdefghij"), 4)) for _ in range(300)]
        (root / "text" / f"{i}.txt").write_text(". ".join(words), encoding="utf-8")
    prepare_dataset(root / "text", root / "data", tokenizer="byte", val_fraction=0.4, progress=False)
    tok = Tokenizer.from_file(root / "data" / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", attention="diff_v2", vocab_size=tok.vocab_size, max_seq_len=64))
    config = {"train": {"seq_len": 64}, "model": model.cfg.to_dict()}
    save_checkpoint(
        root / "run",
        1,
        model=model,
        state={"step": 1, "tokenizer_sha256": tok.sha256()},
        config=config,
        tokenizer_json=tok.to_json_str(),
    )
    (root / "run" / "config.json").write_text(json.dumps({**config, "data": {"dir": str(root / "data")}}))
    return root, model


def test_eval_cli_writes_results_deterministically(run_dir, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = run_dir
    results = []
    for name in ("a", "b"):
        out = root / name
        argv = [
            "eval",
            "--checkpoint",
            str(root / "run"),
            "--tasks",
            "ar_hit,distractor",
            "--quick",
            "--out",
            str(out),
            "--no-progress",
            "--seed",
            "3",
        ]
        assert main(argv) == 0
        assert {p.name for p in out.iterdir()} == {"eval.json", "eval.md"}
        data = json.loads((out / "eval.json").read_text())
        assert data["settings"]["train_len"] == 64 and data["settings"]["format"] == "native"
        for task in data["tasks"].values():
            assert task["text"] == f"val split of {root / 'data'}"  # the run's own val text, not the corpus
            task.pop("seconds")
        results.append(data["tasks"])
    assert results[0] == results[1]
    assert "## distractor" in capsys.readouterr().out


def test_eval_cli_errors_are_one_line(run_dir, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = run_dir
    assert main(["eval", "--tasks", "needle"]) == 2
    assert main(["eval", "--checkpoint", str(root / "run"), "--tasks", "needle,haystack"]) == 2
    assert main(["eval", "--checkpoint", str(root / "missing"), "--tasks", "needle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("diffv2: error: ") for line in err)
    assert "needle" in err[0] and "'haystack'" in err[1]


def test_hf_folder_loads_as_the_same_model(run_dir) -> None:
    pytest.importorskip("transformers")
    from diffv2.hf import export_hf

    root, model = run_dir
    export_hf(root / "run", root / "hf")
    loaded = load_for_eval(root / "hf")
    assert loaded.info["format"] == "hf" and loaded.info["train_len"] == 64
    assert loaded.tokenizer.sha256() == Tokenizer.byte_level().sha256()
    tokens = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), model(tokens))


def test_mqar_runs_without_a_checkpoint(tmp_path) -> None:
    cfg = mqar.MQARConfig(**SMALL)
    summary = evaluate_checkpoint(
        None,
        "mqar",
        out=tmp_path,
        device="cpu",
        progress=False,
        options={"mqar_config": cfg, "variants": ["baseline", "diff_v2"]},
    )
    result = summary["tasks"]["mqar"]
    assert set(result["modes"]["noisy"]["best"]) == {"baseline", "diff_v2"} and result["modes"]["noisy"]["noise"] == 2
    assert "| noisy (noise 2) | diff_v2 |" in (tmp_path / "eval.md").read_text()
    with pytest.raises(ConfigError, match="--checkpoint: needle"):
        evaluate_checkpoint(None, "needle", out=tmp_path, device="cpu")
