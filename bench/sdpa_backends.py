"""Which fused SDPA kernel serves causal GQA attention fastest? Times each backend alone, forward and
forward+backward, at DIFF V2 shapes (2h query heads) and baseline shapes (h query heads).

    python bench/sdpa_backends.py            # on a CUDA machine; prints a table
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import cuda_time_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for seq, hq, hkv, d in [
        (2048, 32, 4, 128),
        (2048, 16, 4, 128),
        (4096, 32, 8, 64),
        (4096, 16, 8, 64),
        (1024, 16, 2, 64),
        (1024, 8, 2, 64),
    ]:
        b = args.batch * 4096 // seq
        q = torch.randn(b, hq, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, hkv, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, hkv, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        flops_fwd = 4 * b * hq * seq * seq * d / 2  # causal: half of QKᵀ and PV
        for name, backend in BACKENDS.items():
            for gqa in (True, False):
                kk, vv = (k, v) if gqa else (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))

                def fwd(q=q, kk=kk, vv=vv, gqa=gqa, backend=backend):
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

                def fwd_bwd(fwd=fwd):
                    fwd().sum().backward()

                try:
                    t_f, t_fb = cuda_time_ms(fwd, iters=10), cuda_time_ms(fwd_bwd, iters=10)
                    rows.append(
                        (seq, hq, hkv, d, b, name, gqa, t_f, flops_fwd / t_f / 1e9, t_fb, 3.5 * flops_fwd / t_fb / 1e9)
                    )
                except RuntimeError as err:
                    rows.append((seq, hq, hkv, d, b, name, gqa, None, None, None, str(err).splitlines()[0][:60]))
    print(
        f"{'T':>5} {'Hq':>3} {'Hkv':>3} {'d':>4} {'B':>3} {'backend':>9} {'gqa':>5} {'fwd ms':>8} {'TFLOP/s':>8} "
        f"{'f+b ms':>8} {'TFLOP/s':>8}"
    )
    for r in rows:
        if r[7] is None:
            print(f"{r[0]:>5} {r[1]:>3} {r[2]:>3} {r[3]:>4} {r[4]:>3} {r[5]:>9} {r[6]!s:>5}  unsupported: {r[10]}")
        else:
            print(
                f"{r[0]:>5} {r[1]:>3} {r[2]:>3} {r[3]:>4} {r[4]:>3} {r[5]:>9} {r[6]!s:>5} {r[7]:>8.3f} {r[8]:>8.0f} "
                f"{r[9]:>8.3f} {r[10]:>8.0f}"
            )


if __name__ == "__main__":
    main()
