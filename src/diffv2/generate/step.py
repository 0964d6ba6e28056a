"""The one-token decode step against a static KV cache, optionally compiled and captured in a CUDA graph.

The gpt-fast recipe: every step has the same shapes (the cache's whole buffer, a per-row window of valid
slots), its inputs live in fixed buffers that each call overwrites in place, and the forward, which is a few
hundred small kernels at batch 1, is replayed from one CUDA graph, so launch overhead and host syncs leave
the loop. Attention reads the window through the Triton split-KV kernel (DIFF V2's pair subtraction is in its
epilogue) where it applies, else through the masked fallback (CPU, unsupported shapes).
"""

from __future__ import annotations

import contextlib

import torch

from ..model import Transformer
from .cache import KVCache


class DecodeStep:
    """``step(tokens, slot)`` → last-position logits (B, V) for one new token per row written at ``slot``.

    ``start`` (B,) is each row's first real slot (left padding before it). With ``per_row_slots`` each row
    writes at its own slot, ``slot`` being a (B,) tensor, and its RoPE position is that slot minus its start:
    rows at different lengths in one step, as continuous batching keeps them. ``cuda_graph`` captures the step
    once (CUDA only) and replays it; ``compile`` runs it through ``torch.compile`` first. The returned logits
    of a graphed step are a buffer the next call overwrites: consume them (sample) before calling again.
    """

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        start: torch.Tensor,
        *,
        per_row_slots: bool = False,
        cuda_graph: bool = False,
        compile: bool = False,
    ) -> None:
        device = cache.device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model and cache on a CUDA device, not {device}")
        batch = cache.batch
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        # the cache reads this buffer in place: one slot for all rows, or one per row
        self.slot = torch.zeros(batch if per_row_slots else 1, dtype=torch.long, device=device)
        self.start = start.to(device=device, dtype=torch.long).clone()
        cache.static = True  # from now on attention sees the whole buffer, windowed per row
        cache.advance(self.slot[:, None] if per_row_slots else self.slot, cache.max_len)
        # a module-level function, not a bound method kept on self: that would make a reference cycle, and the
        # cache (tens of GB at long contexts) would outlive the step until Python's cyclic GC happened to run
        self._compiled = torch.compile(_step_forward, fullgraph=True, dynamic=False) if compile else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        if compile or cuda_graph:
            self._warm_up()
        if cuda_graph:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.logits = self.forward()

    def forward(self) -> torch.Tensor:
        """One step on the current input buffers (compiled if asked), outside any CUDA graph."""
        return _step_forward(self) if self._compiled is None else self._compiled(self)

    @torch.no_grad()
    def _warm_up(self) -> None:
        """Compilation, autotuning and allocator growth, before any capture (on a side stream, as CUDA-graph
        capture requires). These runs write K/V at the cache's last slot, which no step reads before the step
        that writes it."""
        self.slot.fill_(self.cache.max_len - 1)
        side = torch.cuda.Stream() if self.cache.device.type == "cuda" else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(2):
                self.forward()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, slot: int | torch.Tensor) -> torch.Tensor:
        """``slot``: an int for every row, or with ``per_row_slots`` a (B,) tensor (host or device; its values
        are the caller's to keep below ``max_len``: checking them would cost a host sync)."""
        self.tokens.copy_(tokens.view(-1, 1), non_blocking=True)
        if isinstance(slot, torch.Tensor):
            if slot.shape != self.slot.shape:
                raise ValueError(f"slot {tuple(slot.shape)}: this step takes {tuple(self.slot.shape)} slots")
            self.slot.copy_(slot, non_blocking=True)
        else:
            if slot >= self.cache.max_len:
                raise ValueError(f"slot {slot} is past the cache's {self.cache.max_len} slots")
            self.slot.fill_(slot)  # a kernel argument, not a host sync
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.logits


def _step_forward(step: DecodeStep) -> torch.Tensor:
    # (B, 1): RoPE from each row's start; a shared slot (1,) broadcasts over the rows
    positions = (step.slot[:, None] - step.start[:, None]).clamp(min=0)
    window = step.cache.window(step.start)
    return step.model(step.tokens, positions=positions, mask=window, caches=step.cache.layers)[:, -1]
