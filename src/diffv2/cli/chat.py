"""``diffv2 generate --chat``: a conversation on the console, one line per user turn, replies streamed.

The prompt is the tokenizer's chat template when it has one, else the plain template of
:func:`diffv2.generate.plain_chat_text` (``User: ...`` / ``Assistant:`` turns separated by blank lines), where a
reply also ends where the model starts the next ``User:`` turn itself. When the conversation outgrows the
model's context, the oldest turns are left out of the prompt. End of input (Ctrl-D) ends the chat.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from ..generate import PLAIN_CHAT_ROLES, TextCodec, TextStream, stream_batch
from ..model import Transformer


def chat(model: Transformer, codec: TextCodec, args: argparse.Namespace, sampling: dict, seed: int) -> int:
    system = [{"role": "system", "content": args.system}] if args.system else []
    turns: list[dict[str, str]] = []
    stop = [] if codec.chat_template else [f"\n{PLAIN_CHAT_ROLES['user']}:"]
    eos = None if args.no_stop else codec.eos_id
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: one line per turn; Ctrl-D ends it", file=sys.stderr)
    for turn in range(1_000_000):
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        if not line.strip():
            continue
        turns.append({"role": "user", "content": line})
        prompt = _fit(codec, system, turns, model.cfg.max_seq_len - args.max_new_tokens)
        if prompt is None:
            turns.pop()
            print(
                f"(that message does not fit the model's context of {model.cfg.max_seq_len} tokens with "
                f"--max-new-tokens {args.max_new_tokens})",
                file=sys.stderr,
            )
            continue
        text = TextStream(codec, stop)
        reply = []
        for (tok,) in stream_batch(model, [prompt], args.max_new_tokens, **sampling, eos_id=eos, seed=seed + turn):
            if tok is None or tok == eos:
                break
            piece = text.push(tok)
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
            if text.stopped:
                break
        tail = text.flush()
        reply.append(tail)
        print(tail, flush=True)
        turns.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0


def _fit(codec: TextCodec, system: list[dict], turns: list[dict], budget: int) -> list[int] | None:
    """The prompt of the conversation, leaving out its oldest turns until it fits ``budget`` tokens (None when
    even the last message alone does not)."""
    if budget < 1:
        raise ConfigError(f"--max-new-tokens leaves no room for a prompt in the model's context ({budget} tokens)")
    for start in range(len(turns)):
        if turns[start]["role"] != "user":
            continue
        ids = codec.chat_prompt(system + turns[start:])
        if len(ids) <= budget:
            return ids
    return None
