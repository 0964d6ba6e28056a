"""Batch loaders: the global training stream (split over ranks, resumable with any rank count) and eval batches."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from diffv2.data import EvalBatches, TokenLoader, prepare_dataset, write_shard
from diffv2.errors import DataError

from .test_data import random_text, write_docs


@pytest.fixture
def counting_data(tmp_path):
    """A bare folder of shards (no manifest, like modded-nanogpt's) whose token at position i is i."""
    n = 10_000 + random.randrange(50)
    cuts = [0, 3001, 7777, n]
    for k in range(3):
        write_shard(tmp_path / f"train_{k:06d}.bin", np.arange(cuts[k], cuts[k + 1]))
    write_shard(tmp_path / "val_000000.bin", np.arange(40))
    return tmp_path, n


def take(loader, k):
    return [next(loader) for _ in range(k)]


def test_loader_shapes_shift_and_epoch_coverage(counting_data):
    data, n = counting_data
    loader = TokenLoader(data, "train", batch_size=4, seq_len=32, seed=1)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1), "tokens are positions, so y must be x + 1 (also across shard cuts)"
    assert loader.windows_per_epoch == (n - 1) // 32

    starts = loader.epoch_starts(0)
    assert len(set(starts.tolist())) == len(starts) == (n - 1) // 32
    assert len({int(s) % 32 for s in starts}) == 1 and starts.max() + 33 <= n


def test_loader_is_deterministic_and_resumes_exactly(counting_data):
    data, _ = counting_data
    make = lambda: TokenLoader(data, "train", batch_size=5, seq_len=64, seed=3)  # noqa: E731
    per_epoch = make().windows_per_epoch  # 156 windows: 31.2 batches per epoch
    full = take(make(), 70)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, take(make(), 70), strict=True))
    other = next(TokenLoader(data, "train", batch_size=5, seq_len=64, seed=4))[0]
    assert not torch.equal(full[0][0], other)

    for k in (1, 30, 31, 62):  # 31 -> 32 crosses the end of epoch 0
        first = make()
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        for want, got in zip(full[k : k + 8], take(resumed, 8), strict=True):
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert state["window"] == 62 * 5 and 62 * 5 // per_epoch == 1

    wrong = TokenLoader(data, "train", batch_size=5, seq_len=32, seed=3)
    with pytest.raises(DataError, match="seq_len"):
        wrong.load_state_dict(state)


def rank_loaders(data, world: int, **kw) -> list[TokenLoader]:
    return [
        TokenLoader(data, "train", batch_size=7, seq_len=50, seed=7, rank=r, world_size=world, **kw)
        for r in range(world)
    ]


def same_batches(a, b) -> bool:
    if len(a) != len(b):
        return False
    return all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))


