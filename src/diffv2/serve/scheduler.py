"""Continuous batching on one thread that owns the model.

Each turn of the loop: take cancellations; admit waiting sequences into free rows (lowest first); feed up to
``prefill_chunk`` prompt tokens of the sequences being admitted (one row at a time, apart from the batch; a
sequence whose prompt is in samples its first token); launch one decode step over every row that is decoding;
then read the previous step's tokens on the host, hand them out and retire the rows that finished. Reading step
i after step i + 1 is queued keeps the device busy while the host works; a row that finished at step i has
its step-i+1 token thrown away. Per-row sampling settings mix in one batch; a seeded sequence draws from its
own generator.
"""

from __future__ import annotations

import collections
import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..generate import HostCopy, RowDecoder, fused_projections
from ..generate.cache import check_kv_dtype
from ..model import Transformer
from .sampler import logprob_tensors, sample_sequences, to_device, token_infos
from .sequence import DECODE, DONE, PREFILL, WAITING, SchedulerEvent, Sequence, TokenInfo

log = logging.getLogger("diffv2.serve")


class QueueFull(Exception):
    """The waiting queue is full; try again later."""


class SchedulerDown(Exception):
    """The scheduler has stopped (closed, or an internal error): it takes no more sequences."""


@dataclass
class _Launched:
    """A decode step on the device: who took part and its results on their way to the host."""

    seqs: list[Sequence]
    tokens: HostCopy
    logprobs: tuple[HostCopy, HostCopy, HostCopy] | None  # chosen, top values, top ids (rows asking only)
    asking: list[Sequence]


