"""Data-parallel scaling of the real trainer: one GPU, then N GPUs with DDP and with FSDP2, same global batch.

    python bench/scaling.py                                   # 350m DIFF V2: 1 GPU vs 2 GPUs (ddp, fsdp)
    python bench/scaling.py --gpus 2 --steps 200 --compile
    python bench/scaling.py --device cpu --preset tiny --tokenizer byte --steps 12 --batch-size 4 --seq-len 64 \\
        --grad-accum 2 --log-every 2                          # smoke test on the CPU (gloo)

Every run trains the same model from the same seed on the same global batch (batch_size x grad_accum sequences
per optimizer step; each of N ranks runs grad_accum / N micro-steps on its slice of one global stream), so the
loss curves must agree up to bf16 noise and the throughput compares like with like. Per run: tokens/s in total
and per GPU (median over the logging windows after the first --warmup-frac of steps), scaling efficiency =
tok/s(N GPUs) / (N x tok/s(1 GPU)), the same against the same parallel code on one rank ("ddp x1": what the
data parallelism itself costs, apart from the per-block compilation it uses), MFU, peak memory per GPU (the
largest rank), and the largest per-step |loss difference| to the 1-GPU run, over all steps and over the first
five (bf16 runs agree closely until a loss spike amplifies their rounding differences). Then a checkpoint
written by the N FSDP ranks at half-way is resumed on one GPU (no process group) and its losses are compared.
Logs and metrics land in --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from diffv2.data import prepare_dataset


def train_cmd(args: argparse.Namespace, data: Path, run_dir: Path, mode: str, gpus: int) -> list[str]:
    """``mode``: "none", "ddp", "fsdp", "ddp-model" (DDP around the whole model compiled as one graph), or
    "fsdp-never" / "fsdp-always" (FSDP2 with that ``fsdp_reshard_after_forward`` policy)."""
    parallel, _, suffix = mode.partition("-")
    scope, reshard = (None, suffix) if parallel == "fsdp" else (suffix, None)
    flags = [
        "train",
        "--data",
        str(data),
        "--out_dir",
        str(run_dir),
        "--parallel",
        parallel,
        "--device",
        args.device,
        "--preset",
        args.preset,
        "--attention",
        args.attention,
        "--steps",
        str(args.steps),
        "--batch_size",
        str(args.batch_size),
        "--grad_accum",
        str(args.grad_accum),
        "--seq_len",
        str(args.seq_len),
        "--lr",
        str(args.lr),
        "--warmup_steps",
        str(max(1, round(args.steps * args.lr_warmup_frac))),
        "--eval_every",
        str(args.steps),
        "--eval_batches",
        "8",
        "--diag_every",
        "0",
        "--save_every",
        str(args.steps // 2),
        "--log_every",
        str(args.log_every),
        "--sample_tokens",
        "0",
        "--no-tensorboard",
        "--no-progress",
    ]
    flags += ["--compile"] if args.compile else []
    flags += ["--compile_scope", scope] if scope else []
    flags += ["--fsdp_reshard_after_forward", reshard] if reshard else []
    flags += ["--activation_checkpointing"] if args.activation_checkpointing else []
    flags += ["--no-fsdp_bf16_params"] if args.fsdp_fp32_params else []
    # a torch.profiler trace of a few steps per rank (RUN/profile/rank<r>.txt): where a slow run spends its time.
    # Two steps clear of the mid-run checkpoint (saved after step steps // 2), whose file writes on rank 0 may
    # leave the ranks out of step
    flags += ["--profile_steps", str(args.profile_steps), "--profile_start", str(args.steps // 2 + 2)]
    if parallel == "none":
        return [sys.executable, "-m", "diffv2", *flags]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={gpus}",
        "-m",
        "diffv2",
        *flags,
    ]


def launch(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with log.open("w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"failed; see {log}:\n" + "".join(log.read_text().splitlines(keepends=True)[-40:]))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarize(
    name: str, gpus: int, run_dir: Path, warmup_frac: float, ref: dict | None, same_code: dict | None = None
) -> dict:
    records = metrics(run_dir)
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    timed = [r for s, r in train.items() if "tokens_per_s" in r and s > warmup_frac * max(train)]
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    row = {
        "run": name,
        "gpus": gpus,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "tokens_per_s_per_gpu": statistics.median(r["tokens_per_s_per_device"] for r in timed),
        "mfu": statistics.median(r.get("mfu", float("nan")) for r in timed),
        "peak_mem_gb_per_gpu": max(r.get("peak_mem_gb", 0.0) for r in timed),
        "final_loss": train[max(train)]["loss"],
        "val_loss": evals[-1] if evals else float("nan"),
        "losses": {s: r["loss"] for s, r in train.items()},
    }
    if ref is not None:
        common = [s for s in row["losses"] if s in ref["losses"]]
        row["max_abs_dloss"] = max(abs(row["losses"][s] - ref["losses"][s]) for s in common)
        row["max_abs_dloss_first5"] = max(abs(row["losses"][s] - ref["losses"][s]) for s in common if s <= 5)
    if ref is not None and gpus > 1:
        row["scaling_efficiency"] = row["tokens_per_s"] / (gpus * ref["tokens_per_s"])
    if same_code is not None and gpus > 1:
        row["scaling_same_code"] = row["tokens_per_s"] / (gpus * same_code["tokens_per_s"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="350m")
    p.add_argument("--attention", default="diff_v2")
    p.add_argument("--gpus", type=int, default=2, help="ranks of the distributed runs")
    p.add_argument(
        "--modes",
        default="ddp,fsdp",
        help="ddp, fsdp, ddp-model (DDP around one whole-model graph), fsdp-never (ZeRO-2), fsdp-always",
    )
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-step and rank")
    p.add_argument("--grad-accum", type=int, default=8, help="micro-steps per optimizer step, all ranks together")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup-frac", type=float, default=0.25, help="learning-rate warm-up, a fraction of --steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--warmup-frac", type=float, default=0.2, help="leading fraction of steps left out of speed")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--profile-steps", type=int, default=0, help="profile this many steps at half-way, per rank")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument(
        "--fsdp-fp32-params",
        action="store_true",
        help="FSDP2 with fp32 parameters under bf16 autocast (the 1-GPU and DDP numerics)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--tokenizer", default="bpe")
    p.add_argument(
        "--one-rank",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run each mode on one rank (the same code as N ranks, for a like-with-like efficiency)",
    )
    p.add_argument("--reuse", action="store_true", help="keep runs already finished in --out (same arguments!)")
    p.add_argument("--out", default="runs/scaling")
    args = p.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "manifest.json").exists():
        prepare_dataset("default", data, tokenizer=args.tokenizer, vocab_size=8192, progress=False)
    runs = [("1 GPU", "none", 1)]
    for mode in args.modes.split(","):
        runs += [(f"{mode} x1", mode, 1)] if args.one_rank and args.gpus > 1 else []
        runs += [(f"{mode} x{args.gpus}", mode, args.gpus)]
    rows: list[dict] = []
    for name, parallel, gpus in runs:
        run_dir = out / name.replace(" ", "")
        if not (args.reuse and (run_dir / "summary.json").exists()):
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            launch(train_cmd(args, data, run_dir, parallel, gpus), out / f"{run_dir.name}.log")
        same_code = next((r for r in rows if r["run"] == f"{parallel} x1"), None)
        rows.append(summarize(name, gpus, run_dir, args.warmup_frac, rows[0] if rows else None, same_code))
        keep = parallel == "fsdp" and gpus > 1  # a 350m checkpoint with optimizer state is ~4 GB; only fsdp's is reused
        if not keep:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if "fsdp" in args.modes.split(","):  # a checkpoint of N sharded ranks, resumed by one process
        src, resumed = out / f"fsdpx{args.gpus}", out / "resumed"
        shutil.rmtree(resumed, ignore_errors=True)
        shutil.copytree(src, resumed, ignore=shutil.ignore_patterns(f"step_{args.steps:08d}", "latest", "profile"))
        launch([*train_cmd(args, data, resumed, "none", 1), "--resume"], out / "resumed.log")
        rows.append(summarize(f"fsdp x{args.gpus} -> 1", 1, resumed, 0.5, rows[0]))
        for run_dir in (src, resumed):
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (out / "scaling.json").write_text(json.dumps(rows, indent=2))
    print(
        f"\n{args.preset} {args.attention}: global batch {args.batch_size} x {args.grad_accum} x {args.seq_len} "
        f"tokens, {args.steps} steps, compile={args.compile}, AC={args.activation_checkpointing}"
    )
    print(
        f"{'run':<14}{'tok/s':>10}{'tok/s/GPU':>11}{'scaling':>9}{'same code':>10}{'MFU':>7}{'peak GB/GPU':>13}"
        f"{'loss':>8}{'val':>8}{'max|Δloss|':>12}{'steps 1-5':>11}"
    )
    for r in rows:
        scaling = f"{r['scaling_efficiency']:.1%}" if "scaling_efficiency" in r else "-"
        same = f"{r['scaling_same_code']:.1%}" if "scaling_same_code" in r else "-"
        print(
            f"{r['run']:<14}{r['tokens_per_s']:>10.0f}{r['tokens_per_s_per_gpu']:>11.0f}{scaling:>9}{same:>10}"
            f"{r['mfu']:>7.1%}{r['peak_mem_gb_per_gpu']:>13.2f}{r['final_loss']:>8.4f}{r['val_loss']:>8.4f}"
            f"{r.get('max_abs_dloss', 0.0):>12.2e}{r.get('max_abs_dloss_first5', 0.0):>11.2e}"
        )


if __name__ == "__main__":
    main()
