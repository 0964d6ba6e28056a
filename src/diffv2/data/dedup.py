"""Near-duplicate documents by exact word 13-gram overlap: within the train split, and validation against train.

A document's shingles are its lower-cased word n-grams (n = 13 by default, words = runs of letters/digits), so
the measure does not depend on the tokenizer (13 bytes of a byte-level tokenizer would match everywhere). A
document's *overlap* with a set of shingles is the share of its distinct shingles found there; a validation
document with a large overlap with train scores memorisation, not language modelling, and a train document
repeated elsewhere in train weighs twice. Shingles are 64-bit hashes, held in sorted numpy arrays (8 bytes per
shingle), so a 50 M-token split needs a few hundred MB, not a Python set.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

NGRAM = 13
_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier: spreads word ids over the hash space


class WordIds:
    """Maps words to small integer ids, shared across every document it sees (one vocabulary per check)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, text: str) -> np.ndarray:
        ids = self.ids
        return np.fromiter((ids.setdefault(w, len(ids)) for w in _WORD.findall(text.lower())), dtype=np.uint64)


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` by sorting (numpy's hash-based unique is far slower on tens of millions of uint64)."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if values.size else values


def contains(pool: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which ``values`` are in the sorted, unique ``pool``: a binary search each, no re-sort of the pool."""
    if pool.size == 0:
        return np.zeros(values.shape, dtype=bool)
    at = np.minimum(np.searchsorted(pool, values), pool.size - 1)
    return pool[at] == values


def shingles(word_ids: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """The distinct hashed word n-grams of one document, sorted (empty when it has fewer than n words)."""
    return sorted_unique(ngram_hashes(word_ids, n))


def ngram_hashes(word_ids: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """The hash of the n-gram starting at each word (len − n + 1 of them, in order, repeats kept)."""
    m = word_ids.size - n + 1
    h = np.zeros(max(m, 0), dtype=np.uint64)
    with np.errstate(over="ignore"):  # the hash is arithmetic modulo 2**64 on purpose
        for j in range(n if m > 0 else 0):
            h = h * _MIX + word_ids[j : j + m] + np.uint64(1)
    return h


def overlap(doc_shingles: np.ndarray, pool: np.ndarray) -> float:
    """Share of a document's distinct shingles that are in ``pool`` (sorted unique); NaN without shingles."""
    if doc_shingles.size == 0:
        return float("nan")
    return float(contains(pool, doc_shingles).mean())


class ShinglePool:
    """A growing set of shingles from many documents (a list of arrays merged on demand)."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._merged = np.zeros(0, dtype=np.uint64)

    def add(self, doc_shingles: np.ndarray) -> None:
        self._parts.append(doc_shingles)
        if sum(p.size for p in self._parts) > 1 << 22:  # merge now and then: bounded list, sorted result
            self.merged()

    def merged(self) -> np.ndarray:
        if self._parts:
            self._merged = sorted_unique(np.concatenate([self._merged, *self._parts]))
            self._parts = []
        return self._merged


@dataclass
class DocOverlap:
    index: int  # the document's position in its split
    overlap: float  # share of its shingles found in the other set
    partner: int | None = None  # within train: the other document it shares the most shingles with
    shared: int = 0  # shingles shared with ``partner`` (within train) or with train (validation)


@dataclass
class NearDupReport:
    ngram: int
    threshold: float
    n_train: int
    n_val: int
    val_vs_train: list[DocOverlap] = field(default_factory=list)  # every val document, in split order
    within_train: list[DocOverlap] = field(default_factory=list)  # train documents at or above the threshold
    words: WordIds = field(default_factory=WordIds, repr=False)  # the word ids the shingles were made with
    train_pool: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64), repr=False)

    def flagged_val(self) -> list[DocOverlap]:
        return [d for d in self.val_vs_train if d.overlap >= self.threshold]

    def passage(self, text: str, pool: np.ndarray | None = None, width: int = 240) -> str:
        """The text from the first of ``text``'s n-grams found in ``pool`` (default: train), ``width`` chars."""
        pool = self.train_pool if pool is None else pool
        spans = [m.span() for m in _WORD.finditer(text)]
        hits = np.flatnonzero(contains(pool, ngram_hashes(self.words(text), self.ngram)))
        if hits.size == 0:
            return ""
        start = spans[int(hits[0])][0]
        return " ".join(text[start : start + width].split())


def within_split(doc_shingles: list[np.ndarray], threshold: float) -> list[DocOverlap]:
    """Documents whose shingles occur in *another* document of the same list at a share >= ``threshold``."""
    sizes = np.array([s.size for s in doc_shingles], dtype=np.int64)
    if sizes.sum() == 0:
        return []
    hashes = np.concatenate(doc_shingles)
    docs = np.repeat(np.arange(len(doc_shingles), dtype=np.int64), sizes)
    order = np.argsort(hashes, kind="stable")  # within one document shingles are unique already
    hashes, docs = hashes[order], docs[order]
    # runs of equal hashes: a shingle is shared when its run spans at least two documents
    starts = np.flatnonzero(np.concatenate([[True], hashes[1:] != hashes[:-1]]))
    counts = np.diff(np.append(starts, hashes.size))
    shared = np.repeat(counts, counts) >= 2
    shared_per_doc = np.bincount(docs, weights=shared, minlength=len(doc_shingles))
    share = np.divide(shared_per_doc, sizes, out=np.zeros(len(sizes)), where=sizes > 0)
    flagged = []
    for i in np.flatnonzero(share >= threshold):
        partner, common = _best_partner(int(i), doc_shingles[i], hashes, docs)
        flagged.append(DocOverlap(int(i), float(share[i]), partner, common))
    return flagged


def _best_partner(i: int, mine: np.ndarray, hashes: np.ndarray, docs: np.ndarray) -> tuple[int | None, int]:
    """The other document sharing the most of ``mine`` (document i's shingles), and how many it shares."""
    lo, hi = np.searchsorted(hashes, mine, side="left"), np.searchsorted(hashes, mine, side="right")
    lengths = hi - lo
    # every index in the ranges [lo, hi), without a Python loop over the shingles
    index = np.repeat(lo, lengths) + np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    others = docs[index]
    others = others[others != i]
    if others.size == 0:
        return None, 0
    counts = np.bincount(others)
    return int(counts.argmax()), int(counts.max())


def near_duplicates(
    train: Iterable[str],
    val: Iterable[str],
    *,
    ngram: int = NGRAM,
    threshold: float = 0.5,
    progress: Callable[[int], None] | None = None,
) -> NearDupReport:
    """Overlap of every validation document with the whole train split, and the train documents that repeat
    (a share >= ``threshold``) inside train. ``progress`` is called with the number of documents done."""
    words = WordIds()
    train_shingles = []
    for i, doc in enumerate(train):
        train_shingles.append(shingles(words(doc), ngram))
        if progress is not None:
            progress(i + 1)
    pool = ShinglePool()
    for s in train_shingles:
        pool.add(s)
    merged = pool.merged()
    val_overlaps = []
    for i, doc in enumerate(val):
        s = shingles(words(doc), ngram)
        val_overlaps.append(DocOverlap(i, overlap(s, merged), None, int(contains(merged, s).sum())))
    report = NearDupReport(
        ngram, threshold, len(train_shingles), len(val_overlaps), val_overlaps, words=words, train_pool=merged
    )
    report.within_train = within_split(train_shingles, threshold)
    return report
