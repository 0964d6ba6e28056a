"""Batches of token windows from a prepared dataset: a resumable training stream and fixed eval batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .prepare import MANIFEST_NAME, SPLITS, load_manifest
from .shards import read_shard


def split_shard_paths(data_dir: str | Path, split: str) -> tuple[list[Path], dict | None]:
    """Shard files of ``split`` in order, and the manifest (None for a bare folder of shards).

    A folder without manifest.json but with ``*{split}_*.bin`` files (modded-nanogpt's FineWeb shards,
    e.g. fineweb_train_000001.bin) is read as it is, in sorted name order.
    """
    data_dir = Path(data_dir)
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if not (data_dir / MANIFEST_NAME).is_file():
        bare = sorted(data_dir.glob(f"*{split}_*.bin")) if data_dir.is_dir() else []
        if bare:
            return bare, None
    manifest = load_manifest(data_dir)  # raises the "run `diffv2 data prepare` first" error when missing
    return [data_dir / s["file"] for s in manifest["splits"][split]["shards"]], manifest


class _TokenStream:
    """The shards of a split seen as one token sequence, memory-mapped, with random access."""

    def __init__(self, paths: list[Path]) -> None:
        self.arrays = [a for a in (read_shard(p) for p in paths) if a.size]
        self.starts = np.cumsum([0] + [a.size for a in self.arrays])
        self.n_tokens = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, gathered across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            arr, base = self.arrays[shard], int(self.starts[shard])
            lo = start + done - base
            take = min(length - done, arr.size - lo)
            out[done : done + take] = arr[lo : lo + take]
            done += take
            shard += 1
        return out


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _open_split(data_dir: str | Path, split: str, seq_len: int) -> tuple[_TokenStream, dict | None]:
    paths, manifest = split_shard_paths(data_dir, split)
    stream = _TokenStream(paths)
    if stream.n_tokens < seq_len + 1:
        raise DataError(
            f"split {split!r} of {data_dir} has {stream.n_tokens} tokens, but seq_len={seq_len} needs "
            f"at least {seq_len + 1}; use a shorter seq_len or more data"
        )
    return stream, manifest


def _to_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(windows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class TokenLoader:
    """An endless, deterministic, resumable stream of ``(x, y)`` batches of shape (batch_size, seq_len).

    The split's tokens are cut into ``W = (n_tokens - 1) // seq_len`` windows of ``seq_len + 1`` tokens
    that overlap by one token (y is x shifted by one, so every token is a target exactly once). Each
    epoch draws, from a generator seeded with (seed, epoch), a grid offset within the leftover tokens and
    a permutation of the W windows; rank r takes windows r, r + world_size, ... of that permutation,
    truncated so every rank has the same count. An epoch thus covers the data once without repeats, ranks
    never share a window, and batches simply continue into the next epoch when one ends.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_positive(batch_size=batch_size, seq_len=seq_len, world_size=world_size)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self._stream, self.manifest = _open_split(data_dir, split, seq_len)
        self.n_windows = (self._stream.n_tokens - 1) // seq_len
        self._slack = self._stream.n_tokens - 1 - self.n_windows * seq_len
        self.windows_per_epoch = self.n_windows // world_size
        if self.windows_per_epoch == 0:
            raise DataError(
                f"split {split!r} of {data_dir} has {self.n_windows} windows of {seq_len + 1} tokens, "
                f"fewer than world_size={world_size}; use a shorter seq_len or more data"
            )
        self.epoch, self.position = 0, 0
        self._cached_epoch = -1
        self._starts = np.empty(0, dtype=np.int64)

    @property
    def n_tokens(self) -> int:
        """Tokens in the split (all ranks together)."""
        return self._stream.n_tokens

    def epoch_starts(self, epoch: int) -> np.ndarray:
        """Token positions where this rank's windows of ``epoch`` start, in the order they are served."""
        if epoch != self._cached_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self._slack + 1))
            order = rng.permutation(self.n_windows)[: self.windows_per_epoch * self.world_size]
            self._starts = offset + order[self.rank :: self.world_size].astype(np.int64) * self.seq_len
            self._cached_epoch = epoch
        return self._starts

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for row in range(self.batch_size):
            start = int(self.epoch_starts(self.epoch)[self.position])
            windows[row] = self._stream.read(start, self.seq_len + 1)
            self.position += 1
            if self.position == self.windows_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
        return _to_xy(windows)

    def state_dict(self) -> dict:
        """Where the stream is (plain ints); ``load_state_dict`` on a loader of the same data resumes here."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "n_tokens": self.n_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that produced ``state`` stopped (any rank's state will do)."""
        mine = self.state_dict()
        for key in ("seed", "seq_len", "world_size", "n_tokens"):
            if key in state and int(state[key]) != mine[key]:
                raise DataError(
                    f"loader state has {key}={state[key]} but this loader has {key}={mine[key]}; "
                    "an exact resume needs the same data, seq_len, seed and world_size"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.windows_per_epoch:
            raise DataError(
                f"loader state epoch={epoch}, position={position} is out of range "
                f"(this split has {self.windows_per_epoch} windows per epoch and rank)"
            )
        self.epoch, self.position = epoch, position


class EvalBatches:
    """A fixed list of evaluation batches: the split's windows in order, ``seq_len + 1`` tokens each.

    Windows start at 0, seq_len, 2 * seq_len, ...; only full batches are kept (but a split too small for
    one full batch gives one smaller batch), the first ``max_batches`` of them (all when None). With
    ``world_size > 1`` rank r gets batches r, r + world_size, ...; sum losses across ranks.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "val",
        *,
        batch_size: int,
        seq_len: int,
        max_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_positive(batch_size=batch_size, seq_len=seq_len, world_size=world_size)
        if max_batches is not None:
            _check_positive(max_batches=max_batches)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.seq_len = seq_len
        self._stream, self.manifest = _open_split(data_dir, split, seq_len)
        n_windows = (self._stream.n_tokens - 1) // seq_len
        per_batch = min(batch_size, n_windows)
        n_batches = n_windows // per_batch
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        starts = np.arange(n_batches * per_batch, dtype=np.int64).reshape(n_batches, per_batch) * seq_len
        self._batches = starts[rank::world_size]

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def n_target_tokens(self) -> int:
        """Number of predicted tokens over this rank's batches."""
        return int(self._batches.size) * self.seq_len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for starts in self._batches:
            yield _to_xy(np.stack([self._stream.read(int(s), self.seq_len + 1) for s in starts]))
