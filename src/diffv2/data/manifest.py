"""A prepared dataset's ``manifest.json``: its schema, and the check of the files it lists (size, sha256, token
ids below the vocabulary, the tokenizer's hash).

Every field is type-checked when the manifest is read, and every file it names must be a plain name inside the
dataset folder, so a hand-edited or hostile manifest cannot make a reader open a file elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..config import check_file_name, check_int, check_number, check_str, check_table, show
from ..errors import DataError
from .shards import HEADER_BYTES, VERSION_DTYPES, atomic_write_bytes, read_header
from .tokenizer import Tokenizer

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT = "diffv2-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
_REQUIRED = ("tokenizer_file", "tokenizer_sha256", "tokenizer_kind", "vocab_size", "eot_id", "source", "splits")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_READ_BYTES = 1 << 24  # a multiple of every token size: each block after the header holds whole tokens


def _check_sha(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise DataError(f"{name}={show(value)}: must be a sha256 hex digest (64 characters 0-9a-f)")
    return value


def check_manifest(path: Path, manifest: Any) -> dict:
    """Raise a one-line :class:`DataError` naming the first field of ``manifest`` (read from ``path``) that does
    not fit the schema; returns it."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a diffv2 dataset manifest (format is not {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: manifest format version {show(manifest.get('format_version'))} is not supported "
            f"(this diffv2 reads version {FORMAT_VERSION})"
        )
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise DataError(f"{path}: missing fields {missing}")
    check_file_name(f"{path}: tokenizer_file", manifest["tokenizer_file"], DataError)
    _check_sha(f"{path}: tokenizer_sha256", manifest["tokenizer_sha256"])
    vocab = check_int(f"{path}: vocab_size", manifest["vocab_size"], minimum=1, maximum=2**32, error=DataError)
    check_int(f"{path}: eot_id", manifest["eot_id"], maximum=vocab - 1, error=DataError)
    check_str(f"{path}: tokenizer_kind", manifest["tokenizer_kind"], error=DataError)
    if "text_field" in manifest:
        check_str(f"{path}: text_field", manifest["text_field"], error=DataError)
    check_table(f"{path}: source", manifest["source"], DataError)
    if (dropped := manifest.get("val_near_duplicates")) is not None:
        check_table(f"{path}: val_near_duplicates", dropped, DataError)
        for name in ("ngram", "dropped_documents", "dropped_tokens"):
            check_int(f"{path}: val_near_duplicates.{name}", dropped.get(name), error=DataError)
        check_number(f"{path}: val_near_duplicates.threshold", dropped.get("threshold"), positive=True, error=DataError)
    splits = check_table(f"{path}: splits", manifest["splits"], DataError)
    for split in SPLITS:
        info = splits.get(split)
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise DataError(f"{path}: no shard list for split {split!r}")
        total = 0
        for i, shard in enumerate(info["shards"]):
            where = f"{path}: splits.{split}.shards[{i}]"
            check_table(where, shard, DataError)
            if missing := [k for k in ("file", "n_tokens", "sha256") if k not in shard]:
                raise DataError(f"{where}: lacks {', '.join(missing)}")
            check_file_name(f"{where}.file", shard["file"], DataError)
            total += check_int(f"{where}.n_tokens", shard["n_tokens"], maximum=2**31 - 1, error=DataError)
            _check_sha(f"{where}.sha256", shard["sha256"])
        for name in ("n_tokens", "n_documents"):
            check_int(f"{path}: splits.{split}.{name}", info.get(name), error=DataError)
        if info["n_tokens"] != total:
            raise DataError(
                f"{path}: splits.{split}.n_tokens={info['n_tokens']} but its shards hold {total} tokens together"
            )
    return manifest


