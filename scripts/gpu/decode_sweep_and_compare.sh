#!/bin/bash
# One device call (<= 10 min) on two GPUs: tests/test_gpu.py and tests/test_decode_kernel.py on GPU 0 while
# GPU 1 runs the decode kernel's split sweep (bench/decode_kernel.py --sweep), then the comparison grid
# (scripts/gpu/compare.sh) for the time left.
# Usage on the GPU machine: bash scripts/gpu/decode_sweep_and_compare.sh. Logs land in $OUT.
T0=$(date +%s)
source scripts/gpu/setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
(CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest tests/test_gpu.py tests/test_decode_kernel.py -q -rs \
   -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1; echo "pytest exit $?" >> "$OUT/gpu_tests.log") &
(CUDA_VISIBLE_DEVICES=1 timeout 240 python3 bench/decode_kernel.py --sweep > "$OUT/decode_kernel.log" 2>&1;
   echo "bench exit $?" >> "$OUT/decode_kernel.log") &
wait
tail -5 "$OUT/gpu_tests.log"; tail -25 "$OUT/decode_kernel.log"
bash scripts/gpu/compare.sh $((575 - $(date +%s) + T0))
