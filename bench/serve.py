"""Serving speed of ``diffv2 serve``: concurrent streaming clients against DIFF V2 and the baseline, with the
offline paths beside them.

    python bench/serve.py --out results/                 # 1b shapes, random weights, CUDA
    python bench/serve.py --quick --out /tmp/serve       # a toy run on the CPU (checks that it works)

Per variant (random weights at the same shapes; token-id prompts, no tokenizer, so every request generates
exactly ``max_tokens``): the server runs in this process (scheduler thread + uvicorn on a free port) and the
clients in a second process, so their Python does not share the server's interpreter lock. Phases, in order:

- ``offline`` then ``serve uniform``: the same ``--ratio-batch`` (64) requests of one prompt and output length,
  run offline by ``generate_batch`` as one batch, then sent at once to the server: the cost of serving;
- ``serve``: 1, 8, 64, 256 concurrent clients (``--clients``), each sending streaming requests of mixed prompt
  and output lengths, one after another; tokens/s over the level's wall time, time to first token and the gap
  between a request's tokens (inter-token latency) at p50 and p99;
- ``offline static`` and ``hf static``: the mixed requests of the 64-client level in arrival order, in static
  batches of ``--max-batch`` (each batch decodes until its longest request is done; tokens/s counts the tokens
  asked for), by ``generate_batch`` and by HF transformers ``generate`` on the model exported to HF.

Each serving row also says where the scheduler's loop spent its host time during the level
(``Scheduler.busy_seconds``: prefill forwards, launching decode steps, collecting their tokens), how many
prefill forwards and decode steps it ran and how many rows a step decoded on average.

The run is time-boxed (``--time-budget``, shared equally by the variants): a phase that would start after its
variant's share is spent is skipped and marked so. Results go to ``OUT/serve_bench.json`` (written atomically,
after every phase); a table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


# ---------------------------------------------------------------------- the client process (no torch here)
def client_level(url: str, requests: list[tuple[list[int], int]], concurrency: int, timeout: float) -> dict:
    """``concurrency`` clients take the requests in order, one at a time each; every request streams."""
    import asyncio

    import httpx

    async def main() -> dict:
        pending, records = list(enumerate(requests))[::-1], []
        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

            async def one_client() -> None:
                while pending:
                    index, (prompt, n) = pending.pop()
                    body = {
                        "model": "bench",
                        "prompt": prompt,
                        "max_tokens": n,
                        "temperature": 0,
                        "stream": True,
                        "return_token_ids": True,
                    }
                    start, times, status = time.perf_counter(), [], 0
                    async with client.stream("POST", "/v1/completions", json=body) as response:
                        status = response.status_code
                        async for line in response.aiter_lines():
                            if line.startswith("data: {"):
                                chunk = json.loads(line[6:])
                                if "error" in chunk:  # the stream ended early: counted as a failed request
                                    status = chunk["error"].get("code") or -1
                                    break
                                new = sum(len(c.get("token_ids", [])) for c in chunk["choices"])
                                times += [time.perf_counter()] * new
                    records.append({"index": index, "status": status, "start": start, "times": times, "asked": n})

            began = time.perf_counter()
            await asyncio.gather(*(one_client() for _ in range(concurrency)))
            return {"wall_s": time.perf_counter() - began, "records": records}

    return asyncio.run(main())


def summarize(level: dict) -> dict:
    records = level["records"]
    failed = [r for r in records if r["status"] != 200 or len(r["times"]) != r["asked"]]
    ttft = [r["times"][0] - r["start"] for r in records if r["times"]]
    gaps = [b - a for r in records for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tokens = sum(len(r["times"]) for r in records)
    return {
        "requests": len(records),
        "failed": len(failed),
        "tokens": tokens,
        "wall_s": level["wall_s"],
        "tokens_per_s": tokens / level["wall_s"],
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(gaps, 50),
        "itl_p99_ms": pct(gaps, 99),
    }


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return 1e3 * ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# ---------------------------------------------------------------------- the serving process
def workload(seed: int, count: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int):
    import random

    rng = random.Random(seed)
    return [
        ([rng.randrange(vocab) for _ in range(rng.randint(*prompt_range))], rng.randint(*output_range))
        for _ in range(count)
    ]


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def offline_static(run_batch, requests: list[tuple[list[int], int]], batch: int) -> dict:
    """Static batches in arrival order; tokens/s counts the tokens asked for, not the padding steps."""
    sync()
    began = time.perf_counter()
    for i in range(0, len(requests), batch):
        chunk = requests[i : i + batch]
        run_batch([p for p, _ in chunk], max(n for _, n in chunk))
    sync()
    wall = time.perf_counter() - began
    tokens = sum(n for _, n in requests)
    return {"requests": len(requests), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def hf_runner(model):
    """``generate`` of HF transformers on the model exported in-process (same weights), left-padded, greedy;
    returns the runner and the HF model."""
    import torch

    from diffv2.hf import to_hf

    hf = to_hf(model).eval()

    def run(prompts: list[list[int]], new: int) -> None:
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.lm_head.weight.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=ids.device)
        with torch.no_grad():
            hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )

    return run, hf


def bench_variant(variant: str, args, pool, deadline: float, emit) -> None:
    import torch

    from diffv2 import ModelConfig, Transformer
    from diffv2.generate import generate_batch
    from diffv2.serve import BackgroundServer, Scheduler, create_app

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig.preset(args.preset, attention=variant, vocab_size=args.vocab_size, max_seq_len=args.max_len)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device, dtype).eval()
    base = {"variant": variant, "preset": args.preset, "device": str(device), "dtype": str(dtype).split(".")[-1]}

    def phase(name: str, fn, **extra) -> dict | None:
        if time.monotonic() > deadline:
            emit({**base, "phase": name, **extra, "skipped": "time budget spent"})
            return None
        row = {**base, "phase": name, **extra, **fn()}
        emit(row)
        return row

    mixed = workload(
        1, max(args.requests_per_client * max(args.clients), 8), args.prompt_range, args.output_range, cfg.vocab_size
    )
    uniform = workload(2, args.ratio_batch, (args.uniform[0],) * 2, (args.uniform[1],) * 2, cfg.vocab_size)

    def offline(prompts, new):
        generate_batch(model, prompts, new, temperature=0)

    # the serve/offline ratio first (the serving goal): offline, then the server on the same requests
    offline([p for p, _ in uniform[:2]], 4)  # warm-up
    phase("offline", lambda: offline_static(offline, uniform, len(uniform)), clients=len(uniform))
    began = time.perf_counter()
    scheduler = Scheduler(model, max_batch=args.max_batch, max_queue=max(args.clients) * 4, seed=0).start()
    startup = time.perf_counter() - began  # CUDA graph capture of every batch-size bucket
    active = [0]  # rows decoded, summed over the decode steps

    def count_rows(event) -> None:
        if event.kind == "step":
            active[0] += event.active

    scheduler.observers.append(count_rows)

    def served(requests, clients) -> dict:
        """A level's client-side figures and where the scheduler's loop spent its host time meanwhile."""
        busy, calls, steps, rows = dict(scheduler.busy_seconds), scheduler.prefill_calls, scheduler.steps, active[0]
        row = summarize(pool.submit(client_level, server.url, requests, clients, args.timeout).result())
        n = scheduler.steps - steps
        row.update({f"{k}_s": scheduler.busy_seconds[k] - busy[k] for k in busy})
        row.update(prefill_calls=scheduler.prefill_calls - calls, steps=n, rows_per_step=(active[0] - rows) / max(n, 1))
        return row

    with BackgroundServer(create_app(scheduler, None, model_name="bench")) as server:
        pool.submit(client_level, server.url, mixed[:4], 2, args.timeout).result()  # warm-up, both processes
        phase("serve uniform", lambda: served(uniform, len(uniform)), clients=len(uniform), startup_s=startup)
        for clients in args.clients:
            requests = mixed[: args.requests_per_client * clients]
            phase("serve", lambda c=clients, r=requests: served(r, c), clients=clients)
    scheduler.close()
    static = mixed[: args.requests_per_client * min(64, max(args.clients))]
    phase("offline static", lambda: offline_static(offline, static, args.max_batch), clients=args.max_batch)
    run_hf, _ = hf_runner(model)
    run_hf([p for p, _ in uniform[:2]], 4)  # warm-up
    phase("hf static", lambda: offline_static(run_hf, static, args.max_batch), clients=args.max_batch)
    phase("hf uniform", lambda: offline_static(run_hf, uniform, len(uniform)), clients=len(uniform))


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def table(rows: list[dict], variants: list[str]) -> str:
    lines = [f"{'variant':<9} {'phase':<15} {'clients':>7} {'tok/s':>9} {'TTFT p50/p99 ms':>17} {'ITL p50/p99 ms':>15}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['variant']:<9} {r['phase']:<15} {r.get('clients', ''):>7} {'skipped: ' + r['skipped']}")
            continue
        ttft = f"{fmt(r.get('ttft_p50_ms'))}/{fmt(r.get('ttft_p99_ms'))}" if "ttft_p50_ms" in r else "-"
        itl = f"{fmt(r.get('itl_p50_ms'))}/{fmt(r.get('itl_p99_ms'))}" if "itl_p50_ms" in r else "-"
        failed = f"  ({r['failed']} failed)" if r.get("failed") else ""
        if "steps" in r:  # the scheduler's host seconds in the level: prefill / launch / collect, and its steps
            failed += (
                f"  [prefill {r['prefill_s']:.1f} s in {r['prefill_calls']}, launch {r['launch_s']:.1f} s, "
                f"collect {r['collect_s']:.1f} s; {r['steps']} steps of {r['rows_per_step']:.1f} rows]"
            )
        lines.append(
            f"{r['variant']:<9} {r['phase']:<15} {r['clients']:>7} {r['tokens_per_s']:>9.1f} {ttft:>17} "
            f"{itl:>15}{failed}"
        )
    by = {(r["variant"], r["phase"], r.get("clients")): r for r in rows if "tokens_per_s" in r}
    for v in variants:
        uni = next((r for k, r in by.items() if k[:2] == (v, "serve uniform")), None)
        off = next((r for k, r in by.items() if k[:2] == (v, "offline")), None)
        hf = next((r for k, r in by.items() if k[:2] == (v, "hf static")), None)
        levels = [r for k, r in by.items() if k[:2] == (v, "serve")]
        same = min(64, max((r["clients"] for r in levels), default=0))  # the level whose requests hf static ran
        serve64 = next((r for r in levels if r["clients"] == same), None)
        if uni and off:
            lines.append(
                f"{v}: serve / offline generate_batch, {uni['clients']} requests at once: "
                f"{uni['tokens_per_s'] / off['tokens_per_s']:.3f}"
            )
        if serve64 and hf:
            lines.append(
                f"{v}: serve ({serve64['clients']} clients) / HF generate (static batches): "
                f"{serve64['tokens_per_s'] / hf['tokens_per_s']:.3f}"
            )
    if len(variants) == 2:
        a, b = variants
        for (v, p, c), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2] or 0)):
            other = by.get((b, p, c))
            if v == a and other:
                lines.append(f"{a} / {b} tokens/s, {p} ({c}): {r['tokens_per_s'] / other['tokens_per_s']:.3f}")
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--preset", default="1b")
    p.add_argument("--variants", default="diff_v2,baseline")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--max-len", type=int, default=2048, help="tokens per sequence (the model's max_seq_len)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--clients", default="1,8,64,256")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-range", default="16,512", help="prompt lengths, uniform in [a, b]")
    p.add_argument("--output-range", default="16,256", help="output lengths, uniform in [a, b]")
    p.add_argument("--uniform", default="128,128", help="prompt,output length of the serve/offline ratio")
    p.add_argument("--ratio-batch", type=int, default=64)
    p.add_argument("--time-budget", type=float, default=1500, help="seconds; later phases are skipped")
    p.add_argument("--timeout", type=float, default=600, help="seconds a client waits for one request")
    p.add_argument("--quick", action="store_true", help="a toy run on the CPU")
    p.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="seconds; Python's thread switch interval for the server process (default: Python's, 0.005)",
    )
    args = p.parse_args()
    if args.switch_interval is not None:
        import sys

        sys.setswitchinterval(args.switch_interval)
    if args.quick:
        args.preset, args.vocab_size, args.max_len, args.max_batch = "tiny", 512, 128, 8
        args.clients, args.prompt_range, args.output_range, args.uniform = "1,4,8", "4,24", "4,16", "16,16"
        args.ratio_batch, args.requests_per_client = 8, 2
    args.clients = [int(c) for c in args.clients.split(",")]
    args.prompt_range, args.output_range, args.uniform = (
        tuple(int(x) for x in s.split(",")) for s in (args.prompt_range, args.output_range, args.uniform)
    )
    variants = args.variants.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.time_budget
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)  # a run cut short still leaves its rows
        write_json(out / "serve_bench.json", {"args": vars(args), "rows": rows})

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    if args.quick:
        torch.set_num_threads(1)  # a smoke test: intra-op threads only thrash on a small, shared CPU
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for i, variant in enumerate(variants):
            # an equal share of the time left per variant: a short budget cuts the same phases of each
            share = time.monotonic() + (deadline - time.monotonic()) / (len(variants) - i)
            bench_variant(variant, args, pool, share, emit)  # its model and caches are freed on return
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print()
    print(table(rows, variants))


if __name__ == "__main__":
    main()
