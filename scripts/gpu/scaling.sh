#!/bin/bash
# One device call (<= 10 min) on nvidia-h200-x2: data-parallel scaling of the 350m DIFF V2 trainer under
# torch.compile, 1 GPU vs DDP and FSDP2 on one rank and on two (bench/scaling.py), with a two-step profile per
# rank. Extra arguments go to bench/scaling.py (e.g. --batch-size 16 --grad-accum 4); environment variables
# (e.g. TORCH_NCCL_HIGH_PRIORITY=1) pass through. Usage on the GPU machine: bash scripts/gpu/scaling.sh [ARGS].
# The table, both ranks' profile tables and the metrics land in $OUT.
source scripts/gpu/setup.sh
export PYTHONUNBUFFERED=1
timeout 570 python3 bench/scaling.py --gpus 2 --compile --profile-steps 2 --steps 30 --log-every 5 --out /tmp/sc "$@" \
  > "$OUT/scaling.log" 2>&1
echo "scaling exit $?" >> "$OUT/scaling.log"
# both ranks' profile tables: a collective that waits shows up on the rank that arrived first
cp /tmp/sc/1GPU/profile/rank0.txt "$OUT/prof_1GPU.txt" 2>/dev/null
for r in ddpx2 fsdpx2; do for k in 0 1; do cp /tmp/sc/$r/profile/rank$k.txt "$OUT/prof_${r}_rank$k.txt" 2>/dev/null; done; done
(cd /tmp/sc && tar czf "$OUT/metrics.tgz" scaling.json */metrics.jsonl 2>/dev/null)
tail -n 14 "$OUT/scaling.log"