class Scheduler:
    """Serves :class:`Sequence` s from up to ``max_batch`` rows of one KV cache, ``max_queue`` more waiting."""

    def __init__(
        self,
        model: Transformer,
        *,
        max_batch: int = 64,
        max_queue: int = 256,
        prefill_chunk: int = 512,
        max_len: int | None = None,
        cuda_graph: bool | None = None,
        seed: int | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.model, self.max_batch, self.max_queue, self.prefill_chunk = model, max_batch, max_queue, prefill_chunk
        self.max_len = max_len or model.cfg.max_seq_len
        self.device = next(model.parameters()).device
        self._cuda_graph = cuda_graph
        self._kv_cache_dtype = check_kv_dtype("kv_cache_dtype", kv_cache_dtype)  # the rows' cache: auto or int8
        self.observers: list[Callable[[SchedulerEvent], None]] = []
        self.steps = 0
        # host seconds the loop spent in each part of its turns (prefill forwards and first tokens; launching a
        # step: its host work and, on CUDA, the graph replay; collecting: waiting for a step's tokens and handing
        # them out), and prefill forwards run: where a server's time goes, next to its tokens/s
        self.busy_seconds = {"prefill": 0.0, "launch": 0.0, "collect": 0.0}
        self.prefill_calls = 0
        self.error: str | None = None
        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cancelled: list[Sequence] = []
        self._live: dict[int, Sequence] = {}  # every sequence submitted and not ended, by id
        self._stopping = False
        self._rows: list[Sequence | None] = [None] * max_batch
        self._free = list(range(max_batch))
        self._prefilling: collections.deque[Sequence] = collections.deque()
        self._pending: _Launched | None = None
        self._generator = torch.Generator(device=self.device)
        if seed is not None:
            self._generator.manual_seed(seed)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="diffv2-scheduler", daemon=True)

    # ------------------------------------------------------------------ the other threads' side
    def start(self) -> Scheduler:
        """Start the loop; returns once the decode steps are built (CUDA graphs captured)."""
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            raise SchedulerDown(self.error)
        return self

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def healthy(self) -> bool:
        return self._ready.is_set() and self.error is None and not self._stopping

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self.max_batch - len(self._free)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue all of ``seqs`` or none (:class:`QueueFull`, :class:`SchedulerDown`)."""
        with self._cond:
            if not self.healthy:
                raise SchedulerDown(self.error or "the scheduler is not running")
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} sequences are waiting (at most {self.max_queue})")
            now = time.perf_counter()
            for seq in seqs:
                seq.arrival = now
                self._live[seq.id] = seq
                self._waiting.append(seq)
                self._emit("queued", seq=seq)
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        """Drop ``seq`` (its client went away): its row is freed before the next decode step."""
        with self._cond:
            if seq.state != DONE and not seq.cancelled:
                seq.cancelled = True
                self._cancelled.append(seq)
                self._emit("cancel", seq=seq)
                self._cond.notify()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        reason = "the server is shutting down"
        try:
            with fused_projections(self.model):
                self._decoder = RowDecoder(
                    self.model,
                    self.max_batch,
                    self.max_len,
                    cuda_graph=self._cuda_graph,
                    kv_cache_dtype=self._kv_cache_dtype,
                )
                self._next = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
                self._ready.set()
                while self._turn():
                    pass
        except Exception as err:  # a bug or a device failure: every open sequence gets a clean error
            log.exception("the scheduler stopped")
            self.error = reason = f"the generation engine stopped ({type(err).__name__})"
        finally:
            with self._cond:
                self._stopping = True
                open_seqs, self._live = list(self._live.values()), {}
                self._waiting.clear()
            for seq in open_seqs:
                seq.state = DONE
                seq.consumer.fail(reason)
            self._ready.set()

    def _has_work(self) -> bool:
        return bool(
            self._cancelled or self._prefilling or self._pending or (self._waiting and self._free) or self._launchable()
        )

    def _launchable(self) -> list[Sequence]:
        """The decoding rows with a token left to sample: all but those whose last token is on the device."""
        return [
            s
            for s in self._rows
            if s is not None
            and s.state == DECODE
            and s.launched < s.params.max_tokens
            and len(s.prompt) + s.launched < self.max_len
        ]

    def _turn(self) -> bool:
        with self._cond:
            while not (self._stopping or self._has_work()):
                self._cond.wait()
            if self._stopping:
                return False
            cancelled, self._cancelled = self._cancelled, []
            for seq in cancelled:
                if seq.state == WAITING:
                    self._waiting.remove(seq)
            while self._waiting and self._free:
                self._admit(self._waiting.popleft())
        for seq in cancelled:
            self._retire(seq, "cancelled")
        busy, t0 = self.busy_seconds, time.perf_counter()
        self._prefill()
        t1 = time.perf_counter()
        launched = self._launch()
        t2 = time.perf_counter()
        if self._pending is not None:
            self._collect(self._pending)
        self._pending = launched
        busy["prefill"] += t1 - t0
        busy["launch"] += t2 - t1
        busy["collect"] += time.perf_counter() - t2
        return True

    def _admit(self, seq: Sequence) -> None:
        seq.row, seq.state = heapq.heappop(self._free), PREFILL
        self._rows[seq.row] = seq
        if seq.params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        self._prefilling.append(seq)
        self._emit("admitted", seq=seq)

    def _retire(self, seq: Sequence, reason: str) -> None:
        if self._release(seq, reason):
            self._emit("finished", seq=seq, reason=reason)  # before the client can see the end
            self._call(seq, seq.consumer.finish, reason)

    def _release(self, seq: Sequence, reason: str) -> bool:
        """Free the sequence's row; False if it had ended already."""
        if seq.state == DONE:
            return False
        with self._cond:
            self._live.pop(seq.id, None)
        if seq.row is not None:
            self._rows[seq.row] = None
            heapq.heappush(self._free, seq.row)
        if seq.state == PREFILL:
            self._prefilling.remove(seq)
        seq.state, seq.finish_reason = DONE, reason
        return True

    def _call(self, seq: Sequence, fn: Callable, *args) -> bool:
        """A consumer call; a consumer that raises fails its own sequence, not the scheduler."""
        try:
            return bool(fn(*args))
        except Exception:
            log.exception("sequence %d: its consumer failed", seq.id)
            if self._release(seq, "error"):
                self._emit("finished", seq=seq, reason="error")
            seq.consumer.fail("internal error while handing out the output")
            return True

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            seq = self._prefilling[0]
            begin = seq.prefilled
            end = min(len(seq.prompt), begin + budget)
            chunk = to_device(seq.prompt[begin:end], self.device)
            logits = self._decoder.prefill(seq.row, chunk, begin)
            self.prefill_calls += 1
            seq.prefilled, budget = end, budget - (end - begin)
            if seq.params.prompt_logprobs:
                targets = seq.prompt[begin + 1 : end + 1]  # position j predicts prompt token begin + j + 1
                infos = token_infos(logits[: len(targets)], targets, seq.params.logprobs or 0)
                self._call(seq, seq.consumer.prompt, [TokenInfo(seq.prompt[0])] * (begin == 0) + infos)
            if end == len(seq.prompt):
                self._prefilling.popleft()
                seq.state = DECODE
                self._first_token(seq, logits[-1])

    def _first_token(self, seq: Sequence, logits: torch.Tensor) -> None:
        if seq.params.max_tokens == 0:  # scoring a prompt: nothing to generate
            self._retire(seq, "length")
            return
        token = sample_sequences(logits[None], [(0, seq.params, seq.generator)], self._generator)
        self._next[seq.row] = token[0]
        seq.launched = 1
        info = token_infos(logits[None], token.tolist(), seq.params.logprobs)[0]
        now = time.perf_counter()
        self._emit("first_token", seq=seq, ttft=now - seq.arrival)
        self._deliver(seq, info, now)

    def _deliver(self, seq: Sequence, info: TokenInfo, now: float) -> None:
        """Hand out one token; retire the sequence if it ended."""
        seq.generated, seq.last_token_time = seq.generated + 1, now
        if info.id in seq.params.stop_ids or self._call(seq, seq.consumer.token, info):
            self._retire(seq, "stop")
        elif seq.generated >= seq.params.max_tokens or len(seq.prompt) + seq.generated >= self.max_len:
            self._retire(seq, "length")

    def _launch(self) -> _Launched | None:
        seqs = self._launchable()
        if not seqs:
            return None
        n = self._decoder.bucket(max(s.row for s in seqs) + 1)
        slots = [self._decoder.scratch_slot] * n
        for s in seqs:
            slots[s.row] = s.next_slot
        logits = self._decoder.step(self._next[:n], torch.tensor(slots))  # the step copies them asynchronously
        tokens = sample_sequences(logits, [(s.row, s.params, s.generator) for s in seqs], self._generator)
        self._next[:n] = tokens
        asking = [s for s in seqs if s.params.logprobs is not None]
        copies = None
        if asking:
            rows = to_device([s.row for s in asking], self.device)
            copies = logprob_tensors(logits[rows], tokens[rows], max(s.params.logprobs for s in asking))
            copies = tuple(HostCopy(t) for t in copies)
        for s in seqs:
            s.launched += 1
        self.steps += 1
        self._emit("step", rows=n, active=len(seqs))
        return _Launched(seqs, HostCopy(tokens), copies, asking)

    def _collect(self, launched: _Launched) -> None:
        tokens = launched.tokens.get()
        found = {}
        if launched.logprobs is not None:
            chosen, values, ids = (c.get() for c in launched.logprobs)
            found = {s.id: i for i, s in enumerate(launched.asking)}
        now, out = time.perf_counter(), []
        for seq in launched.seqs:
            if seq.state != DECODE:
                continue  # it ended (or was cancelled) while this step ran
            info = TokenInfo(tokens[seq.row])
            if seq.id in found:
                i, k = found[seq.id], seq.params.logprobs
                info = TokenInfo(info.id, chosen[i], tuple(zip(ids[i][:k], values[i][:k], strict=True)))
            out.append((seq, info))
        gaps = tuple(now - seq.last_token_time for seq, _ in out)  # each had a first token before any step
        self._emit("step_done", active=len(launched.seqs), gaps=gaps)
        for seq, info in out:
            self._deliver(seq, info, now)

    def _emit(self, kind: str, **fields) -> None:
        event = SchedulerEvent(kind, self.steps, self.running, len(self._waiting), **fields)
        for observer in self.observers:
            observer(event)
