"""``diffv2 models``: build the variants of a preset side by side, print their parameters, FLOPs and a
forward/backward check."""

from __future__ import annotations

import argparse
import time

import torch

from ..config import PRESETS, ModelConfig, check_positive_int
from ..model import Transformer
from ..sizing import baseline_1p5h, baseline_ffn_matched


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="compare the attention variants of a preset (parameters, FLOPs, fwd/bwd)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=256, help="sequence length for FLOPs and the fwd/bwd check")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--no-run", action="store_true", help="only count (builds on the meta device)")
    p.set_defaults(func=run)


def variants(cfg: ModelConfig) -> dict[str, ModelConfig]:
    """The comparison grid of spec §6 Q1: DIFF V2, its ablations, DIFF V1 and two matched baselines."""
    out = {
        "baseline (same h)": cfg.replace(attention="baseline"),
        "baseline (FFN-matched)": baseline_ffn_matched(cfg),
        "diff_v1": cfg.replace(attention="diff_v1"),
        "diff_v2": cfg.replace(attention="diff_v2"),
    }
    try:
        out["baseline (1.5h heads)"] = baseline_1p5h(cfg)
    except ValueError as err:
        print(f"(skipping the 1.5h-head baseline: {err})")
    return out


def run(args: argparse.Namespace) -> int:
    check_positive_int("--seq-len", args.seq_len)
    check_positive_int("--batch-size", args.batch_size, 1 << 16)
    base = ModelConfig.preset(args.preset, vocab_size=args.vocab_size)
    t = min(args.seq_len, base.max_seq_len)
    header = f"{'variant':<24}{'total':>14}{'attention':>14}{'mlp':>14}{'GFLOP/token':>13}"
    if not args.no_run:
        header += f"{'loss':>9}{'fwd+bwd ms':>12}"
    print(
        f"preset {args.preset}: d_model={base.d_model} n_layers={base.n_layers} h={base.n_heads} "
        f"h_kv={base.n_kv_heads} head_dim={base.head_dim} seq_len={t}"
    )
    print(header)
    for name, cfg in variants(base).items():
        with torch.device("meta" if args.no_run else "cpu"):
            torch.manual_seed(0)
            model = Transformer(cfg)
        n = model.num_params()
        line = f"{name:<24}{n['total']:>14,}{n['attention']:>14,}{n['mlp']:>14,}{model.flops_per_token(t) / 1e9:>13.3f}"
        if not args.no_run:
            tokens = torch.randint(
                0, cfg.vocab_size, (args.batch_size, t + 1), generator=torch.Generator().manual_seed(0)
            )
            start = time.perf_counter()
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            line += f"{loss.item():>9.3f}{(time.perf_counter() - start) * 1e3:>12.1f}"
        print(line)
    return 0
