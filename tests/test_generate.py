"""Generation: cached decode == full forward, padding, sampling masks, determinism, the CLI."""

from __future__ import annotations

import re

import pytest
import torch

from diffv2 import ModelConfig, Transformer
from diffv2.cli import main
from diffv2.errors import ConfigError
from diffv2.generate import KVCache, generate, generate_batch, sample_next, stream_batch
from diffv2.generate.step import DecodeStep, _step_forward
from diffv2.kernels import eager_attention, masked_decode, masked_prefill

from .cli_flags import QUIET_RUN, TINY_MODEL
from .models import kernel_sized

VARIANTS = {
    "baseline": dict(attention="baseline"),
    "gated": dict(attention="gated"),
    "diff_v1": dict(attention="diff_v1"),
    "diff_v2": dict(attention="diff_v2"),
    "v2_split": dict(attention="diff_v2", pairing="split"),
}


def model_for(variant: str, ratio: int, seed: int = 0) -> Transformer:
    n_heads = 8 if variant == "diff_v1" and ratio == 4 else 4  # V1 needs an even number of KV heads
    cfg = ModelConfig(
        vocab_size=61,
        d_model=32,
        n_layers=2,
        n_heads=n_heads,
        n_kv_heads=n_heads // ratio,
        head_dim=8,
        ffn_hidden=48,
        max_seq_len=64,
        **VARIANTS[variant],
    )
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("form", ["mask", "window"])
@pytest.mark.parametrize("static", [False, True], ids=["prefix", "static"])
@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decode_equals_full_forward(variant, ratio, static, form):
    model = model_for(variant, ratio)
    seq = torch.randint(0, 61, (2, 14))
    with torch.no_grad():
        full = model(seq)
        cache = KVCache(model.cfg, 2, 14, dtype=torch.float32, device=torch.device("cpu"), static=static)
        got = []
        slots = torch.arange(5)  # prefill 5 tokens, then one at a time
        while slots[0] < 14:
            cache.advance(slots, int(slots[-1]) + 1)
            mask = cache.mask(None) if form == "mask" else cache.window(None)
            got.append(model(seq[:, slots], positions=slots[None], mask=mask, caches=cache.layers))
            slots = slots[-1:] + 1
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padded_batch_equals_each_prompt_alone(variant):
    model = model_for(variant, 2, seed=1)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    together = generate_batch(model, prompts, 8, temperature=0)
    alone = [generate_batch(model, [p], 8, temperature=0)[0] for p in prompts]
    assert together == alone
    # and the logits, not just the argmax: the first decode step's distribution matches
    steps = list(stream_batch(model, prompts, 1, temperature=0))
    assert steps[0] == [a[0] for a in alone]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_decode_step_equals_growing_cache(variant):
    """The fixed-shape step (whole buffer, per-row windows: what the CUDA graph replays) generates exactly what
    the growing cache does, padding and seeded sampling included."""
    model = model_for(variant, 2, seed=5)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    for kwargs in (dict(temperature=0), dict(temperature=1.0, top_k=20, seed=3)):
        growing = generate_batch(model, prompts, 9, static=False, **kwargs)
        assert generate_batch(model, prompts, 9, static=True, **kwargs) == growing, kwargs


