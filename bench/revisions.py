"""The same benchmark on two source trees in one run: is a change speed-neutral?

    git archive BASE_COMMIT src bench | tar x -C .bench-base     # the revision to compare against
    python bench/revisions.py --base .bench-base --variants baseline,diff_v2 -- \
        train.py --modes compile --shapes 1b --seqs 4096
    python bench/revisions.py --base .bench-base --variants baseline,diff_v2 -- \
        decode.py --batches 1,64 --contexts 1024,32768 --paths static

Each variant runs in its own process, the base tree's and this tree's alternately (base, this, base, this, ...),
so drift of the card (clocks, temperature) spreads over both. The benchmark scripts print one JSON line per
point; this pairs the points of the two trees and prints this tree's throughput over the base's. The raw lines
go to ``--out`` (default $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEY_FIELDS = ("shape", "seq", "mode", "variant", "path", "batch", "context")
THROUGHPUT_FIELDS = ("tokens_per_s", "tok_s")


def run_tree(tree: Path, script: str, args: list[str], out: Path, budget_s: float) -> list[dict]:
    """Run ``tree/bench/script args`` with ``tree/src`` first on the path; the JSON points it printed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(tree / "bench" / script), *args, "--out", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(budget_s, 1))
        stdout, note = done.stdout, "" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[-400:]}"
    except subprocess.TimeoutExpired as err:
        stdout, note = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else err.stdout or "", "timeout"
    (out / "stdout.log").write_text(stdout + ("\n" + note if note else ""), encoding="utf-8")
    if note:
        print(f"  {tree.name or tree}: {note.splitlines()[0] if note else ''}", flush=True)
    points = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                points.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return points


def key(point: dict) -> tuple:
    return tuple((f, point[f]) for f in KEY_FIELDS if f in point)


def throughput(point: dict) -> float | None:
    return next((point[f] for f in THROUGHPUT_FIELDS if f in point), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, type=Path, help="a source tree with src/ and bench/ to compare against")
    p.add_argument("--variants", required=True, help="comma-separated; each runs as its own pair of processes")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock limit for all runs together")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument("bench", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS...: a script under bench/ and its flags")
    args = p.parse_args()
    bench = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    if not bench:
        p.error("name the benchmark after --, e.g. -- train.py --shapes 1b")
    script, flags = bench[0], bench[1:]
    trees = {"base": args.base.resolve(), "this": HERE.parent}
    start = time.monotonic()
    points: dict[str, list[dict]] = {"base": [], "this": []}
    for variant in args.variants.split(","):
        for name, tree in trees.items():
            left = args.budget_s - (time.monotonic() - start)
            if left < 10:
                print(f"  out of time before {name} {variant}", flush=True)
                continue
            got = run_tree(tree, script, [*flags, "--variants", variant], args.out / name / variant, left)
            points[name] += got
            print(f"  {name:<4} {variant:<14} {len(got)} points, {time.monotonic() - start:.0f} s", flush=True)
    base = {key(pt): pt for pt in points["base"] if throughput(pt)}
    rows = [(pt, base.get(key(pt))) for pt in points["this"] if throughput(pt)]
    (args.out / "revisions.json").write_text(json.dumps(points, indent=1), encoding="utf-8")
    print(f"\n{script}: this tree's throughput / the base tree's ({args.base})")
    for pt, b in rows:
        label = "  ".join(f"{f}={v}" for f, v in key(pt))
        ratio = f"{throughput(pt) / throughput(b):.3f}" if b else "no base point"
        print(f"{label:<60} base {throughput(b) if b else float('nan'):>10.1f}  this {throughput(pt):>10.1f}  {ratio}")


if __name__ == "__main__":
    main()
