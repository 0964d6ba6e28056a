"""The decode attention op alone: our split-KV Triton kernel against SDPA's cuDNN and flash kernels (bf16, CUDA).

    python bench/decode_kernel.py              # B {1,16,64} x S {1k,8k,32k}; h=16, h_kv=4, d=128
    python bench/decode_kernel.py --sweep      # also every num_splits in 1..128 for ours (to tune the heuristic)

One query token per row. DIFF V2 runs Hq = 2h = 32 query heads, the baseline Hq = h = 16, both over h_kv = 4
KV heads. Kernels:
- ``sdpa cudnn`` / ``sdpa flash``: ``enable_gqa``, no mask, a cache of exactly S slots (their best case);
- ``ours``: the same exact-length cache, window [0, S);
- ``ours static``: a static cache of 2·S slots of which the first S are valid (kv_end < max_len: what a
  CUDA-graph decode loop sees; SDPA needs a mask there and has no fused GQA kernel for it);
- ``ours int8``: the exact-length cache quantised to int8 with a scale per vector (``kv_cache_dtype="int8"``);
  its GB/s counts the bf16 cache's bytes, so it reads as the bf16 bandwidth it would take to match it;
- DIFF V2 only: ``ours +pair`` (the fused o_2i − w·o_2i+1 epilogue, h heads out) and ``cudnn +pair`` (cuDNN
  then the same subtraction in PyTorch, fp32).
Each call is timed inside a CUDA graph (no launch overhead: a decode loop replays graphs) over enough copies of
the cache to exceed the L2 cache, so the K/V bytes come from HBM as in a real decode step. GB/s = valid K+V
bytes (B·h_kv·S·d·2 bytes·2) / time; %copy = that over the device-to-device copy bandwidth (read + write)
measured in the same run. JSON goes to $OUT/decode_kernel.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import copy_bandwidth_gbs, cuda_time_ms, graph_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffv2.kernels import QuantizedKV, quantize_int8
from diffv2.kernels.decode_triton import choose_num_splits, decode_attention_triton

L2_BYTES = 256 << 20  # well above the H200's L2 (~50 MB): rotate cache copies until this much is touched
SPLIT_SWEEP = [1, 2, 4, 8, 16, 32, 64, 128]


def _sdpa(backend: SDPBackend, q, k, v) -> torch.Tensor:
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _cudnn_pair(q, k, v, w) -> torch.Tensor:
    out = _sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v)
    return (out[:, 0::2].float() - w[..., None] * out[:, 1::2].float()).to(out.dtype)


def candidates(q, w, exact, static, int8, start, end, sweep: bool) -> dict[str, Callable[[int], torch.Tensor]]:
    """name -> fn(copy index) for one variant; ``exact``/``static``: lists of (k, v) cache copies."""
    fns: dict[str, Callable[[int], torch.Tensor]] = {
        "sdpa cudnn": lambda i: _sdpa(SDPBackend.CUDNN_ATTENTION, q, *exact[i]),
        "sdpa flash": lambda i: _sdpa(SDPBackend.FLASH_ATTENTION, q, *exact[i]),
        "ours": lambda i: decode_attention_triton(q, *exact[i], start, end),
        "ours static": lambda i: decode_attention_triton(q, *static[i], start, end),
        "ours int8": lambda i: decode_attention_triton(q, *int8[i], start, end),
    }
    if w is not None:
        fns["ours +pair"] = lambda i: decode_attention_triton(q, *exact[i], start, end, pair_weight=w)
        fns["cudnn +pair"] = lambda i: _cudnn_pair(q, *exact[i], w)
    for ns in SPLIT_SWEEP if sweep else []:
        fns[f"ours splits={ns}"] = lambda i, ns=ns: decode_attention_triton(q, *exact[i], start, end, num_splits=ns)
    return fns


def bench_point(batch: int, context: int, args, copy_gbs: float) -> list[dict]:
    d, hkv = args.head_dim, args.n_kv_heads
    kv_bytes = 2 * batch * hkv * context * d * 2  # the valid K and V, bf16
    copies = max(1, min(64, -(-L2_BYTES // kv_bytes)))
    opts = dict(device="cuda", dtype=torch.bfloat16)
    exact = [
        (torch.randn(batch, hkv, context, d, **opts), torch.randn(batch, hkv, context, d, **opts))
        for _ in range(copies)
    ]
    # static cache: 2·S slots, written up to S (the rest is never read)
    static = [
        (torch.randn(batch, hkv, 2 * context, d, **opts), torch.randn(batch, hkv, 2 * context, d, **opts))
        for _ in range(copies)
    ]
    int8 = [tuple(QuantizedKV(*quantize_int8(x), torch.bfloat16) for x in kv) for kv in exact]
    start = torch.zeros(batch, dtype=torch.int32, device="cuda")
    end = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    rows = []
    for variant, hq in (("diff_v2", 2 * args.n_heads), ("baseline", args.n_heads)):
        q = torch.randn(batch, hq, 1, d, **opts)
        w = torch.rand(batch, hq // 2, 1, device="cuda") if variant == "diff_v2" else None
        point = dict(
            variant=variant,
            batch=batch,
            context=context,
            copies=copies,
            auto_splits=choose_num_splits(batch, hkv, context, q.device),
        )
        fns = candidates(q, w, exact, static, int8, start, end, args.sweep)
        for name, fn in fns.items():
            try:
                calls = [lambda i=i, fn=fn: fn(i) for i in range(copies)]
                ms = graph_ms(calls)
                if name in ("ours", "sdpa cudnn"):
                    point_eager = dict(
                        point,
                        kernel=f"{name} (no graph)",
                        ms=cuda_time_ms(lambda calls=calls: [fn() for fn in calls], iters=5) / len(calls),
                    )
                    rows.append(dict(point_eager, gbs=kv_bytes / point_eager["ms"] / 1e6))
            except RuntimeError as err:  # e.g. a backend that rejects the shape
                rows.append(dict(point, kernel=name, error=str(err).splitlines()[0][:100]))
                torch.cuda.synchronize()
                continue
            gbs = kv_bytes / ms / 1e6
            rows.append(dict(point, kernel=name, ms=ms, gbs=gbs, pct_copy=gbs / copy_gbs))
    return rows


def print_table(rows: list[dict]) -> None:
    names = ["sdpa cudnn", "sdpa flash", "ours", "ours static", "ours int8", "ours +pair", "cudnn +pair"]
    by = {(r["variant"], r["batch"], r["context"], r["kernel"]): r for r in rows}
    points = sorted({(r["variant"], r["batch"], r["context"], r["auto_splits"]) for r in rows})
    print("\nGB/s of K+V read (% of copy bandwidth); one query token, bf16, CUDA graph")
    print(
        f"{'variant':<9} {'B':>3} {'S':>6} {'split':>5} | "
        + " | ".join(f"{n:>15}" for n in names)
        + " | cudnn ms / ours ms"
    )
    for variant, batch, context, splits in points:
        cells = []
        for n in names:
            r = by.get((variant, batch, context, n))
            cells.append(f"{r['gbs']:>6.0f} ({r['pct_copy']:>5.1%})" if r and "ms" in r else f"{'—':>15}")
        ours, cudnn = by.get((variant, batch, context, "ours")), by.get((variant, batch, context, "sdpa cudnn"))
        ratio = f"{cudnn['ms'] / ours['ms']:>10.2f}" if ours and cudnn and "ms" in ours and "ms" in cudnn else "—"
        print(f"{variant:<9} {batch:>3} {context:>6} {splits:>5} | " + " | ".join(cells) + f" | {ratio}")
    sweep = [r for r in rows if r["kernel"].startswith("ours splits=") and "ms" in r]
    if sweep:
        print("\nnum_splits sweep (ours, exact cache): best vs the heuristic")
        for variant, batch, context, splits in points:
            mine = [r for r in sweep if (r["variant"], r["batch"], r["context"]) == (variant, batch, context)]
            if mine:
                best = min(mine, key=lambda r: r["ms"])
                auto = by.get((variant, batch, context, "ours"))
                line = " ".join(f"{r['kernel'].split('=')[1]}:{r['gbs']:.0f}" for r in mine)
                print(
                    f"{variant:<9} {batch:>3} {context:>6} auto={splits} ({auto['gbs']:.0f} GB/s) "
                    f"best={best['kernel'].split('=')[1]} ({best['gbs']:.0f}) | {line}"
                )
    print("\nwithout CUDA graphs (eager decode loop), µs per call: launch overhead shows at small B·S")
    for variant, batch, context, _ in points:
        cells = [by.get((variant, batch, context, f"{n} (no graph)")) for n in ("ours", "sdpa cudnn")]
        if all(c and "ms" in c for c in cells):
            print(
                f"{variant:<9} {batch:>3} {context:>6} | ours {cells[0]['ms'] * 1e3:>8.1f} | "
                f"sdpa cudnn {cells[1]['ms'] * 1e3:>8.1f}"
            )
    for r in rows:
        if "error" in r:
            print(f"error: {r['variant']} B={r['batch']} S={r['context']} {r['kernel']}: {r['error']}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--contexts", default="1024,8192,32768")
    p.add_argument("--n-heads", type=int, default=16)
    p.add_argument("--n-kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sweep", action="store_true", help="also time ours at every num_splits in 1..128")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/decode_kernel.py needs a CUDA device")
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {copy_gbs:.0f} GB/s")
    rows = []
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            rows += bench_point(batch, context, args, copy_gbs)
            torch.cuda.empty_cache()  # the cache copies of this point are gone; give their memory back
            last = [r for r in rows if r["batch"] == batch and r["context"] == context and "ms" in r]
            print(
                f"B={batch} S={context}: "
                + ", ".join(
                    f"{r['variant']}/{r['kernel']} {r['gbs']:.0f}" for r in last if "splits=" not in r["kernel"]
                ),
                flush=True,
            )
    print_table(rows)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "decode_kernel.json"), "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "copy_gbs": copy_gbs,
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
