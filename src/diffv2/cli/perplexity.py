"""``diffv2 perplexity FILE...``: score any text file with a checkpoint, no lm-eval needed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checkpoint import pick_device
from ..config import check_positive_int, read_text_file
from ..errors import ConfigError, DataError
from .fields import path_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "perplexity",
        help="loss, perplexity and bits per byte of text files under a checkpoint",
        description="Score text files in overlapping windows: every token once, with at least "
        "window - stride tokens of context (the first window's tokens with what precedes them).",
    )
    p.add_argument("files", nargs="+", type=path_arg, help="UTF-8 text files; each is scored as one text")
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir or HF folder")
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="tokens of context per forward (default: the run's training seq_len, else max_seq_len)",
    )
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window / 2)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.perplexity import perplexity
    from ..generate import TextCodec
    from .serve import load_for_serving

    for name in ("window", "stride"):
        if getattr(args, name) is not None:
            check_positive_int(f"--{name}", getattr(args, name), 1 << 24)
    device = pick_device(args.device)
    texts = {str(path): read_text_file("file", path, error=DataError) for path in args.files}
    model, tokenizer = load_for_serving(args.checkpoint, device, None)
    if tokenizer is None:
        raise ConfigError(f"--checkpoint {args.checkpoint}: holds no tokenizer, so it cannot read text")
    codec = TextCodec(tokenizer)
    window = args.window or min(model.cfg.max_seq_len, _trained_length(Path(args.checkpoint)) or 1 << 30)
    stride = args.stride or max(1, window // 2)
    results = {}
    for name, text in texts.items():
        results[name] = perplexity(model, codec.encode(text), len(text.encode("utf-8")), window=window, stride=stride)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for name, r in results.items():
        print(
            f"{name}: {r['tokens_scored']:,} tokens, loss {r['loss']:.4f} nats/token, perplexity "
            f"{r['perplexity']:.2f}, {r['bits_per_byte']:.4f} bits/byte (window {window}, stride {stride})"
        )
    return 0


def _trained_length(path: Path) -> int | None:
    """The training ``seq_len`` a native run recorded, if any (the model is best within it)."""
    for config in (path / "config.json", path.parent.parent / "config.json"):
        try:
            return int(json.loads(config.read_text(encoding="utf-8"))["train"]["seq_len"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None
