#!/bin/bash
# One device call (<= 10 min) on nvidia-h200-x2 that checks this tree's GPU paths and re-times what changed
# since the last full runs (docs/benchmarks.md): on GPU 0 every GPU test, then the whole decode benchmark
# (batch 1, 16, 64 x context 1k, 8k, 32k; the compiled step at batch 1); on GPU 1 the training benchmark at
# 4096 tokens (1b and 350m; baseline, baseline with 2h query heads, DIFF V2 with SDPA and with the fused
# kernel). On one GPU the two run in turn.
# Usage on the GPU machine: bash scripts/gpu/verify.sh (carry .whl). Logs land in $OUT.
T0=$(date +%s)
source scripts/gpu/setup.sh
export PYTHONUNBUFFERED=1
left() { local l=$((560 - $(date +%s) + T0)); echo $((l > 5 ? l : 5)); }
gpus=$(nvidia-smi -L | wc -l)
other=$((gpus > 1 ? 1 : 0))
train() {  # the 4096 rows first; then, in the time left, the 2048 rows that the last run did not reach
  mkdir -p "$OUT/train" "$OUT/train2048"
  CUDA_VISIBLE_DEVICES=$other timeout $(left) python3 bench/train.py --modes compile --shapes 1b,350m --seqs 4096 \
    --variants baseline,baseline_2h,diff_v2,diff_v2+triton --out "$OUT/train" > "$OUT/train.log" 2>&1
  echo "train exit $?" >> "$OUT/train.log"
  CUDA_VISIBLE_DEVICES=$other timeout $(left) python3 bench/train.py --modes compile --shapes 1b,350m --seqs 2048 \
    --variants baseline,diff_v2 --out "$OUT/train2048" >> "$OUT/train.log" 2>&1
  echo "train2048 exit $?" >> "$OUT/train.log"
}
[ "$gpus" -gt 1 ] && train &
CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest tests -m gpu -q -rfE -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?" >> "$OUT/gpu_tests.log"
CUDA_VISIBLE_DEVICES=0 timeout $(( gpus > 1 ? $(left) : 200 )) python3 bench/decode.py \
  --compiled-points 1x1024,1x32768 > "$OUT/decode.log" 2>&1
echo "decode exit $?" >> "$OUT/decode.log"
[ "$gpus" -gt 1 ] || train
if [ "$gpus" -gt 1 ] && [ "$(left)" -gt 90 ]; then  # eager rows, for the with/without torch.compile table
  CUDA_VISIBLE_DEVICES=0 timeout $(left) python3 bench/train.py --modes eager --shapes 1b --seqs 4096 \
    --variants baseline,diff_v2 --out "$OUT" > "$OUT/train_eager.log" 2>&1
fi
wait
grep -v "^SKIPPED" "$OUT/gpu_tests.log" | tail -8
grep -v '^{' "$OUT/decode.log" | tail -n 40
for f in train train_eager; do [ -f "$OUT/$f.log" ] && grep -v '^{' "$OUT/$f.log" | tail -n 14; done
