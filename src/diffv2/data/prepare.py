"""Turn a text source into a tokenized dataset folder: shards, tokenizer.json and manifest.json (its schema and
checks: :mod:`.manifest`)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import MAX_SIZE, check_fraction, check_int, check_number, check_seed, check_str
from ..errors import DataError
from .corpus import DEFAULT_SOURCE, default_corpus_info, iter_documents, iter_labeled_documents, skipped_files
from .dedup import NGRAM, ShinglePool, WordIds, overlap, shingles
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, SPLITS, TOKENIZER_NAME
from .notices import split_warnings
from .shards import ShardWriter, atomic_write_bytes, version_for_max_id
from .tokenizer import Tokenizer

_DATASET_FILE = re.compile(r"^(?:(?:train|val)_\d{6}\.bin|tokenizer\.json|manifest\.json|val_documents\.json)$")
DOCUMENTS_NAME = "val_documents.json"  # per val document: token count and source (see .documents)
_TEMP_FILE = re.compile(r"^\.(.+)\.[^.]+\.tmp$")
# Documents are encoded in chunks: big enough for the parallel batch encoder, small enough for memory.
_CHUNK_DOCS = 1024
_CHUNK_CHARS = 8_000_000


def _diffv2_version() -> str:
    try:
        return importlib.metadata.version("diffv2")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _is_dataset_file(name: str) -> bool:
    # Also the temp files an interrupted atomic write leaves behind: ".<name>.<random>.tmp".
    tmp = _TEMP_FILE.match(name)
    return bool(_DATASET_FILE.match(tmp.group(1) if tmp else name))


def _old_dataset_files(out_dir: Path, overwrite: bool) -> list[Path]:
    """Files of a dataset already in ``out_dir``, which only ``overwrite`` allows replacing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output {out_dir} exists and is not a folder")
    old = sorted(p for p in out_dir.glob("*") if _is_dataset_file(p.name)) if out_dir.is_dir() else []
    others = sorted(p.name for p in out_dir.glob("*") if not _is_dataset_file(p.name)) if out_dir.is_dir() else []
    if others and not (out_dir / MANIFEST_NAME).exists():  # e.g. a model folder: its tokenizer.json would go
        raise DataError(
            f"{out_dir} holds files that are no dataset's ({', '.join(others[:3])}); prepare into a new or empty folder"
        )
    if old and not overwrite:
        what = "a dataset" if (out_dir / MANIFEST_NAME).exists() else "an unfinished prepare (no manifest.json)"
        raise DataError(
            f"{out_dir} already holds {what}; pass --overwrite (overwrite=True) to replace it, "
            "or choose another --out folder"
        )
    return old


def _val_indices(n_docs: int, val_fraction: float, seed: int) -> set[int]:
    if n_docs < 2 or val_fraction == 0:
        return set()
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    rng = np.random.default_rng([seed, 0x5EED])
    return {int(i) for i in rng.choice(n_docs, size=n_val, replace=False)}


def _chunks(documents: Iterable[tuple[str, str]]) -> Iterator[list[tuple[int, str, str]]]:
    """Numbered (index, source, text) documents in chunks of at most _CHUNK_DOCS documents / about _CHUNK_CHARS
    characters."""
    chunk: list[tuple[int, str, str]] = []
    chars = 0
    for i, (label, doc) in enumerate(documents):
        chunk.append((i, label, doc))
        chars += len(doc)
        if len(chunk) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _fixed_tokenizer(tokenizer: str | Path | Tokenizer) -> Tokenizer | None:
    """The tokenizer named by ``tokenizer``, or None for "bpe" (trained later, once the split is known)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if str(tokenizer) == "bpe":
        return None
    if str(tokenizer) == "byte":
        return Tokenizer.byte_level()
    if not Path(tokenizer).exists():
        raise DataError(f"tokenizer {tokenizer!r} is not 'bpe', 'byte', or an existing tokenizer.json file")
    return Tokenizer.from_file(tokenizer)


class _SplitWriter:
    """Writes one split as a numbered series of shards of at most ``shard_tokens`` tokens each."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, version: int) -> None:
        self.out_dir, self.split, self.shard_tokens, self.version = out_dir, split, shard_tokens, version
        self.shards: list[dict] = []
        self.n_documents = 0
        self._writer: ShardWriter | None = None

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._writer is None:
                name = f"{self.split}_{len(self.shards):06d}.bin"
                self._writer = ShardWriter(self.out_dir / name, self.version)
            room = self.shard_tokens - self._writer.n_tokens
            self._writer.write(tokens[:room])
            tokens = tokens[room:]
            if self._writer.n_tokens >= self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        assert self._writer is not None
        writer, self._writer = self._writer, None
        sha = writer.close()
        size = writer.path.stat().st_size
        self.shards.append({"file": writer.path.name, "n_tokens": writer.n_tokens, "bytes": size, "sha256": sha})

    def finish(self) -> dict:
        if self._writer is not None:
            self._close_shard()
        return {
            "n_documents": self.n_documents,
            "n_tokens": sum(s["n_tokens"] for s in self.shards),
            "shards": self.shards,
        }

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


