#!/bin/bash
# One device call (<= 10 min) that checks this tree's GPU paths and times decode: the GPU tests on GPU 0 while
# the attention kernels are timed on GPU 1 (when there is one), then the model-level decode benchmark.
# Usage on the GPU machine: bash scripts/gpu/verify.sh  (carry .whl). Results and logs land in $OUT.
T0=$(date +%s)
source scripts/gpu/setup.sh
gpus=$(nvidia-smi -L | wc -l)
other=$((gpus > 1 ? 1 : 0))
(CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest tests/test_gpu.py tests/test_generate.py \
   tests/test_decode_kernel.py tests/test_diff_attn_kernel.py -q -p no:cacheprovider -x \
   > "$OUT/gpu_tests.log" 2>&1; echo "pytest exit $?" >> "$OUT/gpu_tests.log") &
tests=$!
if [ "$gpus" -gt 1 ]; then
  (CUDA_VISIBLE_DEVICES=1 timeout 150 python3 bench/decode_kernel.py --sweep > "$OUT/decode_kernel.log" 2>&1;
   CUDA_VISIBLE_DEVICES=1 timeout 150 python3 bench/diff_attn_kernel.py > "$OUT/diff_attn_kernel.log" 2>&1) &
fi
wait $tests
grep -v "^SKIPPED" "$OUT/gpu_tests.log" | tail -15
left=$((560 - $(date +%s) + T0))
CUDA_VISIBLE_DEVICES=0 timeout $((left > 30 ? left - 20 : 10)) python3 bench/decode.py > "$OUT/decode.log" 2>&1
echo "decode exit $?"
wait
tail -n 30 "$OUT/decode.log"; tail -n 12 "$OUT/decode_kernel.log" "$OUT/diff_attn_kernel.log" 2>/dev/null
