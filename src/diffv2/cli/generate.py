"""``diffv2 generate``: sample from a checkpoint with its own tokenizer, streaming to the console.

Prompts come from ``--prompt`` (``-`` reads stdin) and ``--prompt-file``; each is sampled ``--num-samples``
times in one batch, and the rows are streamed in order (the first live, each next one from where it has got
to when the one before it ends). ``--chat`` is an interactive conversation (:mod:`.chat`).
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Iterator

import torch

from ..checkpoint import pick_device
from ..config import check_positive_int, check_text, read_text_file
from ..errors import ConfigError, DataError
from ..generate import TextCodec, TextStream, stream_batch
from ..generate.cache import check_kv_dtype
from .fields import add_kv_cache_dtype_flag, path_arg

DEFAULTS = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 50, "top_p": 1.0, "num_samples": 1}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a checkpoint (a run dir, a checkpoint dir or an HF folder)",
        description="Sample text from a trained model, streaming it as it comes.",
    )
    p.add_argument("--checkpoint", required=True, help="run dir (its latest checkpoint), checkpoint dir or HF folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch; '-' reads stdin")
    p.add_argument("--prompt-file", action="append", default=[], type=path_arg, help="a file whose text is one prompt")
    p.add_argument("--chat", action="store_true", help="an interactive chat on stdin (Ctrl-D ends it); see --system")
    p.add_argument("--system", default=None, help="--chat: a system message opening the conversation")
    p.add_argument(
        "--num-samples",
        type=int,
        default=DEFAULTS["num_samples"],
        help="samples per prompt, drawn in one batch (default: %(default)s)",
    )
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"], help="(default: %(default)s)")
    p.add_argument(
        "--temperature", type=float, default=DEFAULTS["temperature"], help="0 = greedy (default: %(default)s)"
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=DEFAULTS["top_k"],
        help="sample from the k likeliest tokens; 0 = no limit (default: %(default)s)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=DEFAULTS["top_p"],
        help="nucleus: the smallest set holding this share of the mass; 1 = off (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampling seed (default: a random one, printed to stderr so the sample can be repeated)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA; slow to start)")
    add_kv_cache_dtype_flag(p)
    p.add_argument("--stats", action="store_true", help="print time to first token and decode tokens/s to stderr")
    p.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="CUDA: run each decode step eagerly instead of replaying one captured CUDA graph",
    )
    p.set_defaults(func=run)


def sampling(args: argparse.Namespace) -> dict:
    """The sampling keyword arguments of :func:`~diffv2.generate.stream_batch` (top-k 0 and top-p 1 are off), and
    the KV cache's format."""
    if args.top_k < 0:
        raise ConfigError(f"--top-k={args.top_k}: must be >= 0 (0 = no limit)")
    check_kv_dtype("--kv-cache-dtype", args.kv_cache_dtype)  # argparse's choices refuse others; callers may not
    top_p = None if args.top_p == 1 else args.top_p
    return dict(temperature=args.temperature, top_k=args.top_k or None, top_p=top_p, kv_cache_dtype=args.kv_cache_dtype)


def resolve_seed(args: argparse.Namespace) -> int:
    """``--seed``, or a fresh random one (see :func:`say_seed`)."""
    return args.seed if args.seed is not None else secrets.randbelow(2**31)


def say_seed(args: argparse.Namespace, seed: int) -> None:
    """A random seed is said on stderr when it matters (sampling, not greedy decoding), so it can be repeated."""
    if args.seed is None and args.temperature > 0:
        print(f"seed {seed} (--seed {seed} repeats this)", file=sys.stderr, flush=True)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = []  # a file's (or stdin's) final newline ends its last line; it is not part of the prompt
    for text in args.prompt:
        prompts.append(sys.stdin.read().removesuffix("\n") if text == "-" else text)
    for path in args.prompt_file:
        prompts.append(read_text_file("--prompt-file", path, 1 << 26, DataError).removesuffix("\n"))
    for text in prompts:
        check_text("--prompt", text)
    if not prompts:
        raise ConfigError("give a prompt: --prompt TEXT, --prompt - (stdin), --prompt-file PATH, or --chat")
    return prompts


