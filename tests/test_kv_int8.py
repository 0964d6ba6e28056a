"""The int8 KV cache (``KVCache(kv_dtype="int8")``, docs/design.md#kv-cache): the number format's error bound, the
cache's size, and decoding with it against decoding with a full-precision cache. The Triton kernel's int8 variant
is checked here against the dequantised definition (interpreter and CUDA) and in ``tests/test_conformance.py``.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from diffv2 import ModelConfig, Transformer
from diffv2.diagnostics import attention_kv_transform
from diffv2.errors import ConfigError
from diffv2.generate import KVCache, RowDecoder, generate_batch, stream_batch
from diffv2.generate.step import DecodeStep
from diffv2.kernels import QuantizedKV, quantize_int8
from diffv2.kernels import decode_triton as dt
from diffv2.kernels.kv_int8 import int8_round_trip

from .decode_cases import check, int8_inputs, make_inputs, reference

CPU = torch.device("cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and dt.HAS_TRITON
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1")
CUDA = torch.cuda.is_available() and dt.HAS_TRITON
requires_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and triton")
# |logits(int8 cache) − logits(fp32 cache)| <= LOGIT_TOL · max |logits| on the tiny models below (measured, relative
# to the largest logit: 1.4e-3 baseline, 5.8e-3 DIFF V1, 1.3e-3 DIFF V2, 8.2e-4 gated); DIFF V1's RMSNorm after its
# subtraction amplifies the most. A statement about these models, not a bound for trained ones.
LOGIT_TOL = 2e-2


def model_for(attention: str, seed: int = 0) -> Transformer:
    cfg = ModelConfig(
        vocab_size=61,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        ffn_hidden=48,
        max_seq_len=64,
        attention=attention,
    )
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_quantisation_error_is_at_most_half_a_step(dtype):
    """|x − q·s| <= s/2 per element (round to nearest), plus the fp32 rounding of x/s: at most 127·2⁻²⁴·s, which
    bf16 inputs meet (their x/s often lands on a tie); q in [-127, 127] with the absmax element at ±127; an
    all-zero vector stays zero (scale 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 50, 64, generator=g, dtype=torch.float64) * torch.randn(3, 4, 50, 1, generator=g).exp()
    x[0, 0, 0] = 0.0
    x = x.to(dtype)
    q, s = quantize_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == x.shape[:-1]
    err = (x.double() - q.double() * s.double()[..., None]).abs()
    assert (err <= s.double()[..., None] * (0.5 + 127 * 2**-24)).all()
    assert q.abs().amax(-1)[s > 0].eq(127).all() and q.abs().max() <= 127
    assert s[0, 0, 0] == 0 and q[0, 0, 0].eq(0).all()
    torch.testing.assert_close(QuantizedKV(q, s, torch.float32).dequantize(), (q.float() * s[..., None]))


def test_int8_cache_holds_about_half_the_bytes_of_bf16():
    cfg = model_for("diff_v2").cfg
    batch, slots = 3, 40
    bf16 = KVCache(cfg, batch, slots, dtype=torch.bfloat16, device=CPU)
    int8 = KVCache(cfg, batch, slots, dtype=torch.bfloat16, device=CPU, kv_dtype="int8")
    vectors = 2 * cfg.n_layers * batch * cfg.n_kv_heads * slots  # K and V: one per layer, row, head and slot
    assert bf16.nbytes() == vectors * cfg.head_dim * 2
    assert int8.nbytes() == vectors * (cfg.head_dim + 4)  # a byte an element, an fp32 scale a vector
    assert int8.kv_dtype == "int8" and bf16.kv_dtype == "auto"
    assert int8.rows(1, 3).nbytes() == int8.nbytes() * 2 // 3  # views of the same rows, scales included
    with pytest.raises(ConfigError, match="kv_dtype='fp8'"):
        KVCache(cfg, 1, 4, dtype=torch.float32, device=CPU, kv_dtype="fp8")


def _teacher_forced(model: Transformer, seq: torch.Tensor, kv_dtype: str, static: bool) -> torch.Tensor:
    """Logits of ``seq``: a prompt of 5, then one token a step, through a cache of ``kv_dtype``."""
    cache = KVCache(model.cfg, seq.shape[0], seq.shape[1], dtype=torch.float32, device=CPU, kv_dtype=kv_dtype)
    cache.advance(torch.arange(5), 5)
    got = [model(seq[:, :5], caches=cache.layers)]
    if static:
        step = DecodeStep(model, cache, torch.zeros(seq.shape[0], dtype=torch.long))
        got += [step(seq[:, i], i)[:, None] for i in range(5, seq.shape[1])]
    else:
        for i in range(5, seq.shape[1]):
            cache.advance(torch.tensor([i]), i + 1)
            got.append(model(seq[:, i : i + 1], positions=torch.tensor([[i]]), caches=cache.layers))
    return torch.cat(got, dim=1)


