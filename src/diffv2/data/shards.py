"""Token shards in the modded-nanogpt layout.

A shard is a header of 256 little-endian int32 -- ``[0]`` the magic 20240520, ``[1]`` the version, ``[2]``
the number of tokens -- followed by the tokens. Version 1 stores uint16 tokens, byte for byte the format
of modded-nanogpt's FineWeb shards, so those load as they are; version 2 stores uint32 tokens, for
vocabularies larger than 65536.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import DataError

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_DTYPES: dict[int, np.dtype] = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
_CHUNK = 1 << 22  # tokens per write/hash chunk: bounded memory for shards of any size


def version_for_max_id(max_id: int) -> int:
    """The shard version able to hold token ids up to ``max_id``."""
    if max_id < 0:
        raise DataError(f"token ids must be non-negative, got {max_id}")
    if max_id <= 0xFFFF:
        return 1
    if max_id <= 0xFFFFFFFF:
        return 2
    raise DataError(f"token id {max_id} does not fit in 32 bits")


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def publish_mode(path: str | Path) -> None:
    """Give a file the mode an ordinary ``open(path, "w")`` would (0o666 less the umask). Temp files
    (``tempfile.mkstemp``) and safetensors start at 0o600; a dataset, checkpoint or export is meant to be shared
    like the run's other files."""
    os.chmod(path, 0o666 & ~_umask())


def fsync_dir(path: Path) -> None:
    """fsync a folder so that a rename inside it survives a crash (skipped where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the whole new one, never a part."""
    with AtomicFile(path) as f:
        f.write(data)


class AtomicFile:
    """A binary file written to a temp file in the target's folder, then fsynced and renamed over it.

    Use as a context manager (commit on success, discard on an exception) or call ``commit``/``discard``.
    Until the commit the target is untouched, so a crash never leaves a half-written file under its name.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "w+b")

    def commit(self) -> None:
        """Flush, fsync and rename the temp file over the target."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        finally:
            self.file.close()
        publish_mode(self.tmp)
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        """Close and delete the temp file."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _header(version: int, n_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, version, n_tokens
    return header.tobytes()


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Stream tokens into one shard of a fixed version; the file appears (atomically) on ``close()``."""

    def __init__(self, path: str | Path, version: int) -> None:
        if version not in VERSION_DTYPES:
            raise DataError(f"unknown shard version {version} (known: {sorted(VERSION_DTYPES)})")
        self.path = Path(path)
        self.version = version
        self.dtype = VERSION_DTYPES[version]
        self.n_tokens = 0
        self._atomic = AtomicFile(self.path)
        self._f = self._atomic.file
        self._f.write(_header(version, 0))  # rewritten with the real count on close

    def write(self, tokens: np.ndarray) -> None:
        """Append tokens (any integer array); they must fit the shard's dtype."""
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.size == 0:
            return
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi > np.iinfo(self.dtype).max:
            raise DataError(f"{self.path.name}: token ids {lo}..{hi} do not fit shard version {self.version}")
        self._f.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.n_tokens += tokens.size

    def close(self) -> str:
        """Finish the file and return its sha256."""
        try:
            if self.n_tokens > np.iinfo(np.int32).max:
                raise DataError(f"{self.path.name}: {self.n_tokens} tokens exceed the header's int32 count")
            self._f.seek(0)
            self._f.write(_header(self.version, self.n_tokens))
            # Hash by reading back what was written: the header is only known now, and it comes first.
            self._f.seek(0)
            h = hashlib.sha256()
            while block := self._f.read(1 << 24):
                h.update(block)
        except BaseException:
            self._atomic.discard()
            raise
        self._atomic.commit()
        return h.hexdigest()

    def abort(self) -> None:
        """Drop the unfinished file."""
        self._atomic.discard()


def write_shard(path: str | Path, tokens: np.ndarray) -> str:
    """Write ``tokens`` as one shard (uint16 if every id < 65536, else uint32), atomically; returns sha256."""
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{Path(path).name}: tokens must be integers, got {tokens.dtype}")
    version = version_for_max_id(int(tokens.max()) if tokens.size else 0)
    if tokens.size and int(tokens.min()) < 0:
        raise DataError(f"{Path(path).name}: token ids must be non-negative, got {int(tokens.min())}")
    writer = ShardWriter(path, version)
    try:
        for start in range(0, tokens.size, _CHUNK):
            writer.write(tokens[start : start + _CHUNK])
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def read_header(path: str | Path) -> tuple[int, int, int]:
    """Validate a shard's header and size; returns (version, n_tokens, itemsize)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard file does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path.name}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, n_tokens = int(header[0]), int(header[1]), int(header[2])
    if magic != MAGIC:
        raise DataError(f"{path.name}: not a token shard: magic number is {magic}, expected {MAGIC}")
    if version not in VERSION_DTYPES:
        raise DataError(
            f"{path.name}: unknown shard version {version} (known: {sorted(VERSION_DTYPES)}); "
            "was it written by a newer diffv2?"
        )
    if n_tokens < 0:
        raise DataError(f"{path.name}: corrupt header: negative token count {n_tokens}")
    itemsize = VERSION_DTYPES[version].itemsize
    expected, held = n_tokens * itemsize, size - HEADER_BYTES
    if held < expected:
        raise DataError(
            f"{path.name}: truncated: header says {n_tokens} tokens ({expected} bytes) "
            f"but the file holds {held} bytes after the header"
        )
    if held > expected:
        raise DataError(
            f"{path.name}: corrupt: header says {n_tokens} tokens ({expected} bytes) "
            f"but the file holds {held} bytes after the header"
        )
    return version, n_tokens, itemsize


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of a shard as a read-only memory map (uint16 for version 1, uint32 for version 2)."""
    version, n_tokens, _ = read_header(path)
    dtype = VERSION_DTYPES[version]
    if n_tokens == 0:
        # mmap cannot map zero bytes; an empty read-only array behaves the same for every use here.
        empty = np.zeros(0, dtype=dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
