"""lm-evaluation-harness offline: a local perplexity task from our val split, in-process and from folders."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # lm-eval's HFLM imports it
pytest.importorskip("lm_eval")

import diffv2.hf as H
from diffv2 import ModelConfig, Transformer
from diffv2.checkpoint import save_checkpoint
from diffv2.cli import evaluate as evaluate_cli
from diffv2.data import Tokenizer, prepare_dataset

DOCS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep. " * 2,
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good.",
]


def bits_per_byte(model: Transformer, tok: Tokenizer, docs: list[str]) -> float:
    """What lm-eval's rolling loglikelihood computes, by hand: every document scored after an end-of-text token."""
    total, n_bytes = 0.0, 0
    for doc in docs:
        ids = torch.tensor([[tok.eot_id, *tok.encode(doc)]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1]).double(), -1)
        total += logp[0].gather(-1, ids[0, 1:, None]).sum().item()
        n_bytes += len(doc.encode("utf-8"))
    return -total / n_bytes / math.log(2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Transformer, Tokenizer, list[str]]:
    root = tmp_path_factory.mktemp("lmeval")
    (root / "text").mkdir()
    for i, doc in enumerate(DOCS * 5):  # enough documents that the val split gets some
        (root / "text" / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    prepare_dataset(root / "text", root / "data", tokenizer="byte", val_fraction=0.2, progress=False)
    tok = Tokenizer.from_file(root / "data" / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=tok.vocab_size,
            d_model=32,
            n_layers=2,
            n_heads=2,
            n_kv_heads=1,
            head_dim=16,
            ffn_hidden=64,
            max_seq_len=256,
        )
    ).eval()
    state = {"step": 1, "tokenizer_sha256": tok.sha256()}
    save_checkpoint(
        root / "run",
        1,
        model=model,
        state=state,
        config={"train": {}, "model": model.cfg.to_dict()},
        tokenizer_json=tok.to_json_str(),
    )
    docs = H.val_documents(root / "data")
    return root, model, tok, docs


def test_val_documents_are_the_val_split(setup) -> None:
    _, _, _, docs = setup
    assert docs and all(d in DOCS for d in docs)


def test_in_process_perplexity_matches_manual(setup) -> None:
    root, model, tok, docs = setup
    task_dir = H.write_perplexity_task(root / "task", docs)
    assert (task_dir / "diffv2_val_ppl.yaml").is_file() and (task_dir / "diffv2_val_ppl.jsonl").is_file()
    results = H.evaluate_lm(model, ["diffv2_val_ppl"], tokenizer=tok, include_path=task_dir)
    got = results["diffv2_val_ppl"]["bits_per_byte,none"]
    assert got == pytest.approx(bits_per_byte(model, tok, docs), rel=1e-6)


def test_checkpoint_and_hf_folder(setup) -> None:
    root, model, tok, docs = setup
    task_dir = H.write_perplexity_task(root / "task2", docs[:2])
    expected = bits_per_byte(model, tok, docs[:2])
    H.export_hf(root / "run", root / "hf")
    for source in (root / "run", root / "hf"):  # tokenizer found beside the weights in both
        results = H.evaluate_lm(source, ["diffv2_val_ppl"], include_path=task_dir)
        assert results["diffv2_val_ppl"]["bits_per_byte,none"] == pytest.approx(expected, rel=1e-6)


def test_evaluate_cli(setup, capsys: pytest.CaptureFixture[str]) -> None:
    root, model, tok, docs = setup
    parser = argparse.ArgumentParser()
    evaluate_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["evaluate", str(root / "run"), "--data", str(root / "data"), "--max-docs", "2"])
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("diffv2_val_ppl: ") and f"bits_per_byte {bits_per_byte(model, tok, docs[:2]):.4f}" in line