@pytest.mark.parametrize("static", [False, True], ids=["prefix", "static"])
@pytest.mark.parametrize("attention", ["baseline", "diff_v1", "diff_v2", "gated"])
@torch.no_grad()
def test_int8_decode_stays_within_the_logit_bound(attention, static):
    """Cached decode over an int8 cache against the same decode over an fp32 cache: every logit within LOGIT_TOL of
    the largest, and the greedy token the same wherever the fp32 cache's top two logits are further apart than
    twice the error seen (closer than that, quantisation may legitimately swap them)."""
    model = model_for(attention, seed=2)
    seq = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(3))
    full = _teacher_forced(model, seq, "auto", static)
    int8 = _teacher_forced(model, seq, "int8", static)
    torch.testing.assert_close(full, model(seq), rtol=1e-4, atol=1e-5)  # the fp32 cache is exact
    err = (int8 - full).abs().max()
    assert 0 < err <= LOGIT_TOL * full.abs().max(), f"{err:.3g} vs max |logit| {full.abs().max():.3g}"
    top2 = full.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * err
    assert clear.float().mean() > 0.5  # the check below is not vacuous
    assert torch.equal(int8.argmax(-1)[clear], full.argmax(-1)[clear])


@pytest.mark.parametrize("static", [False, True], ids=["prefix", "static"])
@pytest.mark.parametrize("attention", ["baseline", "diff_v1", "diff_v2", "gated"])
@torch.no_grad()
def test_a_forward_through_the_int8_round_trip_is_decoding_from_an_int8_cache(attention, static):
    """What ``diffv2 eval --tasks kv_int8`` scores: one forward with every layer's keys and values through the
    cache's round trip gives the logits of teacher-forced decoding over a real int8 cache."""
    model = model_for(attention, seed=4)
    seq = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(5))
    with attention_kv_transform(model, int8_round_trip):
        forward = model(seq)
    decoded = _teacher_forced(model, seq, "int8", static)
    torch.testing.assert_close(forward, decoded, rtol=1e-4, atol=1e-5)
    assert (forward - model(seq)).abs().max() > 1e-4  # the round trip changed something, and the hook is gone
    assert all(layer.attn.kv_transform is None for layer in model.layers)


@pytest.mark.parametrize("attention", ["baseline", "diff_v1", "diff_v2"])
def test_int8_greedy_generation_agrees_on_a_short_run(attention):
    """``generate_batch(kv_cache_dtype="int8")``: the same greedy tokens as the model's dtype on this model and
    these prompts (a near-tie could differ: the logit bound above is the general statement), padded prompts too."""
    model = model_for(attention, seed=4)
    prompts = [[5, 9, 13, 2, 40], [7, 1], [30, 31, 32]]
    full = generate_batch(model, prompts, 8, temperature=0)
    assert generate_batch(model, prompts, 8, temperature=0, kv_cache_dtype="int8") == full
    assert generate_batch(model, prompts, 8, temperature=0, kv_cache_dtype="int8", static=True) == full


def test_bad_kv_cache_dtype_is_one_config_error():
    model = model_for("baseline")
    with pytest.raises(ConfigError, match=r"^kv_cache_dtype='int4': must be one of auto, int8$"):
        stream_batch(model, [[1, 2]], 2, kv_cache_dtype="int4")
    with pytest.raises(ConfigError, match="kv_cache_dtype='bf16'"):
        RowDecoder(model, 2, 16, kv_cache_dtype="bf16")


@torch.no_grad()
def test_rows_of_an_int8_cache_decode_at_their_own_lengths():
    """Continuous batching's decoder over an int8 cache: per-row slots write values and scales (scatter)."""
    model = model_for("diff_v2", seed=5)
    seqs = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(6))
    lengths = [4, 9, 6]
    out = {}
    for kv_dtype in ("auto", "int8"):
        decoder = RowDecoder(model, 3, 16, kv_cache_dtype=kv_dtype)
        assert decoder.cache.kv_dtype == kv_dtype
        for row, n in enumerate(lengths):
            decoder.prefill(row, seqs[row, :n], 0)
        out[kv_dtype] = decoder.step(seqs[torch.arange(3), torch.tensor(lengths)], torch.tensor(lengths))
    err = (out["int8"] - out["auto"]).abs().max()
    assert 0 < err <= LOGIT_TOL * out["auto"].abs().max()


def test_the_server_builds_its_rows_with_the_cache_format():
    """``diffv2 serve --kv-cache-dtype``: the scheduler's decoder holds an int8 cache; a bad value is refused at
    construction."""
    pytest.importorskip("fastapi")
    from diffv2.serve import Scheduler

    model = model_for("diff_v2")
    scheduler = Scheduler(model, max_batch=2, max_len=16, kv_cache_dtype="int8").start()
    try:
        assert scheduler._decoder.cache.kv_dtype == "int8"
    finally:
        scheduler.close()
    with pytest.raises(ConfigError, match="kv_cache_dtype='fp8'"):
        Scheduler(model, max_batch=2, kv_cache_dtype="fp8")


