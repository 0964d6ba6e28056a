#!/bin/bash
# One device call (<= 10 min) on nvidia-h200-x2 that checks this tree's GPU paths and re-times what changed
# since the figures in docs/benchmarks.md. First every GPU test, alone on the machine (next to a compiling
# training job the suite runs out of time). Then, side by side: on GPU 0 the whole decode benchmark
# (batch 1, 16, 64 x context 1k, 8k, 32k; the compiled step at batch 1), on GPU 1 the training benchmark at
# 4096 tokens (1b, TRAIN_SHAPES=1b,350m for both; baseline, DIFF V2 recomputing and keeping the pair difference,
# baseline with 2h query heads: the time left after the tests fits about four 1b rows) for speed and peak
# memory. On one GPU the two run in turn.
# Usage on the GPU machine: bash scripts/gpu/verify.sh (carry .whl). Logs land in $OUT.
T0=$(date +%s)
GPU_TEST_S=${GPU_TEST_S:-320}  # a fresh machine compiles and autotunes from empty caches: 200 s ran out
source scripts/gpu/setup.sh
export PYTHONUNBUFFERED=1
left() { local l=$((560 - $(date +%s) + T0)); echo $((l > 5 ? l : 5)); }
gpus=$(nvidia-smi -L | wc -l)
other=$((gpus > 1 ? 1 : 0))
CUDA_VISIBLE_DEVICES=0 timeout $GPU_TEST_S python3 -m pytest tests -m gpu -rfE --durations=15 -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?" >> "$OUT/gpu_tests.log"
train() {
  mkdir -p "$OUT/train"
  CUDA_VISIBLE_DEVICES=$other timeout $(left) python3 bench/train.py --modes compile --shapes ${TRAIN_SHAPES:-1b} --seqs 4096 \
    --variants ${TRAIN_VARIANTS:-baseline,diff_v2,diff_v2_keep,baseline_2h} --out "$OUT/train" > "$OUT/train.log" 2>&1
  echo "train exit $?" >> "$OUT/train.log"
}
[ "$gpus" -gt 1 ] && train &
CUDA_VISIBLE_DEVICES=0 timeout $(( gpus > 1 ? $(left) : 200 )) python3 bench/decode.py \
  --compiled-points 1x1024,1x32768 > "$OUT/decode.log" 2>&1
echo "decode exit $?" >> "$OUT/decode.log"
[ "$gpus" -gt 1 ] || train
wait
grep -v "^SKIPPED" "$OUT/gpu_tests.log" | tail -6
grep -v '^{' "$OUT/decode.log" | grep -v -i warn | tail -n 45
grep -v '^{' "$OUT/train.log" | tail -n 12
