"""`diffv2 data ...`: prepare a tokenized dataset, and show/verify one."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import prepare_dataset, verify_dataset


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``data prepare`` and ``data info`` on the top-level subparsers."""
    data = subparsers.add_parser("data", help="prepare and inspect tokenized datasets")
    sub = data.add_subparsers(dest="data_command", metavar="{prepare,info}", required=True)

    prep = sub.add_parser(
        "prepare",
        help="tokenize a text source into train/val shards",
        description="Tokenize a text source into OUT/{train,val}_NNNNNN.bin, tokenizer.json, manifest.json.",
    )
    prep.add_argument(
        "--source",
        default="default",
        help="'default' (the embedded King James Bible), a .txt/.md/.jsonl(.gz) file, a folder of them, "
        "or a `datasets` save_to_disk folder (default: %(default)s)",
    )
    prep.add_argument("--out", required=True, type=Path, help="output folder")
    prep.add_argument(
        "--tokenizer",
        default="bpe",
        help="'bpe' (train byte-level BPE), 'byte' (256 bytes + end-of-text), or a tokenizer.json path "
        "(default: %(default)s)",
    )
    prep.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: %(default)s)")
    prep.add_argument(
        "--val-fraction", type=float, default=0.01, help="share of documents for val (default: %(default)s)"
    )
    prep.add_argument(
        "--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default: %(default)s)"
    )
    prep.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: %(default)s)")
    prep.add_argument("--text-field", default="text", help="JSONL key / dataset column holding the text")
    prep.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=run_prepare)

    info = sub.add_parser("info", help="summarize a prepared dataset and verify its checksums")
    info.add_argument("--data", required=True, type=Path, help="dataset folder (holds manifest.json)")
    info.set_defaults(func=run_info)


def _summary(manifest: dict) -> list[str]:
    lines = [
        f"  source:    {manifest['source'].get('resolved', manifest['source'].get('given'))}",
        f"  tokenizer: {manifest['tokenizer_kind']}, vocab {manifest['vocab_size']}, "
        f"end-of-text id {manifest['eot_id']}",
    ]
    for split, info in manifest["splits"].items():
        files = ", ".join(s["file"] for s in info["shards"]) or "(none)"
        lines.append(
            f"  {split + ':':<10} {info['n_tokens']:,} tokens, {info['n_documents']:,} documents, "
            f"{len(info['shards'])} shard(s): {files}"
        )
    return lines


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``data prepare``; returns the exit code."""
    manifest = prepare_dataset(
        args.source,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        seed=args.seed,
        text_field=args.text_field,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(f"prepared {args.out}")
    print("\n".join(_summary(manifest)))
    print(f"  files:     tokenizer.json, manifest.json in {args.out}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Run ``data info``: print the manifest summary and verify every checksum; returns the exit code."""
    manifest = verify_dataset(args.data)
    print(
        f"dataset {args.data} (created {manifest.get('created_at', '?')}, diffv2 {manifest.get('diffv2_version', '?')})"
    )
    print("\n".join(_summary(manifest)))
    print(f"  checksums: OK ({sum(len(s['shards']) for s in manifest['splits'].values())} shards, tokenizer)")
    return 0
