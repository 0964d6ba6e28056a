"""Validation documents: sources, the select/test halves, whole-split eval batches, near-duplicate check and drop."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from diffv2.cli import main
from diffv2.data import EvalBatches, prepare_dataset, split_documents, spread_windows
from diffv2.data.dedup import near_duplicates, shingles, within_split
from diffv2.data.documents import document_half
from diffv2.errors import ConfigError
from diffv2.train.config import TrainConfig

TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_hidden=64)

WORDS = [a + b for a in ("ri", "sto", "lan", "mea", "co", "or") for b in ("ver", "ne", "tern", "dow")]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def write_sources(root: Path, docs: dict[str, list[str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, texts in docs.items():
        with (root / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
    return root


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    """Three sources of random documents, 30% of them in validation."""
    rng = random.Random()
    root = tmp_path_factory.mktemp("labeled")
    src = write_sources(
        root / "src",
        {name: [sentence(rng, rng.randint(20, 80)) for _ in range(12)] for name in ("alpha", "beta", "gamma")},
    )
    prepare_dataset(src, root / "data", tokenizer="byte", val_fraction=0.3, seed=rng.randrange(1000), progress=False)
    return root / "data"


def test_val_documents_keep_their_source_and_a_hash_half(labeled):
    docs = split_documents(labeled)
    manifest = json.loads((labeled / "manifest.json").read_text())
    assert docs.labeled and set(docs.sources) <= {"alpha", "beta", "gamma"}
    assert len(docs.ends) == manifest["splits"]["val"]["n_documents"] == 11  # round(36 * 0.3)
    assert docs.ends[-1] == manifest["splits"]["val"]["n_tokens"]
    # the half is a function of the document's tokens alone
    tokens = val_tokens(labeled)
    starts = np.concatenate([[0], docs.ends[:-1]])
    assert [document_half(tokens[a:b]) for a, b in zip(starts, docs.ends, strict=True)] == docs.half.tolist()
    described = docs.describe()
    assert described["select"]["documents"] + described["test"]["documents"] == 11
    assert described["select"]["tokens"] + described["test"]["tokens"] == docs.ends[-1]
    # every target position of the whole split lands in the group of the document holding it
    ev = EvalBatches(labeled, "val", batch_size=3, seq_len=16, whole=True)
    positions = np.concatenate([ev.target_positions(i).ravel() for i in range(ev.n_batches)])
    assert positions.max() == ((docs.ends[-1] - 1) // 16) * 16  # every window, the partial last batch included
    groups = docs.groups_of(positions)
    doc = np.searchsorted(docs.ends, positions, side="right")
    assert np.array_equal(groups, docs.half[doc] * len(docs.sources) + docs.source[doc])


def val_tokens(data: Path) -> np.ndarray:
    shards = json.loads((data / "manifest.json").read_text())["splits"]["val"]["shards"]
    return np.concatenate([np.fromfile(data / s["file"], dtype="<u2", offset=1024) for s in shards])


def test_summaries_weigh_tokens_and_name_the_halves(labeled):
    docs = split_documents(labeled)
    rng = np.random.default_rng()
    count = rng.integers(1, 50, docs.n_groups).astype(float)
    mean = rng.uniform(1, 5, docs.n_groups)
    out = docs.summarize(mean * count, count)
    assert out["val_loss"] == pytest.approx((mean * count).sum() / count.sum())
    n = len(docs.sources)
    assert out["val_loss_test"] == pytest.approx((mean * count)[n:].sum() / count[n:].sum())
    assert out["val_by_group"]["select"][docs.sources[0]] == [pytest.approx(mean[0]), int(count[0])]


def test_an_old_dataset_gets_boundaries_from_end_of_text(labeled, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for f in labeled.iterdir():
        if f.name != "val_documents.json":
            (old / f.name).write_bytes(f.read_bytes())
    docs, ref = split_documents(old), split_documents(labeled)
    assert not docs.labeled and docs.sources == ["all"]
    assert np.array_equal(docs.ends, ref.ends) and np.array_equal(docs.half, ref.half)


def test_diagnostic_windows_spread_over_the_split(labeled):
    windows = spread_windows(labeled, "val", seq_len=16, n=5)
    tokens = val_tokens(labeled)
    assert windows.shape == (5, 16) and windows[0].tolist() == tokens[:16].tolist()
    assert windows[-1].tolist() == tokens[-17:-1].tolist()  # the last window that still has a target


# ---------------------------------------------------------------------- near duplicates
def test_shingles_and_overlap_on_constructed_text():
    rng = random.Random()
    base = [sentence(rng, 40) for _ in range(4)]
    edited = base[0].replace(".", "").split()
    edited[20] = "zebra"  # one word changed: most 13-grams survive
    val = [" ".join(edited), sentence(rng, 40), "too short to have any"]
    report = near_duplicates(base, val, threshold=0.5)
    assert report.val_vs_train[0].overlap == pytest.approx(1 - 13 / 28, abs=1e-9)  # 13 of 28 grams hold "zebra"
    assert report.val_vs_train[1].overlap < 0.2 and np.isnan(report.val_vs_train[2].overlap)
    assert [d.index for d in report.flagged_val()] == [0]
    assert report.passage(val[0]).startswith(edited[0]) and report.passage(val[1]) == ""
    assert shingles(np.arange(12, dtype=np.uint64)).size == 0 and shingles(np.arange(14, dtype=np.uint64)).size == 2


def test_within_train_duplicates_find_their_partner():
    rng = random.Random()
    docs = [sentence(rng, 60) for _ in range(5)]
    docs.append(docs[2].upper() + " " + sentence(rng, 5))  # the same text up to case, plus a tail
    report = near_duplicates(docs, [], threshold=0.8)
    assert sorted(d.index for d in report.within_train) == [2, 5]
    assert {d.index: d.partner for d in report.within_train} == {2: 5, 5: 2}
    assert within_split([], 0.5) == []


def test_prepare_drops_validation_near_duplicates(tmp_path):
    rng = random.Random()
    train_docs = [sentence(rng, 60) for _ in range(30)]
    src = write_sources(tmp_path / "src", {"a": train_docs})
    reference = prepare_dataset(src, tmp_path / "keep", tokenizer="byte", val_fraction=0.2, seed=3, progress=False)
    # make every would-be validation document a copy of a train document with one word changed
    copy = train_docs[:]
    val_count = reference["splits"]["val"]["n_documents"]
    for k in range(len(copy)):
        words = train_docs[(k + 1) % len(copy)].split()
        words[30] = "zebra"
        copy[k] = " ".join(words) if k % 2 else copy[k]
    write_sources(tmp_path / "src2", {"a": copy})
    kept = prepare_dataset(
        tmp_path / "src2",
        tmp_path / "drop",
        tokenizer="byte",
        val_fraction=0.2,
        seed=3,
        progress=False,
        val_near_dup_threshold=0.5,
    )
    near = kept["val_near_duplicates"]
    assert near["dropped_documents"] >= 1 and near["dropped_documents"] + kept["splits"]["val"]["n_documents"] == (
        val_count
    )
    assert all(d["overlap"] >= 0.5 for d in near["dropped"])
    docs = split_documents(tmp_path / "drop")
    assert len(docs.ends) == kept["splits"]["val"]["n_documents"]
    assert reference["val_near_duplicates"] is None
    with pytest.raises(ConfigError, match="val_near_dup_threshold"):
        prepare_dataset(src, tmp_path / "bad", tokenizer="byte", val_near_dup_threshold=1.5, progress=False)


def test_dedup_check_command(labeled, tmp_path, capsys):
    out = tmp_path / "dups.json"
    assert main(["data", "dedup-check", "--data", str(labeled), "--json", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "val vs train:" in text and "within train:" in text
    result = json.loads(out.read_text())
    assert result["n_val"] == 11 and len(result["val"]) == 11 and result["n_train"] == 25
    assert main(["data", "dedup-check", "--data", str(labeled), "--threshold", "2"]) == 2


# ---------------------------------------------------------------------- the trainer's evaluation
def test_training_scores_the_whole_split_by_half_and_source(labeled, tmp_path):
    from diffv2.train import train

    out = tmp_path / "run"
    train(
        TrainConfig(
            data=str(labeled),
            out_dir=str(out),
            model=dict(TINY),
            steps=4,
            batch_size=3,
            seq_len=16,
            warmup_steps=1,
            eval_every=2,
            eval_batches=0,
            diag_every=0,
            diag_dense_until=2,
            diag_batch=5,
            save_every=4,
            tensorboard=False,
            sample_tokens=0,
        ),
        progress=False,
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in records if r["kind"] == "diag"] == [1, 2]
    docs = split_documents(labeled)
    last = evals[-1]
    assert last["val_tokens"] == ((docs.ends[-1] - 1) // 16) * 16  # every window of the split
    groups = last["val_by_group"]
    assert set(groups) == {"select", "test"} and set(groups["select"]) | set(groups["test"]) <= set(docs.sources)
    for half in ("select", "test"):
        pairs = groups[half].values()
        mean = sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs)
        assert last[f"val_loss_{half}"] == pytest.approx(mean)
    tokens = sum(n for half in groups.values() for _, n in half.values())
    assert tokens == last["val_tokens"]
    split = json.loads((out / "val_split.json").read_text())
    assert split["scored_target_tokens"] == last["val_tokens"] and "blake2b" in split["rule"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss_test"] == last["val_loss_test"]
