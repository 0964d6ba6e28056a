"""Timing helpers shared by the benchmark scripts (CUDA events; CUDA-graph replay for launch-free timing)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cuda_time_ms(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    """Mean milliseconds of ``fn()`` launched eagerly (launch overhead included)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def graph_ms(calls: list[Callable[[], object]], reps: int = 5) -> float:
    """Mean milliseconds of one call when ``calls`` are captured in one CUDA graph and replayed back to back.

    The calls run once on a side stream first (compilation, autotuning, allocator warm-up stay outside the
    capture), as CUDA-graph capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    return cuda_time_ms(graph.replay, iters=reps, warmup=0) / len(calls)


def copy_bandwidth_gbs(n_bytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), the ceiling decode is compared to.

    Timed eagerly, not in a CUDA graph: captured, a copy becomes a graph memcpy node, which the copy engines
    may run at a fraction of what a kernel on the SMs reaches (docs/benchmarks.md#copy-bandwidth), and decode
    kernels run on the SMs. At 4 GiB the launch cost is negligible."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), iters=10)
    return 2 * n_bytes / ms / 1e6
