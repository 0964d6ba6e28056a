"""One conformance matrix: every row of the attention dispatch table (``diffv2.attention.ROUTES``), for every
variant and ablation it serves, against the independent float64 reference (``tests/reference.py``): a training
forward and backward, and a cached decode (left-padded prompts, then one-token steps over the cache's window).

Where each cell runs: the PyTorch rows in float64 on the CPU; the Triton rows in fp32 in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, as CI runs this file a second time) and, with the PyTorch rows, in fp32 and bf16 on a GPU.
Each cell asserts that the row it names actually ran. The int8 rows read an int8 KV cache: their cells compare
the decode with the same run through the rows they fall back to, which read the same cache dequantised (the
definition); how far an int8 cache moves the logits from a full-precision one is ``tests/test_kv_int8.py``'s.
"""

from __future__ import annotations

import os

import pytest
import torch

from diffv2 import Transformer
from diffv2.attention import ROUTES, forced_routes, traced_routes
from diffv2.generate import KVCache
from diffv2.generate.step import DecodeStep

from . import reference
from .models import VARIANTS, randomize, tiny

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()

# path -> (the row under test, the rows it may use besides, backend, where it runs: "cpu" PyTorch / "triton")
PATHS = {
    "sdpa": ("sdpa", (), "sdpa", "cpu"),
    "eager": ("eager", (), "eager", "cpu"),
    "diff_v2_recompute": ("diff_v2_recompute", ("sdpa",), "sdpa", "cpu"),
    "diff_v2_keep": ("diff_v2_keep", ("sdpa",), "sdpa", "cpu"),
    "masked_cuda": ("masked_cuda", ("sdpa",), "sdpa", "triton"),
    "split_kv_decode": ("split_kv_decode", ("masked_cuda", "sdpa"), "sdpa", "triton"),
    "diff_v2_decode_kernel": ("diff_v2_decode_kernel", ("split_kv_decode", "masked_cuda", "sdpa"), "sdpa", "triton"),
    "diff_v2_fused_kernel": ("diff_v2_fused_kernel", ("sdpa",), "triton", "triton"),
    "split_kv_decode_int8": ("split_kv_decode_int8", ("masked_cuda", "sdpa"), "sdpa", "triton"),
    "diff_v2_decode_int8": ("diff_v2_decode_int8", ("split_kv_decode_int8", "masked_cuda", "sdpa"), "sdpa", "triton"),
}
INT8 = ("split_kv_decode_int8", "diff_v2_decode_int8")  # read an int8 cache, against the dequantising rows
DECODE_ONLY = ("masked_cuda", "split_kv_decode", "diff_v2_decode_kernel", *INT8)  # a training forward never takes
TRAIN_ONLY = ("diff_v2_fused_kernel",)  # causal over the whole sequence: a padded prefill never takes it
# of the largest reference value; gradients pass through more rounding (fp32 kernels use TF32-free fp32 products)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 3e-4, torch.bfloat16: 6e-2}
GRAD_TOLERANCE = {torch.float64: 1e-8, torch.float32: 2e-3, torch.bfloat16: 2e-1}


def test_every_route_is_in_the_matrix():
    assert {r.name for r in ROUTES} == {row for row, *_ in PATHS.values()}


def _applies(path: str, kw: dict) -> bool:
    row = PATHS[path][0]
    if row.startswith("diff_v2"):
        return kw["attention"] == "diff_v2" and (
            row in ("diff_v2_recompute", "diff_v2_keep") or kw.get("pairing", "interleaved") == "interleaved"
        )
    return True


def _cells(phase: str) -> list:
    cells = []
    for path, (row, _, _, where) in PATHS.items():
        if row in (DECODE_ONLY if phase == "train" else TRAIN_ONLY):
            continue
        if where == "cpu":
            devices = [("cpu", torch.float64)] + ([("cuda", torch.float32), ("cuda", torch.bfloat16)] if CUDA else [])
        else:
            devices = ([("cpu", torch.float32)] if INTERPRET else []) + (
                [("cuda", torch.float32), ("cuda", torch.bfloat16)] if CUDA else []
            )
        if not devices:
            devices = [("none", torch.float32)]  # reported as skipped: Triton cannot run here
        for name, kw in VARIANTS.items():
            if _applies(path, kw):
                for device, dtype in devices:
                    dt = str(dtype).removeprefix("torch.")
                    cells.append(pytest.param(path, kw, device, dtype, id=f"{path}-{name}-{device}-{dt}"))
    return cells


def _model(kw: dict, backend: str, device: str, dtype: torch.dtype) -> Transformer:
    if device == "none":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    cfg = tiny(backend=backend, max_seq_len=64, **kw)
    return randomize(Transformer(cfg), seed=1).to(device=device, dtype=dtype)


def _close(got: torch.Tensor, want: torch.Tensor, tolerance: float, what: str) -> None:
    scale = want.abs().max().item()
    err = (got.double().cpu() - want.double()).abs().max().item()
    assert err <= tolerance * max(scale, 1e-4), f"{what}: max error {err:.3g} vs max |reference| {scale:.3g}"


@pytest.fixture
def maybe_interpreter(request):
    if INTERPRET:
        request.getfixturevalue("interpreter")


