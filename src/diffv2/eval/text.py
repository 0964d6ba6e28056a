"""Text the tasks build on, as token ids of the model's own tokenizer: the run's validation split when its dataset
is on disk (and was tokenized by the same tokenizer), else the embedded corpus. Nothing is downloaded.

Documents are kept apart (distractor needs whole documents); haystacks are windows of one stream in which the
documents follow each other with a blank line between them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.corpus import default_corpus_documents, default_corpus_info
from ..data.loader import split_shard_paths
from ..data.manifest import verify_dataset
from ..data.shards import read_shard
from ..data.tokenizer import Tokenizer
from ..errors import DiffV2Error

SENTENCE_ENDS = (".", "!", "?", "\n", ":", ";")


@dataclass
class TextSource:
    documents: list[np.ndarray]  # int64 token ids, one array per document
    source: str  # where they came from, for the result
    separator: list[int]  # the tokens between two documents in the stream (a blank line)
    stream: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if not self.documents:
            raise DiffV2Error(f"{self.source}: no documents to build haystacks from")
        sep = np.asarray(self.separator, dtype=np.int64)
        parts = [part for doc in self.documents for part in (doc, sep)]
        self.stream = np.concatenate(parts[:-1])

    def window(self, length: int, rng: np.random.Generator) -> np.ndarray:
        """A contiguous window of ``length`` tokens of the stream at a random offset (the stream repeats when it
        is shorter than ``length``, which the result's ``haystack_tokens`` makes visible)."""
        stream = self.stream
        if len(stream) <= length:
            stream = np.tile(stream, length // max(1, len(stream)) + 2)
        start = int(rng.integers(0, len(stream) - length))
        return np.array(stream[start : start + length], dtype=np.int64)


def val_documents(data_dir: str | Path, tokenizer: Tokenizer) -> list[np.ndarray] | None:
    """The val split of a prepared dataset as token documents (split at end-of-text), or None when the dataset
    is not on disk, has no val tokens, or was tokenized by another tokenizer."""
    try:
        paths, manifest = split_shard_paths(data_dir, "val")
    except DiffV2Error:
        return None
    if manifest is not None and manifest.get("tokenizer_sha256") not in (None, tokenizer.sha256()):
        return None
    if manifest is not None:  # a damaged split would change the texts silently: its checksums first
        verify_dataset(data_dir, splits=("val",))
    tokens = np.concatenate([np.asarray(read_shard(p), dtype=np.int64) for p in paths]) if paths else None
    if tokens is None or tokens.size == 0:
        return None
    cuts = np.flatnonzero(tokens == tokenizer.eot_id)
    docs = [d for d in np.split(tokens, cuts) if d.size]
    docs = [d[1:] if d[0] == tokenizer.eot_id else d for d in docs]
    return [d for d in docs if d.size] or None


def corpus_documents(tokenizer: Tokenizer) -> list[np.ndarray]:
    """The embedded corpus (one document per book), encoded with ``tokenizer``."""
    return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(default_corpus_documents())]


def load_text(tokenizer: Tokenizer, data_dir: str | Path | None, min_tokens: int) -> TextSource:
    """The run's val split if it is on disk, matches the tokenizer and holds ``min_tokens``; else the corpus."""
    docs = val_documents(data_dir, tokenizer) if data_dir else None
    sep = tokenizer.encode("\n\n")
    if docs is not None and sum(d.size for d in docs) >= min_tokens:
        return TextSource(docs, f"val split of {data_dir}", sep)
    why = "" if not data_dir else f" ({data_dir}: no usable val split of ≥ {min_tokens} tokens)"
    return TextSource(corpus_documents(tokenizer), f"embedded corpus: {default_corpus_info()['name']}{why}", sep)


@functools.lru_cache(maxsize=8)
def _piece_table(tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    pieces = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    ends = np.array([p.rstrip(" ").endswith(SENTENCE_ENDS) for p in pieces], dtype=bool)
    digit = np.array([p.lstrip(" ")[:1].isdigit() for p in pieces], dtype=bool)
    return ends, digit


def sentence_starts(tokens: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """Indices i where a sentence may begin: 0, and after every token that ends a sentence or a line."""
    ends, _ = _piece_table(tokenizer)
    inside = np.flatnonzero(ends[np.clip(tokens[:-1], 0, len(ends) - 1)]) + 1
    return np.concatenate([[0], inside, [len(tokens)]]).astype(np.int64)


def starts_with_digit(tokenizer: Tokenizer) -> np.ndarray:
    """Per token id: whether its text (leading spaces aside) starts with a digit."""
    return _piece_table(tokenizer)[1]


def insert_at_depths(
    haystack: np.ndarray, inserts: list[np.ndarray], depths: list[float], tokenizer: Tokenizer
) -> tuple[np.ndarray, list[int], list[int]]:
    """``haystack`` with each insert placed at the sentence start nearest its depth (0 = first token, 1 = the
    end). Returns the sequence, where each insert begins in it, and where in ``haystack`` it went."""
    starts = sentence_starts(haystack, tokenizer)
    wanted = [int(starts[np.abs(starts - d * len(haystack)).argmin()]) for d in depths]
    order = sorted(range(len(inserts)), key=lambda i: (wanted[i], i))
    out, at, shift = [], [0] * len(inserts), 0
    prev = 0
    for i in order:
        out.append(haystack[prev : wanted[i]])
        at[i] = wanted[i] + shift
        out.append(inserts[i])
        shift += len(inserts[i])
        prev = wanted[i]
    out.append(haystack[prev:])
    return np.concatenate(out).astype(np.int64), at, wanted
