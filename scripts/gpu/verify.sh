#!/bin/bash
# One device call (<= 10 min) on nvidia-h200-x2 that checks this tree's GPU paths and takes the numbers the open
# issues ask for: the GPU link (topology, NCCL bandwidth), then in parallel the GPU tests and the model-level
# decode benchmark on GPU 0 and, on GPU 1, the fused DIFF V2 attention kernel and the small-shape training
# benchmark. Usage on the GPU machine: bash scripts/gpu/verify.sh (carry .whl). Logs land in $OUT.
T0=$(date +%s)
source scripts/gpu/setup.sh
left() { echo $((${1:-560} - $(date +%s) + T0)); }
nvidia-smi topo -m > "$OUT/comm.log" 2>&1
NCCL_DEBUG=INFO timeout 90 python3 -m torch.distributed.run --standalone --nproc_per_node=2 bench/collectives.py \
  > /tmp/comm_raw.log 2>&1
grep -E "via |NVLS|P2P/|SHM" /tmp/comm_raw.log | sed 's/^[^ ]* //' | sort -u | head -12 >> "$OUT/comm.log"
grep -v "NCCL INFO" /tmp/comm_raw.log | tail -n 30 >> "$OUT/comm.log"
(CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest tests/test_gpu.py tests/test_generate.py \
   tests/test_decode_kernel.py tests/test_diff_attn_kernel.py -m gpu -q -rfE -p no:cacheprovider \
   > "$OUT/gpu_tests.log" 2>&1; echo "pytest exit $?" >> "$OUT/gpu_tests.log"
 CUDA_VISIBLE_DEVICES=0 timeout $(left) python3 bench/decode.py > "$OUT/decode.log" 2>&1
 echo "decode exit $?" >> "$OUT/decode.log") &
(CUDA_VISIBLE_DEVICES=1 timeout 120 python3 bench/diff_attn_kernel.py > "$OUT/diff_attn_kernel.log" 2>&1
 mkdir -p "$OUT/train_small"
 CUDA_VISIBLE_DEVICES=1 timeout $(left) python3 bench/train.py --shapes small --seqs 1024 --modes compile,eager \
   --variants baseline,diff_v2,diff_v2+triton,diff_v1 --out "$OUT/train_small" > "$OUT/train_small.log" 2>&1
 echo "train exit $?" >> "$OUT/train_small.log") &
wait
grep -v "^SKIPPED" "$OUT/gpu_tests.log" | tail -12
tail -n 25 "$OUT/comm.log"; tail -n 30 "$OUT/decode.log"; tail -n 14 "$OUT/diff_attn_kernel.log" "$OUT/train_small.log"