@pytest.mark.parametrize(("path", "kw", "device", "dtype"), _cells("train"))
def test_training_forward_and_backward_match_the_reference(path, kw, device, dtype, maybe_interpreter):
    row, others, backend, _ = PATHS[path]
    model = _model(kw, backend, device, dtype)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    probe = torch.randn(2, 20, model.cfg.vocab_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with forced_routes(row, *others), traced_routes() as taken:
        logits = model(tokens.to(device))
    assert row in taken, f"{row} did not run (ran: {sorted(set(taken))})"
    weights = reference.weights(model)
    expected = reference.forward(model, tokens, weights)
    _close(logits, expected, TOLERANCE[dtype], "logits")
    (logits.double().cpu() * probe).sum().backward()
    (expected * probe).sum().backward()
    for name, param in model.named_parameters():
        _close(param.grad, weights[name].grad, GRAD_TOLERANCE[dtype], f"grad of {name}")


@pytest.mark.parametrize(("path", "kw", "device", "dtype"), _cells("decode"))
@torch.no_grad()
def test_cached_decode_matches_the_reference(path, kw, device, dtype, maybe_interpreter):
    """Left-padded prompts of 20 and 13 tokens (the prefill is a masked call), then four one-token steps over the
    cache's whole buffer with a per-row window (decode calls), each step's logits against the full sequence's."""
    row, others, backend, _ = PATHS[path]
    model = _model(kw, backend, device, dtype)
    got, taken = _decode(model, (row, *others), device, dtype, "int8" if row in INT8 else "auto")
    assert row in taken, f"{row} did not run (ran: {sorted(set(taken))})"
    if row in INT8:  # the definition: the same int8 cache read dequantised, through the rows this one falls to
        want, _ = _decode(model, tuple(r for r in others if r not in INT8), device, dtype, "int8")
        for b in range(2):
            _close(torch.stack(got[b]), torch.stack(want[b]).double().cpu(), TOLERANCE[dtype], f"row {b} logits")
        return
    expected = expected_logits(model)
    for b, n in enumerate(LENGTHS):
        _close(torch.stack(got[b]), expected[b][n - 1 : n + STEPS - 1], TOLERANCE[dtype], f"row {b} logits")


# the rows a prompt fed in chunks takes (prefix mode: no mask object, T < S); chunks of at most and of more than
# the decode kernels' query tile, so that both of masked_cuda's branches run
CHUNKED = ("sdpa", "eager", "diff_v2_recompute", "diff_v2_keep", "masked_cuda")
CHUNKS = (7, 16, 17)


@pytest.mark.parametrize(("path", "kw", "device", "dtype"), [c for c in _cells("decode") if c.values[0] in CHUNKED])
@torch.no_grad()
def test_a_prompt_fed_in_chunks_matches_the_reference(path, kw, device, dtype, maybe_interpreter):
    """The server's prefill: one row of a prefix-mode cache, a prompt fed in chunks after the slots already
    written, each chunk causal over itself and seeing every earlier slot."""
    row, others, backend, _ = PATHS[path]
    model = _model(kw, backend, device, dtype)
    tokens = torch.randint(0, model.cfg.vocab_size, (sum(CHUNKS),), generator=torch.Generator().manual_seed(5))
    cache = KVCache(model.cfg, 1, sum(CHUNKS) + 1, dtype=dtype, device=torch.device(device))
    got, begin = [], 0
    with forced_routes(row, *others), traced_routes() as taken:
        for n in CHUNKS:
            slots = torch.arange(begin, begin + n, device=device)
            cache.advance(slots, begin + n)
            got.append(model(tokens[begin : begin + n].to(device)[None], positions=slots[None], caches=cache.layers)[0])
            begin += n
    assert row in taken, f"{row} did not run (ran: {sorted(set(taken))})"
    if dtype == torch.bfloat16:
        # bf16 rounding alone moves the v2_linear ablation's logits (an unbounded pair weight amplifies it) by
        # more than the tolerance on every row, the one-call forward's included: in bf16 the chunks must give
        # what one forward of the prompt gives; the fp32 and fp64 cells hold both to the reference
        with forced_routes(row, *others):
            want = model(tokens.to(device)[None])[0].double().cpu()
    else:
        want = reference.forward(model, tokens[None])[0]
    _close(torch.cat(got), want, TOLERANCE[dtype], "logits")


LENGTHS, STEPS = (20, 13), 4


def expected_logits(model: Transformer) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, model.cfg.vocab_size, (n + STEPS,), generator=g) for n in LENGTHS]
    return [reference.forward(model, r[None])[0] for r in rows]  # (n + steps, V)


def _decode(model: Transformer, routes: tuple[str, ...], device: str, dtype: torch.dtype, kv_dtype: str):
    """Each row's logits at its last prompt token and the decode steps after it, and the rows taken."""
    g = torch.Generator().manual_seed(4)
    lengths, steps = LENGTHS, STEPS
    rows = [torch.randint(0, model.cfg.vocab_size, (n + steps,), generator=g) for n in lengths]
    width = max(lengths)
    start = torch.tensor([width - n for n in lengths], device=device)
    padded = [torch.cat((torch.zeros(width - n, dtype=torch.long), r[:n])) for n, r in zip(lengths, rows, strict=True)]
    prompts = torch.stack(padded)
    cache = KVCache(model.cfg, 2, width + steps, dtype=dtype, device=torch.device(device), kv_dtype=kv_dtype)
    with forced_routes(*routes), traced_routes() as taken:
        slots = torch.arange(width, device=device)
        cache.advance(slots, width)
        positions = (slots[None, :] - start[:, None]).clamp(min=0)
        logits = model(prompts.to(device), positions=positions, mask=cache.window(start), caches=cache.layers)
        got = [[logits[b, -1]] for b in range(2)]
        step = DecodeStep(model, cache, start)
        for i in range(steps - 1):
            nxt = torch.stack([r[n + i] for n, r in zip(lengths, rows, strict=True)]).to(device)
            out = step(nxt, width + i)
            for b in range(2):
                got[b].append(out[b])
    return got, taken
