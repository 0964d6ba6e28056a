"""Prometheus metrics of one server (its own registry, so two servers in a process do not mix): requests by
endpoint and status, prompt and generated tokens, queue depth, batch occupancy, decode steps, and histograms
of time to first token and of the time between a sequence's tokens. Fed by the HTTP layer (requests) and by
the scheduler's events (everything else)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .sequence import SchedulerEvent

CONTENT_TYPE = CONTENT_TYPE_LATEST

# seconds; time to first token spans queueing and prefill, the gap between tokens one decode step or a few
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, max_batch: int) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "diffv2_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=registry
        )
        self.prompt_tokens = Counter("diffv2_prompt_tokens", "prompt tokens admitted", registry=registry)
        self.generated_tokens = Counter("diffv2_generation_tokens", "tokens generated", registry=registry)
        self.finished = Counter(
            "diffv2_sequences_finished", "sequences finished, by reason", ["reason"], registry=registry
        )
        self.steps = Counter("diffv2_decode_steps", "decode steps launched", registry=registry)
        self.queue_depth = Gauge("diffv2_queue_depth", "sequences waiting for a row", registry=registry)
        self.running = Gauge("diffv2_running_sequences", "rows in use (prefilling or decoding)", registry=registry)
        self.rows = Gauge("diffv2_batch_rows", "rows of the KV cache (max batch)", registry=registry)
        self.rows.set(max_batch)
        self.occupancy = Histogram(
            "diffv2_batch_occupancy",
            "share of a decode step's rows that decode a sequence",
            buckets=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
            registry=registry,
        )
        self.ttft = Histogram(
            "diffv2_time_to_first_token_seconds",
            "arrival to first token, queueing included",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.per_token = Histogram(
            "diffv2_time_per_output_token_seconds",
            "time between a sequence's tokens",
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )

    def watch_busy(self, busy: dict[str, float]) -> None:
        """Export a scheduler's :attr:`~diffv2.serve.Scheduler.busy_seconds`, read at every scrape."""
        gauge = Gauge(
            "diffv2_scheduler_busy_seconds",
            "host seconds the scheduler loop spent per part of its turns (a running total)",
            ["part"],
            registry=self.registry,
        )
        for part in busy:
            gauge.labels(part).set_function(lambda part=part: busy[part])

    def observe(self, event: SchedulerEvent) -> None:
        """A scheduler observer (runs on the scheduler's thread and the request threads; prometheus_client is
        thread-safe)."""
        self.queue_depth.set(event.waiting)
        self.running.set(event.running)
        if event.kind == "admitted":
            self.prompt_tokens.inc(len(event.seq.prompt))
        elif event.kind == "first_token":
            self.ttft.observe(event.ttft)
            self.generated_tokens.inc()
        elif event.kind == "step":
            self.steps.inc()
            self.occupancy.observe(event.active / event.rows)
        elif event.kind == "step_done":
            self.generated_tokens.inc(len(event.gaps))
            for gap in event.gaps:
                self.per_token.observe(gap)
        elif event.kind == "finished":
            self.finished.labels(event.reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