def test_decode_step_logits_equal_full_forward():
    model = model_for("diff_v2", 2, seed=6)
    seq = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        full = model(seq)
        cache = KVCache(model.cfg, 2, 16, dtype=torch.float32, device=torch.device("cpu"))
        cache.advance(torch.arange(5), 5)
        model(seq[:, :5], caches=cache.layers)
        step = DecodeStep(model, cache, torch.zeros(2, dtype=torch.long))
        for slot in range(5, 12):
            torch.testing.assert_close(step(seq[:, slot], slot), full[:, slot], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        DecodeStep(model, cache, torch.zeros(2, dtype=torch.long), cuda_graph=True)
    with pytest.raises(ValueError, match="past the cache"):
        step(seq[:, 0], 16)


@pytest.mark.parametrize("compile", [False, True])
def test_decode_step_frees_its_cache_without_the_cyclic_gc(compile):
    """A step that referenced itself (a bound method kept on self) kept the cache alive until Python's cyclic
    GC ran: a cache of many GB outlived one benchmark point and the next points ran out of GPU memory."""
    import gc
    import weakref

    model = model_for("diff_v2", 2, seed=2)
    cache = KVCache(model.cfg, 2, 16, dtype=torch.float32, device=torch.device("cpu"))
    step = DecodeStep(model, cache, torch.zeros(2, dtype=torch.long), compile=compile)
    step(torch.randint(0, 61, (2,)), 3)
    buffer = weakref.ref(cache.keys[0])
    gc.collect()
    gc.disable()
    try:
        del step, cache
        assert buffer() is None
    finally:
        gc.enable()


def test_generation_options_are_checked():
    model = model_for("diff_v2", 2)
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        generate_batch(model, [[1, 2]], 0)
    with pytest.raises(ConfigError, match="compile=True"):
        generate_batch(model, [[1, 2]], 3, compile=True, static=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda_graph=True"):
            generate_batch(model, [[1, 2]], 3, cuda_graph=True)


def test_compiled_decode_step_on_cpu_equals_eager():
    """Also guards the warm-up (shared with CUDA-graph capture): its writes must not land on a prompt's slot."""
    model = model_for("diff_v2", 2, seed=9)
    prompts = [[3, 4, 5, 6], [10, 11]]
    assert generate_batch(model, prompts, 6, temperature=0, compile=True) == generate_batch(
        model, prompts, 6, temperature=0
    )


def test_compiled_decode_step_writes_the_cache_in_place():
    """Under torch.compile each layer's K/V write must land in the cache buffer itself. A cache whose layers were
    views of one tensor got functionalized into a scatter over the whole base: inductor then allocated cache-sized
    buffers and copied the whole cache back on every step (a much slower step at long context)."""
    from torch._inductor.utils import run_and_get_code

    model = model_for("diff_v2", 2, seed=4)
    cfg = model.cfg
    cache = KVCache(cfg, 2, 256, dtype=torch.float32, device=torch.device("cpu"))
    step = DecodeStep(model, cache, torch.tensor([0, 3]))
    step.tokens.copy_(torch.randint(0, cfg.vocab_size, (2, 1)))
    step.slot.fill_(7)
    before = [t.clone() for t in cache.keys]
    with torch.no_grad():
        logits, codes = run_and_get_code(torch.compile(_step_forward, fullgraph=True), step)
    layer_shape = f"({2}, {cfg.n_kv_heads}, {256}, {cfg.head_dim})"
    allocations = [line for code in codes for line in code.splitlines() if "empty_strided" in line]
    assert allocations and not [line for line in allocations if layer_shape in line]
    for old, new in zip(before, cache.keys, strict=True):  # slot 7 written, every other slot untouched
        assert not torch.equal(old[:, :, 7], new[:, :, 7])
        torch.testing.assert_close(
            torch.cat([old[:, :, :7], old[:, :, 8:]], 2), torch.cat([new[:, :, :7], new[:, :, 8:]], 2)
        )
    with torch.no_grad():
        torch.testing.assert_close(logits, _step_forward(step))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("variant", ["baseline", "diff_v1", "diff_v2"])
def test_gpu_graphed_generation_equals_eager(variant, compile):
    """CUDA graph (+ compile) decode through the Triton window kernel == the growing-cache loop, in fp32 (where
    greedy ties cannot flip) with head_dim 64 so the kernel applies."""
    n_heads = 4
    cfg = ModelConfig(
        vocab_size=97,
        d_model=128,
        n_layers=2,
        n_heads=n_heads,
        n_kv_heads=2,
        head_dim=64,
        ffn_hidden=128,
        max_seq_len=128,
        **VARIANTS[variant],
    )
    torch.manual_seed(7)
    model = Transformer(cfg).cuda().eval()
    prompts = [[3, 4, 5, 6, 7, 8, 9, 1, 2], [10, 11], [12, 13, 14, 15]]
    growing = generate_batch(model, prompts, 20, temperature=0, static=False, cuda_graph=False)
    graphed = generate_batch(model, prompts, 20, temperature=0, static=True, cuda_graph=True, compile=compile)
    assert graphed == growing
    sampled = [generate_batch(model, prompts, 20, temperature=1.0, seed=1, cuda_graph=g) for g in (False, True)]
    assert sampled[0] == sampled[1]


def test_masked_prefill_equals_eager_on_real_rows_and_stays_finite():
    """The CUDA path for long left-padded prompts (SDPA on repeated K/V), run here on CPU tensors."""
    torch.manual_seed(3)
    q, k, v = torch.randn(3, 8, 20, 16), torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    cfg = ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=16)
    cache = KVCache(cfg, 3, 20, dtype=torch.float32, device=torch.device("cpu"))
    cache.advance(torch.arange(20), 20)
    start = torch.tensor([0, 5, 13])
    mask = cache.mask(start)
    got, want = masked_prefill(q, k, v, mask), eager_attention(q, k, v, mask=mask)[0]
    assert torch.isfinite(got).all()
    for row, first in enumerate(start.tolist()):  # real query rows: identical; padded ones are never read
        torch.testing.assert_close(got[row, :, first:], want[row, :, first:], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_long_padded_prompts_equal_each_alone():
    cfg = kernel_sized(vocab_size=97, max_seq_len=128, attention="diff_v2")
    torch.manual_seed(8)
    model = Transformer(cfg).cuda().eval()
    prompts = [list(range(1, 41)), [5, 6, 7], list(range(10, 30))]
    together = generate_batch(model, prompts, 10, temperature=0)
    assert together == [generate_batch(model, [p], 10, temperature=0)[0] for p in prompts]


def test_masked_decode_matches_eager_with_padding_mask():
    torch.manual_seed(2)
    q = torch.randn(3, 8, 2, 16)
    k, v = torch.randn(3, 2, 11, 16), torch.randn(3, 2, 11, 16)
    keys = torch.arange(11)
    start = torch.tensor([0, 4, 7])
    mask = (keys <= torch.tensor([9, 10])[:, None]) & (keys >= start[:, None, None])  # (3, 2, 11)
    mask = mask[:, None]
    torch.testing.assert_close(masked_decode(q, k, v, mask), eager_attention(q, k, v, mask=mask)[0])


def test_cache_holds_only_kv_heads():
    base = ModelConfig.preset("tiny", attention="baseline", vocab_size=50)
    v2 = base.replace(attention="diff_v2")
    caches = [KVCache(c, 2, 32, dtype=torch.bfloat16, device=torch.device("cpu")) for c in (base, v2)]
    assert len(caches[0].keys) == base.n_layers
    assert caches[0].keys[0].shape == (2, base.n_kv_heads, 32, base.head_dim)
    assert caches[0].nbytes() == caches[1].nbytes()


def test_greedy_is_deterministic_and_sampling_reproducible():
    model = model_for("diff_v2", 2, seed=3)
    assert list(generate(model, [1, 2, 3], 12, temperature=0)) == list(generate(model, [1, 2, 3], 12, temperature=0))
    a = list(generate(model, [1, 2, 3], 12, temperature=1.0, seed=7))
    b = list(generate(model, [1, 2, 3], 12, temperature=1.0, seed=7))
    c = list(generate(model, [1, 2, 3], 12, temperature=1.0, seed=8))
    assert a == b and a != c


def test_eos_stops_each_row():
    model = model_for("diff_v2", 2, seed=4)
    free = list(generate(model, [1, 2, 3], 10, temperature=0))
    eos = free[3]
    stopped = list(generate(model, [1, 2, 3], 10, temperature=0, eos_id=eos))
    assert stopped == free[: free.index(eos) + 1]


def test_top_k_and_top_p_sampling_distributions():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(logits[0], -1)
    draws = sample_next(logits, top_k=3, generator=g)
    assert set(draws.tolist()) == {0, 1, 2}
    expected = probs[:3] / probs[:3].sum()
    freq = torch.bincount(draws, minlength=6)[:3].float() / len(draws)
    assert (freq - expected).abs().max() < 0.03  # ~4 standard errors at n=4000
    # top_p keeps the smallest prefix holding ≥ p of the mass: here tokens 0, 1 (0.43 + 0.26 ≥ 0.6)
    draws = sample_next(logits, top_p=0.6, generator=g)
    assert set(draws.tolist()) == {0, 1}
    expected = probs[:2] / probs[:2].sum()
    freq = torch.bincount(draws, minlength=6)[:2].float() / len(draws)
    assert (freq - expected).abs().max() < 0.03
    assert sample_next(logits[:2], temperature=0).tolist() == [0, 0]


def test_generate_cli_streams_from_a_checkpoint(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 400)
    args = [
        "train",
        "--data",
        str(text),
        "--tokenizer",
        "byte",
        "--out_dir",
        str(tmp_path / "run"),
        "--steps",
        "3",
        "--batch_size",
        "2",
        "--seq_len",
        "32",
        *TINY_MODEL,
        *QUIET_RUN,
    ]
    assert main(args) == 0
    capsys.readouterr()
    run = str(tmp_path / "run")

    def generate(*flags: str) -> int:
        return main(["generate", "--checkpoint", run, "--temperature", "0", *flags])

    assert generate("--prompt", "In the", "--max-new-tokens", "10") == 0
    out = capsys.readouterr().out
    assert out.startswith("In the") and len(out) > len("In the")
    assert generate("--prompt", "In the", "--max_new_tokens", "10") == 0
    assert capsys.readouterr().out == out  # the Python keyword's spelling works too, as for ``diffv2 train``
    flags = ("--prompt", "In the", "--prompt", "And", "--max-new-tokens", "6", "--no-stop", "--stats")
    assert generate(*flags) == 0
    assert re.search(
        r"first token after \d+ ms; 5 decode steps at [\d.]+ steps/s \([\d.]+ tokens/s over 2 prompts\)",
        capsys.readouterr().err,
    )
    greedy = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "In the", "--max-new-tokens", "10"]
    assert main([*greedy, "--temperature", "0", "--kv-cache-dtype", "int8"]) == 0  # an int8 KV cache
    int8 = capsys.readouterr().out
    assert int8.startswith("In the") and len(int8) > len("In the")
    with pytest.raises(SystemExit) as exit_:  # argparse refuses a value outside the choices, on one line
        main([*greedy, "--kv-cache-dtype", "int4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--kv-cache-dtype" in err and "int4" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err
    for flags, field in ((["--max-new-tokens", "100000"], "max_new_tokens"), (["--top-p", "1.5"], "top_p")):
        assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "In", *flags]) == 2
        err = capsys.readouterr().err
        assert field in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
