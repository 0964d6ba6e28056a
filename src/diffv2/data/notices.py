"""What a prepared dataset should tell its user: files and documents it left out, and a validation split too
small to trust or far from the share asked for."""

from __future__ import annotations

# below this many tokens a validation loss is too noisy to compare runs by (a few hundred windows of 128)
MIN_VAL_TOKENS = 20_000


def split_warnings(splits: dict, val_fraction: float, n_docs: int) -> list[str]:
    """What is off about a train/val split: a validation split too small to measure with, or one far larger
    than ``val_fraction`` because too few documents were there to choose from."""
    if val_fraction == 0:
        return []
    n_val, n_train = splits["val"]["n_tokens"], splits["train"]["n_tokens"]
    share = n_val / max(1, n_val + n_train)
    out = []
    if n_val < MIN_VAL_TOKENS:
        out.append(
            f"the validation split holds {n_val:,} tokens ({splits['val']['n_documents']} of {n_docs} "
            f"documents), too few for a steady validation loss (want >= {MIN_VAL_TOKENS:,}); give more "
            "text or a larger --val-fraction"
        )
    if share > max(3 * val_fraction, 0.05):
        out.append(
            f"the validation split is {share:.0%} of the tokens for val_fraction={val_fraction:g}: with "
            f"{n_docs} documents it takes whole ones; give more (smaller) documents"
        )
    return out


def describe_skipped(manifest: dict) -> list[str]:
    """Lines saying what a prepare left out (files it cannot read, empty documents) and what is off about its
    split; empty when all is well."""
    lines = []
    skipped = manifest.get("skipped") or {}
    files = skipped.get("files") or {}
    if files:
        names = {"hidden": "hidden", "(none)": "without an extension"}
        kinds = ", ".join(f"{n} {names.get(k, k)}" for k, n in files.items())
        lines.append(f"skipped {sum(files.values())} file(s) that are not .txt/.md/.jsonl(.gz): {kinds}")
    if skipped.get("empty_documents"):
        lines.append(f"skipped {skipped['empty_documents']} empty document(s)")
    return lines + [f"warning: {w}" for w in manifest.get("warnings", [])]
