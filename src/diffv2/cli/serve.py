"""``diffv2 serve``: an OpenAI-compatible HTTP server over a checkpoint, with continuous batching.

    diffv2 serve --checkpoint runs/v2                         # http://127.0.0.1:8000/v1
    diffv2 serve --checkpoint hf/v2 --port 9000 --max-batch 32 --api-key "$KEY"

Needs the ``serve`` extra (fastapi, uvicorn, pydantic, prometheus-client); an HF folder also needs ``hf``.
Imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..config import check_int, check_positive_int, check_seed, check_str
from ..errors import CheckpointError, DiffV2Error
from .fields import add_kv_cache_dtype_flag


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching)")
    p.add_argument("--checkpoint", required=True, help="run dir (its latest checkpoint), checkpoint dir or HF folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 for every interface (%(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument(
        "--max-batch", type=int, default=64, help="rows of the KV cache: sequences decoded together (%(default)s)"
    )
    p.add_argument(
        "--max-queue", type=int, default=256, help="sequences waiting for a row; beyond that, HTTP 429 (%(default)s)"
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prompt tokens prefilled between two decode steps; longer prompts take turns (%(default)s)",
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="tokens per sequence, prompt included (default: the model's max_seq_len)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("DIFFV2_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $DIFFV2_API_KEY, else none)",
    )
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on the CPU (default: %(default)s)",
    )
    p.add_argument("--no-cuda-graph", action="store_true", help="CUDA: run decode steps eagerly (no graph capture)")
    add_kv_cache_dtype_flag(p)
    p.add_argument("--seed", type=int, default=None, help="seed of the generator shared by requests without one")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="(default: %(default)s)",
    )
    p.set_defaults(func=run)


def _is_hf_folder(path: Path) -> bool:
    file = path / "config.json"
    try:  # a regular file only: a FIFO would block the read
        return file.is_file() and json.loads(file.read_text(encoding="utf-8")).get("model_type") == "diffv2"
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def load_for_serving(path: str, device, dtype):
    """(model in eval mode on ``device``, tokenizer or None) of a native checkpoint or an HF folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"--checkpoint {path}: no such folder")
    if _is_hf_folder(folder):
        try:
            from ..hf import load_hf_native, read_hf_config, read_hf_tokenizer
        except ImportError as e:
            raise DiffV2Error(f"serving an HF folder needs transformers: pip install 'diffv2[hf]' ({e})") from None
        cfg = read_hf_config(folder)  # the config first, then the tokenizer: both fail before the weights load
        tokenizer = read_hf_tokenizer(folder, cfg.vocab_size)
        return load_hf_native(folder, cfg).to(device, dtype=dtype).eval(), tokenizer
    from ..checkpoint import load_pretrained

    loaded = load_pretrained(folder, device=device, dtype=dtype)
    return loaded.model, loaded.tokenizer


def run(args: argparse.Namespace) -> int:
    import torch

    try:
        from ..serve import Scheduler, TextCodec, bind_socket, create_app, run_forever
    except ImportError as e:
        raise DiffV2Error(f"serve needs the serve extra: pip install 'diffv2[serve]' ({e})") from None
    from ..checkpoint import pick_device

    for name, maximum in (("max_batch", 1 << 16), ("max_queue", 1 << 24), ("prefill_chunk", 1 << 24)):
        check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name), maximum)
    check_int("--port", args.port, maximum=65535)
    if args.seed is not None:
        check_seed("--seed", args.seed)
    if args.model_name is not None:
        check_str("--model-name", args.model_name, empty=False)
    sock = bind_socket(args.host, args.port)  # before the model loads: a bad address fails at once
    device = pick_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tokenizer = load_for_serving(args.checkpoint, device, dtype)
    if args.max_len is not None and not 2 <= args.max_len <= model.cfg.max_seq_len:
        raise DiffV2Error(f"--max-len={args.max_len}: must lie in [2, max_seq_len={model.cfg.max_seq_len}]")
    scheduler = Scheduler(
        model,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        max_len=args.max_len,
        cuda_graph=False if args.no_cuda_graph else None,
        seed=args.seed,
        kv_cache_dtype=args.kv_cache_dtype,
    ).start()
    name = args.model_name or Path(args.checkpoint).resolve().name
    app = create_app(
        scheduler, TextCodec(tokenizer) if tokenizer is not None else None, model_name=name, api_key=args.api_key
    )
    print(
        f"diffv2 serve: '{name}' on {device} ({dtype}), {args.max_batch} rows of {scheduler.max_len} tokens; "
        f"OpenAI API at http://{f'[{args.host}]' if ':' in args.host else args.host}:{sock.getsockname()[1]}/v1"
    )
    try:
        run_forever(app, sock, log_level=args.log_level)
    finally:
        scheduler.close()
    return 0
