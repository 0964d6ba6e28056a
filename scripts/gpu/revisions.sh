#!/bin/bash
# One device call (<= 10 min): this tree's GPU tests, then decode speed of this tree against a base revision in
# the same run (bench/revisions.py alternates the two trees per variant), so a refactor is shown speed-neutral.
# Prepare the base tree here first, and carry it:
#   mkdir -p .bench-base && git archive BASE_COMMIT src bench | tar x -C .bench-base
# Usage on the GPU machine: bash scripts/gpu/revisions.sh (carry .bench-base). Logs land in $OUT.
# Training throughput has the same form: python3 bench/revisions.py --base .bench-base \
#   --variants baseline,diff_v2,baseline_2h -- train.py --modes compile --shapes 1b --seqs 4096 --batch-tokens 32768
T0=$(date +%s)
source scripts/gpu/setup.sh
export PYTHONUNBUFFERED=1
left() { local l=$((570 - $(date +%s) + T0)); echo $((l > 5 ? l : 5)); }
[ -d .bench-base/src ] || { echo "no .bench-base/src: prepare and carry the base tree (see the header)"; exit 2; }
timeout ${GPU_TEST_S:-240} python3 -m pytest tests -m gpu -rfE -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?" >> "$OUT/gpu_tests.log"
python3 bench/revisions.py --base .bench-base --variants ${DECODE_VARIANTS:-baseline,diff_v2} --budget-s "$(left)" \
  --out "$OUT/decode" -- decode.py --batches 1,64 --contexts 1024,32768 --paths static > "$OUT/decode.log" 2>&1
echo "revisions exit $?" >> "$OUT/decode.log"
grep -v "^SKIPPED" "$OUT/gpu_tests.log" | tail -6
tail -n 12 "$OUT/decode.log"