def load(args: argparse.Namespace):
    """(model, codec) on the device ``--device`` names."""
    from .serve import load_for_serving

    device = pick_device(args.device)
    model, tokenizer = load_for_serving(args.checkpoint, device, torch.bfloat16 if device.type == "cuda" else None)
    if tokenizer is None:
        raise ConfigError(f"--checkpoint {args.checkpoint}: holds no tokenizer, so it cannot take text prompts")
    return model, TextCodec(tokenizer)


def run(args: argparse.Namespace) -> int:
    check_positive_int("--num-samples", args.num_samples, 1 << 12)
    if args.chat:
        if args.prompt or args.prompt_file:
            raise ConfigError("--chat reads the conversation from stdin; drop --prompt/--prompt-file")
        from .chat import chat

        model, codec = load(args)
        kwargs, seed = sampling(args), resolve_seed(args)
        say_seed(args, seed)
        return chat(model, codec, args, kwargs, seed)
    texts = read_prompts(args)
    model, codec = load(args)
    prompts = [codec.encode(t) for t in texts]
    if any(not p for p in prompts):
        raise ConfigError("--prompt: an empty prompt encodes to no tokens; give some text")
    rows = [(t, ids) for t, ids in zip(texts, prompts, strict=True) for _ in range(args.num_samples)]
    eos = None if args.no_stop else codec.eos_id
    kwargs = sampling(args)
    seed = resolve_seed(args)
    clock = _Clock()
    steps = stream_batch(
        model,
        [ids for _, ids in rows],
        args.max_new_tokens,
        **kwargs,
        eos_id=eos,
        seed=seed,
        compile=args.compile,
        cuda_graph=False if args.no_cuda_graph else None,
    )
    first = next(steps)  # the options are checked here, before anything is printed
    say_seed(args, seed)
    printer = OrderedPrinter(codec, [t for t, _ in rows], args.num_samples)
    try:
        for step in _chain(first, steps):
            clock.tick()
            printer.push([None if tok == eos else tok for tok in step])
    except BaseException:
        print(flush=True)  # an error message must not continue the line of text printed so far
        raise
    printer.finish()
    if args.stats:
        print(clock.summary(len(rows)), file=sys.stderr)
    return 0


def _chain(first: list, rest: Iterator[list]) -> Iterator[list]:
    yield first
    yield from rest


class OrderedPrinter:
    """Streams a batch's rows to stdout one after another: the current row as its tokens arrive; a later row
    is held until the rows before it end, then shown from where it has got to. One row is shown as its prompt
    and its continuation; several get a ``---`` header each."""

    def __init__(self, codec: TextCodec, prompts: list[str], samples: int) -> None:
        self.prompts, self.samples = prompts, samples
        self.streams = [TextStream(codec) for _ in prompts]
        self.pending = [""] * len(prompts)
        self.done = [False] * len(prompts)
        self.current = -1
        self._next_row()

    def push(self, tokens: list[int | None]) -> None:
        """One decoding step: each row's new token, None for a row that has ended."""
        for i, tok in enumerate(tokens):
            if self.done[i]:
                continue
            if tok is None:
                self.done[i] = True
                self.pending[i] += self.streams[i].flush()
            else:
                self.pending[i] += self.streams[i].push(tok)
        self._show()

    def finish(self) -> None:
        for i, done in enumerate(self.done):
            if not done:
                self.done[i] = True
                self.pending[i] += self.streams[i].flush()
        self._show()

    def _show(self) -> None:
        while self.current < len(self.prompts):
            sys.stdout.write(self.pending[self.current])
            self.pending[self.current] = ""
            if not self.done[self.current]:
                break
            sys.stdout.write("\n")
            self._next_row()
        sys.stdout.flush()

    def _next_row(self) -> None:
        self.current += 1
        if self.current >= len(self.prompts):
            return
        prompt = self.prompts[self.current]
        if len(self.prompts) > 1:
            label = repr(prompt if len(prompt) <= 60 else prompt[:57] + "...")
            which = f"sample {self.current % self.samples + 1}/{self.samples} of " if self.samples > 1 else ""
            sys.stdout.write(f"--- {which}{label}\n")
        sys.stdout.write(prompt)


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
