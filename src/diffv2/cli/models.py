"""``diffv2 models``: every variant of the comparison grid for a preset, side by side: parameters by component
and training FLOPs per token, counted on the meta device (instant at any size); ``--check`` also runs one
forward/backward pass of each on the CPU."""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from ..compare.grid import OPT_IN, VARIANTS
from ..config import PRESETS, ModelConfig, check_positive_int
from ..errors import ConfigError
from ..model import Transformer


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the comparison variants of a preset: parameters, FLOPs (and a fwd/bwd check)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="(default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=32768, help="(default: %(default)s)")
    p.add_argument(
        "--n-kv-heads",
        type=int,
        default=None,
        help="override the preset's KV heads (the 1.5h baseline needs them to divide 1.5·n_heads)",
    )
    p.add_argument(
        "--seq-len", type=int, default=256, help="sequence length for FLOPs and --check (default: %(default)s)"
    )
    p.add_argument("--check", action="store_true", help="also run one forward/backward pass of each on the CPU (slow)")
    p.add_argument("--batch-size", type=int, default=2, help="--check: rows (default: %(default)s)")
    p.set_defaults(func=run)


def variants(cfg: ModelConfig) -> dict[str, ModelConfig | str]:
    """Every variant of the comparison grid (:data:`diffv2.compare.grid.VARIANTS`) derived from the DIFF V2
    model ``cfg``, or why it cannot be built at this shape."""
    out: dict[str, ModelConfig | str] = {}
    for name, (_, derive) in VARIANTS.items():
        try:
            out[name] = derive(cfg)
        except ConfigError as err:
            out[name] = str(err)
    return out


def run(args: argparse.Namespace) -> int:
    check_positive_int("--seq-len", args.seq_len, 1 << 24)  # FLOPs are counted for it, and --check runs it
    check_positive_int("--batch-size", args.batch_size, 1 << 16)
    overrides = {"n_kv_heads": args.n_kv_heads} if args.n_kv_heads is not None else {}
    base = ModelConfig.preset(args.preset, vocab_size=args.vocab_size, attention="diff_v2", **overrides)
    t = min(args.seq_len, base.max_seq_len)
    header = f"{'variant':<22}{'total':>14}{'attention':>13}{'mlp':>13}{'ffn_hidden':>11}{'GFLOP/token':>12}"
    if args.check:
        header += f"{'loss':>8}{'fwd+bwd ms':>11}"
    print(
        f"preset {args.preset}: d_model={base.d_model} n_layers={base.n_layers} h={base.n_heads} "
        f"h_kv={base.n_kv_heads} head_dim={base.head_dim} vocab={base.vocab_size} seq_len={t}"
    )
    print(header)
    notes = []
    built = variants(base)
    for name, cfg in tqdm(built.items(), disable=not args.check, desc="fwd/bwd", leave=False):
        label = name + ("*" if name in OPT_IN else "")
        if isinstance(cfg, str):
            tqdm.write(f"{label:<22}{'cannot be built at this shape (see below)':>40}")
            notes.append(f"{name}: {cfg}")
            continue
        with torch.device("cpu" if args.check else "meta"):
            torch.manual_seed(0)
            model = Transformer(cfg)
        n = model.num_params()
        line = (
            f"{label:<22}{n['total']:>14,}{n['attention']:>13,}{n['mlp']:>13,}{cfg.ffn_hidden:>11,}"
            f"{model.flops_per_token(t) / 1e9:>12.3f}"
        )
        if args.check:
            tokens = torch.randint(
                0, cfg.vocab_size, (args.batch_size, t + 1), generator=torch.Generator().manual_seed(0)
            )
            start = time.perf_counter()
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            line += f"{loss.item():>8.3f}{(time.perf_counter() - start) * 1e3:>11.1f}"
        tqdm.write(line)
    print("* a control, run only when a compare grid names it")
    for note in notes:
        print(note)
    return 0
