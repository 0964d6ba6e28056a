"""`diffv2 data prepare` says what it left out and when its validation split is too small to trust."""

from __future__ import annotations

import numpy as np
import pytest

from diffv2.cli import main
from diffv2.data import prepare_dataset
from diffv2.train.config import TrainConfig


def _words(rng: np.random.Generator, n: int) -> str:
    vocab = ["the", "earth", "was", "without", "form", "and", "void", "light", "day", "night"]
    return " ".join(rng.choice(vocab, size=n))


def test_prepare_reports_skipped_files_and_empty_documents(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    (src / "notes").mkdir(parents=True)
    (src / ".cache").mkdir()
    for i in range(3):
        (src / f"doc{i}.txt").write_text(_words(rng, 400), encoding="utf-8")
    (src / "notes" / "a.jsonl").write_text('{"text": "x y z"}\n{"text": ""}\n', encoding="utf-8")
    (src / "empty.md").write_text("", encoding="utf-8")
    for name in ("paper.pdf", "notes/b.pdf", "notes/page.html", "LICENSE", ".cache/c.txt"):
        (src / name).write_bytes(b"\x00\x01binary")
    assert (
        main(
            [
                "data",
                "prepare",
                "--source",
                str(src),
                "--out",
                str(tmp_path / "out"),
                "--tokenizer",
                "byte",
                "--no-progress",
                "--val-fraction",
                "0.3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "skipped 5 file(s) that are not .txt/.md/.jsonl(.gz): 1 without an extension, 1 .html, 2 .pdf, 1 hidden" in out
    )
    assert "skipped 2 empty document(s)" in out  # empty.md and the empty JSONL line
    assert "warning: the validation split holds" in out  # a few hundred tokens


def test_split_warnings_follow_the_numbers(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):  # four large documents: val_fraction 0.01 still takes a whole one (about 25%)
        (src / f"d{i}.txt").write_text(_words(rng, 5000), encoding="utf-8")
    manifest = prepare_dataset(src, tmp_path / "a", tokenizer="byte", val_fraction=0.01, progress=False)
    assert manifest["skipped"] == {"files": {}, "empty_documents": 0}
    share = manifest["splits"]["val"]["n_tokens"] / sum(s["n_tokens"] for s in manifest["splits"].values())
    assert share > 0.15 and any("% of the tokens for val_fraction=0.01" in w for w in manifest["warnings"])
    assert not any("too few" in w for w in manifest["warnings"])  # tens of thousands of tokens: enough
    for i in range(4, 400):  # many documents: the split is the fraction asked for, and nothing to warn about
        (src / f"d{i}.txt").write_text(_words(rng, 100), encoding="utf-8")
    manifest = prepare_dataset(src, tmp_path / "b", tokenizer="byte", val_fraction=0.1, progress=False)
    assert manifest["warnings"] == []


def test_prepare_and_train_share_the_vocabulary_default(capsys):
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    assert f"(default: {TrainConfig().tokenizer_vocab})" in " ".join(capsys.readouterr().out.split())
