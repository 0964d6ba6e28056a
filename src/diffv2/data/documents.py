"""The documents of a prepared split: where each one ends in the token stream, its source, and its half.

Validation is split by document into a *select* half (where a grid picks each variant's learning rate) and a
*test* half (where the chosen runs are scored), so the lr is never chosen on the tokens it is reported on. A
document's half comes from a hash of its token ids, so it does not depend on the order of documents, on which
other documents exist, or on the machine. Sources come from ``val_documents.json``, which ``prepare_dataset``
writes; a dataset prepared before it existed gets document boundaries from its end-of-text tokens and one
source, "all".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import is_int
from ..errors import DataError
from .dedup import NGRAM, NearDupReport, near_duplicates
from .loader import _TokenStream, split_shard_paths
from .manifest import load_manifest
from .prepare import DOCUMENTS_NAME
from .tokenizer import Tokenizer

HALVES = ("select", "test")
SPLIT_RULE = (
    "a document is in the select half when the blake2b-64 hash of its token ids (little-endian uint32, "
    "end-of-text included) is even, else in the test half"
)


def document_half(tokens: np.ndarray) -> int:
    """0 (select) or 1 (test) for a document's token ids, end-of-text token included."""
    digest = hashlib.blake2b(np.asarray(tokens, dtype="<u4").tobytes(), digest_size=8).digest()
    return digest[-1] & 1


@dataclass
class SplitDocuments:
    """Documents of one split in stream order: exclusive end offsets, half (0/1) and source index of each."""

    ends: np.ndarray
    half: np.ndarray
    source: np.ndarray
    sources: list[str]
    labeled: bool  # sources recorded at prepare time (else a single "all")

    @property
    def n_groups(self) -> int:
        """Groups an evaluation sums over: (half, source) pairs, numbered half · n_sources + source."""
        return len(HALVES) * len(self.sources)

    def groups_of(self, positions: np.ndarray) -> np.ndarray:
        """The group of the documents holding token ``positions`` (any shape) of the split's stream."""
        doc = np.searchsorted(self.ends, positions, side="right")
        return self.half[doc] * len(self.sources) + self.source[doc]

    def describe(self) -> dict[str, Any]:
        """What the halves hold: the rule, documents and tokens per half and per (half, source), a digest."""
        lengths = np.diff(self.ends, prepend=0)
        out: dict[str, Any] = {"rule": SPLIT_RULE, "labeled_sources": self.labeled}
        for h, name in enumerate(HALVES):
            mine = self.half == h
            by_source = {}
            for i, src in enumerate(self.sources):
                docs = mine & (self.source == i)
                if docs.any():
                    by_source[src] = [int(docs.sum()), int(lengths[docs].sum())]
            out[name] = {"documents": int(mine.sum()), "tokens": int(lengths[mine].sum()), "by_source": by_source}
        out["assignment_sha256"] = hashlib.sha256(self.half.astype(np.uint8).tobytes()).hexdigest()
        return out

    def summarize(self, loss_sum: np.ndarray, count: np.ndarray) -> dict[str, Any]:
        """Eval metrics from per-group loss sums and token counts (``n_groups`` each)."""
        loss_sum, count = loss_sum.reshape(len(HALVES), -1), count.reshape(len(HALVES), -1)
        out: dict[str, Any] = {"val_loss": _ratio(loss_sum.sum(), count.sum()), "val_tokens": int(count.sum())}
        by_group: dict[str, dict[str, list[float]]] = {}
        for h, name in enumerate(HALVES):
            out[f"val_loss_{name}"] = _ratio(loss_sum[h].sum(), count[h].sum())
            by_group[name] = {
                s: [_ratio(loss_sum[h, i], count[h, i]), int(count[h, i])]
                for i, s in enumerate(self.sources)
                if count[h, i] > 0
            }
        out["val_by_group"] = by_group
        return out


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b > 0 else None


