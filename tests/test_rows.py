"""Continuous batching's device side: rows at different lengths in one decode step, chunked prefill, per-row
sampling settings."""

from __future__ import annotations

import pytest
import torch

from diffv2 import ModelConfig, Transformer
from diffv2.generate import (
    KVCache,
    RowDecoder,
    bucket_sizes,
    fused_projections,
    generate_batch,
    sample_next,
    sample_rows,
)
from diffv2.generate.step import DecodeStep

from .models import kernel_sized

VARIANTS = ["baseline", "diff_v1", "diff_v2"]


def tiny(attention: str, seed: int = 0, dtype=torch.float64) -> Transformer:
    cfg = ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        ffn_hidden=64,
        max_seq_len=48,
        attention=attention,
    )
    torch.manual_seed(seed)
    return Transformer(cfg).to(dtype).eval()


def run_rows(decoder: RowDecoder, prompts: list[list[int]], rows: list[int], new: list[int], chunk: int):
    """Greedy decoding of each prompt in its row: prompts join one after another (chunked prefill) while the
    earlier ones keep decoding, and each leaves as soon as it has its tokens."""
    out: list[list[int]] = [[] for _ in prompts]
    tokens = torch.zeros(decoder.rows, dtype=torch.long)
    slots = {}
    for i, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        ids = torch.tensor(prompt)
        logits = torch.cat([decoder.prefill(row, ids[a : a + chunk], a) for a in range(0, len(prompt), chunk)])
        out[i].append(int(logits[-1].argmax()))
        tokens[row], slots[i] = out[i][-1], len(prompt)
        # one decode step of everyone admitted so far before the next prompt joins
        live = [j for j in range(i + 1) if len(out[j]) < new[j]]
        if live and i + 1 < len(prompts):
            step_all(decoder, out, tokens, slots, rows, live)
    while live := [j for j in range(len(prompts)) if len(out[j]) < new[j]]:
        step_all(decoder, out, tokens, slots, rows, live)
    return out


def step_all(decoder, out, tokens, slots, rows, live):
    n = decoder.bucket(max(rows[j] for j in live) + 1)
    slot = torch.full((n,), decoder.scratch_slot)
    for j in live:
        slot[rows[j]] = slots[j]
    logits = decoder.step(tokens[:n].clone(), slot)
    for j in live:
        out[j].append(int(logits[rows[j]].argmax()))
        tokens[rows[j]], slots[j] = out[j][-1], slots[j] + 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_at_different_lengths_equal_each_prompt_alone(variant):
    model = tiny(variant, seed=3)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (9, 2, 21, 5)]
    new = [12, 20, 7, 15]
    rows = [3, 0, 5, 1]  # scattered rows: the steps run over buckets 4 and 8 of a 6-row decoder
    decoder = RowDecoder(model, 6)
    assert decoder.buckets == [1, 2, 4, 6]
    got = run_rows(decoder, prompts, rows, new, chunk=4)
    alone = [generate_batch(model, [p], n, temperature=0)[0] for p, n in zip(prompts, new, strict=True)]
    assert got == alone
    # a freed row is reused by a new sequence without clearing it: the window hides what the old one wrote
    again = run_rows(decoder, prompts[:1], [5], [10], chunk=32)
    assert again == [alone[0][:10]]


def test_prefill_in_chunks_equals_one_forward():
    model = tiny("diff_v2", seed=1)
    seq = torch.randint(0, 97, (30,))
    decoder = RowDecoder(model, 2)
    with torch.no_grad():
        full = model(seq[None])[0]
    chunks = [decoder.prefill(1, seq[a : a + 7], a) for a in range(0, 30, 7)]
    torch.testing.assert_close(torch.cat(chunks), full, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="no room"):
        decoder.prefill(0, torch.arange(48), 0)


