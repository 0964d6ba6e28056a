"""Train the attention variants of a preset one after another with the real trainer and compare speed.

    python bench/train_throughput.py --preset 125m --variants diff_v2,baseline --steps 600 --compile

Each run trains on the embedded corpus (prepared once); the table reports the median tokens/s over the
logging windows after the first 20% of steps (compile warm-up excluded), MFU against the device's bf16 peak
(989 TFLOP/s on H100/H200; FLOPs from ``Transformer.flops_per_token``), peak memory, the final losses and the
measured overhead of the stability diagnostics. Logs land in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from diffv2.data import prepare_dataset
from diffv2.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="125m")
    p.add_argument("--variants", default="diff_v2,baseline")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--diag-every", type=int, default=100)
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "manifest.json").exists():
        prepare_dataset("default", data, tokenizer="bpe", vocab_size=8192, progress=False)
    rows = []
    for variant in args.variants.split(","):
        run_dir = out / f"{args.preset}-{variant}"
        cfg = TrainConfig(
            data=str(data),
            out_dir=str(run_dir),
            preset=args.preset,
            model={"attention": variant},
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            warmup_steps=args.steps // 10,
            compile=args.compile,
            eval_every=args.steps // 2,
            diag_every=args.diag_every,
            save_every=0,
            log_every=20,
            sample_tokens=0,
            tensorboard=False,
        )
        summary = train(cfg, progress=False)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if r["kind"] == "train" and "tokens_per_s" in r and r["step"] > args.steps // 5]
        rows.append(
            {
                "variant": variant,
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
                "mfu": statistics.median(r.get("mfu", float("nan")) for r in timed),
                "peak_mem_gb": max(r.get("peak_mem_gb", 0.0) for r in timed),
                "train_loss": summary["train_loss"],
                "val_loss": summary["val_loss"],
                "diag_overhead": summary["diag_overhead"],
                "loss_spikes": summary["loss_spikes"],
                "grad_spikes": summary["grad_spikes"],
            }
        )
    (out / "throughput.json").write_text(json.dumps(rows, indent=2))
    base = next((r for r in rows if r["variant"] == "baseline"), rows[0])
    print(
        f"preset {args.preset}, batch {args.batch_size} x seq {args.seq_len}, compile={args.compile}, "
        f"{args.steps} steps"
    )
    print(f"{'variant':<10}{'tok/s':>10}{'vs base':>9}{'MFU':>7}{'peak GB':>9}{'train':>8}{'val':>8}{'diag %':>8}")
    for r in rows:
        print(
            f"{r['variant']:<10}{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / base['tokens_per_s']:>9.3f}"
            f"{r['mfu']:>7.1%}{r['peak_mem_gb']:>9.2f}{r['train_loss']:>8.3f}{r['val_loss']:>8.3f}"
            f"{r['diag_overhead']:>8.2%}"
        )


if __name__ == "__main__":
    main()