def test_loader_ranks_split_one_global_stream(counting_data):
    """W ranks taking k batches each see exactly the k·W batches one process takes; rank r every W-th."""
    data, _ = counting_data
    single = take(rank_loaders(data, 1)[0], 60)  # ~200 windows per epoch: 7-row batches straddle epoch ends
    for world in (2, 3):
        ranks = rank_loaders(data, world)
        rounds = [[next(loader) for loader in ranks] for _ in range(60 // world)]
        assert same_batches([b for batches in rounds for b in batches], single)
        firsts = [set(batch[0][:, 0].tolist()) for batch in rounds[0]]
        assert all(not firsts[i] & firsts[j] for i in range(world) for j in range(i))  # disjoint windows
        states = [loader.state_dict() for loader in ranks]
        assert all(state == states[0] for state in states) and "world_size" not in states[0]
        assert states[0]["window"] == 60 * 7


def test_loader_resumes_with_another_world_size(counting_data):
    data, _ = counting_data
    single = take(rank_loaders(data, 1)[0], 24)
    two = rank_loaders(data, 2)
    for _ in range(5):
        [next(loader) for loader in two]
    state = json.loads(json.dumps(two[1].state_dict()))  # any rank's state will do
    one = rank_loaders(data, 1)[0]
    one.load_state_dict(state)
    assert same_batches(take(one, 6), single[10:16])
    three = rank_loaders(data, 3)
    for loader in three:
        loader.load_state_dict(state)
    got = [b for _ in range(2) for b in (next(loader) for loader in three)]
    assert same_batches(got, single[10:16])
    # a single-process state of the earlier (epoch, position) format continues the same stream
    legacy = {"epoch": 0, "position": 70, "seed": 7, "seq_len": 50, "world_size": 1, "n_tokens": one.n_tokens}
    one.load_state_dict(legacy)
    assert same_batches(take(one, 2), single[10:12])
    with pytest.raises(DataError, match="world_size=2"):
        one.load_state_dict({**legacy, "world_size": 2})


def test_loader_too_small_split(counting_data):
    data, _ = counting_data
    with pytest.raises(DataError, match="has 40 tokens, but seq_len=64 needs at least 65"):
        TokenLoader(data, "val", batch_size=1, seq_len=64)
    with pytest.raises(DataError, match="run `diffv2 data prepare"):
        TokenLoader(data / "missing", "train", batch_size=1, seq_len=8)


def test_eval_batches_are_fixed_and_sequential(counting_data):
    data, n = counting_data
    ev = EvalBatches(data, "train", batch_size=3, seq_len=100, max_batches=4)
    batches = list(ev)
    assert len(ev) == len(batches) == 4
    assert [b[0][:, 0].tolist() for b in batches] == [[300 * i, 300 * i + 100, 300 * i + 200] for i in range(4)]
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, list(ev), strict=True))
    assert len(EvalBatches(data, "train", batch_size=3, seq_len=100)) == ((n - 1) // 100) // 3
    small = list(EvalBatches(data, "val", batch_size=8, seq_len=10))
    assert len(small) == 1 and small[0][0].shape == (3, 10)


def test_eval_batches_split_across_ranks_in_equal_rounds(counting_data):
    data, _ = counting_data
    whole = list(EvalBatches(data, "train", batch_size=3, seq_len=100, max_batches=5))
    ranks = [
        EvalBatches(data, "train", batch_size=3, seq_len=100, max_batches=5, rank=r, world_size=3) for r in range(3)
    ]
    rounds = [list(ev.padded()) for ev in ranks]
    assert [len(r) for r in rounds] == [2, 2, 2] and [len(ev) for ev in ranks] == [2, 2, 1]
    assert [real for r in rounds for *_, real in r] == [True, True, True, True, True, False]
    real = sorted(((x, y) for r in rounds for x, y, ok in r if ok), key=lambda b: int(b[0][0, 0]))
    assert same_batches(real, whole) and ranks[0].n_batches == 5


def test_loader_on_a_prepared_dataset(tmp_path):
    rng = random.Random()
    src = write_docs(tmp_path / "src", [random_text(rng, 200) for _ in range(10)])
    prepare_dataset(src, tmp_path / "out", tokenizer="byte", val_fraction=0.2, progress=False)
    loader = TokenLoader(tmp_path / "out", "train", batch_size=2, seq_len=16)
    x, y = next(loader)
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) <= 256
    assert loader.manifest is not None and loader.manifest["eot_id"] == 256
    assert len(list(EvalBatches(tmp_path / "out", batch_size=2, seq_len=16, max_batches=2))) >= 1


def test_a_token_beyond_the_vocabulary_is_refused_when_read(counting_data):
    """Tokens are ids 0..n-1: with a vocabulary of n - 100, the windows reaching the last 100 tokens are refused
    in one line (a shard rewritten after its verification), and every other window reads as before."""
    data, n = counting_data
    vocab = n - 100
    loader = TokenLoader(data, "train", batch_size=4, seq_len=32, seed=3, vocab_size=vocab)
    unchecked = TokenLoader(data, "train", batch_size=4, seq_len=32, seed=3)
    with pytest.raises(DataError, match=f"but the vocabulary has {vocab} ids"):
        for _ in range(n // 128 + 2):  # an epoch and a bit: some window reaches the end
            x, _ = next(loader)
            torch.testing.assert_close(x, next(unchecked)[0])
            assert int(x.max()) < vocab
    evals = EvalBatches(data, "val", batch_size=2, seq_len=8, vocab_size=30)
    with pytest.raises(DataError, match="token id 3"):
        list(evals)