def test_cache_rows_share_memory_and_per_row_slots_write_where_told():
    cfg = ModelConfig.preset("tiny", vocab_size=97, max_seq_len=16)
    cache = KVCache(cfg, 4, 16, dtype=torch.float32, device=torch.device("cpu"))
    view = cache.rows(1, 3, static=True)
    assert view.batch == 2 and view.keys[0].data_ptr() == cache.keys[0][1].data_ptr()
    slots = torch.tensor([[5], [9]])
    view.advance(slots, 16)
    k, v = torch.randn(2, cfg.n_kv_heads, 1, cfg.head_dim), torch.randn(2, cfg.n_kv_heads, 1, cfg.head_dim)
    view.layers[0].update(k, v)
    torch.testing.assert_close(cache.keys[0][1, :, 5], k[0, :, 0])
    torch.testing.assert_close(cache.values[0][2, :, 9], v[1, :, 0])
    assert cache.keys[0][[0, 3]].abs().sum() == 0 and cache.keys[0][1, :, 9].abs().sum() == 0
    window = view.window(None)
    assert window.end.tolist() == [6, 10] and window.start.tolist() == [0, 0]
    with pytest.raises(ValueError, match="inside the cache"):
        cache.rows(3, 5)
    with pytest.raises(ValueError, match="per-row slots"):
        cache.rows(0, 2).advance(slots, 16)  # prefix mode has no per-row slots


def test_per_row_decode_step_equals_full_forward_at_each_rows_position():
    model = tiny("diff_v2", seed=5)
    seqs = torch.randint(0, 97, (3, 20))
    lengths = [4, 11, 17]  # each row has this many tokens cached; the step feeds the next one
    cache = KVCache(model.cfg, 3, 24, dtype=torch.float64, device=torch.device("cpu"))
    with torch.no_grad():
        for row, n in enumerate(lengths):
            one = cache.rows(row, row + 1)
            one.advance(torch.arange(n), n)
            model(seqs[row : row + 1, :n], caches=one.layers)
        step = DecodeStep(model, cache, torch.zeros(3, dtype=torch.long), per_row_slots=True)
        logits = step(seqs[torch.arange(3), lengths], torch.tensor(lengths))
        for row, n in enumerate(lengths):
            torch.testing.assert_close(logits[row], model(seqs[row : row + 1, : n + 1])[0, -1])
    with pytest.raises(ValueError, match="this step takes"):
        step(seqs[:, 0], torch.tensor([1, 2]))


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert bucket_sizes(48) == [1, 2, 4, 8, 16, 32, 48]


def test_sample_rows_follows_each_rows_settings():
    torch.manual_seed(0)
    vocab, draws = 12, 4000
    logits = torch.randn(5, vocab) * 2
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3, 1.0])
    top_k = torch.tensor([0, 0, 3, 0, 1])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.6, 1.0])
    batch = logits.repeat(draws, 1)
    got = sample_rows(
        batch,
        temperature.repeat(draws),
        top_k.repeat(draws),
        top_p.repeat(draws),
        generator=torch.Generator().manual_seed(1),
    ).view(draws, 5)
    assert (got[:, 0] == logits[0].argmax()).all() and (got[:, 4] == logits[4].argmax()).all()
    assert set(got[:, 2].tolist()) <= set(logits[2].topk(3).indices.tolist())
    probs, order = torch.softmax(logits[3] / 1.3, -1).sort(descending=True)
    nucleus = order[probs.cumsum(0) - probs < 0.6]  # a token is kept while the ones above it hold < top_p
    assert set(got[:, 3].tolist()) <= set(nucleus.tolist()) and len(nucleus) < vocab
    # the distribution sample_next draws from, row by row (its own draws, from its own generator)
    gen = torch.Generator().manual_seed(2)
    for row in (1, 2, 3):
        kwargs = dict(
            temperature=float(temperature[row]),
            top_k=int(top_k[row]) or None,
            top_p=float(top_p[row]) if top_p[row] < 1 else None,
        )
        ref = sample_next(logits[row].repeat(draws, 1), generator=gen, **kwargs)
        freq = torch.bincount(got[:, row], minlength=vocab) / draws
        want = torch.bincount(ref, minlength=vocab) / draws
        assert (freq - want).abs().max() < 0.05, row


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_graphed_rows_equal_each_prompt_alone(variant):
    """On CUDA each bucket's step is a captured graph reading the Triton window kernel (head_dim 64)."""
    cfg = kernel_sized(vocab_size=97, max_seq_len=64, attention=variant)
    torch.manual_seed(7)
    model = Transformer(cfg).cuda().eval()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (9, 2, 21, 5)]
    new = [12, 20, 7, 15]
    with fused_projections(model):
        decoder = RowDecoder(model, 6)
        assert all(step.graph is not None for step in decoder.steps.values())
        got = run_rows(decoder, prompts, [3, 0, 5, 1], new, chunk=8)
    alone = [
        generate_batch(model, [p], n, temperature=0, cuda_graph=False)[0] for p, n in zip(prompts, new, strict=True)
    ]
    assert got == alone