def _split_tokens(data_dir: Path, split: str) -> tuple[np.ndarray, dict | None]:
    paths, manifest = split_shard_paths(data_dir, split)
    stream = _TokenStream(paths)
    return (np.concatenate(stream.arrays) if stream.arrays else np.zeros(0, dtype=np.uint16)), manifest


def split_texts(data_dir: str | Path, split: str) -> list[str]:
    """The documents of a prepared split decoded back to text (end-of-text tokens removed)."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    tokens, _ = _split_tokens(data_dir, split)
    tok = Tokenizer.from_file(data_dir / manifest["tokenizer_file"])
    ends = np.flatnonzero(tokens == int(manifest["eot_id"])) + 1
    if ends.size == 0 or ends[-1] != tokens.size:
        ends = np.append(ends, tokens.size)
    starts = np.concatenate([[0], ends[:-1]])
    eot = int(manifest["eot_id"])
    docs = [tokens[a:b] for a, b in zip(starts, ends, strict=True)]
    return tok.hf_tokenizer.decode_batch([d[d != eot].tolist() for d in docs], skip_special_tokens=False)


def dataset_near_duplicates(
    data_dir: str | Path, *, ngram: int = NGRAM, threshold: float = 0.5, progress: bool = False
) -> tuple[NearDupReport, list[str], list[str]]:
    """:func:`~.dedup.near_duplicates` of a prepared dataset; also returns the train and val texts (examples)."""
    from tqdm import tqdm

    train, val = split_texts(data_dir, "train"), split_texts(data_dir, "val")
    with tqdm(total=len(train), unit="doc", desc="train shingles", disable=not progress) as bar:
        report = near_duplicates(train, val, ngram=ngram, threshold=threshold, progress=lambda _: bar.update(1))
    return report, train, val


def _read_documents(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(source names, token count and source index of each document) of a ``val_documents.json``, checked."""
    broken = f"{path}: not a val_documents.json written by `diffv2 data prepare`; prepare the dataset again"
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError):
        raise DataError(broken) from None
    if not isinstance(record, dict):
        raise DataError(broken)
    sources, documents = record.get("sources"), record.get("documents")
    if not (isinstance(sources, list) and all(isinstance(s, str) for s in sources) and isinstance(documents, list)):
        raise DataError(broken)
    if not all(isinstance(d, list) and len(d) == 2 and all(is_int(v) and 0 <= v < 2**62 for v in d) for d in documents):
        raise DataError(broken)
    table = np.array(documents, dtype=np.int64).reshape(-1, 2)
    if np.any(table[:, 0] < 1) or np.any((table[:, 1] < 0) | (table[:, 1] >= len(sources))):
        raise DataError(broken)
    return sources, table[:, 0], table[:, 1]


def split_documents(data_dir: str | Path, split: str = "val") -> SplitDocuments | None:
    """The documents of ``split``; None for a bare folder of shards (no manifest, so no end-of-text id)."""
    data_dir = Path(data_dir)
    tokens, manifest = _split_tokens(data_dir, split)
    if manifest is None:
        return None
    record_path = data_dir / DOCUMENTS_NAME
    if split == "val" and record_path.is_file():
        sources, lengths, source = _read_documents(record_path)
        ends = np.cumsum(lengths)
        eot = int(manifest["eot_id"])
        if (ends[-1] if ends.size else 0) != tokens.size or np.any(tokens[ends - 1] != eot):
            raise DataError(f"{record_path}: does not match the val shards; prepare the dataset again")
        labeled = True
    else:
        ends = np.flatnonzero(tokens == int(manifest["eot_id"])) + 1
        if ends.size == 0 or ends[-1] != tokens.size:  # a stream that does not end with end-of-text
            ends = np.append(ends, tokens.size)
        sources, source, labeled = ["all"], np.zeros(ends.size, dtype=np.int64), False
    starts = np.concatenate([[0], ends[:-1]])
    half = np.array([document_half(tokens[a:b]) for a, b in zip(starts, ends, strict=True)], dtype=np.int64)
    return SplitDocuments(ends, half, source, sources, labeled)
