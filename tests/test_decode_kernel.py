"""The split-KV decode kernel (``diffv2.kernels.decode_triton``) against eager attention with an explicit mask.

Three tiers, so that CI without a GPU stays green and fast:
- always: argument checks and the window ↔ mask equivalence with the KV cache;
- ``TRITON_INTERPRET=1`` with triton installed: the Triton kernels themselves on CPU tensors (fp32, fp16),
  with the ``interpreter`` fixture of ``conftest.py`` working around two bugs of Triton 3.6's interpreter;
- CUDA: bf16/fp16/fp32 at larger shapes, torch.compile(fullgraph=True) and CUDA-graph capture.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from diffv2 import ModelConfig
from diffv2.generate import KVCache, fused_projections
from diffv2.kernels import decode_triton as dt
from diffv2.kernels import window_mask

from .decode_cases import as_lambda, check, explicit_mask, make_inputs, reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and dt.HAS_TRITON
CUDA = torch.cuda.is_available() and dt.HAS_TRITON
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1")
requires_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and triton")


# ---------------------------------------------------------------- always


@pytest.mark.skipif(INTERPRET or CUDA, reason="here Triton can run the kernel")
def test_refuses_inputs_triton_cannot_run():
    q, k, v, start, end, _ = make_inputs(2, 8, 2, 32, 1, 16, torch.float32)
    assert not dt.triton_supported(q, k, v)
    with pytest.raises(ValueError, match="triton_supported"):
        dt.decode_attention_triton(q, k, v, start, end)


@pytest.mark.parametrize("t", [1, 3])
def test_window_mask_equals_static_cache_mask(t):
    """A static cache's mask is exactly the window [start, slots[-1] + 1): what wiring the kernel relies on."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden=64)
    cache = KVCache(cfg, 3, 20, dtype=torch.float32, device=torch.device("cpu"), static=True)
    cache.advance(torch.arange(9, 9 + t), 9 + t)
    start = torch.tensor([0, 4, 7])
    expected = cache.mask(start)
    assert torch.equal(window_mask(start, (cache.slots[-1] + 1).expand(3), t, 20), expected)
    assert torch.equal(explicit_mask(start, torch.full((3,), 9 + t), t, 20), expected)


def test_rejects_bad_shapes():
    q, k, v, start, end, w = make_inputs(2, 8, 2, 32, 1, 16, torch.float32)
    with pytest.raises(ValueError):
        dt.decode_attention_triton(q, k, v, start, end, pair_weight=w[:, :2])
    with pytest.raises(ValueError):
        dt.decode_attention_triton(q, k, v, start[:1], end)
    with pytest.raises(ValueError, match="pair_sigmoid"):
        dt.decode_attention_triton(q, k, v, start, end, pair_sigmoid=True)


# ---------------------------------------------------------------- Triton interpreter (CPU)

CASES = [  # (B, Hq, Hkv, d, T, S): group sizes 1, 2, 4, 8; S never a multiple of the key block
    (1, 4, 4, 64, 1, 37),
    (2, 8, 4, 64, 1, 100),
    (3, 8, 2, 128, 1, 77),
    (2, 16, 2, 64, 4, 150),
    (2, 8, 1, 128, 4, 70),
    (3, 4, 2, 64, 4, 33),
]


@interpreter_only
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_interpreter_matches_eager(case, dtype, num_splits):
    b, hq, hkv, d, t, s = case
    q, k, v, start, end, _ = make_inputs(b, hq, hkv, d, t, s, dtype)
    out = dt.decode_attention_triton(q, k, v, start, end, num_splits=num_splits)
    check(out, reference(q, k, v, start, end), dtype)


