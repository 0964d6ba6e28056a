"""Decode speed of baseline vs DIFF V1 vs DIFF V2 at equal d_model, n_layers, h, n_kv_heads (bf16, CUDA).

    python bench/decode.py                       # ~1B shapes (preset 1b), batch {1,16,64} x context {1k,8k,32k}
    python bench/decode.py --batches 1 --contexts 1024 --preset small   # a quick look

Each point times one-token decode steps at a fixed context length: the KV cache is filled with random
values (a real prefill of 64 x 32k tokens would only cost time), the step is captured in a CUDA graph and
replayed. Three paths (``--paths``): ``static`` is what ``diffv2 generate`` runs on CUDA (the
``DecodeStep`` over the whole pre-allocated cache with per-row windows: the Triton split-KV kernel, DIFF V2's
pair subtraction in its epilogue, the input projections fused by ``diffv2.generate.fused_projections``);
``compiled`` is the same step under ``torch.compile`` (``diffv2 generate --compile``; one compilation per
shape, so only at the ``--compiled-points``); ``prefix`` is the model forward over exactly the filled prefix
with stock SDPA and unfused projections (no mask, so no padding support: the best stock SDPA can do).
Bytes per step = weights read (all but the embedding table) + the K/V cache read once; GB/s = bytes / step
time; the device's copy bandwidth is measured in the same run. A second table times the attention op alone at
the same shapes: SDPA (default choice, flash, cuDNN), the Triton kernel (with and without the pair epilogue)
and the compiled masked fallback ``masked_decode``, against reading K and V once.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os

import torch
import torch.nn.functional as F
from common import copy_bandwidth_gbs, cuda_time_ms, graph_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffv2 import ModelConfig, Transformer
from diffv2.generate import KVCache, fused_projections
from diffv2.generate.step import DecodeStep
from diffv2.kernels import decode_attention_triton, masked_decode


def kernels_per_step(fn) -> int:
    """GPU kernels one call of ``fn`` launches (torch.profiler, run eagerly): at batch 1 a step is bound by
    launches rather than bytes, so this count explains much of its time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def decode_step_ms(model: Transformer, batch: int, context: int, path: str, kv: str) -> tuple[float, int, int]:
    """Step time at ``context`` cached tokens (CUDA graph replay), the bytes it must read, and the kernels it
    launches. ``kv``: the cache format (``auto``: the model's dtype; ``int8``: int8 with fp32 scales)."""
    cfg = model.cfg
    cache = KVCache(cfg, batch, context, dtype=torch.bfloat16, device=torch.device("cuda"), kv_dtype=kv)
    for t in cache.keys + cache.values:
        t.normal_() if t.is_floating_point() else t.random_(-127, 128)
    for t in (cache.key_scales or []) + (cache.value_scales or []):
        t.uniform_(0.005, 0.02)
    tokens = torch.randint(0, cfg.vocab_size, (batch,), device="cuda")
    fused = fused_projections(model) if path in ("static", "compiled") else contextlib.nullcontext()
    with fused:  # as generate runs it: one matmul for q/k/v(/λ), one for gate/up per layer
        return _time_step(model, cache, tokens, batch, context, path)


def _time_step(model, cache, tokens, batch, context, path) -> tuple[float, int, int]:
    if path in ("static", "compiled"):
        start = torch.zeros(batch, dtype=torch.long, device="cuda")
        step = DecodeStep(model, cache, start, compile=path == "compiled")
        step(tokens, context - 1)  # sets the input buffers; the graph below replays step.forward on them
        fn = step.forward
    else:
        cache.advance(torch.tensor([context - 1], device="cuda"), context)  # rewrite the last slot every step
        positions = torch.full((batch, 1), context - 1, device="cuda")

        def fn():
            return model(tokens[:, None], positions=positions, caches=cache.layers)

    with torch.no_grad():
        ms = graph_ms([fn], reps=20)
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    kv = cache.nbytes()  # every cached K/V byte, read once
    return ms, weights + kv, kernels_per_step(fn)


def gemv_floor(model: Transformer, batch: int, copy_gbs: float, fused: bool) -> dict:
    """Every weight matrix of a step (all but the embedding) multiplied by ``batch`` rows, back to back in one
    CUDA graph, and nothing else: the time a decode step cannot beat with these GEMVs however few other kernels
    it launches. ``fused``: the matrices of ``fused_projections`` (generate's), else one per parameter."""
    weights = [p for n, p in model.named_parameters() if p.dim() == 2 and "tok_embeddings" not in n]
    if fused:
        groups = [
            [getattr(m, n) for n in m.input_projections if getattr(m, n, None) is not None]
            for m in model.modules()
            if hasattr(m, "input_projections")
        ]
        inside = {id(lin.weight) for group in groups for lin in group}
        weights = [w for w in weights if id(w) not in inside]
        weights += [torch.cat([lin.weight for lin in group]) for group in groups]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device="cuda", dtype=w.dtype) for w in weights}
    with torch.no_grad():
        ms = graph_ms([lambda w=w: F.linear(inputs[w.shape[1]], w) for w in weights], reps=20) * len(weights)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    return {
        "batch": batch,
        "fused": fused,
        "matrices": len(weights),
        "ms": ms,
        "gbs": nbytes / ms / 1e6,
        "pct_copy": nbytes / ms / 1e6 / copy_gbs,
    }


