"""NCCL bandwidth between this node's GPUs: what data-parallel training pays per optimizer step.

    torchrun --nproc_per_node=2 bench/collectives.py             # all_reduce, all_gather, reduce_scatter

Times each collective over 64 MiB .. 1 GiB buffers (fp32 and bf16) with CUDA events, after warm-up, and prints
algorithm bandwidth (bytes / time) and bus bandwidth (the NCCL-tests convention: all_reduce moves 2(n-1)/n of the
buffer per GPU, all_gather and reduce_scatter (n-1)/n), so the numbers compare with the link's rated speed. The
last lines turn them into the time a 350m model's gradient reduction (DDP) and parameter gathers (FSDP2) take.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from common import cuda_time_ms


def main() -> None:
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    n, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for mib in (64, 256, 1024):
            numel = (mib << 20) // torch.finfo(dtype).bits * 8
            full = torch.randn(numel, device="cuda").to(dtype)
            shard = torch.empty(numel // n, device="cuda", dtype=dtype)
            ops = {
                "all_reduce": (lambda f=full: dist.all_reduce(f), 2 * (n - 1) / n),
                "all_gather": (lambda f=full, s=shard: dist.all_gather_into_tensor(f, s), (n - 1) / n),
                "reduce_scatter": (lambda f=full, s=shard: dist.reduce_scatter_tensor(s, f), (n - 1) / n),
            }
            for name, (fn, factor) in ops.items():
                ms = cuda_time_ms(fn, iters=10)
                algbw = full.numel() * full.element_size() / ms / 1e6
                rows.append((name, str(dtype).removeprefix("torch."), mib, ms, algbw, algbw * factor))
    if rank == 0:
        print(f"{n} ranks, {torch.cuda.get_device_name()}, torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}")
        print(f"{'op':<15} {'dtype':<9} {'MiB':>5} {'ms':>8} {'algbw GB/s':>11} {'busbw GB/s':>11}")
        for name, dtype, mib, ms, alg, bus in rows:
            print(f"{name:<15} {dtype:<9} {mib:>5} {ms:>8.2f} {alg:>11.1f} {bus:>11.1f}")
        by = {(r[0], r[1], r[2]): r for r in rows}
        params = 313e6  # bench/scaling.py's 350m preset with its 8k-token tokenizer
        ar = by[("all_reduce", "float32", 1024)][4]
        ag = by[("all_gather", "bfloat16", 1024)][4]
        print(f"350m DDP fp32 gradient all-reduce: {params * 4 / ar / 1e6:.1f} ms per optimizer step")
        print(f"350m FSDP2 bf16 parameter all-gather: {params * 2 / ag / 1e6:.1f} ms per gather")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
