#!/bin/bash
# One device call (<= 10 min): training throughput and peak memory under torch.compile, split over two GPUs
# when there are two: GPU 0 runs the small shape at 1024 and 350m at 4096, GPU 1 runs 1b at 4096 and
# 2048. Variants: baseline, the baseline with 2h query heads (the blog's claim 11), DIFF V2 (SDPA) and DIFF V2
# with the fused Triton kernel. Usage on the GPU machine: bash scripts/gpu/train_bench.sh. Logs land in $OUT.
source scripts/gpu/setup.sh
export PYTHONUNBUFFERED=1
gpus=$(nvidia-smi -L | wc -l)
variants=baseline,baseline_2h,diff_v2,diff_v2+triton
run() {  # GPU, tag, seconds, bench/train.py arguments...
  local gpu=$1 tag=$2 limit=$3; shift 3
  mkdir -p "$OUT/$tag"
  CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python3 bench/train.py --modes compile --variants $variants \
    --out "$OUT/$tag" "$@" > "$OUT/$tag.log" 2>&1
  echo "$tag exit $?" >> "$OUT/$tag.log"
}
if [ "$gpus" -gt 1 ]; then
  (run 0 small 200 --shapes small --seqs 1024; run 0 t350m 330 --shapes 350m --seqs 4096) &
  run 1 t1b 540 --shapes 1b --seqs 4096,2048 &
  wait
else
  run 0 small 200 --shapes small --seqs 1024; run 0 t350m 330 --shapes 350m --seqs 4096
fi
for tag in small t350m t1b; do [ -f "$OUT/$tag.log" ] && grep -v '^{' "$OUT/$tag.log" | tail -n 12; done
