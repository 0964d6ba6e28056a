#!/bin/bash
# One device call (<= 10 min): training throughput of baseline vs DIFF V2 (SDPA and fused Triton kernel) under
# torch.compile, the small shape at 1024 and the 350m / 1b shapes at 4096, split over two GPUs when
# there are two. Usage on the GPU machine: bash scripts/gpu/train_bench.sh. Results and logs land in $OUT.
source scripts/gpu/setup.sh
gpus=$(nvidia-smi -L | wc -l)
variants=baseline,diff_v2,diff_v2+triton
run() {  # GPU, tag, bench/train.py arguments...
  local gpu=$1 tag=$2; shift 2
  mkdir -p "$OUT/$tag"
  CUDA_VISIBLE_DEVICES=$gpu timeout 540 python3 bench/train.py --modes compile --variants $variants \
    --out "$OUT/$tag" "$@" > "$OUT/$tag.log" 2>&1
  echo "$tag exit $?" >> "$OUT/$tag.log"
}
run 0 small --shapes small --seqs 1024 &
if [ "$gpus" -gt 1 ]; then run 1 big --shapes 350m,1b --seqs 4096 & else wait; run 0 big --shapes 350m --seqs 4096; fi
wait
for tag in small big; do tail -n 8 "$OUT/$tag.log"; done
