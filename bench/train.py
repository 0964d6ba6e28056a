"""Training-step throughput of baseline vs DIFF V2 vs DIFF V1 at equal d_model, n_layers, h and h_kv.

    python bench/train.py                  # GPU: small, 350m and 1b shapes, seq 2048/4096, eager and compiled
    python bench/train.py --shapes small --seqs 1024 --modes eager      # a quick look
    python bench/train.py --variants baseline,diff_v2,diff_v2+triton    # +triton: the fused DIFF V2 kernel
    python bench/train.py --variants baseline_2h,diff_v2                # against 2h query heads (same query width)
    python bench/train.py --variants diff_v2,diff_v2_keep               # keep the pair difference (no recompute)
    python bench/train.py --device cpu --shapes tiny --seqs 128 --batch-tokens 2048 --steps 3   # CPU smoke test

One step = forward + backward + fused AdamW on random tokens (the data pipeline is not what is measured), in
bf16 autocast on CUDA. Reported per (shape, seq, mode, variant): tokens/s, MFU against the bf16 matmul peak
measured in the same run (an 8192³ GEMM) and against 989 TFLOP/s (H100/H200 dense bf16), peak memory, and the
share of GPU time in attention kernels, GEMMs and everything else (torch.profiler over two steps). FLOPs per
token come from ``Transformer.flops_per_token`` (2h query heads counted for DIFF V2, V1's second value pass).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
from common import cuda_time_ms

from diffv2 import ModelConfig, Transformer

SHAPES = {
    "tiny": dict(preset="tiny"),
    "small": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, ffn_hidden=1408),
    "350m": dict(preset="350m"),
    "1b": dict(preset="1b"),
}
ATTENTION_KERNELS = ("attention", "fmha", "flash", "cudnn", "sdpa", "softmax", "diff_attn")
GEMM_KERNELS = ("gemm", "xmma", "nvjet", "cutlass", "matmul", "mm_")


def model_config(shape: str, variant: str, seq: int, vocab: int) -> ModelConfig:
    """``variant``: an attention kind, optionally ``+triton`` (DIFF V2's fused Triton kernel instead of SDPA), or
    ``baseline_2h``: the baseline with 2h query heads, DIFF V2's query width (the blog's claim 11 compares the
    two: "same attention kernel speed", DIFF V2 with a smaller output projection), or ``diff_v2_keep``: DIFF
    V2 with ``recompute_pair_difference=False``."""
    spec = dict(SHAPES[shape])
    preset = spec.pop("preset", None)
    attention, _, backend = variant.partition("+")
    doubled, keep = attention == "baseline_2h", attention == "diff_v2_keep"
    attention = "baseline" if doubled else "diff_v2" if keep else attention
    fields = dict(attention=attention, backend=backend or "sdpa", vocab_size=vocab, max_seq_len=seq, **spec)
    cfg = ModelConfig.preset(preset, **fields) if preset else ModelConfig(**fields)
    return cfg.replace(n_heads=2 * cfg.n_heads) if doubled else cfg.replace(recompute_pair_difference=not keep)


def matmul_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: a @ b, iters=20)
    return 2 * 8192**3 / ms / 1e9


def kernel_split(step, device: torch.device) -> dict[str, float | str | list]:
    """Share of GPU kernel time in attention, GEMMs and the rest, over two profiled steps, the attention
    kernel that took the most time (which SDPA backend ran: cuDNN, flash, ...), and the eight costliest of the
    rest with their ms per step (where a variant's elementwise time goes)."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    totals = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    top_attention = (0.0, "")
    others = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us <= 0:
            continue
        name = event.key.lower()
        kind = (
            "attention"
            if any(k in name for k in ATTENTION_KERNELS)
            else "gemm"
            if any(k in name for k in GEMM_KERNELS)
            else "other"
        )
        totals[kind] += device_us
        if kind == "attention":
            top_attention = max(top_attention, (device_us, event.key[:60]))
        elif kind == "other":
            others.append((round(device_us / 2e3, 2), event.key[:80]))
    total = sum(totals.values()) or 1.0
    top_other = [[name, ms] for ms, name in sorted(others, reverse=True)[:8]]
    return {**{k: v / total for k, v in totals.items()}, "attention_kernel": top_attention[1], "top_other": top_other}


def measure(
    cfg: ModelConfig, seq: int, batch: int, compile: bool, steps: int, device: torch.device, micro_batches: int = 1
) -> dict:
    """One optimizer step over ``batch`` rows, in ``micro_batches`` forward/backward passes (gradient
    accumulation: the same tokens per step with less activation memory)."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    forward = torch.compile(model) if compile else model
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        for chunk in tokens.split(batch // micro_batches):
            with autocast:
                _, loss = forward(chunk[:, :-1], chunk[:, 1:])
            (loss / micro_batches).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # compile, autotune, allocator warm-up
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        ms = cuda_time_ms(step, iters=steps, warmup=0)
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        ms, peak_gb = statistics.median(times) * 1e3, None
    out = {
        "tokens_per_s": batch * seq / ms * 1e3,
        "ms": ms,
        "peak_gb": peak_gb,
        "flops_per_token": model.flops_per_token(seq),
        "params": model.num_params()["total"],
    }
    out["split"] = kernel_split(step, device)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="small,350m,1b")
    p.add_argument("--seqs", default="2048,4096")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--variants", default="baseline,diff_v2,diff_v2+triton,diff_v1")
    p.add_argument("--batch-tokens", type=int, default=65536, help="tokens per step (batch = this / seq)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="passes per step to start with; doubled while a point runs out of memory",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    device = torch.device(args.device)
    peak = matmul_peak_tflops(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, bf16 GEMM peak measured: {peak and round(peak)} TFLOP/s")
    rows = []
    for shape in args.shapes.split(","):
        for seq in map(int, args.seqs.split(",")):
            batch = max(1, args.batch_tokens // seq)
            for mode in args.modes.split(","):
                for variant in args.variants.split(","):
                    cfg = model_config(shape, variant, seq, args.vocab_size)
                    micro = min(args.micro_batches, batch)
                    while True:
                        try:
                            r = measure(cfg, seq, batch, mode == "compile", args.steps, device, micro)
                            break
                        except torch.OutOfMemoryError:
                            r = {"error": f"out of memory at {micro} micro-batches"}
                        gc.collect()
                        torch.cuda.empty_cache()
                        if micro * 2 > batch or batch % (micro * 2):
                            break
                        micro *= 2  # the same tokens per step in smaller passes
                    if device.type == "cuda":
                        gc.collect()
                        torch.cuda.empty_cache()  # the last model's memory, before the next is built
                    rows.append(
                        dict(shape=shape, seq=seq, batch=batch, micro_batches=micro, mode=mode, variant=variant, **r)
                    )
                    print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "train_bench.json"), "w") as f:
        json.dump({"device": name, "gemm_peak_tflops": peak, "rows": rows}, f, indent=1)

    print(
        f"\n{'shape':<6}{'seq':>6}{'mode':>8}{'variant':>15}{'micro':>6}{'tok/s':>11}{'vs base':>8}{'MFU meas':>9}"
        f"{'MFU 989':>8}{'peak GB':>8}{'mem/base':>9}{'attn%':>7}{'gemm%':>7}  attention kernel"
    )
    base = {(r["shape"], r["seq"], r["mode"]): r for r in rows if r["variant"] == "baseline" and "ms" in r}
    for r in rows:
        if "ms" not in r:
            print(f"{r['shape']:<6}{r['seq']:>6}{r['mode']:>8}{r['variant']:>15}  {r['error']}")
            continue
        b = base.get((r["shape"], r["seq"], r["mode"]))
        flops = r["tokens_per_s"] * r["flops_per_token"]
        mfu_meas = f"{flops / (peak * 1e12):.1%}" if peak else "-"
        mem = f"{r['peak_gb']:.1f}" if r["peak_gb"] else "-"
        same_passes = b and b["micro_batches"] == r["micro_batches"]  # else peak memory is not comparable
        mem_ratio = f"{r['peak_gb'] / b['peak_gb']:.3f}" if same_passes and r["peak_gb"] else "-"
        split = r["split"] or {}
        print(
            f"{r['shape']:<6}{r['seq']:>6}{r['mode']:>8}{r['variant']:>15}{r['micro_batches']:>6}{r['tokens_per_s']:>11.0f}"
            f"{r['tokens_per_s'] / b['tokens_per_s'] if b else float('nan'):>8.3f}{mfu_meas:>9}"
            f"{flops / 989e12:>8.1%}{mem:>8}{mem_ratio:>9}{split.get('attention', 0):>7.0%}"
            f"{split.get('gemm', 0):>7.0%}  {split.get('attention_kernel', '')[:40]}"
        )
    wide = {(r["shape"], r["seq"], r["mode"]): r for r in rows if r["variant"] == "baseline_2h" and "ms" in r}
    for r in rows:
        w = wide.get((r["shape"], r["seq"], r["mode"]))
        if w and r["variant"].startswith("diff_v2") and "ms" in r:
            print(
                f"{r['variant']} / baseline_2h ({r['shape']}, {r['seq']}, {r['mode']}): tokens/s "
                f"{r['tokens_per_s'] / w['tokens_per_s']:.3f}, params {r['params'] / w['params']:.3f}"
            )


if __name__ == "__main__":
    main()
