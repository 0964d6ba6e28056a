"""The fused DIFF V2 training kernel against SDPA + a separate pair subtraction (bf16, CUDA).

    python bench/diff_attn_kernel.py            # B·T = 16k tokens, T {1k, 2k, 4k}, d {64, 128}, 2h/h_kv 32/8, 16/4
    python bench/diff_attn_kernel.py --sweep    # also time alternative tile configs of each kernel (to tune CONFIGS)

Paths, each forward and forward+backward (gradients of q, k, v and w):
- ``fused``: :func:`diffv2.kernels.diff_attn_triton.diff_attention` (both heads of a pair in one program);
- ``sdpa``: what ``DiffV2Attention`` runs today: SDPA over the 2h query heads (``enable_gqa``, ``is_causal``,
  the fused backends in the model's order, cuDNN first), then ``PairSubtract`` (o1 − w·o2 in fp32);
- ``sdpa flash``: the same with SDPA's flash backend forced.
Inputs are laid out as the model makes them (q/k/v views of (B, T, H, d) projections). TFLOP/s counts causal
attention over 2h heads: 2·B·2h·T²·d forward (two products, half the square), 2.5× that backward, for every
path alike. ``speedup`` = sdpa ms / fused ms. JSON goes to $OUT/diff_attn_kernel.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import cuda_time_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffv2.attention.diff_v2_ops import PairSubtract
from diffv2.kernels import diff_attn_triton as dat
from diffv2.kernels import fused_sdpa_backends

SHAPES = [(32, 8), (16, 4)]  # (2h, h_kv)
DEVICE = "cuda"
# tile configs (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by --sweep; none spills registers on sm_90 with
# Triton 3.6 (checked by compiling offline), the defaults in dat.CONFIGS are tried as well
SWEEP = {
    64: {
        "fwd": [(64, 64, 8, 3), (128, 32, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3)],
        "dkdv": [(32, 64, 8, 3), (32, 64, 4, 3), (64, 64, 8, 2), (32, 128, 8, 2)],
        "dq": [(128, 32, 8, 3), (64, 64, 8, 3), (64, 128, 8, 3), (64, 32, 4, 3)],
    },
    128: {
        "fwd": [(64, 32, 8, 3), (128, 32, 8, 2), (32, 64, 8, 3), (32, 128, 8, 3)],
        "dkdv": [(32, 128, 8, 3), (32, 64, 8, 3), (64, 32, 8, 2), (32, 32, 8, 3)],
        "dq": [(64, 32, 8, 3), (128, 32, 8, 3), (32, 64, 8, 3), (32, 128, 8, 2)],
    },
}


def sdpa_path(backends: list[SDPBackend]) -> Callable:
    def fn(q, k, v, w):
        with sdpa_kernel(backends, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return PairSubtract.apply(out[:, 0::2], out[:, 1::2], w[..., None])

    return fn


def make_inputs(b: int, t: int, hq: int, hkv: int, d: int) -> list[torch.Tensor]:
    opts = dict(device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(b, t, hq, d, **opts)
    k, v = torch.randn(b, t, hkv, d, **opts), torch.randn(b, t, hkv, d, **opts)
    lam = torch.randn(b, t, hq // 2, device=DEVICE, requires_grad=True)
    return [q, k, v, lam]


def views(leaves):
    q, k, v, lam = leaves
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), torch.sigmoid(lam).transpose(1, 2)


def time_path(fn: Callable, leaves: list[torch.Tensor], dout: torch.Tensor) -> dict[str, float]:
    def fwd():
        with torch.no_grad():
            return fn(*views(leaves))

    def fwd_bwd():
        return torch.autograd.grad(fn(*views(leaves)), leaves, dout)

    fwd_ms = cuda_time_ms(fwd)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd_ms = cuda_time_ms(fwd_bwd)
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "peak_mb": peak_mb}


def bench_point(tokens: int, t: int, hq: int, hkv: int, d: int) -> list[dict]:
    b = max(1, tokens // t)
    leaves = make_inputs(b, t, hq, hkv, d)
    dout = torch.randn(b, hq // 2, t, d, device=DEVICE, dtype=torch.bfloat16)
    if not dat.diff_attention_supported(*views(leaves)[:3]):
        raise SystemExit("diff_attention_supported() is False for these inputs: is triton installed?")
    flops_fwd = 2 * b * hq * t * t * d
    point = dict(batch=b, seq=t, n_q_heads=hq, n_kv_heads=hkv, head_dim=d)
    paths = {
        "fused": dat.diff_attention,
        "sdpa": sdpa_path(fused_sdpa_backends()),
        "sdpa flash": sdpa_path([SDPBackend.FLASH_ATTENTION]),
    }
    with torch.no_grad():
        ref = paths["sdpa"](*views(leaves)).float()
    rows = []
    for name, fn in paths.items():
        try:
            with torch.no_grad():
                err = (fn(*views(leaves)).float() - ref).abs().max().item()
            r = time_path(fn, leaves, dout)
        except RuntimeError as e:  # e.g. a backend that rejects the shape
            rows.append(dict(point, path=name, error=str(e).splitlines()[0][:120]))
            continue
        r["fwd_tflops"] = flops_fwd / r["fwd_ms"] / 1e9
        r["fwd_bwd_tflops"] = 3.5 * flops_fwd / r["fwd_bwd_ms"] / 1e9
        rows.append(dict(point, path=name, max_diff_vs_sdpa=err, **r))
    return rows


def sweep_point(tokens: int, t: int, hq: int, hkv: int, d: int) -> list[dict]:
    """Each kernel's alternatives with the other two at their defaults: fwd timed alone, dkdv/dq via fwd+bwd."""
    b = max(1, tokens // t)
    leaves = make_inputs(b, t, hq, hkv, d)
    dout = torch.randn(b, hq // 2, t, d, device=DEVICE, dtype=torch.bfloat16)
    default = dict(dat.CONFIGS[d])
    rows = []
    for kind, candidates in SWEEP[d].items():
        for cfg in [default[kind], *[c for c in candidates if c != default[kind]]]:
            dat.CONFIGS[d] = dict(default, **{kind: cfg})
            try:
                r = time_path(dat.diff_attention, leaves, dout)
                ms = r["fwd_ms"] if kind == "fwd" else r["fwd_bwd_ms"]
            except Exception as e:  # e.g. out of shared memory for this tile
                ms, r = float("nan"), {"error": str(e).splitlines()[0][:120]}
            rows.append(
                dict(
                    seq=t,
                    n_q_heads=hq,
                    n_kv_heads=hkv,
                    head_dim=d,
                    kernel=kind,
                    config=cfg,
                    ms=ms,
                    default=cfg == default[kind],
                    **r,
                )
            )
    dat.CONFIGS[d] = default
    return rows


def _cell(r: dict, phase: str) -> str:
    return f"{r[phase + '_ms']:>11.3f} ({r[phase + '_tflops']:>5.0f})" if "error" not in r else f"{'—':>19}"


def print_table(rows: list[dict]) -> None:
    print("\nms (TFLOP/s); bf16, causal, B·T tokens fixed; speedup = sdpa ms / fused ms")
    names = ["fused", "sdpa", "sdpa flash"]
    head = f"{'2h/kv':>6} {'d':>4} {'T':>5} {'B':>3} |"
    for phase in ("fwd", "fwd+bwd"):
        head += "".join(f" {phase + ' ' + n:>19} |" for n in names) + f" {'speedup':>7} |"
    print(head + " peak MB fused/sdpa | max |fused − sdpa|")
    by = {(r["n_q_heads"], r["head_dim"], r["seq"], r["path"]): r for r in rows}
    for hq, d, t in sorted({(r["n_q_heads"], r["head_dim"], r["seq"]) for r in rows}):
        fused, sdpa = by[(hq, d, t, "fused")], by[(hq, d, t, "sdpa")]
        ok = "error" not in fused and "error" not in sdpa
        line = f"{hq:>3}/{fused['n_kv_heads']:<2} {d:>4} {t:>5} {fused['batch']:>3} |"
        for phase in ("fwd", "fwd_bwd"):
            line += "".join(f" {_cell(by[(hq, d, t, n)], phase)} |" for n in names)
            line += f" {sdpa[phase + '_ms'] / fused[phase + '_ms']:>7.2f} |" if ok else f" {'—':>7} |"
        if ok:
            line += f" {fused['peak_mb']:>8.0f}/{sdpa['peak_mb']:<8.0f} | {fused['max_diff_vs_sdpa']:.2e}"
        print(line)
    for r in rows:
        if "error" in r:
            print(f"error: {r['path']} 2h={r['n_q_heads']} d={r['head_dim']} T={r['seq']}: {r['error']}")


def print_sweep(rows: list[dict]) -> None:
    print("\ntile sweep: ms per config (fwd: forward alone; dkdv/dq: forward+backward), * = current default")
    for key in sorted({(r["head_dim"], r["n_q_heads"], r["seq"], r["kernel"]) for r in rows}):
        mine = [r for r in rows if (r["head_dim"], r["n_q_heads"], r["seq"], r["kernel"]) == key]
        cells = " ".join(f"{r['config']}{'*' if r['default'] else ''}:{r['ms']:.3f}" for r in mine)
        print(f"d={key[0]} 2h={key[1]} T={key[2]} {key[3]:<4} | {cells}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384, help="B·T per point")
    p.add_argument("--seqs", default="1024,2048,4096")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--sweep", action="store_true", help="also time alternative tile configs of each kernel")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/diff_attn_kernel.py needs a CUDA device (the Triton kernel and SDPA's fused kernels)")
    if not dat.HAS_TRITON:
        raise SystemExit("bench/diff_attn_kernel.py needs triton installed")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows, sweep_rows = [], []
    for d in map(int, args.head_dims.split(",")):
        for hq, hkv in SHAPES:
            for t in map(int, args.seqs.split(",")):
                rows += bench_point(args.tokens, t, hq, hkv, d)
                done = [r for r in rows[-3:] if "fwd_ms" in r]
                last = ", ".join(f"{r['path']} {r['fwd_ms']:.3f}/{r['fwd_bwd_ms']:.3f} ms" for r in done)
                print(f"2h={hq} h_kv={hkv} d={d} T={t} (fwd/fwd+bwd): {last}", flush=True)
                if args.sweep:
                    sweep_rows += sweep_point(args.tokens, t, hq, hkv, d)
                torch.cuda.empty_cache()
    print_table(rows)
    if sweep_rows:
        print_sweep(sweep_rows)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "diff_attn_kernel.json"), "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "configs": dat.CONFIGS,
                    "rows": rows,
                    "sweep": sweep_rows,
                },
                f,
                indent=1,
                default=str,
            )


if __name__ == "__main__":
    main()