def attention_op_rows(cfg: ModelConfig, batch: int, context: int, copy_gbs: float) -> list[dict]:
    hq = 2 * cfg.n_heads
    q = torch.randn(batch, hq, 1, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, cfg.n_kv_heads, context, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.ones(1, 1, 1, context, dtype=torch.bool, device="cuda")
    compiled = torch.compile(masked_decode, dynamic=True)
    w = torch.rand(batch, cfg.n_heads, 1, device="cuda")
    lam = torch.randn(batch, cfg.n_heads, 1, device="cuda", dtype=torch.bfloat16)  # as lambda_proj gives it
    candidates = {
        "triton window": lambda: decode_attention_triton(q, k, v),
        "triton window +pair": lambda: decode_attention_triton(q, k, v, pair_weight=w),
        "triton window +pair σ(λ)": lambda: decode_attention_triton(q, k, v, pair_weight=lam, pair_sigmoid=True),
        "sdpa (default)": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "sdpa flash": lambda: _with(SDPBackend.FLASH_ATTENTION, q, k, v),
        "sdpa cudnn": lambda: _with(SDPBackend.CUDNN_ATTENTION, q, k, v),
        "masked_decode (compiled)": lambda: compiled(q, k, v, mask),
    }
    rows = []
    kv_bytes = 2 * k.numel() * k.element_size()
    for name, fn in candidates.items():
        try:
            ms = cuda_time_ms(fn)
            rows.append(
                dict(
                    batch=batch,
                    context=context,
                    kernel=name,
                    ms=ms,
                    gbs=kv_bytes / ms / 1e6,
                    pct_copy=kv_bytes / ms / 1e6 / copy_gbs,
                )
            )
        except RuntimeError as err:
            rows.append(dict(batch=batch, context=context, kernel=name, error=str(err).splitlines()[0][:80]))
    return rows


def print_int8_table(rows: list[dict], variants: list[str], paths: list[str]) -> None:
    """Tokens/s with the int8 cache against the bf16 cache at the same point, and the step's bytes ratio."""
    at = {(r["variant"], r["path"], r["batch"], r["context"], r["kv"]): r for r in rows if "ms" in r}
    print("\nint8 KV cache / bf16 KV cache (tokens/s ratio; bytes ratio of the step)")
    for (variant, path, batch, context, kv), r in at.items():
        base = at.get((variant, path, batch, context, "auto"))
        if kv == "int8" and base:
            ratio, nbytes = r["tok_s"] / base["tok_s"], r["gb"] / base["gb"]
            print(f"{variant:<9} {path:<8} B={batch:<3} ctx={context:<6} {ratio:.3f}  bytes {nbytes:.3f}")


def _with(backend, q, k, v):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1b")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--contexts", default="1024,8192,32768")
    p.add_argument("--variants", default="baseline,diff_v1,diff_v2")
    p.add_argument(
        "--paths",
        default="static,compiled,prefix",
        help="static (generate's CUDA path), compiled (the same, torch.compile'd), prefix (stock SDPA)",
    )
    p.add_argument("--compiled-points", default="1x1024,1x32768", help="BxCTX points of the compiled path")
    p.add_argument(
        "--kv-cache-dtypes",
        default="auto",
        help="cache formats to time, comma-separated: auto (bf16, the model's dtype), int8 (static/compiled paths)",
    )
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    copy_gbs = copy_bandwidth_gbs()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {copy_gbs:.0f} GB/s")
    paths, variants, kv_dtypes = args.paths.split(","), args.variants.split(","), args.kv_cache_dtypes.split(",")
    compiled_points = {tuple(int(x) for x in p.split("x")) for p in args.compiled_points.split(",")}
    torch._dynamo.config.cache_size_limit = 64  # one compiled step per variant and point
    rows, floors = [], {}
    for variant in variants:
        cfg = ModelConfig.preset(args.preset, attention=variant, vocab_size=args.vocab_size, max_seq_len=max(contexts))
        torch.manual_seed(0)
        model = Transformer(cfg).to("cuda", torch.bfloat16).eval()
        floors[variant] = [gemv_floor(model, batches[0], copy_gbs, fused) for fused in (False, True)]
        for kv, path, batch, context in itertools.product(kv_dtypes, paths, batches, contexts):
            point = dict(variant=variant, path=path, batch=batch, context=context, kv=kv)
            if (path == "compiled" and (batch, context) not in compiled_points) or (path == "prefix" and kv != "auto"):
                continue
            try:
                ms, nbytes, kernels = decode_step_ms(model, batch, context, path, kv)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append({**point, "error": "out of memory"})
                continue
            torch.cuda.empty_cache()
            gbs = nbytes / ms / 1e6
            rows.append(
                {
                    **point,
                    "ms": ms,
                    "tok_s": batch * 1e3 / ms,
                    "gb": nbytes / 1e9,
                    "gbs": gbs,
                    "pct_copy": gbs / copy_gbs,
                    "kernels": kernels,
                }
            )
            print(json.dumps(rows[-1]), flush=True)  # a run cut short still leaves its points
        del model
        torch.cuda.empty_cache()
    op_rows = []
    cfg = ModelConfig.preset(args.preset, vocab_size=args.vocab_size)
    for batch in batches:
        for context in contexts:
            op_rows += attention_op_rows(cfg, batch, context, copy_gbs)
    with open(os.path.join(args.out, "decode.json"), "w") as f:
        json.dump({"copy_gbs": copy_gbs, "model": rows, "gemv_floor": floors, "attention": op_rows}, f, indent=1)

    by = {(r["variant"], r["path"], r["batch"], r["context"]): r for r in rows if "ms" in r and r["kv"] == "auto"}
    if "int8" in kv_dtypes:
        print_int8_table(rows, variants, paths)
    for path in paths:
        print(f"\nmodel decode ({args.preset}, bf16, CUDA graph, {path} path)")
        print(
            f"{'B':>3} {'ctx':>6} | "
            + " | ".join(f"{v:>8} tok/s  GB/s  %copy" for v in variants)
            + " | V2/base  V2/V1  bytes V2/base"
        )
        for batch in batches:
            for context in contexts:
                got = {v: by.get((v, path, batch, context)) for v in variants}
                if not any(got.values()):
                    continue
                cells = [
                    f"{r['tok_s']:>14.0f} {r['gbs']:>5.0f} {r['pct_copy']:>6.1%}" if r else f"{'n/a':>27}"
                    for r in got.values()
                ]
                line = f"{batch:>3} {context:>6} | " + " | ".join(cells)
                v2, b, v1 = got.get("diff_v2"), got.get("baseline"), got.get("diff_v1")
                if v2 and b and v1:
                    ratios = (v2["tok_s"] / b["tok_s"], v2["tok_s"] / v1["tok_s"], v2["gb"] / b["gb"])
                    line += f" | {ratios[0]:>7.3f} {ratios[1]:>6.3f} {ratios[2]:>13.3f}"
                print(line)
    print(f"\nthe weights alone: every matrix times {batches[0]} row(s), back to back in one CUDA graph")
    for variant, pair in floors.items():
        for r in pair:
            kind = "fused  " if r["fused"] else "unfused"
            line = f"{r['matrices']:>3} GEMVs {r['ms']:.3f} ms  {r['gbs']:.0f} GB/s  {r['pct_copy']:.1%} of copy"
            print(f"{variant:<9} {kind} {line}")
    print("\nGPU kernels per decode step (batch 1, first context)")
    for path in paths:
        counts = {v: by.get((v, path, batches[0], contexts[0]), {}).get("kernels") for v in variants}
        print(f"{path:<9}" + "  ".join(f"{v} {c}" for v, c in counts.items() if c is not None))
    if "prefix" in paths:
        print("\nstatic or compiled path / prefix path tokens/s (>1: generate's path beats stock SDPA over the prefix)")
        for (variant, path, batch, context), r in by.items():
            other = by.get((variant, "prefix", batch, context))
            if path != "prefix" and other:
                print(f"{variant:<9} {path:<8} B={batch:<3} ctx={context:<6} {r['tok_s'] / other['tok_s']:.3f}")
    print("\nattention op alone (2h=query heads of DIFF V2 over h_kv heads, one query token)")
    print(f"{'B':>3} {'ctx':>6} {'kernel':<28} {'ms':>8} {'GB/s':>7} {'%copy':>7}")
    for r in op_rows:
        if "ms" in r:
            head = f"{r['batch']:>3} {r['context']:>6} {r['kernel']:<28}"
            print(f"{head} {r['ms']:>8.3f} {r['gbs']:>7.0f} {r['pct_copy']:>7.1%}")
        else:
            print(f"{r['batch']:>3} {r['context']:>6} {r['kernel']:<28} {r['error']}")


if __name__ == "__main__":
    main()
