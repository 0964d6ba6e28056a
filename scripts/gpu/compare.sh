#!/bin/bash
# Train (or resume) the comparison grid for at most $1 seconds, then bring back everything but the weights.
# Usage on the GPU machine: bash scripts/gpu/compare.sh SECONDS [CONFIG]. Runs are checkpointed every
# save_every steps, so a later call on the same (still warm) machine resumes where this one was cut.
source scripts/gpu/setup.sh
config=${2:-configs/compare_125m.toml}
out_dir=$(python3 -c "import tomllib,sys; print(tomllib.load(open(sys.argv[1],'rb'))['compare']['out_dir'])" "$config")
jobs=$((2 * $(nvidia-smi -L | wc -l)))  # two runs per GPU: one compiles or evaluates while the other trains
# the last EVAL_RESERVE_S seconds (default 150) score runs whose training finished but whose evaluation was cut:
# their checkpoints stay on this machine only, and a later call on a fresh one could not score them
reserve=${EVAL_RESERVE_S:-150}
timeout -k 10 "$(($1 - reserve))" python3 -m diffv2 compare "$config" --jobs "$jobs" --no-report >> "$OUT/compare.log" 2>&1
echo "compare exit $?" >> "$OUT/compare.log"
pkill -f diffv2.compare.worker; sleep 3
timeout -k 10 "$((reserve - 15))" python3 -m diffv2 compare "$config" --jobs "$jobs" --no-report --eval-only \
  >> "$OUT/compare.log" 2>&1
echo "compare --eval-only exit $?" >> "$OUT/compare.log"
pkill -f diffv2.compare.worker; sleep 3
tar czf "$OUT/compare_runs.tgz" --exclude=checkpoints --exclude=tensorboard --exclude=data "$out_dir"
grep -h '"kind": "train"' "$out_dir"/*/lr*/seed*/metrics.jsonl 2>/dev/null | wc -l | sed 's/^/train records: /'
for d in "$out_dir"/*/lr*/seed*; do
  echo "$d $(tail -c 300 "$d/metrics.jsonl" 2>/dev/null | tail -1 | cut -c1-120)"
done
tail -20 "$OUT/compare.log"
