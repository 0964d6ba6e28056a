#!/bin/bash
# Session 2, call 1 (2x H200): GPU tests on GPU 0 while the decode kernel is timed on GPU 1, then the grid.
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
