"""Batches of token windows from a prepared dataset: a resumable training stream and fixed eval batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .manifest import MANIFEST_NAME, SPLITS, load_manifest
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

    def __init__(self, paths: list[Path], vocab_size: int | None = None) -> None:
        self.arrays = [a for a in (read_shard(p) for p in paths) if a.size]
        self.starts = np.cumsum([0] + [a.size for a in self.arrays])
        self.n_tokens = int(self.starts[-1])
        self.folder = paths[0].parent if paths else Path(".")
        # every read checked against the vocabulary: a shard changed after its one-time verification (which is
        # keyed on size, mtime and inode) must fail here in one line, not as an index error inside the embedding
        self.vocab_size = vocab_size

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
        if self.vocab_size is not None and length and (top := int(out.max())) >= self.vocab_size:
            raise DataError(
                f"{self.folder}: token id {top} near token {start}, but the vocabulary has {self.vocab_size} ids; "
                "a shard changed after it was verified: prepare the dataset again"
            )
        return out


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _open_split(
    data_dir: str | Path, split: str, seq_len: int, vocab_size: int | None
) -> tuple[_TokenStream, dict | None]:
    paths, manifest = split_shard_paths(data_dir, split)
    stream = _TokenStream(paths, vocab_size)
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

    The split's tokens are cut into ``n_windows = (n_tokens - 1) // seq_len`` windows of ``seq_len + 1``
    tokens that overlap by one token (y is x shifted by one, so every token is a target exactly once). Each
    epoch draws, from a generator seeded with (seed, epoch), a grid offset within the leftover tokens and a
    permutation of all windows; the *global* stream is these permutations one after another, so an epoch
    covers the data once without repeats and batches simply continue into the next epoch.

    The global stream is read in chunks of ``batch_size`` windows. With ``world_size`` W, rank r serves
    chunks r, r + W, r + 2W, ...: every ``next()`` moves a window counter shared by all ranks by W chunks.
    So ranks never share a window, W ranks taking k batches each read exactly the k·W chunks one rank reads
    in k·W calls, and the state (that counter) is the same on every rank whatever W is: a run saved with N
    ranks resumes with M. ``vocab_size``: every token read must be below it (a one-line ``DataError`` otherwise).
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
        vocab_size: int | None = None,
    ) -> None:
        _check_positive(batch_size=batch_size, seq_len=seq_len, world_size=world_size)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self._stream, self.manifest = _open_split(data_dir, split, seq_len, vocab_size)
        self.n_windows = (self._stream.n_tokens - 1) // seq_len
        self.windows_per_epoch = self.n_windows
        self._slack = self._stream.n_tokens - 1 - self.n_windows * seq_len
        self.window = 0  # global index of the first window of the next round of W chunks
        self._epochs: dict[int, np.ndarray] = {}

    @property
    def n_tokens(self) -> int:
        """Tokens in the split (all ranks together)."""
        return self._stream.n_tokens

    @property
    def epoch(self) -> int:
        """The epoch the next round starts in."""
        return self.window // self.n_windows

    def epoch_starts(self, epoch: int) -> np.ndarray:
        """Token positions where the windows of ``epoch`` start, in global stream order."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self._slack + 1))
            if len(self._epochs) >= 2:  # a chunk spans at most two epochs; keep memory flat
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = offset + rng.permutation(self.n_windows).astype(np.int64) * self.seq_len
        return self._epochs[epoch]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.window + self.rank * self.batch_size
        windows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for row in range(self.batch_size):
            epoch, position = divmod(first + row, self.n_windows)
            windows[row] = self._stream.read(int(self.epoch_starts(epoch)[position]), self.seq_len + 1)
        self.window += self.world_size * self.batch_size
        return _to_xy(windows)

    def state_dict(self) -> dict:
        """Where the stream is (plain ints, identical on every rank); ``load_state_dict`` resumes there."""
        return {"window": self.window, "seed": self.seed, "seq_len": self.seq_len, "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader(s) that produced ``state`` stopped, with any rank count."""
        mine = self.state_dict()
        for key in ("seed", "seq_len", "n_tokens"):
            if key in state and int(state[key]) != mine[key]:
                raise DataError(
                    f"loader state has {key}={state[key]} but this loader has {key}={mine[key]}; "
                    "an exact resume needs the same data, seq_len and seed"
                )
        if "window" in state:
            window = int(state["window"])
        elif int(state.get("world_size", 1)) == 1:  # older single-process format: same stream, (epoch, position)
            window = int(state["epoch"]) * self.n_windows + int(state["position"])
        else:
            raise DataError(
                f"loader state was written by an older diffv2 with world_size={state['world_size']}, whose "
                "per-rank streams cannot be continued exactly; start a new run"
            )
        if window < 0:
            raise DataError(f"loader state window={window} is out of range (must be >= 0)")
        self.window = window


class EvalBatches:
    """A fixed list of evaluation batches: the split's windows in order, ``seq_len + 1`` tokens each.

    Windows start at 0, seq_len, 2 * seq_len, ...; only full batches are kept (but a split too small for
    one full batch gives one smaller batch), the first ``max_batches`` of them (all when None). ``whole`` keeps
    the windows beyond the last full batch as one last, smaller batch, so every window of the split is scored.
    With ``world_size > 1`` rank r gets batches r, r + world_size, ...; sum losses and counts across ranks.
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
        whole: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        _check_positive(batch_size=batch_size, seq_len=seq_len, world_size=world_size)
        if max_batches is not None:
            _check_positive(max_batches=max_batches)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.seq_len, self.rank, self.world_size = seq_len, rank, world_size
        self._stream, self.manifest = _open_split(data_dir, split, seq_len, vocab_size)
        n_windows = (self._stream.n_tokens - 1) // seq_len
        per_batch = min(batch_size, n_windows)
        n_batches = n_windows // per_batch
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        starts = np.arange(n_windows, dtype=np.int64) * seq_len
        self._all = [starts[i * per_batch : (i + 1) * per_batch] for i in range(n_batches)]
        if whole and max_batches is None and n_batches * per_batch < n_windows:
            self._all.append(starts[n_batches * per_batch :])
        self._batches = self._all[rank::world_size]

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def n_batches(self) -> int:
        """Batches over all ranks together."""
        return len(self._all)

    @property
    def n_windows(self) -> int:
        """Windows over all ranks' batches together."""
        return sum(b.size for b in self._all)

    @property
    def n_target_tokens(self) -> int:
        """Number of predicted tokens over this rank's batches."""
        return sum(b.size for b in self._batches) * self.seq_len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for starts in self._batches:
            yield self._read(starts)

    def rounds(self) -> Iterator[tuple[int, bool]]:
        """``(batch index, real)``: this rank's batches, then repeats (``real`` False) up to ceil(n_batches / W).

        Every rank yields the same number of batches, because a sharded (FSDP) model needs every rank in
        each forward; leave the repeats out of the loss.
        """
        for k in range(-(-self.n_batches // self.world_size)):
            index = self.rank + k * self.world_size
            yield index % self.n_batches, index < self.n_batches

    def padded(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        """``(x, y, real)`` for each of :meth:`rounds`."""
        for index, real in self.rounds():
            yield (*self.batch(index), real)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of batch ``index`` (of all ranks' batches)."""
        return self._read(self._all[index])

    def target_positions(self, index: int) -> np.ndarray:
        """(rows, seq_len) positions in the split's stream of the tokens batch ``index`` predicts (its y)."""
        return self._all[index][:, None] + np.arange(1, self.seq_len + 1, dtype=np.int64)

    def _read(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return _to_xy(np.stack([self._stream.read(int(s), self.seq_len + 1) for s in starts]))


def spread_windows(data_dir: str | Path, split: str, seq_len: int, n: int) -> torch.Tensor:
    """``n`` input windows (n, seq_len) spaced evenly over the whole split (not just its first documents),
    for diagnostics that should see every part of the data."""
    _check_positive(seq_len=seq_len, n=n)
    stream, _ = _open_split(data_dir, split, seq_len, None)
    last = stream.n_tokens - seq_len - 1
    starts = np.linspace(0, last, n).round().astype(np.int64)
    return torch.from_numpy(np.stack([stream.read(int(s), seq_len) for s in starts]))
