"""``diffv2 inspect``: draw one head's attention maps (and DIFF's a¹, a², a¹ − σ(λ)·a²) for a prompt."""

from __future__ import annotations

import argparse
import json

import torch

from ..config import check_text
from ..errors import ConfigError, DataError
from .fields import path_arg

# Genesis 1:1-2 (King James Version, public domain): about 30 BPE tokens of plain prose
DEFAULT_PROMPT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep."
)
MIN_DEFAULT_TOKENS = 16


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="draw a trained model's attention maps and context RMS for a prompt")
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_DIR",
        help="a run folder (its latest checkpoint) or one checkpoint folder",
    )
    p.add_argument(
        "--prompt",
        default=None,
        help="text to run (default: the run's sample_prompt when it has 16 tokens or more, else a "
        "two-verse passage of Genesis)",
    )
    p.add_argument("--layer", type=int, default=-1, help="layer to draw; negative counts from the end (default: last)")
    p.add_argument("--head", type=int, default=0, help="output head to draw (DIFF V1: differential head; default: 0)")
    p.add_argument("--out", type=path_arg, default=None, help="output folder (default: RUN_DIR/inspect/STEP)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_pretrained
    from ..compare.maps import capture_maps

    try:
        from ..compare import inspect_plots as plots
    except ImportError:
        raise ConfigError("diffv2 inspect draws with matplotlib: pip install 'diffv2[plots]'") from None
    trained = load_pretrained(args.checkpoint, backend="eager")
    if trained.tokenizer is None:
        raise DataError(f"{trained.checkpoint}: holds no tokenizer.json, so a text prompt cannot be encoded")
    prompt = args.prompt
    if prompt is None:  # a map over a handful of tokens shows little: a longer default
        prompt = trained.config.get("train", {}).get("sample_prompt", "")
        if len(trained.tokenizer.encode(prompt)) < MIN_DEFAULT_TOKENS:
            prompt = DEFAULT_PROMPT
    check_text("--prompt", prompt)
    ids = trained.tokenizer.encode(prompt)[: trained.model.cfg.max_seq_len]
    if not ids:
        raise ConfigError("--prompt: encodes to no tokens; give some text")
    maps = capture_maps(trained.model, torch.tensor([ids]))
    n_layers = len(maps)
    layer = args.layer + n_layers if args.layer < 0 else args.layer
    if not 0 <= layer < n_layers:
        raise ConfigError(f"--layer {args.layer}: the model has {n_layers} layers (0..{n_layers - 1})")
    n_heads = maps[layer].effective.shape[0]
    if not 0 <= args.head < n_heads:
        raise ConfigError(f"--head {args.head}: layer {layer} has {n_heads} heads (0..{n_heads - 1})")

    # beside the run, never inside a checkpoint folder (those are replaced and pruned as training goes on)
    out = args.out or trained.checkpoint.parent.parent / "inspect" / trained.checkpoint.name
    out.mkdir(parents=True, exist_ok=True)
    labels = plots.token_labels([trained.tokenizer.decode([i]) for i in ids])
    cfg = trained.model.cfg
    name = f"{cfg.attention}" + (f" ({cfg.pairing}, λ {cfg.lambda_mode})" if cfg.attention == "diff_v2" else "")
    step = trained.checkpoint.name
    paths = [
        plots.attention_figure(
            maps[layer],
            layer,
            args.head,
            labels,
            out / f"attention_L{layer}_H{args.head}.png",
            f"{name}, {step}, layer {layer}, head {args.head}",
        ),
        plots.context_rms_figure(maps, out / "context_rms.png", f"Context RMS per layer on the prompt, {name}, {step}"),
    ]
    if maps[layer].kind == "diff_v2":
        paths.append(plots.sigma_figure(maps[layer], layer, labels, out / f"sigma_lambda_L{layer}.png"))
    summary = {
        "checkpoint": str(trained.checkpoint),
        "prompt": prompt,
        "tokens": len(ids),
        "layer": layer,
        "head": args.head,
        "context_rms": [m.stats["context_rms"] for m in maps],
        "sink_mass": [m.stats.get("sink_mass") for m in maps],
        "max_logit": [m.stats.get("max_logit") for m in maps],
        "sigma_lambda": maps[layer].weight.tolist() if maps[layer].weight is not None else None,
    }
    (out / "inspect.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    for path in paths:
        print(path)
    print(out / "inspect.json")
    return 0