class _ValSplit:
    """The validation split as it is written: each document's source and length are recorded; with a near-dup
    threshold the documents wait until the whole train split has been seen, then those overlapping it go."""

    def __init__(self, writer: _SplitWriter, threshold: float | None) -> None:
        self.writer, self.threshold = writer, threshold
        self.sources: dict[str, int] = {}
        self.documents: list[list[int]] = []  # [n_tokens, source index] per written document
        self.waiting: list[tuple[str, np.ndarray, np.ndarray]] = []
        self.words = WordIds()
        self.train = ShinglePool()

    def saw_train(self, text: str) -> None:
        if self.threshold is not None:
            self.train.add(shingles(self.words(text)))

    def add(self, label: str, text: str, tokens: np.ndarray) -> None:
        if self.threshold is None:
            self._write(label, tokens)
        else:
            self.waiting.append((label, tokens, shingles(self.words(text))))

    def _write(self, label: str, tokens: np.ndarray) -> None:
        self.writer.write(tokens)
        self.writer.n_documents += 1
        self.documents.append([int(tokens.size), self.sources.setdefault(label, len(self.sources))])

    def finish(self) -> dict | None:
        """Write the waiting documents that pass; returns what was dropped (None without a threshold)."""
        if self.threshold is None:
            return None
        pool = self.train.merged()
        dropped = []
        for label, tokens, doc_shingles in self.waiting:
            share = overlap(doc_shingles, pool)
            if share >= self.threshold:  # NaN (fewer than 13 words) compares False: kept
                dropped.append({"source": label, "n_tokens": int(tokens.size), "overlap": round(share, 4)})
            else:
                self._write(label, tokens)
        self.waiting = []
        return {
            "ngram": NGRAM,
            "threshold": self.threshold,
            "dropped_documents": len(dropped),
            "dropped_tokens": sum(d["n_tokens"] for d in dropped),
            "dropped": dropped,
        }

    def record(self) -> dict:
        return {"sources": list(self.sources), "documents": self.documents}


