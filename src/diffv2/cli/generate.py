"""``diffv2 generate``: sample from a trained checkpoint with its own tokenizer, streaming to the console."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ..checkpoint import load_pretrained, pick_device
from ..config import check_text
from ..errors import CheckpointError
from ..generate import stream_batch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (a run dir or a checkpoint dir)")
    p.add_argument("--checkpoint", required=True, help="run dir (its latest checkpoint) or checkpoint dir")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA; slow to start)")
    p.add_argument("--stats", action="store_true", help="print time to first token and decode tokens/s to stderr")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="CUDA: run each decode step eagerly instead of replaying one captured CUDA graph")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for prompt in args.prompt:
        check_text("--prompt", prompt)
    device = pick_device(args.device)
    loaded = load_pretrained(args.checkpoint, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise CheckpointError(f"{loaded.checkpoint}: holds no tokenizer.json")
    prompts = [tokenizer.encode(p) for p in args.prompt]
    if any(not p for p in prompts):
        raise CheckpointError("--prompt: an empty prompt encodes to no tokens; give some text")
    eos = None if args.no_stop else tokenizer.eot_id
    new: list[list[int]] = [[] for _ in prompts]
    single = len(prompts) == 1
    shown = ""
    clock = _Clock()
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    graph = False if args.no_cuda_graph else None
    steps = stream_batch(
        model, prompts, args.max_new_tokens, eos_id=eos, compile=args.compile, cuda_graph=graph, **sampling
    )
    if single:
        print(args.prompt[0], end="", flush=True)
    try:
        for step in steps:
            clock.tick()
            for row, tok in zip(new, step, strict=True):
                if tok is not None and tok != eos:
                    row.append(tok)
            if single:  # stream: print what the new tokens decode to so far (BPE pieces may join later)
                text = tokenizer.decode(new[0])
                if not text.endswith("\ufffd"):
                    sys.stdout.write(text[len(shown) :])
                    sys.stdout.flush()
                    shown = text
    except BaseException:
        if single:  # an error message must not continue the line of text printed so far
            print(flush=True)
        raise
    if single:
        print(tokenizer.decode(new[0])[len(shown) :])
    else:
        for prompt, row in zip(args.prompt, new, strict=True):
            print(f"--- {prompt!r}\n{prompt}{tokenizer.decode(row)}")
    if args.stats:
        print(clock.summary(len(prompts)), file=sys.stderr)
    return 0


class _Clock:
    """Wall time to the first token (prefill, plus graph capture or compilation on the first call) and of the
    decode steps after it. Tokens arrive on the host one step behind the GPU, so host time tracks GPU time."""

    def __init__(self) -> None:
        self.start, self.times = time.perf_counter(), []

    def tick(self) -> None:
        self.times.append(time.perf_counter())

    def summary(self, batch: int) -> str:
        if not self.times:
            return "no tokens generated"
        first = self.times[0] - self.start
        steps = len(self.times) - 1
        if steps == 0:
            return f"first token after {first * 1e3:.0f} ms; no decode steps"
        rate = steps / (self.times[-1] - self.times[0])
        return (
            f"first token after {first * 1e3:.0f} ms; {steps} decode steps at {rate:.1f} steps/s "
            f"({rate * batch:.1f} tokens/s over {batch} prompts)"
        )