def load_manifest(data_dir: str | Path) -> dict:
    """Read and check ``data_dir/manifest.json`` (schema, files present); returns it."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist; run `diffv2 data prepare --out {data_dir}` first")
    if not path.is_file():
        raise DataError(
            f"{data_dir} has no {MANIFEST_NAME} (missing or unfinished prepare); "
            f"run `diffv2 data prepare --out {data_dir}` first"
        )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise DataError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    check_manifest(path, manifest)
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            if not (data_dir / shard["file"]).is_file():
                raise DataError(f"{data_dir / shard['file']}: shard listed in the manifest is missing")
    if not (data_dir / manifest["tokenizer_file"]).is_file():
        raise DataError(f"{data_dir / manifest['tokenizer_file']}: tokenizer listed in the manifest is missing")
    return manifest


def scan_shard(path: Path) -> tuple[str, int, int]:
    """(sha256, token count, largest token id or -1 when empty) of a shard, in one read of the file."""
    version, n_tokens, _ = read_header(path)
    dtype = VERSION_DTYPES[version]
    h, top = hashlib.sha256(), -1
    with open(path, "rb") as f:
        h.update(f.read(HEADER_BYTES))
        while block := f.read(_READ_BYTES):
            h.update(block)
            if len(block) >= dtype.itemsize:
                top = max(top, int(np.frombuffer(block, dtype=dtype, count=len(block) // dtype.itemsize).max()))
    return h.hexdigest(), n_tokens, top


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_record(record: Path | None) -> dict:
    if record is None or not record.is_file():
        return {}
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged record only costs a fresh check
    return data if isinstance(data, dict) else {}


def verify_dataset(data_dir: str | Path, *, record: str | Path | None = None, splits: tuple[str, ...] = SPLITS) -> dict:
    """Check every shard's header, size, sha256 and token ids (all below the manifest's ``vocab_size``), and the
    tokenizer (its hash, vocabulary size and end-of-text id) against the manifest; returns the manifest.

    With ``record`` (a JSON file, e.g. in a run folder) a shard already checked is not read again while its size,
    modification time and inode are unchanged, so a resumed run does not re-read a large dataset. ``splits``
    limits the shards checked to those a reader is about to read.
    """
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    record = Path(record) if record is not None else None
    seen = _read_record(record)
    checked: dict[str, Any] = {}
    for split in splits:
        for shard in manifest["splits"][split]["shards"]:
            path = data_dir / shard["file"]
            key = [*_stat_key(path), shard["sha256"], manifest["vocab_size"]]
            if seen.get(shard["file"]) == key:
                checked[shard["file"]] = key
                continue
            sha, n_tokens, top = scan_shard(path)
            if n_tokens != shard["n_tokens"]:
                raise DataError(f"{path}: holds {n_tokens} tokens but the manifest says {shard['n_tokens']}")
            if sha != shard["sha256"]:
                raise DataError(
                    f"{path}: corrupted: sha256 is {sha[:16]}... but the manifest says {shard['sha256'][:16]}...; "
                    "run `diffv2 data prepare --overwrite` again"
                )
            if top >= manifest["vocab_size"]:
                raise DataError(
                    f"{path}: holds token id {top}, but the vocabulary has {manifest['vocab_size']} ids; the shard "
                    "was made with another tokenizer: prepare the dataset again"
                )
            checked[shard["file"]] = key
    tok_path = data_dir / manifest["tokenizer_file"]
    tok = Tokenizer.from_file(tok_path)
    if tok.sha256() != manifest["tokenizer_sha256"]:
        raise DataError(f"{tok_path}: does not match the manifest's sha256")
    if (tok.vocab_size, tok.eot_id) != (manifest["vocab_size"], manifest["eot_id"]):
        raise DataError(
            f"{tok_path}: vocabulary {tok.vocab_size}, end-of-text id {tok.eot_id}, but the manifest says "
            f"{manifest['vocab_size']} and {manifest['eot_id']}"
        )
    if record is not None and checked != seen:
        atomic_write_bytes(record, (json.dumps(checked, indent=1) + "\n").encode("utf-8"))
    return manifest