def prepare_dataset(
    source: str | Path,
    out_dir: str | Path,
    tokenizer: str | Path | Tokenizer = "bpe",
    vocab_size: int = 4096,
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
    seed: int = 0,
    text_field: str = "text",
    progress: bool = True,
    overwrite: bool = False,
    val_near_dup_threshold: float | None = None,
) -> dict:
    """Tokenize ``source`` into ``out_dir`` and return the manifest (also written as manifest.json).

    Documents are split into train/val by document (a seeded random choice of ``val_fraction`` of them,
    at least one when there are two or more; a single document has its tokens split instead). Every
    document is followed by the end-of-text token. The manifest is written last, so a folder without one
    is an unfinished prepare. A "bpe" tokenizer is trained on the train documents only.

    With ``val_near_dup_threshold`` a validation document is dropped when that share (or more) of its word
    13-grams occurs in the train split (see :mod:`.dedup`); the manifest lists what was dropped. Every kept
    validation document's token count and source go to ``val_documents.json`` (see :mod:`.documents`).
    """
    check_fraction("val_fraction", val_fraction, below_one=True)
    check_int("vocab_size", vocab_size, minimum=1, maximum=MAX_SIZE)
    check_int("shard_tokens", shard_tokens, minimum=1, maximum=2**31 - 1)  # the shard header counts in int32
    check_seed("seed", seed)
    check_str("text_field", text_field, empty=False)
    if val_near_dup_threshold is not None:
        check_number("val_near_dup_threshold", val_near_dup_threshold, positive=True, maximum=1)
    out_dir = Path(out_dir)
    fixed = _fixed_tokenizer(tokenizer)  # before the long passes, so a bad path fails at once
    old = _old_dataset_files(out_dir, overwrite)

    # A counting pass first: the split is chosen by document index, and the progress bar needs a total.
    empty = [0]
    n_docs = sum(1 for _ in iter_labeled_documents(source, text_field, empty))
    val_idx = _val_indices(n_docs, val_fraction, seed)
    if fixed is None:
        train_docs = (d for i, d in enumerate(iter_documents(source, text_field)) if i not in val_idx)
        tok = Tokenizer.train_bpe(train_docs, vocab_size=vocab_size, show_progress=progress)
    else:
        tok = fixed
    version = version_for_max_id(tok.vocab_size - 1)
    dtype = np.uint16 if version == 1 else np.uint32
    # The old dataset goes only now, after the source was read through without error; the manifest goes
    # first so that a crash half-way leaves a folder marked unfinished rather than a broken dataset.
    for p in sorted(old, key=lambda p: p.name != MANIFEST_NAME):
        p.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {s: _SplitWriter(out_dir, s, shard_tokens, version) for s in SPLITS}
    val = _ValSplit(writers["val"], val_near_dup_threshold if n_docs > 1 else None)
    try:
        with tqdm(total=n_docs, unit="doc", desc="tokenizing", disable=not progress) as bar:
            for chunk in _chunks(iter_labeled_documents(source, text_field)):
                ids = tok.encode_batch([doc for _, _, doc in chunk])
                train_docs = []
                for (i, label, doc), t in zip(chunk, ids, strict=True):
                    tokens = np.append(np.asarray(t, dtype=dtype), dtype(tok.eot_id))
                    if n_docs == 1 and val_fraction > 0:
                        # One document cannot be split by document, so its token stream is cut instead.
                        n_val = min(tokens.size - 1, max(1, round(tokens.size * val_fraction)))
                        writers["train"].write(tokens[: tokens.size - n_val])
                        val.add(label, doc, tokens[tokens.size - n_val :])
                        writers["train"].n_documents = 1
                    elif i in val_idx:
                        val.add(label, doc, tokens)
                    else:
                        train_docs.append(tokens)
                        val.saw_train(doc)
                if train_docs:
                    writers["train"].write(np.concatenate(train_docs))
                    writers["train"].n_documents += len(train_docs)
                bar.update(len(chunk))
        near_dups = val.finish()
        splits = {s: w.finish() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise

    atomic_write_bytes(out_dir / DOCUMENTS_NAME, (json.dumps(val.record()) + "\n").encode("utf-8"))
    tok.save(out_dir / TOKENIZER_NAME)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": _describe_source(source),
        "text_field": text_field,
        "tokenizer_kind": tok.kind,
        "tokenizer_file": TOKENIZER_NAME,
        "tokenizer_sha256": tok.sha256(),
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "shard_version": version,
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
        "splits": splits,
        "val_near_duplicates": near_dups,
        "skipped": {"files": skipped_files(source), "empty_documents": empty[0]},
        "warnings": split_warnings(splits, val_fraction, n_docs),
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "diffv2_version": _diffv2_version(),
    }
    atomic_write_bytes(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


def _describe_source(source: str | Path) -> dict:
    if str(source) == DEFAULT_SOURCE:
        info = default_corpus_info()
        return {"given": DEFAULT_SOURCE, "resolved": f"{info['name']} ({info['source_package']})", **info}
    return {"given": str(source), "resolved": str(Path(source).expanduser().resolve())}
