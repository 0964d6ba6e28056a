"""`diffv2 data ...`: prepare a tokenized dataset, show/verify one, and check it for near-duplicate documents."""

from __future__ import annotations

import argparse

from ..config import check_int, check_output_path
from ..data import describe_skipped, prepare_dataset, verify_dataset
from ..errors import ConfigError
from ..train.config import TrainConfig
from .fields import path_arg


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``data prepare`` and ``data info`` on the top-level subparsers."""
    data = subparsers.add_parser("data", help="prepare and inspect tokenized datasets")
    sub = data.add_subparsers(dest="data_command", metavar="{prepare,info,dedup-check}", required=True)

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
    prep.add_argument("--out", required=True, type=path_arg, help="output folder")
    prep.add_argument(
        "--tokenizer",
        default="bpe",
        help="'bpe' (train byte-level BPE), 'byte' (256 bytes + end-of-text), or a tokenizer.json path "
        "(default: %(default)s)",
    )
    prep.add_argument(
        "--vocab-size",
        type=int,
        default=TrainConfig.tokenizer_vocab,
        help="BPE vocabulary size; the same default as `diffv2 train` (default: %(default)s)",
    )
    prep.add_argument(
        "--val-fraction", type=float, default=0.01, help="share of documents for val (default: %(default)s)"
    )
    prep.add_argument(
        "--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default: %(default)s)"
    )
    prep.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: %(default)s)")
    prep.add_argument("--text-field", default="text", help="JSONL key / dataset column holding the text")
    prep.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    prep.add_argument(
        "--drop-val-near-dups",
        type=float,
        default=None,
        metavar="SHARE",
        help="drop a validation document when this share (0-1] or more of its word 13-grams occurs in train "
        "(default: keep every document)",
    )
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=run_prepare)

    info = sub.add_parser("info", help="summarize a prepared dataset and verify its checksums")
    info.add_argument("--data", required=True, type=path_arg, help="dataset folder (holds manifest.json)")
    info.set_defaults(func=run_info)

    dup = sub.add_parser(
        "dedup-check",
        help="count near-duplicate documents (word 13-gram overlap) within train and between val and train",
        description="A document's overlap is the share of its distinct word n-grams found elsewhere: for a "
        "validation document, anywhere in train; for a train document, in another train document.",
    )
    dup.add_argument("--data", required=True, type=path_arg, help="dataset folder (holds manifest.json)")
    dup.add_argument("--ngram", type=int, default=13, help="words per shingle (default: %(default)s)")
    dup.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="overlap share that makes a document a near-duplicate (default: %(default)s)",
    )
    dup.add_argument("--examples", type=int, default=3, help="examples to print per kind (default: %(default)s)")
    dup.add_argument("--json", type=path_arg, default=None, help="also write the full result (every val document)")
    dup.add_argument("--no-progress", action="store_true", help="no progress bar")
    dup.set_defaults(func=run_dedup_check)


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
    if dropped := manifest.get("val_near_duplicates"):
        lines.append(
            f"  near-dups: {dropped['dropped_documents']} val documents ({dropped['dropped_tokens']:,} tokens) "
            f"dropped for >= {dropped['threshold']:g} of their word {dropped['ngram']}-grams in train"
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
        val_near_dup_threshold=args.drop_val_near_dups,
    )
    print(f"prepared {args.out}")
    print("\n".join(_summary(manifest)))
    print(f"  files:     tokenizer.json, manifest.json in {args.out}")
    for line in describe_skipped(manifest):
        print(f"  {line}")
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


def run_dedup_check(args: argparse.Namespace) -> int:
    """Run ``data dedup-check``: print counts and examples of near-duplicate documents; returns the exit code."""
    from ..data.documents import dataset_near_duplicates
    from ..train.setup import write_json

    if args.ngram < 1 or not 0 < args.threshold <= 1:
        raise ConfigError(f"--ngram={args.ngram}, --threshold={args.threshold}: need ngram >= 1, 0 < threshold <= 1")
    check_int("--examples", args.examples, minimum=0, maximum=1 << 20)
    if args.json is not None:
        check_output_path("--json", args.json, folder=False)
    verify_dataset(args.data)  # its shards are read as they are: a corrupted one must not pass as text
    report, train, val = dataset_near_duplicates(
        args.data, ngram=args.ngram, threshold=args.threshold, progress=not args.no_progress
    )
    flagged = report.flagged_val()
    any_overlap = sum(d.shared > 0 for d in report.val_vs_train)
    print(f"near-duplicate check of {args.data} (word {report.ngram}-grams, threshold {report.threshold:g})")
    print(
        f"  val vs train: {len(flagged)} of {report.n_val} val documents have >= {report.threshold:.0%} of "
        f"their {report.ngram}-grams in train; {any_overlap} share at least one"
    )
    print(
        f"  within train: {len(report.within_train)} of {report.n_train} train documents have >= "
        f"{report.threshold:.0%} of their {report.ngram}-grams in another train document"
    )
    for d in sorted(flagged, key=lambda d: -d.overlap)[: args.examples]:
        print(f"  val doc {d.index} ({d.overlap:.0%} in train): {report.passage(val[d.index])!r}")
    for d in sorted(report.within_train, key=lambda d: -d.overlap)[: args.examples]:
        print(
            f"  train doc {d.index} ({d.overlap:.0%} elsewhere in train, most with train doc {d.partner}): "
            f"{report.passage(train[d.index])!r}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(
            args.json,
            {
                "data": str(args.data),
                "ngram": report.ngram,
                "threshold": report.threshold,
                "n_train": report.n_train,
                "n_val": report.n_val,
                "val_near_duplicates": len(flagged),
                "train_near_duplicates": len(report.within_train),
                # a document of fewer than ngram words has no shingles: its overlap is NaN, written as null
                "val": [
                    {"index": d.index, "overlap": d.overlap if d.overlap == d.overlap else None, "shared": d.shared}
                    for d in report.val_vs_train
                ],
                "train": [
                    {"index": d.index, "overlap": d.overlap, "partner": d.partner, "shared": d.shared}
                    for d in report.within_train
                ],
            },
        )
        print(f"  written: {args.json}")
    return 0