def test_serve_help_lists_the_cache_formats(capsys, monkeypatch):
    from diffv2.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--kv-cache-dtype {auto,int8}" in text and "(default: auto)" in text


# ---------------------------------------------------------------- the Triton kernel over an int8 cache


@interpreter_only
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [(2, 8, 4, 64, 1, 100), (2, 16, 2, 64, 4, 150), (2, 8, 1, 128, 4, 70)])
def test_interpreter_int8_cache_matches_its_dequantisation(case, dtype, num_splits):  # case: B, Hq, Hkv, d, T, S
    """The int8 kernel (int8 tiles, scales on the scores' and probabilities' columns) computes attention over the
    dequantised cache, with and without the DIFF V2 epilogue."""
    b, hq, hkv, d, t, s = case
    q, k, v, k64, v64, start, end, w = int8_inputs(b, hq, hkv, d, t, s, dtype, seed=5)
    assert k.data.dtype == torch.int8 and k.data.stride(-1) == 1 and k.scale.shape == (b, hkv, s)
    out = dt.decode_attention_triton(q, k, v, start, end, num_splits=num_splits)
    check(out, reference(q, k64, v64, start, end), dtype)
    out = dt.decode_attention_triton(q, k, v, start, end, pair_weight=w, num_splits=num_splits)
    check(out, reference(q, k64, v64, start, end, w), dtype, pair=True)


def test_int8_cache_needs_its_scales():
    q, k, v, start, end, _ = make_inputs(2, 8, 2, 32, 1, 16, torch.float32)
    kq = QuantizedKV(*quantize_int8(k), torch.float32)
    with pytest.raises(ValueError, match="both"):
        dt.decode_attention_triton(q, kq, v, start, end)
    with pytest.raises(ValueError, match="scales"):
        dt.decode_attention_triton(q, kq.data, kq.data, start, end)


@interpreter_only
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("attention", ["baseline", "diff_v1", "diff_v2"])
def test_interpreter_model_decode_over_an_int8_cache(attention):
    """Unforced dispatch over an int8 cache takes the int8 rows (DIFF V1 on strided head views of the int8 data and
    scales), and the logits equal the same decode with every layer forced through the dequantising rows."""
    from diffv2 import Transformer
    from diffv2.attention import forced_routes, traced_routes
    from diffv2.generate.step import DecodeStep

    shape = dict(vocab_size=50, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=64)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**shape, max_seq_len=32, attention=attention)).eval()
    seq = torch.randint(0, 50, (2, 9))

    def decode(*routes):
        cache = KVCache(model.cfg, 2, 12, dtype=torch.float32, device=torch.device("cpu"), kv_dtype="int8")
        cache.advance(torch.arange(5), 5)
        with torch.no_grad(), forced_routes(*routes) if routes else contextlib.nullcontext():
            model(seq[:, :5], caches=cache.layers)
            with traced_routes() as taken:
                step = DecodeStep(model, cache, torch.tensor([0, 0]))
                logits = torch.stack([step(seq[:, slot], slot) for slot in range(5, 9)])
        return logits, taken

    got, taken = decode()
    want, _ = decode("masked_cuda", "sdpa")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    route = {"diff_v2": ["diff_v2_decode_int8"], "diff_v1": ["split_kv_decode_int8"] * 4}.get(
        attention, ["split_kv_decode_int8"]
    )
    assert taken == route * model.cfg.n_layers * 4


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_splits", [1, 5, None])
@pytest.mark.parametrize(("hq", "hkv", "d", "t"), [(16, 8, 64, 1), (32, 4, 128, 1), (16, 2, 64, 16), (32, 4, 128, 4)])
def test_gpu_int8_cache_matches_its_dequantisation(hq, hkv, d, t, num_splits, dtype):
    q, k, v, k64, v64, start, end, w = int8_inputs(3, hq, hkv, d, t, 1000, dtype, device="cuda", seed=t)
    check(
        dt.decode_attention_triton(q, k, v, start, end, num_splits=num_splits),
        reference(q, k64, v64, start, end),
        dtype,
    )
    out = dt.decode_attention_triton(q, k, v, start, end, pair_weight=w, num_splits=num_splits)
    check(out, reference(q, k64, v64, start, end, w), dtype, pair=True)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("attention", ["baseline", "diff_v2"])
def test_gpu_int8_generation_compiled_and_graphed(attention):
    """An int8 cache through generation's CUDA-graph step, eager and torch.compile'd: the same greedy tokens."""
    from diffv2 import Transformer
    from diffv2.generate import generate_batch

    from .models import kernel_sized

    torch.manual_seed(0)
    model = Transformer(kernel_sized(attention=attention, max_seq_len=64)).cuda().to(torch.bfloat16).eval()
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    graphed = generate_batch(model, prompts, 8, temperature=0, kv_cache_dtype="int8")
    compiled = generate_batch(model, prompts, 8, temperature=0, kv_cache_dtype="int8", compile=True)
    eager = generate_batch(model, prompts, 8, temperature=0, kv_cache_dtype="int8", cuda_graph=False)
    assert graphed == compiled == eager