@interpreter_only
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [c for c in CASES if c[1] // c[2] % 2 == 0])
def test_interpreter_diff_v2_epilogue(case, dtype, num_splits):
    b, hq, hkv, d, t, s = case
    q, k, v, start, end, w = make_inputs(b, hq, hkv, d, t, s, dtype, seed=1)
    out = dt.decode_attention_triton(q, k, v, start, end, pair_weight=w, num_splits=num_splits)
    assert out.shape == (b, hq // 2, t, d)
    check(out, reference(q, k, v, start, end, w), dtype, pair=True)
    lam = as_lambda(w, dtype)  # σ applied in the epilogue (both the direct and the combine kernel)
    out = dt.decode_attention_triton(q, k, v, start, end, pair_weight=lam, pair_sigmoid=True, num_splits=num_splits)
    check(out, reference(q, k, v, start, end, torch.sigmoid(lam.double())), dtype, pair=True)


@interpreter_only
@pytest.mark.usefixtures("interpreter")
def test_interpreter_index_dtypes_scale_and_empty_splits():
    q, k, v, start, end, _ = make_inputs(2, 8, 2, 64, 1, 90, torch.float32, seed=2)
    ref = reference(q, k, v, start, end, scale=0.05)
    end32 = end.to(torch.int32)
    # int32 windows, a custom scale, and more splits than key blocks (most splits empty)
    check(dt.decode_attention_triton(q, k, v, start.int(), end32, scale=0.05, num_splits=16), ref, q.dtype)
    # a broadcast (stride-0) window end, as a cache would build it from slots[-1] + 1
    same_end = torch.tensor(90).expand(2)
    ref_full = reference(q, k, v, start, same_end.contiguous())
    check(dt.decode_attention_triton(q, k, v, start, same_end, num_splits=2), ref_full, q.dtype)
    # defaults: the whole cache
    full = dt.decode_attention_triton(q, k, v)
    check(full, reference(q, k, v, torch.zeros(2, dtype=torch.long), torch.full((2,), 90)), q.dtype)


@interpreter_only
@pytest.mark.usefixtures("interpreter")
def test_interpreter_dynamo_fullgraph():
    """The custom op's fake impl lets dynamo trace through without a graph break."""
    q, k, v, start, end, w = make_inputs(2, 8, 2, 64, 1, 50, torch.float32, seed=3)

    def fn(q, k, v, start, end, w):
        return dt.decode_attention_triton(q, k, v, start, end, pair_weight=w, num_splits=2) * 2

    out = torch.compile(fn, backend="eager", fullgraph=True)(q, k, v, start, end, w)
    check(out, 2 * reference(q, k, v, start, end, w), q.dtype, pair=True)


@interpreter_only
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("attention", ["baseline", "diff_v1", "diff_v2"])
def test_interpreter_model_decode_through_the_kernel(attention, fused):
    """Wired in: a model's static-cache decode steps reach the kernel (DIFF V2 with the pair epilogue; DIFF V1
    on strided head views) and give the full forward's logits, also with generation's fused projections (q, k
    and λ then reach the RoPE and decode kernels as column blocks of one matmul's output)."""

    from diffv2 import Transformer
    from diffv2.attention import traced_routes
    from diffv2.generate.step import DecodeStep

    cfg = ModelConfig(
        vocab_size=50,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_hidden=64,
        max_seq_len=32,
        attention=attention,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    seq = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        full = model(seq)
        cache = KVCache(cfg, 2, 12, dtype=torch.float32, device=torch.device("cpu"))
        cache.advance(torch.arange(5), 5)
        model(seq[:, :5], caches=cache.layers)
        with fused_projections(model) if fused else contextlib.nullcontext(), traced_routes() as taken:
            step = DecodeStep(model, cache, torch.tensor([0, 0]))
            for slot in range(5, 9):
                torch.testing.assert_close(step(seq[:, slot], slot), full[:, slot], rtol=1e-4, atol=1e-4)
    route = {"baseline": ["split_kv_decode"], "diff_v1": ["split_kv_decode"] * 4, "diff_v2": ["diff_v2_decode_kernel"]}[
        attention
    ]
    assert taken == route * cfg.n_layers * 4


@interpreter_only
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("attention", ["baseline", "diff_v2"])
def test_interpreter_rows_at_different_lengths_through_the_kernel(attention, monkeypatch):
    """Continuous batching's step (``RowDecoder``): each row at its own length, with its own window end and
    RoPE position, one kernel call per layer; rows taking no part write the scratch slot. Each row's logits
    equal the full forward's at its position."""
    from diffv2 import Transformer
    from diffv2.generate import RowDecoder

    calls = []
    original = dt.decode_attention_triton

    def spy(*args, **kwargs):
        calls.append(args[4].tolist())  # each row's window end
        return original(*args, **kwargs)

    monkeypatch.setattr("diffv2.attention.dispatch.decode_attention_triton", spy)  # what the decode routes call
    shape = dict(vocab_size=50, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=64)
    cfg = ModelConfig(**shape, max_seq_len=24, attention=attention)
    torch.manual_seed(1)
    model = Transformer(cfg).eval()
    seqs = torch.randint(0, 50, (4, 20))
    lengths = [3, 11, 0, 7]  # row 2 is free
    with torch.no_grad(), fused_projections(model):
        full = model(seqs)
        decoder = RowDecoder(model, 4)
        for row, n in enumerate(lengths):
            if n:
                decoder.prefill(row, seqs[row, :n], 0)
        slots = torch.tensor([n if n else decoder.scratch_slot for n in lengths])
        logits = decoder.step(seqs[torch.arange(4), torch.tensor(lengths)], slots)
    for row, n in enumerate(lengths):
        if n:
            torch.testing.assert_close(logits[row], full[row, n], rtol=1e-4, atol=1e-4)
    assert calls == [[4, 12, 24, 8]] * cfg.n_layers


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_splits", [1, 5, None])
@pytest.mark.parametrize(
    ("hq", "hkv", "d", "t"),
    [
        (8, 8, 128, 1),
        (16, 8, 64, 1),
        (16, 4, 128, 4),
        (32, 4, 128, 1),
        (32, 4, 128, 16),
        (16, 2, 64, 16),
        (32, 4, 64, 4),
    ],
)
@pytest.mark.parametrize("b", [1, 5])
def test_gpu_matches_eager(b, hq, hkv, d, t, num_splits, dtype):
    q, k, v, start, end, w = make_inputs(b, hq, hkv, d, t, 1000, dtype, device="cuda", seed=b + t)
    out = dt.decode_attention_triton(q, k, v, start, end, num_splits=num_splits)
    check(out, reference(q, k, v, start, end), dtype)
    if (hq // hkv) % 2 == 0:
        out = dt.decode_attention_triton(q, k, v, start, end, pair_weight=w, num_splits=num_splits)
        check(out, reference(q, k, v, start, end, w), dtype, pair=True)
        lam = as_lambda(w, dtype)
        out = dt.decode_attention_triton(q, k, v, start, end, pair_weight=lam, pair_sigmoid=True, num_splits=num_splits)
        check(out, reference(q, k, v, start, end, torch.sigmoid(lam.double())), dtype, pair=True)


@pytest.mark.gpu
@requires_gpu
def test_gpu_long_cache_auto_splits():
    q, k, v, start, end, w = make_inputs(2, 32, 4, 128, 1, 20_003, torch.bfloat16, device="cuda")
    check(dt.decode_attention_triton(q, k, v, start, end), reference(q, k, v, start, end), q.dtype)
    check(
        dt.decode_attention_triton(q, k, v, start, end, pair_weight=w),
        reference(q, k, v, start, end, w),
        q.dtype,
        pair=True,
    )


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("pair", [False, True])
def test_gpu_compile_fullgraph(pair):
    q, k, v, start, end, w = make_inputs(4, 32, 4, 128, 1, 3000, torch.bfloat16, device="cuda")
    w = w if pair else None

    def step(q, k, v, start, end, w):
        return dt.decode_attention_triton(q, k, v, start, end, pair_weight=w).float().square().sum(-1)

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, start, end, w), step(q, k, v, start, end, w), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("pair", [False, True])
def test_gpu_cuda_graph_follows_window_updates(pair):
    """Capture once, then move the window in place (as a growing cache does) and replay: no re-capture."""
    q, k, v, start, end, w = make_inputs(3, 32, 4, 128, 1, 4096, torch.bfloat16, device="cuda")
    w = w if pair else None
    start, end = start.clone(), end.clone()

    def run():
        return dt.decode_attention_triton(q, k, v, start, end, pair_weight=w)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for new_end in (100, 2049, 4096):
        end.fill_(new_end)
        graph.replay()
        torch.cuda.synchronize()
        check(out, reference(q, k, v, start, end, w), q.dtype, pair=pair)
