#!/bin/bash
# One device call (<= 10 min) on nvidia-h200-x2: data-parallel scaling of the 350m DIFF V2 trainer under
# torch.compile (bench/scaling.py): 1 GPU vs DDP (per-block and whole-model graphs) and FSDP2 on two GPUs
# (--one-rank adds each mode on one rank), with a two-step profile per rank. Extra arguments go to bench/scaling.py (e.g. --batch-size 16 --grad-accum 4); environment variables
# (e.g. TORCH_NCCL_HIGH_PRIORITY=1) pass through. Usage on the GPU machine: bash scripts/gpu/scaling.sh [ARGS].
# The table lands in $OUT/scaling.log; metrics and both ranks' profile tables in $OUT/scaling_runs.tgz.
source scripts/gpu/setup.sh
export PYTHONUNBUFFERED=1
# defaults (later arguments override): micro-batches of 16 x 1024 (8 left the GPU waiting on Python: see
# docs/benchmarks.md#scaling), DDP with per-block graphs and around one whole-model graph, and FSDP2
timeout 570 python3 bench/scaling.py --gpus 2 --compile --profile-steps 2 --steps 30 --log-every 5 --out /tmp/sc \
  --batch-size 16 --grad-accum 4 --modes ddp-model,fsdp,fsdp-never --no-one-rank "$@" > "$OUT/scaling.log" 2>&1
echo "scaling exit $?" >> "$OUT/scaling.log"
# every run's metrics and both ranks' profile tables (a collective that waits shows up on the rank that arrived
# first), in one archive: what comes back from $OUT is limited to 8 files
(cd /tmp/sc && tar czf "$OUT/scaling_runs.tgz" scaling.json */metrics.jsonl */profile/rank*.txt 2>/dev/null)
tail -n 14 "$OUT/scaling.log"
